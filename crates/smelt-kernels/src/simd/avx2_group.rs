//! Group kernels (AVX2): the fast path for the common weight formats, shared by decoding (one
//! activation row) and prompt processing (many rows), with the *same arithmetic per output* in
//! both, so a token's logits never depend on how many tokens are in the batch.
//!
//! Weights are handled in groups of 128 elements (four 32-element units). A group unpacks to
//! four vectors of small integers `u` (unsigned where the format allows, so no sign tricks are
//! needed), a vector of per-16-element scales `sw` and one of per-16 offsets `cw`:
//!     w[e] = sw[lane(e)] * u[e] + cw[lane(e)]
//! with lanes ordered [unit0.lo, unit1.lo, unit2.lo, unit3.lo, unit0.hi, …, unit3.hi]
//! (".lo" = the unit's first 16 elements). Activations are Q8_0 (a scale per 32 values) for
//! every weight format — finer than the per-256 scales (Q8_K) llama.cpp uses with k-quants, so
//! closer to full precision at no cost here — and are prepared once per matrix product into the
//! matching per-16 vectors `sa` (scale) and `ea` (scale × sum of the 16 quantized values), plus
//! a copy of the quantized values in the order of the unpacked weights. Then per group:
//!     s   = the 8 per-16 integer sums Σ u·q (maddubs, 16-bit adds, madd; see `sums`)
//!     acc = fma(cvt(s), sw·sa, acc);  acc = fma(cw, ea, acc)
//! and the result is the horizontal sum of `acc`. For decoding, groups are unpacked into
//! registers as they stream in; for many activation rows, a chunk of weight rows is unpacked
//! once into a buffer and reused for every activation row. Both call the same `unpack` and the
//! same `accumulate`.

use super::avx2::{bits_to_bytes, f16, hsum_f32, load, nibbles32};
use super::avx2::{prefetch_block, PREFETCH};
use crate::formats::DType;
use std::arch::x86_64::*;
use std::cell::RefCell;

pub const GROUP: usize = 128;

/// Floats of activation preparation per group: `sa` (8), `ea` (8), then the group's 128
/// quantized activation bytes in interleaved order (32 floats' worth; see [`interleave`]).
const PREP: usize = 48;

/// Where the interleaved activation bytes start within a group's preparation.
const PREP_Q: usize = 16;

/// Activation rows per block in the buffered (many-row) product; even, so pairs never straddle.
const COL_BLOCK: usize = 16;

/// One unpacked group.
#[derive(Clone, Copy)]
struct Group {
    u: [__m256i; 4],
    sw: __m256,
    cw: __m256,
}

const fn dtype_of<const T: u32>() -> DType {
    match T {
        2 => DType::Q4_0,
        6 => DType::Q5_0,
        8 => DType::Q8_0,
        12 => DType::Q4_K,
        13 => DType::Q5_K,
        242 => DType::Q4_0G,
        246 => DType::Q5_0G,
        248 => DType::Q8_0G,
        252 => DType::Q4_KG,
        254 => DType::Q6_KG,
        _ => DType::Q6_K,
    }
}

/// Formats with group kernels.
pub fn supported(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0
            | DType::Q5_0
            | DType::Q8_0
            | DType::Q4_K
            | DType::Q5_K
            | DType::Q6_K
            | DType::Q4_0G
            | DType::Q5_0G
            | DType::Q8_0G
            | DType::Q4_KG
            | DType::Q6_KG
    )
}

