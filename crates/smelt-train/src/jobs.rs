//! Fine-tuning jobs kept on disk, as OpenAI's fine-tuning API describes them: uploaded files,
//! jobs with their status, events and checkpoints, and the adapters they produce. Jobs run one
//! at a time on a background thread at low CPU priority, so a server keeps answering while it
//! trains; everything is written before it is reported, so a restarted server finds finished
//! jobs with their adapters and resumes a running job from its last checkpoint.
//!
//! Layout of the store's directory:
//! - `files/ID.jsonl` and `files/ID.json` (the record);
//! - `jobs/ID/job.json`, `jobs/ID/events.jsonl`, `jobs/ID/checkpoints.json`, `jobs/ID/ckpt/`
//!   (the trainer's checkpoint), `jobs/ID/ckpt-step-N.gguf` and `jobs/ID/adapter.gguf`.
//!
//! The HTTP shapes are the records' own (serde), so the server adds no translation.

use crate::model::Example;
use crate::train::{write_atomic, Trainer, TuneConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::lora::Adapter;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An uploaded file (OpenAI's file object).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRecord {
    pub id: String,
    pub object: String,
    pub bytes: u64,
    pub created_at: u64,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub status_details: Option<String>,
    pub expires_at: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

/// A fine-tuning job (OpenAI's `fine_tuning.job` object). `hyperparameters` holds what was
/// asked (`"auto"` or a number) until the job starts, then the values it runs with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub object: String,
    pub model: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub fine_tuned_model: Option<String>,
    pub organization_id: String,
    pub result_files: Vec<String>,
    pub status: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub hyperparameters: Value,
    pub method: Value,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobError>,
    pub seed: u64,
    pub user_provided_suffix: Option<String>,
    pub estimated_finish: Option<u64>,
    pub integrations: Vec<Value>,
    pub metadata: Option<Value>,
}

impl Job {
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// One line of a job's log (OpenAI's `fine_tuning.job.event`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    pub data: Value,
    #[serde(rename = "type")]
    pub kind: String,
}

/// A saved point of a run (OpenAI's `fine_tuning.job.checkpoint`); its adapter is served as
/// `fine_tuned_model_checkpoint`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub metrics: Value,
    pub step_number: usize,
}

/// What a new job asks for (already checked for shape by the caller).
#[derive(Clone, Debug, Default)]
pub struct NewJob {
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    /// Each `None` is "auto".
    pub n_epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate_multiplier: Option<f64>,
    pub metadata: Option<Value>,
}

/// Why a store operation was refused; `kind` maps to an HTTP status.
#[derive(Debug)]
pub struct StoreError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<&'static str>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    Invalid,
    Conflict,
    Io,
}

impl StoreError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> StoreError {
        StoreError { kind, message: message.into(), param: None }
    }
    fn param(mut self, p: &'static str) -> StoreError {
        self.param = Some(p);
        self
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> StoreError {
        StoreError::new(ErrorKind::Io, format!("the job store: {e}"))
    }
}

/// What the job runner needs from the process that hosts it (the server).
pub trait JobHost: Send + Sync + 'static {
    /// A loaded base model by id, with the context it is served at (longest example).
    fn model(&self, id: &str) -> Option<(Arc<Model>, usize)>;
    /// Serve `adapter` (written at `path`) on base `base` under the model id `name`.
    fn publish(&self, base: &str, name: &str, adapter: Adapter, path: &Path);
}

/// The tuning defaults for API jobs (the CLI's defaults; "auto" epochs are 3).
pub const BASE_LR: f64 = 2e-4;
pub const AUTO_EPOCHS: usize = 3;

struct Inner {
    files: BTreeMap<String, FileRecord>,
    jobs: BTreeMap<String, Job>,
    events: BTreeMap<String, Vec<Event>>,
    checkpoints: BTreeMap<String, Vec<Checkpoint>>,
    /// Jobs whose files are being checked now (by the runner or a request's task).
    validating: std::collections::BTreeSet<String>,
}

