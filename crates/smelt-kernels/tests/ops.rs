//! SIMD element-wise and attention kernels against their scalar references, on random data of
//! odd sizes.

use smelt_kernels::dispatch::Kernels;
use smelt_kernels::kv::{KvRows, KvType};
use smelt_kernels::ops::{attend_scalar, gelu_mul_scalar, silu_mul_scalar};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
    }
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn gated_activations_match_the_scalar_reference() {
    let mut rng = Rng(5);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for n in [1, 7, 8, 9, 31, 64, 1000] {
            let gate: Vec<f32> = (0..n).map(|_| rng.f() * 12.0).collect();
            let up: Vec<f32> = (0..n).map(|_| rng.f() * 3.0).collect();
            for (fast, slow) in [(k.silu_mul, silu_mul_scalar as fn(&mut [f32], &[f32])), (k.gelu_mul, gelu_mul_scalar)] {
                let (mut a, mut b) = (gate.clone(), gate.clone());
                fast(&mut a, &up);
                slow(&mut b, &up);
                for i in 0..n {
                    assert!(close(a[i], b[i], 1e-5), "{isa:?} n={n} i={i}: {} vs {}", a[i], b[i]);
                }
            }
        }
    }
}

#[test]
fn attention_matches_the_scalar_reference() {
    let mut rng = Rng(9);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        let cases = [(64, 5, vec![0..5], 1), (256, 40, vec![30..40, 0..7], 4), (8, 1, vec![0..1], 3), (72, 300, vec![0..300], 7), (24, 33, vec![3..20, 21..33], 9), (16, 0, vec![], 2), (256, 700, vec![100..700, 0..50], 4)];
        for (hd, slots, ranges, heads) in cases {
            let stride = hd * 2;
            let keys: Vec<half::f16> = (0..slots.max(1) * stride).map(|_| half::f16::from_f32(rng.f())).collect();
            let values: Vec<half::f16> = (0..slots.max(1) * stride).map(|_| half::f16::from_f32(rng.f())).collect();
            let q: Vec<f32> = (0..heads * hd).map(|_| rng.f() * 4.0).collect();
            let (mut a, mut b) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
            k.attend(&q, hd, KvRows::F16(&keys), KvRows::F16(&values), stride, hd, &ranges, 0.125, &mut Vec::new(), &mut a);
            attend_scalar(&q, hd, KvRows::F16(&keys), KvRows::F16(&values), stride, hd, &ranges, 0.125, &mut Vec::new(), &mut b);
            for i in 0..heads * hd {
                assert!(close(a[i], b[i], 1e-5), "{isa:?} hd={hd} heads={heads}: {} vs {}", a[i], b[i]);
            }
            // Heads attended together give exactly what each gives alone (a token's output must
            // not depend on how the work was split).
            for h in 0..heads {
                let mut one = vec![0f32; hd];
                k.attend(&q[h * hd..(h + 1) * hd], hd, KvRows::F16(&keys), KvRows::F16(&values), stride, hd, &ranges, 0.125, &mut Vec::new(), &mut one);
                assert_eq!(one, a[h * hd..(h + 1) * hd], "{isa:?} hd={hd}: head {h} of {heads}");
            }
        }
    }
}

/// Keys or values of `slots` rows of `stride` random values, stored in `t`.
fn kv_rows(rng: &mut Rng, t: KvType, slots: usize, stride: usize, halves: &mut Vec<half::f16>, bytes: &mut Vec<u8>) {
    let x: Vec<f32> = (0..slots.max(1) * stride).map(|_| rng.f()).collect();
    *halves = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    *bytes = vec![0u8; t.bytes(x.len())];
    if t != KvType::F16 {
        t.encode(&x, bytes);
    }
}

fn as_rows<'a>(t: KvType, halves: &'a [half::f16], bytes: &'a [u8]) -> KvRows<'a> {
    match t {
        KvType::F16 => KvRows::F16(halves),
        KvType::Q8_0 => KvRows::Q8_0(bytes),
        KvType::Q4_0 => KvRows::Q4_0(bytes),
    }
}

