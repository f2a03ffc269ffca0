//! AVX2 versions of the element-wise and attention operations: exp, SiLU/GELU gating, and
//! softmax attention of one query head over cached keys and values.

use crate::kv::{KvRows, KvType};
use half::f16;
use std::arch::x86_64::*;
use std::ops::Range;

/// e^x for 8 lanes: x = n·ln2 + r, e^r by a degree-6 polynomial (relative error ~2e-7 on
/// [-87, 88]; below -87 the result flushes to 0, above 88 it saturates).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
    let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n·ln2, with ln2 split in two parts for precision.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    _mm256_mul_ps(p, scale)
}

/// Scalar twin of `exp8`, for the tails of arrays (identical arithmetic, so results do not
/// depend on where an element falls).
#[inline]
fn exp1(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(0.693_145_75, x);
    let r = (-n).mul_add(1.428_606_8e-6, r);
    let mut p = 1.0f32 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn gated(gate: &mut [f32], up: &[f32], gelu: bool) {
    let n = gate.len().min(up.len());
    let mut i = 0;
    // gelu(x) = x·sigmoid(2·√(2/π)·(x + 0.044715x³)); silu(x) = x·sigmoid(x).
    const K: f32 = 2.0 * 0.797_884_6;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both slices.
        unsafe {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let z = if gelu {
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                _mm256_mul_ps(_mm256_set1_ps(K), _mm256_fmadd_ps(_mm256_set1_ps(0.044715), x3, x))
            } else {
                x
            };
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), z));
            let act = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
            _mm256_storeu_ps(gate.as_mut_ptr().add(i), _mm256_mul_ps(act, _mm256_loadu_ps(up.as_ptr().add(i))));
        }
        i += 8;
    }
    for j in i..n {
        let x = gate[j];
        let z = if gelu { K * 0.044715f32.mul_add(x * x * x, x) } else { x };
        gate[j] = x / (1.0 + exp1(-z)) * up[j];
    }
}

pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    // SAFETY: installed only when the CPU has AVX2 and FMA.
    unsafe { gated(gate, up, false) }
}

pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    // SAFETY: installed only when the CPU has AVX2 and FMA.
    unsafe { gated(gate, up, true) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn lse_impl(x: &[f32]) -> f32 {
    let n = x.len();
    let p = x.as_ptr();
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(p.add(i)) });
        i += 8;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: 8 floats of stack space.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
    let max = x[i..].iter().chain(lanes.iter()).copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let vm = _mm256_set1_ps(max);
    // f32 lanes over short runs, added into an f64 total, so long rows lose no precision.
    let mut total = 0f64;
    let mut i = 0;
    while i + 8 <= n {
        let end = (i + 1024).min(n - n % 8);
        let mut acc = _mm256_setzero_ps();
        while i < end {
            // SAFETY: i + 8 <= end <= n.
            acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, vm)));
            i += 8;
        }
        total += hsum(acc) as f64;
    }
    for &v in &x[i..] {
        total += exp1(v - max) as f64;
    }
    total.ln() as f32 + max
}