/// The files and jobs of one server, on disk.
pub struct JobStore {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Signalled when a job becomes ready to run.
    wake: Condvar,
}

pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh id: `prefix` and 24 hex digits from the clock, the process and a counter.
fn new_id(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let mut x = nanos ^ ((std::process::id() as u64) << 40) ^ COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut mix = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    format!("{prefix}{:016x}{:08x}", mix(), mix() as u32)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Check a fine-tuning file's lines for shape, without a model (that comes when a job uses
/// it): every line a JSON object with a well-formed `messages` array or `prompt`/`completion`
/// strings. Returns the number of examples, or every bad line.
pub fn check_file(text: &str) -> Result<usize, Vec<crate::data::LineError>> {
    crate::data::each_line(text, crate::data::check_line).map(|lines| lines.len())
}

/// At most `n` line errors as one message.
pub fn describe(errors: &[crate::data::LineError], n: usize) -> String {
    let mut msg: Vec<String> = errors.iter().take(n).map(|e| e.to_string()).collect();
    if errors.len() > n {
        msg.push(format!("and {} more", errors.len() - n));
    }
    format!("{} bad line(s): {}", errors.len(), msg.join("; "))
}

/// Claim `dir` for this process: a lock on `dir/lock`, held while the returned file is open.
/// Two servers running jobs from one store would run each job twice; the second is refused.
pub fn lock_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::create_dir_all(dir)?;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("lock"))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::other(format!("{} is in use by another smelt process", dir.display()))),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

