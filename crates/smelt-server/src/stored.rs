//! Stored chat completions, in OpenAI's shape: a chat request with `store: true` (or every one
//! under `--store all`) is kept with its metadata, and can be listed, read, re-labelled and
//! deleted under `/v1/chat/completions`. Feedback on a stored completion (a rating, a comment,
//! a corrected answer) is smelt's extension: `POST /v1/chat/completions/{id}/feedback`.
//!
//! A key sees only the completions made with it (on a server with keys).

use crate::error::ApiError;
use crate::generation::{new_id, now_secs};
use crate::keys::Meter;
use crate::parse_json;
use crate::state::{AppState, Storage};
use crate::types::ChatRequest;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Extension;
use serde_json::{json, Map, Value};
use smelt_records::{check_metadata, Completion, Feedback, Query, Rated, Record};
use std::time::Instant;

/// What a chat request will store once answered.
pub struct ToStore {
    storage: Storage,
    owner: String,
    request: Value,
    metadata: Map<String, Value>,
    user: Option<String>,
    start: Instant,
}

/// Check the request's `metadata`, and decide whether it is stored. None: it is not.
pub fn plan(state: &AppState, meter: &Meter, body: &Bytes, req: &ChatRequest, start: Instant) -> Result<Option<ToStore>, ApiError> {
    let metadata = check_metadata(req.metadata.as_ref().unwrap_or(&Value::Null)).map_err(|e| ApiError::invalid("metadata", e))?;
    let Some(storage) = state.storage() else { return Ok(None) };
    // `--store all` keeps everything a request does not opt out of (`store: false`).
    if !(storage.all && req.store != Some(false) || req.store == Some(true)) {
        return Ok(None);
    }
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    Ok(Some(ToStore { storage: storage.clone(), owner: meter.name().unwrap_or("").to_string(), request, metadata, user: req.user.clone(), start }))
}

impl ToStore {
    /// Store the response; returns once it is committed (the client is answered after that, so
    /// what a client received is never lost). A failure to store is logged, not sent.
    pub async fn save(self, response: &Value) {
        let usage = |k: &str| response.pointer(&format!("/usage/{k}")).and_then(Value::as_u64).unwrap_or(0);
        let c = Completion {
            id: response["id"].as_str().unwrap_or_default().to_string(),
            owner: self.owner,
            created: response["created"].as_u64().unwrap_or_else(now_secs),
            model: response["model"].as_str().unwrap_or_default().to_string(),
            metadata: self.metadata,
            request: self.request,
            response: response.clone(),
            user: self.user,
            prompt_tokens: usage("prompt_tokens"),
            completion_tokens: usage("completion_tokens"),
            duration_ms: self.start.elapsed().as_millis() as u64,
        };
        if let Err(e) = self.storage.records.insert(c).get().await {
            eprintln!("warning: a chat completion was not stored: {e}");
        }
    }
}

/// A streamed reply put back together as one `chat.completion`, to be stored.
#[derive(Default)]
pub struct Assembly {
    choices: Vec<(String, Vec<Value>, Option<&'static str>)>,
}

impl Assembly {
    pub fn new(n: usize) -> Assembly {
        Assembly { choices: vec![(String::new(), Vec::new(), None); n] }
    }

    /// Take in one delta sent for choice `i`.
    pub fn delta(&mut self, i: usize, d: &Value) {
        let Some((text, calls, _)) = self.choices.get_mut(i) else { return };
        if let Some(t) = d.get("content").and_then(Value::as_str) {
            text.push_str(t);
        }
        for call in d.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            let args = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("");
            if call.get("id").is_some() {
                calls.push(json!({"id": call["id"], "type": "function", "function": {"name": call.pointer("/function/name"), "arguments": args}}));
            } else if let Some(Value::String(a)) = calls.last_mut().and_then(|c| c.pointer_mut("/function/arguments")) {
                a.push_str(args);
            }
        }
    }

    pub fn finish(&mut self, i: usize, reason: &'static str) {
        if let Some(c) = self.choices.get_mut(i) {
            c.2 = Some(reason);
        }
    }

    pub fn response(self, id: &str, created: u64, model: &str, usage: Value) -> Value {
        let choices: Vec<Value> = self
            .choices
            .into_iter()
            .enumerate()
            .map(|(i, (text, calls, finish))| {
                let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }});
                if !calls.is_empty() {
                    message["tool_calls"] = Value::Array(calls);
                }
                json!({"index": i, "message": message, "logprobs": null, "finish_reason": finish.unwrap_or("length")})
            })
            .collect();
        json!({"id": id, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": concat!("smelt-", env!("CARGO_PKG_VERSION")), "choices": choices, "usage": usage})
    }
}

