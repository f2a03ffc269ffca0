//! smelt-kernels: the numeric bottom layer.
//!
//! - [`formats`]: tensor element formats with scalar reference kernels.
//! - [`dispatch`]: the kernel table, picking SIMD variants from CPU features at run time.
//! - [`kv`]: the formats of cached keys and values (f16, q8_0, q4_0).
//! - [`pool`]: a persistent thread pool for data-parallel kernels.
//! - [`ops`]: the compute interface the model code uses (matmul, norms, rope, attention helpers).
//! - [`bandwidth`]: the machine's memory-read bandwidth, for setting decoding against.

pub mod bandwidth;
pub mod dispatch;
pub mod formats;
pub mod kv;
pub mod mmap;
pub mod ops;
pub mod pool;
mod simd;

pub use formats::DType;
