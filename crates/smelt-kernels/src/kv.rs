//! Formats of cached keys and values (llama.cpp's `--cache-type-k` / `--cache-type-v`): f16, or
//! the q8_0 / q4_0 blocks of 32 values with one f16 scale each. Attention reads the quantized
//! blocks directly; [`KvRows`] is how a cache hands them to it.

use crate::formats::{quantize::quantize_weights, DType};
use half::f16;

/// How a KV cache stores keys or values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    /// Parse llama.cpp's name for it (`f16`, `q8_0`, `q4_0`).
    pub fn parse(s: &str) -> Result<KvType, String> {
        KvType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown KV cache type {s:?}; use f16, q8_0 or q4_0"))
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            KvType::F16 => DType::F16,
            KvType::Q8_0 => DType::Q8_0,
            KvType::Q4_0 => DType::Q4_0,
        }
    }

    /// Values sharing one scale (1 for f16); heads must be whole blocks.
    pub fn block_len(self) -> usize {
        self.dtype().block_len()
    }

    /// Bytes `elems` values take (`elems` a multiple of [`KvType::block_len`]).
    pub fn bytes(self, elems: usize) -> usize {
        elems / self.block_len() * self.dtype().block_bytes()
    }

    /// Bytes per stored value, for reporting (q8_0: 34/32).
    pub fn bytes_per_value(self) -> f64 {
        self.dtype().block_bytes() as f64 / self.block_len() as f64
    }

    /// Whether heads of `head_dim` values can be stored (each head whole blocks, so attention
    /// can read one head's blocks on their own).
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        if head_dim % self.block_len() == 0 {
            Ok(())
        } else {
            Err(format!("KV cache type {} needs a head size that is a multiple of {}; this model's is {head_dim} (use f16)", self.name(), self.block_len()))
        }
    }

    /// Size of the Walsh-Hadamard rotation applied to keys of heads of `head_dim` values stored
    /// in this type, as llama.cpp does for quantized caches: queries and keys are rotated alike
    /// (dot products unchanged) so an outlier dimension spreads over its block instead of
    /// costing the other 31 values their precision. The largest power of two ≥ 64 dividing the
    /// head; None for f16 or heads not a multiple of 64.
    pub fn key_rotation(self, head_dim: usize) -> Option<usize> {
        if self == KvType::F16 || head_dim % 64 != 0 {
            return None;
        }
        let mut n = 64;
        while head_dim % (2 * n) == 0 {
            n *= 2;
        }
        Some(n)
    }

    /// Size of the rotation applied to values (rotated back after attention): 64 for quantized
    /// types and heads a multiple of 64, as llama.cpp does.
    pub fn value_rotation(self, head_dim: usize) -> Option<usize> {
        (self != KvType::F16 && head_dim % 64 == 0).then_some(64)
    }

    /// Encode a row of keys or values (quantized as llama.cpp does when it stores them).
    pub fn encode(self, src: &[f32], dst: &mut [u8]) {
        quantize_weights(self.dtype(), src, dst)
    }
}

/// Keys or values of a cache as attention reads them: rows of `stride` values stored in one
/// [`KvType`], the row of slot j starting at value `j * stride`.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F16(&'a [f16]),
    Q8_0(&'a [u8]),
    Q4_0(&'a [u8]),
}

impl KvRows<'_> {
    pub fn kv_type(&self) -> KvType {
        match self {
            KvRows::F16(_) => KvType::F16,
            KvRows::Q8_0(_) => KvType::Q8_0,
            KvRows::Q4_0(_) => KvType::Q4_0,
        }
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        let t = self.kv_type();
        match self {
            KvRows::F16(v) => v.len(),
            KvRows::Q8_0(b) | KvRows::Q4_0(b) => b.len() / t.dtype().block_bytes() * t.block_len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scalar reference: the values `at..at + out.len()` (whole blocks), as attention sees them.
    pub fn decode(&self, at: usize, out: &mut [f32]) {
        match self {
            KvRows::F16(v) => {
                for (o, x) in out.iter_mut().zip(&v[at..]) {
                    *o = x.to_f32();
                }
            }
            KvRows::Q8_0(b) => crate::formats::dequantize_row(DType::Q8_0, &b[at / 32 * 34..], out),
            KvRows::Q4_0(b) => crate::formats::dequantize_row(DType::Q4_0, &b[at / 32 * 18..], out),
        }
    }

    /// Scalar reference: the f16 scale of the block holding value `at` and that block's values
    /// unscaled (for f16: scale 1 and the values themselves), 32 at a time.
    pub fn block(&self, at: usize) -> (f32, [f32; 32]) {
        let mut vals = [0f32; 32];
        match self {
            KvRows::F16(v) => {
                for (o, x) in vals.iter_mut().zip(&v[at..]) {
                    *o = x.to_f32();
                }
                (1.0, vals)
            }
            KvRows::Q8_0(b) => {
                let blk = &b[at / 32 * 34..][..34];
                for (o, &q) in vals.iter_mut().zip(&blk[2..]) {
                    *o = q as i8 as f32;
                }
                (f16::from_le_bytes([blk[0], blk[1]]).to_f32(), vals)
            }
            KvRows::Q4_0(b) => {
                let blk = &b[at / 32 * 18..][..18];
                for (i, &q) in blk[2..].iter().enumerate() {
                    vals[i] = (q & 15) as f32 - 8.0;
                    vals[i + 16] = (q >> 4) as f32 - 8.0;
                }
                (f16::from_le_bytes([blk[0], blk[1]]).to_f32(), vals)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_rows_decode_close_to_the_input() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.31).collect();
        for t in KvType::ALL {
            let mut bytes = vec![0u8; t.bytes(64)];
            t.encode(&x, &mut bytes);
            let halves: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let rows = match t {
                KvType::F16 => KvRows::F16(&halves),
                KvType::Q8_0 => KvRows::Q8_0(&bytes),
                KvType::Q4_0 => KvRows::Q4_0(&bytes),
            };
            assert_eq!(rows.len(), 64);
            let mut y = vec![0f32; 64];
            rows.decode(0, &mut y);
            let tol = match t {
                KvType::F16 => 0.01,
                KvType::Q8_0 => 0.03,
                KvType::Q4_0 => 0.4,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "{t:?}: {a} vs {b}");
            }
            // `block` gives the same values as scale × unscaled.
            for at in [0, 32] {
                let (d, vals) = rows.block(at);
                for i in 0..32 {
                    assert_eq!(d * vals[i], y[at + i], "{t:?} block at {at}, value {i}");
                }
            }
        }
        assert_eq!(KvType::parse("Q8_0"), Ok(KvType::Q8_0));
        assert!(KvType::parse("q5_1").is_err());
        assert!(KvType::Q4_0.check_head_dim(48).is_err());
        assert!(KvType::F16.check_head_dim(48).is_ok());
        assert_eq!((KvType::Q8_0.key_rotation(64), KvType::Q8_0.key_rotation(256), KvType::Q4_0.key_rotation(192)), (Some(64), Some(256), Some(64)));
        assert_eq!((KvType::F16.key_rotation(64), KvType::Q8_0.key_rotation(32), KvType::Q8_0.value_rotation(256)), (None, None, Some(64)));
    }
}