/// Whether a product of rows of `k` elements can use the group kernels.
pub fn usable(dtype: DType, k: usize) -> bool {
    supported(dtype) && k % GROUP == 0 && k > 0
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lanes(v: [f32; 4], w: [f32; 4]) -> __m256 {
    _mm256_setr_ps(v[0], v[1], v[2], v[3], w[0], w[1], w[2], w[3])
}

/// Unpack group `g` of a weight row, its units interleaved (see [`interleave`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack<const T: u32>(row: *const u8, g: usize) -> Group {
    if matches!(dtype_of::<T>(), DType::Q4_0G | DType::Q5_0G | DType::Q8_0G) {
        // SAFETY: as `unpack_grouped`, whose contract the caller keeps.
        return unsafe { unpack_grouped::<T>(row, g) };
    }
    if dtype_of::<T>() == DType::Q6_KG {
        // SAFETY: as `unpack_q6k_grouped`, whose contract the caller keeps.
        return unsafe { unpack_q6k_grouped(row, g) };
    }
    // SAFETY: as `unpack_units`, whose contract the caller keeps.
    let grp = unsafe { unpack_units::<T>(row, g) };
    Group { u: interleave(grp.u), ..grp }
}

/// Unpack group `g` of a row in a grouped layout (`formats::grouped`), which stores a group
/// already interleaved: the same `Group` as [`unpack`] gives for the file's blocks, bit for bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_grouped<const T: u32>(row: *const u8, g: usize) -> Group {
    let dtype = dtype_of::<T>();
    let gb = dtype.block_bytes();
    // SAFETY (whole function): the caller guarantees `row` holds the row's groups; group g's
    // bytes are base..base + gb, and AVX2/FMA/F16C are enabled in every caller.
    unsafe {
        let base = row.add(gb * g);
        prefetch_block(base, gb);
        // The four f16 scales twice over, converted together: [d0, d1, d2, d3] in both halves.
        let d = (base as *const u64).read_unaligned();
        let sw = _mm256_cvtph_ps(_mm_set1_epi64x(d as i64));
        if dtype == DType::Q8_0G {
            let u = std::array::from_fn(|m| load(base.add(8 + 32 * m)));
            return Group { u, sw, cw: _mm256_setzero_ps() };
        }
        let five = dtype == DType::Q5_0G;
        let lows = base.add(if five { 24 } else { 8 });
        let m4 = _mm256_set1_epi8(0x0f);
        let (v0, v1) = (load(lows), load(lows.add(32)));
        let mut u = [
            _mm256_and_si256(v0, m4),
            _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4),
            _mm256_and_si256(v1, m4),
            _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4),
        ];
        if five {
            // Byte p holds vector m's fifth bit for position p at bit m and for p + 16 at bit
            // 4 + m: shifting the low half up by 4 puts both at bit 4 + m, and a shift down by
            // m then at 0x10. (16-bit shifts move bits between bytes, but the bits kept never
            // cross one.)
            let x = _mm256_broadcastsi128_si256(_mm_loadu_si128(base.add(8) as *const __m128i));
            let z = _mm256_blend_epi32::<0xF0>(_mm256_slli_epi16(x, 4), x);
            let b = _mm256_set1_epi8(0x10);
            u[0] = _mm256_or_si256(u[0], _mm256_and_si256(z, b));
            u[1] = _mm256_or_si256(u[1], _mm256_and_si256(_mm256_srli_epi16(z, 1), b));
            u[2] = _mm256_or_si256(u[2], _mm256_and_si256(_mm256_srli_epi16(z, 2), b));
            u[3] = _mm256_or_si256(u[3], _mm256_and_si256(_mm256_srli_epi16(z, 3), b));
        }
        let cw = _mm256_mul_ps(sw, _mm256_set1_ps(if five { -16.0 } else { -8.0 }));
        Group { u, sw, cw }
    }
}

/// Interleave a group's four units so that every 4-byte lane holds elements of one per-16 sum:
/// output vector m's lane L is unit L's bytes 4m..4m+4 (lanes 0–3, the units' first 16
/// elements) or 16+4m..16+4m+4 (lanes 4–7, their last 16). Lane L of the four vectors then
/// covers exactly the elements of per-16 sum L, so products of the four vectors can be added
/// lane by lane (see [`sums`]) instead of through a horizontal-add tree. Activations are stored
/// in the same order by [`prepare_row`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn interleave(u: [__m256i; 4]) -> [__m256i; 4] {
    // A 4×4 transpose of 32-bit elements within each 128-bit half.
    let t0 = _mm256_unpacklo_epi32(u[0], u[1]);
    let t1 = _mm256_unpackhi_epi32(u[0], u[1]);
    let t2 = _mm256_unpacklo_epi32(u[2], u[3]);
    let t3 = _mm256_unpackhi_epi32(u[2], u[3]);
    [_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)]
}

