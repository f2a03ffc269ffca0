//! Test support: locating the public reference models and the golden fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

/// The two public models the golden fixtures were recorded with, by their store names.
pub const GEMMA: &str = "gemma-3-270m";
pub const QWEN: &str = "qwen2.5-coder-0.5b-instruct";

/// Path of a model in the local store (`$SMELT_HOME/models/NAME.gguf`, default `~/.cache/smelt`).
/// The store is filled by `smelt pull NAME` (`.ci/run` does it); a missing model fails the test.
pub fn store_model(name: &str) -> PathBuf {
    let home = std::env::var_os("SMELT_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/smelt"));
    let p = home.join("models").join(format!("{name}.gguf"));
    assert!(p.exists(), "model {name} is not in the store ({}); run `cargo run --release -p smelt -- pull {name}`", p.display());
    p
}

pub fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(rel)
}

pub fn jsonl(rel: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(data(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use std::sync::Arc;

/// Log-softmax of one logits row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32 + max;
    logits.iter().map(|&l| l - lse).collect()
}

/// Teacher forcing: run `prompt + outputs[..k]` and return the log-probabilities at each of the
/// `outputs.len()` generated positions.
pub fn teacher_forced(model: &Model, ws: &mut Workspace, prompt: &[u32], outputs: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    let mut seq: Vec<u32> = prompt.to_vec();
    seq.extend_from_slice(&outputs[..outputs.len() - 1]);
    let mut caches = vec![model.new_cache(seq.len() + 1, chunk)];
    let first = prompt.len() - 1;
    let mut out = Vec::new();
    for (c, toks) in seq.chunks(chunk).enumerate() {
        let batch: Vec<BatchToken> = toks
            .iter()
            .enumerate()
            .map(|(i, &token)| {
                let pos = c * chunk + i;
                BatchToken { token, pos, seq: 0, logits: pos >= first }
            })
            .collect();
        let logits = model.forward(&batch, &mut caches, ws).unwrap();
        for row in logits.chunks_exact(model.hp.n_vocab) {
            out.push(log_softmax(row));
        }
    }
    assert_eq!(out.len(), outputs.len());
    out
}

pub fn workspace() -> Workspace {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Workspace::new(Arc::new(ThreadPool::new(threads)))
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Argmax agreement and quantiles of |Δ logprob| between two sets of per-step results.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub agreement: f64,
    pub median: f64,
    pub p95: f64,
    pub max: f64,
    pub steps: usize,
}

impl Spread {
    /// `pairs`: (argmax equal?, |Δ logprob|) per step.
    pub fn from_pairs(pairs: &[(bool, f64)]) -> Spread {
        let mut d: Vec<f64> = pairs.iter().map(|p| p.1).collect();
        d.sort_by(f64::total_cmp);
        let q = |f: f64| d[((d.len() - 1) as f64 * f).round() as usize];
        Spread {
            agreement: pairs.iter().filter(|p| p.0).count() as f64 / pairs.len() as f64,
            median: q(0.5),
            p95: q(0.95),
            max: *d.last().unwrap(),
            steps: pairs.len(),
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "agreement {:.1}%  |Δlogprob| median {:.4}  p95 {:.4}  max {:.4}  ({} steps)", self.agreement * 100.0, self.median, self.p95, self.max, self.steps)
    }
}
