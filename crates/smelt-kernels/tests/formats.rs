//! Format tests: hand-built blocks with values worked out by hand, random blocks decoded by an
//! independent implementation (the `gguf` Python package), the integer dot products against the
//! decoded values, and every SIMD kernel against the scalar reference.

use smelt_kernels::dispatch::Kernels;
use smelt_kernels::formats::{dequantize_row, grouped, quantize_row, vec_dot, DType, GROUPED_DTYPES, WEIGHT_DTYPES};

fn f16(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn decode(dtype: DType, b: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; b.len() / dtype.block_bytes() * dtype.block_len()];
    dequantize_row(dtype, b, &mut out);
    out
}

#[test]
fn q4_0_hand_built() {
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16(0.5));
    b[2] = 0x9F; // element 0: nibble 15, element 16: nibble 9
    b[3] = 0x00; // elements 1 and 17: nibble 0
    let x = decode(DType::Q4_0, &b);
    assert_eq!((x[0], x[16], x[1], x[17]), (3.5, 0.5, -4.0, -4.0));
}

#[test]
fn q4_1_hand_built() {
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&f16(0.5));
    b[2..4].copy_from_slice(&f16(-1.0));
    b[4] = 0x3C; // element 0: 12, element 16: 3
    let x = decode(DType::Q4_1, &b);
    assert_eq!((x[0], x[16], x[1]), (5.0, 0.5, -1.0));
}

#[test]
fn q5_0_hand_built() {
    let mut b = vec![0u8; 22];
    b[0..2].copy_from_slice(&f16(2.0));
    b[2..6].copy_from_slice(&1u32.to_le_bytes()); // fifth bit set for element 0 only
    b[6] = 0x73; // element 0: 3 | 16 = 19, element 16: 7
    let x = decode(DType::Q5_0, &b);
    assert_eq!((x[0], x[16], x[1]), (6.0, -18.0, -32.0));
}

#[test]
fn q5_1_hand_built() {
    let mut b = vec![0u8; 24];
    b[0..2].copy_from_slice(&f16(1.0));
    b[2..4].copy_from_slice(&f16(0.5));
    b[4..8].copy_from_slice(&(1u32 << 31).to_le_bytes()); // fifth bit of element 31
    b[8 + 15] = 0xF0; // element 31: 15 | 16
    let x = decode(DType::Q5_1, &b);
    assert_eq!((x[31], x[15], x[0]), (31.5, 0.5, 0.5));
}

#[test]
fn q8_0_hand_built() {
    let mut b = vec![0u8; 34];
    b[0..2].copy_from_slice(&f16(0.25));
    b[2] = (-3i8) as u8;
    b[33] = 127;
    let x = decode(DType::Q8_0, &b);
    assert_eq!((x[0], x[31], x[5]), (-0.75, 31.75, 0.0));
}

#[test]
fn q2_k_hand_built() {
    let mut b = vec![0u8; 84];
    b[0] = 0x34; // sub-block 0: scale 4, min 3
    b[2] = 0x10; // sub-block 2: scale 0, min 1
    b[6] = 0x0F; // sub-block 6: scale 15, min 0
    b[16] = 0b11_10_01_10; // element 0: 2, element 32: 1, element 64: 2, element 96: 3
    b[80..82].copy_from_slice(&f16(0.5));
    b[82..84].copy_from_slice(&f16(0.25));
    let x = decode(DType::Q2_K, &b);
    assert_eq!((x[0], x[32], x[96]), (3.25, -0.25, 22.5));
}

#[test]
fn q3_k_hand_built() {
    let mut b = vec![0u8; 110];
    b[0] = 1; // hmask: element 0 has its third bit; element 128 (bit 4) does not
    b[32] = 1; // element 0: low bits 1
    b[33] = 3; // element 1: low bits 3, no third bit -> 3 - 4
    b[64] = 2; // element 128: low bits 2, no third bit -> -2
    b[96] = 0x52; // scale 0 low nibble 2, scale 8 low nibble 5
    b[104] = 0x12; // scale 0 high bits 2 (-> 34), scale 8 high bits 1 (-> 21)
    b[108..110].copy_from_slice(&f16(1.0));
    let x = decode(DType::Q3_K, &b);
    // scale 0 = 34 - 32 = 2, scale 8 = 21 - 32 = -11
    assert_eq!((x[0], x[1], x[128]), (2.0, -2.0, 22.0));
}

