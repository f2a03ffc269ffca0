//! AVX2 + FMA + F16C kernels (x86-64). Safe wrappers check slice lengths; the `unsafe` inner
//! functions require the CPU features, which the dispatch table verifies before installing them.

use crate::formats::{DType, QK_K};
use std::arch::x86_64::*;

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


/// Whether this CPU can run the kernels in this file.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

fn check(dtype: DType, n: usize, w: &[u8], a: &[u8]) -> usize {
    let blocks = n / dtype.block_len();
    let vt = dtype.vec_dot_type();
    assert!(n % dtype.block_len() == 0);
    assert!(w.len() >= blocks * dtype.block_bytes());
    assert!(a.len() >= n / vt.block_len() * vt.block_bytes());
    blocks
}

macro_rules! safe_dot {
    ($name:ident, $dtype:expr, $inner:ident) => {
        pub fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let blocks = check($dtype, n, w, a);
            // SAFETY: installed only when `available()`; lengths checked above.
            unsafe { $inner(blocks, w.as_ptr(), a.as_ptr()) }
        }
    };
}

safe_dot!(dot_q4_0, DType::Q4_0, q4_0_q8_0);
safe_dot!(dot_q5_0, DType::Q5_0, q5_0_q8_0);
safe_dot!(dot_q8_0, DType::Q8_0, q8_0_q8_0);
safe_dot!(dot_q4_1, DType::Q4_1, q4_1_q8_1);
safe_dot!(dot_q5_1, DType::Q5_1, q5_1_q8_1);
safe_dot!(dot_q4_k, DType::Q4_K, q4_k_q8_k);
safe_dot!(dot_q5_k, DType::Q5_K, q5_k_q8_k);
safe_dot!(dot_q6_k, DType::Q6_K, q6_k_q8_k);

pub fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(w.len() >= 4 * n && a.len() >= 4 * n);
    // SAFETY: installed only when `available()`; lengths checked above.
    unsafe { f32_f32(n, w.as_ptr(), a.as_ptr()) }
}

pub fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    assert!(w.len() >= 2 * n && a.len() >= 4 * n);
    // SAFETY: installed only when `available()`; lengths checked above.
    unsafe { f16_f32(n, w.as_ptr(), a.as_ptr()) }
}

pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert!(x.len() % 32 == 0 && out.len() >= x.len() / 32 * 34);
    // SAFETY: installed only when `available()`; lengths checked above.
    unsafe { quant_q8_0(x, out.as_mut_ptr()) }
}

