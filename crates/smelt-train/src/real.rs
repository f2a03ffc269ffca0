//! The number type training runs in: f32 for real runs (the frozen weights multiplied by the
//! inference kernels, their transposes held in Q8_0), f64 for the gradient checks (every product
//! exact from the dequantized weights), with the same model code for both.

use smelt_kernels::formats::{dequantize_row, DType};
use smelt_kernels::ops::{self, Matrix};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Linear;
use std::cell::RefCell;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub, SubAssign};

/// A frozen weight matrix W [out × in] of the base model, and for f32 runs its transpose
/// [in × out] quantized to Q8_0 (F32 where `out` is not whole blocks), so the backward product
/// dx = dy · W runs on the same fast kernels as the forward one.
pub struct Frozen {
    pub w: Linear,
    wt: Option<(DType, Vec<u8>)>,
}

impl Frozen {
    /// Without the transpose (f64 runs, and f32 runs that never go backward through it).
    pub fn plain(w: &Linear) -> Frozen {
        Frozen { w: w.clone(), wt: None }
    }

    /// With the transpose, built a block of rows at a time.
    pub fn with_transpose(w: &Linear) -> Frozen {
        let (out, inp) = (w.rows, w.cols);
        let dtype = if out % DType::Q8_0.block_len() == 0 { DType::Q8_0 } else { DType::F32 };
        let rb = dtype.row_bytes(out).expect("whole blocks");
        let mut data = vec![0u8; rb * inp];
        let m = w.matrix();
        // 64 rows of W at a time: for each input column, their 64 values are two whole Q8_0
        // blocks of that column's row of Wᵀ (`out` is whole blocks, so every part is too).
        const ROWS: usize = 64;
        let mut block = vec![0f32; ROWS * inp];
        let mut part = [0f32; ROWS];
        let bytes_per = |n: usize| dtype.row_bytes(n).expect("whole blocks");
        let quant = smelt_kernels::dispatch::kernels().quantize(dtype);
        for r0 in (0..out).step_by(ROWS) {
            let nr = ROWS.min(out - r0);
            for r in 0..nr {
                m.dequantize_row(r0 + r, &mut block[r * inp..(r + 1) * inp]);
            }
            let at = bytes_per(r0);
            for i in 0..inp {
                for r in 0..nr {
                    part[r] = block[r * inp + i];
                }
                quant(&part[..nr], &mut data[i * rb + at..i * rb + at + bytes_per(nr)]);
            }
        }
        Frozen { w: w.clone(), wt: Some((dtype, data)) }
    }

    /// Bytes of the transposed copy.
    pub fn extra_bytes(&self) -> usize {
        self.wt.as_ref().map_or(0, |(_, d)| d.len())
    }
}

thread_local! {
    static SCRATCH: RefCell<(Vec<u8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

pub trait Real:
    Copy + Default + Send + Sync + PartialOrd + std::fmt::Debug + 'static + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self> + Neg<Output = Self> + AddAssign + SubAssign
{
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn ln(self) -> Self;
    /// Σ a·b
    fn dot(a: &[Self], b: &[Self]) -> Self;
    /// y += a·x
    fn axpy(y: &mut [Self], a: Self, x: &[Self]);
    /// y [n × out] = x [n × in] · Wᵀ
    fn frozen_forward(pool: &ThreadPool, w: &Frozen, x: &[Self], n: usize, y: &mut [Self]);
    /// dx [n × in] += dy [n × out] · W
    fn frozen_backward(pool: &ThreadPool, w: &Frozen, dy: &[Self], n: usize, dx: &mut [Self]);
}

impl Real for f32 {
    fn of(x: f64) -> f32 {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        ops::dot_f32(a, b)
    }
    fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        ops::axpy_f32(y, a, x)
    }
    fn frozen_forward(pool: &ThreadPool, w: &Frozen, x: &[f32], n: usize, y: &mut [f32]) {
        SCRATCH.with(|s| ops::matmul(pool, &w.w.matrix(), x, n, y, &mut s.borrow_mut().0));
    }
    fn frozen_backward(pool: &ThreadPool, w: &Frozen, dy: &[f32], n: usize, dx: &mut [f32]) {
        let (out, inp) = (w.w.rows, w.w.cols);
        match &w.wt {
            Some((dtype, data)) => SCRATCH.with(|s| {
                let (scratch, tmp) = &mut *s.borrow_mut();
                tmp.resize(n * inp, 0.0);
                ops::matmul(pool, &Matrix::new(*dtype, inp, out, data), dy, n, tmp, scratch);
                ops::add_inplace(dx, tmp);
            }),
            None => naive_backward(w, dy, n, dx),
        }
    }
}

impl Real for f64 {
    fn of(x: f64) -> f64 {
        x
    }
    fn f64(self) -> f64 {
        self
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
    fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * xi;
        }
    }
    fn frozen_forward(_: &ThreadPool, w: &Frozen, x: &[f64], n: usize, y: &mut [f64]) {
        let (out, inp) = (w.w.rows, w.w.cols);
        let m = w.w.matrix();
        let mut row = vec![0f32; inp];
        for r in 0..out {
            m.dequantize_row(r, &mut row);
            let row64: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            for t in 0..n {
                y[t * out + r] = f64::dot(&row64, &x[t * inp..(t + 1) * inp]);
            }
        }
    }
    fn frozen_backward(_: &ThreadPool, w: &Frozen, dy: &[f64], n: usize, dx: &mut [f64]) {
        naive_backward(w, dy, n, dx)
    }
}

/// dx += dy · W from W's rows decoded one at a time.
fn naive_backward<T: Real>(w: &Frozen, dy: &[T], n: usize, dx: &mut [T]) {
    let (out, inp) = (w.w.rows, w.w.cols);
    let m = w.w.matrix();
    let mut row = vec![0f32; inp];
    for r in 0..out {
        dequantize_row(m.dtype, m.row(r), &mut row);
        let row_t: Vec<T> = row.iter().map(|&v| T::of(v as f64)).collect();
        for t in 0..n {
            T::axpy(&mut dx[t * inp..(t + 1) * inp], dy[t * out + r], &row_t);
        }
    }
}
