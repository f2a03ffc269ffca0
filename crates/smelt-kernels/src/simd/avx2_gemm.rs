//! AVX2 block products ("GEMM tiles"): many weight rows against many activation rows at once.
//!
//! A dot product of one row pair must unpack every weight block (nibbles, fifth bits, scales);
//! a tile of RM weight rows × RN activation rows unpacks each weight block once for RN columns
//! and loads each activation block once for RM rows, and keeps RM × RN independent accumulators
//! in flight instead of one dependent chain. Decoding (one activation row) uses 4 × 1 tiles;
//! prompt processing uses 4 × 2 (legacy formats) or 2 × 2 (k-quants).
//!
//! Each tile computes exactly what the per-row kernels compute (same integer sums, same scale
//! products), so results match the scalar reference to float rounding.

use super::avx2::{bits_to_bytes, dot_i8, f16, hsum_f32, load, nibbles32};
use crate::formats::DType;
use std::arch::x86_64::*;

/// `out[c * nr + r] = w_row(r) · a_row(c)`; see `dispatch::GemmFn`.
pub type Tile = unsafe fn(usize, *const u8, usize, *const u8, usize, *mut f32, usize);

/// How far ahead of the block being computed to prefetch weights. Hardware prefetchers alone
/// leave decoding latency-bound on this class of machine (2.2 GB/s for Q5_0 from DRAM on one
/// core); 4 KiB ahead reaches ~7 GB/s (see PERF.md). Non-temporal: weights are read once.
pub const PREFETCH: usize = 4096;

/// Prefetch the block `PREFETCH` bytes ahead of `p` (one hint per cache line).
#[inline(always)]
pub(super) fn prefetch_block(p: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: prefetch hints never fault, whatever the address.
        unsafe { _mm_prefetch(p.wrapping_add(PREFETCH + off) as *const i8, _MM_HINT_NTA) };
        off += 64;
    }
}

/// A legacy 32-element format whose blocks unpack to 32 signed bytes and one scale.
trait Legacy {
    const BYTES: usize;
    unsafe fn unpack(p: *const u8) -> (__m256i, f32);
}

struct Q40;
struct Q50;
struct Q80;

impl Legacy for Q40 {
    const BYTES: usize = 18;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32) {
        // SAFETY: caller guarantees a whole block at p; AVX2 is enabled in every caller.
        unsafe { (_mm256_sub_epi8(nibbles32(p.add(2)), _mm256_set1_epi8(8)), f16(p)) }
    }
}

impl Legacy for Q50 {
    const BYTES: usize = 22;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32) {
        // SAFETY: caller guarantees a whole block at p; AVX2 is enabled in every caller.
        unsafe {
            let qh = (p.add(2) as *const u32).read_unaligned();
            let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
            (_mm256_or_si256(nibbles32(p.add(6)), hi), f16(p))
        }
    }
}

impl Legacy for Q80 {
    const BYTES: usize = 34;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, f32) {
        // SAFETY: caller guarantees a whole block at p.
        unsafe { (load(p.add(2)), f16(p)) }
    }
}

/// RM × RN tile of a legacy format against Q8_0 activations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_tile<L: Legacy, const RM: usize, const RN: usize>(blocks: usize, w: *const u8, ws: usize, a: *const u8, as_: usize, out: *mut f32, ldo: usize) {
    let mut acc = [[_mm256_setzero_ps(); RN]; RM];
    for j in 0..blocks {
        let mut ya = [_mm256_setzero_si256(); RN];
        let mut da = [0f32; RN];
        for c in 0..RN {
            // SAFETY: block j of activation row c is within the caller-checked range.
            unsafe {
                let ab = a.add(c * as_ + 34 * j);
                ya[c] = load(ab.add(2));
                da[c] = f16(ab);
            }
        }
        for r in 0..RM {
            // SAFETY: block j of weight row r is within the caller-checked range; prefetching
            // an address past the end is harmless (prefetches never fault).
            let (qw, dw) = unsafe {
                let p = w.add(r * ws + L::BYTES * j);
                _mm_prefetch(p.wrapping_add(PREFETCH) as *const i8, _MM_HINT_T0);
                L::unpack(p)
            };
            for c in 0..RN {
                let s = dot_i8(qw, ya[c]);
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw * da[c]), _mm256_cvtepi32_ps(s), acc[r][c]);
            }
        }
    }
    for r in 0..RM {
        for c in 0..RN {
            // SAFETY: the caller's output tile has room for (c, r).
            unsafe { *out.add(c * ldo + r) = hsum_f32(acc[r][c]) };
        }
    }
}

