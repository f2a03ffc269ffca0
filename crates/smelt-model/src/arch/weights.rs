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
    /// The weights rewritten in a grouped layout at load (see [`regroup`]), when they were: a
    /// buffer shared by all the rewritten matrices, and where this one starts in it.
    regrouped: Option<(Arc<AnonymousBuffer>, usize)>,
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
            Some((buf, at)) => &buf.bytes()[*at..*at + self.bytes()],
            None => self.file.slice(self.offset, self.bytes()),
        };
        Matrix::new(self.dtype, self.rows, self.cols, data)
    }

    /// The grouped layout [`regroup`] rewrites this matrix in, if any: its format has one and
    /// this CPU's group kernels take it at this width.
    fn grouped_target(&self) -> Option<DType> {
        let to = grouped::grouped(self.dtype)?;
        (self.regrouped.is_none() && kernels().group_usable(to, self.cols)).then_some(to)
    }

    /// Whether [`regroup`] rewrote this matrix.
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
fn load_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// Rewrite every matrix that has a grouped layout (`formats::grouped`: the same bytes, ordered as
/// the group kernels use them; products give bitwise the same results, and decoding reads
/// Q4_0/Q5_0 weights ~1.5× faster from cache, see PERF.md) into one buffer of anonymous memory,
/// and release the file's pages of them, so the resident set stays the file's size. One buffer
/// in huge pages rather than one mapping per matrix: most matrices are a few MB or less, and
/// the TLB misses of 4 KiB pages cost decoding ~7% (PERF.md, item 20).
pub fn regroup(matrices: Vec<&mut Linear>) {
    let plan: Vec<(&mut Linear, DType)> = matrices.into_iter().filter_map(|m| m.grouped_target().map(|to| (m, to))).collect();
    // Each matrix starts on a cache line.
    let total: usize = plan.iter().map(|(m, _)| m.bytes().next_multiple_of(64)).sum();
    if total == 0 {
        return;
    }
    // Without memory for the copy, the matrices simply stay in the file's layout.
    let Ok(mut buf) = AnonymousBuffer::new(total) else { return };
    // Copy jobs of whole rows, up to ~4 MB each, whose file pages are released as soon as they
    // are copied (the resident set never holds both copies of a large matrix), spread over the
    // threads largest first.
    struct Job<'a> {
        from: DType,
        file: &'a GgufFile,
        offset: usize,
        src: &'a [u8],
        dst: &'a mut [u8],
    }
    let mut jobs = Vec::new();
    let mut starts = Vec::with_capacity(plan.len());
    let (mut rest, mut at) = (buf.bytes_mut(), 0);
    for (m, _) in &plan {
        let len = m.bytes();
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(len.next_multiple_of(64));
        rest = tail;
        starts.push(at);
        at += dst.len();
        let rb = m.dtype.row_bytes(m.cols).unwrap_or(0).max(1);
        let slice = ((4 << 20) / rb).max(1) * rb;
        let src = m.file.slice(m.offset, len);
        for (i, (s, d)) in src.chunks(slice).zip(dst[..len].chunks_mut(slice)).enumerate() {
            jobs.push(Job { from: m.dtype, file: &m.file, offset: m.offset + i * slice, src: s, dst: d });
        }
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.src.len()));
    let threads = load_threads();
    let mut per_thread: Vec<(usize, Vec<Job>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for job in jobs {
        let least = per_thread.iter_mut().min_by_key(|(bytes, _)| *bytes).expect("at least one thread");
        least.0 += job.src.len();
        least.1.push(job);
    }
    let run = |jobs: Vec<Job>| {
        for j in jobs {
            grouped::group_blocks(j.from, j.src, j.dst);
            j.file.release(j.offset, j.src.len());
        }
    };
    std::thread::scope(|s| {
        for (_, jobs) in per_thread {
            s.spawn(|| run(jobs));
        }
    });
    let buf = Arc::new(buf);
    for ((m, to), at) in plan.into_iter().zip(starts) {
        m.regrouped = Some((buf.clone(), at));
        m.dtype = to;
    }
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

    /// The layer's weight matrices, to rewrite ([`regroup`]).
    pub fn matrices_mut(&mut self) -> [&mut Linear; 7] {
        [&mut self.wq, &mut self.wk, &mut self.wv, &mut self.wo, &mut self.gate, &mut self.up, &mut self.down]
    }

    /// The layer's weight matrices.
    pub fn matrices(&self) -> [&Linear; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down]
    }

    pub fn matrix_bytes(&self) -> usize {
        self.matrices().iter().map(|l| l.bytes()).sum()
    }
}
