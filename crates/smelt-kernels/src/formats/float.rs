//! Unquantized formats: F32, F16, BF16. Their activations stay f32.

use super::{f16_at, f32_at, DType};

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Scalar reference: weight row in `dtype` (F32, F16 or BF16) · f32 activation row.
pub fn vec_dot(dtype: DType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0f64;
    for i in 0..n {
        let x = match dtype {
            DType::F32 => f32_at(w, 4 * i),
            DType::F16 => f16_at(w, 2 * i),
            DType::BF16 => bf16_to_f32(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])),
            other => panic!("{other} is not a float format"),
        };
        sum += x as f64 * f32_at(a, 4 * i) as f64;
    }
    sum as f32
}
