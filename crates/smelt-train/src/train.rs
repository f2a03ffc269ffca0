//! The training loop: examples packed into steps of about `batch_tokens` tokens, AdamW on the
//! LoRA factors with linear warmup and decay, gradient-norm clipping, validation loss, and
//! checkpoints (factors, optimizer state, position in the data plan) from which a run resumes
//! and reproduces the uninterrupted run's losses exactly.

use crate::model::{forward_backward, Dropout, Example, Frozens, Lora};
use serde::{Deserialize, Serialize};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::lora::{Adapter, Target};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Hyperparameters of a run (saved in checkpoints).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TuneConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Projections to adapt: q, k, v, o, gate, up, down.
    pub targets: Vec<String>,
    pub epochs: usize,
    pub lr: f32,
    /// Tokens per optimizer step (examples are packed until they reach it; at least one).
    pub batch_tokens: usize,
    /// Examples per optimizer step instead, when not 0 (OpenAI's `batch_size`).
    #[serde(default)]
    pub batch_examples: usize,
    /// Steps of linear warmup; the learning rate then decays linearly to 0.
    pub warmup: usize,
    pub weight_decay: f32,
    pub seed: u64,
    /// Gradients with a larger global norm are scaled down to it (0: no clipping).
    pub clip: f32,
    /// Recompute each layer's activations in the backward pass instead of keeping them
    /// (less memory, about a third more compute, the same results).
    #[serde(default)]
    pub recompute: bool,
}

impl Default for TuneConfig {
    fn default() -> TuneConfig {
        TuneConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec(),
            epochs: 3,
            lr: 2e-4,
            batch_tokens: 2048,
            batch_examples: 0,
            warmup: 10,
            weight_decay: 0.0,
            seed: 42,
            clip: 1.0,
            recompute: false,
        }
    }
}

impl TuneConfig {
    pub fn parse_targets(&self) -> Result<Vec<Target>, String> {
        self.targets
            .iter()
            .map(|s| Target::ALL.into_iter().find(|t| t.short() == s.trim()).ok_or_else(|| format!("unknown target {s:?} (q, k, v, o, gate, up, down)")))
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        let t = self.parse_targets()?;
        if t.is_empty() {
            return Err("no targets".into());
        }
        if self.rank == 0 || self.rank > 1024 {
            return Err(format!("--rank must be 1 to 1024, got {}", self.rank));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("--dropout must be in [0, 1), got {}", self.dropout));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("--lr must be positive, got {}", self.lr));
        }
        if self.epochs == 0 || self.batch_tokens == 0 {
            return Err("--epochs and --batch-tokens must be at least 1".into());
        }
        if !self.alpha.is_finite() || !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err("--alpha and --weight-decay must be finite (and the decay not negative)".into());
        }
        Ok(())
    }
}

/// What the loop reports after each step.
#[derive(Clone, Debug, Serialize)]
pub struct StepEvent {
    pub step: usize,
    pub steps: usize,
    pub epoch: usize,
    pub epochs: usize,
    /// Mean loss per trained token of this step.
    pub train_loss: f64,
    /// Mean validation loss, when this step ended an epoch (or the run) and there is a
    /// validation set.
    pub valid_loss: Option<f64>,
    /// This step was the last of its epoch.
    pub epoch_end: bool,
    pub lr: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
}

/// xorshift64*, for the data order.
fn shuffle(n: usize, seed: u64) -> Vec<usize> {
    let mut s = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    v
}

/// The examples of every step of the run, epoch by epoch: each epoch's order shuffled from the
/// seed, packed into steps of about `batch_tokens` tokens (or of `batch_examples` examples).
/// Deterministic, so a resumed run finds its place.
pub fn plan(examples: &[Example], cfg: &TuneConfig) -> Vec<(usize, Vec<usize>)> {
    let mut steps = Vec::new();
    for epoch in 0..cfg.epochs {
        let order = shuffle(examples.len(), cfg.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9));
        let mut cur: Vec<usize> = Vec::new();
        let mut tokens = 0;
        for i in order {
            let full = match cfg.batch_examples {
                0 => tokens + examples[i].tokens.len() > cfg.batch_tokens,
                n => cur.len() >= n,
            };
            if !cur.is_empty() && full {
                steps.push((epoch, std::mem::take(&mut cur)));
                tokens = 0;
            }
            tokens += examples[i].tokens.len();
            cur.push(i);
        }
        if !cur.is_empty() {
            steps.push((epoch, cur));
        }
    }
    steps
}