/// log Σ e^x over a row of logits.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    // SAFETY: installed only when the CPU has AVX2 and FMA.
    unsafe { lse_impl(x) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn exp_weights_impl(x: &[f32], max: f32, scale: f32, floor: f32, out: &mut [f32]) -> f64 {
    let n = x.len().min(out.len());
    let (p, o) = (x.as_ptr(), out.as_mut_ptr());
    let (vm, vs, vf) = (_mm256_set1_ps(max), _mm256_set1_ps(scale), _mm256_set1_ps(floor));
    let mut total = 0f64;
    let mut i = 0;
    while i + 8 <= n {
        let end = (i + 1024).min(n - n % 8);
        let mut acc = _mm256_setzero_ps();
        while i < end {
            // SAFETY: i + 8 <= end <= n, within both slices.
            unsafe {
                let v = _mm256_loadu_ps(p.add(i));
                // Below the floor, or NaN: weight 0.
                let keep = _mm256_cmp_ps(v, vf, _CMP_GE_OQ);
                let w = _mm256_and_ps(exp8(_mm256_mul_ps(_mm256_sub_ps(v, vm), vs)), keep);
                _mm256_storeu_ps(o.add(i), w);
                acc = _mm256_add_ps(acc, w);
            }
            i += 8;
        }
        total += hsum(acc) as f64;
    }
    while i < n {
        let v = x[i];
        let w = if v >= floor { exp1((v - max) * scale) } else { 0.0 };
        out[i] = w;
        total += w as f64;
        i += 1;
    }
    total
}

/// out[i] = e^((x[i] - max)·scale) where x[i] ≥ floor, else 0; returns the sum.
pub fn exp_weights(x: &[f32], max: f32, scale: f32, floor: f32, out: &mut [f32]) -> f64 {
    // SAFETY: installed only when the CPU has AVX2 and FMA.
    unsafe { exp_weights_impl(x, max, scale, floor, out) }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Heads attended together at most.
const MAX_HEADS: usize = 8;

/// Eight f16 values widened to f32 (exactly).
#[inline(always)]
unsafe fn load_f16(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 8 readable values at p; F16C is enabled in every caller.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// Dot products of one row of `hd` floats with eight rows of f16 (hd a multiple of 8), four at
/// a time (see `dot4`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot8(q: *const f32, k: &[*const f16; 8], hd: usize) -> __m256 {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { _mm256_set_m128(dot4(q, [k[4], k[5], k[6], k[7]], hd), dot4(q, [k[0], k[1], k[2], k[3]], hd)) }
}

/// Dot products of one row with four others. Each is summed exactly as a lone dot product
/// would be — two accumulators over alternate 8-float chunks, added, then the halves, pairs
/// and lanes in a fixed order — but the four final reductions share one 4×4 transpose. A
/// key's score therefore depends only on its row and the query.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4(q: *const f32, k: [*const f16; 4], hd: usize) -> __m128 {
    let (mut s0, mut s1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
    let mut d = 0;
    // SAFETY (loads): the caller guarantees hd readable floats at q and at each k[j].
    while d + 16 <= hd {
        unsafe {
            let (q0, q1) = (_mm256_loadu_ps(q.add(d)), _mm256_loadu_ps(q.add(d + 8)));
            for j in 0..4 {
                s0[j] = _mm256_fmadd_ps(q0, load_f16(k[j].add(d)), s0[j]);
                s1[j] = _mm256_fmadd_ps(q1, load_f16(k[j].add(d + 8)), s1[j]);
            }
        }
        d += 16;
    }
    if d < hd {
        unsafe {
            let q0 = _mm256_loadu_ps(q.add(d));
            for j in 0..4 {
                s0[j] = _mm256_fmadd_ps(q0, load_f16(k[j].add(d)), s0[j]);
            }
        }
    }
    // Per key: w = low half + high half of (s0 + s1); then (w0 + w2) + (w1 + w3).
    let w: [__m128; 4] = std::array::from_fn(|j| {
        let v = _mm256_add_ps(s0[j], s1[j]);
        _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))
    });
    let (t0, t1) = (_mm_unpacklo_ps(w[0], w[1]), _mm_unpacklo_ps(w[2], w[3]));
    let (t2, t3) = (_mm_unpackhi_ps(w[0], w[1]), _mm_unpackhi_ps(w[2], w[3]));
    let (c0, c1) = (_mm_movelh_ps(t0, t1), _mm_movehl_ps(t1, t0));
    let (c2, c3) = (_mm_movelh_ps(t2, t3), _mm_movehl_ps(t3, t2));
    _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3))
}

