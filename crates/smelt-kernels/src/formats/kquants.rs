//! The 256-element "k-quant" formats: Q2_K … Q6_K, and the activation format Q8_K.
//!
//! A block holds 256 elements in sub-blocks of 16 or 32, each with a small integer scale (and for
//! the "asymmetric" formats a minimum) multiplied by f16 super-scales `d` and `dmin`:
//!   x = d * scale[s] * q - dmin * min[s]
//! Byte layouts:
//! - Q2_K (84 B):  scales[16] (low nibble scale, high nibble min), qs[64] (2-bit), d, dmin.
//! - Q3_K (110 B): hmask[32] (third bits), qs[64] (low 2 bits), scales[12] (16 × 6-bit), d.
//! - Q4_K (144 B): d, dmin, scales[12] (8 × 6-bit scales, 8 × 6-bit mins), qs[128].
//! - Q5_K (176 B): d, dmin, scales[12], qh[32] (fifth bits), qs[128].
//! - Q6_K (210 B): ql[128] (low 4 bits), qh[64] (high 2 bits), scales: [i8; 16], d.
//! - Q8_K (292 B): d: f32, qs: [i8; 256], bsums: [i16; 16] (sums of each 16 qs).

use super::{f16_at, f32_at, QK_K};

pub struct Q2K;
pub struct Q3K;
pub struct Q4K;
pub struct Q5K;
pub struct Q6K;
pub struct Q8K;

/// A k-quant block decoded into plain integers: element e = d * scales[e / sub] * q[e] - dmin * mins[e / sub].
pub struct Unpacked {
    pub d: f32,
    pub dmin: f32,
    /// Elements per sub-block: 16 or 32.
    pub sub: usize,
    pub scales: [i32; 16],
    pub mins: [i32; 16],
    pub q: [i8; QK_K],
}

impl Unpacked {
    fn dequantize(&self, out: &mut [f32]) {
        for (e, o) in out.iter_mut().enumerate().take(QK_K) {
            let s = e / self.sub;
            *o = self.d * (self.scales[s] * self.q[e] as i32) as f32 - self.dmin * self.mins[s] as f32;
        }
    }

    /// Dot with a Q8_K block: exact integer sums per sub-block, then two float multiplies.
    fn dot_q8k(&self, a: &[u8]) -> f32 {
        let (ad, aq, bsums) = Q8K::parts(a);
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for s in 0..QK_K / self.sub {
            let r = s * self.sub..(s + 1) * self.sub;
            let dot: i32 = self.q[r.clone()].iter().zip(&aq[r]).map(|(&x, &y)| x as i32 * y as i32).sum();
            sumi += self.scales[s] * dot;
        }
        if self.dmin != 0.0 || self.mins.iter().any(|&m| m != 0) {
            for (j, bs) in bsums.iter().enumerate() {
                summ += *bs as i32 * self.mins[j * 16 / self.sub];
            }
        }
        ad * self.d * sumi as f32 - ad * self.dmin * summ as f32
    }
}

/// Unpack the 8 six-bit scales and 8 six-bit mins shared by Q4_K and Q5_K.
fn scales_mins_k4(b: &[u8]) -> ([i32; 16], [i32; 16]) {
    let mut sc = [0i32; 16];
    let mut mn = [0i32; 16];
    for j in 0..8 {
        let (s, m) = if j < 4 {
            (b[j] & 63, b[j + 4] & 63)
        } else {
            ((b[j + 4] & 0x0f) | ((b[j - 4] >> 6) << 4), (b[j + 4] >> 4) | ((b[j] >> 6) << 4))
        };
        sc[j] = s as i32;
        mn[j] = m as i32;
    }
    (sc, mn)
}

impl Q2K {
    pub const BYTES: usize = 84;
    pub fn unpack(b: &[u8]) -> Unpacked {
        let (scales_b, qs) = (&b[0..16], &b[16..80]);
        let mut u = Unpacked { d: f16_at(b, 80), dmin: f16_at(b, 82), sub: 16, scales: [0; 16], mins: [0; 16], q: [0; QK_K] };
        for s in 0..16 {
            u.scales[s] = (scales_b[s] & 0x0f) as i32;
            u.mins[s] = (scales_b[s] >> 4) as i32;
        }
        for e in 0..QK_K {
            let (half, j, l) = (e / 128, (e % 128) / 32, e % 32);
            u.q[e] = ((qs[32 * half + l] >> (2 * j)) & 3) as i8;
        }
        u
    }
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        Self::unpack(b).dequantize(out)
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        Self::unpack(w).dot_q8k(a)
    }
}

impl Q3K {
    pub const BYTES: usize = 110;
    pub fn unpack(b: &[u8]) -> Unpacked {
        let (hmask, qs, sb) = (&b[0..32], &b[32..96], &b[96..108]);
        let mut u = Unpacked { d: f16_at(b, 108), dmin: 0.0, sub: 16, scales: [0; 16], mins: [0; 16], q: [0; QK_K] };
        for i in 0..16 {
            let low = if i < 8 { sb[i] & 0x0f } else { sb[i - 8] >> 4 };
            let high = (sb[8 + i % 4] >> (2 * (i / 4))) & 3;
            u.scales[i] = (low | (high << 4)) as i32 - 32;
        }
        for e in 0..QK_K {
            let (half, j, l) = (e / 128, (e % 128) / 32, e % 32);
            let low = ((qs[32 * half + l] >> (2 * j)) & 3) as i8;
            let hbit = (hmask[l] >> (4 * half + j)) & 1;
            u.q[e] = low - if hbit == 1 { 0 } else { 4 };
        }
        u
    }
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        Self::unpack(b).dequantize(out)
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        Self::unpack(w).dot_q8k(a)
    }
}

