//! Structured output: `response_format` (chat) and the grammar extensions shared by both
//! completion endpoints (`grammar`, `json_schema`, `regex`, as llama.cpp and vLLM accept them).
//!
//! Grammars, schemas and regexes are untrusted programs. Handlers only describe what to compile
//! ([`Source`]); [`compile`] builds it on a low-priority thread of its own (never on an HTTP
//! worker or the engine's thread), at most [`CONCURRENT_COMPILES`] at a time, within a budget of
//! work, time and size, and stops when the client goes away. A grammar over its budget is a 400
//! `grammar_too_complex` before generation starts; the engine keeps stepping every other
//! sequence meanwhile.

use crate::error::ApiError;
use crate::state::ModelEntry;
use crate::types::SamplingFields;
use serde_json::Value;
use smelt_engine::grammar::{Budget, Compiled};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Work a grammar may take to be prepared (parse-stack frames; see `Budget`): its start state
/// and the first full vocabulary mask. Real schemas need tens to thousands; free text ~50,000.
/// The same as one engine step may spend, so that a grammar accepted here does not hold the
/// engine's first step for it longer than any other step.
pub const PREPARE_WORK: u64 = smelt_engine::grammar::WORK_PER_TOKEN;
/// Wall-clock limit for parsing, compiling and preparing one grammar.
pub const PREPARE_TIME: Duration = Duration::from_secs(5);
/// Largest compiled grammar, in estimated bytes.
pub const MAX_GRAMMAR_BYTES: usize = 32 << 20;
/// Compiled grammars kept for reuse: at most this many bytes and entries.
pub const CACHE_BYTES: usize = 64 << 20;
pub const CACHE_ENTRIES: usize = 32;
/// Grammars compiled at once; more wait (cancellably) for a turn.
pub const CONCURRENT_COMPILES: usize = 2;

/// What a request constrains its output to, not yet compiled.
#[derive(Clone, Debug)]
pub struct Source {
    /// The request field it came from (named in errors).
    pub param: &'static str,
    pub kind: Kind,
}

#[derive(Clone, Debug)]
pub enum Kind {
    Gbnf(String),
    Schema(Value),
    Regex(String),
    JsonObject,
    /// A grammar smelt generated (forced tool calls); errors name the tools.
    Generated(String),
}

impl Source {
    fn key(&self) -> String {
        match &self.kind {
            Kind::Gbnf(g) | Kind::Generated(g) => format!("gbnf:{g}"),
            Kind::Schema(s) => format!("schema:{s}"),
            Kind::Regex(r) => format!("regex:{r}"),
            Kind::JsonObject => "json_object".into(),
        }
    }

    pub(crate) fn build(&self) -> Result<Compiled, String> {
        match &self.kind {
            Kind::Gbnf(g) | Kind::Generated(g) => Compiled::gbnf(g).map_err(|e| e.to_string()),
            Kind::Schema(s) => Compiled::json_schema(s),
            Kind::Regex(r) => Compiled::regex(r),
            Kind::JsonObject => Ok(Compiled::json_object()),
        }
    }
}

struct Entry {
    key: String,
    grammar: Compiled,
    bytes: usize,
}

/// Compiled (and prepared) grammars by model and source text, so that requests with the same
/// schema or grammar share one compiled grammar — and with it the engine's automaton and token
/// masks for it.
static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Entries and estimated bytes of the compiled-grammar cache (for /metrics).
pub fn cache_stats() -> (usize, usize) {
    let c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    (c.len(), c.iter().map(|e| e.bytes).sum())
}

fn cache_get(key: &str) -> Option<Compiled> {
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let i = c.iter().position(|e| e.key == key)?;
    let e = c.remove(i);
    let g = e.grammar.clone();
    c.push(e);
    Some(g)
}

fn cache_put(key: String, grammar: Compiled, bytes: usize) {
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    c.push(Entry { key, grammar, bytes });
    while c.len() > CACHE_ENTRIES || (c.len() > 1 && c.iter().map(|e| e.bytes).sum::<usize>() > CACHE_BYTES) {
        c.remove(0);
    }
}

static PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CONCURRENT_COMPILES);

/// Sets the flag when dropped: the handler's future was dropped (the client went away), so the
/// compilation it started should stop.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn too_complex(param: &str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(param, msg.to_string()).code("grammar_too_complex")
}