/// Unpack group `g` of a weight row, units in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_units<const T: u32>(row: *const u8, g: usize) -> Group {
    let dtype = dtype_of::<T>();
    // SAFETY (whole function): the caller guarantees `row` holds the row's blocks; each branch
    // reads only the blocks of group g, and AVX2/FMA/F16C are enabled in every caller.
    unsafe {
        match dtype {
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => {
                let bb = dtype.block_bytes();
                let mut u = [_mm256_setzero_si256(); 4];
                let base = row.add(bb * 4 * g);
                // One prefetch per cache line of the group (4 blocks are 72 to 136 bytes).
                prefetch_block(base, 4 * bb);
                // The four f16 scales, converted together: [d0, d1, d2, d3] in both halves.
                let h = |i: usize| (base.add(bb * i) as *const i16).read_unaligned();
                let d4 = _mm_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0));
                let sw = _mm256_set_m128(d4, d4);
                for i in 0..4 {
                    let p = base.add(bb * i);
                    u[i] = match dtype {
                        DType::Q4_0 => nibbles32(p.add(2)),
                        DType::Q5_0 => {
                            let qh = (p.add(2) as *const u32).read_unaligned();
                            _mm256_or_si256(nibbles32(p.add(6)), _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)))
                        }
                        _ => load(p.add(2)),
                    };
                }
                let cw = match dtype {
                    DType::Q4_0 => _mm256_mul_ps(sw, _mm256_set1_ps(-8.0)),
                    DType::Q5_0 => _mm256_mul_ps(sw, _mm256_set1_ps(-16.0)),
                    _ => _mm256_setzero_ps(),
                };
                Group { u, sw, cw }
            }
            DType::Q4_K | DType::Q5_K => {
                let five = dtype == DType::Q5_K;
                let bb = if five { 176 } else { 144 };
                let b = row.add(bb * (g / 2));
                let half = g % 2;
                if half == 0 {
                    prefetch_block(b, bb);
                }
                // This half's 4 six-bit scales and mins, as bytes of a u32 each.
                let word = |o: usize| (b.add(4 + o) as *const u32).read_unaligned();
                let (sc4, mn4) = if half == 0 {
                    (word(0) & 0x3f3f3f3f, word(4) & 0x3f3f3f3f)
                } else {
                    let lo = word(8);
                    (
                        (lo & 0x0f0f0f0f) | (((word(0) >> 6) & 0x03030303) << 4),
                        ((lo >> 4) & 0x0f0f0f0f) | (((word(4) >> 6) & 0x03030303) << 4),
                    )
                };
                let to_f = |v: u32| _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(v as i32)));
                let scale = _mm_mul_ps(to_f(sc4), _mm_set1_ps(f16(b)));
                let off = _mm_mul_ps(to_f(mn4), _mm_set1_ps(-f16(b.add(2))));
                let qs = b.add(if five { 48 } else { 16 });
                let mask = _mm256_set1_epi8(0x0f);
                let mut u = [_mm256_setzero_si256(); 4];
                // Group `half` covers 64-element chunks 2*half and 2*half+1; each chunk's 32 bytes
                // hold two units (low nibbles, then high nibbles).
                for c in 0..2 {
                    let chunk = 2 * half + c;
                    let q = load(qs.add(32 * chunk));
                    let mut lo = _mm256_and_si256(q, mask);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                    if five {
                        let qh = load(b.add(16));
                        let b0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * chunk as i32)), _mm256_set1_epi8(1));
                        let b1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * chunk as i32 + 1)), _mm256_set1_epi8(1));
                        lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
                        hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
                    }
                    u[2 * c] = lo;
                    u[2 * c + 1] = hi;
                }
                Group { u, sw: _mm256_set_m128(scale, scale), cw: _mm256_set_m128(off, off) }
            }
            _ => {
                // Q6_K: group `half` is the block's 128-element half; unit i is its quarter i.
                let b = row.add(210 * (g / 2));
                let half = g % 2;
                if half == 0 {
                    prefetch_block(b, 210);
                }
                let (m4, m2) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x03));
                let ql0 = load(b.add(64 * half));
                let ql1 = load(b.add(64 * half + 32));
                let qh = load(b.add(128 + 32 * half));
                let u = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)),
                ];
                let (sw, cw) = q6k_scales(b, half);
                Group { u, sw, cw }
            }
        }
    }
}

