//! smelt-server: the OpenAI-compatible HTTP API over smelt engines.
//!
//! `app(state)` is the whole router (tested in-process); `serve` binds it. Handlers parse and
//! validate requests, turn them into engine jobs and shape the engine's events into OpenAI
//! responses; no model code lives here.

mod adapters;
mod chat;
mod completions;
mod embeddings;
pub mod evals;
pub mod fine_tuning;
pub mod error;
mod generation;
mod guard;
pub mod keys;
mod metrics;
mod misc;
mod sink;
mod stored;
mod structured;
mod tools;
pub mod state;
mod types;

pub use state::{AppState, ModelEntry, ServerConfig, Storage};

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
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut de).map_err(|e| (e.path().to_string(), e.into_inner()));
    // Trailing bytes after the JSON value are an error too.
    let parsed = parsed.and_then(|v| de.end().map(|()| v).map_err(|e| (String::new(), e)));
    parsed.map_err(|(path, e)| {
        // Fields inside the flattened sampling fields lose their path in serde: read those
        // alone to find it; otherwise locate the field from the error's position.
        let (path, e) = match path.as_str() {
            "" | "." => match serde_path_to_error::deserialize::<_, types::SamplingFields>(&mut serde_json::Deserializer::from_slice(body)) {
                Err(inner) if inner.path().to_string() != "." => (inner.path().to_string(), inner.into_inner()),
                _ => (json_path_at(body, e.line(), e.column()).unwrap_or_default(), e),
            },
            _ => (path, e),
        };
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
        // The field at fault, as OpenAI names it (`messages[0].content`), where there is one.
        let param = (path != "." && !path.is_empty()).then_some(path);
        let at = param.as_deref().map(|p| format!(" (at {p})")).unwrap_or_default();
        ApiError { param, ..ApiError::bad_request(format!("Invalid request body{at}: {msg}")).code("invalid_json") }
    })
}

/// The field (`messages[0].role`) whose value spans 1-based `line`/`column` of a JSON text,
/// found by a plain scan (no recursion: the text may be nested arbitrarily deep).
fn json_path_at(text: &[u8], line: usize, column: usize) -> Option<String> {
    enum Frame {
        Object { key: Option<String>, wants_key: bool },
        Array(usize),
    }
    let mut stack: Vec<Frame> = Vec::new();
    let (mut l, mut c, mut i) = (1, 0, 0);
    while i < text.len() && (l < line || (l == line && c < column)) {
        let b = text[i];
        match b {
            b'\n' => {
                l += 1;
                c = 0;
                i += 1;
                continue;
            }
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                if let Some(Frame::Object { key, wants_key: wants @ true }) = stack.last_mut() {
                    *key = Some(String::from_utf8_lossy(&text[start..i.min(text.len())]).into_owned());
                    *wants = false;
                }
                c += i.min(text.len()) - start + 1;
            }
            b'{' => stack.push(Frame::Object { key: None, wants_key: true }),
            b'[' => stack.push(Frame::Array(0)),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { wants_key, .. }) => *wants_key = true,
                Some(Frame::Array(n)) => *n += 1,
                None => {}
            },
            _ => {}
        }
        c += 1;
        i += 1;
    }
    if stack.len() > 32 {
        return None; // not a field of any request
    }
    let mut path = String::new();
    for f in &stack {
        match f {
            Frame::Object { key: Some(k), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            Frame::Object { key: None, .. } => return None,
            Frame::Array(n) => path.push_str(&format!("[{n}]")),
        }
    }
    (!path.is_empty()).then_some(path)
}

