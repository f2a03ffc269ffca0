//! LoRA adapters while serving: list, load and unload (`/v1/adapters`), and the adapters'
//! entries in `/v1/models`. A request runs under an adapter by naming `BASE:NAME` as its model
//! (see `state::AppState::resolve`); unloading one leaves the requests already running on it
//! to finish.

use crate::error::ApiError;
use crate::parse_json;
use crate::state::{now, AppState, ModelEntry, ServedAdapter};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use smelt_model::lora::Adapter;
use std::sync::Arc;

/// An adapter as `/v1/models` and `/v1/adapters` show it (`parent` and `root` as vLLM names
/// the base of a LoRA model).
pub fn adapter_json(m: &ModelEntry, name: &str, a: &ServedAdapter) -> Value {
    json!({
        "id": m.adapter_id(name),
        "object": "model",
        "created": a.created,
        "owned_by": "smelt",
        "parent": m.id,
        "root": m.id,
        "context_length": m.engine.config.n_ctx,
        "adapter": {"name": name, "path": a.path, "rank": a.adapter.rank(), "alpha": a.adapter.alpha, "bytes": a.adapter.bytes},
    })
}

pub async fn list(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state.models().iter().flat_map(|m| m.adapters().into_iter().map(|(n, a)| adapter_json(m, &n, &a)).collect::<Vec<_>>()).collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    /// The base model's id (the first served model when absent).
    model: Option<String>,
    /// What requests call it: they name `BASE:NAME`.
    name: String,
    /// The adapter file (GGUF), on the server's file system.
    path: String,
}

/// Adapter names: what fits in a model id and a URL path segment.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

/// POST /v1/adapters {"model", "name", "path"}: load an adapter for a served base model.
pub async fn load(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let req: LoadRequest = parse_json(&body)?;
    let entry = state.model(req.model.as_deref())?;
    if !valid_name(&req.name) {
        return Err(ApiError::invalid("name", "an adapter name is 1 to 128 letters, digits, '-', '_', '.' or ':'"));
    }
    if entry.adapters.read().unwrap_or_else(|e| e.into_inner()).contains_key(&req.name) {
        return Err(ApiError::new(StatusCode::CONFLICT, "invalid_request_error", format!("'{}' is already loaded; unload it first (DELETE /v1/adapters/{})", entry.adapter_id(&req.name), entry.adapter_id(&req.name))).code("adapter_exists"));
    }
    let model = entry.engine.model.clone();
    let (path, name) = (req.path.clone(), req.name.clone());
    let adapter = tokio::task::spawn_blocking(move || Adapter::load(std::path::Path::new(&path), &model, &name))
        .await
        .map_err(|e| ApiError::internal(format!("loading the adapter failed: {e}")))?
        .map_err(|e| ApiError::invalid("path", e.to_string()).code("invalid_adapter"))?;
    let served = ServedAdapter { adapter: Arc::new(adapter), path: req.path, created: now() };
    {
        let mut adapters = entry.adapters.write().unwrap_or_else(|e| e.into_inner());
        if adapters.contains_key(&req.name) {
            return Err(ApiError::new(StatusCode::CONFLICT, "invalid_request_error", format!("'{}' was loaded meanwhile", entry.adapter_id(&req.name))).code("adapter_exists"));
        }
        adapters.insert(req.name.clone(), served.clone());
    }
    Ok((StatusCode::CREATED, axum::Json(adapter_json(&entry, &req.name, &served))).into_response())
}

/// DELETE /v1/adapters/BASE:NAME
pub async fn unload(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let r = state.resolve(Some(&id))?;
    let name = r.adapter.ok_or_else(|| ApiError::invalid("model", format!("'{id}' is a base model, not an adapter")))?;
    let removed = r.entry.adapters.write().unwrap_or_else(|e| e.into_inner()).remove(&name);
    match removed {
        Some(_) => Ok(axum::Json(json!({"id": id, "object": "model", "deleted": true})).into_response()),
        None => Err(ApiError::model_not_found(&id)),
    }
}
