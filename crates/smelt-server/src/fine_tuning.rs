//! OpenAI's files and fine-tuning API (`/v1/files`, `/v1/fine_tuning/jobs`) over the job store
//! of `smelt_train::jobs`: uploads checked line by line, jobs run in this process one at a time
//! at low priority, and each finished job's adapter served at once as its `fine_tuned_model`
//! (`ft:BASE:SUFFIX:JOBID`), as are the checkpoints of its epochs.

use crate::error::ApiError;
use crate::parse_json;
use crate::state::{now, AppState, ServedAdapter};
use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use smelt_model::arch::Model;
use smelt_model::lora::Adapter;
use smelt_train::jobs::{self, ErrorKind, JobHost, JobStore, NewJob, StoreError};
use std::sync::Arc;

fn api_error(e: StoreError) -> ApiError {
    let status = match e.kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Io => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    ApiError { param: e.param.map(String::from), ..ApiError::new(status, kind, e.message) }
}

fn store(state: &AppState) -> Result<Arc<JobStore>, ApiError> {
    if !state.ready() {
        return Err(ApiError::unavailable("The server is still loading its models; retry shortly (GET /health says when it is ready)"));
    }
    state.jobs().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "Fine-tuning is not enabled on this server").code("unknown_url"))
}

/// The server as the job runner sees it: its loaded models, and where finished adapters go.
struct Host(AppState);

impl JobHost for Host {
    fn model(&self, id: &str) -> Option<(Arc<Model>, usize)> {
        self.0.models().into_iter().find(|m| m.id == id).map(|m| (m.engine.model.clone(), m.engine.config.n_ctx))
    }

    fn publish(&self, base: &str, name: &str, adapter: Adapter, path: &std::path::Path) {
        if let Some(m) = self.0.models().into_iter().find(|m| m.id == base) {
            let served = ServedAdapter { adapter: Arc::new(adapter), path: path.display().to_string(), created: now() };
            m.adapters.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), served);
        }
    }
}

/// Attach the job store to the server: serve the adapters of jobs finished before, and start
/// the runner (validating, running and resuming jobs) on `threads` low-priority threads.
/// Call with the models loaded.
pub fn start(state: &AppState, store: Arc<JobStore>, threads: usize) {
    let host = Arc::new(Host(state.clone()));
    for (base, name, path) in store.published() {
        let Some((model, _)) = host.model(&base) else { continue };
        match Adapter::load(&path, &model, &name) {
            Ok(a) => host.publish(&base, &name, a, &path),
            Err(e) => eprintln!("warning: {name}: {e}"),
        }
    }
    state.set_jobs(store.clone());
    let _ = std::thread::Builder::new().name("smelt-fine-tuning".into()).spawn(move || jobs::run_jobs(store, host, threads));
}

#[derive(Deserialize)]
pub struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
    purpose: Option<String>,
    order: Option<String>,
}

/// One page of a list that is newest first: the items after `after`, at most `limit`.
fn page<T: serde::Serialize>(items: Vec<T>, id: impl Fn(&T) -> &str, q: &PageQuery, default_limit: usize) -> Result<Value, ApiError> {
    let limit = q.limit.unwrap_or(default_limit);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::invalid("limit", "limit must be 1 to 10000"));
    }
    let start = match &q.after {
        Some(a) => items.iter().position(|x| id(x) == a).map(|p| p + 1).ok_or_else(|| ApiError::invalid("after", format!("no item {a} in this list")))?,
        None => 0,
    };
    let rest = items.len().saturating_sub(start);
    let data: Vec<&T> = items.iter().skip(start).take(limit).collect();
    let (first, last) = (data.first().map(|x| id(x).to_string()), data.last().map(|x| id(x).to_string()));
    Ok(json!({"object": "list", "data": data, "has_more": rest > limit, "first_id": first, "last_id": last}))
}

// ---- /v1/files ----

pub async fn upload(State(state): State<AppState>, mut form: Multipart) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let bad = |e: axum::extract::multipart::MultipartError| ApiError::bad_request(format!("the upload is not valid multipart/form-data: {e}"));
    let (mut file, mut purpose) = (None, None);
    while let Some(field) = form.next_field().await.map_err(bad)? {
        match field.name() {
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                file = Some((name, field.bytes().await.map_err(bad)?));
            }
            Some("purpose") => purpose = Some(field.text().await.map_err(bad)?),
            _ => {}
        }
    }
    let (filename, bytes) = file.ok_or_else(|| ApiError::invalid("file", "the form has no 'file' part"))?;
    let purpose = purpose.ok_or_else(|| ApiError::invalid("purpose", "the form has no 'purpose' part (use \"fine-tune\")"))?;
    let rec = tokio::task::spawn_blocking(move || store.add_file(&filename, purpose.trim(), &bytes))
        .await
        .map_err(|e| ApiError::internal(format!("storing the file failed: {e}")))?
        .map_err(api_error)?;
    Ok(axum::Json(rec).into_response())
}

pub async fn list_files(State(state): State<AppState>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    let mut files = store(&state)?.files();
    if let Some(p) = &q.purpose {
        files.retain(|f| &f.purpose == p);
    }
    match q.order.as_deref() {
        None | Some("desc") => {}
        Some("asc") => files.reverse(),
        Some(o) => return Err(ApiError::invalid("order", format!("order must be asc or desc, got {o:?}"))),
    }
    Ok(axum::Json(page(files, |f| &f.id, &q, 10_000)?).into_response())
}