/// Unpack group `g` of a Q6_Kg row (half g % 2 of block g / 2): the same `Group` as [`unpack`]
/// gives for the Q6_K block, bit for bit, with the quants read already interleaved.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_q6k_grouped(row: *const u8, g: usize) -> Group {
    // SAFETY (whole function): the caller guarantees `row` holds the row's blocks; block g / 2's
    // 210 bytes are b..b + 210, and AVX2/FMA/F16C are enabled in every caller.
    unsafe {
        let b = row.add(210 * (g / 2));
        let half = g % 2;
        if half == 0 {
            prefetch_block(b, 210);
        }
        let (m4, m30) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
        let (v0, v1) = (load(b.add(64 * half)), load(b.add(64 * half + 32)));
        // Bits 2m, 2m+1 of each high-bits byte are vector m's: moved to bits 4-5 by a 16-bit
        // shift of 4 - 2m (the bits kept never cross a byte).
        let qh = load(b.add(128 + 32 * half));
        let u = [
            _mm256_or_si256(_mm256_and_si256(v0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
            _mm256_or_si256(_mm256_and_si256(v1, m4), _mm256_and_si256(qh, m30)),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30)),
        ];
        let (sw, cw) = q6k_scales(b, half);
        Group { u, sw, cw }
    }
}

/// The per-16 scales and offsets of half `half` of the Q6_K (or Q6_Kg) block at `b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_scales(b: *const u8, half: usize) -> (__m256, __m256) {
    // SAFETY: the caller guarantees the block's 210 bytes at b.
    unsafe {
        let d = f16(b.add(208));
        let sc = b.add(192 + 8 * half) as *const i8;
        // Unit i's low 16 elements use scale 2i, its high 16 use 2i+1.
        let lo: [f32; 4] = std::array::from_fn(|i| d * *sc.add(2 * i) as f32);
        let hi: [f32; 4] = std::array::from_fn(|i| d * *sc.add(2 * i + 1) as f32);
        let sw = lanes(lo, hi);
        // Stored values are q + 32.
        (sw, _mm256_mul_ps(sw, _mm256_set1_ps(-32.0)))
    }
}

/// Every group of a row in order, to `f(g, group)`: Q4_K and Q4_Kg block by block (see
/// [`unpack_q4k_block`]), the rest group by group.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn for_each_group<const T: u32>(row: *const u8, groups: usize, mut f: impl FnMut(usize, &Group)) {
    let dtype = dtype_of::<T>();
    if matches!(dtype, DType::Q4_K | DType::Q4_KG) {
        for blk in 0..groups / 2 {
            // SAFETY: the caller guarantees the row holds `groups` groups (groups / 2 blocks).
            let [g0, g1] = unsafe { unpack_q4k_block(row, blk, dtype == DType::Q4_KG) };
            f(2 * blk, &g0);
            f(2 * blk + 1, &g1);
        }
    } else {
        for g in 0..groups {
            // SAFETY: as above.
            let grp = unsafe { unpack::<T>(row, g) };
            f(g, &grp);
        }
    }
}

