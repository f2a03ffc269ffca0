//! Server state: the served models (each with its engine), readiness, limits, metrics.

use crate::error::ApiError;
use crate::metrics::Metrics;
use smelt_engine::scheduler::Engine;
use smelt_model::lora::{Adapter, LoraSet};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

pub struct ModelEntry {
    pub id: String,
    pub engine: Engine,
    pub created: u64,
    /// LoRA adapters of this base model, by name: requests pick one with the model id
    /// `BASE:NAME`. Loaded and unloaded while serving; a request holds its adapter until done.
    pub adapters: RwLock<BTreeMap<String, ServedAdapter>>,
    /// Whether the log has said that this model, lacking a chat template, answered a chat.
    pub warned_no_template: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
pub struct ServedAdapter {
    pub adapter: Arc<Adapter>,
    /// The file it was loaded from.
    pub path: String,
    pub created: u64,
}

impl ModelEntry {
    pub fn new(id: impl Into<String>, engine: Engine) -> ModelEntry {
        ModelEntry { id: id.into(), engine, created: now(), adapters: RwLock::new(BTreeMap::new()), warned_no_template: Default::default() }
    }

    pub fn adapters(&self) -> Vec<(String, ServedAdapter)> {
        self.adapters.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The API id of one of this model's adapters (a fine-tuned model's name is its id).
    pub fn adapter_id(&self, name: &str) -> String {
        if name.starts_with("ft:") { name.to_string() } else { format!("{}:{name}", self.id) }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What a request's `model` names: a served model, with the adapters it runs under, and the id
/// to answer with.
pub struct Resolved {
    pub entry: Arc<ModelEntry>,
    pub lora: LoraSet,
    pub id: String,
    /// The adapter's name among the base's adapters, when the id names one.
    pub adapter: Option<String>,
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
    /// Files and fine-tuning jobs, when the server keeps them.
    jobs: std::sync::OnceLock<Arc<smelt_train::jobs::JobStore>>,
    /// Stored chat completions and feedback, when the server keeps them.
    records: std::sync::OnceLock<Storage>,
    /// Guardrails on chat requests and answers (`--guard`).
    guard: std::sync::OnceLock<smelt_guard::Policy>,
    /// The served model that judges moderation requests by default (`--moderation-model`).
    moderation_model: std::sync::OnceLock<String>,
    /// The model a request without `model` goes to (`--default-model`; else the first served).
    default_model: std::sync::OnceLock<String>,
    /// Request log lines, when kept (`--log-format`).
    log: std::sync::OnceLock<crate::LogFormat>,
}

/// Where chat completions are stored, and which.
#[derive(Clone)]
pub struct Storage {
    pub records: smelt_records::Records,
    /// Store every chat completion, not only those that ask (`store: true`).
    pub all: bool,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    pub fn new(config: ServerConfig) -> AppState {
        AppState(Arc::new(Inner { models: RwLock::new(Vec::new()), ready: AtomicBool::new(false), config, metrics: Metrics::default(), jobs: std::sync::OnceLock::new(), records: std::sync::OnceLock::new(), guard: std::sync::OnceLock::new(), moderation_model: std::sync::OnceLock::new(), default_model: std::sync::OnceLock::new(), log: std::sync::OnceLock::new() }))
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

    pub fn set_jobs(&self, store: Arc<smelt_train::jobs::JobStore>) {
        let _ = self.0.jobs.set(store);
    }

    pub fn jobs(&self) -> Option<Arc<smelt_train::jobs::JobStore>> {
        self.0.jobs.get().cloned()
    }

    pub fn set_storage(&self, storage: Storage) {
        let _ = self.0.records.set(storage);
    }

    pub fn storage(&self) -> Option<&Storage> {
        self.0.records.get()
    }

    pub fn set_guard(&self, policy: smelt_guard::Policy) {
        let _ = self.0.guard.set(policy);
    }

    pub fn set_log_format(&self, format: crate::LogFormat) {
        let _ = self.0.log.set(format);
    }

    pub fn log_format(&self) -> Option<crate::LogFormat> {
        self.0.log.get().copied()
    }

    pub fn set_default_model(&self, model: String) {
        let _ = self.0.default_model.set(model);
    }

    pub fn set_moderation_model(&self, model: String) {
        let _ = self.0.moderation_model.set(model);
    }

    pub fn moderation_model(&self) -> Option<String> {
        self.0.moderation_model.get().cloned()
    }

    pub fn guard(&self) -> smelt_guard::Policy {
        self.0.guard.get().cloned().unwrap_or_default()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn models(&self) -> Vec<Arc<ModelEntry>> {
        self.0.models.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests the engines are running or holding in their queues, over all models.
    pub fn busy(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        self.models().iter().map(|m| m.engine.stats.running.load(Relaxed) + m.engine.stats.waiting.load(Relaxed)).sum()
    }

    /// The model a request names: a served model's id, `BASE:ADAPTER` for one of its adapters,
    /// or a fine-tuned model's `ft:` id (the first served model when it names none).
    pub fn resolve(&self, name: Option<&str>) -> Result<Resolved, ApiError> {
        let entry = match self.model(name) {
            Ok(entry) => entry,
            Err(not_found) => {
                let Some(name) = name else { return Err(not_found) };
                let models = self.models();
                if name.starts_with("ft:") {
                    for m in &models {
                        if let Some(a) = m.adapters.read().unwrap_or_else(|e| e.into_inner()).get(name) {
                            return Ok(Resolved { entry: m.clone(), lora: LoraSet::one(a.adapter.clone(), 1.0), id: name.to_string(), adapter: Some(name.to_string()) });
                        }
                    }
                    return Err(not_found);
                }
                // The longest base id that prefixes the name (ids may contain ':' themselves).
                let mut bases: Vec<&Arc<ModelEntry>> = models.iter().filter(|m| name.len() > m.id.len() + 1 && name.starts_with(&m.id) && name.as_bytes()[m.id.len()] == b':').collect();
                bases.sort_by_key(|m| std::cmp::Reverse(m.id.len()));
                for m in bases {
                    let adapters = m.adapters.read().unwrap_or_else(|e| e.into_inner());
                    if let Some(a) = adapters.get(&name[m.id.len() + 1..]) {
                        return Ok(Resolved { entry: m.clone(), lora: LoraSet::one(a.adapter.clone(), 1.0), id: name.to_string(), adapter: Some(name[m.id.len() + 1..].to_string()) });
                    }
                }
                return Err(not_found);
            }
        };
        let id = entry.id.clone();
        Ok(Resolved { entry, lora: LoraSet::default(), id, adapter: None })
    }

    /// The served model a request names, without adapters (the first when it names none).
    pub fn model(&self, name: Option<&str>) -> Result<Arc<ModelEntry>, ApiError> {
        if !self.ready() {
            return Err(ApiError::unavailable("The model is still loading; retry shortly (GET /health says when it is ready)"));
        }
        let models = self.0.models.read().unwrap_or_else(|e| e.into_inner());
        match name {
            None => match self.0.default_model.get() {
                Some(d) => models.iter().find(|m| &m.id == d).cloned().ok_or_else(|| ApiError::model_not_found(d)),
                None => models.first().cloned().ok_or_else(|| ApiError::unavailable("No model is loaded")),
            },
            Some(n) => models.iter().find(|m| m.id == n).cloned().ok_or_else(|| ApiError::model_not_found(n)),
        }
    }
}
