//! The kernel table: for each format, the dot-product and activation-quantization functions to
//! use on this CPU. Chosen once at run time from CPU features, so one portable binary uses the best
//! instructions available. `SMELT_ISA=scalar` forces the scalar reference kernels.

use crate::formats::{self, DType};
use std::sync::OnceLock;

/// `(n, weight row, activation row in vec_dot_type) -> dot product`.
pub type VecDotFn = fn(usize, &[u8], &[u8]) -> f32;
/// `(f32 row, output) ` — encode an activation row.
pub type QuantizeFn = fn(&[f32], &mut [u8]);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }
}

/// `gate = act(gate) * up` in place.
pub type GatedFn = fn(&mut [f32], &[f32]);
/// See `ops::attend`.
pub type AttendFn = fn(&[f32], usize, crate::kv::KvRows, crate::kv::KvRows, usize, usize, &[std::ops::Range<usize>], f32, &mut Vec<f32>, &mut [f32]);

pub struct Kernels {
    pub isa: Isa,
    vec_dot: [VecDotFn; formats::DTYPE_IDS],
    quantize: [QuantizeFn; formats::DTYPE_IDS],
    pub silu_mul: GatedFn,
    pub gelu_mul: GatedFn,
    /// log Σ e^x of a row.
    pub log_sum_exp: fn(&[f32]) -> f32,
    /// See `ops::exp_weights`.
    pub exp_weights: fn(&[f32], f32, f32, f32, &mut [f32]) -> f64,
    attend: AttendFn,
    /// y += a · x over f16 x (see `ops::axpy_f16`).
    pub axpy_f16: fn(&mut [f32], f32, &[half::f16]),
}

macro_rules! scalar_dot {
    ($($name:ident => $t:expr),* $(,)?) => {
        $(fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 { formats::vec_dot($t, n, w, a) })*
    };
}
scalar_dot!(
    sdot_f32 => DType::F32, sdot_f16 => DType::F16, sdot_bf16 => DType::BF16,
    sdot_q4_0 => DType::Q4_0, sdot_q4_1 => DType::Q4_1, sdot_q5_0 => DType::Q5_0,
    sdot_q5_1 => DType::Q5_1, sdot_q8_0 => DType::Q8_0, sdot_q2_k => DType::Q2_K,
    sdot_q3_k => DType::Q3_K, sdot_q4_k => DType::Q4_K, sdot_q5_k => DType::Q5_K,
    sdot_q6_k => DType::Q6_K, sdot_q8_k => DType::Q8_K,
    sdot_q4_0g => DType::Q4_0G, sdot_q5_0g => DType::Q5_0G, sdot_q8_0g => DType::Q8_0G,
    sdot_q4_kg => DType::Q4_KG, sdot_q6_kg => DType::Q6_KG,
);

fn squant_f32(x: &[f32], out: &mut [u8]) {
    formats::quantize_row(DType::F32, x, out)
}
fn squant_q8_0(x: &[f32], out: &mut [u8]) {
    formats::quantize_row(DType::Q8_0, x, out)
}
fn squant_q8_1(x: &[f32], out: &mut [u8]) {
    formats::quantize_row(DType::Q8_1, x, out)
}
fn squant_q8_k(x: &[f32], out: &mut [u8]) {
    formats::quantize_row(DType::Q8_K, x, out)
}

fn no_dot(_: usize, _: &[u8], _: &[u8]) -> f32 {
    panic!("no dot product for this format")
}
fn no_quant(_: &[f32], _: &mut [u8]) {
    panic!("not an activation format")
}

