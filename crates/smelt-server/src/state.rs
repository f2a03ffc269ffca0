//! Server state: the served models (each with its engine), readiness, limits, metrics.

use crate::error::ApiError;
use crate::metrics::Metrics;
use smelt_engine::scheduler::Engine;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

pub struct ModelEntry {
    pub id: String,
    pub engine: Engine,
    pub created: u64,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Accepted API keys with their limits; `None` serves everyone.
    pub keys: Option<crate::keys::Keys>,
    /// Largest request body accepted, in bytes.
    pub max_body: usize,
}

struct Inner {
    models: RwLock<Vec<Arc<ModelEntry>>>,
    ready: AtomicBool,
    config: ServerConfig,
    metrics: Metrics,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    pub fn new(config: ServerConfig) -> AppState {
        AppState(Arc::new(Inner { models: RwLock::new(Vec::new()), ready: AtomicBool::new(false), config, metrics: Metrics::default() }))
    }

    pub fn add_model(&self, entry: ModelEntry) {
        self.0.models.write().unwrap_or_else(|e| e.into_inner()).push(Arc::new(entry));
    }

    /// Every model is loaded: start answering requests.
    pub fn set_ready(&self) {
        self.0.ready.store(true, Ordering::SeqCst);
    }

    pub fn ready(&self) -> bool {
        self.0.ready.load(Ordering::SeqCst)
    }

    pub fn config(&self) -> &ServerConfig {
        &self.0.config
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn models(&self) -> Vec<Arc<ModelEntry>> {
        self.0.models.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The model a request names (the first served model when it names none).
    pub fn model(&self, name: Option<&str>) -> Result<Arc<ModelEntry>, ApiError> {
        if !self.ready() {
            return Err(ApiError::unavailable("The model is still loading; retry shortly (GET /health says when it is ready)"));
        }
        let models = self.0.models.read().unwrap_or_else(|e| e.into_inner());
        match name {
            None => models.first().cloned().ok_or_else(|| ApiError::unavailable("No model is loaded")),
            Some(n) => models.iter().find(|m| m.id == n).cloned().ok_or_else(|| ApiError::model_not_found(n)),
        }
    }
}