#[test]
fn q4_k_hand_built() {
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16(1.0));
    b[2..4].copy_from_slice(&f16(0.5));
    // scales[0] = 3 with the top bits of scales[4]; mins[0] = 2 with the top bits of mins[4].
    b[4] = 3 | (2 << 6);
    b[5] = 1; // scales[1] = 1
    b[8] = 2 | (1 << 6);
    b[12] = 0x15; // scales[4] low nibble 5 -> 37, mins[4] low nibble 1 -> 17
    b[16] = 0xA7; // element 0: 7 (sub-block 0), element 32: 10 (sub-block 1)
    b[16 + 64] = 0x02; // element 128: 2 (sub-block 4)
    let x = decode(DType::Q4_K, &b);
    assert_eq!((x[0], x[32], x[128]), (20.0, 10.0, 65.5));
}

#[test]
fn q5_k_hand_built() {
    let mut b = vec![0u8; 176];
    b[0..2].copy_from_slice(&f16(1.0));
    b[2..4].copy_from_slice(&f16(1.0));
    b[4] = 2; // scales[0] = 2
    b[8] = 1; // mins[0] = 1
    b[5] = 3; // scales[1] = 3
    b[16] = 0b01; // qh[0]: fifth bit for element 0 (bit 0), not for element 32 (bit 1)
    b[48] = 0x4F; // element 0: 15 | 16 = 31; element 32: 4
    let x = decode(DType::Q5_K, &b);
    assert_eq!((x[0], x[32]), (61.0, 12.0));
}

#[test]
fn q6_k_hand_built() {
    let mut b = vec![0u8; 210];
    b[0] = 0x5A; // element 0 low nibble 10, element 64 low nibble 5
    b[32] = 0x0F; // element 32 low nibble 15, element 96 low nibble 0
    b[128] = 0b10_01_00_11; // high bits: element 0: 3, 32: 0, 64: 1, 96: 2
    b[192] = (-2i8) as u8; // scales[0]
    b[194] = 3; // scales[2]
    b[196] = 1; // scales[4]
    b[198] = 4; // scales[6]
    b[208..210].copy_from_slice(&f16(0.5));
    let x = decode(DType::Q6_K, &b);
    assert_eq!((x[0], x[32], x[64], x[96]), (-26.0, -25.5, -5.5, 0.0));
}

#[test]
fn bf16_and_f16_decode() {
    let b = [0x80, 0x3f, 0x00, 0xc0]; // bf16 1.0, -2.0
    assert_eq!(decode(DType::BF16, &b), vec![1.0, -2.0]);
    let mut h = Vec::new();
    h.extend(f16(0.5));
    h.extend(f16(-65504.0));
    assert_eq!(decode(DType::F16, &h), vec![0.5, -65504.0]);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn random_blocks_match_the_gguf_python_package() {
    let data: serde_json::Value = serde_json::from_str(include_str!("data/dequant_reference.json")).unwrap();
    let cases = data.as_array().unwrap();
    assert_eq!(cases.len(), WEIGHT_DTYPES.len());
    for case in cases {
        let name = case["type"].as_str().unwrap();
        let dtype = *WEIGHT_DTYPES.iter().find(|t| t.name() == name).unwrap();
        let bytes = hex(case["bytes"].as_str().unwrap());
        let want: Vec<f32> = case["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = decode(dtype, &bytes);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{name} element {i}: {g} vs {w}");
        }
    }
}

/// xorshift64*: small, seeded, good enough for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-7), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