impl Kernels {
    /// The plain scalar reference kernels.
    pub fn scalar() -> Kernels {
        let mut k = Kernels {
            isa: Isa::Scalar,
            vec_dot: [no_dot; formats::DTYPE_IDS],
            quantize: [no_quant; formats::DTYPE_IDS],
            silu_mul: crate::ops::silu_mul_scalar,
            gelu_mul: crate::ops::gelu_mul_scalar,
            log_sum_exp: crate::ops::log_sum_exp_scalar,
            exp_weights: crate::ops::exp_weights_scalar,
            attend: crate::ops::attend_scalar,
            axpy_f16: crate::ops::axpy,
        };
        let dots: [(DType, VecDotFn); 19] = [
            (DType::F32, sdot_f32),
            (DType::F16, sdot_f16),
            (DType::BF16, sdot_bf16),
            (DType::Q4_0, sdot_q4_0),
            (DType::Q4_1, sdot_q4_1),
            (DType::Q5_0, sdot_q5_0),
            (DType::Q5_1, sdot_q5_1),
            (DType::Q8_0, sdot_q8_0),
            (DType::Q2_K, sdot_q2_k),
            (DType::Q3_K, sdot_q3_k),
            (DType::Q4_K, sdot_q4_k),
            (DType::Q5_K, sdot_q5_k),
            (DType::Q6_K, sdot_q6_k),
            (DType::Q8_K, sdot_q8_k),
            (DType::Q4_0G, sdot_q4_0g),
            (DType::Q5_0G, sdot_q5_0g),
            (DType::Q8_0G, sdot_q8_0g),
            (DType::Q4_KG, sdot_q4_kg),
            (DType::Q6_KG, sdot_q6_kg),
        ];
        for (t, f) in dots {
            k.vec_dot[t as usize] = f;
        }
        k.quantize[DType::F32 as usize] = squant_f32;
        k.quantize[DType::Q8_0 as usize] = squant_q8_0;
        k.quantize[DType::Q8_1 as usize] = squant_q8_1;
        k.quantize[DType::Q8_K as usize] = squant_q8_k;
        k
    }

    /// The best kernels for the given instruction set, falling back to scalar per format.
    pub fn for_isa(isa: Isa) -> Kernels {
        let mut k = Kernels::scalar();
        match isa {
            Isa::Scalar => {}
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                use crate::simd::avx2;
                assert!(avx2::available(), "this CPU lacks AVX2/FMA/F16C");
                k.isa = Isa::Avx2;
                k.vec_dot[DType::F32 as usize] = avx2::dot_f32;
                k.vec_dot[DType::F16 as usize] = avx2::dot_f16;
                k.vec_dot[DType::Q4_0 as usize] = avx2::dot_q4_0;
                k.vec_dot[DType::Q4_1 as usize] = avx2::dot_q4_1;
                k.vec_dot[DType::Q5_0 as usize] = avx2::dot_q5_0;
                k.vec_dot[DType::Q5_1 as usize] = avx2::dot_q5_1;
                k.vec_dot[DType::Q8_0 as usize] = avx2::dot_q8_0;
                k.vec_dot[DType::Q4_K as usize] = avx2::dot_q4_k;
                k.vec_dot[DType::Q5_K as usize] = avx2::dot_q5_k;
                k.vec_dot[DType::Q6_K as usize] = avx2::dot_q6_k;
                k.quantize[DType::Q8_0 as usize] = avx2::quantize_q8_0;
                k.quantize[DType::Q8_K as usize] = avx2::quantize_q8_k;
                k.silu_mul = crate::simd::avx2_math::silu_mul;
                k.gelu_mul = crate::simd::avx2_math::gelu_mul;
                k.attend = crate::simd::avx2_math::attend;
                k.log_sum_exp = crate::simd::avx2_math::log_sum_exp;
                k.exp_weights = crate::simd::avx2_math::exp_weights;
                k.axpy_f16 = crate::simd::avx2_math::axpy_f16;
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => panic!("AVX2 kernels exist only on x86-64"),
        }
        k
    }

