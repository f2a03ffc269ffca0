//! Every backward pass against central finite differences in f64: each operation on small
//! random shapes, and the whole model (every architecture, the LoRA factors of every projection)
//! on small random-weight models.

use smelt_kernels::ops::{Rope, RopeStyle};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{Activation, Model};
use smelt_model::lora::Target;
use smelt_model::synthetic::{tiny_model, TinySpec};
use smelt_train::model::{forward_backward, Dropout, Example, Frozens, Lora};
use smelt_train::ops::{self, AttnShape};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2.0
    }
    fn vec(&mut self, n: usize, s: f64) -> Vec<f64> {
        (0..n).map(|_| self.f() * s).collect()
    }
}

const H: f64 = 1e-6;

/// Check the analytic gradient `grad` of the scalar `f` at `x` against central differences.
fn check(what: &str, x: &[f64], grad: &[f64], f: &dyn Fn(&[f64]) -> f64) {
    let mut worst: f64 = 0.0;
    // Errors are relative to the gradient's size, with a floor at a thousandth of its largest
    // component (central differences of a loss of size ~1 cannot resolve much below that).
    let floor = 1e-3 * grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    for i in 0..x.len() {
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[i] += H;
        xm[i] -= H;
        let num = (f(&xp) - f(&xm)) / (2.0 * H);
        let err = (num - grad[i]).abs() / num.abs().max(grad[i].abs()).max(floor).max(1e-12);
        worst = worst.max(err);
        assert!(err < 1e-4, "{what}: d/dx[{i}] is {} analytically, {num} numerically", grad[i]);
    }
    assert!(grad.iter().any(|g| g.abs() > 1e-8), "{what}: the gradient is all zero");
    eprintln!("{what}: {} values, worst relative error {worst:.1e}", x.len());
}

/// A fixed random weighting of an op's outputs, so the check sees every output's gradient.
fn weighted(y: &[f64], w: &[f64]) -> f64 {
    y.iter().zip(w).map(|(a, b)| a * b).sum()
}

#[test]
fn rms_norm_backward() {
    let mut r = Rng(1);
    let (rows, d) = (3, 7);
    let x = r.vec(rows * d, 2.0);
    let g: Vec<f32> = r.vec(d, 1.0).iter().map(|v| *v as f32 + 1.0).collect();
    let wy = r.vec(rows * d, 1.0);
    let f = |x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        ops::rms_norm(x, &g, 1e-5, &mut y);
        weighted(&y, &wy)
    };
    let mut y = vec![0.0; x.len()];
    let inv = ops::rms_norm(&x, &g, 1e-5, &mut y);
    let mut dx = vec![0.0; x.len()];
    ops::rms_norm_back(&x, &g, &inv, &wy, &mut dx);
    check("rms_norm", &x, &dx, &f);
}

#[test]
fn rope_backward_is_the_inverse_rotation() {
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        let mut r = Rng(2);
        let rope = Rope { style, n_rot: 6, base: 10000.0, freq_scale: 1.0, freq_factors: None, attn_factor: 1.0, yarn: None };
        let (heads, d) = (2, 8);
        let mut angles = Vec::new();
        rope.angles(5, &mut angles);
        let x = r.vec(heads * d, 1.0);
        let wy = r.vec(heads * d, 1.0);
        let f = |x: &[f64]| {
            let mut y = x.to_vec();
            ops::rope(&rope, &mut y, d, &angles, false);
            weighted(&y, &wy)
        };
        let mut dx = wy.clone();
        ops::rope(&rope, &mut dx, d, &angles, true);
        check(&format!("rope {style:?}"), &x, &dx, &f);
    }
}

#[test]
fn gated_activations_backward() {
    for act in [Activation::Silu, Activation::GeluTanh] {
        let mut r = Rng(3);
        let n = 9;
        let (g, u) = (r.vec(n, 4.0), r.vec(n, 2.0));
        let wy = r.vec(n, 1.0);
        let mut x = g.clone();
        x.extend(&u);
        let f = |x: &[f64]| {
            let mut y = vec![0.0; n];
            ops::gated(act, &x[..n], &x[n..], &mut y);
            weighted(&y, &wy)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        ops::gated_back(act, &g, &u, &wy, &mut dg, &mut du);
        dg.extend(du);
        check(&format!("{act:?}"), &x, &dg, &f);
    }
}

#[test]
fn attention_backward_with_groups_and_windows() {
    for window in [None, Some(3)] {
        let mut r = Rng(4);
        let sh = AttnShape { t: 6, nh: 4, nkv: 2, d: 3, window, scale: 0.6 };
        let (nq, nk) = (sh.t * sh.nh * sh.d, sh.t * sh.nkv * sh.d);
        let mut x = r.vec(nq + 2 * nk, 1.0);
        x.iter_mut().for_each(|v| *v *= 1.5);
        let wy = r.vec(nq, 1.0);
        let f = |x: &[f64]| {
            let mut y = vec![0.0; nq];
            ops::attention(&sh, &x[..nq], &x[nq..nq + nk], &x[nq + nk..], &mut y);
            weighted(&y, &wy)
        };
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![0.0; nk], vec![0.0; nk]);
        ops::attention_back(&sh, &x[..nq], &x[nq..nq + nk], &x[nq + nk..], &wy, &mut dq, &mut dk, &mut dv);
        dq.extend(dk);
        dq.extend(dv);
        check(&format!("attention, window {window:?}"), &x, &dq, &f);
    }
}