impl JobStore {
    /// Open (or create) the store in `dir` and read what it holds.
    pub fn open(dir: &Path) -> std::io::Result<Arc<JobStore>> {
        std::fs::create_dir_all(dir.join("files"))?;
        std::fs::create_dir_all(dir.join("jobs"))?;
        let mut inner = Inner { files: BTreeMap::new(), jobs: BTreeMap::new(), events: BTreeMap::new(), checkpoints: BTreeMap::new(), validating: Default::default() };
        for e in std::fs::read_dir(dir.join("files"))?.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                if let Some(f) = read_json::<FileRecord>(&p) {
                    if p.with_extension("jsonl").is_file() {
                        inner.files.insert(f.id.clone(), f);
                    }
                }
            }
        }
        for e in std::fs::read_dir(dir.join("jobs"))?.flatten() {
            let Some(job) = read_json::<Job>(&e.path().join("job.json")) else { continue };
            // A line cut short by a crash ends the log; the lines before it are kept.
            let events: Vec<Event> = std::fs::read_to_string(e.path().join("events.jsonl")).unwrap_or_default().lines().map_while(|l| serde_json::from_str(l).ok()).collect();
            let checkpoints: Vec<Checkpoint> = read_json(&e.path().join("checkpoints.json")).unwrap_or_default();
            inner.events.insert(job.id.clone(), events);
            inner.checkpoints.insert(job.id.clone(), checkpoints);
            inner.jobs.insert(job.id.clone(), job);
        }
        Ok(Arc::new(JobStore { dir: dir.to_path_buf(), inner: Mutex::new(inner), wake: Condvar::new() }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join("jobs").join(id)
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.jsonl"))
    }

    // ---- files ----

    /// Store an upload. A `fine-tune` file is checked line by line first; a bad one is refused
    /// with every bad line named.
    pub fn add_file(&self, filename: &str, purpose: &str, bytes: &[u8]) -> Result<FileRecord, StoreError> {
        if !matches!(purpose, "fine-tune" | "fine-tune-results" | "batch" | "assistants" | "user_data" | "evals" | "vision") {
            return Err(StoreError::new(ErrorKind::Invalid, format!("purpose {purpose:?} is not one of fine-tune, batch, assistants, user_data, evals, vision")).param("purpose"));
        }
        if purpose == "fine-tune" {
            let text = std::str::from_utf8(bytes).map_err(|e| StoreError::new(ErrorKind::Invalid, format!("the file is not UTF-8 text (byte {})", e.valid_up_to())).param("file"))?;
            check_file(text).map_err(|errs| StoreError::new(ErrorKind::Invalid, format!("{filename}: {}", describe(&errs, 10))).param("file"))?;
        }
        let rec = FileRecord {
            id: new_id("file-"),
            object: "file".into(),
            bytes: bytes.len() as u64,
            created_at: now(),
            filename: filename.chars().filter(|c| !c.is_control()).take(255).collect(),
            purpose: purpose.into(),
            status: "processed".into(),
            status_details: None,
            expires_at: None,
        };
        // Content first, then the record: a crash between them leaves no record of a missing file.
        write_atomic(&self.file_path(&rec.id), bytes)?;
        write_atomic(&self.file_path(&rec.id).with_extension("json"), &serde_json::to_vec_pretty(&rec).map_err(std::io::Error::other)?)?;
        self.lock().files.insert(rec.id.clone(), rec.clone());
        Ok(rec)
    }

    /// Every file, newest first.
    pub fn files(&self) -> Vec<FileRecord> {
        let mut v: Vec<FileRecord> = self.lock().files.values().cloned().collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        v
    }

    pub fn file(&self, id: &str) -> Result<FileRecord, StoreError> {
        self.lock().files.get(id).cloned().ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("No such file: {id}")).param("file_id"))
    }

    pub fn file_content(&self, id: &str) -> Result<Vec<u8>, StoreError> {
        self.file(id)?;
        Ok(std::fs::read(self.file_path(id))?)
    }

    /// Delete a file, unless a job that has not finished still needs it.
    pub fn delete_file(&self, id: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.files.contains_key(id) {
            return Err(StoreError::new(ErrorKind::NotFound, format!("No such file: {id}")).param("file_id"));
        }
        if let Some(job) = inner.jobs.values().find(|j| !j.finished() && (j.training_file == id || j.validation_file.as_deref() == Some(id))) {
            return Err(StoreError::new(ErrorKind::Conflict, format!("{id} is used by {} ({}); cancel it or wait for it to finish", job.id, job.status)));
        }
        std::fs::remove_file(self.file_path(id).with_extension("json"))?;
        let _ = std::fs::remove_file(self.file_path(id));
        inner.files.remove(id);
        Ok(())
    }

    // ---- jobs ----

    /// Record a new job (status `validating_files`); `validate` or the runner takes it on.
    pub fn create_job(&self, req: NewJob) -> Result<Job, StoreError> {
        for (param, id) in [("training_file", Some(&req.training_file)), ("validation_file", req.validation_file.as_ref())] {
            let Some(id) = id else { continue };
            let f = self.file(id).map_err(|e| StoreError { param: Some(param), ..e })?;
            if f.purpose != "fine-tune" {
                return Err(StoreError::new(ErrorKind::Invalid, format!("{id} was uploaded with purpose {:?}, not \"fine-tune\"", f.purpose)).param(param));
            }
        }
        let auto = |v: Option<Value>| v.unwrap_or_else(|| json!("auto"));
        let hyper = json!({
            "n_epochs": auto(req.n_epochs.map(|n| json!(n))),
            "batch_size": auto(req.batch_size.map(|n| json!(n))),
            "learning_rate_multiplier": auto(req.learning_rate_multiplier.map(|n| json!(n))),
        });
        let job = Job {
            id: new_id("ftjob-"),
            object: "fine_tuning.job".into(),
            model: req.model,
            created_at: now(),
            finished_at: None,
            fine_tuned_model: None,
            organization_id: "org-smelt".into(),
            result_files: Vec::new(),
            status: "validating_files".into(),
            training_file: req.training_file,
            validation_file: req.validation_file,
            method: json!({"type": "supervised", "supervised": {"hyperparameters": hyper.clone()}}),
            hyperparameters: hyper,
            trained_tokens: None,
            error: None,
            seed: req.seed.unwrap_or_else(|| now() % 2_147_483_647),
            user_provided_suffix: req.suffix,
            estimated_finish: None,
            integrations: Vec::new(),
            metadata: req.metadata,
        };
        std::fs::create_dir_all(self.job_dir(&job.id))?;
        self.save(&job)?;
        {
            let mut inner = self.lock();
            inner.jobs.insert(job.id.clone(), job.clone());
            inner.events.insert(job.id.clone(), Vec::new());
            inner.checkpoints.insert(job.id.clone(), Vec::new());
        }
        self.event(&job.id, "info", &format!("Created fine-tuning job: {}", job.id), Value::Null, "message");
        Ok(job)
    }

    fn save(&self, job: &Job) -> std::io::Result<()> {
        write_atomic(&self.job_dir(&job.id).join("job.json"), &serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?)
    }

    /// Change a job and write it down; the changed job.
    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Result<Job, StoreError> {
        let mut inner = self.lock();
        let job = inner.jobs.get_mut(id).ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("No such fine-tuning job: {id}")))?;
        f(job);
        let job = job.clone();
        self.save(&job)?;
        drop(inner);
        self.wake.notify_all();
        Ok(job)
    }

    /// Every job, newest first.
    pub fn jobs(&self) -> Vec<Job> {
        let mut v: Vec<Job> = self.lock().jobs.values().cloned().collect();
        v.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        v
    }

    pub fn job(&self, id: &str) -> Result<Job, StoreError> {
        self.lock().jobs.get(id).cloned().ok_or_else(|| StoreError::new(ErrorKind::NotFound, format!("No such fine-tuning job: {id}")).param("fine_tuning_job_id"))
    }

    /// A job's events, newest first.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        self.job(id)?;
        Ok(self.lock().events.get(id).map(|v| v.iter().rev().cloned().collect()).unwrap_or_default())
    }

    /// A job's checkpoints, newest first.
    pub fn checkpoints(&self, id: &str) -> Result<Vec<Checkpoint>, StoreError> {
        self.job(id)?;
        Ok(self.lock().checkpoints.get(id).map(|v| v.iter().rev().cloned().collect()).unwrap_or_default())
    }

    /// Append to a job's log (written before it is listed).
    fn event(&self, id: &str, level: &str, message: &str, data: Value, kind: &str) {
        let mut inner = self.lock();
        let n = inner.events.get(id).map_or(0, Vec::len);
        let ev = Event { id: format!("ftevent-{}-{n}", id.trim_start_matches("ftjob-")), object: "fine_tuning.job.event".into(), created_at: now(), level: level.into(), message: message.into(), data, kind: kind.into() };
        let line = serde_json::to_string(&ev).unwrap_or_default() + "\n";
        let written = std::fs::OpenOptions::new().create(true).append(true).open(self.job_dir(id).join("events.jsonl")).and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!("warning: cannot write an event of {id}: {e}");
        }
        inner.events.entry(id.to_string()).or_default().push(ev);
    }

    /// Cancel a job that has not finished. A running job stops before its next step.
    pub fn cancel(&self, id: &str) -> Result<Job, StoreError> {
        let job = self.job(id)?;
        if job.finished() {
            return Err(StoreError::new(ErrorKind::Invalid, format!("{id} has already {} and cannot be cancelled", job.status)));
        }
        let job = self.update(id, |j| {
            j.status = "cancelled".into();
            j.finished_at = Some(now());
        })?;
        self.event(id, "info", "Fine-tuning job cancelled", Value::Null, "message");
        Ok(job)
    }

    fn fail(&self, id: &str, code: &str, message: String, param: Option<&str>) {
        let message = message.replace('\n', " ");
        self.event(id, "error", &message, Value::Null, "message");
        let _ = self.update(id, |j| {
            j.status = "failed".into();
            j.finished_at = Some(now());
            j.error = Some(JobError { code: code.into(), message, param: param.map(String::from) });
        });
    }

    /// The adapters of finished jobs (and their checkpoints) that a restarted server serves
    /// again: (base model, model id, file).
    pub fn published(&self) -> Vec<(String, String, PathBuf)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for job in inner.jobs.values() {
            for c in inner.checkpoints.get(&job.id).into_iter().flatten() {
                let p = self.job_dir(&job.id).join(format!("ckpt-step-{}.gguf", c.step_number));
                if p.is_file() {
                    out.push((job.model.clone(), c.fine_tuned_model_checkpoint.clone(), p));
                }
            }
            if let (Some(name), "succeeded") = (&job.fine_tuned_model, job.status.as_str()) {
                out.push((job.model.clone(), name.clone(), self.job_dir(&job.id).join("adapter.gguf")));
            }
        }
        out
    }

    /// The next job to validate or run (the oldest), waiting up to `wait` for one.
    fn next_job(&self, wait: Duration) -> Option<Job> {
        let inner = self.lock();
        let pick = |inner: &Inner| inner.jobs.values().filter(|j| !j.finished() && !inner.validating.contains(&j.id)).min_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id))).cloned();
        if let Some(j) = pick(&inner) {
            return Some(j);
        }
        let (inner, _) = self.wake.wait_timeout(inner, wait).unwrap_or_else(|e| e.into_inner());
        pick(&inner)
    }

    fn cancelled(&self, id: &str) -> bool {
        self.lock().jobs.get(id).is_none_or(|j| j.status == "cancelled")
    }
}

