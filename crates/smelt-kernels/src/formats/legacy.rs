//! The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the activation format Q8_1.
//!
//! Byte layouts (all little-endian, f16 scales):
//! - Q4_0 (18 B): d, qs[16]; x = d * (nibble - 8); low nibbles are elements 0..16, high 16..32.
//! - Q4_1 (20 B): d, m, qs[16]; x = d * nibble + m.
//! - Q5_0 (22 B): d, qh: u32, qs[16]; bit j of qh is the fifth bit of element j; x = d * (q - 16).
//! - Q5_1 (24 B): d, m, qh: u32, qs[16]; x = d * q + m.
//! - Q8_0 (34 B): d, qs: [i8; 32]; x = d * q.
//! - Q8_1 (36 B): d, s = d * sum(qs), qs: [i8; 32].

use super::{f16_at, put_f16};

pub struct Q4_0;
pub struct Q4_1;
pub struct Q5_0;
pub struct Q5_1;
pub struct Q8_0;
pub struct Q8_1;

/// The 32 unsigned 4-bit values of a nibble-packed array, in element order.
#[inline]
fn nibbles(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = qs[j] & 0x0f;
        q[j + 16] = qs[j] >> 4;
    }
    q
}

/// The 32 unsigned 5-bit values of a Q5 block (`qh` holds the fifth bits).
#[inline]
fn fives(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = nibbles(qs);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) as u8) << 4;
    }
    q
}

#[inline]
fn i8s(b: &[u8]) -> impl Iterator<Item = i32> + '_ {
    b.iter().map(|&v| v as i8 as i32)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

impl Q4_0 {
    pub const BYTES: usize = 18;
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, q) in out.iter_mut().zip(nibbles(&b[2..18])) {
            *o = d * (q as i32 - 8) as f32;
        }
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        let sumi: i32 = nibbles(&w[2..18]).iter().zip(i8s(&a[2..34])).map(|(&q, y)| (q as i32 - 8) * y).sum();
        sumi as f32 * f16_at(w, 0) * f16_at(a, 0)
    }
}

impl Q4_1 {
    pub const BYTES: usize = 20;
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (o, q) in out.iter_mut().zip(nibbles(&b[4..20])) {
            *o = d * q as f32 + m;
        }
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        let sumi: i32 = nibbles(&w[4..20]).iter().zip(i8s(&a[4..36])).map(|(&q, y)| q as i32 * y).sum();
        sumi as f32 * f16_at(w, 0) * f16_at(a, 0) + f16_at(w, 2) * f16_at(a, 2)
    }
}

impl Q5_0 {
    pub const BYTES: usize = 22;
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, q) in out.iter_mut().zip(fives(u32_at(b, 2), &b[6..22])) {
            *o = d * (q as i32 - 16) as f32;
        }
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        let q = fives(u32_at(w, 2), &w[6..22]);
        let sumi: i32 = q.iter().zip(i8s(&a[2..34])).map(|(&q, y)| (q as i32 - 16) * y).sum();
        sumi as f32 * f16_at(w, 0) * f16_at(a, 0)
    }
}

impl Q5_1 {
    pub const BYTES: usize = 24;
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (o, q) in out.iter_mut().zip(fives(u32_at(b, 4), &b[8..24])) {
            *o = d * q as f32 + m;
        }
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        let q = fives(u32_at(w, 4), &w[8..24]);
        let sumi: i32 = q.iter().zip(i8s(&a[4..36])).map(|(&q, y)| q as i32 * y).sum();
        sumi as f32 * f16_at(w, 0) * f16_at(a, 0) + f16_at(w, 2) * f16_at(a, 2)
    }
}

/// Scale so the largest magnitude maps to 127. Rounding is half to even, as GGML's SIMD
/// quantizers do (its plain C one rounds half away from zero; the two differ only on exact ties).
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

impl Q8_0 {
    pub const BYTES: usize = 34;
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, q) in out.iter_mut().zip(i8s(&b[2..34])) {
            *o = d * q as f32;
        }
    }
    pub fn quantize(x: &[f32], out: &mut [u8]) {
        let (d, id) = q8_scale(x);
        put_f16(out, 0, d);
        for (o, v) in out[2..34].iter_mut().zip(x) {
            *o = (v * id).round_ties_even() as i32 as i8 as u8;
        }
    }
    pub fn dot(w: &[u8], a: &[u8]) -> f32 {
        let sumi: i32 = i8s(&w[2..34]).zip(i8s(&a[2..34])).map(|(x, y)| x * y).sum();
        sumi as f32 * f16_at(w, 0) * f16_at(a, 0)
    }
}

impl Q8_1 {
    pub const BYTES: usize = 36;
    pub fn dequantize(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, q) in out.iter_mut().zip(i8s(&b[4..36])) {
            *o = d * q as f32;
        }
    }
    pub fn quantize(x: &[f32], out: &mut [u8]) {
        let (d, id) = q8_scale(x);
        let mut sum = 0i32;
        for (o, v) in out[4..36].iter_mut().zip(x) {
            let q = (v * id).round_ties_even() as i32;
            sum += q;
            *o = q as i8 as u8;
        }
        put_f16(out, 0, d);
        put_f16(out, 2, sum as f32 * d);
    }
}
