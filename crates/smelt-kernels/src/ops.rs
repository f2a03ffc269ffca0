//! The compute interface the model code uses: matrix products over quantized weights and the
//! small f32 operations around them. Everything a forward pass computes goes through these
//! functions, so another backend (GPU) can replace them behind the same signatures.

use crate::kv::KvRows;
use crate::dispatch::kernels;
use crate::formats::{dequantize_row, DType};
use crate::pool::ThreadPool;

/// A weight matrix of `rows` × `cols` elements (row-major, each row `cols` elements of `dtype`).
/// GGUF stores an [in, out] tensor as `out` rows of `in` elements, so `rows` = output features.
#[derive(Clone, Copy, Debug)]
pub struct Matrix<'a> {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> Matrix<'a> {
    pub fn new(dtype: DType, rows: usize, cols: usize, data: &'a [u8]) -> Matrix<'a> {
        let rb = dtype.row_bytes(cols).expect("row length must be whole blocks");
        assert!(data.len() >= rb * rows, "matrix data too short");
        Matrix { dtype, rows, cols, data }
    }

    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.cols).unwrap_or(0)
    }

    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Decode row `r` into f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize_row(self.dtype, self.row(r), &mut out[..self.cols]);
    }
}

/// A raw pointer that may be shared across the pool's threads for disjoint writes.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint indices, each by one thread, while the owner waits.
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

/// Rows of weights each work item covers: enough to amortize scheduling, small enough to balance.
const ROW_CHUNK: usize = 32;

/// Rows of the shortest piece of a decoding product's part (`ThreadPool::for_parts`): 16 KiB
/// of weights, so threads finish within about that much reading of each other.
fn decode_piece_rows(row_bytes: usize) -> usize {
    ((16 << 10) / row_bytes.max(1)).max(1)
}

/// out[t * w.rows + r] = w.row(r) · x[t], for `n` activation rows `x` of `w.cols` floats.
/// The activations are quantized once (to Q8_0 for the group kernels, else to the weight's
/// `vec_dot_type`), so the inner loop is an
/// integer dot product; `scratch` holds them (grown as needed, reused across calls).
pub fn matmul(pool: &ThreadPool, w: &Matrix, x: &[f32], n: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
    matmul_fused(pool, [w], x, n, [out], scratch)
}

/// [`matmul`] of several matrices with the same input (a layer's Q, K and V projections, or
/// its gate and up projections) as one job: the activations are quantized once and the threads
/// share one queue of row ranges over all the matrices, so small matrices cost one
/// synchronization between them instead of one each. Every output is exactly what `matmul`
/// gives for that matrix alone.
pub fn matmul_fused<const N: usize>(pool: &ThreadPool, ws: [&Matrix; N], x: &[f32], n: usize, outs: [&mut [f32]; N], scratch: &mut Vec<u8>) {
    let kt = kernels();
    let k = ws[0].cols;
    let grouped = ws.iter().all(|w| w.cols == k && kt.group_usable(w.dtype, k));
    if !grouped {
        // Matrices the group kernels cannot take together: one at a time, each by the best path.
        for (w, out) in ws.into_iter().zip(outs) {
            if N > 1 && kt.group_usable(w.dtype, w.cols) {
                matmul_fused(pool, [w], x, n, [out], scratch);
            } else {
                matmul_one(pool, w, x, n, out, scratch);
            }
        }
        return;
    }
    for (w, out) in ws.iter().zip(&outs) {
        assert!(x.len() >= n * k && out.len() >= n * w.rows, "matmul shapes");
    }
    let vt = kt.activation_type(ws[0].dtype, k);
    // The group kernels read the activations only through their preparation.
    quantize_activations(pool, vt, true, x, k, n, scratch);
    let optrs = outs.map(|o| SharedMut(o.as_mut_ptr()));
    // Row ranges over the matrices one after another.
    let mut starts = [0usize; N];
    let mut total = 0;
    for (s, w) in starts.iter_mut().zip(&ws) {
        *s = total;
        total += w.rows;
    }
    PREP.with(|prep| {
        let prep = prep.borrow();
        let prep: &[f32] = &prep;
        let body = |rows: std::ops::Range<usize>| {
            for i in 0..N {
                let (w, s, optr) = (ws[i], starts[i], optrs[i]);
                let (lo, hi) = (rows.start.max(s), rows.end.min(s + w.rows));
                if lo >= hi {
                    continue;
                }
                let (r0, nr, wrb) = (lo - s, hi - lo, w.row_bytes());
                // SAFETY: this range writes outs[i][t * m + r] for its rows r of matrix i and
                // t < n: disjoint from every other range's entries, and within the output
                // (asserted above).
                unsafe { kt.group_gemm_strided(w.dtype, k, &w.data[r0 * wrb..], wrb, nr, n, prep, optr.0.add(r0), w.rows) };
            }
        };
        if n <= 8 {
            // Decoding (one to eight sequences) streams every weight once per step: each thread
            // reads one long contiguous part, so the prefetchers keep streaming, and the threads
            // finish together (PERF.md, item 19).
            let row_bytes = ws.iter().map(|w| w.row_bytes()).max().unwrap_or(1);
            pool.for_parts(total, decode_piece_rows(row_bytes), &body);
        } else {
            pool.for_chunks(total, ROW_CHUNK, &body);
        }
    });
}