fn random_row(rng: &mut Rng, dtype: DType, n: usize) -> Vec<u8> {
    match dtype {
        DType::F32 => (0..n).flat_map(|_| rng.normal().to_le_bytes()).collect(),
        DType::F16 => (0..n).flat_map(|_| f16(rng.normal())).collect(),
        DType::BF16 => (0..n).flat_map(|_| ((rng.normal().to_bits() >> 16) as u16).to_le_bytes()).collect(),
        _ => {
            let bb = dtype.block_bytes();
            let mut b: Vec<u8> = (0..n / dtype.block_len() * bb).map(|_| rng.next() as u8).collect();
            for blk in b.chunks_exact_mut(bb) {
                for &off in smelt_kernels::formats::scale_offsets(dtype) {
                    blk[off..off + 2].copy_from_slice(&f16((rng.uniform() - 0.5) * 0.1));
                }
            }
            b
        }
    }
}

fn quantized(dtype: DType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; dtype.row_bytes(x.len()).unwrap()];
    quantize_row(dtype, x, &mut out);
    out
}

#[test]
fn integer_dot_products_match_the_decoded_values() {
    let mut rng = Rng(7);
    for dtype in WEIGHT_DTYPES {
        for blocks in [1, 3, 5] {
            let n = blocks * 256;
            let w = random_row(&mut rng, dtype, n);
            let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
            let a = quantized(dtype.vec_dot_type(), &x);
            let wd = decode(dtype, &w);
            let ad = decode(dtype.vec_dot_type(), &a);
            let want: f64 = wd.iter().zip(&ad).map(|(&p, &q)| p as f64 * q as f64).sum();
            let scale: f64 = wd.iter().zip(&ad).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
            let got = vec_dot(dtype, n, &w, &a) as f64;
            assert!((got - want).abs() <= 1e-5 * scale.max(1e-6), "{dtype} x{blocks}: {got} vs {want}");
        }
    }
}

