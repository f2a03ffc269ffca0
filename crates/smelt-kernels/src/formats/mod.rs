//! Tensor element formats as stored in GGUF files.
//!
//! Quantized formats pack a fixed number of elements into a block of bytes (a scale plus small
//! integers). Each format has a plain scalar reference here; the fast kernels in `simd` must agree
//! with it. Matrix products quantize the activations once into the weight's `vec_dot_type`, so the
//! inner loop is an integer dot product.

mod float;
pub mod grouped;
mod kquants;
mod legacy;
pub mod quantize;

pub use kquants::{Q2K, Q3K, Q4K, Q5K, Q6K, Q8K};
pub use legacy::{Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1};

/// Elements per block of the k-quant formats ("super-block").
pub const QK_K: usize = 256;

/// An element format. Discriminants are GGML's type ids, as written in GGUF tensor headers,
/// except for the grouped layouts (ids from 240), which smelt makes in memory (see [`grouped`]).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    BF16 = 30,
    Q4_0G = 242,
    Q5_0G = 246,
    Q8_0G = 248,
    Q4_KG = 252,
    Q6_KG = 254,
}

/// One past the largest discriminant (the size of tables indexed by format).
pub const DTYPE_IDS: usize = 256;

pub const ALL_DTYPES: [DType; 15] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q8_1,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::Q8_K,
];

/// Formats a model's weights may use (Q8_1 and Q8_K only ever hold activations).
pub const WEIGHT_DTYPES: [DType; 13] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
];

/// smelt's in-memory grouped layouts (see [`grouped`]); never read from files.
pub const GROUPED_DTYPES: [DType; 5] = [DType::Q4_0G, DType::Q5_0G, DType::Q8_0G, DType::Q4_KG, DType::Q6_KG];

impl DType {
    /// The format for a GGML type id, or the id's name (if known) for an error message.
    pub fn from_ggml_id(id: u32) -> Result<DType, String> {
        ALL_DTYPES
            .iter()
            .copied()
            .find(|t| *t as u32 == id)
            .ok_or_else(|| ggml_type_name(id))
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q8_1 => "Q8_1",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::Q8_K => "Q8_K",
            DType::Q4_0G => "Q4_0g",
            DType::Q5_0G => "Q5_0g",
            DType::Q8_0G => "Q8_0g",
            DType::Q4_KG => "Q4_Kg",
            DType::Q6_KG => "Q6_Kg",
        }
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 | DType::Q8_1 => 32,
            DType::Q4_0G | DType::Q5_0G | DType::Q8_0G => grouped::GROUP,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => Q4_0::BYTES,
            DType::Q4_1 => Q4_1::BYTES,
            DType::Q5_0 => Q5_0::BYTES,
            DType::Q5_1 => Q5_1::BYTES,
            DType::Q8_0 => Q8_0::BYTES,
            DType::Q8_1 => Q8_1::BYTES,
            DType::Q2_K => Q2K::BYTES,
            DType::Q3_K => Q3K::BYTES,
            DType::Q4_K => Q4K::BYTES,
            DType::Q5_K => Q5K::BYTES,
            DType::Q6_K => Q6K::BYTES,
            DType::Q8_K => Q8K::BYTES,
            DType::Q4_0G => 4 * Q4_0::BYTES,
            DType::Q5_0G => 4 * Q5_0::BYTES,
            DType::Q8_0G => 4 * Q8_0::BYTES,
            DType::Q4_KG => Q4K::BYTES,
            DType::Q6_KG => Q6K::BYTES,
        }
    }

    /// Bytes taken by `n` elements, or None when `n` is not a whole number of blocks.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if n % self.block_len() != 0 {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// The format activations are quantized to before a dot product with this weight format.
    pub fn vec_dot_type(self) -> DType {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => DType::F32,
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => DType::Q8_0,
            DType::Q4_0G | DType::Q5_0G | DType::Q8_0G => DType::Q8_0,
            DType::Q4_1 | DType::Q5_1 => DType::Q8_1,
            DType::Q8_1 => DType::Q8_1,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::Q8_K => {
                DType::Q8_K
            }
            DType::Q4_KG | DType::Q6_KG => DType::Q8_K,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// GGML's name for a type id, including the types smelt does not implement.
pub fn ggml_type_name(id: u32) -> String {
    let name = match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed from GGML)",
        5 => "Q4_3 (removed from GGML)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("unknown type id {id}"),
    };
    name.to_string()
}