/// Dot products of H ≤ 4 query rows with one key row, each summed exactly as a lone dot product
/// would be — two accumulators over alternate 8-float chunks, added, then the halves, pairs
/// and lanes in a fixed order — with the final reductions sharing one 4×4 transpose (lanes of
/// missing heads are zero), and the key widened once for all. The score of a (key, head) pair
/// is therefore the same whichever heads share the pass.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_heads<const H: usize>(q: [*const f32; H], k: *const f16, hd: usize) -> __m128 {
    let (mut s0, mut s1) = ([_mm256_setzero_ps(); H], [_mm256_setzero_ps(); H]);
    let mut d = 0;
    // SAFETY (loads): the caller guarantees hd readable values at k and at each q[h].
    while d + 16 <= hd {
        unsafe {
            let (k0, k1) = (load_f16(k.add(d)), load_f16(k.add(d + 8)));
            for h in 0..H {
                s0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h].add(d)), k0, s0[h]);
                s1[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h].add(d + 8)), k1, s1[h]);
            }
        }
        d += 16;
    }
    if d < hd {
        unsafe {
            let k0 = load_f16(k.add(d));
            for h in 0..H {
                s0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q[h].add(d)), k0, s0[h]);
            }
        }
    }
    let w: [__m128; 4] = std::array::from_fn(|h| {
        if h < H {
            let v = _mm256_add_ps(s0[h], s1[h]);
            _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1))
        } else {
            _mm_setzero_ps()
        }
    });
    let (t0, t1) = (_mm_unpacklo_ps(w[0], w[1]), _mm_unpacklo_ps(w[2], w[3]));
    let (t2, t3) = (_mm_unpackhi_ps(w[0], w[1]), _mm_unpackhi_ps(w[2], w[3]));
    let (c0, c1) = (_mm_movelh_ps(t0, t1), _mm_movehl_ps(t1, t0));
    let (c2, c3) = (_mm_movelh_ps(t2, t3), _mm_movehl_ps(t3, t2));
    _mm_add_ps(_mm_add_ps(c0, c2), _mm_add_ps(c1, c3))
}

/// The largest value of a row (-inf for an empty one).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn row_max(row: &[f32]) -> f32 {
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        // SAFETY: c holds 8 floats.
        m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(c.as_ptr()) });
    }
    chunks.remainder().iter().fold(hmax(m), |a, &b| a.max(b))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// A KV storage format as attention reads it: a head's row starts at a byte pointer, and its
/// values come 8 at a time, unscaled, with the scale of the 32-value block holding them.
trait KvFmt {
    const IS_F16: bool;
    /// Bytes of the first `elems` values of a row (whole blocks).
    fn bytes(elems: usize) -> usize;
    /// The scale of the block holding value `d` of the row at `row` (1 for f16).
    unsafe fn scale(row: *const u8, d: usize) -> f32;
    /// Values d..d + 8 of the row at `row`, unscaled (d a multiple of 8).
    unsafe fn load8(row: *const u8, d: usize) -> __m256;
}

struct F16Fmt;
struct Q8Fmt;
struct Q4Fmt;

impl KvFmt for F16Fmt {
    const IS_F16: bool = true;
    #[inline(always)]
    fn bytes(elems: usize) -> usize {
        2 * elems
    }
    #[inline(always)]
    unsafe fn scale(_: *const u8, _: usize) -> f32 {
        1.0
    }
    #[inline(always)]
    unsafe fn load8(row: *const u8, d: usize) -> __m256 {
        // SAFETY: the caller guarantees values d..d + 8 of the row are readable.
        unsafe { load_f16(row.cast::<f16>().add(d)) }
    }
}

/// The f16 scale at the start of a block.
#[inline(always)]
unsafe fn block_scale(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees two readable bytes; F16C is enabled in every caller.
    unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p.cast::<u16>()) as i32))) }
}

impl KvFmt for Q8Fmt {
    const IS_F16: bool = false;
    #[inline(always)]
    fn bytes(elems: usize) -> usize {
        elems / 32 * 34
    }
    #[inline(always)]
    unsafe fn scale(row: *const u8, d: usize) -> f32 {
        // SAFETY: the caller guarantees the block holding value d is readable.
        unsafe { block_scale(row.add(d / 32 * 34)) }
    }
    #[inline(always)]
    unsafe fn load8(row: *const u8, d: usize) -> __m256 {
        // SAFETY: as above; the eight bytes lie inside the block's 32 quants.
        unsafe {
            let p = row.add(d / 32 * 34 + 2 + d % 32);
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast())))
        }
    }
}

