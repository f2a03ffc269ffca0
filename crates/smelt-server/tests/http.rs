//! The router in-process (tower `oneshot`) on a small synthetic model: every error path answers
//! in OpenAI's error shape with the right status, and never with a 5xx.

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use smelt_engine::scheduler::{Engine, EngineConfig};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::synthetic::{tiny_model, TinySpec};
use smelt_server::keys::{KeySpec, Keys};
use smelt_server::{app, AppState, ModelEntry, ServerConfig};
use std::sync::Arc;
use tower::ServiceExt;

fn tiny_engine(config: EngineConfig) -> Engine {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("smelt-http-{}-{k}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(&TinySpec::new("qwen3")).to_bytes()).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let _ = std::fs::remove_file(&path);
    Engine::start(model, Arc::new(ThreadPool::new(1)), config)
}

fn state(api_key: Option<&str>, config: EngineConfig) -> AppState {
    let engine = tiny_engine(config);
    let s = AppState::new(ServerConfig { keys: api_key.map(|k| Keys::new(vec![KeySpec::plain(k)])), max_body: 4096 });
    s.add_model(ModelEntry::new("tiny", engine));
    s.set_ready();
    s
}

fn config() -> EngineConfig {
    EngineConfig { n_ctx: 64, max_seqs: 4, kv_blocks: 64, step_tokens: 32, queue: 8, kv_types: Default::default(), kv_disk: None }
}

async fn call(s: &AppState, method: &str, uri: &str, body: impl Into<Body>, key: Option<&str>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let mut req = Request::builder().method(method).uri(uri).header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let resp = app(s.clone()).oneshot(req.body(body.into()).unwrap()).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = to_bytes(resp.into_body(), 1 << 24).await.unwrap();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v, headers)
}