/// Both groups of Q4_K block `blk` of a row (its two 128-element halves; `grouped`: of a Q4_Kg
/// row, whose quants are stored already interleaved), with the per-block work done once: the
/// f16 scales, the six-bit scales and mins (all eight of each in one conversion), and one
/// prefetch. Per half, that work was a third of the kernel's instructions.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_q4k_block(row: *const u8, blk: usize, grouped: bool) -> [Group; 2] {
    // SAFETY (whole function): the caller guarantees `row` holds the row's blocks; block blk's
    // 144 bytes are b..b + 144, and AVX2/FMA/F16C are enabled in every caller.
    unsafe {
        let b = row.add(144 * blk);
        prefetch_block(b, 144);
        let word = |o: usize| (b.add(4 + o) as *const u32).read_unaligned();
        let (w0, w1, w2) = (word(0), word(4), word(8));
        // Scales (mins) of sub-blocks 0..4 are the low six bits of bytes 0..4 (4..8); those of
        // 4..8 take their low four bits from bytes 8..12 and their top two from bits 6-7 of
        // bytes 0..4 (4..8).
        let sc = _mm_set_epi32(0, 0, ((w2 & 0x0f0f0f0f) | (((w0 >> 6) & 0x03030303) << 4)) as i32, (w0 & 0x3f3f3f3f) as i32);
        let mn = _mm_set_epi32(0, 0, (((w2 >> 4) & 0x0f0f0f0f) | (((w1 >> 6) & 0x03030303) << 4)) as i32, (w1 & 0x3f3f3f3f) as i32);
        let scale = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)), _mm256_set1_ps(f16(b)));
        let off = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)), _mm256_set1_ps(-f16(b.add(2))));
        let mask = _mm256_set1_epi8(0x0f);
        let half = |h: usize, sw: __m256, cw: __m256| {
            // Q4_K: chunks 2h and 2h+1 (64 elements each), low nibbles then high nibbles per
            // chunk. Q4_Kg: the same bytes, already in interleaved order (as Q4_0g's).
            let (q0, q1) = (load(b.add(16 + 64 * h)), load(b.add(16 + 64 * h + 32)));
            let u = [
                _mm256_and_si256(q0, mask),
                _mm256_and_si256(_mm256_srli_epi16(q0, 4), mask),
                _mm256_and_si256(q1, mask),
                _mm256_and_si256(_mm256_srli_epi16(q1, 4), mask),
            ];
            Group { u: if grouped { u } else { interleave(u) }, sw, cw }
        };
        [
            half(0, _mm256_permute2f128_ps::<0x00>(scale, scale), _mm256_permute2f128_ps::<0x00>(off, off)),
            half(1, _mm256_permute2f128_ps::<0x11>(scale, scale), _mm256_permute2f128_ps::<0x11>(off, off)),
        ]
    }
}

/// The 8 per-16 integer sums of an interleaved group against its 128 interleaved activation
/// bytes at `q`, in lane order.
///
/// `maddubs` leaves 16-bit sums of two products; lanes of the four vectors belong to the same
/// per-16 sum, so they are added as 16-bit integers while that cannot overflow, and widened
/// with one `madd` per vector sum. Activations lie in [-128, 127]; unsigned weights below 32
/// (4- and 5-bit formats) give at most 8 · 31 · 128 = 31,744 for all four vectors; Q6_K's
/// (below 64) at most 4 · 63 · 128 = 32,256 for two; Q8_0 (signed, sign trick) widens each
/// vector. The integer sums are exact either way, so the result is the same as widening
/// every product.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sums<const T: u32>(u: &[__m256i; 4], q: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 128 readable bytes at q.
    let y: [__m256i; 4] = unsafe { std::array::from_fn(|i| load(q.add(32 * i))) };
    let ones = _mm256_set1_epi16(1);
    match dtype_of::<T>() {
        DType::Q8_0 | DType::Q8_0G => {
            let m: [__m256i; 4] = std::array::from_fn(|i| {
                _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(u[i], u[i]), _mm256_sign_epi8(y[i], u[i])), ones)
            });
            _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), _mm256_add_epi32(m[2], m[3]))
        }
        DType::Q6_K | DType::Q6_KG => {
            let p: [__m256i; 4] = std::array::from_fn(|i| _mm256_maddubs_epi16(u[i], y[i]));
            let lo = _mm256_madd_epi16(_mm256_add_epi16(p[0], p[1]), ones);
            _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_add_epi16(p[2], p[3]), ones))
        }
        _ => {
            let p: [__m256i; 4] = std::array::from_fn(|i| _mm256_maddubs_epi16(u[i], y[i]));
            _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])), ones)
        }
    }
}

