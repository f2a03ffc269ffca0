//! Structured output: `response_format` (chat) and the grammar extensions shared by both
//! completion endpoints (`grammar`, `json_schema`, `regex`, as llama.cpp and vLLM accept them).

use crate::error::ApiError;
use crate::types::SamplingFields;
use serde_json::Value;
use smelt_engine::grammar::Compiled;

/// OpenAI's `response_format`: text, json_object, or json_schema (strict or not, the output is
/// always constrained to the schema).
pub fn response_format(v: &Value) -> Result<Option<Compiled>, ApiError> {
    let bad = |m: String| ApiError::invalid("response_format", m);
    match v.get("type").and_then(|t| t.as_str()) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Compiled::json_object())),
        Some("json_schema") => {
            let spec = v.get("json_schema").ok_or_else(|| bad("response_format of type json_schema needs a \"json_schema\" object".into()))?;
            let schema = spec.get("schema").ok_or_else(|| bad("response_format.json_schema needs a \"schema\"".into()))?;
            Compiled::json_schema(schema).map(Some).map_err(|e| bad(format!("response_format.json_schema.schema: {e}")))
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
        return Compiled::gbnf(g).map(Some).map_err(|e| ApiError::invalid("grammar", e.to_string()));
    }
    if let Some(s) = &f.json_schema {
        return Compiled::json_schema(s).map(Some).map_err(|e| ApiError::invalid("json_schema", e));
    }
    if let Some(r) = &f.regex {
        return Compiled::regex(r).map(Some).map_err(|e| ApiError::invalid("regex", e));
    }
    Ok(None)
}