fn storage(state: &AppState) -> Result<&Storage, ApiError> {
    state.storage().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "This server does not store chat completions (it was started with --store off)").code("storage_off"))
}

/// Whose completions a request may see: its key's, on a server with keys; all otherwise.
pub(crate) fn owner(state: &AppState, meter: &Meter) -> Option<String> {
    state.config().keys.as_ref().map(|_| meter.name().unwrap_or("").to_string())
}

fn not_found(id: &str) -> ApiError {
    ApiError { param: Some("completion_id".into()), ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("No stored chat completion found with id '{id}'")) }.code("not_found")
}

pub(crate) fn db_error(e: smelt_records::Error) -> ApiError {
    match e {
        smelt_records::Error::Invalid(m) => ApiError::bad_request(m),
        e => ApiError::internal(e.to_string()),
    }
}

/// A stored completion as the API shows it: the response, its metadata, and its feedback.
fn shown(r: &Record) -> Value {
    let c = &r.completion;
    let mut out = c.response.clone();
    out["metadata"] = Value::Object(c.metadata.clone());
    out["request_id"] = json!(c.id);
    if let Some(u) = &c.user {
        out["input_user"] = json!(u);
    }
    out["feedback"] = r.feedback.iter().map(feedback_json).collect();
    out
}

fn feedback_json(f: &Feedback) -> Value {
    json!({"object": "chat.completion.feedback", "id": f.id, "completion_id": f.completion_id, "created": f.created, "rating": f.rating, "comment": f.comment, "correction": f.correction})
}

/// Query parameters as (name, value) pairs.
pub(crate) fn query_pairs(raw: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw.as_deref().unwrap_or("")).map_err(|e| ApiError::bad_request(format!("Invalid query string: {e}")))
}

/// `limit`, `order` and `after`, shared by both listings.
pub(crate) fn paging(name: &str, value: &str, limit: &mut usize, descending: &mut bool, after: &mut Option<String>) -> Result<bool, ApiError> {
    match name {
        "limit" => *limit = value.parse::<usize>().ok().filter(|n| (1..=100).contains(n)).ok_or_else(|| ApiError::invalid("limit", format!("limit must be a whole number from 1 to 100, got {value:?}")))?,
        "order" => {
            *descending = match value {
                "asc" => false,
                "desc" => true,
                _ => return Err(ApiError::invalid("order", format!("order must be \"asc\" or \"desc\", got {value:?}"))),
            }
        }
        "after" => *after = Some(value.to_string()),
        _ => return Ok(false),
    }
    Ok(true)
}

pub(crate) fn page_json(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().map(|d| d["id"].clone()).unwrap_or(Value::Null);
    let last = data.last().map(|d| d["id"].clone()).unwrap_or(Value::Null);
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}

/// GET /v1/chat/completions: `model`, `metadata[KEY]=VALUE`, `after`, `limit`, `order`, and
/// smelt's `rated` (good, bad, corrected, any, none).
pub async fn list(State(state): State<AppState>, Extension(meter): Extension<Meter>, RawQuery(raw): RawQuery) -> Result<axum::Json<Value>, ApiError> {
    let storage = storage(&state)?;
    let mut q = Query { owner: owner(&state, &meter), limit: 20, ..Query::default() };
    for (k, v) in query_pairs(raw)? {
        if paging(&k, &v, &mut q.limit, &mut q.descending, &mut q.after)? {
            continue;
        }
        match k.as_str() {
            "model" => q.model = Some(v),
            "rated" => q.rated = Some(v.parse::<Rated>().map_err(|e| ApiError::invalid("rated", e))?),
            _ => match k.strip_prefix("metadata[").and_then(|r| r.strip_suffix(']')) {
                Some(key) => q.metadata.push((key.to_string(), v)),
                None => return Err(ApiError::invalid(&k, format!("unknown query parameter {k:?} (model, metadata[KEY], after, limit, order, rated)"))),
            },
        }
    }
    let page = storage.records.list(q).get().await.map_err(db_error)?;
    Ok(axum::Json(page_json(page.records.iter().map(shown).collect(), page.has_more)))
}

async fn find(state: &AppState, meter: &Meter, id: &str) -> Result<Record, ApiError> {
    storage(state)?.records.get(owner(state, meter).as_deref(), id).get().await.map_err(db_error)?.ok_or_else(|| not_found(id))
}

/// GET /v1/chat/completions/{id}
pub async fn retrieve(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(shown(&find(&state, &meter, &id).await?)))
}

