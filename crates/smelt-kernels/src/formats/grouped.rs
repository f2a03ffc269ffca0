//! Grouped layouts of Q4_0, Q5_0 and Q8_0: smelt's own in-memory arrangement of four
//! consecutive 32-element blocks (128 elements), made at load time from the file's blocks and
//! never stored in files. The numbers are the file's, byte for byte; only their order changes,
//! to the order in which the AVX2 group kernels use them (see `simd::avx2_group`), so those
//! kernels unpack a group with a few loads, shifts and masks instead of gathering scales and
//! transposing the four blocks on every use.
//!
//! Within a group the elements are addressed as four 32-byte vectors `m` (0..4) of byte
//! positions `p` (0..32): position p of vector m holds element `4m + p % 4` of block `p / 4`
//! for p < 16, and element `16 + 4m + p % 4` of block `(p - 16) / 4` for p ≥ 16 (each 4-byte
//! lane then covers the elements of one per-16 sum). Layouts, little-endian:
//! - Q8_0g (136 B): the four f16 scales d0..d3, then the vectors' signed bytes, vector 0 first.
//! - Q4_0g (72 B): d0..d3, then two 32-byte halves: byte p of half h holds vector 2h's
//!   4-bit value at position p in its low nibble and vector 2h+1's in its high nibble.
//! - Q5_0g (88 B): d0..d3; 16 bytes of fifth bits: bit m of byte p is the fifth bit of vector
//!   m at position p, bit 4 + m that at position p + 16; then the low four bits as in Q4_0g.
//!
//! The k-quants get the same treatment per 256-element block (two 128-element halves, each
//! four 32-element sub-blocks standing in for the four blocks above). Only the quants move;
//! scales stay where the file has them, and a block keeps its size:
//! - Q4_Kg (144 B): bytes 0..16 as Q4_K (d, dmin, packed scales and mins); then per half h, 64
//!   bytes laid out as Q4_0g's low bits.
//! - Q6_Kg (210 B): per half h, 64 bytes of low four bits as Q4_0g's (bytes 64h..64h+64); then
//!   per half, 32 bytes of high two bits: bits 2m, 2m+1 of byte p are vector m's at position p
//!   (bytes 128 + 32h..); then Q6_K's 16 scales and d, in place.

use super::DType;

/// Elements per group.
pub const GROUP: usize = 128;

/// The grouped layout of a file format, where there is one.
pub fn grouped(dtype: DType) -> Option<DType> {
    match dtype {
        DType::Q4_0 => Some(DType::Q4_0G),
        DType::Q5_0 => Some(DType::Q5_0G),
        DType::Q8_0 => Some(DType::Q8_0G),
        DType::Q4_K => Some(DType::Q4_KG),
        DType::Q6_K => Some(DType::Q6_KG),
        _ => None,
    }
}

/// The file format a grouped layout was made from.
pub fn ungrouped(dtype: DType) -> Option<DType> {
    match dtype {
        DType::Q4_0G => Some(DType::Q4_0),
        DType::Q5_0G => Some(DType::Q5_0),
        DType::Q8_0G => Some(DType::Q8_0),
        DType::Q4_KG => Some(DType::Q4_K),
        DType::Q6_KG => Some(DType::Q6_K),
        _ => None,
    }
}

/// Whether a format's groups are the halves of 256-element k-quant blocks.
fn k_quant(dtype: DType) -> bool {
    matches!(dtype, DType::Q4_K | DType::Q6_K)
}

/// The quants of one Q4_K or Q6_K block as 256 small unsigned values in element order.
/// (Byte-wise loops the compiler vectorizes: models regroup tens of MB of these at load.)
fn k_values(dtype: DType, b: &[u8]) -> [u8; 256] {
    let mut v = [0u8; 256];
    if dtype == DType::Q4_K {
        // 64-element chunk c: byte j holds element j (low nibble) and 32 + j (high nibble).
        for c in 0..4 {
            for j in 0..32 {
                let x = b[16 + 32 * c + j];
                v[64 * c + j] = x & 0x0f;
                v[64 * c + 32 + j] = x >> 4;
            }
        }
    } else {
        // Per 128-element half: four 32-element units from two 32-byte runs of low bits (low
        // nibbles for units 0 and 1, high nibbles for 2 and 3) and one of high bit pairs.
        for h in 0..2 {
            for j in 0..32 {
                let (l0, l1, qh) = (b[64 * h + j], b[64 * h + 32 + j], b[128 + 32 * h + j]);
                v[128 * h + j] = (l0 & 0x0f) | (qh & 0x03) << 4;
                v[128 * h + 32 + j] = (l1 & 0x0f) | ((qh >> 2) & 0x03) << 4;
                v[128 * h + 64 + j] = (l0 >> 4) | ((qh >> 4) & 0x03) << 4;
                v[128 * h + 96 + j] = (l1 >> 4) | ((qh >> 6) & 0x03) << 4;
            }
        }
    }
    v
}

