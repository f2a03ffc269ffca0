//! Stored completions as training data: one line of OpenAI's chat fine-tuning JSONL per
//! completion — the request's messages, then the answer (the latest correction a user gave,
//! else the model's own).

use crate::Record;
use serde_json::{json, Map, Value};

/// The training line for a stored completion; None when it has no answer to learn from (no
/// correction, and the model's answer was rated bad, or cut short by the token limit or a
/// guardrail without a good rating).
pub fn training_line(r: &Record) -> Option<Value> {
    let request = &r.completion.request;
    let mut messages: Vec<Value> = Vec::new();
    for m in request.get("messages")?.as_array()? {
        let obj = m.as_object()?;
        let mut out = Map::new();
        for k in ["role", "content", "name", "tool_calls", "tool_call_id"] {
            if let Some(v) = obj.get(k).filter(|v| !v.is_null()) {
                out.insert(k.to_string(), v.clone());
            }
        }
        messages.push(Value::Object(out));
    }
    let correction = r.feedback.iter().rev().find_map(|f| f.correction.clone());
    let answer = match correction {
        Some(text) => json!({"role": "assistant", "content": text}),
        None => {
            // The model's own answer only when nobody rejected it and it was not cut short.
            let latest = r.feedback.iter().rev().find_map(|f| f.rating);
            let finish = r.completion.response.pointer("/choices/0/finish_reason").and_then(Value::as_str);
            let endorsed = latest.is_some_and(|x| x > 0.0);
            if latest.is_some_and(|x| x < 0.0) || !endorsed && matches!(finish, Some("length" | "content_filter")) {
                return None;
            }
            let message = r.completion.response.pointer("/choices/0/message")?;
            let mut out = json!({"role": "assistant", "content": message.get("content").cloned().unwrap_or(Value::Null)});
            if let Some(calls) = message.get("tool_calls").filter(|c| c.as_array().is_some_and(|a| !a.is_empty())) {
                out["tool_calls"] = calls.clone();
            }
            if out["content"].is_null() && out.get("tool_calls").is_none() {
                return None;
            }
            out
        }
    };
    messages.push(answer);
    let mut line = json!({"messages": messages});
    if let Some(tools) = request.get("tools").filter(|t| !t.is_null()) {
        line["tools"] = tools.clone();
    }
    Some(line)
}