#[test]
fn activation_quantizers_round_trip_within_half_a_step() {
    let mut rng = Rng(11);
    for dtype in [DType::Q8_0, DType::Q8_1, DType::Q8_K] {
        let x: Vec<f32> = (0..512).map(|_| rng.normal() * 3.0).collect();
        let back = decode(dtype, &quantized(dtype, &x));
        for (blk_x, blk_b) in x.chunks(dtype.block_len()).zip(back.chunks(dtype.block_len())) {
            let amax = blk_x.iter().fold(0f32, |m, v| m.max(v.abs()));
            // f16-rounded scales (Q8_0/Q8_1) add up to 2^-11 relative error on top of the half step.
            let step = amax / 127.0;
            for (a, b) in blk_x.iter().zip(blk_b) {
                assert!((a - b).abs() <= 0.5 * step + amax * 1e-3, "{dtype}: {a} vs {b}");
            }
        }
    }
    // All-zero input gives an all-zero block, not NaN.
    for dtype in [DType::Q8_0, DType::Q8_1, DType::Q8_K] {
        assert!(decode(dtype, &quantized(dtype, &[0.0; 256])).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn simd_kernels_match_the_scalar_reference() {
    let scalar = Kernels::scalar();
    let mut rng = Rng(42);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for dtype in WEIGHT_DTYPES {
            for blocks in [1, 2, 3, 7, 13] {
                let n = blocks * dtype.block_len().max(32) + if dtype.block_len() == 1 { blocks % 7 } else { 0 };
                let vt = dtype.vec_dot_type();
                let x: Vec<f32> = (0..n).map(|_| rng.normal() * (1.0 + rng.uniform() * 10.0)).collect();
                let (mut a_ref, mut a_fast) = (vec![0u8; vt.row_bytes(n).unwrap()], vec![0u8; vt.row_bytes(n).unwrap()]);
                scalar.quantize(vt)(&x, &mut a_ref);
                k.quantize(vt)(&x, &mut a_fast);
                assert_eq!(a_ref, a_fast, "{isa:?} quantize {vt} n={n}");
                let w = random_row(&mut rng, dtype, n);
                let want = scalar.vec_dot(dtype)(n, &w, &a_ref);
                let got = k.vec_dot(dtype)(n, &w, &a_ref);
                let mag: f32 = decode(dtype, &w).iter().zip(decode(vt, &a_ref)).map(|(p, q)| (p * q).abs()).sum();
                assert!((got - want).abs() <= 1e-5 * mag.max(1e-6), "{isa:?} {dtype} n={n}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn tiled_products_match_the_scalar_reference() {
    let scalar = Kernels::scalar();
    let mut rng = Rng(99);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for dtype in WEIGHT_DTYPES.into_iter().chain(GROUPED_DTYPES) {
            let n = 3 * dtype.block_len().max(256);
            let wrb = dtype.row_bytes(n).unwrap();
            let (vs, vf) = (scalar.activation_type(dtype, n), k.activation_type(dtype, n));
            let (rbs, rbf) = (vs.row_bytes(n).unwrap(), vf.row_bytes(n).unwrap());
            for (nr, nc) in [(1, 1), (4, 1), (5, 1), (7, 3), (3, 5), (9, 2), (2, 9), (3, 37), (17, 20)] {
                let w: Vec<u8> = (0..nr).flat_map(|_| random_row(&mut rng, dtype, n)).collect();
                let xs: Vec<Vec<f32>> = (0..nc).map(|_| (0..n).map(|_| rng.normal()).collect()).collect();
                let (mut a_s, mut a_f) = (vec![0u8; nc * rbs], vec![0u8; nc * rbf]);
                for (c, x) in xs.iter().enumerate() {
                    scalar.quantize(vs)(x, &mut a_s[c * rbs..(c + 1) * rbs]);
                    k.quantize(vf)(x, &mut a_f[c * rbf..(c + 1) * rbf]);
                }
                let (mut want, mut got) = (vec![0f32; nr * nc], vec![0f32; nr * nc]);
                scalar.gemm(dtype, n, &w, wrb, nr, &a_s, rbs, nc, &mut want);
                k.gemm(dtype, n, &w, wrb, nr, &a_f, rbf, nc, &mut got);
                for i in 0..nr * nc {
                    let (r, c) = (i % nr, i / nr);
                    let wd = decode(dtype, &w[r * wrb..(r + 1) * wrb]);
                    if vs == vf {
                        // Same activations: the same integer sums, up to float rounding.
                        let mag: f32 = wd.iter().zip(decode(vs, &a_s[c * rbs..(c + 1) * rbs])).map(|(p, q)| (p * q).abs()).sum();
                        assert!((got[i] - want[i]).abs() <= 1e-5 * mag.max(1e-6), "{isa:?} {dtype} {nr}x{nc} at ({r},{c}): {} vs {}", got[i], want[i]);
                    } else {
                        // Different activation formats: both within 8-bit quantization error of
                        // the exact product.
                        let exact: f64 = wd.iter().zip(&xs[c]).map(|(&p, &q)| p as f64 * q as f64).sum();
                        let mag: f64 = wd.iter().zip(&xs[c]).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
                        for v in [got[i], want[i]] {
                            assert!((v as f64 - exact).abs() <= 0.02 * mag, "{isa:?} {dtype} {nr}x{nc} at ({r},{c}): {v} vs exact {exact}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn extreme_weights_and_activations_stay_exact_in_the_fast_products() {
    // The group kernels add products as 16-bit integers where their bounds allow it; quants at
    // the ends of every format's range, against activations at ±127, reach those bounds.
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for dtype in [DType::Q4_0, DType::Q5_0, DType::Q8_0, DType::Q4_K, DType::Q5_K, DType::Q6_K].into_iter().chain(GROUPED_DTYPES) {
            let n = 512;
            let (nr, wrb) = (3, dtype.row_bytes(n).unwrap());
            // Largest unsigned quants everywhere (Q8_0: -128, the largest magnitude).
            let fill = if matches!(dtype, DType::Q8_0 | DType::Q8_0G) { 0x80 } else { 0xFF };
            let mut w = vec![fill; nr * wrb];
            for blk in w.chunks_exact_mut(dtype.block_bytes()) {
                for &off in smelt_kernels::formats::scale_offsets(dtype) {
                    blk[off..off + 2].copy_from_slice(&f16(0.01));
                }
            }
            let vt = k.activation_type(dtype, n);
            let arb = vt.row_bytes(n).unwrap();
            let patterns: [fn(usize) -> f32; 3] = [|_| 1.0, |_| -1.0, |i| if i % 2 == 0 { 1.0 } else { -1.0 }];
            for nc in [1, 5, 20] {
                let mut a = vec![0u8; nc * arb];
                for c in 0..nc {
                    let x: Vec<f32> = (0..n).map(patterns[c % 3]).collect();
                    k.quantize(vt)(&x, &mut a[c * arb..(c + 1) * arb]);
                }
                let mut got = vec![0f32; nr * nc];
                k.gemm(dtype, n, &w, wrb, nr, &a, arb, nc, &mut got);
                for i in 0..nr * nc {
                    let (r, c) = (i % nr, i / nr);
                    let wd = decode(dtype, &w[r * wrb..(r + 1) * wrb]);
                    let ad = decode(vt, &a[c * arb..(c + 1) * arb]);
                    let exact: f64 = wd.iter().zip(&ad).map(|(&p, &q)| p as f64 * q as f64).sum();
                    let mag: f64 = wd.iter().zip(&ad).map(|(&p, &q)| (p as f64 * q as f64).abs()).sum();
                    assert!((got[i] as f64 - exact).abs() <= 1e-5 * mag.max(1e-6), "{isa:?} {dtype} nc={nc} at ({r},{c}): {} vs {exact}", got[i]);
                }
            }
        }
    }
}

#[test]
fn grouped_layouts_give_bitwise_the_products_of_the_file_layout() {
    // Models regroup Q4_0/Q5_0/Q8_0/Q4_K/Q6_K matrices at load; every product, whatever the
    // number of activation rows (each kernel path), must be exactly what the file's blocks give.
    let mut rng = Rng(5);
    for isa in Kernels::available_isas() {
        let k = Kernels::for_isa(isa);
        for file in [DType::Q4_0, DType::Q5_0, DType::Q8_0, DType::Q4_K, DType::Q6_K] {
            let to = grouped::grouped(file).unwrap();
            let widths: &[usize] = if file.block_len() == 256 { &[256, 512, 2048] } else { &[128, 640, 896] };
            for &n in widths {
                let wrb = file.row_bytes(n).unwrap();
                for (nr, nc) in [(1, 1), (5, 1), (3, 2), (7, 3), (4, 8), (5, 20)] {
                    let w: Vec<u8> = (0..nr).flat_map(|_| random_row(&mut rng, file, n)).collect();
                    let mut wg = vec![0u8; w.len()];
                    grouped::group_blocks(file, &w, &mut wg);
                    let vt = k.activation_type(file, n);
                    assert_eq!(vt, k.activation_type(to, n));
                    let arb = vt.row_bytes(n).unwrap();
                    let mut a = vec![0u8; nc * arb];
                    for c in 0..nc {
                        let x: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
                        k.quantize(vt)(&x, &mut a[c * arb..(c + 1) * arb]);
                    }
                    let (mut want, mut got) = (vec![0f32; nr * nc], vec![0f32; nr * nc]);
                    k.gemm(file, n, &w, wrb, nr, &a, arb, nc, &mut want);
                    k.gemm(to, n, &wg, wrb, nr, &a, arb, nc, &mut got);
                    if k.group_usable(file, n) {
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&want), bits(&got), "{isa:?} {to} n={n} {nr}x{nc}");
                    } else {
                        for (x, y) in want.iter().zip(&got) {
                            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{isa:?} {to} n={n} {nr}x{nc}: {x} vs {y}");
                        }
                    }
                    // Decoding a grouped row gives the file row's values.
                    let (mut dw, mut dg) = (vec![0f32; n], vec![0f32; n]);
                    dequantize_row(file, &w[..wrb], &mut dw);
                    dequantize_row(to, &wg[..wrb], &mut dg);
                    assert_eq!(dw, dg, "{to} n={n}");
                }
            }
        }
    }
}