/// Q8_0 weights are signed bytes; everything else unpacks to unsigned values plus an offset.
const fn has_offset(dtype: DType) -> bool {
    !matches!(dtype, DType::Q8_0 | DType::Q8_0G)
}

/// acc += cvt(s)·(sw·sa) + cw·ea — the one accumulation step both paths share.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate<const T: u32>(acc: __m256, s: __m256i, sw: __m256, cw: __m256, prep: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 16 readable floats at prep.
    unsafe {
        let sa = _mm256_loadu_ps(prep);
        let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(sw, sa), acc);
        if has_offset(dtype_of::<T>()) {
            _mm256_fmadd_ps(cw, _mm256_loadu_ps(prep.add(8)), acc)
        } else {
            acc
        }
    }
}

/// Prepare Q8_0 activation rows (`a_stride` bytes apart) for the group kernels: per group,
/// 8 scales then 8 scale × sum values, in lane order.
pub fn prepare(k: usize, a: &[u8], a_stride: usize, nc: usize, out: &mut Vec<f32>) {
    let per_row = prepared_len(k);
    out.clear();
    out.resize(nc * per_row, 0.0);
    for c in 0..nc {
        prepare_row(k, &a[c * a_stride..], &mut out[c * per_row..(c + 1) * per_row]);
    }
}

/// Floats [`prepare_row`] writes for a row of `k` elements.
pub fn prepared_len(k: usize) -> usize {
    k / GROUP * PREP
}

/// [`prepare`] for one activation row.
pub fn prepare_row(k: usize, row: &[u8], dst: &mut [f32]) {
    for g in 0..k / GROUP {
        let dst = &mut dst[g * PREP..(g + 1) * PREP];
        for i in 0..4 {
            let blk = &row[34 * (4 * g + i)..];
            let d = half::f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
            let sum = |r: std::ops::Range<usize>| blk[r].iter().map(|&b| b as i8 as i32).sum::<i32>();
            dst[i] = d;
            dst[4 + i] = d;
            dst[8 + i] = d * sum(2..18) as f32;
            dst[12 + i] = d * sum(18..34) as f32;
            // The quantized bytes in `interleave` order, four per float slot (copied as bits).
            for m in 0..4 {
                let four = |o: usize| f32::from_ne_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
                dst[PREP_Q + 8 * m + i] = four(2 + 4 * m);
                dst[PREP_Q + 8 * m + 4 + i] = four(18 + 4 * m);
            }
        }
    }
}

/// 1 weight row × RN activation rows, unpacking each group once in registers (small batches:
/// several sequences decoding together).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn stream_cols<const T: u32, const RN: usize>(groups: usize, w: *const u8, prep: *const f32, out: *mut f32, ldo: usize) {
    let mut acc = [_mm256_setzero_ps(); RN];
    let step = |acc: &mut [__m256; RN], grp: &Group, g: usize| {
        for c in 0..RN {
            // SAFETY: activation rows c < RN and group g are within the caller-checked ranges.
            unsafe {
                let pc = prep.add((c * groups + g) * PREP);
                let sm = sums::<T>(&grp.u, pc.add(PREP_Q) as *const u8);
                acc[c] = accumulate::<T>(acc[c], sm, grp.sw, grp.cw, pc);
            }
        }
    };
    // SAFETY: the row holds `groups` groups (caller-checked).
    unsafe { for_each_group::<T>(w, groups, |g, grp| step(&mut acc, grp, g)) };
    for c in 0..RN {
        // SAFETY: the caller's output has room for RN entries ldo apart.
        unsafe { *out.add(c * ldo) = hsum_f32(acc[c]) };
    }
}