/// Server-sent events from a channel of JSON strings ("[DONE]" ends the stream).
pub(crate) fn sse_response(mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) -> Response {
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)))));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// API key check and per-key limits, body size limit, and request metrics.
async fn gate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = metrics::route_label(req.uri().path());
    let open = matches!(route, "/health" | "/metrics");
    let admitted = match (&state.config().keys, open) {
        (Some(keys), false) => keys.admit(req.headers().get(header::AUTHORIZATION)),
        _ => Ok(keys::Meter::none()),
    };
    let start = std::time::Instant::now();
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let key = admitted.as_ref().ok().and_then(|m| m.name().map(str::to_string));
    let resp = match admitted {
        Ok(meter) => {
            req.extensions_mut().insert(meter.clone());
            let (resp, mut model) = limit_body(&state, req, next).await;
            // The meter (and with it the key's concurrency slot) lives as long as the response
            // body: to the end of a stream, or until the client goes away; the request's log
            // line is written then, with its tokens and time.
            // Health and metrics probes are not logged (they come every few seconds).
            let log = state.log_format().filter(|_| !open).map(|format| RequestLog { format, method, path, status: resp.status().as_u16(), model: model.take(), key, start });
            resp.map(|body| Body::new(Held { body, meter, log }))
        }
        Err(e) => {
            let resp = e.into_response();
            if let Some(format) = state.log_format().filter(|_| !open) {
                RequestLog { format, method, path, status: resp.status().as_u16(), model: None, key, start }.write(0);
            }
            resp
        }
    };
    state.metrics().count(route, resp.status().as_u16());
    resp
}

/// How request log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One request's log line, written when its response body is done.
struct RequestLog {
    format: LogFormat,
    method: String,
    path: String,
    status: u16,
    model: Option<String>,
    key: Option<String>,
    start: std::time::Instant,
}

impl RequestLog {
    fn write(&self, tokens: usize) {
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let line = match self.format {
            LogFormat::Json => serde_json::json!({"time": state::now(), "method": self.method, "path": self.path, "status": self.status, "model": self.model, "key": self.key, "tokens": tokens, "ms": (ms * 10.0).round() / 10.0}).to_string(),
            LogFormat::Text => format!(
                "{} {} {} model={} tokens={tokens} {ms:.1}ms{}",
                self.method,
                self.path,
                self.status,
                self.model.as_deref().unwrap_or("-"),
                self.key.as_deref().map(|k| format!(" key={k}")).unwrap_or_default()
            ),
        };
        eprintln!("{line}");
    }
}

/// A response body that keeps its request's meter alive until it is finished or dropped, then
/// logs the request.
struct Held {
    body: Body,
    meter: keys::Meter,
    log: Option<RequestLog>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.write(self.meter.used());
        }
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Largest file upload (`/v1/files`), unless `max_body` is larger.
pub const FILE_LIMIT: usize = 256 << 20;

