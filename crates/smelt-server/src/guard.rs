//! Moderation (`POST /v1/moderations`, OpenAI's shape, from smelt's detectors) and the server's
//! guardrails (`--guard`): requests' messages checked on the way in, answers on the way out.

use crate::error::ApiError;
use crate::generation::new_id;
use crate::parse_json;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{json, Map, Value};
use smelt_guard::{check, scan, Checked, Kind, Rules};

/// OpenAI's categories; smelt's detectors never set these (a model judge would).
const OPENAI_CATEGORIES: &[&str] = &[
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm", "self-harm/intent",
    "self-harm/instructions", "sexual", "sexual/minors", "violence", "violence/graphic",
];

/// The model name moderation answers with; OpenAI's own names are accepted as aliases.
pub const DETECTORS: &str = "smelt-detectors";

fn input_texts(input: &Value) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("input", "input must be a string, an array of strings, or an array of content parts ({\"type\": \"text\", \"text\": ...})");
    match input {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => {
            if items.iter().all(Value::is_string) {
                return Ok(items.iter().filter_map(|v| v.as_str().map(str::to_string)).collect());
            }
            // Content parts: the text parts are moderated together, as one input.
            let mut text = Vec::new();
            for p in items {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push(t.to_string()),
                    (Some("image_url"), _) => return Err(ApiError::invalid("input", "image inputs are not supported; this server moderates text")),
                    _ => return Err(bad()),
                }
            }
            Ok(vec![text.join("\n")])
        }
        _ => Err(bad()),
    }
}

/// Character offset of a byte offset (clients index strings by characters).
fn char_at(text: &str, byte: usize) -> usize {
    text[..byte].chars().count()
}

fn result(text: &str) -> Value {
    let found = scan(text);
    let mut categories = Map::new();
    let mut scores = Map::new();
    let mut applied = Map::new();
    for c in OPENAI_CATEGORIES {
        categories.insert(c.to_string(), json!(false));
        scores.insert(c.to_string(), json!(0.0));
        applied.insert(c.to_string(), json!(["text"]));
    }
    for k in Kind::ALL {
        for name in [k.group().name().to_string(), k.category()] {
            let hit = found.iter().any(|f| f.kind == k) || categories.get(&name) == Some(&json!(true));
            categories.insert(name.clone(), json!(hit));
            scores.insert(name.clone(), json!(if hit { 1.0 } else { 0.0 }));
            applied.insert(name, json!(["text"]));
        }
    }
    let findings: Vec<Value> = found.iter().map(|f| json!({"category": f.kind.category(), "start": char_at(text, f.range.start), "end": char_at(text, f.range.end)})).collect();
    json!({"flagged": !found.is_empty(), "categories": categories, "category_scores": scores, "category_applied_input_types": applied, "findings": findings})
}

/// The judge's instructions: a policy over OpenAI's top-level categories.
pub const JUDGE_POLICY: &str = "You are a content moderator. Decide whether the text between <<< and >>> violates this policy: \
no harassment (threats or insults aimed at people), no hate (attacks on protected groups), no self-harm (encouraging or instructing it), \
no sexual content, no violence (threats, glorifying or instructing violence), no illicit content (instructions for crimes, weapons or drugs). \
Answer with exactly one line: \"safe\", or \"unsafe:\" followed by the violated categories from this list, comma-separated: \
harassment, hate, self-harm, sexual, violence, illicit.";

/// The categories a judge's answer names (none when it says safe).
fn judged(answer: &str) -> Vec<&'static str> {
    let a = answer.trim().to_lowercase();
    if a.starts_with("safe") {
        return Vec::new();
    }
    ["harassment", "hate", "self-harm", "sexual", "violence", "illicit"].into_iter().filter(|c| a.contains(c)).collect()
}