impl Q4K {
    pub const BYTES: usize = 144;
    pub fn unpack(b: &[u8]) -> Unpacked {
        let (scales, mins) = scales_mins_k4(&b[4..16]);
        let qs = &b[16..144];
        let mut u = Unpacked { d: f16_at(b, 0), dmin: f16_at(b, 2), sub: 32, scales, mins, q: [0; QK_K] };
        for e in 0..QK_K {
            let (chunk, hi, l) = (e / 64, (e % 64) / 32, e % 32);
            let byte = qs[32 * chunk + l];
            u.q[e] = (if hi == 0 { byte & 0x0f } else { byte >> 4 }) as i8;
        }
        u
    }
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        Self::unpack(b).dequantize(out)
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        Self::unpack(w).dot_q8k(a)
    }
}

impl Q5K {
    pub const BYTES: usize = 176;
    pub fn unpack(b: &[u8]) -> Unpacked {
        let (scales, mins) = scales_mins_k4(&b[4..16]);
        let (qh, qs) = (&b[16..48], &b[48..176]);
        let mut u = Unpacked { d: f16_at(b, 0), dmin: f16_at(b, 2), sub: 32, scales, mins, q: [0; QK_K] };
        for e in 0..QK_K {
            let (chunk, hi, l) = (e / 64, (e % 64) / 32, e % 32);
            let byte = qs[32 * chunk + l];
            let low = if hi == 0 { byte & 0x0f } else { byte >> 4 };
            let high = (qh[l] >> (2 * chunk + hi)) & 1;
            u.q[e] = (low | (high << 4)) as i8;
        }
        u
    }
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        Self::unpack(b).dequantize(out)
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        Self::unpack(w).dot_q8k(a)
    }
}

impl Q6K {
    pub const BYTES: usize = 210;
    pub fn unpack(b: &[u8]) -> Unpacked {
        let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
        let mut u = Unpacked { d: f16_at(b, 208), dmin: 0.0, sub: 16, scales: [0; 16], mins: [0; 16], q: [0; QK_K] };
        for s in 0..16 {
            u.scales[s] = sc[s] as i8 as i32;
        }
        for e in 0..QK_K {
            let (half, quarter, l) = (e / 128, (e % 128) / 32, e % 32);
            let lbyte = ql[64 * half + l + 32 * (quarter & 1)];
            let low = if quarter < 2 { lbyte & 0x0f } else { lbyte >> 4 };
            let high = (qh[32 * half + l] >> (2 * quarter)) & 3;
            u.q[e] = (low | (high << 4)) as i8 - 32;
        }
        u
    }
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        Self::unpack(b).dequantize(out)
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        Self::unpack(w).dot_q8k(a)
    }
}

impl Q8K {
    pub const BYTES: usize = 292;

    /// (d, qs, bsums) of a Q8_K block.
    pub fn parts(b: &[u8]) -> (f32, &[i8], [i16; 16]) {
        let qs: &[u8] = &b[4..4 + QK_K];
        let mut bsums = [0i16; 16];
        for (j, v) in bsums.iter_mut().enumerate() {
            *v = i16::from_le_bytes([b[260 + 2 * j], b[261 + 2 * j]]);
        }
        // Reinterpret u8 as i8 without unsafe: collect into a fixed array view.
        (f32_at(b, 0), bytes_as_i8(qs), bsums)
    }

    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let d = f32_at(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[4..4 + QK_K]) {
            *o = d * (q as i8) as f32;
        }
    }

    /// GGML's reference: the element of largest magnitude maps to -127 (so `d` may be negative),
    /// rounding half to even.
    pub fn quantize(x: &[f32], out: &mut [u8]) {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        out.fill(0);
        if amax == 0.0 {
            return;
        }
        let iscale = -127.0 / max;
        for (j, &v) in x.iter().enumerate() {
            let q = (iscale * v).round_ties_even().min(127.0) as i32;
            out[4 + j] = q as i8 as u8;
        }
        for g in 0..16 {
            let s: i32 = out[4 + 16 * g..4 + 16 * (g + 1)].iter().map(|&q| q as i8 as i32).sum();
            out[260 + 2 * g..262 + 2 * g].copy_from_slice(&(s as i16).to_le_bytes());
        }
        out[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }

    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        let (dw, qw, _) = Self::parts(w);
        let (da, qa, _) = Self::parts(a);
        let sumi: i32 = qw.iter().zip(qa).map(|(&x, &y)| x as i32 * y as i32).sum();
        dw * da * sumi as f32
    }
}

fn bytes_as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have the same size and alignment and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<i8>(), b.len()) }
}