/// Quantize `n` activation rows of `k` floats to `vt` into `scratch`, and prepare them for the
/// group kernels (into the calling thread's `PREP`) when `grouped`; rows in parallel when there
/// are many.
fn quantize_activations(pool: &ThreadPool, vt: DType, grouped: bool, x: &[f32], k: usize, n: usize, scratch: &mut Vec<u8>) {
    let kt = kernels();
    let arb = vt.row_bytes(k).expect("activation row must be whole blocks");
    if scratch.len() < n * arb {
        scratch.resize(n * arb, 0);
    }
    let quant = kt.quantize(vt);
    PREP.with(|prep| {
        let mut prep = prep.borrow_mut();
        let per_row = if grouped { kt.group_prepared_len(k) } else { 0 };
        prep.clear();
        prep.resize(n * per_row, 0.0);
        if n >= 8 {
            let (sp, pp) = (scratch.as_mut_ptr() as usize, prep.as_mut_ptr() as usize);
            pool.for_chunks(n, 4, &|ts| {
                for t in ts {
                    // SAFETY: each t is handled by exactly one thread; rows t*arb..(t+1)*arb of
                    // `scratch` and t*per_row..(t+1)*per_row of `prep` are disjoint, lie within
                    // them, and both outlive this call.
                    let (dst, pdst) = unsafe {
                        (std::slice::from_raw_parts_mut((sp as *mut u8).add(t * arb), arb), std::slice::from_raw_parts_mut((pp as *mut f32).add(t * per_row), per_row))
                    };
                    quant(&x[t * k..(t + 1) * k], dst);
                    if grouped {
                        kt.group_prepare_row(k, dst, pdst);
                    }
                }
            });
        } else {
            for t in 0..n {
                let dst = &mut scratch[t * arb..(t + 1) * arb];
                quant(&x[t * k..(t + 1) * k], dst);
                if grouped {
                    kt.group_prepare_row(k, dst, &mut prep[t * per_row..(t + 1) * per_row]);
                }
            }
        }
    });
}