/// Sum over the 8 sub-blocks of `m[s]` × (sum of the 32 activations of sub-block s).
#[inline(always)]
unsafe fn mins_dot(m: &[u8; 8], bsums: *const u8) -> i32 {
    let mut s = 0i32;
    for (j, &mj) in m.iter().enumerate() {
        // SAFETY: caller guarantees the 32 bytes of bsums.
        let (b0, b1) = unsafe { ((bsums.add(4 * j) as *const i16).read_unaligned(), (bsums.add(4 * j + 2) as *const i16).read_unaligned()) };
        s += mj as i32 * (b0 as i32 + b1 as i32);
    }
    s
}

/// RM × RN tile of Q4_K (or Q5_K when `FIVE`) against Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45k_tile<const FIVE: bool, const RM: usize, const RN: usize>(blocks: usize, w: *const u8, ws: usize, a: *const u8, as_: usize, out: *mut f32, ldo: usize) {
    let bb = if FIVE { 176 } else { 144 };
    let qs_off = if FIVE { 48 } else { 16 };
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); RN]; RM];
    let mut corr = [[0f32; RN]; RM];
    for j in 0..blocks {
        let mut wb = [std::ptr::null::<u8>(); RM];
        let mut sc = [[0u8; 8]; RM];
        let mut dw = [0f32; RM];
        let mut da = [0f32; RN];
        let mut ab = [std::ptr::null::<u8>(); RN];
        for c in 0..RN {
            // SAFETY: block j of activation row c is within the caller-checked range.
            unsafe {
                ab[c] = a.add(c * as_ + 292 * j);
                da[c] = (ab[c] as *const f32).read_unaligned();
            }
        }
        for r in 0..RM {
            // SAFETY: block j of weight row r is within the caller-checked range.
            unsafe {
                wb[r] = w.add(r * ws + bb * j);
                prefetch_block(wb[r], bb);
                let (s, m) = super::avx2::scales_mins_k4(wb[r].add(4));
                sc[r] = s;
                dw[r] = f16(wb[r]);
                let dmin = f16(wb[r].add(2));
                for c in 0..RN {
                    corr[r][c] += dmin * da[c] * mins_dot(&m, ab[c].add(260)) as f32;
                }
            }
        }
        let mut sumi = [[_mm256_setzero_si256(); RN]; RM];
        for chunk in 0..4 {
            let mut ylo = [_mm256_setzero_si256(); RN];
            let mut yhi = [_mm256_setzero_si256(); RN];
            for c in 0..RN {
                // SAFETY: within activation block j.
                unsafe {
                    ylo[c] = load(ab[c].add(4 + 64 * chunk));
                    yhi[c] = load(ab[c].add(4 + 64 * chunk + 32));
                }
            }
            for r in 0..RM {
                // SAFETY: within weight block j.
                let q = unsafe { load(wb[r].add(qs_off + 32 * chunk)) };
                let mut lo = _mm256_and_si256(q, mask);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                if FIVE {
                    // SAFETY: within weight block j (qh at 16..48).
                    let qh = unsafe { load(wb[r].add(16)) };
                    let shift = _mm_cvtsi32_si128(2 * chunk as i32);
                    let b0 = _mm256_and_si256(_mm256_srl_epi16(qh, shift), _mm256_set1_epi8(1));
                    let b1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * chunk as i32 + 1)), _mm256_set1_epi8(1));
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
                }
                let (s_lo, s_hi) = (_mm256_set1_epi16(sc[r][2 * chunk] as i16), _mm256_set1_epi16(sc[r][2 * chunk + 1] as i16));
                for c in 0..RN {
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo[c]), s_lo),
                        _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi[c]), s_hi),
                    );
                    sumi[r][c] = _mm256_add_epi32(sumi[r][c], p);
                }
            }
        }
        for r in 0..RM {
            for c in 0..RN {
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * da[c]), _mm256_cvtepi32_ps(sumi[r][c]), acc[r][c]);
            }
        }
    }
    for r in 0..RM {
        for c in 0..RN {
            // SAFETY: the caller's output tile has room for (c, r).
            unsafe { *out.add(c * ldo + r) = hsum_f32(acc[r][c]) - corr[r][c] };
        }
    }
}