/// Ask a served model whether `text` breaks the policy; its answer.
async fn judge(state: &AppState, model: &str, text: &str) -> Result<String, ApiError> {
    let r = state.resolve(Some(model)).map_err(|e| ApiError { param: Some("model".into()), ..e })?;
    let entry = r.entry;
    let m = &entry.engine.model;
    let template = m.chat_template().map_err(|e| ApiError::internal(e.to_string()))?;
    let messages = json!([{"role": "system", "content": JUDGE_POLICY}, {"role": "user", "content": format!("<<<\n{text}\n>>>")}]);
    let rendered = template.render(&messages, None, true).map_err(|e| ApiError::internal(e.to_string()))?;
    let prompt = m.tokenizer.encode_prompt(&rendered);
    crate::generation::check_context(&entry, prompt.len() + 24)?;
    let fields = crate::types::SamplingFields { max_tokens: Some(24), temperature: Some(0.0), ..Default::default() };
    let mut plan = crate::generation::plan(&fields, m.hp.n_vocab, entry.engine.config.n_ctx, None)?;
    plan.lora = r.lora;
    let rx = crate::generation::submit(&entry, std::slice::from_ref(&prompt), &plan, None)?;
    let choices = crate::generation::collect(state, rx, 1, std::time::Instant::now()).await?;
    Ok(choices.into_iter().next().map(|c| c.text).unwrap_or_default())
}

/// POST /v1/moderations: the detectors, and with `model` naming a served model (or
/// `--moderation-model`), that model as a judge of OpenAI's categories.
pub async fn moderations(State(state): State<AppState>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let req: Value = parse_json(&body)?;
    let input = req.get("input").ok_or_else(|| ApiError::invalid("input", "Missing required parameter: 'input'"))?;
    let judge_model = match req.get("model") {
        None | Some(Value::Null) => state.moderation_model(),
        Some(Value::String(m)) if m == DETECTORS => None,
        Some(Value::String(m)) if m.starts_with("omni-moderation") || m.starts_with("text-moderation") => state.moderation_model(),
        Some(Value::String(m)) => match state.resolve(Some(m)) {
            Ok(_) => Some(m.clone()),
            Err(_) => return Err(ApiError { param: Some("model".into()), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The moderation model '{m}' does not exist: use '{DETECTORS}' or a served model as the judge")) }.code("model_not_found")),
        },
        Some(_) => return Err(ApiError::invalid("model", "model must be a string")),
    };
    let texts = input_texts(input)?;
    let mut results = Vec::with_capacity(texts.len());
    for t in &texts {
        let mut r = result(t);
        if let Some(m) = &judge_model {
            let answer = judge(&state, m, t).await?;
            for c in judged(&answer) {
                r["categories"][c] = json!(true);
                r["category_scores"][c] = json!(1.0);
                r["flagged"] = json!(true);
            }
            r["judge"] = json!({"model": m, "answer": answer});
        }
        results.push(r);
    }
    let model = judge_model.map(|m| format!("{DETECTORS}+{m}")).unwrap_or_else(|| DETECTORS.to_string());
    Ok(axum::Json(json!({"id": new_id("modr"), "model": model, "results": results})))
}

fn blocked(param: &str, kind: Kind) -> ApiError {
    ApiError { param: Some(param.into()), ..ApiError::bad_request(format!("{param} was blocked by this server's guardrails: it contains {} ({})", kind.name().replace('_', " "), kind.category())) }.code("content_blocked")
}

/// Apply the input rules to every message of a chat request (system and assistant messages
/// come from the client too): Err when one is blocked; the body rewritten when something was
/// redacted.
pub fn guard_request(rules: &Rules, body: &Bytes) -> Result<Option<Bytes>, ApiError> {
    if rules.is_empty() {
        return Ok(None);
    }
    let Ok(mut req) = serde_json::from_slice::<Value>(body) else { return Ok(None) };
    let mut changed = false;
    let Some(messages) = req.get_mut("messages").and_then(Value::as_array_mut) else { return Ok(None) };
    for (i, m) in messages.iter_mut().enumerate() {
        let param = format!("messages[{i}].content");
        let mut one = |text: &mut String| -> Result<(), ApiError> {
            match check(rules, text) {
                Checked::Blocked(kind) => Err(blocked(&param, kind)),
                Checked::Passed(new) => {
                    if new != *text {
                        *text = new;
                        changed = true;
                    }
                    Ok(())
                }
            }
        };
        match m.get_mut("content") {
            Some(Value::String(s)) => one(s)?,
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(Value::String(s)) = p.get_mut("text") {
                        one(s)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(changed.then(|| Bytes::from(req.to_string())))
}