/// One matrix without the group kernels: per-row dot products.
fn matmul_one(pool: &ThreadPool, w: &Matrix, x: &[f32], n: usize, out: &mut [f32], scratch: &mut Vec<u8>) {
    let (k, m) = (w.cols, w.rows);
    assert!(x.len() >= n * k && out.len() >= n * m, "matmul shapes");
    let kt = kernels();
    let vt = kt.activation_type(w.dtype, k);
    let arb = vt.row_bytes(k).expect("activation row must be whole blocks");
    quantize_activations(pool, vt, false, x, k, n, scratch);
    let act: &[u8] = scratch;
    let wrb = w.row_bytes();
    let optr = SharedMut(out.as_mut_ptr());
    if n == 1 {
        // Decoding: one long contiguous part per thread, as in `matmul_fused`.
        pool.for_parts(m, decode_piece_rows(wrb), &|rows| {
            let optr = optr;
            // SAFETY: row ranges handed out by `for_parts` are disjoint and lie within out[..m].
            let dst = unsafe { std::slice::from_raw_parts_mut(optr.0.add(rows.start), rows.len()) };
            kt.gemm(w.dtype, k, &w.data[rows.start * wrb..], wrb, rows.len(), act, arb, 1, dst);
        });
        return;
    }
    pool.for_chunks(m, ROW_CHUNK, &|rows| {
        let optr = optr;
        TILE.with(|tile| {
            let mut tile = tile.borrow_mut();
            let nr = rows.len();
            if tile.len() < nr * n {
                tile.resize(nr * n, 0.0);
            }
            kt.gemm(w.dtype, k, &w.data[rows.start * wrb..], wrb, nr, act, arb, n, &mut tile);
            for t in 0..n {
                for (i, r) in rows.clone().enumerate() {
                    // SAFETY: (t, r) pairs are disjoint across chunks and t * m + r < out.len().
                    unsafe { *optr.0.add(t * m + r) = tile[t * nr + i] };
                }
            }
        });
    });
}

thread_local! {
    /// Prepared activations for the group kernels (the calling thread's).
    static PREP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's output tile for `matmul`.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// RMS normalization of each `dim`-sized row, times `weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let scale = rms_scale(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * g;
        }
    }
}

/// In-place RMS normalization of each `weight.len()`-sized chunk (per-head Q/K norms).
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for xr in x.chunks_exact_mut(dim) {
        let scale = rms_scale(xr, eps);
        for (v, &g) in xr.iter_mut().zip(weight) {
            *v = *v * scale * g;
        }
    }
}

/// 1 / sqrt(mean(x²) + eps), the sum of squares in f64. Eight partial sums rather than one
/// chain of dependent additions (which took ~1 µs per 640-float row, a few percent of prompt
/// processing): the squares of floats are exact in f64, so the order only moves the sum by
/// ~1e-16 relative, far below the f32 it is rounded to.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (v as f64) * (v as f64);
        }
    }
    let ss = acc.iter().sum::<f64>() + tail;
    1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt()
}

/// [`rms_scale`] with one chain of additions in order (the reference it is tested against).
pub fn rms_scale_scalar(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotate adjacent pairs (x[2i], x[2i+1]) — GGML's "normal" mode (Llama).
    Interleaved,
    /// Rotate (x[i], x[i + n_rot/2]) — GGML's "NeoX" mode (Qwen, Gemma).
    Neox,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub style: RopeStyle,
    /// Leading dimensions of each head that rotate.
    pub n_rot: usize,
    pub base: f32,
    /// Position scale (1 / linear scaling factor).
    pub freq_scale: f32,
    /// Per-frequency divisors (Llama 3.1 `rope_freqs`), if any.
    pub freq_factors: Option<Vec<f32>>,
    /// Scale of every cos and sin (the `rope.scaling.attn_factor` metadata; 1 by default).
    pub attn_factor: f32,
    /// YaRN scaling, when the model declares it.
    pub yarn: Option<Yarn>,
}

/// YaRN ("Yet another RoPE extension"): high-frequency pairs keep their original angles
/// (extrapolation), low-frequency pairs are interpolated by `freq_scale`, with a linear ramp
/// between the pairs `low` and `high`; cos and sin grow by 1 + 0.1 ln(1 / freq_scale). The
/// constants follow GGML's `rope_yarn` (beta_fast 32, beta_slow 1, as llama.cpp's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub low: f32,
    pub high: f32,
    /// How much of the extrapolated angle to mix in (1 for YaRN; 0 turns it into linear).
    pub ext_factor: f32,
}