/// Compile and prepare `src` for `entry`'s model: from the cache, or on a compile thread within
/// the budgets above.
pub async fn compile(entry: &ModelEntry, src: Source) -> Result<Compiled, ApiError> {
    let key = format!("{}\u{0}{}", entry.id, src.key());
    if let Some(g) = cache_get(&key) {
        return Ok(g);
    }
    let _permit = PERMITS.acquire().await.map_err(|_| ApiError::internal("the grammar compiler has stopped"))?;
    // Another request may have compiled it while this one waited.
    if let Some(g) = cache_get(&key) {
        return Ok(g);
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let engine = entry.engine.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let param = src.param;
    let job = move || {
        // Compile threads yield to the engines: a hostile grammar costs the others as little as can be.
        smelt_kernels::pool::set_this_thread_nice(10);
        let deadline = Instant::now() + PREPARE_TIME;
        let result = (|| {
            let g = src.build().map_err(|e| match src.kind {
                Kind::Generated(_) => ApiError::invalid("tools", format!("the tools' call grammar failed to compile: {e}")),
                _ => ApiError::invalid(param, format!("{param}: {e}")),
            })?;
            let bytes = g.bytes();
            if bytes > MAX_GRAMMAR_BYTES {
                return Err(too_complex(param, format!("the {param} compiles to a grammar of {} MiB, over the limit of {} MiB", bytes >> 20, MAX_GRAMMAR_BYTES >> 20)));
            }
            if Instant::now() > deadline {
                return Err(too_complex(param, format!("compiling the {param} took longer than {} s", PREPARE_TIME.as_secs())));
            }
            let budget = Budget::new(PREPARE_WORK).with_deadline(deadline).with_cancel(cancel.clone());
            g.prepare(&engine.trie(), budget).map_err(|e| too_complex(param, format!("{param}: {e}")))?;
            Ok((g, bytes))
        })();
        let _ = tx.send(result);
        // What the compilation freed stays in this thread's arena unless handed back.
        smelt_kernels::pool::return_free_memory();
    };
    std::thread::Builder::new()
        .name("smelt-grammar".into())
        .stack_size(8 << 20)
        .spawn(job)
        .map_err(|e| ApiError::unavailable(format!("cannot start a grammar compilation: {e}")))?;
    let (g, bytes) = rx.await.map_err(|_| ApiError::internal("the grammar compilation stopped unexpectedly"))??;
    cache_put(key, g.clone(), bytes);
    Ok(g)
}

/// OpenAI's `response_format`: text, json_object, or json_schema (strict or not, the output is
/// always constrained to the schema).
pub fn response_format(v: &Value) -> Result<Option<Source>, ApiError> {
    let bad = |m: String| ApiError::invalid("response_format", m);
    let source = |kind| Ok(Some(Source { param: "response_format", kind }));
    match v.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => source(Kind::JsonObject),
        Some("json_schema") => {
            let spec = v.get("json_schema").ok_or_else(|| bad("response_format of type json_schema needs a \"json_schema\" object".into()))?;
            let schema = spec.get("schema").ok_or_else(|| bad("response_format.json_schema needs a \"schema\"".into()))?;
            source(Kind::Schema(schema.clone()))
        }
        Some(other) => Err(bad(format!("response_format type must be text, json_object or json_schema, got {other:?}"))),
        None => Err(bad("response_format needs a \"type\"".into())),
    }
}

/// The grammar extensions: at most one of `grammar` (GBNF), `json_schema`, `regex`.
pub fn extension(f: &SamplingFields) -> Result<Option<Source>, ApiError> {
    let given = [f.grammar.is_some(), f.json_schema.is_some(), f.regex.is_some()].iter().filter(|&&b| b).count();
    if given > 1 {
        return Err(ApiError::bad_request("give at most one of grammar, json_schema and regex"));
    }
    Ok(if let Some(g) = &f.grammar {
        Some(Source { param: "grammar", kind: Kind::Gbnf(g.clone()) })
    } else if let Some(s) = &f.json_schema {
        Some(Source { param: "json_schema", kind: Kind::Schema(s.clone()) })
    } else {
        f.regex.as_ref().map(|r| Source { param: "regex", kind: Kind::Regex(r.clone()) })
    })
}