/// A run in progress: the factors, AdamW's moments and how far the plan has gone.
pub struct Trainer<'m> {
    pub model: &'m Model,
    pub cfg: TuneConfig,
    frozen: Frozens,
    pool: &'m ThreadPool,
    pub lora: Lora<f32>,
    m: Lora<f32>,
    v: Lora<f32>,
    /// Steps done.
    pub step: usize,
    plan: Vec<(usize, Vec<usize>)>,
    /// Per step done: its train loss (and validation loss, where measured).
    pub history: Vec<(f64, Option<f64>)>,
}

/// What a checkpoint's `state.json` holds besides the numbers in `params.bin`.
#[derive(Serialize, Deserialize)]
pub struct CheckpointState {
    pub cfg: TuneConfig,
    pub step: usize,
    pub history: Vec<(f64, Option<f64>)>,
    /// Whatever the caller needs to restart the run (the CLI keeps its arguments here).
    pub extra: serde_json::Value,
}

impl<'m> Trainer<'m> {
    pub fn new(model: &'m Model, pool: &'m ThreadPool, cfg: TuneConfig, train: &[Example]) -> Result<Trainer<'m>, String> {
        cfg.validate()?;
        let targets = cfg.parse_targets()?;
        // A ~ U(-1/√in, 1/√in) (as PEFT's default Kaiming-uniform with a = √5 gives), B = 0.
        let mut s = cfg.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let lora = Lora::new(model, cfg.rank, cfg.alpha, &targets, |inp| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) / (inp as f32).sqrt()
        });
        let (m, v) = (lora.zeros_like(), lora.zeros_like());
        let plan = plan(train, &cfg);
        let mut frozen = Frozens::new(model, true);
        frozen.recompute = cfg.recompute;
        Ok(Trainer { model, cfg, frozen, pool, lora, m, v, step: 0, plan, history: Vec::new() })
    }

    pub fn steps(&self) -> usize {
        self.plan.len()
    }

    /// Bytes held for training besides the model: the transposed weights, the factors and
    /// AdamW's two moments.
    pub fn extra_bytes(&self) -> usize {
        self.frozen.extra_bytes() + 3 * 4 * self.lora.len()
    }

    fn lr_at(&self, step: usize) -> f64 {
        let (lr, w, n) = (self.cfg.lr as f64, self.cfg.warmup, self.plan.len());
        if step < w {
            lr * (step + 1) as f64 / w as f64
        } else {
            lr * (n - step) as f64 / (n - w).max(1) as f64
        }
    }

    /// Mean loss per trained token over `examples` (no gradients).
    pub fn evaluate(&self, examples: &[Example]) -> f64 {
        let (mut loss, mut count) = (0.0, 0);
        for ex in examples {
            loss += forward_backward(self.model, &self.frozen, self.pool, &self.lora, ex, 1.0, None, None);
            count += ex.counted();
        }
        loss / count.max(1) as f64
    }

    /// Run the next step of the plan; None when the run is done.
    pub fn next_step(&mut self, train: &[Example], valid: &[Example], started: Instant, tokens_before: &mut usize) -> Option<StepEvent> {
        let (epoch, idx) = self.plan.get(self.step)?.clone();
        let counted: usize = idx.iter().map(|&i| train[i].counted()).sum();
        let weight = 1.0 / counted.max(1) as f32;
        let mut grad = self.lora.zeros_like();
        let mut loss = 0.0;
        for (k, &i) in idx.iter().enumerate() {
            let dropout = (self.cfg.dropout > 0.0).then(|| Dropout { p: self.cfg.dropout, seed: self.cfg.seed ^ ((self.step as u64) << 20) ^ k as u64 });
            loss += forward_backward(self.model, &self.frozen, self.pool, &self.lora, &train[i], weight, dropout, Some(&mut grad));
        }
        // Clip the global norm, then AdamW.
        let norm = grad.values().map(|g| (*g as f64) * (*g as f64)).sum::<f64>().sqrt();
        let clip = if self.cfg.clip > 0.0 && norm > self.cfg.clip as f64 { (self.cfg.clip as f64 / norm) as f32 } else { 1.0 };
        let lr = self.lr_at(self.step);
        let t = (self.step + 1) as i32;
        let (b1, b2, eps, wd) = (0.9f32, 0.999f32, 1e-8f32, self.cfg.weight_decay);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (((p, g), m), v) in self.lora.values_mut().zip(grad.values()).zip(self.m.values_mut()).zip(self.v.values_mut()) {
            let g = g * clip;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            let update = (*m / c1) / ((*v / c2).sqrt() + eps) + wd * *p;
            *p -= lr as f32 * update;
        }
        self.step += 1;
        let tokens: usize = idx.iter().map(|&i| train[i].tokens.len()).sum();
        *tokens_before += tokens;
        let last_of_epoch = self.plan.get(self.step).is_none_or(|(e, _)| *e != epoch);
        let valid_loss = (last_of_epoch && !valid.is_empty()).then(|| self.evaluate(valid));
        let train_loss = loss / counted.max(1) as f64;
        self.history.push((train_loss, valid_loss));
        let elapsed = started.elapsed().as_secs_f64();
        let rate = *tokens_before as f64 / elapsed.max(1e-9);
        let left: usize = self.plan[self.step..].iter().flat_map(|(_, ix)| ix.iter().map(|&i| train[i].tokens.len())).sum();
        Some(StepEvent { step: self.step, steps: self.plan.len(), epoch: epoch + 1, epochs: self.cfg.epochs, train_loss, valid_loss, epoch_end: last_of_epoch, lr, tokens, tokens_per_s: rate, elapsed_s: elapsed, eta_s: left as f64 / rate.max(1e-9) })
    }

    /// The factors as an adapter (f32), named `name`.
    pub fn adapter(&self, name: &str) -> Result<Adapter, String> {
        let layers = self.lora.layers.iter().map(|l| l.clone().map(|p| p.map(|p| (p.a, p.b)))).collect();
        Adapter::from_factors(self.model, name, self.cfg.alpha, self.cfg.rank, layers).map_err(|e| e.to_string())
    }

    /// Write a checkpoint to `dir` (created): `params.bin` (factors, then AdamW's moments, f32
    /// little-endian) and `state.json`, each written to a temporary file and renamed over the
    /// old one, the state last, so a run killed at any moment leaves the previous checkpoint or
    /// the new one.
    pub fn save_checkpoint(&self, dir: &Path, extra: serde_json::Value) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut bytes = Vec::with_capacity(12 * self.lora.len());
        for l in [&self.lora, &self.m, &self.v] {
            for v in l.values() {
                bytes.extend(v.to_le_bytes());
            }
        }
        let params = format!("params-{}.bin", self.step);
        write_atomic(&dir.join(&params), &bytes)?;
        let state = CheckpointState { cfg: self.cfg.clone(), step: self.step, history: self.history.clone(), extra: serde_json::json!({"params": params, "caller": extra}) };
        write_atomic(&dir.join("state.json"), serde_json::to_string_pretty(&state).map_err(std::io::Error::other)?.as_bytes())?;
        // Older parameter files are no longer referenced.
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("params-") && name != params {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// The state of the checkpoint in `dir`, to rebuild the run with.
    pub fn read_checkpoint(dir: &Path) -> Result<CheckpointState, String> {
        let text = std::fs::read_to_string(dir.join("state.json")).map_err(|e| format!("{}: {e}", dir.join("state.json").display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", dir.join("state.json").display()))
    }

    /// Continue from the checkpoint in `dir` (made by a run with the same model and data).
    pub fn restore(&mut self, dir: &Path, state: &CheckpointState) -> Result<(), String> {
        let name = state.extra["params"].as_str().ok_or("state.json names no parameter file")?;
        let path: PathBuf = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let n = self.lora.len();
        if bytes.len() != 12 * n || state.cfg != self.cfg {
            return Err(format!("{} does not match this run (another model, or other settings)", path.display()));
        }
        let mut vals = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for l in [&mut self.lora, &mut self.m, &mut self.v] {
            for (dst, src) in l.values_mut().zip(vals.by_ref()) {
                *dst = src;
            }
        }
        if state.step > self.plan.len() {
            return Err(format!("the checkpoint is at step {} of a plan of {}", state.step, self.plan.len()));
        }
        self.step = state.step;
        self.history = state.history.clone();
        Ok(())
    }
}

/// Write `bytes` to a temporary file, sync it and rename it over `path`: a crash leaves the old
/// file or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