impl Yarn {
    /// The ramp's ends for `n_rot` rotated dims, a model trained on `n_ctx_orig` positions with
    /// frequency base `base`: the pairs that turn 32 times and once over that context.
    pub fn new(n_rot: usize, n_ctx_orig: usize, base: f32, ext_factor: f32) -> Yarn {
        let (beta_fast, beta_slow) = (32f32, 1f32);
        let corr = |turns: f32| n_rot as f32 * (n_ctx_orig as f32 / (turns * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln());
        Yarn { low: corr(beta_fast).floor().max(0.0), high: corr(beta_slow).ceil().min(n_rot as f32 - 1.0), ext_factor }
    }
}

impl Rope {
    /// Append (cos, sin) of each rotated pair's angle at `pos` to `out` (`n_rot / 2` pairs),
    /// computed as GGML does: theta_i = pos * base^(-2i/n_rot), by repeated products, scaled
    /// (linearly or by YaRN).
    pub fn angles(&self, pos: usize, out: &mut Vec<(f32, f32)>) {
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f32);
        let mut theta = pos as f32;
        for i in 0..self.n_rot / 2 {
            let ff = self.freq_factors.as_ref().map(|f| f[i]).unwrap_or(1.0);
            let extrapolated = theta / ff;
            let interpolated = self.freq_scale * extrapolated;
            let (t, m) = match self.yarn {
                Some(y) if y.ext_factor != 0.0 => {
                    let ramp = (1.0 - ((i as f32 - y.low) / (y.high - y.low).max(0.001)).clamp(0.0, 1.0)) * y.ext_factor;
                    (interpolated * (1.0 - ramp) + extrapolated * ramp, self.attn_factor * (1.0 + 0.1 * (1.0 / self.freq_scale).ln()))
                }
                _ => (interpolated, self.attn_factor),
            };
            out.push((t.cos() * m, t.sin() * m));
            theta *= theta_scale;
        }
    }

    /// Rotate every head of one token's vector by angles from [`Rope::angles`].
    pub fn rotate(&self, x: &mut [f32], head_dim: usize, angles: &[(f32, f32)]) {
        let half = self.n_rot / 2;
        for head in x.chunks_exact_mut(head_dim) {
            for (i, &(c, s)) in angles[..half].iter().enumerate() {
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + half),
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * c - x1 * s;
                head[b] = x0 * s + x1 * c;
            }
        }
    }
}

/// Rotate each group of `n` consecutive values of `x` (n a power of two) by the orthonormal
/// Walsh-Hadamard matrix H_n / √n (its own inverse), with the fast transform: log2 n passes of
/// sums and differences.
pub fn hadamard(x: &mut [f32], n: usize) {
    assert!(n.is_power_of_two() && x.len() % n == 0, "hadamard: groups of a power of two");
    let scale = 1.0 / (n as f32).sqrt();
    for g in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for block in g.chunks_exact_mut(2 * h) {
                let (a, b) = block.split_at_mut(h);
                for (u, v) in a.iter_mut().zip(b) {
                    (*u, *v) = (*u + *v, *u - *v);
                }
            }
            h *= 2;
        }
        for v in g.iter_mut() {
            *v *= scale;
        }
    }
}

/// gate = silu(gate) * up, in place in `gate`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    (kernels().silu_mul)(gate, up)
}

/// gate = gelu(gate) * up (tanh approximation, as GGML and Gemma use), in place in `gate`.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    (kernels().gelu_mul)(gate, up)
}

/// log Σ e^x of a row (the log-softmax normalizer).
pub fn log_sum_exp(x: &[f32]) -> f32 {
    (kernels().log_sum_exp)(x)
}

/// Sampling weights: out[i] = e^((x[i] - max)·scale) where x[i] ≥ floor (else 0, NaN too);
/// returns their sum. `max` should be the row's maximum, so no weight overflows.
pub fn exp_weights(x: &[f32], max: f32, scale: f32, floor: f32, out: &mut [f32]) -> f64 {
    (kernels().exp_weights)(x, max, scale, floor, out)
}