/// The data of a job, checked against its model: (train, validation) examples, or the failure
/// to report (code, message, param).
fn load_examples(store: &JobStore, job: &Job, model: &Model, ctx: usize) -> Result<(Vec<Example>, Vec<Example>), (String, String, &'static str)> {
    let read = |id: &str, param: &'static str| -> Result<Vec<Example>, (String, String, &'static str)> {
        let bytes = store.file_content(id).map_err(|e| ("invalid_file".to_string(), e.message, param))?;
        let text = String::from_utf8_lossy(&bytes);
        crate::data::dataset(model, &text, ctx).map_err(|errs| (format!("invalid_{param}"), format!("{id}: {}", describe(&errs, 10)), param))
    };
    let train = read(&job.training_file, "training_file")?;
    let valid = match &job.validation_file {
        Some(v) => read(v, "validation_file")?,
        None => Vec::new(),
    };
    Ok((train, valid))
}

/// The run's settings from the job's hyperparameters, "auto" resolved for `n` examples.
fn config(job: &Job, n: usize) -> TuneConfig {
    let h = &job.hyperparameters;
    let epochs = h["n_epochs"].as_u64().map_or(AUTO_EPOCHS, |v| v as usize);
    // "auto": small batches for small sets, so that even a few dozen examples make enough steps.
    let batch = h["batch_size"].as_u64().map_or((n / 16).clamp(1, 8), |v| v as usize);
    let mult = h["learning_rate_multiplier"].as_f64().unwrap_or(1.0);
    let steps = epochs * n.div_ceil(batch);
    TuneConfig { epochs, lr: (BASE_LR * mult) as f32, batch_tokens: usize::MAX, batch_examples: batch, warmup: (steps / 10).min(10), seed: job.seed, ..TuneConfig::default() }
}

