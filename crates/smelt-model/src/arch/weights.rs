//! Weight tensors: shape-checked views into the memory-mapped file.

use super::{ArchSpec, Hparams, ModelError};
use crate::gguf::GgufFile;
use smelt_kernels::dispatch::kernels;
use smelt_kernels::formats::{dequantize_row, grouped, DType};
use smelt_kernels::mmap::AnonymousBuffer;
use smelt_kernels::ops::Matrix;
use std::sync::Arc;

/// A weight matrix of `rows` output features × `cols` input features, in any format. Every
/// matrix multiply in the model goes through one of these (see `blocks::Block::linear`).
#[derive(Clone)]
pub struct Linear {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    offset: usize,
    file: Arc<GgufFile>,
    /// The weights rewritten in a grouped layout at load (see [`Linear::regroup`]), when they were.
    regrouped: Option<Arc<AnonymousBuffer>>,
}

impl Linear {
    /// Load a 2-D tensor with `cols` inputs; `rows` is checked when given.
    pub fn load(file: &Arc<GgufFile>, name: &str, cols: usize, rows: Option<usize>) -> Result<Linear, ModelError> {
        let t = file.header.tensor(name).ok_or_else(|| ModelError::Invalid(format!("tensor {name:?} is missing")))?;
        let dims = &t.dims;
        let (c, r) = match dims.as_slice() {
            [c, r] => (*c as usize, *r as usize),
            [c, r, 1] | [c, r, 1, 1] => (*c as usize, *r as usize),
            _ => return Err(ModelError::Invalid(format!("tensor {name:?} has shape {dims:?}, expected 2 dimensions"))),
        };
        if c != cols || rows.is_some_and(|want| want != r) {
            let want = match rows {
                Some(rw) => format!("[{cols}, {rw}]"),
                None => format!("[{cols}, *]"),
            };
            return Err(ModelError::Invalid(format!("tensor {name:?} has shape {dims:?}, expected {want}")));
        }
        let offset = t.offset as usize;
        Ok(Linear { name: name.to_string(), dtype: t.dtype, rows: r, cols: c, offset, file: file.clone(), regrouped: None })
    }

    pub fn matrix(&self) -> Matrix<'_> {
        let data = match &self.regrouped {
            Some(buf) => &buf.bytes()[..self.bytes()],
            None => self.file.slice(self.offset, self.bytes()),
        };
        Matrix::new(self.dtype, self.rows, self.cols, data)
    }

    /// Rewrite the matrix in its format's grouped layout (`formats::grouped`: the same bytes,
    /// ordered as the group kernels use them) when this CPU's group kernels take that layout,
    /// and release the file's pages of it, so the resident set stays the file's size. Products
    /// give bitwise the same results either way; decoding reads Q4_0/Q5_0 weights ~1.5× faster
    /// from cache (see PERF.md).
    pub fn regroup(&mut self) {
        let Some(to) = grouped::grouped(self.dtype) else { return };
        if self.regrouped.is_some() || !kernels().group_usable(to, self.cols) {
            return;
        }
        let src = self.file.slice(self.offset, self.bytes());
        // Without memory for the copy, the matrix simply stays in the file's layout.
        let Ok(mut buf) = AnonymousBuffer::new(src.len()) else { return };
        let dst = &mut buf.bytes_mut()[..src.len()];
        // Whole rows per thread (rows are whole groups: `group_usable` checked the width), in
        // slices of ~4 MB whose file pages are released as soon as they are copied, so the
        // resident set never holds both copies of a large matrix.
        let rb = self.dtype.row_bytes(self.cols).unwrap_or(0).max(1);
        let threads = load_threads();
        let per = self.rows.div_ceil(threads).max(1) * rb;
        let slice = ((4 << 20) / rb).max(1) * rb;
        let (from, file, base) = (self.dtype, &self.file, self.offset);
        let copy = |start: usize, src: &[u8], dst: &mut [u8]| {
            for (i, (s, d)) in src.chunks(slice).zip(dst.chunks_mut(slice)).enumerate() {
                grouped::group_blocks(from, s, d);
                file.release(base + start + i * slice, s.len());
            }
        };
        if threads == 1 || src.len() < (4 << 20) {
            copy(0, src, dst);
        } else {
            std::thread::scope(|s| {
                for (i, (d, sr)) in dst.chunks_mut(per).zip(src.chunks(per)).enumerate() {
                    s.spawn(move || copy(i * per, sr, d));
                }
            });
        }
        self.regrouped = Some(Arc::new(buf));
        self.dtype = to;
    }

    /// Whether [`Linear::regroup`] rewrote this matrix.
    pub fn is_regrouped(&self) -> bool {
        self.regrouped.is_some()
    }

    pub fn bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0) * self.rows
    }

    /// Decode one row (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let m = self.matrix();
        dequantize_row(self.dtype, m.row(r), &mut out[..self.cols]);
    }
}

