//! Bounds-checked GGUF header parser over a byte slice.

use super::{GgufError, Header, TensorInfo, Value, ValueType, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use smelt_kernels::formats::DType;
use std::collections::HashSet;

/// Arrays nest (arrays of arrays); real files use one level. Bound it so hostile files cannot recurse deeply.
const MAX_ARRAY_DEPTH: usize = 4;
/// GGML's limit on tensor name length.
const MAX_NAME_BYTES: u64 = 64;

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8], GgufError> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError::Truncated { what: what(), offset: self.pos as u64, need: n, len: self.buf.len() as u64 });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let start = self.pos as u64;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::Metadata { offset: start, msg: format!("{} is not valid UTF-8", what()) })
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
}

/// Smallest encoded size of one value of a type, to reject impossible element counts up front.
fn min_size(t: ValueType) -> u64 {
    match t {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
        ValueType::U16 | ValueType::I16 => 2,
        ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
        ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
        ValueType::Array => 12,
    }
}

fn read_value(c: &mut Cursor, t: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
    let what = || format!("the value of {key:?}");
    Ok(match t {
        ValueType::U8 => Value::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(c.array::<1>(&what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => Value::U32(u32::from_le_bytes(c.array(&what)?)),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => Value::U64(u64::from_le_bytes(c.array(&what)?)),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => {
            let off = c.pos as u64;
            match c.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Metadata { offset: off, msg: format!("bool value of {key:?} is {b}, not 0 or 1") }),
            }
        }
        ValueType::String => Value::String(c.string(&what)?),
        ValueType::Array => {
            let off = c.pos as u64;
            if depth >= MAX_ARRAY_DEPTH {
                return Err(GgufError::Metadata { offset: off, msg: format!("arrays in {key:?} nest deeper than {MAX_ARRAY_DEPTH}") });
            }
            let et_id = c.u32(&what)?;
            let et = ValueType::from_id(et_id)
                .ok_or_else(|| GgufError::Metadata { offset: off, msg: format!("array {key:?} has unknown element type {et_id}") })?;
            let n = c.u64(&what)?;
            if n.saturating_mul(min_size(et)) > c.remaining() {
                return Err(GgufError::Truncated {
                    what: format!("{n} elements of array {key:?}"),
                    offset: c.pos as u64,
                    need: n.saturating_mul(min_size(et)),
                    len: c.buf.len() as u64,
                });
            }
            let mut items = Vec::with_capacity(n as usize);
            for _ in 0..n {
                items.push(read_value(c, et, key, depth + 1)?);
            }
            Value::Array(et, items)
        }
    })
}

/// Parse and validate a GGUF header. `buf` is the whole file.
pub fn parse(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c.array::<4>(&|| "the magic number".into())?;
    if &magic != MAGIC {
        return Err(GgufError::BadMagic { found: String::from_utf8_lossy(&magic).into_owned() });
    }
    let version = c.u32(&|| "the version".into())?;
    if version.swap_bytes() == 2 || version.swap_bytes() == 3 {
        return Err(GgufError::BigEndian);
    }
    if version != 2 && version != 3 {
        return Err(GgufError::Version(version));
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kv = c.u64(&|| "the metadata count".into())?;
    // Each key/value takes at least 13 bytes and each tensor header at least 28.
    if n_kv.saturating_mul(13) > c.remaining() {
        return Err(GgufError::Metadata { offset: 16, msg: format!("metadata count {n_kv} cannot fit in the file") });
    }
    if n_tensors.saturating_mul(28) > c.remaining() {
        return Err(GgufError::Metadata { offset: 8, msg: format!("tensor count {n_tensors} cannot fit in the file") });
    }

    let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_kv as usize);
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let off = c.pos as u64;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        if !keys.insert(key.clone()) {
            return Err(GgufError::Metadata { offset: off, msg: format!("duplicate key {key:?}") });
        }
        let tid = c.u32(&|| format!("the type of {key:?}"))?;
        let t = ValueType::from_id(tid)
            .ok_or_else(|| GgufError::Metadata { offset: off, msg: format!("key {key:?} has unknown value type {tid}") })?;
        let v = read_value(&mut c, t, &key, 0)?;
        metadata.push((key, v));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if a.is_power_of_two() => *a as u64,
        Some((_, v)) => {
            return Err(GgufError::Key { key: "general.alignment".into(), msg: format!("must be a u32 power of two, found {}", v.describe()) })
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let off = c.pos as u64;
        let name_len = u64::from_le_bytes(c.array(&|| format!("the name of tensor #{i}"))?);
        if name_len > MAX_NAME_BYTES {
            return Err(GgufError::Metadata { offset: off, msg: format!("tensor #{i} name is {name_len} bytes (at most {MAX_NAME_BYTES})") });
        }
        c.pos -= 8;
        let name = c.string(&|| format!("the name of tensor #{i}"))?;
        let terr = |msg: String| GgufError::Tensor { name: name.clone(), msg };
        if !names.insert(name.clone()) {
            return Err(terr("duplicate tensor name".into()));
        }
        let n_dims = c.u32(&|| format!("the dimension count of tensor {name:?}"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(terr(format!("has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&|| format!("the dimensions of tensor {name:?}"))?);
        }
        let type_id = c.u32(&|| format!("the type of tensor {name:?}"))?;
        let dtype = DType::from_ggml_id(type_id).map_err(|n| terr(format!("has type {n}, which smelt does not support")))?;
        let offset = c.u64(&|| format!("the offset of tensor {name:?}"))?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| terr(format!("dimensions {dims:?} overflow")))?;
        if dims[0] % dtype.block_len() as u64 != 0 {
            return Err(terr(format!("row length {} is not a multiple of the {dtype} block size {}", dims[0], dtype.block_len())));
        }
        let n_bytes = (n_elements / dtype.block_len() as u64)
            .checked_mul(dtype.block_bytes() as u64)
            .ok_or_else(|| terr("size overflows".into()))?;
        if offset % alignment != 0 {
            return Err(terr(format!("data offset {offset} is not a multiple of the alignment {alignment}")));
        }
        tensors.push(TensorInfo { name, dims, dtype, offset, n_bytes });
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &mut tensors {
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len => t.offset = s,
            _ => {
                return Err(GgufError::Tensor {
                    name: t.name.clone(),
                    msg: format!(
                        "data at offset {} + {} ({} bytes) lies beyond the end of the file ({file_len} bytes)",
                        data_offset, t.offset, t.n_bytes
                    ),
                })
            }
        }
    }
    Ok(Header { version, alignment, metadata, tensors, data_offset })
}