    /// Instruction sets this CPU can run, best first.
    pub fn available_isas() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx2::available() {
            v.push(Isa::Avx2);
        }
        v.push(Isa::Scalar);
        v
    }

    #[inline]
    pub fn vec_dot(&self, dtype: DType) -> VecDotFn {
        self.vec_dot[dtype as usize]
    }

    #[inline]
    pub fn quantize(&self, dtype: DType) -> QuantizeFn {
        self.quantize[dtype as usize]
    }

    /// Softmax attention of query heads sharing a key/value head (see `ops::attend`); the SIMD
    /// version needs a head size that is a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(&self, q: &[f32], hd: usize, keys: crate::kv::KvRows, values: crate::kv::KvRows, stride: usize, offset: usize, ranges: &[std::ops::Range<usize>], scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
        let f = if hd % 8 == 0 { self.attend } else { crate::ops::attend_scalar as AttendFn };
        f(q, hd, keys, values, stride, offset, ranges, scale, scores, out)
    }

    /// Whether products of `k`-element rows of `dtype` use the group kernels (which need the
    /// activations prepared once with [`Kernels::group_prepare`]).
    pub fn group_usable(&self, dtype: DType, k: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2 {
            return crate::simd::avx2_group::usable(dtype, k);
        }
        let _ = (dtype, k);
        false
    }

    /// The activation format a product of `k`-element rows of `dtype` uses: Q8_0 for the group
    /// kernels, else the format's `vec_dot_type`.
    pub fn activation_type(&self, dtype: DType, k: usize) -> DType {
        if self.group_usable(dtype, k) {
            DType::Q8_0
        } else {
            dtype.vec_dot_type()
        }
    }

    /// Per-activation-row data the group kernels need (Q8_0 rows; see `simd::avx2_group`).
    pub fn group_prepare(&self, k: usize, a: &[u8], a_stride: usize, nc: usize, out: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        crate::simd::avx2_group::prepare(k, a, a_stride, nc, out);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (k, a, a_stride, nc, out);
    }

    /// Floats of preparation per activation row of `k` elements (see [`Kernels::group_prepare_row`]).
    pub fn group_prepared_len(&self, k: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        return crate::simd::avx2_group::prepared_len(k);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = k;
            0
        }
    }

    /// [`Kernels::group_prepare`] for one activation row, into `out` (`group_prepared_len` floats):
    /// rows can be prepared in parallel.
    pub fn group_prepare_row(&self, k: usize, a: &[u8], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        crate::simd::avx2_group::prepare_row(k, a, out);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (k, a, out);
    }

    /// Block product with the group kernels; `prep` comes from [`Kernels::group_prepare`] and
    /// holds everything they need of the activations.
    #[allow(clippy::too_many_arguments)]
    pub fn group_gemm(&self, dtype: DType, k: usize, w: &[u8], w_stride: usize, nr: usize, nc: usize, prep: &[f32], out: &mut [f32]) {
        assert!(self.group_usable(dtype, k), "group kernels unavailable for {dtype} with k = {k}");
        #[cfg(target_arch = "x86_64")]
        crate::simd::avx2_group::gemm(dtype, k, w, w_stride, nr, nc, prep, out);
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (w, w_stride, nr, nc, prep, out);
    }

    /// [`Kernels::group_gemm`] writing entry (r, c) to `out[c * ldo + r]`.
    ///
    /// # Safety
    /// `out.add(c * ldo + r)` must be valid for writes for every r < nr, c < nc, and no other
    /// thread may access those floats during the call.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn group_gemm_strided(&self, dtype: DType, k: usize, w: &[u8], w_stride: usize, nr: usize, nc: usize, prep: &[f32], out: *mut f32, ldo: usize) {
        assert!(self.group_usable(dtype, k), "group kernels unavailable for {dtype} with k = {k}");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract on `out`.
        unsafe {
            crate::simd::avx2_group::gemm_strided(dtype, k, w, w_stride, nr, nc, prep, out, ldo)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (w, w_stride, nr, nc, prep, out, ldo);
    }

    /// Block product: `out[c * nr + r] = w_row(r) · a_row(c)` for `nr` weight rows (each
    /// `w_stride` bytes apart, `k` elements of `dtype`) and `nc` activation rows (`a_stride`
    /// bytes apart, in `self.activation_type(dtype, k)`). Uses the group kernels where they apply, else one dot product per pair.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(&self, dtype: DType, k: usize, w: &[u8], w_stride: usize, nr: usize, a: &[u8], a_stride: usize, nc: usize, out: &mut [f32]) {
        if self.group_usable(dtype, k) {
            let mut prep = Vec::new();
            self.group_prepare(k, a, a_stride, nc, &mut prep);
            self.group_gemm(dtype, k, w, w_stride, nr, nc, &prep, out);
            return;
        }
        let dot = self.vec_dot(dtype);
        for c in 0..nc {
            let arow = &a[c * a_stride..];
            for r in 0..nr {
                out[c * nr + r] = dot(k, &w[r * w_stride..], arow);
            }
        }
    }
}

/// The process-wide kernel table.
pub fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        let forced = std::env::var("SMELT_ISA").ok();
        let isa = match forced.as_deref() {
            Some("scalar") => Isa::Scalar,
            _ => Kernels::available_isas()[0],
        };
        Kernels::for_isa(isa)
    })
}
