//! Models, tokenization, health and metrics.

use crate::error::ApiError;
use crate::parse_json;
use crate::state::{AppState, ModelEntry};
use crate::types::{DetokenizeRequest, TokenizeRequest};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::fmt::Write;
use std::sync::atomic::Ordering;

fn model_json(m: &ModelEntry) -> Value {
    json!({"id": m.id, "object": "model", "created": m.created, "owned_by": "smelt", "context_length": m.engine.config.n_ctx})
}

pub async fn list_models(State(state): State<AppState>) -> Response {
    let mut data = Vec::new();
    for m in state.models() {
        data.push(model_json(&m));
        data.extend(m.adapters().iter().map(|(n, a)| crate::adapters::adapter_json(&m, n, a)));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    if let Some(m) = state.models().into_iter().find(|m| m.id == id) {
        return Ok(axum::Json(model_json(&m)).into_response());
    }
    let r = state.resolve(Some(&id))?;
    let name = r.adapter.ok_or_else(|| ApiError::model_not_found(&id))?;
    let a = r.entry.adapters().into_iter().find(|(n, _)| *n == name).map(|(_, a)| a).ok_or_else(|| ApiError::model_not_found(&id))?;
    Ok(axum::Json(crate::adapters::adapter_json(&r.entry, &name, &a)).into_response())
}

pub async fn tokenize(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse_json(&body)?;
    let entry = state.model(req.model.as_deref())?;
    let tok = &entry.engine.model.tokenizer;
    let ids = tok.encode(&req.content, req.add_special, req.add_special);
    Ok(axum::Json(json!({"tokens": ids})).into_response())
}

pub async fn detokenize(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = parse_json(&body)?;
    let entry = state.model(req.model.as_deref())?;
    let tok = &entry.engine.model.tokenizer;
    let n = tok.n_vocab();
    let mut ids = Vec::with_capacity(req.tokens.len());
    for &t in &req.tokens {
        if t < 0 || t as usize >= n {
            return Err(ApiError::invalid("tokens", format!("token id {t} is outside the vocabulary of {n} tokens")));
        }
        ids.push(t as u32);
    }
    Ok(axum::Json(json!({"content": tok.decode(&ids, false)})).into_response())
}

/// 200 once every model is loaded, 503 before.
pub async fn health(State(state): State<AppState>) -> Response {
    if state.ready() {
        axum::Json(json!({"status": "ok"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "loading"}))).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = String::new();
    state.metrics().render_requests(&mut out);
    let gauges: [(&str, &str, &str); 15] = [
        ("smelt_prompt_tokens_total", "counter", "Prompt tokens received."),
        ("smelt_generated_tokens_total", "counter", "Tokens generated."),
        ("smelt_queue_depth", "gauge", "Requests waiting for admission."),
        ("smelt_running_sequences", "gauge", "Sequences being generated."),
        ("smelt_kv_cache_blocks_used", "gauge", "KV cache blocks held by running sequences."),
        ("smelt_kv_cache_blocks_total", "gauge", "KV cache blocks in the pool."),
        ("smelt_kv_cache_usage_ratio", "gauge", "Share of KV cache blocks in use."),
        ("smelt_prefix_cache_hit_ratio", "gauge", "Share of prompt tokens whose KV came from the prefix cache."),
        ("smelt_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache."),
        ("smelt_prefix_cache_disk_hit_tokens_total", "counter", "Prompt tokens whose KV was read back from the KV disk cache."),
        ("smelt_preemptions_total", "counter", "Sequences preempted for lack of KV memory."),
        ("smelt_grammar_automata_bytes", "gauge", "Estimated bytes of grammar automata and token masks held by the engine (capped)."),
        ("smelt_grammar_automata", "gauge", "Grammar automata held by the engine."),
        ("smelt_tokenizer_word_cache_bytes", "gauge", "Estimated bytes of the tokenizer's cache of recent words (capped)."),
        ("smelt_embeddings_pending", "gauge", "Embedding requests queued or in progress."),
    ];
    for (name, kind, help) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in state.models() {
            let s = &m.engine.stats;
            let (used, total) = (s.kv_blocks_used.load(Ordering::Relaxed), s.kv_blocks_total.load(Ordering::Relaxed));
            let (hits, lookups) = (s.prefix_hit_tokens.load(Ordering::Relaxed), s.prefix_lookup_tokens.load(Ordering::Relaxed));
            let v: f64 = match name {
                "smelt_prompt_tokens_total" => s.prompt_tokens.load(Ordering::Relaxed) as f64,
                "smelt_generated_tokens_total" => s.generated_tokens.load(Ordering::Relaxed) as f64,
                "smelt_queue_depth" => s.waiting.load(Ordering::Relaxed) as f64,
                "smelt_running_sequences" => s.running.load(Ordering::Relaxed) as f64,
                "smelt_kv_cache_blocks_used" => used as f64,
                "smelt_kv_cache_blocks_total" => total as f64,
                "smelt_kv_cache_usage_ratio" => used as f64 / total.max(1) as f64,
                "smelt_prefix_cache_hit_ratio" => hits as f64 / lookups.max(1) as f64,
                "smelt_prefix_cache_hit_tokens_total" => hits as f64,
                "smelt_prefix_cache_disk_hit_tokens_total" => s.disk_hit_tokens.load(Ordering::Relaxed) as f64,
                "smelt_grammar_automata_bytes" => s.grammar_cache_bytes.load(Ordering::Relaxed) as f64,
                "smelt_grammar_automata" => s.grammar_cache_entries.load(Ordering::Relaxed) as f64,
                "smelt_tokenizer_word_cache_bytes" => m.engine.model.tokenizer.word_cache_bytes() as f64,
                "smelt_embeddings_pending" => s.embeddings_pending.load(Ordering::Relaxed) as f64,
                _ => s.preemptions.load(Ordering::Relaxed) as f64,
            };
            let _ = writeln!(out, "{name}{{model=\"{}\"}} {v}", m.id);
        }
    }
    // The KV disk cache is shared by every model of the server.
    if let Some(disk) = state.models().iter().find_map(|m| m.engine.config.kv_disk.clone()) {
        let (bytes, files) = disk.usage();
        let d = &disk.stats;
        let rows = [
            ("smelt_kv_disk_bytes", "gauge", "Bytes of KV blocks in the disk cache.", bytes),
            ("smelt_kv_disk_blocks", "gauge", "KV blocks in the disk cache.", files as u64),
            ("smelt_kv_disk_written_blocks_total", "counter", "KV blocks written to the disk cache.", d.written_blocks.load(Ordering::Relaxed)),
            ("smelt_kv_disk_read_blocks_total", "counter", "KV blocks read back from the disk cache.", d.read_blocks.load(Ordering::Relaxed)),
            ("smelt_kv_disk_rejected_blocks_total", "counter", "Disk cache files found damaged or not matching, ignored and deleted.", d.rejected_blocks.load(Ordering::Relaxed)),
            ("smelt_kv_disk_evicted_blocks_total", "counter", "Disk cache files deleted to stay within --kv-disk.", d.evicted_blocks.load(Ordering::Relaxed)),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}
# TYPE {name} {kind}
{name} {v}");
        }
    }
    let (compiled, compiled_bytes) = crate::structured::cache_stats();
    let _ = writeln!(out, "# HELP smelt_compiled_grammars_bytes Estimated bytes of compiled grammars kept for reuse across requests (capped).\n# TYPE smelt_compiled_grammars_bytes gauge\nsmelt_compiled_grammars_bytes {compiled_bytes}");
    let _ = writeln!(out, "# HELP smelt_compiled_grammars Compiled grammars kept for reuse across requests.\n# TYPE smelt_compiled_grammars gauge\nsmelt_compiled_grammars {compiled}");
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
