//! Fold LoRA adapters into a copy of the base model (`smelt merge`): each adapted tensor is
//! decoded, gains `scale · alpha/rank · B·A`, and is encoded again in its own format; every
//! other tensor and all metadata are copied byte for byte. An adapter on the output projection
//! of a model whose output is tied to the token embeddings gets an output tensor of its own, so
//! the embeddings stay as they were.

use crate::arch::{Model, ModelError};
use crate::gguf::{GgufFile, GgufWriter, TensorInfo};
use crate::lora::{Adapter, LoraPair, Target};
use smelt_kernels::formats::quantize::{can_quantize, quantize_weights};
use smelt_kernels::formats::dequantize_row;
use std::path::{Path, PathBuf};

/// What a merge changed.
#[derive(Debug, Default)]
pub struct MergeStats {
    /// Tensors that gained a delta.
    pub tensors: usize,
    /// Elements of those tensors.
    pub elements: u64,
    pub bytes: u64,
}

fn invalid(msg: impl Into<String>) -> ModelError {
    ModelError::Invalid(msg.into())
}

/// A whole tensor as f32 (any format smelt reads).
fn decode(file: &GgufFile, t: &TensorInfo) -> Vec<f32> {
    let mut out = vec![0f32; t.n_elements() as usize];
    dequantize_row(t.dtype, file.tensor_data(t), &mut out);
    out
}

/// One adapter's factors for one tensor: A [rank × in], B [out × rank], and the factor.
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    factor: f32,
}

/// The pair of `adapter` that adapts the base tensor `name`, if any.
fn pair_of<'a>(adapter: &'a Adapter, name: &str) -> Option<&'a LoraPair> {
    if name == "output.weight" {
        return adapter.output.as_ref();
    }
    let (il, rest) = name.strip_prefix("blk.")?.split_once('.')?;
    let t = Target::ALL.into_iter().find(|t| rest.strip_suffix(".weight") == Some(t.tensor()))?;
    adapter.pair(il.parse().ok()?, t)
}

fn factors(adapter: &Adapter, name: &str, scale: f32) -> Option<Factors> {
    let p = pair_of(adapter, name)?;
    Some(Factors { a: p.a.to_f32(), b: p.bt.b().to_f32(), rank: p.rank(), factor: scale * p.factor })
}

/// `w` [rows × cols] += Σ over adapters of factor · B · A.
fn add_deltas(w: &mut [f32], cols: usize, deltas: &[Factors]) {
    for f in deltas {
        for (o, row) in w.chunks_exact_mut(cols).enumerate() {
            for r in 0..f.rank {
                let c = f.factor * f.b[o * f.rank + r];
                if c != 0.0 {
                    for (x, a) in row.iter_mut().zip(&f.a[r * cols..(r + 1) * cols]) {
                        *x += c * a;
                    }
                }
            }
        }
    }
}

/// Write `base` with `adapters` (file, scale) folded in to `out`. `progress` is called with
/// (tensors done, tensors in all).
pub fn merge(base: &Path, adapters: &[(PathBuf, f32)], out: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<MergeStats, ModelError> {
    let model = Model::load(base)?;
    let file = GgufFile::open(base).map_err(|e| invalid(format!("{}: {e}", base.display())))?;
    let mut loaded = Vec::new();
    for (path, scale) in adapters {
        if !scale.is_finite() {
            return Err(invalid(format!("{}: the scale {scale} is not finite", path.display())));
        }
        // Loaded as for serving: architecture, names and shapes checked.
        loaded.push((Adapter::load(path, &model, "merge")?, *scale));
    }
    let h = &file.header;
    let mut w = GgufWriter::default();
    for (k, v) in &h.metadata {
        // The writer lays tensors out at its own alignment.
        if k != "general.alignment" {
            w.kv(k, v.clone());
        }
    }
    let tied_output = h.tensor("output.weight").is_none() && loaded.iter().any(|(a, _)| a.output.is_some());
    let total = h.tensors.len() + tied_output as usize;
    let mut stats = MergeStats::default();
    let emit = |name: &str, t: &TensorInfo, w: &mut GgufWriter, stats: &mut MergeStats| -> Result<(), ModelError> {
        let deltas: Vec<Factors> = loaded.iter().filter_map(|(a, s)| factors(a, name, *s)).collect();
        if deltas.is_empty() {
            w.tensor(name, &t.dims, t.dtype, file.tensor_data(t).to_vec());
            return Ok(());
        }
        if !can_quantize(t.dtype) {
            return Err(invalid(format!("{name} is {}, a format smelt cannot write yet; merge into a model in Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16, BF16 or F32", t.dtype)));
        }
        let cols = t.dims[0] as usize;
        let mut values = decode(&file, t);
        add_deltas(&mut values, cols, &deltas);
        let mut bytes = vec![0u8; values.len() / t.dtype.block_len() * t.dtype.block_bytes()];
        quantize_weights(t.dtype, &values, &mut bytes);
        stats.tensors += 1;
        stats.elements += values.len() as u64;
        stats.bytes += bytes.len() as u64;
        w.tensor(name, &t.dims, t.dtype, bytes);
        Ok(())
    };
    for (i, t) in h.tensors.iter().enumerate() {
        emit(&t.name, t, &mut w, &mut stats)?;
        progress(i + 1, total);
    }
    if tied_output {
        let embd = h.tensor("token_embd.weight").ok_or_else(|| invalid("the base model has no token_embd.weight"))?;
        emit("output.weight", embd, &mut w, &mut stats)?;
        progress(total, total);
    }
    let tmp = out.with_extension("gguf.tmp");
    std::fs::write(&tmp, w.to_bytes()).and_then(|()| std::fs::rename(&tmp, out)).map_err(|e| invalid(format!("cannot write {}: {e}", out.display())))?;
    Ok(stats)
}