pub async fn get_file(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(store(&state)?.file(&id).map_err(api_error)?).into_response())
}

pub async fn file_content(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let bytes = store(&state)?.file_content(&id).map_err(api_error)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

pub async fn delete_file(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    store(&state)?.delete_file(&id).map_err(api_error)?;
    Ok(axum::Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

// ---- /v1/fine_tuning/jobs ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateJob {
    model: String,
    training_file: String,
    validation_file: Option<String>,
    suffix: Option<String>,
    seed: Option<i64>,
    hyperparameters: Option<Value>,
    method: Option<Value>,
    metadata: Option<serde_json::Map<String, Value>>,
    integrations: Option<Vec<Value>>,
}

/// A hyperparameter: absent or "auto" (None), or a number in `range`.
fn hyper(h: &Value, key: &str, min: f64, max: f64, integer: bool) -> Result<Option<f64>, ApiError> {
    let param = format!("hyperparameters.{key}");
    match h.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if !(min..=max).contains(&v) || (integer && v.fract() != 0.0) {
                let what = if integer { "an integer" } else { "a number" };
                return Err(ApiError::invalid(&param, format!("{key} must be \"auto\" or {what} from {min} to {max}, got {v}")));
            }
            Ok(Some(v))
        }
        Some(other) => Err(ApiError::invalid(&param, format!("{key} must be \"auto\" or a number, got {other}"))),
    }
}

pub async fn create_job(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let store = store(&state)?;
    let req: CreateJob = parse_json(&body)?;
    if req.model.starts_with("ft:") || state.resolve(Some(&req.model)).is_ok_and(|r| r.adapter.is_some()) {
        return Err(ApiError::invalid("model", "fine-tuning an adapter further is not supported; name its base model"));
    }
    let base = state.model(Some(&req.model))?;
    let mut h = req.hyperparameters.clone().unwrap_or(Value::Null);
    if let Some(m) = &req.method {
        match m.get("type").and_then(Value::as_str) {
            Some("supervised") | None => {}
            Some(t) => return Err(ApiError::invalid("method.type", format!("method {t:?} is not supported (only \"supervised\")"))),
        }
        if let Some(mh) = m.pointer("/supervised/hyperparameters").filter(|v| !v.is_null()) {
            if !h.is_null() {
                return Err(ApiError::invalid("hyperparameters", "give hyperparameters either at the top level or in method.supervised, not both"));
            }
            h = mh.clone();
        }
    }
    if !(h.is_null() || h.is_object()) {
        return Err(ApiError::invalid("hyperparameters", "hyperparameters must be an object"));
    }
    if let Some(k) = h.as_object().and_then(|o| o.keys().find(|k| !matches!(k.as_str(), "n_epochs" | "batch_size" | "learning_rate_multiplier"))) {
        return Err(ApiError::invalid(&format!("hyperparameters.{k}"), format!("unknown hyperparameter {k:?} (n_epochs, batch_size, learning_rate_multiplier)")));
    }
    if let Some(s) = &req.suffix {
        if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(ApiError::invalid("suffix", "suffix must be 1 to 64 letters, digits, '-' or '_'"));
        }
    }
    let seed = match req.seed {
        Some(s) if !(0..=2_147_483_647).contains(&s) => return Err(ApiError::invalid("seed", "seed must be from 0 to 2147483647")),
        s => s.map(|s| s as u64),
    };
    if let Some(md) = &req.metadata {
        if md.len() > 16 || md.iter().any(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512)) {
            return Err(ApiError::invalid("metadata", "metadata holds at most 16 string values, keys up to 64 and values up to 512 characters"));
        }
    }
    if req.integrations.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::invalid("integrations", "integrations are not supported"));
    }
    let new = NewJob {
        model: base.id.clone(),
        training_file: req.training_file,
        validation_file: req.validation_file,
        suffix: req.suffix,
        seed,
        n_epochs: hyper(&h, "n_epochs", 1.0, 50.0, true)?.map(|v| v as usize),
        batch_size: hyper(&h, "batch_size", 1.0, 256.0, true)?.map(|v| v as usize),
        learning_rate_multiplier: hyper(&h, "learning_rate_multiplier", 1e-3, 100.0, false)?,
        metadata: req.metadata.map(Value::Object),
    };
    let job = store.create_job(new).map_err(api_error)?;
    // Check the files against the model now, off the request path, so the job says at once
    // whether it is queued or failed.
    let (host, id) = (Host(state.clone()), job.id.clone());
    let s = store.clone();
    tokio::task::spawn_blocking(move || jobs::validate(&s, &host, &id));
    Ok(axum::Json(job).into_response())
}

pub async fn list_jobs(State(state): State<AppState>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    Ok(axum::Json(page(store(&state)?.jobs(), |j| &j.id, &q, 20)?).into_response())
}

pub async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(store(&state)?.job(&id).map_err(api_error)?).into_response())
}

pub async fn cancel_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(axum::Json(store(&state)?.cancel(&id).map_err(api_error)?).into_response())
}

pub async fn job_events(State(state): State<AppState>, Path(id): Path<String>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    Ok(axum::Json(page(store(&state)?.events(&id).map_err(api_error)?, |e| &e.id, &q, 20)?).into_response())
}

pub async fn job_checkpoints(State(state): State<AppState>, Path(id): Path<String>, Query(q): Query<PageQuery>) -> Result<Response, ApiError> {
    Ok(axum::Json(page(store(&state)?.checkpoints(&id).map_err(api_error)?, |c| &c.id, &q, 10)?).into_response())
}