pub fn quantize_q8_k(x: &[f32], out: &mut [u8]) {
    assert!(x.len() % QK_K == 0 && out.len() >= x.len() / QK_K * 292);
    // SAFETY: installed only when `available()`; lengths checked above.
    unsafe { quant_q8_k(x, out.as_mut_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16(p: *const u8) -> f32 {
    // SAFETY: caller guarantees 2 readable bytes at p.
    let bits = unsafe { (p as *const u16).read_unaligned() };
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Sum of products of 32 signed bytes, as 8 i32 lanes. Neither input may hold -128.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_i8(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// Sum of products of 32 unsigned bytes (< 128) with 32 signed bytes, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

/// 16 packed nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles32(p: *const u8) -> __m256i {
    // SAFETY: caller guarantees 16 readable bytes at p.
    let q = unsafe { _mm_loadu_si128(p as *const __m128i) };
    let m = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m))
}

/// 32 bits → 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bits_to_bytes(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let spread = _mm256_shuffle_epi8(
        v,
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
    );
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn load(p: *const u8) -> __m256i {
    // SAFETY: caller guarantees 32 readable bytes at p.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_0_q8_0(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (18 B per weight block, 34 per activation).
        unsafe {
            let (wb, ab) = (w.add(18 * i), a.add(34 * i));
            let q = _mm256_sub_epi8(nibbles32(wb.add(2)), _mm256_set1_epi8(8));
            let s = dot_i8(q, load(ab.add(2)));
            let d = _mm256_set1_ps(f16(wb) * f16(ab));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
        }
    }
    hsum_f32(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_0_q8_0(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (22 B per weight block, 34 per activation).
        unsafe {
            let (wb, ab) = (w.add(22 * i), a.add(34 * i));
            let qh = (wb.add(2) as *const u32).read_unaligned();
            // Where the fifth bit is clear, set the top nibble: nibble | 0xF0 == nibble - 16 as i8.
            let hi = _mm256_andnot_si256(bits_to_bytes(qh), _mm256_set1_epi8(0xF0u8 as i8));
            let q = _mm256_or_si256(nibbles32(wb.add(6)), hi);
            let s = dot_i8(q, load(ab.add(2)));
            let d = _mm256_set1_ps(f16(wb) * f16(ab));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
        }
    }
    hsum_f32(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (34 B per block on both sides).
        unsafe {
            let (wb, ab) = (w.add(34 * i), a.add(34 * i));
            let s = dot_i8(load(wb.add(2)), load(ab.add(2)));
            let d = _mm256_set1_ps(f16(wb) * f16(ab));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
        }
    }
    hsum_f32(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_1_q8_1(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (20 B per weight block, 36 per activation).
        unsafe {
            let (wb, ab) = (w.add(20 * i), a.add(36 * i));
            let s = dot_u8_i8(nibbles32(wb.add(4)), load(ab.add(4)));
            let d = _mm256_set1_ps(f16(wb) * f16(ab));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
            mins += f16(wb.add(2)) * f16(ab.add(2));
        }
    }
    hsum_f32(acc) + mins
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_1_q8_1(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut mins = 0f32;
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (24 B per weight block, 36 per activation).
        unsafe {
            let (wb, ab) = (w.add(24 * i), a.add(36 * i));
            let qh = (wb.add(4) as *const u32).read_unaligned();
            let hi = _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10));
            let q = _mm256_or_si256(nibbles32(wb.add(8)), hi);
            let s = dot_u8_i8(q, load(ab.add(4)));
            let d = _mm256_set1_ps(f16(wb) * f16(ab));
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc);
            mins += f16(wb.add(2)) * f16(ab.add(2));
        }
    }
    hsum_f32(acc) + mins
}