/// RM × RN tile of Q6_K against Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_tile<const RM: usize, const RN: usize>(blocks: usize, w: *const u8, ws: usize, a: *const u8, as_: usize, out: *mut f32, ldo: usize) {
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(0x03);
    let mut acc = [[0f32; RN]; RM];
    for j in 0..blocks {
        let mut wb = [std::ptr::null::<u8>(); RM];
        let mut ab = [std::ptr::null::<u8>(); RN];
        let mut da = [0f32; RN];
        let mut offset = [[0i32; RN]; RM];
        for c in 0..RN {
            // SAFETY: block j of activation row c is within the caller-checked range.
            unsafe {
                ab[c] = a.add(c * as_ + 292 * j);
                da[c] = (ab[c] as *const f32).read_unaligned();
            }
        }
        for r in 0..RM {
            // SAFETY: block j of weight row r is within the caller-checked range.
            unsafe {
                wb[r] = w.add(r * ws + 210 * j);
                prefetch_block(wb[r], 210);
                let sc = wb[r].add(192) as *const i8;
                for c in 0..RN {
                    let bs = ab[c].add(260) as *const i16;
                    let mut o = 0i32;
                    for s in 0..16 {
                        o += *sc.add(s) as i32 * bs.add(s).read_unaligned() as i32;
                    }
                    offset[r][c] = o;
                }
            }
        }
        let mut sumi = [[_mm256_setzero_si256(); RN]; RM];
        for half in 0..2 {
            for qi in 0..4 {
                let mut y = [_mm256_setzero_si256(); RN];
                for c in 0..RN {
                    // SAFETY: within activation block j.
                    y[c] = unsafe { load(ab[c].add(4 + 128 * half + 32 * qi)) };
                }
                for r in 0..RM {
                    // SAFETY: within weight block j (ql at 0..128, qh at 128..192, scales at 192..208).
                    unsafe {
                        let ql = load(wb[r].add(64 * half + 32 * (qi & 1)));
                        let qh = load(wb[r].add(128 + 32 * half));
                        let low = if qi < 2 { _mm256_and_si256(ql, m4) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4) };
                        let high = match qi {
                            0 => _mm256_and_si256(qh, m2),
                            1 => _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2),
                            2 => _mm256_and_si256(_mm256_srli_epi16(qh, 4), m2),
                            _ => _mm256_and_si256(_mm256_srli_epi16(qh, 6), m2),
                        };
                        let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                        let sc = wb[r].add(192 + 8 * half + 2 * qi) as *const i8;
                        let scales = _mm256_set_m128i(_mm_set1_epi16(*sc.add(1) as i16), _mm_set1_epi16(*sc as i16));
                        for c in 0..RN {
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y[c]), scales);
                            sumi[r][c] = _mm256_add_epi32(sumi[r][c], p);
                        }
                    }
                }
            }
        }
        for r in 0..RM {
            // SAFETY: within weight block j.
            let d = unsafe { f16(wb[r].add(208)) };
            for c in 0..RN {
                // Stored values are q + 32: subtract 32 × Σ scale × bsum.
                let total = super::avx2::hsum_i32(sumi[r][c]) - 32 * offset[r][c];
                acc[r][c] += d * da[c] * total as f32;
            }
        }
    }
    for r in 0..RM {
        for c in 0..RN {
            // SAFETY: the caller's output tile has room for (c, r).
            unsafe { *out.add(c * ldo + r) = acc[r][c] };
        }
    }
}