/// An OpenAI-shaped error with this status; returns its message.
fn error(status: StatusCode, v: &Value, want: StatusCode) -> String {
    assert_eq!(status, want, "{v}");
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "not an OpenAI error: {v}");
    e["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn malformed_requests_get_4xx_in_openai_shape() {
    let s = state(None, config());
    let chat = "/v1/chat/completions";
    let bad: Vec<(&str, Body, &str)> = vec![
        (chat, Body::from("{not json"), "Invalid request body"),
        (chat, Body::from(vec![b'{', 0xff, 0xfe, b'}']), "UTF-8"),
        (chat, Body::from(r#"{"messages": "hi"}"#), "Invalid request body"),
        (chat, Body::from(r#"{"messages": []}"#), "messages must not be empty"),
        (chat, Body::from(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#), "unknown role"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "temperature": -1}"#), "temperature"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#), "Invalid request body"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "top_p": 0}"#), "top_p"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}"#), "max_tokens"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "n": 1000000}"#), "n must be"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 1e308}"#), "presence_penalty"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999999": 1}}"#), "logit_bias"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"abc": 1}}"#), "logit_bias"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}"#), "stop"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}"#), "requires logprobs"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#), "not supported"),
        ("/v1/completions", Body::from(r#"{"prompt": [1, -3]}"#), "outside the vocabulary"),
        ("/v1/completions", Body::from(r#"{"prompt": {"a": 1}}"#), "prompt/input must be"),
        ("/v1/completions", Body::from(r#"{"prompt": "x", "logprobs": 99}"#), "logprobs"),
        ("/v1/completions", Body::from(r#"{"prompt": "x", "suffix": "y"}"#), "fill-in-the-middle"),
        ("/v1/completions", Body::from(r#"{"prompt": []}"#), "must not be empty"),
        ("/v1/embeddings", Body::from(r#"{"input": "x", "encoding_format": "hex"}"#), "encoding_format"),
        ("/v1/embeddings", Body::from(r#"{"input": "x", "dimensions": 3}"#), "dimensions"),
        ("/detokenize", Body::from(r#"{"tokens": [123456789]}"#), "outside the vocabulary"),
        // Structured output and tools.
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": "json"}"#), "response_format needs a \"type\""),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}"#), "response_format type"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}"#), "needs a \"json_schema\""),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(a)\\1"}}}}"#), "backreferences"),
        (chat, Body::from(r##"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/missing"}}}}"##), "points at nothing"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}, "grammar": "root ::= \"a\""}"#), "not both"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "grammar": 7}"#), "Invalid request body"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "grammar": "root ::= [", "regex": "a"}"#), "at most one"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "tools": "all"}"#), "tools must be an array"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "tools": []}"#), "must not be empty"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}"#), "two tools"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]}"#), "function"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 3}"#), "tool_choice must be"),
        (chat, Body::from(r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "response_format": {"type": "json_object"}}"#), "cannot be combined"),
        ("/v1/completions", Body::from(r#"{"prompt": "x", "regex": "(?=a)"}"#), "look-around"),
        ("/v1/completions", Body::from(r#"{"prompt": "x", "json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}"#), "minimum is above maximum"),
    ];
    for (uri, body, want) in bad {
        let (status, v, _) = call(&s, "POST", uri, body, None).await;
        let msg = error(status, &v, StatusCode::BAD_REQUEST);
        assert!(msg.contains(want), "{uri}: {msg:?} should mention {want:?}");
    }
}

#[tokio::test]
async fn constrained_output_over_http() {
    let s = state(None, EngineConfig { n_ctx: 2048, kv_blocks: 256, ..config() });
    // Every choice of a sampled, constrained request is in the language.
    let body = json!({"prompt": "x", "n": 4, "temperature": 1.0, "seed": 9, "max_tokens": 40, "regex": "[a-z]{2,5}(, [a-z]{2,5}){1,3}"});
    let (status, v, _) = call(&s, "POST", "/v1/completions", body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for c in v["choices"].as_array().unwrap() {
        let t = c["text"].as_str().unwrap();
        let parts: Vec<&str> = t.split(", ").collect();
        assert!((2..=4).contains(&parts.len()) && parts.iter().all(|p| (2..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_lowercase())), "{t:?}");
        assert_eq!(c["finish_reason"], "stop");
    }
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "temperature": 1.0, "seed": 2,
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {"type": "boolean"}}, "required": ["k", "v"]}}}});
    let (status, v, _) = call(&s, "POST", "/v1/chat/completions", body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let out: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(["a", "b"].contains(&out["k"].as_str().unwrap()) && out["v"].is_boolean(), "{out}");
    // A forced call comes back as a tool call with schema-valid arguments.
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 400, "temperature": 1.0, "seed": 4,
        "tools": [{"type": "function", "function": {"name": "pick", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}}, "required": ["n"]}}}],
        "tool_choice": {"type": "function", "function": {"name": "pick"}}, "parallel_tool_calls": false});
    let (status, v, _) = call(&s, "POST", "/v1/chat/completions", body.to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{v}");
    let calls = c["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "pick");
    let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!((1..=3).contains(&args["n"].as_i64().unwrap()), "{args}");
}

#[tokio::test]
async fn context_overflow_unknown_models_and_endpoints() {
    let s = state(None, config());
    let long = "the model ".repeat(100);
    let (status, v, _) = call(&s, "POST", "/v1/completions", json!({"prompt": long}).to_string(), None).await;
    let msg = error(status, &v, StatusCode::BAD_REQUEST);
    assert!(msg.contains("maximum context length is 64 tokens") && msg.contains("your prompt has"), "{msg}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    let (status, v, _) = call(&s, "POST", "/v1/chat/completions", json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).to_string(), None).await;
    assert!(error(status, &v, StatusCode::NOT_FOUND).contains("gpt-4"));
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, v, _) = call(&s, "GET", "/v1/models/gpt-4", Body::empty(), None).await;
    error(status, &v, StatusCode::NOT_FOUND);
    let (status, v, _) = call(&s, "GET", "/v1/nothing", Body::empty(), None).await;
    error(status, &v, StatusCode::NOT_FOUND);
    let (status, v, _) = call(&s, "PUT", "/v1/chat/completions", Body::empty(), None).await;
    error(status, &v, StatusCode::METHOD_NOT_ALLOWED);
    // Listing stored completions on a server that keeps none says so.
    let (status, v, _) = call(&s, "GET", "/v1/chat/completions", Body::empty(), None).await;
    assert!(error(status, &v, StatusCode::NOT_FOUND).contains("--store off"));
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let s = state(None, config());
    let big = json!({"prompt": "x".repeat(10_000)}).to_string();
    let (status, v, _) = call(&s, "POST", "/v1/completions", big, None).await;
    assert!(error(status, &v, StatusCode::PAYLOAD_TOO_LARGE).contains("4096"));
}

#[tokio::test]
async fn api_keys_are_required_and_checked() {
    let s = state(Some("sekrit"), config());
    let body = || json!({"prompt": "the", "max_tokens": 2}).to_string();
    let (status, v, _) = call(&s, "POST", "/v1/completions", body(), None).await;
    error(status, &v, StatusCode::UNAUTHORIZED);
    let (status, v, _) = call(&s, "POST", "/v1/completions", body(), Some("sekrit-not")).await;
    error(status, &v, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let (status, _, _) = call(&s, "POST", "/v1/completions", body(), Some("sekrit")).await;
    assert_eq!(status, StatusCode::OK);
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(call(&s, "GET", "/health", Body::empty(), None).await.0, StatusCode::OK);
    assert_eq!(call(&s, "GET", "/metrics", Body::empty(), None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    // One running sequence and one waiting slot: flood it.
    let s = state(None, EngineConfig { max_seqs: 1, queue: 1, ..config() });
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { call(&s, "POST", "/v1/completions", json!({"prompt": "the", "max_tokens": 40, "ignore_eos": true}).to_string(), None).await }));
    }
    let mut busy = 0;
    for t in tasks {
        let (status, v, headers) = t.await.unwrap();
        if status == StatusCode::TOO_MANY_REQUESTS {
            busy += 1;
            assert!(headers.get(header::RETRY_AFTER).is_some());
            error(status, &v, StatusCode::TOO_MANY_REQUESTS);
        } else {
            assert_eq!(status, StatusCode::OK, "{v}");
        }
    }
    assert!(busy > 0, "some requests were refused");
}

#[tokio::test]
async fn health_waits_for_the_model_and_metrics_describe_the_server() {
    let s = AppState::new(ServerConfig { keys: None, max_body: 1 << 20 });
    let (status, v, _) = call(&s, "GET", "/health", Body::empty(), None).await;
    assert_eq!((status, v["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("loading")));
    let (status, v, _) = call(&s, "POST", "/v1/completions", json!({"prompt": "x"}).to_string(), None).await;
    error(status, &v, StatusCode::SERVICE_UNAVAILABLE);

    let s = state(None, config());
    let (status, v, _) = call(&s, "POST", "/v1/completions", json!({"prompt": "the model", "max_tokens": 3, "ignore_eos": true}).to_string(), None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (_, m, _) = call(&s, "GET", "/metrics", Body::empty(), None).await;
    let text = m.as_str().unwrap();
    for needle in [
        "smelt_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
        "smelt_time_to_first_token_seconds_count 1",
        "smelt_inter_token_latency_seconds_count 2",
        "smelt_generated_tokens_total{model=\"tiny\"} 3",
        "smelt_queue_depth{model=\"tiny\"}",
        "smelt_running_sequences{model=\"tiny\"} 0",
        "smelt_kv_cache_usage_ratio{model=\"tiny\"}",
        "smelt_prefix_cache_hit_ratio{model=\"tiny\"}",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
}

#[tokio::test]
async fn tokenize_round_trips() {
    let s = state(None, config());
    let (status, v, _) = call(&s, "POST", "/tokenize", json!({"content": "the model is"}).to_string(), None).await;
    assert_eq!(status, StatusCode::OK);
    let tokens = v["tokens"].clone();
    assert!(tokens.as_array().unwrap().len() >= 3);
    let (_, v, _) = call(&s, "POST", "/detokenize", json!({"tokens": tokens}).to_string(), None).await;
    assert_eq!(v["content"], "the model is");
}

/// A request with an `Authorization` header given as raw bytes.
async fn call_auth(s: &AppState, auth: &[u8], body: String) -> (StatusCode, Value, axum::http::HeaderMap) {
    let req = Request::builder().method("POST").uri("/v1/completions").header(header::CONTENT_TYPE, "application/json").header(header::AUTHORIZATION, axum::http::HeaderValue::from_bytes(auth).unwrap());
    let resp = app(s.clone()).oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = to_bytes(resp.into_body(), 1 << 24).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), headers)
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_and_odd_headers_get_401() {
    let s = state(Some("sekrit"), config());
    let body = || json!({"prompt": "the", "max_tokens": 1}).to_string();
    for ok in [&b"bearer sekrit"[..], b"BEARER sekrit", b"Bearer  sekrit "] {
        assert_eq!(call_auth(&s, ok, body()).await.0, StatusCode::OK, "{}", String::from_utf8_lossy(ok));
    }
    for bad in [&b"Bearer sekri\xfft"[..], b"Basic sekrit", b"sekrit", b"Bearer"] {
        let (status, v, _) = call_auth(&s, bad, body()).await;
        error(status, &v, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn keys_from_a_file_have_their_own_limits() {
    let keys = smelt_server::keys::parse_key_file("sk-alice name=alice rpm=2\nsk-bob name=bob concurrency=1\nsk-carol name=carol tpm=10\n").unwrap();
    let s = AppState::new(ServerConfig { keys: Some(Keys::new(keys)), max_body: 1 << 20 });
    let path = std::env::temp_dir().join(format!("smelt-http-keys-{}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(&TinySpec::new("qwen3")).to_bytes()).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let _ = std::fs::remove_file(&path);
    s.add_model(ModelEntry::new("tiny", Engine::start(model, Arc::new(ThreadPool::new(1)), config())));
    s.set_ready();
    let body = |n: usize| json!({"prompt": "the", "max_tokens": n, "ignore_eos": true}).to_string();
    // alice: two requests a minute, then 429 with Retry-After; bob is not affected.
    for _ in 0..2 {
        assert_eq!(call(&s, "POST", "/v1/completions", body(1), Some("sk-alice")).await.0, StatusCode::OK);
    }
    let (status, v, headers) = call(&s, "POST", "/v1/completions", body(1), Some("sk-alice")).await;
    assert!(error(status, &v, StatusCode::TOO_MANY_REQUESTS).contains("alice"));
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let wait: u32 = headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "{wait}");
    assert_eq!(call(&s, "POST", "/v1/completions", body(1), Some("sk-bob")).await.0, StatusCode::OK);
    // bob: one request at a time; a stream holds its slot until it ends.
    let req = Request::builder().method("POST").uri("/v1/completions").header(header::CONTENT_TYPE, "application/json").header(header::AUTHORIZATION, "Bearer sk-bob");
    let stream = app(s.clone()).oneshot(req.body(Body::from(json!({"prompt": "the", "max_tokens": 30, "ignore_eos": true, "stream": true}).to_string())).unwrap()).await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let (status, v, _) = call(&s, "POST", "/v1/completions", body(1), Some("sk-bob")).await;
    assert!(error(status, &v, StatusCode::TOO_MANY_REQUESTS).contains("concurrency"));
    let text = to_bytes(stream.into_body(), 1 << 24).await.unwrap();
    assert!(String::from_utf8_lossy(&text).contains("[DONE]"));
    assert_eq!(call(&s, "POST", "/v1/completions", body(1), Some("sk-bob")).await.0, StatusCode::OK);
    // carol: 10 tokens a minute, charged after use; the request that overdraws is served,
    // the next waits.
    assert_eq!(call(&s, "POST", "/v1/completions", body(12), Some("sk-carol")).await.0, StatusCode::OK);
    let (status, v, headers) = call(&s, "POST", "/v1/completions", body(1), Some("sk-carol")).await;
    assert!(error(status, &v, StatusCode::TOO_MANY_REQUESTS).contains("tokens per minute"));
    assert!(headers.get(header::RETRY_AFTER).is_some());
}

#[tokio::test]
async fn bodies_over_two_mib_and_wrong_types_get_openai_errors() {
    let s = AppState::new(ServerConfig { keys: None, max_body: 16 << 20 });
    let path = std::env::temp_dir().join(format!("smelt-http-body-{}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(&TinySpec::new("qwen3")).to_bytes()).unwrap();
    let model = Arc::new(Model::load(&path).unwrap());
    let _ = std::fs::remove_file(&path);
    s.add_model(ModelEntry::new("tiny", Engine::start(model, Arc::new(ThreadPool::new(1)), config())));
    s.set_ready();
    // 3 MiB is under the configured limit: read and judged on its content.
    let big = json!({"prompt": "x ".repeat(3 << 19), "max_tokens": 1}).to_string();
    let (status, v, _) = call(&s, "POST", "/v1/completions", big, None).await;
    error(status, &v, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (status, v, _) = call(&s, "POST", "/v1/completions", vec![b' '; 17 << 20], None).await;
    error(status, &v, StatusCode::PAYLOAD_TOO_LARGE);
    // Wrong types name the field; max_tokens is capped at the context.
    for (body, param) in [
        (json!({"prompt": "x", "max_tokens": "many"}), "max_tokens"),
        (json!({"prompt": "x", "stop": 5}), "stop"),
        (json!({"prompt": "x", "max_tokens": 9_223_372_036_854_775_807_i64}), "max_tokens"),
        (json!({"prompt": "x", "max_tokens": 65}), "max_tokens"),
    ] {
        let (status, v, _) = call(&s, "POST", "/v1/completions", body.to_string(), None).await;
        error(status, &v, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (status, v, _) = call(&s, "POST", "/v1/chat/completions", json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}).to_string(), None).await;
    assert!(error(status, &v, StatusCode::BAD_REQUEST).contains("needs a \"text\""));
    let msgs = json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]);
    let (status, v, _) = call(&s, "POST", "/v1/chat/completions", json!({"messages": msgs}).to_string(), None).await;
    error(status, &v, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "messages[1].tool_call_id");
}

fn adapter_file(arch: &'static str, seed: u64) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("smelt-http-lora-{arch}-{}-{seed}.gguf", std::process::id()));
    let w = smelt_model::synthetic::tiny_adapter(&TinySpec::new(arch), 4, 8.0, smelt_kernels::formats::DType::F16, &smelt_model::lora::Target::ALL, true, seed);
    std::fs::write(&path, w.to_bytes()).unwrap();
    path
}

#[tokio::test]
async fn adapters_load_list_serve_and_unload_while_serving() {
    let s = state(Some("sk"), config());
    let key = Some("sk");
    let good = adapter_file("qwen3", 1);
    let load = |name: &str, path: &std::path::Path| json!({"name": name, "path": path.to_string_lossy()}).to_string();
    let (st, _, _) = call(&s, "POST", "/v1/adapters", load("a", &good), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, v, _) = call(&s, "POST", "/v1/adapters", load("a", &good), key).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["id"], "tiny:a");
    assert_eq!(v["parent"], "tiny");
    let (st, v, _) = call(&s, "POST", "/v1/adapters", load("a", &good), key).await;
    assert!(error(st, &v, StatusCode::CONFLICT).contains("already loaded"));
    let wrong = adapter_file("llama", 2);
    let (st, v, _) = call(&s, "POST", "/v1/adapters", load("b", &wrong), key).await;
    assert!(error(st, &v, StatusCode::BAD_REQUEST).contains("\"llama\" model"), "{v}");
    let (st, v, _) = call(&s, "POST", "/v1/adapters", load("b", std::path::Path::new("/nonexistent/x.gguf")), key).await;
    error(st, &v, StatusCode::BAD_REQUEST);
    let (st, v, _) = call(&s, "POST", "/v1/adapters", load("bad/name", &good), key).await;
    error(st, &v, StatusCode::BAD_REQUEST);
    let (st, v, _) = call(&s, "POST", "/v1/adapters", json!({"model": "other", "name": "b", "path": good.to_string_lossy()}).to_string(), key).await;
    error(st, &v, StatusCode::NOT_FOUND);

    let (_, v, _) = call(&s, "GET", "/v1/models", Body::empty(), key).await;
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny", "tiny:a"]);
    let (st, v, _) = call(&s, "GET", "/v1/models/tiny:a", Body::empty(), key).await;
    assert_eq!((st, v["root"].as_str()), (StatusCode::OK, Some("tiny")));

    // The adapter's output is what a session under the same adapter gives, not the base's.
    let complete = |model: &str| json!({"model": model, "prompt": [5, 17, 42, 99, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": true}).to_string();
    let (st, with, _) = call(&s, "POST", "/v1/completions", complete("tiny:a"), key).await;
    assert_eq!(st, StatusCode::OK, "{with}");
    assert_eq!(with["model"], "tiny:a");
    let (_, base, _) = call(&s, "POST", "/v1/completions", complete("tiny"), key).await;
    let entry = s.models()[0].clone();
    let mut session = smelt_engine::Session::new(entry.engine.model.clone(), Arc::new(ThreadPool::new(1)), 64);
    let adapter = entry.adapters()[0].1.adapter.clone();
    session.set_lora(smelt_model::lora::LoraSet::one(adapter, 1.0));
    let gp = smelt_engine::GenerateParams { max_tokens: 8, sampling: smelt_engine::SamplingParams::greedy(), ignore_eos: true, ..Default::default() };
    let want = session.generate(&[5, 17, 42, 99, 7], &gp, |_| true).unwrap().text;
    assert_eq!(with["choices"][0]["text"], want.as_str());
    assert_ne!(with["choices"][0]["text"], base["choices"][0]["text"]);

    let (st, v, _) = call(&s, "POST", "/v1/completions", complete("tiny:nope"), key).await;
    assert!(error(st, &v, StatusCode::NOT_FOUND).contains("tiny:nope"));
    let (st, v, _) = call(&s, "POST", "/v1/embeddings", json!({"model": "tiny:a", "input": "x"}).to_string(), key).await;
    assert!(error(st, &v, StatusCode::BAD_REQUEST).contains("base models"));

    let (st, v, _) = call(&s, "DELETE", "/v1/adapters/tiny:a", Body::empty(), key).await;
    assert_eq!((st, &v["deleted"]), (StatusCode::OK, &json!(true)), "{v}");
    let (st, v, _) = call(&s, "POST", "/v1/completions", complete("tiny:a"), key).await;
    error(st, &v, StatusCode::NOT_FOUND);
    let (st, v, _) = call(&s, "DELETE", "/v1/adapters/tiny:a", Body::empty(), key).await;
    error(st, &v, StatusCode::NOT_FOUND);
    let (st, v, _) = call(&s, "DELETE", "/v1/adapters/tiny", Body::empty(), key).await;
    error(st, &v, StatusCode::BAD_REQUEST);
    let _ = (std::fs::remove_file(good), std::fs::remove_file(wrong));
}

#[test]
fn runs_left_unfinished_by_a_stopped_server_are_marked_failed() {
    let path = std::env::temp_dir().join(format!("smelt-http-runs-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let records = smelt_records::Records::open(&path, None).unwrap();
    for (id, status) in [("r1", "in_progress"), ("r2", "completed"), ("r3", "queued")] {
        records.put_object("eval.run", id, Some("e"), "", 1, &serde_json::json!({"id": id, "status": status})).wait().unwrap();
    }
    assert_eq!(smelt_server::evals::fail_unfinished_runs(&records), 2);
    let status = |id: &str| records.get_object("eval.run", None, id).wait().unwrap().unwrap()["status"].as_str().unwrap().to_string();
    assert_eq!((status("r1"), status("r2"), status("r3")), ("failed".into(), "completed".into(), "failed".into()));
}

#[tokio::test]
async fn requests_without_a_model_go_to_the_default_model() {
    // Two served models; the second is the default.
    let s = state(None, config());
    s.add_model(ModelEntry::new("second", tiny_engine(config())));
    let body = || Body::from(json!({"prompt": "hi", "max_tokens": 1}).to_string());
    let (status, v, _) = call(&s, "POST", "/v1/completions", body(), None).await;
    assert_eq!((status, v["model"].as_str()), (StatusCode::OK, Some("tiny")), "{v}");
    s.set_default_model("second".into());
    let (status, v, _) = call(&s, "POST", "/v1/completions", body(), None).await;
    assert_eq!((status, v["model"].as_str()), (StatusCode::OK, Some("second")), "{v}");
}