/// The 8 scales and 8 mins of a Q4_K/Q5_K block (12 packed bytes at p).
#[inline]
pub(super) unsafe fn scales_mins_k4(p: *const u8) -> ([u8; 8], [u8; 8]) {
    let mut b = [0u8; 12];
    // SAFETY: caller guarantees 12 readable bytes at p.
    unsafe { std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), 12) };
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = b[j] & 63;
        mn[j] = b[j + 4] & 63;
        sc[j + 4] = (b[j + 8] & 0x0f) | ((b[j] >> 6) << 4);
        mn[j + 4] = (b[j + 8] >> 4) | ((b[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// Sum over the 8 32-element sub-blocks of mins[j] * (sum of the activations in sub-block j).
#[inline]
unsafe fn mins_dot_bsums(mn: &[u8; 8], bsums: *const u8) -> i32 {
    let mut s = 0i32;
    for j in 0..8 {
        // SAFETY: caller guarantees the 32 bytes of bsums at `bsums`.
        let (b0, b1) = unsafe { ((bsums.add(4 * j) as *const i16).read_unaligned(), (bsums.add(4 * j + 2) as *const i16).read_unaligned()) };
        s += mn[j] as i32 * (b0 as i32 + b1 as i32);
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_k_q8_k(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0f32;
    let mask = _mm256_set1_epi8(0x0f);
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (144 B per weight block, 292 per activation).
        prefetch_block(w.add(144 * i), 144);
        unsafe {
            let (wb, ab) = (w.add(144 * i), a.add(292 * i));
            let da = (ab as *const f32).read_unaligned();
            let (sc, mn) = scales_mins_k4(wb.add(4));
            let qs = wb.add(16);
            let q8 = ab.add(4);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q = load(qs.add(32 * j));
                let lo = _mm256_and_si256(q, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                let p_lo = _mm256_maddubs_epi16(lo, load(q8.add(64 * j)));
                let p_hi = _mm256_maddubs_epi16(hi, load(q8.add(64 * j + 32)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_lo, _mm256_set1_epi16(sc[2 * j] as i16)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_hi, _mm256_set1_epi16(sc[2 * j + 1] as i16)));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(da * f16(wb)), _mm256_cvtepi32_ps(sumi), acc);
            acc_m += da * f16(wb.add(2)) * mins_dot_bsums(&mn, ab.add(260)) as f32;
        }
    }
    hsum_f32(acc) - acc_m
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q5_k_q8_k(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = 0f32;
    let mask = _mm256_set1_epi8(0x0f);
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (176 B per weight block, 292 per activation).
        prefetch_block(w.add(176 * i), 176);
        unsafe {
            let (wb, ab) = (w.add(176 * i), a.add(292 * i));
            let da = (ab as *const f32).read_unaligned();
            let (sc, mn) = scales_mins_k4(wb.add(4));
            let qh = load(wb.add(16));
            let qs = wb.add(48);
            let q8 = ab.add(4);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                let q = load(qs.add(32 * j));
                // Bit (2j) of each qh byte is the fifth bit of the low half, bit (2j+1) of the high.
                let h_lo = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)), _mm256_set1_epi8(1));
                let h_hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32 + 1)), _mm256_set1_epi8(1));
                let lo = _mm256_or_si256(_mm256_and_si256(q, mask), _mm256_slli_epi16(h_lo, 4));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), mask), _mm256_slli_epi16(h_hi, 4));
                let p_lo = _mm256_maddubs_epi16(lo, load(q8.add(64 * j)));
                let p_hi = _mm256_maddubs_epi16(hi, load(q8.add(64 * j + 32)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_lo, _mm256_set1_epi16(sc[2 * j] as i16)));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p_hi, _mm256_set1_epi16(sc[2 * j + 1] as i16)));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(da * f16(wb)), _mm256_cvtepi32_ps(sumi), acc);
            acc_m += da * f16(wb.add(2)) * mins_dot_bsums(&mn, ab.add(260)) as f32;
        }
    }
    hsum_f32(acc) - acc_m
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_k_q8_k(blocks: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = 0f32;
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(0x03);
    for i in 0..blocks {
        // SAFETY: block i lies within the checked lengths (210 B per weight block, 292 per activation).
        prefetch_block(w.add(210 * i), 210);
        unsafe {
            let (wb, ab) = (w.add(210 * i), a.add(292 * i));
            let da = (ab as *const f32).read_unaligned();
            let sc = wb.add(192) as *const i8;
            let q8 = ab.add(4);
            let bsums = ab.add(260) as *const i16;
            // q is stored as (value + 32) in 0..64: subtract 32 * sum(scale * bsum) at the end.
            let mut offset = 0i32;
            for s in 0..16 {
                offset += *sc.add(s) as i32 * bsums.add(s).read_unaligned() as i32;
            }
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                let ql0 = load(wb.add(64 * half));
                let ql1 = load(wb.add(64 * half + 32));
                let qh = load(wb.add(128 + 32 * half));
                let quarters = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)),
                ];
                for (qi, q) in quarters.iter().enumerate() {
                    let s0 = 8 * half + 2 * qi;
                    let p = _mm256_maddubs_epi16(*q, load(q8.add(128 * half + 32 * qi)));
                    let scales = _mm256_set_m128i(_mm_set1_epi16(*sc.add(s0 + 1) as i16), _mm_set1_epi16(*sc.add(s0) as i16));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
                }
            }
            let total = hsum_i32(sumi) - 32 * offset;
            acc += da * f16(wb.add(208)) * total as f32;
        }
    }
    acc
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (w, a) = (w as *const f32, a as *const f32);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads below): i + width <= n and both rows hold n f32 (checked by the wrapper).
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            *acc = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(w.add(i + 8 * k)), _mm256_loadu_ps(a.add(i + 8 * k)), *acc) };
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(w.add(i)), _mm256_loadu_ps(a.add(i)), acc[0]) };
        i += 8;
    }
    let mut s = hsum_f32(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    while i < n {
        s += unsafe { *w.add(i) * *a.add(i) };
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f32(n: usize, w: *const u8, a: *const u8) -> f32 {
    let a = a as *const f32;
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    // SAFETY (all loads below): i + width <= n; w holds n f16 and a holds n f32 (checked by the wrapper).
    while i + 16 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            unsafe {
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * (i + 8 * k)) as *const __m128i));
                *acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.add(i + 8 * k)), *acc);
            }
        }
        i += 16;
    }
    let mut s = hsum_f32(_mm256_add_ps(acc[0], acc[1]));
    while i < n {
        s += unsafe { f16(w.add(2 * i)) * *a.add(i) };
        i += 1;
    }
    s
}