impl KvFmt for Q4Fmt {
    const IS_F16: bool = false;
    #[inline(always)]
    fn bytes(elems: usize) -> usize {
        elems / 32 * 18
    }
    #[inline(always)]
    unsafe fn scale(row: *const u8, d: usize) -> f32 {
        // SAFETY: the caller guarantees the block holding value d is readable.
        unsafe { block_scale(row.add(d / 32 * 18)) }
    }
    #[inline(always)]
    unsafe fn load8(row: *const u8, d: usize) -> __m256 {
        // Values 0..16 of a block are the low nibbles of its 16 quant bytes, 16..32 the high
        // ones; each stores value + 8.
        let i = d % 32;
        // SAFETY: as above; the eight bytes lie inside the block's 16 quant bytes.
        unsafe {
            let bytes = _mm_loadl_epi64(row.add(d / 32 * 18 + 2 + i % 16).cast());
            let nib = if i < 16 { bytes } else { _mm_srli_epi16(bytes, 4) };
            let nib = _mm_and_si128(nib, _mm_set1_epi8(15));
            _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(nib), _mm256_set1_epi32(8)))
        }
    }
}

/// Attention of up to MAX_HEADS query heads (see `ops::attend`) over keys and values stored
/// in formats K and V, from `kbytes` / `vbytes` bytes at `kp` / `vp`.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_heads<K: KvFmt, V: KvFmt>(q: &[f32], hd: usize, (kp, kbytes): (*const u8, usize), (vp, vbytes): (*const u8, usize), stride: usize, offset: usize, ranges: &[Range<usize>], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let heads = q.len() / hd;
    assert!(heads <= MAX_HEADS && out.len() >= heads * hd);
    for r in ranges {
        if r.start < r.end {
            let last = (r.end - 1) * stride + offset + hd;
            assert!(K::bytes(last) <= kbytes && V::bytes(last) <= vbytes, "attention slots out of range");
        }
    }
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    scores.clear();
    scores.resize(heads * n, 0.0);
    let (qp, sp) = (q.as_ptr(), scores.as_mut_ptr());
    // Scores. Every (key, head) dot product is summed exactly as a lone one, so a score
    // depends only on its key row and query, whichever path computes it: long f16 heads widen
    // each key once for four heads (fewer passes over a long context's keys); short ones take
    // eight keys per query, sharing each query load; quantized keys go block by block.
    // SAFETY: the key rows lie within the keys (asserted above); q holds `heads` queries of hd
    // floats; scores holds heads * n floats.
    unsafe {
        if !K::IS_F16 {
            scores_blocks::<K>(qp, heads, hd, kp, stride, offset, ranges, scale, sp, n);
        } else if hd >= 128 {
            scores_by_key(qp, heads, hd, kp.cast(), stride, offset, ranges, scale, sp, n);
        } else {
            scores_by_head(qp, heads, hd, kp, stride, offset, ranges, scale, sp, n);
        }
    }
    // Softmax; the normalized weights replace the scores.
    for h in 0..heads {
        let row = &mut scores[h * n..(h + 1) * n];
        let rp = row.as_mut_ptr();
        let m = row_max(row);
        let mut sum = 0f32;
        let mut i = 0;
        let vm = _mm256_set1_ps(m);
        let mut vsum = _mm256_setzero_ps();
        while i + 8 <= n {
            // SAFETY: i + 8 <= n = row.len().
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(rp.add(i)), vm));
                _mm256_storeu_ps(rp.add(i), e);
                vsum = _mm256_add_ps(vsum, e);
            }
            i += 8;
        }
        for s in &mut row[i..] {
            *s = exp1(*s - m);
            sum += *s;
        }
        sum += hsum(vsum);
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for s in row.iter_mut() {
            *s *= inv;
        }
    }
    // out_h = Σ_j p_hj v_j: four heads at a time, 16 dimensions at a time, so the partial sums
    // stay in registers and each value row is loaded once per four heads. Each output lane adds
    // its terms in slot order whatever the grouping, so the result does not depend on it.
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(4);
        // SAFETY: heads h0..h0 + hb exist in scores and out; the slots are checked above.
        unsafe {
            match hb {
                4 => weigh_values::<V, 4>(vp, stride, offset, ranges, hd, scores, n, h0, out),
                3 => weigh_values::<V, 3>(vp, stride, offset, ranges, hd, scores, n, h0, out),
                2 => weigh_values::<V, 2>(vp, stride, offset, ranges, hd, scores, n, h0, out),
                _ => weigh_values::<V, 1>(vp, stride, offset, ranges, hd, scores, n, h0, out),
            }
        }
        h0 += hb;
    }
}