/// Check a new job's files against its model and queue it (or fail it, saying why).
pub fn validate(store: &JobStore, host: &dyn JobHost, id: &str) {
    let Ok(job) = store.job(id) else { return };
    if job.status != "validating_files" || !store.lock().validating.insert(id.to_string()) {
        return;
    }
    check_job(store, host, &job);
    store.lock().validating.remove(id);
    store.wake.notify_all();
}

fn check_job(store: &JobStore, host: &dyn JobHost, job: &Job) {
    let id = job.id.as_str();
    let Some((model, ctx)) = host.model(&job.model) else {
        return store.fail(id, "model_not_available", format!("the base model {} is not served here", job.model), Some("model"));
    };
    match load_examples(store, job, &model, ctx) {
        Err((code, message, param)) => store.fail(id, &code, message, Some(param)),
        Ok((train, _)) => {
            let cfg = config(job, train.len());
            let hyper = json!({"n_epochs": cfg.epochs, "batch_size": cfg.batch_examples, "learning_rate_multiplier": cfg.lr as f64 / BASE_LR});
            let r = store.update(id, |j| {
                if j.status == "validating_files" {
                    j.status = "queued".into();
                    j.method = json!({"type": "supervised", "supervised": {"hyperparameters": hyper.clone()}});
                    j.hyperparameters = hyper;
                }
            });
            if r.is_ok_and(|j| j.status == "queued") {
                store.event(id, "info", &format!("Files validated: {} training examples; job queued", train.len()), Value::Null, "message");
            }
        }
    }
}

