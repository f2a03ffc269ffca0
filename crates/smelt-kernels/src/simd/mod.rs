//! SIMD kernels, one file per instruction set. Each is installed in the dispatch table only when
//! the CPU reports the features it needs, and each has a test against the scalar reference.

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx2_group;
#[cfg(target_arch = "x86_64")]
pub mod avx2_math;