macro_rules! tile_table {
    ($f:ident $(:: <$($g:tt),*>)?) => {
        [
            [$f::<$($($g,)*)? 1, 1> as Tile, $f::<$($($g,)*)? 1, 2>, $f::<$($($g,)*)? 1, 3>, $f::<$($($g,)*)? 1, 4>],
            [$f::<$($($g,)*)? 2, 1>, $f::<$($($g,)*)? 2, 2>, $f::<$($($g,)*)? 2, 3>, $f::<$($($g,)*)? 2, 4>],
            [$f::<$($($g,)*)? 3, 1>, $f::<$($($g,)*)? 3, 2>, $f::<$($($g,)*)? 3, 3>, $f::<$($($g,)*)? 3, 4>],
            [$f::<$($($g,)*)? 4, 1>, $f::<$($($g,)*)? 4, 2>, $f::<$($($g,)*)? 4, 3>, $f::<$($($g,)*)? 4, 4>],
        ]
    };
}

/// Tile functions indexed [rows - 1][cols - 1], and the preferred tile shape for many columns.
fn tiles(dtype: DType) -> Option<([[Tile; 4]; 4], usize, usize)> {
    Some(match dtype {
        DType::Q4_0 => (tile_table!(legacy_tile::<Q40>), 4, 2),
        DType::Q5_0 => (tile_table!(legacy_tile::<Q50>), 4, 2),
        DType::Q8_0 => (tile_table!(legacy_tile::<Q80>), 4, 2),
        DType::Q4_K => (tile_table!(q45k_tile::<false>), 2, 2),
        DType::Q5_K => (tile_table!(q45k_tile::<true>), 2, 2),
        DType::Q6_K => (tile_table!(q6k_tile), 2, 2),
        _ => return None,
    })
}

/// Whether a tiled kernel exists for this weight format.
pub fn has_gemm(dtype: DType) -> bool {
    tiles(dtype).is_some()
}

/// out[c * nr + r] = w_row(r) · a_row(c) for r < nr, c < nc (see `dispatch::GemmFn`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(dtype: DType, k: usize, w: &[u8], w_stride: usize, nr: usize, a: &[u8], a_stride: usize, nc: usize, out: &mut [f32]) {
    let (table, rm_pref, rn_pref) = tiles(dtype).expect("no tiled kernel for this format");
    let blocks = k / dtype.block_len();
    assert!(k % dtype.block_len() == 0 && blocks * dtype.block_bytes() <= w_stride);
    let vt = dtype.vec_dot_type();
    assert!(k / vt.block_len() * vt.block_bytes() <= a_stride);
    assert!(nr == 0 || w.len() >= (nr - 1) * w_stride + blocks * dtype.block_bytes());
    assert!(nc == 0 || a.len() >= (nc - 1) * a_stride + k / vt.block_len() * vt.block_bytes());
    assert!(out.len() >= nr * nc);
    // A single column (decoding): k-quant rows are best done one at a time (their unpacking
    // has nothing to share); legacy formats gain from four independent accumulators.
    if nc == 1 && dtype.block_len() == crate::formats::QK_K {
        let dot = match dtype {
            DType::Q4_K => super::avx2::dot_q4_k,
            DType::Q5_K => super::avx2::dot_q5_k,
            _ => super::avx2::dot_q6_k,
        };
        for (r, o) in out.iter_mut().enumerate().take(nr) {
            *o = dot(k, &w[r * w_stride..], a);
        }
        return;
    }
    let (rm_pref, rn_pref) = if nc == 1 { (4, 1) } else { (rm_pref, rn_pref) };
    let mut c = 0;
    while c < nc {
        let rn = rn_pref.min(nc - c);
        let mut r = 0;
        while r < nr {
            let rm = rm_pref.min(nr - r);
            // SAFETY: the tile reads rows r..r+rm of w and c..c+rn of a, all within the lengths
            // asserted above, writes (c', r') < (nc, nr) of out, and this CPU has AVX2/FMA/F16C
            // (this module is only installed in the dispatch table after checking).
            unsafe {
                table[rm - 1][rn - 1](blocks, w.as_ptr().add(r * w_stride), w_stride, a.as_ptr().add(c * a_stride), a_stride, out.as_mut_ptr().add(c * nr + r), nr);
            }
            r += rm;
        }
        c += rn;
    }
}