/// Run jobs forever, one at a time, with `threads` low-priority threads (a thread of its own
/// for the loop): validate new ones, train queued ones, resume one that was running when the
/// process stopped.
pub fn run_jobs(store: Arc<JobStore>, host: Arc<dyn JobHost>, threads: usize) {
    smelt_kernels::pool::lower_this_thread_priority();
    let pool = ThreadPool::new_background(threads.max(1));
    loop {
        let Some(job) = store.next_job(Duration::from_secs(3600)) else { continue };
        match job.status.as_str() {
            "validating_files" => validate(&store, host.as_ref(), &job.id),
            _ => {
                if let Err(e) = run_one(&store, host.as_ref(), &pool, &job) {
                    store.fail(&job.id, "server_error", e, None);
                }
            }
        }
        // A job that could not even be marked failed (a full disk, say) is not retried at once.
        if store.job(&job.id).is_ok_and(|j| j.status == job.status) {
            std::thread::sleep(Duration::from_secs(5));
        }
    }
}

/// Seconds between checkpoints within an epoch (each epoch's end is one too).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

fn run_one(store: &JobStore, host: &dyn JobHost, pool: &ThreadPool, job: &Job) -> Result<(), String> {
    let id = job.id.as_str();
    let Some((model, ctx)) = host.model(&job.model) else {
        store.fail(id, "model_not_available", format!("the base model {} is not served here", job.model), Some("model"));
        return Ok(());
    };
    let (train, valid) = match load_examples(store, job, &model, ctx) {
        Ok(d) => d,
        Err((code, message, param)) => {
            store.fail(id, &code, message, Some(param));
            return Ok(());
        }
    };
    let cfg = config(job, train.len());
    let dir = store.job_dir(id);
    let ckpt = dir.join("ckpt");
    let mut trainer = Trainer::new(&model, pool, cfg, &train)?;
    let resumed = job.status == "running" && ckpt.join("state.json").is_file();
    if resumed {
        let state = Trainer::read_checkpoint(&ckpt)?;
        trainer.restore(&ckpt, &state)?;
        store.event(id, "info", &format!("Resumed from the checkpoint at step {} of {} after a restart", trainer.step, trainer.steps()), Value::Null, "message");
    } else {
        store.event(id, "info", &format!("Fine-tuning job started: {} steps over {} epochs, batch size {}", trainer.steps(), trainer.cfg.epochs, trainer.cfg.batch_examples), Value::Null, "message");
    }
    let steps = trainer.steps();
    let job = store.update(id, |j| {
        if j.status != "cancelled" {
            j.status = "running".into();
        }
    }).map_err(|e| e.message)?;
    if job.status == "cancelled" {
        return Ok(());
    }
    let ft_name = format!("ft:{}:{}:{}", job.model, job.user_provided_suffix.clone().unwrap_or_default(), id);
    let started = Instant::now();
    let (mut tokens, mut last_ckpt) = (0usize, Instant::now());
    while let Some(ev) = trainer.next_step(&train, &valid, started, &mut tokens) {
        let mut data = json!({"step": ev.step, "total_steps": ev.steps, "epoch": ev.epoch, "train_loss": ev.train_loss, "learning_rate": ev.lr, "tokens_per_second": ev.tokens_per_s});
        if let Some(v) = ev.valid_loss {
            data["valid_loss"] = json!(v);
        }
        store.event(id, "info", &format!("Step {}/{}: training loss={:.4}", ev.step, ev.steps, ev.train_loss), data, "metrics");
        if store.cancelled(id) {
            return Ok(());
        }
        let epoch_end = ev.epoch_end;
        if epoch_end || last_ckpt.elapsed() >= CHECKPOINT_EVERY {
            trainer.save_checkpoint(&ckpt, Value::Null).map_err(|e| format!("cannot write a checkpoint: {e}"))?;
            last_ckpt = Instant::now();
        }
        let _ = store.update(id, |j| j.estimated_finish = Some(now() + ev.eta_s as u64));
        if epoch_end && ev.step < ev.steps {
            // Each finished epoch but the last is a checkpoint that can be served as it is.
            let name = format!("{ft_name}:ckpt-step-{}", ev.step);
            let path = dir.join(format!("ckpt-step-{}.gguf", ev.step));
            let adapter = trainer.adapter(&name)?;
            write_atomic(&path, &adapter.to_gguf().to_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            let c = Checkpoint {
                id: format!("ftckpt-{}-{}", id.trim_start_matches("ftjob-"), ev.step),
                object: "fine_tuning.job.checkpoint".into(),
                created_at: now(),
                fine_tuned_model_checkpoint: name.clone(),
                fine_tuning_job_id: id.into(),
                metrics: json!({"step": ev.step, "train_loss": ev.train_loss, "valid_loss": ev.valid_loss, "full_valid_loss": ev.valid_loss}),
                step_number: ev.step,
            };
            {
                let mut inner = store.lock();
                let list = inner.checkpoints.entry(id.to_string()).or_default();
                list.retain(|x| x.step_number != ev.step);
                list.push(c);
                write_atomic(&dir.join("checkpoints.json"), &serde_json::to_vec_pretty(list).unwrap_or_default()).map_err(|e| format!("cannot write the checkpoint list: {e}"))?;
            }
            store.event(id, "info", &format!("Checkpoint created at step {}", ev.step), json!({"model": name}), "message");
            host.publish(&job.model, &name, adapter, &path);
        }
    }
    let adapter = trainer.adapter(&ft_name)?;
    let path = dir.join("adapter.gguf");
    write_atomic(&path, &adapter.to_gguf().to_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // The metrics of every step, as OpenAI's result file.
    let mut csv = String::from("step,train_loss,valid_loss\n");
    for (i, (t, v)) in trainer.history.iter().enumerate() {
        csv.push_str(&format!("{},{t:.6},{}\n", i + 1, v.map_or(String::new(), |v| format!("{v:.6}"))));
    }
    let results = store.add_file(&format!("{id}-results.csv"), "fine-tune-results", csv.as_bytes()).map_err(|e| e.message)?;
    let trained: usize = train.iter().map(|e| e.tokens.len()).sum::<usize>() * trainer.cfg.epochs;
    if store.cancelled(id) {
        return Ok(());
    }
    host.publish(&job.model, &ft_name, adapter, &path);
    store.update(id, |j| {
        j.status = "succeeded".into();
        j.finished_at = Some(now());
        j.fine_tuned_model = Some(ft_name.clone());
        j.trained_tokens = Some(trained as u64);
        j.result_files = vec![results.id.clone()];
        j.estimated_finish = None;
    })
    .map_err(|e| e.message)?;
    store.event(id, "info", &format!("The job has successfully completed: {ft_name} ({} steps in {:.0} s)", steps, started.elapsed().as_secs_f64()), Value::Null, "message");
    let _ = std::fs::remove_dir_all(&ckpt);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_safe() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_id("file-")).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|i| i.len() == 29 && i[5..].bytes().all(|b| b.is_ascii_hexdigit())));
    }
}
