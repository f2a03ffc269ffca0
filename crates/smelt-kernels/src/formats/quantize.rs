//! Weight quantizers (scalar): f32 rows encoded in the file formats, to write a changed model
//! back in its own formats (`smelt merge`). Each format's block is chosen to be close in squared
//! error: scales from the block's range, then for the k-quants each sub-block's integer scale
//! (and minimum) tried one step either way and the best kept. Decoding is the formats' own
//! `dequantize`, so what is written is exactly what the model will compute with.

use super::{put_f16, DType, QK_K};

fn f16_round(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// The value of largest magnitude, with its sign.
fn signed_max(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// Symmetric 32-element block: q in [0, 2·half) with x = d·(q − half); returns the codes.
fn symmetric(x: &[f32], half: i32, out: &mut [u8]) -> [u8; 32] {
    let d = f16_round(signed_max(x) / -(half as f32));
    put_f16(out, 0, d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * id).round() as i32 + half).clamp(0, 2 * half - 1) as u8;
    }
    q
}

/// Asymmetric 32-element block: x = d·q + m, q in [0, levels]; writes d and m, returns the codes.
fn asymmetric(x: &[f32], levels: i32, out: &mut [u8]) -> [u8; 32] {
    let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let d = f16_round((hi - lo) / levels as f32);
    let m = f16_round(lo);
    put_f16(out, 0, d);
    put_f16(out, 2, m);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; 32];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (((v - m) * id).round() as i32).clamp(0, levels) as u8;
    }
    q
}

fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 15) | ((q[j + 16] & 15) << 4);
    }
}

fn pack_fifth_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

/// Codes for one sub-block under x ≈ d·sc·q − dmin·m, q in [0, levels], and their squared error.
fn sub_codes(x: &[f32], scale: f32, offset: f32, levels: i32, q: &mut [i8]) -> f32 {
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut err = 0.0;
    for (q, &v) in q.iter_mut().zip(x) {
        let c = (((v + offset) * inv).round() as i32).clamp(0, levels);
        *q = c as i8;
        let e = v - (scale * c as f32 - offset);
        err += e * e;
    }
    err
}

/// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and minimums; (d, dmin, scales, mins, q).
fn kquant_asym(x: &[f32], levels: i32) -> (f32, f32, [u8; 8], [u8; 8], [i8; QK_K]) {
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for s in 0..8 {
        let sub = &x[32 * s..32 * s + 32];
        let lo = sub.iter().fold(0f32, |a, &v| a.min(v)); // the minimum is subtracted: never above 0
        let hi = sub.iter().fold(f32::MIN, |a, &v| a.max(v));
        scale[s] = (hi - lo) / levels as f32;
        min[s] = -lo;
    }
    let d = f16_round(scale.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let dmin = f16_round(min.iter().fold(0f32, |a, &v| a.max(v)) / 63.0);
    let (mut sc, mut mn, mut q) = ([0u8; 8], [0u8; 8], [0i8; QK_K]);
    for s in 0..8 {
        let sub = &x[32 * s..32 * s + 32];
        let s0 = if d > 0.0 { (scale[s] / d).round() as i32 } else { 0 };
        let m0 = if dmin > 0.0 { (min[s] / dmin).round() as i32 } else { 0 };
        let mut best = (f32::MAX, 0, 0);
        let mut codes = [0i8; 32];
        for si in (s0 - 1).max(0)..=(s0 + 1).min(63) {
            for mi in (m0 - 1).max(0)..=(m0 + 1).min(63) {
                let err = sub_codes(sub, d * si as f32, dmin * mi as f32, levels, &mut codes);
                if err < best.0 {
                    best = (err, si, mi);
                }
            }
        }
        sc[s] = best.1 as u8;
        mn[s] = best.2 as u8;
        sub_codes(sub, d * sc[s] as f32, dmin * mn[s] as f32, levels, &mut q[32 * s..32 * s + 32]);
    }
    (d, dmin, sc, mn, q)
}

/// The 12 bytes of 8 six-bit scales and 8 six-bit minimums (as Q4_K and Q5_K store them).
fn pack_scales_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut b = [0u8; 12];
    for j in 0..4 {
        b[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        b[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        b[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    b
}

fn q4k(x: &[f32], out: &mut [u8]) {
    let (d, dmin, sc, mn, q) = kquant_asym(x, 15);
    put_f16(out, 0, d);
    put_f16(out, 2, dmin);
    out[4..16].copy_from_slice(&pack_scales_k4(&sc, &mn));
    let qs = &mut out[16..144];
    qs.fill(0);
    for (e, &v) in q.iter().enumerate() {
        let (chunk, hi, l) = (e / 64, (e % 64) / 32, e % 32);
        qs[32 * chunk + l] |= (v as u8 & 15) << (4 * hi);
    }
}

fn q5k(x: &[f32], out: &mut [u8]) {
    let (d, dmin, sc, mn, q) = kquant_asym(x, 31);
    put_f16(out, 0, d);
    put_f16(out, 2, dmin);
    out[4..16].copy_from_slice(&pack_scales_k4(&sc, &mn));
    out[16..176].fill(0);
    for (e, &v) in q.iter().enumerate() {
        let (chunk, hi, l) = (e / 64, (e % 64) / 32, e % 32);
        out[48 + 32 * chunk + l] |= (v as u8 & 15) << (4 * hi);
        out[16 + l] |= ((v as u8 >> 4) & 1) << (2 * chunk + hi);
    }
}

fn q6k(x: &[f32], out: &mut [u8]) {
    // 16 sub-blocks of 16 with signed 8-bit scales; q in [-32, 31].
    let mut scale = [0f32; 16];
    for s in 0..16 {
        scale[s] = signed_max(&x[16 * s..16 * s + 16]) / -32.0;
    }
    let d = f16_round(scale.iter().fold(0f32, |a, &v| a.max(v.abs())) / 127.0);
    let mut q = [0i8; QK_K];
    let mut sc = [0i8; 16];
    for s in 0..16 {
        let sub = &x[16 * s..16 * s + 16];
        let s0 = if d > 0.0 { (scale[s] / d).round() as i32 } else { 0 };
        let mut best = (f32::MAX, 0);
        for si in (s0 - 1).max(-127)..=(s0 + 1).min(127) {
            let step = d * si as f32;
            let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
            let err: f32 = sub.iter().map(|&v| v - step * ((v * inv).round() as i32).clamp(-32, 31) as f32).map(|e| e * e).sum();
            if err < best.0 {
                best = (err, si);
            }
        }
        sc[s] = best.1 as i8;
        let step = d * best.1 as f32;
        let inv = if step != 0.0 { 1.0 / step } else { 0.0 };
        for (q, &v) in q[16 * s..16 * s + 16].iter_mut().zip(sub) {
            *q = ((v * inv).round() as i32).clamp(-32, 31) as i8;
        }
    }
    out[..210].fill(0);
    for (e, &v) in q.iter().enumerate() {
        let u = (v as i32 + 32) as u8;
        let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
        out[64 * half + l + 32 * (quarter & 1)] |= (u & 15) << (4 * (quarter >> 1));
        out[128 + 32 * half + l] |= (u >> 4) << (2 * quarter);
    }
    for (o, s) in out[192..208].iter_mut().zip(sc) {
        *o = s as u8;
    }
    put_f16(out, 208, d);
}

/// Whether `quantize_weights` can write `dtype`.
pub fn can_quantize(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::Q4_K | DType::Q5_K | DType::Q6_K)
}

/// Encode `x` (whole blocks of `dtype`) as weights in `dtype`. Panics on a format
/// `can_quantize` refuses.
pub fn quantize_weights(dtype: DType, x: &[f32], out: &mut [u8]) {
    let (bl, bb) = (dtype.block_len(), dtype.block_bytes());
    assert_eq!(x.len() % bl, 0, "row length must be whole blocks");
    assert!(out.len() >= x.len() / bl * bb, "output too small");
    for (src, b) in x.chunks_exact(bl).zip(out.chunks_exact_mut(bb)) {
        match dtype {
            DType::F32 => b.copy_from_slice(&src[0].to_le_bytes()),
            DType::F16 => b.copy_from_slice(&half::f16::from_f32(src[0]).to_le_bytes()),
            DType::BF16 => b.copy_from_slice(&half::bf16::from_f32(src[0]).to_le_bytes()),
            DType::Q4_0 => {
                let q = symmetric(src, 8, b);
                pack_nibbles(&q, &mut b[2..18]);
            }
            DType::Q4_1 => {
                let q = asymmetric(src, 15, b);
                pack_nibbles(&q, &mut b[4..20]);
            }
            DType::Q5_0 => {
                let q = symmetric(src, 16, b);
                b[2..6].copy_from_slice(&pack_fifth_bits(&q));
                pack_nibbles(&q, &mut b[6..22]);
            }
            DType::Q5_1 => {
                let q = asymmetric(src, 31, b);
                b[4..8].copy_from_slice(&pack_fifth_bits(&q));
                pack_nibbles(&q, &mut b[8..24]);
            }
            DType::Q8_0 => super::Q8_0::quantize(src, b),
            DType::Q4_K => q4k(src, b),
            DType::Q5_K => q5k(src, b),
            DType::Q6_K => q6k(src, b),
            other => panic!("quantizing weights to {other} is not supported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::dequantize_row;

    /// Deterministic values spread like weights (sums of uniforms), with an outlier per 100.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        let mut u = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        (0..n).map(|i| (u() + u() + u()) * 0.05 * if i % 100 == 7 { 6.0 } else { 1.0 }).collect()
    }

    fn rel_rms(dtype: DType, x: &[f32]) -> f32 {
        let mut bytes = vec![0u8; x.len() / dtype.block_len() * dtype.block_bytes()];
        quantize_weights(dtype, x, &mut bytes);
        let mut y = vec![0f32; x.len()];
        dequantize_row(dtype, &bytes, &mut y);
        let err: f32 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f32 = x.iter().map(|a| a * a).sum();
        (err / norm).sqrt()
    }

    #[test]
    fn quantized_weights_decode_close_to_the_input() {
        // Relative RMS error bounds a little above what each format's bits allow.
        let cases = [(DType::F32, 0.0), (DType::F16, 1e-3), (DType::BF16, 8e-3), (DType::Q8_0, 0.01), (DType::Q6_K, 0.03), (DType::Q5_K, 0.05), (DType::Q5_0, 0.06), (DType::Q5_1, 0.05), (DType::Q4_K, 0.1), (DType::Q4_0, 0.14), (DType::Q4_1, 0.12)];
        for (dtype, bound) in cases {
            assert!(can_quantize(dtype));
            // Odd numbers of blocks, and a block of zeros.
            for (blocks, seed) in [(1, 1), (3, 2), (7, 3)] {
                let x = weights(blocks * QK_K, seed);
                let e = rel_rms(dtype, &x);
                assert!(e <= bound, "{dtype}: relative RMS error {e} over {bound}");
            }
            let zeros = vec![0f32; QK_K];
            let mut bytes = vec![0u8; QK_K / dtype.block_len() * dtype.block_bytes()];
            quantize_weights(dtype, &zeros, &mut bytes);
            let mut y = vec![1f32; QK_K];
            dequantize_row(dtype, &bytes, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{dtype}: zeros do not stay zero");
        }
        assert!(!can_quantize(DType::Q2_K) && !can_quantize(DType::Q8_K));
    }

    #[test]
    fn re_quantizing_decoded_blocks_loses_little() {
        // What merge does to tensors it changes: decode a block, re-encode it. The error added
        // is a small part of the format's own.
        for dtype in [DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::Q5_0, DType::Q4_0, DType::Q8_0] {
            let x = weights(4 * QK_K, 11);
            let n = x.len() / dtype.block_len() * dtype.block_bytes();
            let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
            quantize_weights(dtype, &x, &mut a);
            let mut y = vec![0f32; x.len()];
            dequantize_row(dtype, &a, &mut y);
            quantize_weights(dtype, &y, &mut b);
            let mut z = vec![0f32; x.len()];
            dequantize_row(dtype, &b, &mut z);
            let first: f32 = x.iter().zip(&y).map(|(p, q)| (p - q) * (p - q)).sum();
            let again: f32 = y.iter().zip(&z).map(|(p, q)| (p - q) * (p - q)).sum();
            assert!(again <= 0.5 * first, "{dtype}: re-encoding adds {again} to an error of {first}");
        }
    }
}