/// Scalar reference of `exp_weights`.
pub fn exp_weights_scalar(x: &[f32], max: f32, scale: f32, floor: f32, out: &mut [f32]) -> f64 {
    let mut total = 0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = if v >= floor { ((v - max) * scale).exp() } else { 0.0 };
        total += *o as f64;
    }
    total
}

/// Scalar reference of `log_sum_exp`.
pub fn log_sum_exp_scalar(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let s: f64 = x.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (s.ln() as f32) + max
}

/// Scalar reference of `silu_mul`.
pub fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Scalar reference of `gelu_mul`.
pub fn gelu_mul_scalar(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh()) * u;
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Dot product of two f32 slices (dispatches to SIMD where available).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let f = kernels().vec_dot(DType::F32);
    f(n, f32_bytes(&a[..n]), f32_bytes(&b[..n]))
}

/// View f32 data as bytes for the byte-oriented kernel interface.
pub fn f32_bytes(x: &[f32]) -> &[u8] {
    // SAFETY: any f32 bit pattern is valid as bytes; length scales by 4; alignment of u8 is 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// y += a * x
pub fn axpy(y: &mut [f32], a: f32, x: &[half::f16]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi.to_f32();
    }
}

/// y += a * x over f16 values (dispatches to SIMD where available); the scalar reference is
/// [`axpy`].
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[half::f16]) {
    (kernels().axpy_f16)(y, a, x)
}