/// scores[h * n + i] = scale · q_h · k_i for quantized keys: per 32-value block, the dot with
/// the unscaled values times the block's scale, summed across blocks in one vector; each key's
/// blocks are widened once for up to four heads.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_blocks<K: KvFmt>(qp: *const f32, heads: usize, hd: usize, kp: *const u8, stride: usize, offset: usize, ranges: &[Range<usize>], scale: f32, sp: *mut f32, n: usize) {
    let mut i = 0;
    for r in ranges {
        for j in r.clone() {
            let kr = kp.wrapping_add(K::bytes(j * stride + offset));
            let mut h0 = 0;
            while h0 < heads {
                let hp = (heads - h0).min(4);
                let mut tot = [_mm256_setzero_ps(); 4];
                // SAFETY: the caller's guarantees: the key row's hd values and each query's hd
                // floats are readable; i < n, so every stored index is below heads * n.
                unsafe {
                    for b in (0..hd).step_by(32) {
                        let k: [__m256; 4] = std::array::from_fn(|c| K::load8(kr, b + 8 * c));
                        let d = _mm256_set1_ps(K::scale(kr, b));
                        for (x, t) in tot.iter_mut().enumerate().take(hp) {
                            let qb = qp.add((h0 + x) * hd + b);
                            let mut a = _mm256_mul_ps(_mm256_loadu_ps(qb), k[0]);
                            for (c, kc) in k.iter().enumerate().skip(1) {
                                a = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(8 * c)), *kc, a);
                            }
                            *t = _mm256_fmadd_ps(a, d, *t);
                        }
                    }
                    for (x, t) in tot.iter().enumerate().take(hp) {
                        *sp.add((h0 + x) * n + i) = hsum(*t) * scale;
                    }
                }
                h0 += hp;
            }
            i += 1;
        }
    }
}

/// scores[h * n + i] = scale · q_h · k_i for the keys of `ranges` in order, one key at a time
/// for up to four heads (see `dot_heads`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_by_key(qp: *const f32, heads: usize, hd: usize, kp: *const f16, stride: usize, offset: usize, ranges: &[Range<usize>], scale: f32, sp: *mut f32, n: usize) {
    let vscale = _mm_set1_ps(scale);
    let mut i = 0;
    for r in ranges {
        for j in r.clone() {
            let kr = kp.wrapping_add(j * stride + offset);
            let mut h0 = 0;
            while h0 < heads {
                let hp = (heads - h0).min(4);
                let qh = |x: usize| qp.wrapping_add((h0 + x) * hd);
                // SAFETY: the caller's guarantees; i < n, so every stored index is below heads * n.
                unsafe {
                    let dots = match hp {
                        4 => dot_heads([qh(0), qh(1), qh(2), qh(3)], kr, hd),
                        3 => dot_heads([qh(0), qh(1), qh(2)], kr, hd),
                        2 => dot_heads([qh(0), qh(1)], kr, hd),
                        _ => dot_heads([qh(0)], kr, hd),
                    };
                    let mut lanes = [0f32; 4];
                    _mm_storeu_ps(lanes.as_mut_ptr(), _mm_mul_ps(dots, vscale));
                    for (x, &v) in lanes.iter().enumerate().take(hp) {
                        *sp.add((h0 + x) * n + i) = v;
                    }
                }
                h0 += hp;
            }
            i += 1;
        }
    }
}