#[test]
fn quantized_attention_matches_the_scalar_reference() {
    let mut rng = Rng(23);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        let cases = [(64, 5, vec![0..5], 7), (256, 40, vec![30..40, 0..7], 4), (32, 1, vec![0..1], 3), (96, 300, vec![0..300], 9), (64, 0, vec![], 2), (128, 600, vec![100..600, 0..50], 1)];
        for kt in KvType::ALL {
            for vt in KvType::ALL {
                for (hd, slots, ranges, heads) in cases.clone() {
                    let stride = hd * 2;
                    let (mut kh, mut kb, mut vh, mut vb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                    kv_rows(&mut rng, kt, slots, stride, &mut kh, &mut kb);
                    kv_rows(&mut rng, vt, slots, stride, &mut vh, &mut vb);
                    let (keys, values) = (as_rows(kt, &kh, &kb), as_rows(vt, &vh, &vb));
                    let q: Vec<f32> = (0..heads * hd).map(|_| rng.f() * 4.0).collect();
                    let (mut a, mut b) = (vec![0f32; heads * hd], vec![0f32; heads * hd]);
                    k.attend(&q, hd, keys, values, stride, hd, &ranges, 0.125, &mut Vec::new(), &mut a);
                    attend_scalar(&q, hd, keys, values, stride, hd, &ranges, 0.125, &mut Vec::new(), &mut b);
                    for i in 0..heads * hd {
                        assert!(close(a[i], b[i], 1e-5), "{isa:?} k {kt:?} v {vt:?} hd={hd} heads={heads}: {} vs {}", a[i], b[i]);
                    }
                    for h in 0..heads {
                        let mut one = vec![0f32; hd];
                        k.attend(&q[h * hd..(h + 1) * hd], hd, keys, values, stride, hd, &ranges, 0.125, &mut Vec::new(), &mut one);
                        assert_eq!(one, a[h * hd..(h + 1) * hd], "{isa:?} k {kt:?} v {vt:?} hd={hd}: head {h} of {heads}");
                    }
                    // Quantized keys and values are close to the f16 ones they replace.
                    if slots > 0 {
                        let mut f = vec![0f32; heads * hd];
                        attend_scalar(&q, hd, KvRows::F16(&kh), KvRows::F16(&vh), stride, hd, &ranges, 0.125, &mut Vec::new(), &mut f);
                        let tol = if kt == KvType::Q4_0 || vt == KvType::Q4_0 { 0.25 } else { 0.03 };
                        for i in 0..heads * hd {
                            assert!((a[i] - f[i]).abs() <= tol, "k {kt:?} v {vt:?} hd={hd}: {} vs f16 {}", a[i], f[i]);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn exp_weights_match_the_scalar_reference() {
    let mut rng = Rng(78);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for n in [1, 7, 8, 9, 1000, 262_147] {
            let mut x: Vec<f32> = (0..n).map(|_| rng.f() * 30.0).collect();
            if n > 9 {
                x[3] = f32::NEG_INFINITY;
                x[5] = f32::NAN;
            }
            let max = x.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
            for (scale, floor) in [(1.0, f32::NEG_INFINITY), (1.7, max - 3.0), (0.25, max + 1.0)] {
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                let (sa, sb) = ((k.exp_weights)(&x, max, scale, floor, &mut a), smelt_kernels::ops::exp_weights_scalar(&x, max, scale, floor, &mut b));
                assert!((sa - sb).abs() <= 1e-5 * sb.abs().max(1e-30), "{isa:?} n={n}: {sa} vs {sb}");
                for i in 0..n {
                    assert!((a[i] - b[i]).abs() <= 1e-6 * b[i].abs().max(1e-30), "{isa:?} n={n} i={i}: {} vs {}", a[i], b[i]);
                    if !(x[i] >= floor) {
                        assert!(a[i] == 0.0 && b[i] == 0.0, "{isa:?} n={n} i={i}: below the floor but weighted");
                    }
                }
            }
        }
    }
}

#[test]
fn log_sum_exp_matches_the_scalar_reference() {
    let mut rng = Rng(77);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for n in [1, 7, 8, 9, 1000, 262_147] {
            let x: Vec<f32> = (0..n).map(|_| rng.f() * 30.0).collect();
            let (a, b) = ((k.log_sum_exp)(&x), smelt_kernels::ops::log_sum_exp_scalar(&x));
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{isa:?} n={n}: {a} vs {b}");
        }
        assert_eq!((k.log_sum_exp)(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY);
    }
}

#[test]
fn parallel_matmul_entries_equal_single_products() {
    // Every entry of a threaded product of many activation rows is exactly the product of that
    // weight row with that activation row alone: results never depend on the batch or on how the
    // rows were split between threads.
    use smelt_kernels::dispatch::kernels;
    use smelt_kernels::formats::{scale_offsets, DType};
    use smelt_kernels::ops::{matmul, Matrix};
    use smelt_kernels::pool::ThreadPool;
    let mut rng = Rng(21);
    let pool = ThreadPool::new(3);
    let kt = kernels();
    // Q4_1 and Q3_K have no group kernels (the per-row path); 300 rows are several pieces of
    // each thread's part when decoding, so parts are also stolen from.
    for dtype in [DType::Q5_0, DType::Q8_0, DType::Q4_K, DType::Q6_K, DType::Q4_1, DType::Q3_K] {
        let (k, m) = (512, 300);
        let bb = dtype.block_bytes();
        let mut w: Vec<u8> = (0..dtype.row_bytes(k).unwrap() * m).map(|_| (rng.f() * 128.0) as i8 as u8).collect();
        for blk in w.chunks_exact_mut(bb) {
            for &off in scale_offsets(dtype) {
                blk[off..off + 2].copy_from_slice(&half::f16::from_f32(rng.f() * 0.05).to_bits().to_le_bytes());
            }
        }
        let wm = Matrix::new(dtype, m, k, &w);
        for n in [1, 3, 6, 21] {
            let x: Vec<f32> = (0..n * k).map(|_| rng.f()).collect();
            let mut out = vec![0f32; n * m];
            matmul(&pool, &wm, &x, n, &mut out, &mut Vec::new());
            let vt = kt.activation_type(dtype, k);
            let arb = vt.row_bytes(k).unwrap();
            for t in 0..n {
                let mut a = vec![0u8; arb];
                kt.quantize(vt)(&x[t * k..(t + 1) * k], &mut a);
                for r in 0..m {
                    let mut one = [0f32];
                    kt.gemm(dtype, k, &w[r * wm.row_bytes()..], wm.row_bytes(), 1, &a, arb, 1, &mut one);
                    assert_eq!(out[t * m + r], one[0], "{dtype} n={n} at ({t}, {r})");
                }
            }
        }
    }
}

#[test]
fn f16_axpy_matches_the_scalar_reference() {
    let mut rng = Rng(13);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for n in [0, 1, 7, 8, 9, 31, 64, 1000] {
            let x: Vec<half::f16> = (0..n).map(|_| half::f16::from_f32(rng.f() * 3.0)).collect();
            let y0: Vec<f32> = (0..n).map(|_| rng.f() * 5.0).collect();
            let a = rng.f() * 2.0;
            let (mut fast, mut slow) = (y0.clone(), y0.clone());
            (k.axpy_f16)(&mut fast, a, &x);
            smelt_kernels::ops::axpy(&mut slow, a, &x);
            for i in 0..n {
                assert!(close(fast[i], slow[i], 1e-6), "{isa:?} n={n} i={i}: {} vs {}", fast[i], slow[i]);
            }
        }
    }
}