/// Weight rows unpacked once, for reuse across many activation rows.
#[derive(Default)]
struct Unpacked {
    /// Per row: groups × 4 units × 32 bytes.
    u: Vec<__m256i>,
    /// Per row: groups × (sw, cw).
    s: Vec<(__m256, __m256)>,
}

thread_local! {
    static UNPACKED: RefCell<Unpacked> = RefCell::new(Unpacked::default());
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_rows<const T: u32>(groups: usize, w: *const u8, ws: usize, nr: usize, into: &mut Unpacked) {
    into.u.clear();
    into.s.clear();
    for r in 0..nr {
        // SAFETY: rows and groups within the caller-checked ranges.
        unsafe {
            for_each_group::<T>(w.add(r * ws), groups, |_, grp| {
                into.u.extend_from_slice(&grp.u);
                into.s.push((grp.sw, grp.cw));
            })
        };
    }
}

/// 1 unpacked weight row × RN activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn buffered_tile<const T: u32, const RN: usize>(groups: usize, u: *const __m256i, s: *const (__m256, __m256), prep: *const f32, out: *mut f32, ldo: usize) {
    let mut acc = [_mm256_setzero_ps(); RN];
    for g in 0..groups {
        // SAFETY: the caller passes `groups` unpacked groups at u and s.
        let (gu, (sw, cw)) = unsafe { ([*u.add(4 * g), *u.add(4 * g + 1), *u.add(4 * g + 2), *u.add(4 * g + 3)], *s.add(g)) };
        for c in 0..RN {
            // SAFETY: activation row c and group g are within the caller-checked ranges.
            unsafe {
                let pc = prep.add((c * groups + g) * PREP);
                let sm = sums::<T>(&gu, pc.add(PREP_Q) as *const u8);
                acc[c] = accumulate::<T>(acc[c], sm, sw, cw, pc);
            }
        }
    }
    for c in 0..RN {
        // SAFETY: the caller's output has room for RN entries ldo apart.
        unsafe { *out.add(c * ldo) = hsum_f32(acc[c]) };
    }
}

/// out[c * nr + r] = w_row(r) · a_row(c) for r < nr, c < nc, with `prep` from [`prepare`].
#[allow(clippy::too_many_arguments)]
pub fn gemm(dtype: DType, k: usize, w: &[u8], w_stride: usize, nr: usize, nc: usize, prep: &[f32], out: &mut [f32]) {
    assert!(out.len() >= nr * nc);
    // SAFETY: out holds nr * nc floats: entry (r, c) at c * nr + r.
    unsafe { gemm_strided(dtype, k, w, w_stride, nr, nc, prep, out.as_mut_ptr(), nr) }
}

/// [`gemm`] writing entry (r, c) to `out[c * ldo + r]`, so each thread of a parallel product can
/// write its rows straight into the shared result.
///
/// # Safety
/// `out.add(c * ldo + r)` must be valid for writes for every r < nr, c < nc, and no other thread
/// may access those floats during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(dtype: DType, k: usize, w: &[u8], w_stride: usize, nr: usize, nc: usize, prep: &[f32], out: *mut f32, ldo: usize) {
    assert!(usable(dtype, k));
    let groups = k / GROUP;
    let wrb = dtype.row_bytes(k).unwrap_or(0);
    assert!(wrb <= w_stride);
    assert!(nr == 0 || w.len() >= (nr - 1) * w_stride + wrb);
    assert!(prep.len() >= nc * groups * PREP && (nc <= 1 || ldo >= nr));
    // SAFETY: the caller's contract on `out`; the rest is asserted above.
    unsafe {
        match dtype {
            DType::Q4_0 => run::<2>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q5_0 => run::<6>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q8_0 => run::<8>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q4_K => run::<12>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q5_K => run::<13>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q4_0G => run::<242>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q5_0G => run::<246>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q8_0G => run::<248>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q4_KG => run::<252>(groups, w, w_stride, nr, nc, prep, out, ldo),
            DType::Q6_KG => run::<254>(groups, w, w_stride, nr, nc, prep, out, ldo),
            _ => run::<14>(groups, w, w_stride, nr, nc, prep, out, ldo),
        }
    }
}

