//! POST /v1/embeddings: the mean of the model's final normed hidden states over the input's
//! tokens, scaled to unit length.

use crate::completions::prompts;
use crate::error::ApiError;
use crate::parse_json;
use crate::state::AppState;
use crate::types::EmbeddingRequest;
use axum::body::Bytes;
use axum::extract::State;
use axum::Extension;
use crate::keys::Meter;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{json, Value};
use smelt_engine::scheduler::{EmbedRequest, Event, Job, SubmitError};

pub async fn handler(State(state): State<AppState>, Extension(meter): Extension<Meter>, body: Bytes) -> Result<Response, ApiError> {
    let req: EmbeddingRequest = parse_json(&body)?;
    let entry = match state.model(req.model.as_deref()) {
        Ok(entry) => entry,
        // An adapter's id: embeddings are the base model's.
        Err(e) => match state.resolve(req.model.as_deref()) {
            Ok(r) => return Err(ApiError::invalid("model", format!("'{}' is an adapter; embeddings come from base models: use '{}'", r.id, r.entry.id))),
            Err(_) => return Err(e),
        },
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(ApiError::invalid("encoding_format", format!("encoding_format must be \"float\" or \"base64\", got {other:?}"))),
    };
    let dim = entry.engine.model.hp.n_embd;
    if let Some(d) = req.dimensions {
        if d != dim as i64 {
            return Err(ApiError::invalid("dimensions", format!("this model's embeddings have {dim} dimensions; it cannot produce {d}")));
        }
    }
    let inputs = prompts(&entry, &req.input, "input")?;
    let n_ctx = entry.engine.config.n_ctx;
    for (i, inp) in inputs.iter().enumerate() {
        if inp.is_empty() {
            return Err(ApiError::invalid("input", format!("input {i} is empty")));
        }
        if inp.len() > n_ctx {
            return Err(ApiError::bad_request(format!("input {i} has {} tokens; the maximum context length is {n_ctx}", inp.len())).code("context_length_exceeded"));
        }
    }
    // Charged whether or not the client waits for the answer.
    let _bill = meter.bill(inputs.iter().map(|i| i.len()).sum());
    let (sink, mut rx) = crate::sink::channel();
    match entry.engine.submit(Job::Embed(EmbedRequest { inputs, sink })) {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => return Err(ApiError::busy()),
        Err(SubmitError::Stopped) => return Err(ApiError::unavailable("the engine has stopped")),
    }
    let (vectors, tokens) = match rx.recv().await {
        Some(Event::Embeddings(v, t)) => (v, t),
        Some(Event::Error(e)) => return Err(ApiError::bad_request(e)),
        _ => return Err(ApiError::internal("the engine stopped before finishing the request")),
    };
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data, "model": entry.id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})).into_response())
}