/// Write 256 values in element order into a Q4_K or Q6_K block's quant bytes (the inverse of
/// [`k_values`]; scales untouched).
fn set_k_values(dtype: DType, v: &[u8; 256], b: &mut [u8]) {
    let (lows, highs) = if dtype == DType::Q4_K { (16..144, 0..0) } else { (0..128, 128..192) };
    b[lows].fill(0);
    b[highs].fill(0);
    for (e, &x) in v.iter().enumerate() {
        let (h, l, j) = (e / 128, e % 128 / 32, e % 32);
        if dtype == DType::Q4_K {
            b[16 + 32 * (2 * h + l / 2) + j] |= (x & 0x0f) << (4 * (l % 2));
        } else {
            b[64 * h + 32 * (l % 2) + j] |= (x & 0x0f) << (4 * (l / 2));
            b[128 + 32 * h + j] |= ((x >> 4) & 0x03) << (2 * l);
        }
    }
}

/// Element (within its block) of position `p` of vector `m` of half `h` of a k-quant block.
#[inline]
fn k_source(h: usize, m: usize, p: usize) -> usize {
    let (l, j) = source(m, p);
    128 * h + 32 * l + j
}

/// [`group_blocks`] for Q4_K and Q6_K: one block at a time.
fn group_k_blocks(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = dtype.block_bytes();
    assert!(src.len() % bb == 0 && dst.len() == src.len(), "whole blocks");
    let lows = if dtype == DType::Q4_K { 16 } else { 0 };
    for (s, d) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bb)) {
        let v = k_values(dtype, s);
        d.copy_from_slice(s);
        for h in 0..2 {
            // The four interleaved vectors of this half (see `source`): lane l of vector m is
            // unit l's elements 4m..4m+4 (positions 4l..4l+4) and 16+4m.. (positions 16+4l..).
            let mut vm = [[0u8; 32]; 4];
            for (m, vec) in vm.iter_mut().enumerate() {
                for l in 0..4 {
                    let unit = &v[128 * h + 32 * l..128 * h + 32 * l + 32];
                    vec[4 * l..4 * l + 4].copy_from_slice(&unit[4 * m..4 * m + 4]);
                    vec[16 + 4 * l..16 + 4 * l + 4].copy_from_slice(&unit[16 + 4 * m..16 + 4 * m + 4]);
                }
            }
            for p in 0..32 {
                d[lows + 64 * h + p] = (vm[0][p] & 0x0f) | vm[1][p] << 4;
                d[lows + 64 * h + 32 + p] = (vm[2][p] & 0x0f) | vm[3][p] << 4;
            }
            if dtype == DType::Q6_K {
                for p in 0..32 {
                    let hi = |m: usize| ((vm[m][p] >> 4) & 0x03) << (2 * m);
                    d[128 + 32 * h + p] = hi(0) | hi(1) | hi(2) | hi(3);
                }
            }
        }
    }
}

/// [`ungroup_blocks`] for Q4_K and Q6_K.
fn ungroup_k_blocks(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = dtype.block_bytes();
    assert!(src.len() % bb == 0 && dst.len() == src.len(), "whole blocks");
    let lows = if dtype == DType::Q4_K { 16 } else { 0 };
    for (s, d) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(bb)) {
        let mut v = [0u8; 256];
        for h in 0..2 {
            for m in 0..4 {
                for p in 0..32 {
                    let low = (s[lows + 64 * h + 32 * (m / 2) + p] >> (4 * (m % 2))) & 0x0f;
                    let high = if dtype == DType::Q6_K { (s[128 + 32 * h + p] >> (2 * m)) & 0x03 } else { 0 };
                    v[k_source(h, m, p)] = low | high << 4;
                }
            }
        }
        d.copy_from_slice(s);
        set_k_values(dtype, &v, d);
    }
}

/// Block and element within it of position `p` of vector `m`.
#[inline]
fn source(m: usize, p: usize) -> (usize, usize) {
    if p < 16 {
        (p / 4, 4 * m + p % 4)
    } else {
        ((p - 16) / 4, 16 + 4 * m + p % 4)
    }
}

