//! GGUF: the model file format of llama.cpp (versions 2 and 3).
//!
//! Layout: magic "GGUF", version u32, tensor count u64, metadata count u64, then the metadata
//! key/value pairs, then one header per tensor (name, dims, type, offset), then — at the next
//! multiple of `general.alignment` (default 32) — the tensor data, each tensor at its own aligned
//! offset. All integers little-endian. [`parse`] validates everything against the file's length
//! so a truncated or hostile file is an error naming what is wrong, never a panic.

mod reader;
mod value;
mod writer;

pub use reader::parse;
pub use value::{Value, ValueType};
pub use writer::GgufWriter;

use smelt_kernels::formats::DType;
use smelt_kernels::mmap::MappedFile;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a GGUF file (magic {found:?} at offset 0; expected \"GGUF\")")]
    BadMagic { found: String },
    #[error("unsupported GGUF version {0} (smelt reads versions 2 and 3)")]
    Version(u32),
    #[error("GGUF file is big-endian; smelt reads little-endian files only")]
    BigEndian,
    #[error("file truncated: reading {what} at offset {offset} needs {need} bytes, file has {len}")]
    Truncated { what: String, offset: u64, need: u64, len: u64 },
    #[error("invalid metadata at offset {offset}: {msg}")]
    Metadata { offset: u64, msg: String },
    #[error("metadata key {key:?}: {msg}")]
    Key { key: String, msg: String },
    #[error("tensor {name:?}: {msg}")]
    Tensor { name: String, msg: String },
}

/// One tensor's header. `dims[0]` is the innermost (contiguous) dimension, as in GGML.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// Offset of the data from the start of the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: metadata in file order and tensor headers.
#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub alignment: u64,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Start of the tensor data section.
    pub data_offset: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn key_err(key: &str, msg: impl Into<String>) -> GgufError {
        GgufError::Key { key: key.to_string(), msg: msg.into() }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Self::key_err(key, format!("expected a string, found {}", v.type_name()))),
        }
    }

    /// An unsigned integer of any width; negative or non-integer values are errors.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::key_err(key, format!("expected a non-negative integer, found {}", v.describe()))),
        }
    }

    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(|f| Some(f as f32)).ok_or_else(|| Self::key_err(key, format!("expected a number, found {}", v.describe()))),
        }
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::key_err(key, format!("expected a bool, found {}", v.describe()))),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[Value]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(_, items)) => Ok(Some(items)),
            Some(v) => Err(Self::key_err(key, format!("expected an array, found {}", v.describe()))),
        }
    }

    /// A required key, with an error naming it when absent.
    pub fn require<T>(&self, key: &str, v: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
        v?.ok_or_else(|| Self::key_err(key, "missing"))
    }
}

/// Mix `bytes` into the 64-bit hash `h`, eight bytes at a time (fast, not cryptographic: it
/// names files' contents and checks them for damage, never against an adversary).
pub fn mix_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let (words, tail) = bytes.split_at(bytes.len() / 8 * 8);
    for w in words.chunks_exact(8) {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    for &b in tail {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A 64-bit digest of a file's bytes, read through the page cache (so pages the model released
/// after repacking are not faulted back in). Names the KV a model or adapter computes in the
/// persistent prefix cache: a different file never matches.
pub fn file_digest(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0x6a09_e667_f3bc_c908;
    let (mut total, mut filled) = (0u64, 0usize);
    // Whole buffers at a time, however the reads split, so the digest depends on the bytes only.
    loop {
        let n = f.read(&mut buf[filled..])?;
        total += n as u64;
        filled += n;
        if n == 0 || filled == buf.len() {
            h = mix_bytes(h, &buf[..filled]);
            if n == 0 {
                break;
            }
            filled = 0;
        }
    }
    Ok(h ^ total.wrapping_mul(0xff51_afd7_ed55_8ccd))
}

/// A GGUF file mapped into memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    map: MappedFile,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let map = MappedFile::open(path).map_err(|source| GgufError::Io { path: path.to_path_buf(), source })?;
        let header = parse(map.bytes())?;
        Ok(GgufFile { path: path.to_path_buf(), header, map })
    }

    /// The bytes of a tensor (validated to lie within the file by `parse`).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map.bytes()[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    /// `len` bytes of the file from `offset`; callers pass ranges of validated tensors.
    pub fn slice(&self, offset: usize, len: usize) -> &[u8] {
        &self.map.bytes()[offset..offset + len]
    }

    /// Release the resident pages of `offset..offset + len` (bytes copied elsewhere).
    pub fn release(&self, offset: usize, len: usize) {
        self.map.release(offset, len)
    }

    pub fn file_len(&self) -> u64 {
        self.map.bytes().len() as u64
    }
}