/// Calls `f(rows, i0)` for consecutive blocks of at most `cap` (≤ CAP) rows of the slots in
/// `ranges`, in order (row of slot j: value `j * stride + offset` of format F at `base`); `i0`
/// is the index of the block's first slot among all of them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn slot_blocks<F: KvFmt, const CAP: usize>(base: *const u8, stride: usize, offset: usize, ranges: &[Range<usize>], cap: usize, mut f: impl FnMut(&[*const u8], usize)) {
    let cap = cap.clamp(1, CAP);
    let mut rows = [base; CAP];
    let (mut filled, mut i0) = (0, 0);
    for r in ranges {
        for j in r.clone() {
            rows[filled] = base.wrapping_add(F::bytes(j * stride + offset));
            filled += 1;
            if filled == cap {
                f(&rows[..filled], i0);
                i0 += filled;
                filled = 0;
            }
        }
    }
    if filled > 0 {
        f(&rows[..filled], i0);
    }
}

/// [`scores_by_key`] eight keys at a time per head (see `dot8`). A last partial block repeats
/// its first key and keeps only the real entries.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_by_head(qp: *const f32, heads: usize, hd: usize, kp: *const u8, stride: usize, offset: usize, ranges: &[Range<usize>], scale: f32, sp: *mut f32, n: usize) {
    let vscale = _mm256_set1_ps(scale);
    slot_blocks::<F16Fmt, 8>(kp, stride, offset, ranges, 8, |rows, i0| {
        let count = rows.len();
        let block: [*const f16; 8] = std::array::from_fn(|b| rows[if b < count { b } else { 0 }].cast());
        for h in 0..heads {
            // SAFETY: the caller's guarantees; i0 + count <= n.
            unsafe {
                let s = _mm256_mul_ps(dot8(qp.add(h * hd), &block, hd), vscale);
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), s);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), sp.add(h * n + i0), count);
            }
        }
    });
}

/// Keys whose value rows are weighed together: their rows (`hd` f16 each) stay in L1 while the
/// output dimensions are walked 16 at a time.
const VALUE_BLOCK_BYTES: usize = 16 * 1024;

/// out rows h0..h0 + HB = Σ_j p_hj v_j, with the normalized weights p in `scores` (see
/// `attend_heads`). Keys go in blocks that fit in L1 (a long context's value rows would
/// otherwise stream from L3 once per 16 output dimensions); within a block the partial sums
/// stay in registers, between blocks in `out`. Each output lane adds its terms in slot order
/// either way.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn weigh_values<V: KvFmt, const HB: usize>(vp: *const u8, stride: usize, offset: usize, ranges: &[Range<usize>], hd: usize, scores: &[f32], n: usize, h0: usize, out: &mut [f32]) {
    out[h0 * hd..(h0 + HB) * hd].fill(0.0);
    slot_blocks::<V, 256>(vp, stride, offset, ranges, (VALUE_BLOCK_BYTES / V::bytes(hd).max(1)).max(8), |rows, i0| {
        // SAFETY: the caller checked every slot's row against `values`; i0 + rows.len() <= n.
        unsafe { weigh_block::<V, HB>(rows, hd, scores.as_ptr().add(i0), n, h0, out) };
    });
}

/// out rows h0..h0 + HB += Σ_b p_h(b) v_b over one block of value rows; the weights of head h
/// are at `sp + h * n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weigh_block<V: KvFmt, const HB: usize>(rows: &[*const u8], hd: usize, sp: *const f32, n: usize, h0: usize, out: &mut [f32]) {
    assert!(out.len() >= (h0 + HB) * hd);
    let op = out.as_mut_ptr();
    let mut d0 = 0;
    while d0 + 16 <= hd {
        // SAFETY: the caller's guarantees, passed on; d0 + 16 <= hd.
        unsafe { weigh_lanes::<V, HB, 2>(rows, d0, hd, sp, n, h0, op) };
        d0 += 16;
    }
    if d0 < hd {
        // SAFETY: as above; hd is a multiple of 8, so d0 + 8 == hd.
        unsafe { weigh_lanes::<V, HB, 1>(rows, d0, hd, sp, n, h0, op) };
    }
}