/// Rewrite whole groups of `dtype` blocks (`src`) in the grouped layout (`dst`, the same size);
/// for the k-quants, whole blocks.
/// (Written out per format rather than through [`source`]: models regroup hundreds of MB at load.)
pub fn group_blocks(dtype: DType, src: &[u8], dst: &mut [u8]) {
    if k_quant(dtype) {
        return group_k_blocks(dtype, src, dst);
    }
    let bb = dtype.block_bytes();
    let gb = 4 * bb;
    assert!(grouped(dtype).is_some(), "{dtype} has no grouped layout");
    assert!(src.len() % gb == 0 && dst.len() == src.len(), "whole groups");
    for (s, d) in src.chunks_exact(gb).zip(dst.chunks_exact_mut(gb)) {
        let blk = |l: usize| &s[l * bb..(l + 1) * bb];
        for l in 0..4 {
            d[2 * l..2 * l + 2].copy_from_slice(&blk(l)[..2]);
        }
        if dtype == DType::Q8_0 {
            // Vector m, lane l: block l's elements 4m..4m+4; lane 4 + l: 16+4m..16+4m+4.
            for m in 0..4 {
                for l in 0..4 {
                    let (v, q) = (8 + 32 * m, &blk(l)[2..]);
                    d[v + 4 * l..v + 4 * l + 4].copy_from_slice(&q[4 * m..4 * m + 4]);
                    d[v + 16 + 4 * l..v + 16 + 4 * l + 4].copy_from_slice(&q[16 + 4 * m..16 + 4 * m + 4]);
                }
            }
            continue;
        }
        let five = dtype == DType::Q5_0;
        let qs = |l: usize| &blk(l)[if five { 6 } else { 2 }..];
        let lows = if five { 24 } else { 8 };
        // Half h holds vectors 2h (low nibbles) and 2h+1 (high nibbles). Position p < 16 of
        // vector m is element 4m + j of block l (p = 4l + j): the low nibble of byte 4m + j;
        // position 16 + p is element 16 + 4m + j: the high nibble of the same byte.
        for h in 0..2 {
            for l in 0..4 {
                let q = qs(l);
                for j in 0..4 {
                    let (a, b) = (q[8 * h + j], q[8 * h + 4 + j]);
                    d[lows + 32 * h + 4 * l + j] = (a & 0x0f) | (b << 4);
                    d[lows + 32 * h + 16 + 4 * l + j] = (a >> 4) | (b & 0xf0);
                }
            }
        }
        if five {
            for l in 0..4 {
                let qh = u32::from_le_bytes([blk(l)[2], blk(l)[3], blk(l)[4], blk(l)[5]]);
                for j in 0..4 {
                    let mut bits = 0u8;
                    for m in 0..4 {
                        bits |= (((qh >> (4 * m + j)) & 1) as u8) << m;
                        bits |= (((qh >> (16 + 4 * m + j)) & 1) as u8) << (4 + m);
                    }
                    d[8 + 4 * l + j] = bits;
                }
            }
        }
    }
}

/// The inverse of [`group_blocks`]: whole groups (`src`, layout `grouped(dtype)`) back to
/// `dtype` blocks.
pub fn ungroup_blocks(dtype: DType, src: &[u8], dst: &mut [u8]) {
    if k_quant(dtype) {
        return ungroup_k_blocks(dtype, src, dst);
    }
    let bb = dtype.block_bytes();
    let gb = 4 * bb;
    assert!(grouped(dtype).is_some(), "{dtype} has no grouped layout");
    assert!(src.len() % gb == 0 && dst.len() == src.len(), "whole groups");
    for (s, d) in src.chunks_exact(gb).zip(dst.chunks_exact_mut(gb)) {
        d.fill(0);
        for l in 0..4 {
            d[l * bb..l * bb + 2].copy_from_slice(&s[2 * l..2 * l + 2]);
        }
        for m in 0..4 {
            for p in 0..32 {
                let (l, e) = source(m, p);
                let b = &mut d[l * bb..(l + 1) * bb];
                let v = match dtype {
                    DType::Q8_0 => s[8 + 32 * m + p],
                    _ => {
                        let lows = if dtype == DType::Q5_0 { 24 } else { 8 };
                        let low = (s[lows + 32 * (m / 2) + p] >> (4 * (m % 2))) & 0x0f;
                        let fifth = if dtype == DType::Q5_0 { (s[8 + p % 16] >> (m + 4 * (p / 16))) & 1 } else { 0 };
                        low | fifth << 4
                    }
                };
                match dtype {
                    DType::Q8_0 => b[2 + e] = v,
                    DType::Q4_0 => set_nibble(&mut b[2..18], e, v),
                    _ => {
                        set_nibble(&mut b[6..22], e, v & 0x0f);
                        b[2 + e / 8] |= ((v >> 4) & 1) << (e % 8);
                    }
                }
            }
        }
    }
}

/// 4-bit value of element e of a nibble-packed block (low nibbles are elements 0..16).
#[cfg(test)]
fn nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 { qs[e] & 0x0f } else { qs[e - 16] >> 4 }
}