/// Threads for rewriting weights at load (all cores, up to 8).
pub(crate) fn load_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// A 1-D F32/F16 tensor of `n` elements, decoded to f32.
pub fn vector(file: &GgufFile, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
    let t = file.header.tensor(name).ok_or_else(|| ModelError::Invalid(format!("tensor {name:?} is missing")))?;
    if t.n_elements() != n as u64 {
        return Err(ModelError::Invalid(format!("tensor {name:?} has shape {:?}, expected [{n}]", t.dims)));
    }
    let mut out = vec![0f32; n];
    dequantize_row(t.dtype, file.tensor_data(t), &mut out);
    Ok(out)
}

fn optional_vector(file: &GgufFile, name: &str, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
    if file.header.tensor(name).is_some() {
        vector(file, name, n).map(Some)
    } else {
        Ok(None)
    }
}

/// One transformer block's weights. Shapes: E = n_embd, D = head_dim, H / Hkv = heads, F = n_ff.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,            // [E]
    pub wq: Linear,                     // [E] -> [H*D]
    pub wk: Linear,                     // [E] -> [Hkv*D]
    pub wv: Linear,                     // [E] -> [Hkv*D]
    pub wo: Linear,                     // [H*D] -> [E]
    pub bq: Option<Vec<f32>>,           // [H*D]
    pub bk: Option<Vec<f32>>,           // [Hkv*D]
    pub bv: Option<Vec<f32>>,           // [Hkv*D]
    pub q_norm: Option<Vec<f32>>,       // [D]
    pub k_norm: Option<Vec<f32>>,       // [D]
    pub post_attn_norm: Option<Vec<f32>>, // [E]
    pub ffn_norm: Vec<f32>,             // [E]
    pub gate: Linear,                   // [E] -> [F]
    pub up: Linear,                     // [E] -> [F]
    pub down: Linear,                   // [F] -> [E]
    pub post_ffn_norm: Option<Vec<f32>>, // [E]
}

impl LayerWeights {
    pub fn load(file: &Arc<GgufFile>, il: usize, hp: &Hparams, spec: &ArchSpec) -> Result<LayerWeights, ModelError> {
        let n = |s: &str| format!("blk.{il}.{s}");
        let (e, d, f) = (hp.n_embd, hp.head_dim, hp.n_ff);
        let (q_out, kv_out) = (hp.n_head * d, hp.n_head_kv * d);
        let required = |name: &str, v: Option<Vec<f32>>| v.ok_or_else(|| ModelError::Invalid(format!("tensor {name:?} is missing")));
        let bias = |s: &str, len: usize| -> Result<Option<Vec<f32>>, ModelError> {
            let v = optional_vector(file, &n(s), len)?;
            if spec.qkv_bias { required(&n(s), v).map(Some) } else { Ok(v) }
        };
        let (q_norm, k_norm) = if spec.qk_norm {
            (Some(vector(file, &n("attn_q_norm.weight"), d)?), Some(vector(file, &n("attn_k_norm.weight"), d)?))
        } else {
            (None, None)
        };
        let (post_attn_norm, post_ffn_norm) = if spec.post_norms {
            (Some(vector(file, &n("post_attention_norm.weight"), e)?), Some(vector(file, &n("post_ffw_norm.weight"), e)?))
        } else {
            (None, None)
        };
        Ok(LayerWeights {
            attn_norm: vector(file, &n("attn_norm.weight"), e)?,
            wq: Linear::load(file, &n("attn_q.weight"), e, Some(q_out))?,
            wk: Linear::load(file, &n("attn_k.weight"), e, Some(kv_out))?,
            wv: Linear::load(file, &n("attn_v.weight"), e, Some(kv_out))?,
            wo: Linear::load(file, &n("attn_output.weight"), q_out, Some(e))?,
            bq: bias("attn_q.bias", q_out)?,
            bk: bias("attn_k.bias", kv_out)?,
            bv: bias("attn_v.bias", kv_out)?,
            q_norm,
            k_norm,
            post_attn_norm,
            ffn_norm: vector(file, &n("ffn_norm.weight"), e)?,
            gate: Linear::load(file, &n("ffn_gate.weight"), e, Some(f))?,
            up: Linear::load(file, &n("ffn_up.weight"), e, Some(f))?,
            down: Linear::load(file, &n("ffn_down.weight"), f, Some(e))?,
            post_ffn_norm,
        })
    }

    /// [`Linear::regroup`] every matrix of the layer.
    pub fn regroup(&mut self) {
        for m in [&mut self.wq, &mut self.wk, &mut self.wv, &mut self.wo, &mut self.gate, &mut self.up, &mut self.down] {
            m.regroup();
        }
    }

    /// The layer's weight matrices.
    pub fn matrices(&self) -> [&Linear; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down]
    }

    pub fn matrix_bytes(&self) -> usize {
        self.matrices().iter().map(|l| l.bytes()).sum()
    }
}