/// Round 32 floats (already scaled) to i8 with ties to even, in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack_i8(v: [__m256; 4]) -> __m256i {
    let r = |x: __m256| _mm256_cvtps_epi32(_mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    let (i0, i1, i2, i3) = (r(v[0]), r(v[1]), r(v[2]), r(v[3]));
    let p01 = _mm256_packs_epi32(i0, i1);
    let p23 = _mm256_packs_epi32(i2, i3);
    let p = _mm256_packs_epi16(p01, p23);
    // packs interleave 128-bit lanes; restore element order.
    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant_q8_0(x: &[f32], out: *mut u8) {
    let sign = _mm256_set1_ps(-0.0);
    for (i, blk) in x.chunks_exact(32).enumerate() {
        // SAFETY: the wrapper checked out holds 34 bytes per 32 inputs; blk holds 32 floats.
        unsafe {
            let p = blk.as_ptr();
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vk in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vk));
            }
            let m128 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m128 = _mm_max_ps(m128, _mm_movehl_ps(m128, m128));
            let m128 = _mm_max_ss(m128, _mm_movehdup_ps(m128));
            let amax = _mm_cvtss_f32(m128);
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let idv = _mm256_set1_ps(id);
            let q = pack_i8([_mm256_mul_ps(v[0], idv), _mm256_mul_ps(v[1], idv), _mm256_mul_ps(v[2], idv), _mm256_mul_ps(v[3], idv)]);
            let ob = out.add(34 * i);
            (ob as *mut u16).write_unaligned(half::f16::from_f32(d).to_bits());
            _mm256_storeu_si256(ob.add(2) as *mut __m256i, q);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quant_q8_k(x: &[f32], out: *mut u8) {
    for (i, blk) in x.chunks_exact(QK_K).enumerate() {
        // SAFETY: the wrapper checked out holds 292 bytes per 256 inputs; blk holds 256 floats.
        unsafe {
            let ob = out.add(292 * i);
            let mut amax = 0f32;
            let mut max = 0f32;
            for &v in blk {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            if amax == 0.0 {
                std::ptr::write_bytes(ob, 0, 292);
                continue;
            }
            let iscale = -127.0 / max;
            let iv = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_ps(127.0);
            let p = blk.as_ptr();
            for g in 0..8 {
                let v: [__m256; 4] = std::array::from_fn(|k| _mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(p.add(32 * g + 8 * k)), iv), cap));
                let q = pack_i8(v);
                _mm256_storeu_si256(ob.add(4 + 32 * g) as *mut __m256i, q);
                // Two bsums (16 elements each) from the 32 bytes just written.
                let s16 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1));
                let lo = _mm256_castsi256_si128(s16);
                let hi = _mm256_extracti128_si256(s16, 1);
                let sum_lo = _mm_cvtsi128_si32(_mm_hadd_epi32(_mm_hadd_epi32(lo, lo), lo));
                let sum_hi = _mm_cvtsi128_si32(_mm_hadd_epi32(_mm_hadd_epi32(hi, hi), hi));
                (ob.add(260 + 4 * g) as *mut i16).write_unaligned(sum_lo as i16);
                (ob.add(262 + 4 * g) as *mut i16).write_unaligned(sum_hi as i16);
            }
            (ob as *mut f32).write_unaligned(1.0 / iscale);
        }
    }
}