/// Read the body within the limit and run the handler; also the model the body names (for the
/// request log, when one is kept).
async fn limit_body(state: &AppState, req: Request, next: Next) -> (Response, Option<String>) {
    // Uploads of training files may be larger than any request.
    let limit = if req.uri().path() == "/v1/files" { state.config().max_body.max(FILE_LIMIT) } else { state.config().max_body };
    // A declared length over the limit is refused at once, without reading the body.
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return (ApiError::too_large(limit).into_response(), None);
    }
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => {
            #[derive(serde::Deserialize)]
            struct Named {
                model: Option<String>,
            }
            let model = if state.log_format().is_some() && bytes.len() < (1 << 20) && bytes.first() == Some(&b'{') {
                serde_json::from_slice::<Named>(&bytes).ok().and_then(|n| n.model)
            } else {
                None
            };
            (next.run(Request::from_parts(parts, Body::from(bytes))).await, model)
        }
        Err(_) => (ApiError::too_large(limit).into_response(), None),
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
        .route("/v1/chat/completions", post(chat::handler).get(stored::list))
        .route("/v1/chat/completions/{id}", get(stored::retrieve).post(stored::update).delete(stored::delete))
        .route("/v1/chat/completions/{id}/messages", get(stored::messages))
        .route("/v1/chat/completions/{id}/feedback", post(stored::feedback))
        .route("/v1/completions", post(completions::handler))
        .route("/v1/embeddings", post(embeddings::handler))
        .route("/v1/moderations", post(guard::moderations))
        .route("/v1/evals", get(evals::list).post(evals::create))
        .route("/v1/evals/{id}", get(evals::retrieve).post(evals::update).delete(evals::delete))
        .route("/v1/evals/{id}/runs", get(evals::list_runs).post(evals::create_run))
        .route("/v1/evals/{id}/runs/{run_id}", get(evals::get_run).delete(evals::delete_run))
        .route("/v1/evals/{id}/runs/{run_id}/output_items", get(evals::list_output_items))
        .route("/v1/evals/{id}/runs/{run_id}/output_items/{item_id}", get(evals::get_output_item))
        .route("/v1/models", get(misc::list_models))
        .route("/v1/models/{*id}", get(misc::get_model))
        .route("/v1/adapters", get(adapters::list).post(adapters::load))
        .route("/v1/adapters/{*id}", axum::routing::delete(adapters::unload))
        .route("/v1/files", get(fine_tuning::list_files).post(fine_tuning::upload))
        .route("/v1/files/{id}", get(fine_tuning::get_file).delete(fine_tuning::delete_file))
        .route("/v1/files/{id}/content", get(fine_tuning::file_content))
        .route("/v1/fine_tuning/jobs", get(fine_tuning::list_jobs).post(fine_tuning::create_job))
        .route("/v1/fine_tuning/jobs/{id}", get(fine_tuning::get_job))
        .route("/v1/fine_tuning/jobs/{id}/cancel", post(fine_tuning::cancel_job))
        .route("/v1/fine_tuning/jobs/{id}/events", get(fine_tuning::job_events))
        .route("/v1/fine_tuning/jobs/{id}/checkpoints", get(fine_tuning::job_checkpoints))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/health", get(misc::health))
        .route("/metrics", get(misc::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        // `gate` enforces the configured limit with an OpenAI-shaped 413; axum's own default
        // (2 MiB, plain text) would otherwise apply first.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// Serve `app(state)` until SIGINT or SIGTERM; then stop accepting, let running requests finish
/// for up to `grace`, and return.
pub async fn serve(state: AppState, listener: tokio::net::TcpListener, grace: std::time::Duration) -> std::io::Result<()> {
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let signalled = stop.clone();
    let running = state.clone();
    let signal = async move {
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let sigterm = async move {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        let busy = running.busy();
        eprintln!("shutting down: no new connections; waiting up to {}s for {busy} running request(s)", grace.as_secs());
        signalled.notify_one();
    };
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(signal);
    tokio::select! {
        r = server => {
            r?;
            eprintln!("stopped");
        }
        _ = async { stop.notified().await; tokio::time::sleep(grace).await } => {
            eprintln!("stopped: requests still running after {}s were cut off (--shutdown-timeout)", grace.as_secs());
        }
    }
    Ok(())
}


#[cfg(test)]
mod tests {
    use super::json_path_at;

    #[test]
    fn error_positions_map_to_field_paths() {
        let body = br#"{"model": "m", "max_tokens": "many", "messages": [{"role": "user"}, {"role": 5}]}"#;
        let col = |needle: &str| std::str::from_utf8(body).unwrap().find(needle).unwrap() + needle.len();
        assert_eq!(json_path_at(body, 1, col(r#""many""#)).as_deref(), Some("max_tokens"));
        assert_eq!(json_path_at(body, 1, col(r#""role": 5"#)).as_deref(), Some("messages[1].role"));
        assert_eq!(json_path_at(b"{\n\"a\": [1,\n 2, \"x\"]}", 3, 7).as_deref(), Some("a[2]"));
        assert_eq!(json_path_at(b"[[", 1, 2).as_deref(), Some("[0][0]"));
        let deep = "[".repeat(100_000);
        assert_eq!(json_path_at(deep.as_bytes(), 1, 100_000), None);
    }
}