fn set_nibble(qs: &mut [u8], e: usize, v: u8) {
    if e < 16 {
        qs[e] |= v & 0x0f;
    } else {
        qs[e - 16] |= (v & 0x0f) << 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` bytes of xorshift64 from `state`.
    fn random_bytes(state: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                *state as u8
            })
            .collect()
    }

    #[test]
    fn grouping_is_a_permutation_that_ungrouping_reverses() {
        let mut state = 0x9E3779B97F4A7C15u64;
        for dtype in [DType::Q4_0, DType::Q5_0, DType::Q8_0] {
            for groups in [1, 2, 5] {
                let src = random_bytes(&mut state, groups * 4 * dtype.block_bytes());
                let mut g = vec![0u8; src.len()];
                let mut back = vec![0u8; src.len()];
                group_blocks(dtype, &src, &mut g);
                ungroup_blocks(dtype, &g, &mut back);
                assert_eq!(src, back, "{dtype} x{groups}");
                // Every position holds the element the layout's definition names.
                let bb = dtype.block_bytes();
                for (sg, gg) in src.chunks_exact(4 * bb).zip(g.chunks_exact(4 * bb)) {
                    for m in 0..4 {
                        for p in 0..32 {
                            let (l, e) = source(m, p);
                            let b = &sg[l * bb..(l + 1) * bb];
                            let (want, got) = match dtype {
                                DType::Q8_0 => (b[2 + e], gg[8 + 32 * m + p]),
                                _ => {
                                    let lows = if dtype == DType::Q5_0 { 24 } else { 8 };
                                    let q = &b[if dtype == DType::Q5_0 { 6 } else { 2 }..];
                                    let low = (gg[lows + 32 * (m / 2) + p] >> (4 * (m % 2))) & 0x0f;
                                    if dtype == DType::Q5_0 {
                                        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                                        let fifth = (gg[8 + p % 16] >> (m + 4 * (p / 16))) & 1;
                                        (nibble(q, e) | (((qh >> e) & 1) as u8) << 4, low | fifth << 4)
                                    } else {
                                        (nibble(q, e), low)
                                    }
                                }
                            };
                            assert_eq!(want, got, "{dtype} vector {m} position {p}");
                        }
                    }
                }
                // Every bit moves somewhere: the same number of set bits.
                let ones = |v: &[u8]| v.iter().map(|b| b.count_ones()).sum::<u32>();
                assert_eq!(ones(&src), ones(&g), "{dtype} x{groups}");
            }
        }
    }

    #[test]
    fn k_quant_grouping_is_a_permutation_that_ungrouping_reverses() {
        let mut state = 0x2545F4914F6CDD1Du64;
        for dtype in [DType::Q4_K, DType::Q6_K] {
            let bb = dtype.block_bytes();
            for blocks in [1, 3] {
                let mut src = random_bytes(&mut state, blocks * bb);
                if dtype == DType::Q6_K {
                    // A finite d, for the check against the format's decoding below.
                    for b in src.chunks_exact_mut(bb) {
                        b[208..210].copy_from_slice(&half::f16::from_f32(0.01).to_bits().to_le_bytes());
                    }
                }
                let mut g = vec![0u8; src.len()];
                let mut back = vec![0u8; src.len()];
                group_blocks(dtype, &src, &mut g);
                ungroup_blocks(dtype, &g, &mut back);
                assert_eq!(src, back, "{dtype} x{blocks}");
                for (sb, gb) in src.chunks_exact(bb).zip(g.chunks_exact(bb)) {
                    // Scales in place; every element where the layout's definition puts it.
                    let scales = if dtype == DType::Q4_K { 0..16 } else { 192..210 };
                    assert_eq!(sb[scales.clone()], gb[scales], "{dtype}");
                    let v = k_values(dtype, sb);
                    let lows = if dtype == DType::Q4_K { 16 } else { 0 };
                    for h in 0..2 {
                        for m in 0..4 {
                            for p in 0..32 {
                                let (l, j) = source(m, p);
                                let want = v[128 * h + 32 * l + j];
                                let low = (gb[lows + 64 * h + 32 * (m / 2) + p] >> (4 * (m % 2))) & 0x0f;
                                let high = if dtype == DType::Q6_K { (gb[128 + 32 * h + p] >> (2 * m)) & 0x03 } else { 0 };
                                assert_eq!(want, low | high << 4, "{dtype} half {h} vector {m} position {p}");
                            }
                        }
                    }
                    // k_values reads the file's layout as the format's definition does.
                    let mut dq = [0f32; 256];
                    crate::formats::dequantize_row(dtype, sb, &mut dq);
                    if dtype == DType::Q6_K {
                        let d = crate::formats::f16_at(sb, 208);
                        for e in 0..256 {
                            let want = d * (sb[192 + e / 16] as i8 as i32 * (v[e] as i32 - 32)) as f32;
                            assert!((dq[e] - want).abs() <= 1e-6 * want.abs(), "{dtype} element {e}: {} vs {want}", dq[e]);
                        }
                    }
                }
            }
        }
    }
}
