//! Structured output: `response_format` (chat) and the grammar extensions shared by both
//! completion endpoints (`grammar`, `json_schema`, `regex`, as llama.cpp and vLLM accept them).

use crate::error::ApiError;
use crate::types::SamplingFields;
use serde_json::Value;
use smelt_engine::grammar::Compiled;
use std::sync::Mutex;

/// Compiled grammars by source text, so that requests with the same schema or grammar share one
/// compiled grammar — and with it the engine's automaton and token masks for it.
pub fn cached(key: String, make: impl FnOnce() -> Result<Compiled, ApiError>) -> Result<Compiled, ApiError> {
    static CACHE: Mutex<Vec<(String, Compiled)>> = Mutex::new(Vec::new());
    if let Some(c) = CACHE.lock().ok().and_then(|c| c.iter().find(|(k, _)| *k == key).map(|(_, g)| g.clone())) {
        return Ok(c);
    }
    let c = make()?;
    if let Ok(mut cache) = CACHE.lock() {
        if cache.len() >= 32 {
            cache.remove(0);
        }
        cache.push((key, c.clone()));
    }
    Ok(c)
}

/// OpenAI's `response_format`: text, json_object, or json_schema (strict or not, the output is
/// always constrained to the schema).
pub fn response_format(v: &Value) -> Result<Option<Compiled>, ApiError> {
    let bad = |m: String| ApiError::invalid("response_format", m);
    match v.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => cached("json_object".into(), || Ok(Compiled::json_object())).map(Some),
        Some("json_schema") => {
            let spec = v.get("json_schema").ok_or_else(|| bad("response_format of type json_schema needs a \"json_schema\" object".into()))?;
            let schema = spec.get("schema").ok_or_else(|| bad("response_format.json_schema needs a \"schema\"".into()))?;
            cached(format!("schema:{schema}"), || Compiled::json_schema(schema).map_err(|e| bad(format!("response_format.json_schema.schema: {e}")))).map(Some)
        }
        Some(other) => Err(bad(format!("response_format type must be text, json_object or json_schema, got {other:?}"))),
        None => Err(bad("response_format needs a \"type\"".into())),
    }
}

/// The grammar extensions: at most one of `grammar` (GBNF), `json_schema`, `regex`.
pub fn extension(f: &SamplingFields) -> Result<Option<Compiled>, ApiError> {
    let given = [f.grammar.is_some(), f.json_schema.is_some(), f.regex.is_some()].iter().filter(|&&b| b).count();
    if given > 1 {
        return Err(ApiError::bad_request("give at most one of grammar, json_schema and regex"));
    }
    if let Some(g) = &f.grammar {
        return cached(format!("gbnf:{g}"), || Compiled::gbnf(g).map_err(|e| ApiError::invalid("grammar", e.to_string()))).map(Some);
    }
    if let Some(s) = &f.json_schema {
        return cached(format!("schema:{s}"), || Compiled::json_schema(s).map_err(|e| ApiError::invalid("json_schema", e))).map(Some);
    }
    if let Some(r) = &f.regex {
        return cached(format!("regex:{r}"), || Compiled::regex(r).map_err(|e| ApiError::invalid("regex", e))).map(Some);
    }
    Ok(None)
}
