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