/// Dimensions d0..d0 + 8·L of [`weigh_block`] (within one block of a quantized row: a weight
/// times the block's scale, then times each unscaled value).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weigh_lanes<V: KvFmt, const HB: usize, const L: usize>(rows: &[*const u8], d0: usize, hd: usize, sp: *const f32, n: usize, h0: usize, op: *mut f32) {
    let mut acc = [[_mm256_setzero_ps(); L]; HB];
    // SAFETY (all accesses): the caller guarantees out holds (h0 + HB) * hd floats, each row hd
    // values and the weights of every head for this block; d0 + 8L <= hd.
    for (h, a) in acc.iter_mut().enumerate() {
        for (k, lane) in a.iter_mut().enumerate() {
            *lane = unsafe { _mm256_loadu_ps(op.add((h0 + h) * hd + d0 + 8 * k)) };
        }
    }
    for (b, &row) in rows.iter().enumerate() {
        unsafe {
            let v: [__m256; L] = std::array::from_fn(|k| V::load8(row, d0 + 8 * k));
            let d = V::scale(row, d0);
            for (h, a) in acc.iter_mut().enumerate() {
                let pv = _mm256_set1_ps(*sp.add((h0 + h) * n + b) * d);
                for k in 0..L {
                    a[k] = _mm256_fmadd_ps(pv, v[k], a[k]);
                }
            }
        }
    }
    for (h, a) in acc.iter().enumerate() {
        for (k, lane) in a.iter().enumerate() {
            unsafe { _mm256_storeu_ps(op.add((h0 + h) * hd + d0 + 8 * k), *lane) };
        }
    }
}