/// GET /v1/chat/completions/{id}/messages: the request's messages, with ids `{id}-{index}`.
pub async fn messages(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>, RawQuery(raw): RawQuery) -> Result<axum::Json<Value>, ApiError> {
    let (mut limit, mut descending, mut after) = (20, false, None);
    for (k, v) in query_pairs(raw)? {
        if !paging(&k, &v, &mut limit, &mut descending, &mut after)? {
            return Err(ApiError::invalid(&k, format!("unknown query parameter {k:?} (after, limit, order)")));
        }
    }
    let record = find(&state, &meter, &id).await?;
    let list = record.completion.request["messages"].as_array().cloned().unwrap_or_default();
    let mut all: Vec<Value> = list
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut out = json!({"id": format!("{id}-{i}"), "role": m["role"], "content": m.get("content").cloned().unwrap_or(Value::Null), "name": m.get("name").cloned().unwrap_or(Value::Null), "content_parts": null});
            if let Some(parts) = m.get("content").and_then(Value::as_array) {
                out["content"] = json!(parts.iter().filter_map(|p| p["text"].as_str()).collect::<String>());
                out["content_parts"] = Value::Array(parts.clone());
            }
            for k in ["tool_calls", "tool_call_id"] {
                if let Some(v) = m.get(k) {
                    out[k] = v.clone();
                }
            }
            out
        })
        .collect();
    if descending {
        all.reverse();
    }
    let start = match &after {
        Some(a) => all.iter().position(|m| m["id"] == a.as_str()).map(|p| p + 1).ok_or_else(|| ApiError::invalid("after", format!("No message '{a}' in this completion")))?,
        None => 0,
    };
    let has_more = all.len() > start + limit;
    let data: Vec<Value> = all.into_iter().skip(start).take(limit).collect();
    Ok(axum::Json(page_json(data, has_more)))
}

/// POST /v1/chat/completions/{id}: replace the metadata (the only field that can change).
pub async fn update(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let body: Value = parse_json(&body)?;
    let metadata = match body.get("metadata") {
        Some(m) => check_metadata(m).map_err(|e| ApiError::invalid("metadata", e))?,
        None => return Err(ApiError::invalid("metadata", "Missing required parameter: 'metadata'")),
    };
    let storage = storage(&state)?;
    let record = storage.records.set_metadata(owner(&state, &meter).as_deref(), &id, metadata).get().await.map_err(db_error)?;
    Ok(axum::Json(shown(&record.ok_or_else(|| not_found(&id))?)))
}

/// DELETE /v1/chat/completions/{id}
pub async fn delete(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>) -> Result<axum::Json<Value>, ApiError> {
    let storage = storage(&state)?;
    if !storage.records.delete(owner(&state, &meter).as_deref(), &id).get().await.map_err(db_error)? {
        return Err(not_found(&id));
    }
    Ok(axum::Json(json!({"object": "chat.completion.deleted", "id": id, "deleted": true})))
}

/// POST /v1/chat/completions/{id}/feedback: `rating` (-1 to 1, or "good"/"bad",
/// "thumbs_up"/"thumbs_down"), `comment`, `correction` (the answer the model should have given).
pub async fn feedback(State(state): State<AppState>, Extension(meter): Extension<Meter>, Path(id): Path<String>, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let body: Value = parse_json(&body)?;
    if !body.is_object() {
        return Err(ApiError::bad_request("The feedback must be a JSON object with rating, comment and/or correction"));
    }
    let rating = match body.get("rating") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(r) if (-1.0..=1.0).contains(&r) => Some(r),
            _ => return Err(ApiError::invalid("rating", format!("rating must be a number from -1 to 1, got {n}"))),
        },
        Some(Value::String(s)) => match s.as_str() {
            "good" | "thumbs_up" | "up" => Some(1.0),
            "bad" | "thumbs_down" | "down" => Some(-1.0),
            _ => return Err(ApiError::invalid("rating", format!("rating must be a number from -1 to 1 or one of good, bad, thumbs_up, thumbs_down; got {s:?}"))),
        },
        Some(_) => return Err(ApiError::invalid("rating", "rating must be a number from -1 to 1 or a string (good, bad, thumbs_up, thumbs_down)")),
    };
    let text = |k: &str| -> Result<Option<String>, ApiError> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= 1 << 20 => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(ApiError::invalid(k, format!("{k} is longer than 1 MiB"))),
            Some(_) => Err(ApiError::invalid(k, format!("{k} must be a string"))),
        }
    };
    let (comment, correction) = (text("comment")?, text("correction")?);
    if rating.is_none() && comment.is_none() && correction.is_none() {
        return Err(ApiError::bad_request("Feedback needs at least one of rating, comment, correction"));
    }
    let f = Feedback { id: new_id("feedback"), completion_id: id.clone(), created: now_secs(), rating, comment, correction };
    let stored = storage(&state)?.records.add_feedback(owner(&state, &meter).as_deref(), f).get().await.map_err(db_error)?;
    Ok(axum::Json(feedback_json(&stored.ok_or_else(|| not_found(&id))?)))
}
