//! smelt-server: the OpenAI-compatible HTTP API over smelt engines.
//!
//! `app(state)` is the whole router (tested in-process); `serve` binds it. Handlers parse and
//! validate requests, turn them into engine jobs and shape the engine's events into OpenAI
//! responses; no model code lives here.

mod chat;
mod completions;
mod embeddings;
pub mod error;
mod generation;
mod metrics;
mod misc;
mod sink;
mod structured;
mod tools;
pub mod state;
mod types;

pub use state::{AppState, ModelEntry, ServerConfig};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use serde::de::DeserializeOwned;
use std::convert::Infallible;

/// Parse a JSON body, with errors that say what is wrong and where.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::bad_request("The request body is not valid UTF-8"));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let msg = if msg.contains("did not match any variant of untagged enum Input") {
            "prompt/input must be a string, an array of strings, an array of token ids, or an array of arrays of token ids".to_string()
        } else if msg.contains("did not match any variant of untagged enum Content") {
            "message content must be a string or an array of content parts".to_string()
        } else if msg.contains("did not match any variant of untagged enum Stop") {
            "stop must be a string or an array of strings".to_string()
        } else {
            msg
        };
        ApiError::bad_request(format!("Invalid request body: {msg}")).code("invalid_json")
    })
}

/// Server-sent events from a channel of JSON strings ("[DONE]" ends the stream).
pub(crate) fn sse_response(mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) -> Response {
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)))));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Constant-time comparison, so response timing says nothing about the key.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// API key check, body size limit, and request metrics.
async fn gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = metrics::route_label(req.uri().path());
    let open = matches!(route, "/health" | "/metrics");
    let resp = match (&state.config().api_key, open) {
        (Some(key), false) => {
            let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
            if same_secret(given.trim().as_bytes(), key.as_bytes()) {
                limit_body(&state, req, next).await
            } else {
                ApiError::unauthorized().into_response()
            }
        }
        _ => limit_body(&state, req, next).await,
    };
    state.metrics().count(route, resp.status().as_u16());
    resp
}

async fn limit_body(state: &AppState, req: Request, next: Next) -> Response {
    let limit = state.config().max_body;
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(_) => ApiError::too_large(limit).into_response(),
    }
}

async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "Unknown endpoint").code("unknown_url").into_response()
}

async fn method_not_allowed() -> Response {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "Method not allowed for this endpoint").into_response()
}

/// The whole API.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::handler))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/embeddings", post(embeddings::handler))
        .route("/v1/models", get(misc::list_models))
        .route("/v1/models/{*id}", get(misc::get_model))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/health", get(misc::health))
        .route("/metrics", get(misc::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// Serve `app(state)` on `addr` until the process is interrupted.
pub async fn serve(state: AppState, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, app(state)).with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
        assert!(same_secret(b"", b""));
    }
}