/// Softmax attention of query heads sharing one key/value head (see `ops::attend`); head size
/// a multiple of 8 (of 32 for quantized keys or values).
#[allow(clippy::too_many_arguments)]
pub fn attend(q: &[f32], hd: usize, keys: KvRows, values: KvRows, stride: usize, offset: usize, ranges: &[Range<usize>], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    assert!(hd > 0 && hd % 8 == 0 && q.len() % hd == 0 && out.len() >= q.len());
    let quantized = keys.kv_type() != KvType::F16 || values.kv_type() != KvType::F16;
    assert!(!quantized || (hd % 32 == 0 && stride % 32 == 0 && offset % 32 == 0), "quantized heads must be whole blocks");
    let raw = |r: KvRows| match r {
        KvRows::F16(v) => (v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)),
        KvRows::Q8_0(b) | KvRows::Q4_0(b) => (b.as_ptr(), b.len()),
    };
    let (k, v) = (raw(keys), raw(values));
    for (qc, oc) in q.chunks(MAX_HEADS * hd).zip(out.chunks_mut(MAX_HEADS * hd)) {
        macro_rules! go {
            ($k:ty, $v:ty) => {
                // SAFETY: installed only when the CPU has AVX2, FMA and F16C; the pointers and
                // byte counts describe the slices given; bounds are asserted inside.
                unsafe { attend_heads::<$k, $v>(qc, hd, k, v, stride, offset, ranges, scale, scores, oc) }
            };
        }
        match (keys.kv_type(), values.kv_type()) {
            (KvType::F16, KvType::F16) => go!(F16Fmt, F16Fmt),
            (KvType::F16, KvType::Q8_0) => go!(F16Fmt, Q8Fmt),
            (KvType::F16, KvType::Q4_0) => go!(F16Fmt, Q4Fmt),
            (KvType::Q8_0, KvType::F16) => go!(Q8Fmt, F16Fmt),
            (KvType::Q8_0, KvType::Q8_0) => go!(Q8Fmt, Q8Fmt),
            (KvType::Q8_0, KvType::Q4_0) => go!(Q8Fmt, Q4Fmt),
            (KvType::Q4_0, KvType::F16) => go!(Q4Fmt, F16Fmt),
            (KvType::Q4_0, KvType::Q8_0) => go!(Q4Fmt, Q8Fmt),
            (KvType::Q4_0, KvType::Q4_0) => go!(Q4Fmt, Q4Fmt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_the_scalar_twin_matches() {
        if !super::super::avx2::available() {
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| -90.0 + i as f32 * 0.045).collect();
        for c in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2/FMA checked above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
            for (x, y) in c.iter().zip(out) {
                assert_eq!(y, exp1(*x), "vector and scalar exp differ at {x}");
                let want = (*x as f64).exp();
                if (-87.0..=88.0).contains(x) {
                    assert!(((y as f64 - want) / want).abs() < 1e-6, "exp({x}) = {y}, want {want}");
                }
            }
        }
    }

    /// A lone dot product: two accumulators over alternate 8-float chunks, then a horizontal sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lone_dot(a: *const f32, b: *const f16, hd: usize) -> f32 {
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut d = 0;
        // SAFETY: the caller passes hd floats at a and b.
        unsafe {
            while d + 16 <= hd {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(d)), load_f16(b.add(d)), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(d + 8)), load_f16(b.add(d + 8)), s1);
                d += 16;
            }
            if d < hd {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(d)), load_f16(b.add(d)), s0);
            }
        }
        hsum(_mm256_add_ps(s0, s1))
    }

    #[test]
    fn grouped_dot_products_equal_lone_ones_bitwise() {
        if !super::super::avx2::available() {
            return;
        }
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut f = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        };
        for hd in [8, 16, 24, 64, 72, 256] {
            let qs: Vec<Vec<f32>> = (0..4).map(|_| (0..hd).map(|_| f()).collect()).collect();
            let key: Vec<f16> = (0..hd).map(|_| f16::from_f32(f())).collect();
            let p: [*const f32; 4] = std::array::from_fn(|h| qs[h].as_ptr());
            for heads in 1..=4 {
                let mut got = [0f32; 4];
                // SAFETY: AVX2/FMA checked above; every row holds hd values.
                let dots = unsafe {
                    match heads {
                        4 => dot_heads(p, key.as_ptr(), hd),
                        3 => dot_heads([p[0], p[1], p[2]], key.as_ptr(), hd),
                        2 => dot_heads([p[0], p[1]], key.as_ptr(), hd),
                        _ => dot_heads([p[0]], key.as_ptr(), hd),
                    }
                };
                // SAFETY: 4 floats of stack space.
                unsafe { _mm_storeu_ps(got.as_mut_ptr(), dots) };
                for h in 0..heads {
                    // SAFETY: as above.
                    let want = unsafe { lone_dot(qs[h].as_ptr(), key.as_ptr(), hd) };
                    assert_eq!(got[h].to_bits(), want.to_bits(), "hd={hd} head {h} of {heads}: {} vs {want}", got[h]);
                }
            }
            let keys: Vec<Vec<f16>> = (0..8).map(|_| (0..hd).map(|_| f16::from_f32(f())).collect()).collect();
            let kptrs: [*const f16; 8] = std::array::from_fn(|j| keys[j].as_ptr());
            let mut got = [0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), dot8(qs[0].as_ptr(), &kptrs, hd)) };
            for j in 0..8 {
                // SAFETY: as above.
                let want = unsafe { lone_dot(qs[0].as_ptr(), keys[j].as_ptr(), hd) };
                assert_eq!(got[j].to_bits(), want.to_bits(), "hd={hd} key {j}: {} vs {want}", got[j]);
            }
        }
    }
}

/// y += a · x for f16 x, 8 lanes at a time (F16C conversion, one fused multiply-add each).
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    // SAFETY: installed only when the CPU has AVX2, FMA and F16C.
    unsafe { axpy_f16_impl(y, a, x) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_f16_impl(y: &mut [f32], a: f32, x: &[f16]) {
    let n = y.len().min(x.len());
    let (yp, xp) = (y.as_mut_ptr(), x.as_ptr().cast::<u8>());
    let va = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n elements of both slices (x's f16 are 2 bytes each).
        unsafe {
            let vx = _mm256_cvtph_ps(_mm_loadu_si128(xp.add(2 * i).cast()));
            _mm256_storeu_ps(yp.add(i), _mm256_fmadd_ps(va, vx, _mm256_loadu_ps(yp.add(i))));
        }
        i += 8;
    }
    for j in i..n {
        y[j] = a.mul_add(x[j].to_f32(), y[j]);
    }
}