/// y += a * x
pub fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Dot product of f16 values with f32 values (dispatches to SIMD where available).
pub fn dot_f16_f32(w: &[half::f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let f = kernels().vec_dot(DType::F16);
    f(n, f16_bytes(&w[..n]), f32_bytes(&x[..n]))
}

/// View f16 data as bytes for the byte-oriented kernel interface.
pub fn f16_bytes(x: &[half::f16]) -> &[u8] {
    // SAFETY: f16 is two plain bytes; length scales by 2; alignment of u8 is 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// Softmax attention of query heads over cached keys/values: for each head h (the `hd` floats
/// `q[h * hd..]`), out_h = Σ_j softmax_j(q_h·k_j * scale) v_j over the slots j in `ranges`
/// (half-open slot ranges); slot j's key and value are the `hd` values at
/// `keys[j * stride + offset ..]` (all heads given share them: one key/value head), stored in
/// any [`KvType`](crate::kv::KvType) (quantized heads are whole blocks). A head's result is the
/// same whether it is attended alone or with others.
#[allow(clippy::too_many_arguments)]
pub fn attend(q: &[f32], hd: usize, keys: KvRows, values: KvRows, stride: usize, offset: usize, ranges: &[std::ops::Range<usize>], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    kernels().attend(q, hd, keys, values, stride, offset, ranges, scale, scores, out)
}

/// Scalar reference of `attend`. With quantized keys a score is Σ over blocks of the block's
/// scale times the dot with its unscaled values; quantized values add (weight × scale) × value.
#[allow(clippy::too_many_arguments)]
pub fn attend_scalar(q: &[f32], hd: usize, keys: KvRows, values: KvRows, stride: usize, offset: usize, ranges: &[std::ops::Range<usize>], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    for (q, out) in q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)) {
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in ranges.iter().flat_map(|r| r.clone()) {
            let at = j * stride + offset;
            let dot = match keys {
                KvRows::F16(k) => q.iter().zip(&k[at..at + hd]).map(|(a, b)| a * b.to_f32()).sum::<f32>(),
                _ => (0..hd / 32)
                    .map(|b| {
                        let (d, vals) = keys.block(at + 32 * b);
                        d * q[32 * b..32 * b + 32].iter().zip(vals).map(|(a, v)| a * v).sum::<f32>()
                    })
                    .sum(),
            };
            let s = dot * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        out.fill(0.0);
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for (j, &p) in ranges.iter().flat_map(|r| r.clone()).zip(scores.iter()) {
            let at = j * stride + offset;
            match values {
                KvRows::F16(v) => axpy(out, p * inv, &v[at..at + hd]),
                _ => {
                    for (b, o) in out.chunks_exact_mut(32).enumerate() {
                        let (d, vals) = values.block(at + 32 * b);
                        let w = p * inv * d;
                        for (o, v) in o.iter_mut().zip(vals) {
                            *o += w * v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_row_by_row_dots() {
        let pool = ThreadPool::new(2);
        let (rows, cols, n) = (37, 64, 9);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
        let x: Vec<f32> = (0..n * cols).map(|i| ((i * 104729) % 89) as f32 / 89.0 - 0.5).collect();
        let wm = Matrix::new(DType::F32, rows, cols, f32_bytes(&w));
        let mut out = vec![0f32; n * rows];
        matmul(&pool, &wm, &x, n, &mut out, &mut Vec::new());
        for t in 0..n {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[t * cols + c]).sum();
                assert!((out[t * rows + r] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn rms_scale_matches_the_in_order_sum() {
        // Odd lengths, magnitudes across many octaves; the f64 partial sums reach the same f32.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for len in [1, 7, 8, 9, 63, 640, 896, 1001, 2304] {
            for _ in 0..50 {
                let x: Vec<f32> = (0..len).map(|_| ((next() % 2001) as f32 - 1000.0) * 2f32.powi((next() % 24) as i32 - 12)).collect();
                assert_eq!(rms_scale(&x, 1e-6), rms_scale_scalar(&x, 1e-6), "len {len}");
            }
        }
    }

    #[test]
    fn rope_rotates_by_position_and_keeps_norm() {
        let rope = Rope { style: RopeStyle::Neox, n_rot: 4, base: 10000.0, freq_scale: 1.0, freq_factors: None, attn_factor: 1.0, yarn: None };
        let mut x = vec![1.0, 0.0, 0.0, 1.0];
        let mut c = Vec::new();
        rope.angles(0, &mut c);
        rope.rotate(&mut x, 4, &c);
        assert_eq!(x, vec![1.0, 0.0, 0.0, 1.0]);
        c.clear();
        rope.angles(1, &mut c);
        rope.rotate(&mut x, 4, &c);
        // Pair (x0, x2) rotates by 1 radian; pair (x1, x3) by 1/100.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert!((x[1] + (0.01f32).sin()).abs() < 1e-6 && (x[3] - (0.01f32).cos()).abs() < 1e-6);
    }

    #[test]
    fn hadamard_is_an_orthonormal_involution() {
        let x: Vec<f32> = (0..128).map(|i| ((i * 29 % 17) as f32 - 8.0) * 0.5).collect();
        let mut y = x.clone();
        hadamard(&mut y, 64);
        // Against the matrix: H[i][j] = (-1)^popcount(i & j) / 8 within each group of 64.
        for g in 0..2 {
            for i in 0..64 {
                let want: f32 = (0..64).map(|j| if (i & j as usize).count_ones() % 2 == 0 { 1.0 } else { -1.0 } * x[g * 64 + j] / 8.0).sum();
                assert!((y[g * 64 + i] - want).abs() < 1e-4, "row {i}: {} vs {want}", y[g * 64 + i]);
            }
        }
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x));
        hadamard(&mut y, 64);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn attention_weights_sum_to_one() {
        let q = [1.0, 0.0];
        let keys = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0].map(half::f16::from_f32);
        let values = [1.0, 1.0, 3.0, 3.0, 5.0, 5.0].map(half::f16::from_f32);
        let mut out = [0.0; 2];
        attend(&q, 2, KvRows::F16(&keys), KvRows::F16(&values), 2, 0, &[0..1, 1..3], 1.0, &mut Vec::new(), &mut out);
        let e = 1f32.exp();
        let want = (e * 1.0 + 3.0 + e * 5.0) / (2.0 * e + 1.0);
        assert!((out[0] - want).abs() < 1e-5 && (out[1] - want).abs() < 1e-5);
    }
}