#[test]
fn cross_entropy_backward() {
    let mut r = Rng(5);
    let (rows, vocab) = (3, 11);
    let x = r.vec(rows * vocab, 3.0);
    let targets = [Some(4), None, Some(10)];
    let f = |x: &[f64]| ops::cross_entropy(&mut x.to_vec(), vocab, &targets, 1.0);
    let mut g = x.clone();
    ops::cross_entropy(&mut g, vocab, &targets, 1.0);
    check("cross_entropy", &x, &g, &f);
}

fn tiny(arch: &'static str) -> Model {
    let mut spec = TinySpec::new(arch);
    spec.n_layer = 2;
    spec.window = 3;
    // A file of its own per call: tests run in parallel, and rewriting a file another test has
    // mapped would pull its pages away (SIGBUS).
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("smelt-grad-{arch}-{}-{k}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(&spec).to_bytes()).unwrap();
    let m = Model::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    m
}

#[test]
fn the_whole_model_backward_on_every_architecture() {
    let pool = ThreadPool::new(1);
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let model = tiny(arch);
        let frozen = Frozens::new(&model, false);
        let mut r = Rng(6);
        let mut lora: Lora<f64> = Lora::new(&model, 2, 4.0, &Target::ALL, |inp| r.f() / (inp as f64).sqrt());
        // B starts at zero in training; random here so the gradients of A are not zero too.
        let mut r2 = Rng(7);
        for p in lora.layers.iter_mut().flatten().flatten() {
            p.b.iter_mut().for_each(|v| *v = r2.f() * 0.3);
        }
        let ex = Example { tokens: vec![5, 17, 42, 99, 7, 250, 3], targets: vec![None, None, Some(99), Some(7), None, Some(3), Some(11)] };
        // Without dropout, then with (its masks are fixed by the seed, so the loss is still a
        // function of the factors alone).
        for dropout in [None, Some(Dropout { p: 0.3, seed: 9 })] {
            let mut grad = lora.zeros_like();
            let loss = forward_backward(&model, &frozen, &pool, &lora, &ex, 1.0, dropout, Some(&mut grad));
            assert!(loss.is_finite() && loss > 0.0);
            // Check a spread of parameters of every pair (all of them would take long).
            let all: Vec<f64> = lora.values().copied().collect();
            let g: Vec<f64> = grad.values().copied().collect();
            let picks: Vec<usize> = (0..all.len()).step_by(all.len() / 60 + 1).collect();
            let loss_at = |vals: &[f64]| {
                let mut l = lora.clone();
                let mut all2 = all.clone();
                for (&i, &v) in picks.iter().zip(vals) {
                    all2[i] = v;
                }
                for (dst, src) in l.values_mut().zip(&all2) {
                    *dst = *src;
                }
                forward_backward(&model, &frozen, &pool, &l, &ex, 1.0, dropout, None)
            };
            let x: Vec<f64> = picks.iter().map(|&i| all[i]).collect();
            let gx: Vec<f64> = picks.iter().map(|&i| g[i]).collect();
            check(&format!("{arch} model, dropout {dropout:?}"), &x, &gx, &loss_at);
        }
    }
}

#[test]
fn the_training_forward_pass_is_the_served_model() {
    // The loss the trainer computes equals the cross-entropy of the inference engine's logits
    // (which quantize activations to 8 bits and keep K/V in f16, hence the tolerance).
    use smelt_model::arch::{BatchToken, Workspace};
    use std::sync::Arc;
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let model = tiny(arch);
        let pool = Arc::new(ThreadPool::new(1));
        let frozen = Frozens::new(&model, false);
        let lora: Lora<f64> = Lora::new(&model, 2, 4.0, &[], |_| 0.0);
        let tokens: Vec<u32> = vec![5, 17, 42, 99, 7, 250, 3, 60];
        let targets: Vec<Option<u32>> = tokens[1..].iter().map(|&t| Some(t)).chain([None]).collect();
        let ex = Example { tokens: tokens.clone(), targets: targets.clone() };
        let trained = forward_backward(&model, &frozen, &pool, &lora, &ex, 1.0, None, None);
        let mut ws = Workspace::new(pool);
        let mut caches = vec![model.new_cache(16, 16)];
        let batch: Vec<BatchToken> = tokens.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: true }).collect();
        let logits = model.forward(&batch, &mut caches, &mut ws).unwrap();
        let mut served = 0.0;
        for (row, t) in logits.chunks(model.hp.n_vocab).zip(&targets) {
            if let Some(t) = t {
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                served += lse - row[*t as usize] as f64;
            }
        }
        assert!((trained - served).abs() < 0.02 * served, "{arch}: training loss {trained}, served model's {served}");
    }
}
