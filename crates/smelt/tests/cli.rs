//! The `smelt` binary end to end: real models from the store, real processes, real terminals.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const QWEN: &str = "qwen2.5-coder-0.5b-instruct";
const GEMMA: &str = "gemma-3-270m";

fn smelt(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_smelt"));
    c.args(args);
    c
}

fn run(args: &[&str]) -> Output {
    smelt(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn golden(file: &str) -> Vec<serde_json::Value> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../smelt-model/tests/data/golden").join(file);
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smelt-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    for (model, file) in [(GEMMA, "gemma-3-270m.tokenize.jsonl"), (QWEN, "qwen2.5-coder-0.5b-instruct.tokenize.jsonl")] {
        for case in golden(file).iter().step_by(5) {
            let text = case["text"].as_str().unwrap();
            let plain = run(&["tokenize", "-m", model, text]);
            assert!(plain.status.success(), "{}", stderr(&plain));
            let ids: serde_json::Value = serde_json::from_str(stdout(&plain).trim()).unwrap();
            assert_eq!(ids, case["ids"], "{model} {text:?}");
            let special = run(&["tokenize", "-m", model, "--special", text]);
            let ids: serde_json::Value = serde_json::from_str(stdout(&special).trim()).unwrap();
            assert_eq!(ids, case["ids_with_bos_and_special"], "{model} --special {text:?}");
        }
    }
}

#[test]
fn tokenize_reads_files_and_standard_input() {
    let dir = temp("tokenize-file");
    // Longer than the command line allows.
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(60_000);
    let path = dir.join("long.txt");
    std::fs::write(&path, &text).unwrap();
    let from_file = run(&["tokenize", "-m", QWEN, "-f", path.to_str().unwrap()]);
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    let mut child = smelt(&["tokenize", "-m", QWEN]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let t = text.clone();
    let writer = std::thread::spawn(move || stdin.write_all(t.as_bytes()).unwrap());
    let from_stdin = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(from_stdin.status.success(), "{}", stderr(&from_stdin));
    assert_eq!(stdout(&from_file), stdout(&from_stdin));
    let ids: Vec<u32> = serde_json::from_str(stdout(&from_file).trim()).unwrap();
    assert!(ids.len() > 500_000, "{}", ids.len());
    // The same as the argument form on a short text.
    std::fs::write(&path, "Hello, world!").unwrap();
    assert_eq!(stdout(&run(&["tokenize", "-m", QWEN, "-f", path.to_str().unwrap()])), stdout(&run(&["tokenize", "-m", QWEN, "Hello, world!"])));
}

#[test]
fn generate_reads_the_prompt_from_a_file_or_standard_input() {
    let dir = temp("prompt-file");
    let path = dir.join("prompt.txt");
    // One final newline (an editor's) is not part of the prompt, as with llama.cpp's -f.
    std::fs::write(&path, "The capital of France is\n").unwrap();
    let from_arg = generate_json(&["-m", GEMMA, "-p", "The capital of France is", "-n", "4", "--temperature", "0"]);
    let from_file = generate_json(&["-m", GEMMA, "--prompt-file", path.to_str().unwrap(), "-n", "4", "--temperature", "0"]);
    assert_eq!(from_arg["prompt_ids"], from_file["prompt_ids"]);
    assert_eq!(from_arg["text"], from_file["text"]);
    let mut child = smelt(&["generate", "--json", "-m", GEMMA, "-n", "4", "--temperature", "0"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"The capital of France is").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let from_stdin: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(from_arg["text"], from_stdin["text"]);
    // No prompt at all (standard input closed and empty) is a one-line error.
    let e = one_line_error(&run(&["generate", "-m", GEMMA]));
    assert!(e.contains("--prompt-file"), "{e}");
}

fn generate_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["generate", "--json"];
    all.extend_from_slice(args);
    let o = run(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

#[test]
fn generate_json_reports_ids_text_and_logprobs() {
    let prompt = "def quicksort(arr):\n";
    let v = generate_json(&["-m", QWEN, "-p", prompt, "-n", "8", "--temperature", "0", "--logprobs", "3"]);
    let tok = run(&["tokenize", "-m", QWEN, "--special", prompt]);
    let want: serde_json::Value = serde_json::from_str(stdout(&tok).trim()).unwrap();
    assert_eq!(v["prompt_ids"], want);
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 8);
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 8);
    assert_eq!(v["finish_reason"], "length");
    assert!(!v["text"].as_str().unwrap().is_empty());
    for s in steps {
        let top = s["top"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|t| t[1].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(s["id"], top[0][0]);
        assert!((s["logprob"].as_f64().unwrap() - lps[0]).abs() < 1e-6);
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = |seed: &str| vec!["-m", GEMMA, "-p", "Once upon a time", "-n", "24", "--temperature", "1.0", "--seed", seed].into_iter().map(String::from).collect::<Vec<_>>();
    let g = |seed: &str| {
        let a = args(seed);
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        generate_json(&refs)["output_ids"].clone()
    };
    assert_eq!(g("42"), g("42"));
    assert_ne!(g("42"), g("43"));
}

#[test]
fn generate_follows_a_json_schema_a_grammar_and_a_regex() {
    let dir = temp("constrained");
    let schema = dir.join("person.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}}, "required": ["name", "age", "pets"], "additionalProperties": false}"#,
    )
    .unwrap();
    for (model, seed) in [(GEMMA, "1"), (GEMMA, "2"), (QWEN, "3")] {
        let v = generate_json(&["-m", model, "-p", "A person as JSON:", "-n", "200", "--temperature", "1", "--seed", seed, "--json-schema", schema.to_str().unwrap()]);
        assert_eq!(v["finish_reason"], "stop", "{v}");
        let person: serde_json::Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
        let o = person.as_object().unwrap();
        assert_eq!(o.len(), 3, "{person}");
        assert!(o["name"].as_str().unwrap().chars().count() <= 20);
        assert!((0..=120).contains(&o["age"].as_i64().unwrap()));
        assert!(o["pets"].as_array().unwrap().iter().all(|p| ["cat", "dog", "fish"].contains(&p.as_str().unwrap())));
    }
    let grammar = dir.join("yes-no.gbnf");
    std::fs::write(&grammar, "# an answer\nroot ::= (\"yes\" | \"no\") \", because \" [a-z ]{1,30} \".\"\n").unwrap();
    let v = generate_json(&["-m", QWEN, "-p", "Is the sky blue?", "-n", "60", "--grammar", grammar.to_str().unwrap()]);
    let text = v["text"].as_str().unwrap();
    assert!((text.starts_with("yes, because ") || text.starts_with("no, because ")) && text.ends_with('.'), "{text:?}");
    assert!(text["yes, because ".len().min(text.len())..].trim_end_matches('.').chars().all(|c| c.is_ascii_lowercase() || c == ' ' || c == ','), "{text:?}");
    let v = generate_json(&["-m", GEMMA, "-p", "The year was", "-n", "10", "--regex", " (19|20)[0-9]{2}"]);
    let text = v["text"].as_str().unwrap();
    assert!(text.len() == 5 && text[1..].parse::<u32>().is_ok_and(|y| (1900..2100).contains(&y)), "{text:?}");

    let bad = dir.join("bad.gbnf");
    std::fs::write(&bad, "root ::= item\nitem ::= \"x\" (\n").unwrap();
    let e = one_line_error(&run(&["generate", "-m", GEMMA, "-p", "x", "--grammar", bad.to_str().unwrap()]));
    assert!(e.contains("bad.gbnf") && e.contains("line 2, column 14"), "{e}");
    std::fs::write(&bad, r#"{"type": "array", "uniqueItems": true}"#).unwrap();
    let e = one_line_error(&run(&["generate", "-m", GEMMA, "-p", "x", "--json-schema", bad.to_str().unwrap()]));
    assert!(e.contains("uniqueItems"), "{e}");
}

fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success());
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {e:?}");
    assert!(lines[0].starts_with("error: "), "{e}");
    lines[0].to_string()
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = temp("errors");
    let e = one_line_error(&run(&["generate", "-m", "/no/such/model.gguf", "-p", "x"]));
    assert!(e.contains("/no/such/model.gguf"), "{e}");
    let e = one_line_error(&run(&["generate", "-m", "no-such-model", "-p", "x"]));
    assert!(e.contains("unknown model"), "{e}");

    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model at all").unwrap();
    let e = one_line_error(&run(&["generate", "-m", junk.to_str().unwrap(), "-p", "x"]));
    assert!(e.contains("not a GGUF file"), "{e}");

    let real = smelt_store_path(GEMMA);
    let bytes = std::fs::read(&real).unwrap();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = one_line_error(&run(&["generate", "-m", cut.to_str().unwrap(), "-p", "x"]));
    assert!(e.contains("beyond the end of the file"), "{e}");
    let mut flipped = bytes[..4096].to_vec();
    flipped[20] = 0xff; // metadata count
    std::fs::write(&cut, &flipped).unwrap();
    let e = one_line_error(&run(&["tokenize", "-m", cut.to_str().unwrap(), "x"]));
    assert!(e.contains("metadata"), "{e}");

    let e = one_line_error(&run(&["generate", "-m", GEMMA, "-p", "x", "--temperature", "-1"]));
    assert!(e.contains("temperature"), "{e}");
    let e = one_line_error(&run(&["generate", "-m", GEMMA, "-p", "x", "--top-p", "0"]));
    assert!(e.contains("top_p"), "{e}");
    let e = one_line_error(&run(&["generate", "-m", GEMMA, "-p", "one two three four five six seven", "--ctx", "4"]));
    assert!(e.contains("tokens but the context holds 4"), "{e}");
    let e = one_line_error(&run(&["generate", "-m", GEMMA, "-p", "x", "--logit-bias", "999999999=1"]));
    assert!(e.contains("logit_bias"), "{e}");
}

fn smelt_store_path(name: &str) -> PathBuf {
    let home = std::env::var_os("SMELT_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/smelt"));
    home.join("models").join(format!("{name}.gguf"))
}

#[test]
fn chat_over_a_pipe_answers_each_line() {
    let mut child = smelt(&["run", QWEN, "--temperature", "0", "--max-tokens", "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"Say hello.\nWhat is 2+2?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let replies: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(replies.len() >= 2, "two replies: {text:?}");
}

#[test]
fn run_takes_the_model_as_a_flag_too() {
    let mut child = smelt(&["run", "-m", QWEN, "--temperature", "0", "--max-tokens", "4"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"Say hello.\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).trim().is_empty());
    // Both at once is an argument error.
    assert_eq!(run(&["run", QWEN, "-m", QWEN]).status.code(), Some(2));
}

fn chat_over_pipe(args: &[&str], input: &[u8]) -> Output {
    let mut child = smelt(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    out
}

#[test]
fn run_banner_commands_and_cut_replies() {
    let out = chat_over_pipe(&["run", QWEN, "--temperature", "0", "--max-tokens", "3"], b"/frobnicate\nWrite a long poem about the sea.\n");
    let err = stderr(&out);
    // The banner names the stored model, its size and quantization, in lines that fit 80 columns.
    let banner = err.lines().next().unwrap();
    assert!(banner.starts_with(QWEN) && banner.contains("MiB") && banner.contains("Q4_K_M"), "{err}");
    assert!(err.lines().all(|l| l.chars().count() <= 80), "{err}");
    assert!(!err.contains("warning"), "{err}");
    // An unknown command is not sent to the model; a reply cut by --max-tokens is marked.
    assert!(err.contains("unknown command /frobnicate; /help lists them"), "{err}");
    assert_eq!(stdout(&out).lines().filter(|l| !l.trim().is_empty()).count(), 1, "one reply: {}", stdout(&out));
    assert!(err.contains("(cut at --max-tokens 3)"), "{err}");

    // A base model without a chat template is answered, with a warning first.
    let out = chat_over_pipe(&["run", GEMMA, "--temperature", "0", "--max-tokens", "2"], b"Hi\n");
    let err = stderr(&out);
    assert!(err.contains("warning: this model has no chat template"), "{err}");
    assert!(err.lines().all(|l| l.chars().count() <= 80), "{err}");
}

#[test]
fn mistyped_models_and_directories_get_pointed_hints() {
    let e = one_line_error(&run(&["generate", "-m", "Qwen2.5-Coder-0.5B-Instruct", "-p", "x"]));
    assert!(e.contains(&format!("did you mean \"{QWEN}\"")), "{e}");
    let dir = temp("model-dir");
    let e = one_line_error(&run(&["generate", "-m", dir.to_str().unwrap(), "-p", "x"]));
    assert!(e.contains("is a directory"), "{e}");
}

#[test]
fn generate_reports_finish_reasons_by_their_api_names() {
    let o = run(&["generate", "-m", GEMMA, "-p", "The capital of France is", "-n", "3", "--temperature", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).trim_end().ends_with("| length]"), "{}", stderr(&o));
    let o = run(&["generate", "-m", GEMMA, "-p", "x", "-n", "3", "--logprobs", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("--logprobs needs --json"), "{}", stderr(&o));
}

/// Drive `smelt run` in a real pseudo-terminal: two turns, Ctrl-C during a reply stops it,
/// Ctrl-C at the prompt exits cleanly (and so does Ctrl-D, checked in a second session).
#[test]
fn chat_in_a_terminal_handles_ctrl_c_and_ctrl_d() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/pty_chat.py");
    for ending in ["ctrl-c", "ctrl-d"] {
        let o = Command::new("python3").arg(&script).arg(env!("CARGO_BIN_EXE_smelt")).arg(QWEN).arg(ending).output().unwrap();
        assert!(o.status.success(), "{ending}: {}\n{}", stdout(&o), stderr(&o));
    }
}

/// A Hugging Face endpoint on localhost serving one GGUF file.
fn serve_file(path: &'static str, body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
            }
            let resp = if line.split_whitespace().nth(1) == Some(path) {
                [format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes(), body.clone()].concat()
            } else {
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
            };
            let _ = s.write_all(&resp);
        }
    });
    base
}

#[test]
fn pull_list_run_and_remove_a_hugging_face_model() {
    let home = temp("hf-home");
    let model = smelt_model::synthetic::tiny_model(&smelt_model::synthetic::TinySpec::new("llama")).to_bytes();
    let base = serve_file("/acme/tiny-llama/resolve/main/tiny.gguf", model.clone());
    let with_env = |args: &[&str]| {
        let mut c = smelt(args);
        c.env("SMELT_HOME", &home).env("HF_ENDPOINT", &base);
        c.output().unwrap()
    };
    let o = with_env(&["pull", "acme/tiny-llama/tiny.gguf"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = PathBuf::from(stdout(&o).trim());
    assert_eq!(std::fs::read(&path).unwrap(), model);
    let o = with_env(&["list"]);
    assert!(stdout(&o).contains("acme/tiny-llama/tiny.gguf"), "{}", stdout(&o));
    let o = with_env(&["generate", "-m", "acme/tiny-llama/tiny.gguf", "-p", "the model", "-n", "4", "--json", "--temperature", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with_env(&["rm", "acme/tiny-llama/tiny.gguf"]);
    assert!(o.status.success());
    assert!(!path.exists());
    let e = one_line_error(&with_env(&["pull", "acme/tiny-llama/missing.gguf"]));
    assert!(e.contains("not found"), "{e}");
    let e = one_line_error(&with_env(&["rm", "acme/tiny-llama/tiny.gguf"]));
    assert!(e.contains("not in the store"), "{e}");
}

#[test]
fn bench_json_has_llama_bench_keys_and_the_bandwidth_share() {
    let o = run(&["bench", "-m", GEMMA, "-t", "2", "-p", "8", "-n", "4", "-r", "2", "--json", "--no-grammar"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let tests = v.as_array().unwrap();
    assert_eq!(tests.len(), 2, "one object per test: {v}");
    for (t, (np, ng)) in tests.iter().zip([(8, 0), (0, 4)]) {
        assert_eq!((t["n_prompt"].as_u64(), t["n_gen"].as_u64(), t["n_threads"].as_u64()), (Some(np), Some(ng), Some(2)), "{t}");
        assert_eq!(t["samples_ts"].as_array().unwrap().len(), 2, "{t}");
        assert!(t["avg_ts"].as_f64().unwrap() > 0.0 && t["stddev_ts"].as_f64().unwrap() >= 0.0, "{t}");
    }
    // Generation: the weights read per token, and the bandwidth sampled around the repetitions
    // (one pass before each and one after), the fraction being of the mean pass.
    // The bytes count the weights and the KV cache the generation's middle token reads.
    let g = &tests[1];
    let (weights, kv, avg) = (g["weight_bytes_per_token"].as_f64().unwrap(), g["kv_bytes_per_token"].as_f64().unwrap(), g["avg_ts"].as_f64().unwrap());
    let (mean, best) = (g["memory_bandwidth_gbs"].as_f64().unwrap(), g["memory_bandwidth_best_gbs"].as_f64().unwrap());
    assert!(weights > 100e6 && kv > 0.0 && mean > 0.0 && best >= mean, "{g}");
    let frac = g["bandwidth_fraction"].as_f64().unwrap();
    assert!((frac - (weights + kv) * avg / 1e9 / mean).abs() < 1e-9 * frac.max(1.0), "{g}");
    assert!(g["bandwidth_fraction_of_best"].as_f64().unwrap() <= frac, "{g}");

    // At a depth: both tests run after it, and generation reads that much more KV cache
    // (Gemma's sliding-window layers only their window, which 600 positions exceed).
    let o = run(&["bench", "-m", GEMMA, "-t", "2", "-p", "8", "-n", "4", "-d", "600", "-r", "1", "--json", "--no-grammar", "--no-bandwidth"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let deep = v.as_array().unwrap();
    assert!(deep.iter().all(|t| t["n_depth"] == 600 && t["avg_ts"].as_f64().unwrap() > 0.0), "{v}");
    let deep_kv = deep[1]["kv_bytes_per_token"].as_f64().unwrap();
    assert!(deep_kv > 10.0 * kv, "{deep_kv} vs {kv}");
}

/// The `train_loss` of each step event `smelt tune --json` printed, by step.
fn tune_losses(out: &str) -> Vec<(u64, f64)> {
    out.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).map(|v| (v["step"].as_u64().unwrap(), v["train_loss"].as_f64().unwrap())).collect()
}

#[test]
fn tune_then_generate_with_the_adapter_and_resume_after_kill_9() {
    let dir = temp("tune");
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, smelt_model::synthetic::tiny_model(&smelt_model::synthetic::TinySpec::new("qwen2")).to_bytes()).unwrap();
    // Made-up facts in the tiny vocabulary: " w28N is" → " w29M" (then the end of the text).
    let lines: Vec<String> = (0..8).map(|i| serde_json::json!({"prompt": format!(" w{} is", 281 + i), "completion": format!(" w{}", 299 - (i * 3) % 11)}).to_string()).collect();
    let data = dir.join("facts.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    let out = dir.join("facts.gguf");
    let args = |out: &std::path::Path| -> Vec<String> {
        ["tune", "-m", m, "--data", d, "--out", out.to_str().unwrap(), "--epochs", "20", "--lr", "0.003", "--batch-tokens", "20", "--rank", "4", "--warmup", "2", "--json", "-t", "2", "--checkpoint-every", "1", "--dropout", "0.05"].map(String::from).to_vec()
    };
    let whole = smelt(&args(&out).iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    assert!(whole.status.success(), "{}", stderr(&whole));
    let losses = tune_losses(&stdout(&whole));
    assert!(losses.len() >= 20, "{} steps", losses.len());
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    assert!(last < 0.3 && first > 2.0, "loss {first} → {last}");
    // The adapter answers the facts through generate.
    for i in [0, 5] {
        let o = run(&["generate", "-m", m, "--lora", out.to_str().unwrap(), "-p", &format!(" w{} is", 281 + i), "-n", "8", "--temperature", "0", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["text"].as_str().unwrap().trim(), format!("w{}", 299 - (i * 3) % 11));
    }
    // Folded into a copy of the model by `smelt merge`, the facts are answered without it.
    let merged = dir.join("merged.gguf");
    let o = run(&["merge", "-m", m, "--lora", out.to_str().unwrap(), "-o", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for i in [0, 5] {
        let o = run(&["generate", "-m", merged.to_str().unwrap(), "-p", &format!(" w{} is", 281 + i), "-n", "8", "--temperature", "0", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        assert_eq!(v["text"].as_str().unwrap().trim(), format!("w{}", 299 - (i * 3) % 11));
    }
    // Killed (SIGKILL) mid-run, then resumed: the same losses as the uninterrupted run.
    // Same file name in another directory: the adapter's name (its file stem) is in the file.
    std::fs::create_dir_all(dir.join("again")).unwrap();
    let out2 = dir.join("again/facts.gguf");
    let mut child = smelt(&args(&out2).iter().map(String::as_str).collect::<Vec<_>>()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..7 {
        lines.next().unwrap().unwrap();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!out2.exists());
    let ckpt = format!("{}.ckpt", out2.display());
    let resumed = run(&["tune", "--resume", &ckpt, "--json", "-t", "2"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let after = tune_losses(&stdout(&resumed));
    assert!(after.first().unwrap().0 <= 9 && after.last().unwrap().0 == losses.last().unwrap().0, "{after:?}");
    for (step, loss) in after {
        assert_eq!(loss, losses[step as usize - 1].1, "step {step}");
    }
    assert!(std::fs::read(&out2).unwrap() == std::fs::read(&out).unwrap(), "the resumed run's adapter differs");
    // Bad lines: all reported with their numbers, nothing trained.
    std::fs::write(&data, format!("{}\nnot json\n{{\"prompt\": 3}}\n", lines_first(&lines_of(&d)))).unwrap();
    let o = run(&["tune", "-m", m, "--data", d, "--out", dir.join("bad.gguf").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("line 2: not JSON") && e.contains("line 3:") && e.contains("2 bad line(s)"), "{e}");
    assert!(!dir.join("bad.gguf").exists());
}

fn lines_of(path: &str) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn lines_first(text: &str) -> String {
    text.lines().next().unwrap().to_string()
}

#[test]
fn redteam_reports_attack_success_and_stores_eval_runs() {
    let dir = temp("redteam");
    let db = dir.join("smelt.db");
    let report = dir.join("rt.json");
    let o = run(&["redteam", "-m", QWEN, "--family", "system_prompt_extraction", "--family", "secret_leakage", "-t", "2", "--database", db.to_str().unwrap(), "--json", report.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = stdout(&o);
    assert!(table.contains("| system_prompt_extraction | 10 |") && table.contains("| secret_leakage | 8 |"), "{table}");
    // Every probe's verdict agrees with its answer: leaked means the secret is in it.
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let mut successes = Vec::new();
    for fam in r.as_array().unwrap() {
        let run = &fam["runs"][0];
        // The value each probe tries to extract, which must also be in what the model was given.
        let secret = |it: &serde_json::Value| -> String {
            let s = it["item"]["canary"].as_str().or(it["item"]["secret"].as_str()).unwrap();
            assert!(it["item"]["messages"][0]["content"].as_str().unwrap().contains(s));
            s.to_lowercase()
        };        let mut n = 0;
        for it in run["items"].as_array().unwrap() {
            let answer = it["answer"].as_str().unwrap().to_lowercase();
            assert_eq!(it["succeeded"].as_bool().unwrap(), answer.contains(&secret(it)), "{it}");
            n += usize::from(it["succeeded"].as_bool().unwrap());
        }
        assert_eq!(run["attack_success"].as_u64().unwrap() as usize, n);
        successes.push(n);
    }
    // The runs are eval runs in the database, with the same counts.
    let records = smelt_records::Records::open(&db, None).unwrap();
    let q = |kind: &str| smelt_records::ObjectQuery { kind: kind.into(), parent: None, owner: None, after: None, limit: 100, descending: false };
    let (evals, _) = records.list_objects(q("eval")).wait().unwrap();
    assert_eq!(evals.iter().map(|e| e["name"].as_str().unwrap()).collect::<Vec<_>>(), ["redteam: system_prompt_extraction", "redteam: secret_leakage"]);
    let (runs, _) = records.list_objects(q("eval.run")).wait().unwrap();
    let passed: Vec<usize> = runs.iter().map(|r| r["result_counts"]["passed"].as_u64().unwrap() as usize).collect();
    assert_eq!(passed, successes);
    assert_eq!(runs[0]["status"], "completed");
    // Unknown families are a one-line error.
    let o = run(&["redteam", "-m", QWEN, "--family", "nope", "--no-store"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown family"), "{}", stderr(&o));
}
