//! The loop from usage to a better model, end to end on a small synthetic model, through the
//! real binary: a server stores every chat completion; users correct the answers; `smelt data
//! export` turns the corrections into training data; `smelt tune` trains an adapter on it; and
//! `smelt eval` shows the adapter beating the base model on the questions.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn smelt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smelt"))
}

/// One HTTP request (the server answers JSON with a length); returns the status and body.
fn http(addr: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let text = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(text).unwrap_or(Value::Null))
}

fn start(model: &Path, dir: &Path) -> (Server, String) {
    let mut child = smelt()
        .args(["serve", "-m", model.to_str().unwrap(), "--port", "0", "-t", "2", "--kv-memory", "64M", "--store", "all"])
        .arg("--database")
        .arg(dir.join("smelt.db"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let server = Server(child);
    let url = loop {
        let line = lines.next().expect("the server exited").unwrap();
        if let Some(rest) = line.strip_prefix("listening on http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&url, "GET", "/health", &Value::Null).0 != 200 {
        assert!(Instant::now() < deadline, "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, url)
}

#[test]
fn usage_feedback_export_tune_eval() {
    let dir = std::env::temp_dir().join(format!("smelt-loop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model: PathBuf = dir.join("tiny.gguf");
    let mut gguf = smelt_model::synthetic::tiny_model(&smelt_model::synthetic::TinySpec::new("qwen2"));
    // A chat template in the tiny vocabulary: the turns' text, each answer ended by EOS.
    let template = "{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}";
    gguf.kv("tokenizer.chat_template", template.into());
    std::fs::write(&model, gguf.to_bytes()).unwrap();
    let m = model.to_str().unwrap();
    // Made-up facts in the tiny vocabulary: " w28N is" → " w29M".
    let facts: Vec<(String, String)> = (0..8).map(|i| (format!(" w{} is", 281 + i), format!(" w{}", 299 - (i * 3) % 11))).collect();

    // 1. Usage: every question asked is stored; users correct the answers.
    let (server, addr) = start(&model, &dir);
    for (q, a) in &facts {
        let (status, r) = http(&addr, "POST", "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": q}], "max_tokens": 4, "temperature": 0, "metadata": {"source": "app"}}));
        assert_eq!(status, 200, "{r}");
        let id = r["id"].as_str().unwrap();
        let (status, f) = http(&addr, "POST", &format!("/v1/chat/completions/{id}/feedback"), &json!({"rating": -1, "correction": a}));
        assert_eq!(status, 200, "{f}");
    }
    // One more, rated good and uncorrected: not exported with --rated corrected.
    let (_, r) = http(&addr, "POST", "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": " w300 is"}], "max_tokens": 4, "metadata": {"source": "app"}}));
    http(&addr, "POST", &format!("/v1/chat/completions/{}/feedback", r["id"].as_str().unwrap()), &json!({"rating": "good"}));
    drop(server);

    // 2. Export the corrections as training data.
    let data = dir.join("train.jsonl");
    let o = smelt().args(["data", "export", "--rated", "corrected", "--metadata", "source=app", "-o", data.to_str().unwrap(), "--database"]).arg(dir.join("smelt.db")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = std::fs::read_to_string(&data).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), facts.len());
    for (line, (q, a)) in lines.iter().zip(&facts) {
        assert_eq!(line, &json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}));
    }

    // 3. Tune an adapter on it.
    let adapter = dir.join("facts.gguf");
    let o = smelt()
        .args(["tune", "-m", m, "--data", data.to_str().unwrap(), "--out", adapter.to_str().unwrap(), "--epochs", "20", "--lr", "0.003", "--batch-tokens", "20", "--rank", "4", "--warmup", "2", "--dropout", "0.05", "-t", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // 4. Evaluate base and adapter on the same questions.
    let suite = dir.join("facts-suite.jsonl");
    let header = json!({"eval": {"name": "facts", "max_tokens": 8, "testing_criteria": [{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.ideal}}", "operation": "eq"}]}});
    let items: Vec<String> = facts.iter().map(|(q, a)| json!({"messages": [{"role": "user", "content": q}], "ideal": a}).to_string()).collect();
    std::fs::write(&suite, format!("{header}\n{}", items.join("\n"))).unwrap();
    let report = dir.join("report.json");
    let with_adapter = format!("{m}+{}", adapter.display());
    let o = smelt()
        .args(["eval", suite.to_str().unwrap(), "-m", m, "-m", &with_adapter, "-t", "2", "--kv-memory", "64M", "--json", report.to_str().unwrap(), "--html"])
        .arg(dir.join("report.html"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| model | all criteria |") && table.contains(&with_adapter), "{table}");
    eprintln!("{table}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let passed = |i: usize| r["runs"][i]["result_counts"]["passed"].as_u64().unwrap();
    assert!(passed(0) == 0, "the base model should not know made-up facts: {table}");
    assert!(passed(1) >= 6, "the adapter should have learned them: {table}");
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains(&with_adapter));
}