/// Byte offsets of the f16 scale fields within a block (for building test and fuzz data: random
/// bytes with these fields set to sane values make valid blocks).
pub fn scale_offsets(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 | DType::Q8_1 => &[0],
        DType::Q4_0G | DType::Q5_0G | DType::Q8_0G => &[0, 2, 4, 6],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K | DType::Q4_KG => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K | DType::Q6_KG => &[208],
        _ => &[],
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

#[inline]
pub(crate) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
pub(crate) fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// Scalar reference: decode one row of `dtype` into f32. `out.len()` elements are decoded.
pub fn dequantize_row(dtype: DType, src: &[u8], out: &mut [f32]) {
    let bl = dtype.block_len();
    let bb = dtype.block_bytes();
    assert_eq!(out.len() % bl, 0, "row length must be whole blocks");
    assert!(src.len() >= out.len() / bl * bb, "source row too short");
    for (block, dst) in src.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        match dtype {
            DType::F32 => dst[0] = f32_at(block, 0),
            DType::F16 => dst[0] = f16_at(block, 0),
            DType::BF16 => dst[0] = float::bf16_to_f32(u16::from_le_bytes([block[0], block[1]])),
            DType::Q4_0 => Q4_0::dequantize(block, dst),
            DType::Q4_1 => Q4_1::dequantize(block, dst),
            DType::Q5_0 => Q5_0::dequantize(block, dst),
            DType::Q5_1 => Q5_1::dequantize(block, dst),
            DType::Q8_0 => Q8_0::dequantize(block, dst),
            DType::Q8_1 => Q8_1::dequantize(block, dst),
            DType::Q2_K => Q2K::dequantize(block, dst),
            DType::Q3_K => Q3K::dequantize(block, dst),
            DType::Q4_K => Q4K::dequantize(block, dst),
            DType::Q5_K => Q5K::dequantize(block, dst),
            DType::Q6_K => Q6K::dequantize(block, dst),
            DType::Q8_K => Q8K::dequantize(block, dst),
            DType::Q4_0G | DType::Q5_0G | DType::Q8_0G | DType::Q4_KG | DType::Q6_KG => {
                let file = grouped::ungrouped(dtype).expect("a grouped layout's file format");
                let mut blocks = [0u8; Q6K::BYTES];
                grouped::ungroup_blocks(file, block, &mut blocks[..bb]);
                dequantize_row(file, &blocks[..bb], dst);
            }
        }
    }
}

/// Scalar reference: encode `x` as an activation row of `dtype` (a `vec_dot_type`).
/// Only the formats activations are quantized to are supported: F32, Q8_0, Q8_1, Q8_K.
pub fn quantize_row(dtype: DType, x: &[f32], out: &mut [u8]) {
    let bl = dtype.block_len();
    let bb = dtype.block_bytes();
    assert_eq!(x.len() % bl, 0, "row length must be whole blocks");
    for (src, block) in x.chunks_exact(bl).zip(out.chunks_exact_mut(bb)) {
        match dtype {
            DType::F32 => block.copy_from_slice(&src[0].to_le_bytes()),
            DType::Q8_0 => Q8_0::quantize(src, block),
            DType::Q8_1 => Q8_1::quantize(src, block),
            DType::Q8_K => Q8K::quantize(src, block),
            other => panic!("{other} is not an activation format"),
        }
    }
}

/// Scalar reference dot product of a weight row (`w`, format `dtype`, `n` elements) with an
/// activation row (`a`, format `dtype.vec_dot_type()`).
pub fn vec_dot(dtype: DType, n: usize, w: &[u8], a: &[u8]) -> f32 {
    let blocks = n / dtype.block_len();
    let wb = dtype.block_bytes();
    let ab = dtype.vec_dot_type().block_bytes() * (dtype.block_len() / dtype.vec_dot_type().block_len());
    let w = &w[..blocks * wb];
    let a = &a[..blocks * ab];
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => float::vec_dot(dtype, n, w, a),
        DType::Q4_0 => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q4_0::dot(w, a)).sum(),
        DType::Q4_1 => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q4_1::dot(w, a)).sum(),
        DType::Q5_0 => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q5_0::dot(w, a)).sum(),
        DType::Q5_1 => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q5_1::dot(w, a)).sum(),
        DType::Q8_0 => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q8_0::dot(w, a)).sum(),
        DType::Q8_1 => panic!("Q8_1 is an activation format"),
        DType::Q2_K => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q2K::dot(w, a)).sum(),
        DType::Q3_K => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q3K::dot(w, a)).sum(),
        DType::Q4_K => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q4K::dot(w, a)).sum(),
        DType::Q5_K => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q5K::dot(w, a)).sum(),
        DType::Q6_K => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q6K::dot(w, a)).sum(),
        DType::Q8_K => w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| Q8K::dot(w, a)).sum(),
        DType::Q4_0G | DType::Q5_0G | DType::Q8_0G | DType::Q4_KG | DType::Q6_KG => {
            let file = grouped::ungrouped(dtype).expect("a grouped layout's file format");
            let mut blocks = [0u8; Q6K::BYTES];
            w.chunks_exact(wb).zip(a.chunks_exact(ab)).map(|(w, a)| {
                grouped::ungroup_blocks(file, w, &mut blocks[..wb]);
                vec_dot(file, dtype.block_len(), &blocks[..wb], a)
            }).sum()
        }
    }
}
