//! `smelt serve` (the real binary, both reference models) driven by the official OpenAI client
//! packages: the Python suite (tests/clients/python: API coverage, llama.cpp's golden chat answers,
//! a 32-client load test with batch invariance and a mid-stream disconnect) and the Node suite
//! (tests/clients/node). `scripts/test.sh` installs the packages they need.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A random rank-8 LoRA adapter (f16) for the chat model, written where the tests can find it.
fn adapter_file() -> PathBuf {
    use smelt_model::lora::{Adapter, Target};
    let base = smelt_store::Store::from_env().resolve("qwen2.5-coder-0.5b-instruct").expect("the chat model is in the store (smelt pull)");
    let model = smelt_model::arch::Model::load(&base).unwrap();
    let a = Adapter::random(&model, "rnd", 8, 8.0, &Target::ALL, smelt_kernels::formats::DType::F16, 0.05, 7);
    let path = std::env::temp_dir().join(format!("smelt-clients-adapter-{}.gguf", std::process::id()));
    std::fs::write(&path, a.to_gguf().to_bytes()).unwrap();
    path
}

/// Start the server on a free port, serving the adapter `rnd` on the chat model; returns it and
/// its base URL once /health says ready.
fn start(adapter: &std::path::Path) -> (Server, String) {
    let lora = format!("rnd={}", adapter.display());
    let database = std::env::temp_dir().join(format!("smelt-clients-{}.db", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_smelt"))
        .args(["serve", "-m", "qwen2.5-coder-0.5b-instruct", "-m", "gemma-3-270m", "--port", "0", "-t", "2", "--kv-memory", "512M", "--max-batch", "32", "--queue", "128", "--lora", &lora, "--database"])
        .arg(&database)
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting smelt serve");
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(rest) = line.strip_prefix("listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining the server's log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let deadline = Instant::now() + Duration::from_secs(300);
    let addr = url.trim_start_matches("http://").to_string();
    loop {
        assert!(Instant::now() < deadline, "server not ready");
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            use std::io::{Read, Write};
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            if resp.starts_with("HTTP/1.1 200") {
                return (server, url);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_suite(cmd: &mut Command, url: &str, adapter: &std::path::Path, what: &str) {
    let out = cmd
        .env("SMELT_URL", url)
        .env("SMELT_ADAPTER", "qwen2.5-coder-0.5b-instruct:rnd")
        .env("SMELT_ADAPTER_FILE", adapter)
        .env("SMELT_CHAT_MODEL", "qwen2.5-coder-0.5b-instruct")
        .env("SMELT_BASE_MODEL", "gemma-3-270m")
        .env("SMELT_BIN", env!("CARGO_BIN_EXE_smelt"))
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("cannot run the {what} suite: {e}"));
    let log = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} suite failed (packages missing? run scripts/test.sh):\n{log}");
    println!("{what}:\n{log}");
}

#[test]
fn official_openai_clients_python_and_node() {
    let adapter = adapter_file();
    let (_server, url) = start(&adapter);
    run_suite(Command::new("python3").args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/clients/python"]), &url, &adapter, "python");
    run_suite(Command::new("node").args(["--test", "tests/clients/node/"]), &url, &adapter, "node");
    let _ = std::fs::remove_file(adapter);
}