/// # Safety
/// As [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
unsafe fn run<const T: u32>(groups: usize, w: &[u8], w_stride: usize, nr: usize, nc: usize, prep: &[f32], out: *mut f32, ldo: usize) {
    // The loops below prefetch PREFETCH bytes ahead of where they read; start the stream by
    // prefetching the first PREFETCH bytes of this range (decoding runs many short ranges, and
    // each would otherwise begin with demand misses).
    let span = (nr * w_stride).min(PREFETCH);
    for off in (0..span).step_by(64) {
        prefetch_block(w.as_ptr().wrapping_add(off).wrapping_sub(PREFETCH), 1);
    }
    if nc <= 8 {
        // Decoding (one to eight sequences): one weight row at a time, unpacked in registers
        // and used for up to four activation rows at once. Streaming several weight rows side
        // by side instead (the rows of a 4-row tile are only a row's length apart) defeats the
        // hardware prefetchers: Gemma 3's output projection read 10-12 GB/s that way, and
        // 16-19 GB/s one row at a time, on two threads (`kbench_dram`; PERF.md).
        for r in 0..nr {
            let mut c = 0;
            while c < nc {
                let rn = (nc - c).min(4);
                // SAFETY: row r and activation rows c..c+rn are within the ranges asserted by
                // `gemm_strided`, whose caller owns the out entries; CPU features as above.
                unsafe {
                    let (wp, pp, op) = (w.as_ptr().add(r * w_stride), prep.as_ptr().add(c * groups * PREP), out.add(c * ldo + r));
                    match rn {
                        4 => stream_cols::<T, 4>(groups, wp, pp, op, ldo),
                        3 => stream_cols::<T, 3>(groups, wp, pp, op, ldo),
                        2 => stream_cols::<T, 2>(groups, wp, pp, op, ldo),
                        _ => stream_cols::<T, 1>(groups, wp, pp, op, ldo),
                    }
                }
                c += rn;
            }
        }
        return;
    }
    UNPACKED.with(|buf| {
        let mut buf = buf.borrow_mut();
        // SAFETY: the rows are within the range asserted by `gemm`; CPU features as above.
        unsafe { unpack_rows::<T>(groups, w.as_ptr(), w_stride, nr, &mut buf) };
        // Blocks of activation rows small enough to stay in L1 while every unpacked weight row
        // passes over them (the weights then come from L2 once per block, instead of all the
        // activations once per weight row). Pairs of activation rows are the same whatever the
        // blocking, so results do not depend on it.
        let cb = COL_BLOCK.min(nc);
        let mut c0 = 0;
        while c0 < nc {
            let c1 = (c0 + cb).min(nc);
            for r in 0..nr {
                let (u, s) = (buf.u[r * groups * 4..].as_ptr(), buf.s[r * groups..].as_ptr());
                let mut c = c0;
                while c < c1 {
                    let rn = (c1 - c).min(2);
                    // SAFETY: activation rows c..c+rn are within the asserted range; the caller
                    // owns the out entries; u and s hold this row's `groups` unpacked groups.
                    unsafe {
                        let (pp, op) = (prep.as_ptr().add(c * groups * PREP), out.add(c * ldo + r));
                        if rn == 2 {
                            buffered_tile::<T, 2>(groups, u, s, pp, op, ldo);
                        } else {
                            buffered_tile::<T, 1>(groups, u, s, pp, op, ldo);
                        }
                    }
                    c += rn;
                }
            }
            c0 = c1;
        }
    });
}
