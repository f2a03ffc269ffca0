//! A model's forward pass over whole training sequences with what the backward pass needs kept,
//! and the backward pass itself, for every architecture smelt runs (the same blocks as
//! `smelt_model::arch::blocks`, in the same order). The base weights stay frozen in their
//! quantized formats; only the LoRA factors get gradients.

use crate::ops::{self, AttnShape};
use crate::real::{Frozen, Real};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::lora::Target;

/// Trainable LoRA factors of one matrix: A [rank × in], B [out × rank].
#[derive(Clone, Debug, PartialEq)]
pub struct Pair<T> {
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub inp: usize,
    pub out: usize,
}

/// Trainable LoRA factors of a model (every layer's chosen projections), or their gradients
/// (the same shape).
#[derive(Clone, Debug, PartialEq)]
pub struct Lora<T> {
    pub rank: usize,
    pub alpha: f32,
    pub layers: Vec<[Option<Pair<T>>; 7]>,
}

impl<T: Real> Lora<T> {
    /// Factors for `targets` of every layer of `model`: A drawn from `init` (called with the
    /// number of inputs), B zero — so training starts from the base model, as PEFT does.
    pub fn new(model: &Model, rank: usize, alpha: f32, targets: &[Target], mut init: impl FnMut(usize) -> T) -> Lora<T> {
        let layers = (0..model.hp.n_layer)
            .map(|il| {
                let mut pairs: [Option<Pair<T>>; 7] = Default::default();
                for &t in targets {
                    let w = model.layer_matrices(il)[t as usize];
                    let a = (0..rank * w.cols).map(|_| init(w.cols)).collect();
                    pairs[t as usize] = Some(Pair { a, b: vec![T::default(); w.rows * rank], inp: w.cols, out: w.rows });
                }
                pairs
            })
            .collect();
        Lora { rank, alpha, layers }
    }

    /// Zeros of the same shape.
    pub fn zeros_like(&self) -> Lora<T> {
        let mut z = self.clone();
        z.for_each_mut(|v| *v = T::default());
        z
    }

    pub fn for_each_mut(&mut self, mut f: impl FnMut(&mut T)) {
        for p in self.layers.iter_mut().flatten().flatten() {
            p.a.iter_mut().chain(p.b.iter_mut()).for_each(&mut f);
        }
    }

    /// Every value, in a fixed order (A then B of each pair, layer by layer).
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.layers.iter().flatten().flatten().flat_map(|p| p.a.iter().chain(p.b.iter()))
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.layers.iter_mut().flatten().flatten().flat_map(|p| p.a.iter_mut().chain(p.b.iter_mut()))
    }

    pub fn len(&self) -> usize {
        self.values().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// alpha / rank
    pub fn factor(&self) -> T {
        T::of(if self.alpha == 0.0 { 1.0 } else { self.alpha as f64 / self.rank as f64 })
    }
}

/// The frozen matrices of a model, ready for both directions.
pub struct Frozens {
    layers: Vec<[Frozen; 7]>,
    output: Frozen,
    /// Keep only each layer's input in the forward pass and run the layer again in the backward
    /// pass (activation recomputation): the memory of one layer's activations instead of all
    /// of them, for about a third more compute, with the same gradients bit for bit.
    pub recompute: bool,
}

impl Frozens {
    /// `transpose`: keep Q8_0 transposes for the backward products (f32 training); without,
    /// they are decoded row by row (f64 checks).
    pub fn new(model: &Model, transpose: bool) -> Frozens {
        let make = |w: &smelt_model::arch::Linear| if transpose { Frozen::with_transpose(w) } else { Frozen::plain(w) };
        // Every matrix, the output first (the largest), made on all cores.
        let mut all: Vec<&smelt_model::arch::Linear> = vec![model.output()];
        for il in 0..model.hp.n_layer {
            all.extend(model.layer_matrices(il));
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut made: Vec<(usize, Frozen)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(w) = all.get(i) else { return mine };
                            mine.push((i, make(w)));
                        }
                    })
                })
                .collect();
            workers.into_iter().flat_map(|h| h.join().expect("transpose thread")).collect()
        });
        made.sort_by_key(|(i, _)| *i);
        let mut it = made.into_iter().map(|(_, f)| f);
        let output = it.next().expect("the output matrix");
        let layers = (0..model.hp.n_layer).map(|_| std::array::from_fn(|_| it.next().expect("seven per layer"))).collect();
        Frozens { layers, output, recompute: false }
    }

    /// Bytes of the transposed copies.
    pub fn extra_bytes(&self) -> usize {
        self.layers.iter().flatten().chain([&self.output]).map(|f| f.extra_bytes()).sum()
    }
}

/// What one layer's forward pass keeps for the backward pass.
#[derive(Default)]
struct LayerCache<T> {
    x_in: Vec<T>,
    h1: Vec<T>,
    inv1: Vec<T>,
    q_pre: Vec<T>,
    k_pre: Vec<T>,
    inv_q: Vec<T>,
    inv_k: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    att: Vec<T>,
    o_pre: Vec<T>,
    inv_po: Vec<T>,
    x_mid: Vec<T>,
    h2: Vec<T>,
    inv2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    act: Vec<T>,
    dn_pre: Vec<T>,
    inv_pd: Vec<T>,
    /// x · Aᵀ of each adapted projection (of the dropped-out x, when training with dropout).
    u: [Vec<T>; 7],
    /// The dropout mask of each adapted projection's LoRA input (0 or 1 / (1 - p)), if any.
    mask: [Vec<T>; 7],
}

/// LoRA dropout: each adapted projection's LoRA branch sees its input with elements zeroed at
/// rate `p` (the rest scaled by 1 / (1 - p)); the masks come from `seed`, so a step is
/// reproducible.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    fn mask<T: Real>(&self, il: usize, target: Target, len: usize) -> Vec<T> {
        let mut s = self.seed ^ ((il as u64 + 1) << 32) ^ ((target as u64 + 1) << 48) ^ 0x9e37_79b9_7f4a_7c15;
        let keep = T::of(1.0 / (1.0 - self.p as f64));
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if ((s >> 40) as f32 / (1u64 << 24) as f32) < self.p { T::default() } else { keep }
            })
            .collect()
    }
}

/// y [n × out] = x Wᵀ + factor · (x' Aᵀ) Bᵀ, x' = x ⊙ `mask` (x without one); returns x' Aᵀ
/// (empty without a pair).
#[allow(clippy::too_many_arguments)]
fn linear<T: Real>(pool: &ThreadPool, w: &Frozen, pair: Option<&Pair<T>>, factor: T, rank: usize, x: &[T], mask: &[T], n: usize, y: &mut Vec<T>) -> Vec<T> {
    y.resize(n * w.w.rows, T::default());
    T::frozen_forward(pool, w, x, n, y);
    let Some(p) = pair else { return Vec::new() };
    let xd = dropped(x, mask);
    let xd: &[T] = xd.as_deref().unwrap_or(x);
    // u[t] = A x'[t]; y[t] += factor · B u[t] — rows of tokens in parallel.
    let mut u = vec![T::default(); n * rank];
    pool.for_rows(&mut u, rank, 1, &|t, ut| {
        for (k, v) in ut.iter_mut().enumerate() {
            *v = T::dot(&p.a[k * p.inp..(k + 1) * p.inp], &xd[t * p.inp..(t + 1) * p.inp]);
        }
    });
    pool.for_rows(&mut y[..n * p.out], p.out, 1, &|t, yt| {
        let ut = &u[t * rank..(t + 1) * rank];
        for (o, yo) in yt.iter_mut().enumerate() {
            let mut s = T::default();
            for (b, u) in p.b[o * rank..(o + 1) * rank].iter().zip(ut) {
                s += *b * *u;
            }
            *yo += factor * s;
        }
    });
    u
}

/// x ⊙ mask, when there is a mask.
fn dropped<T: Real>(x: &[T], mask: &[T]) -> Option<Vec<T>> {
    (!mask.is_empty()).then(|| x.iter().zip(mask).map(|(a, b)| *a * *b).collect())
}

/// Backward of [`linear`]: dx += dy W + factor · ((dy B) A) ⊙ mask; the pair's gradients
/// accumulate. Every product runs over rows in parallel, each row summed in a fixed order, so
/// the result does not depend on how the rows are split.
#[allow(clippy::too_many_arguments)]
fn linear_back<T: Real>(pool: &ThreadPool, w: &Frozen, pair: Option<&Pair<T>>, grad: Option<&mut Pair<T>>, factor: T, rank: usize, x: &[T], mask: &[T], u: &[T], dy: &[T], n: usize, dx: &mut [T]) {
    T::frozen_backward(pool, w, dy, n, dx);
    let (Some(p), Some(g)) = (pair, grad) else { return };
    let xd = dropped(x, mask);
    let xd: &[T] = xd.as_deref().unwrap_or(x);
    let (inp, out) = (p.inp, p.out);
    // du[t] = factor · Bᵀ dy[t]
    let mut du = vec![T::default(); n * rank];
    pool.for_rows(&mut du, rank, 1, &|t, dut| {
        for (o, &d) in dy[t * out..(t + 1) * out].iter().enumerate() {
            let c = factor * d;
            for (v, b) in dut.iter_mut().zip(&p.b[o * rank..(o + 1) * rank]) {
                *v += c * *b;
            }
        }
    });
    // dB[o] += factor · Σ_t dy[t][o] u[t]
    pool.for_rows(&mut g.b, rank, 16, &|o, gb| {
        for t in 0..n {
            let c = factor * dy[t * out + o];
            for (v, uv) in gb.iter_mut().zip(&u[t * rank..(t + 1) * rank]) {
                *v += c * *uv;
            }
        }
    });
    // dA[k] += Σ_t du[t][k] x'[t]
    pool.for_rows(&mut g.a, inp, 1, &|k, ga| {
        for t in 0..n {
            T::axpy(ga, du[t * rank + k], &xd[t * inp..(t + 1) * inp]);
        }
    });
    // dx[t] += (Σ_k du[t][k] A[k]) ⊙ mask
    pool.for_rows(&mut dx[..n * inp], inp, 1, &|t, dxt| {
        let mut dxl = vec![T::default(); inp];
        for k in 0..rank {
            T::axpy(&mut dxl, du[t * rank + k], &p.a[k * inp..(k + 1) * inp]);
        }
        if mask.is_empty() {
            T::axpy(dxt, T::of(1.0), &dxl);
        } else {
            for ((o, &v), &m) in dxt.iter_mut().zip(&dxl).zip(&mask[t * inp..(t + 1) * inp]) {
                *o += v * m;
            }
        }
    });
}

/// One training sequence: its tokens, and for each position the token the model should predict
/// there (None: not trained on, as for prompt tokens).
#[derive(Clone, Debug)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<Option<u32>>,
}

impl Example {
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|t| t.is_some()).count()
    }
}

/// Tokens whose logits are computed together in the loss (bounds the logits' memory).
const LOSS_ROWS: usize = 32;

/// The loss of `ex` (summed over its counted tokens) and, when `grad` is given, the gradient of
/// `weight` × that sum accumulated into it.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<T: Real>(model: &Model, frozen: &Frozens, pool: &ThreadPool, lora: &Lora<T>, ex: &Example, weight: T, dropout: Option<Dropout>, mut grad: Option<&mut Lora<T>>) -> f64 {
    let hp = &model.hp;
    let spec = model.spec();
    let (n, e, d, nh, nkv) = (ex.tokens.len(), hp.n_embd, hp.head_dim, hp.n_head, hp.n_head_kv);
    let (factor, rank) = (lora.factor(), lora.rank);
    let eps = hp.norm_eps;
    // Embeddings.
    let mut x = vec![T::default(); n * e];
    let mut row = vec![0f32; e];
    let scale = if spec.scale_embeddings { (e as f64).sqrt() } else { 1.0 };
    for (t, &tok) in ex.tokens.iter().enumerate() {
        model.token_embd().row_f32(tok as usize, &mut row);
        for (xv, &r) in x[t * e..(t + 1) * e].iter_mut().zip(&row) {
            *xv = T::of(r as f64 * scale);
        }
    }
    // Rotation angles per layer and token.
    let angles = |il: usize| -> Vec<(f32, f32)> {
        let mut a = Vec::new();
        for p in 0..n {
            hp.rope[il].angles(p, &mut a);
        }
        a
    };
    let half = |il: usize| hp.rope[il].n_rot / 2;
    let act = spec.activation;
    // One layer's forward pass from its input `x` (replaced by its output), keeping what the
    // backward pass needs.
    let layer_forward = |il: usize, x: &mut Vec<T>| -> LayerCache<T> {
        let w = model.layer(il);
        let fz = &frozen.layers[il];
        let pairs = &lora.layers[il];
        let pair = |t: Target| pairs[t as usize].as_ref();
        let mut c = LayerCache::<T> { x_in: x.clone(), ..Default::default() };
        if let Some(dr) = dropout.filter(|d| d.p > 0.0) {
            for t in Target::ALL {
                if let Some(p) = pair(t) {
                    c.mask[t as usize] = dr.mask(il, t, n * p.inp);
                }
            }
        }
        c.h1 = vec![T::default(); n * e];
        c.inv1 = ops::rms_norm(&c.x_in, &w.attn_norm, eps, &mut c.h1);
        let mut q = Vec::new();
        let mut k = Vec::new();
        let mut v = Vec::new();
        c.u[Target::Q as usize] = linear(pool, &fz[0], pair(Target::Q), factor, rank, &c.h1, &c.mask[Target::Q as usize], n, &mut q);
        c.u[Target::K as usize] = linear(pool, &fz[1], pair(Target::K), factor, rank, &c.h1, &c.mask[Target::K as usize], n, &mut k);
        c.u[Target::V as usize] = linear(pool, &fz[2], pair(Target::V), factor, rank, &c.h1, &c.mask[Target::V as usize], n, &mut v);
        for (buf, b) in [(&mut q, &w.bq), (&mut k, &w.bk), (&mut v, &w.bv)] {
            if let Some(b) = b {
                for r in buf.chunks_exact_mut(b.len()) {
                    for (x, &bv) in r.iter_mut().zip(b) {
                        *x += T::of(bv as f64);
                    }
                }
            }
        }
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            c.q_pre = q.clone();
            c.k_pre = k.clone();
            c.inv_q = ops::rms_norm(&c.q_pre, qn, eps, &mut q);
            c.inv_k = ops::rms_norm(&c.k_pre, kn, eps, &mut k);
        }
        let ang = angles(il);
        let hf = half(il);
        for t in 0..n {
            ops::rope(&hp.rope[il], &mut q[t * nh * d..(t + 1) * nh * d], d, &ang[t * hf..(t + 1) * hf], false);
            ops::rope(&hp.rope[il], &mut k[t * nkv * d..(t + 1) * nkv * d], d, &ang[t * hf..(t + 1) * hf], false);
        }
        let sh = AttnShape { t: n, nh, nkv, d, window: hp.window[il], scale: hp.attn_scale };
        c.att = vec![T::default(); n * nh * d];
        ops::attention(&sh, &q, &k, &v, &mut c.att);
        (c.q, c.k, c.v) = (q, k, v);
        let mut o = Vec::new();
        c.u[Target::O as usize] = linear(pool, &fz[3], pair(Target::O), factor, rank, &c.att, &c.mask[Target::O as usize], n, &mut o);
        if let Some(pn) = &w.post_attn_norm {
            c.o_pre = o.clone();
            c.inv_po = ops::rms_norm(&c.o_pre, pn, eps, &mut o);
        }
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += *ov;
        }
        c.x_mid = x.clone();
        c.h2 = vec![T::default(); n * e];
        c.inv2 = ops::rms_norm(&c.x_mid, &w.ffn_norm, eps, &mut c.h2);
        c.u[Target::Gate as usize] = linear(pool, &fz[4], pair(Target::Gate), factor, rank, &c.h2, &c.mask[Target::Gate as usize], n, &mut c.gate);
        c.u[Target::Up as usize] = linear(pool, &fz[5], pair(Target::Up), factor, rank, &c.h2, &c.mask[Target::Up as usize], n, &mut c.up);
        c.act = vec![T::default(); c.gate.len()];
        ops::gated(act, &c.gate, &c.up, &mut c.act);
        let mut dn = Vec::new();
        c.u[Target::Down as usize] = linear(pool, &fz[6], pair(Target::Down), factor, rank, &c.act, &c.mask[Target::Down as usize], n, &mut dn);
        if let Some(pn) = &w.post_ffn_norm {
            c.dn_pre = dn.clone();
            c.inv_pd = ops::rms_norm(&c.dn_pre, pn, eps, &mut dn);
        }
        for (xv, dv) in x.iter_mut().zip(&dn) {
            *xv += *dv;
        }
        c
    };
    let mut caches: Vec<LayerCache<T>> = Vec::with_capacity(hp.n_layer);
    for il in 0..hp.n_layer {
        let c = layer_forward(il, &mut x);
        caches.push(if frozen.recompute && grad.is_some() { LayerCache { x_in: c.x_in, ..Default::default() } } else { c });
    }
    // Final norm, logits and loss, a few rows at a time; the gradient of the final hidden states.
    let mut hn = vec![T::default(); n * e];
    let inv_n = ops::rms_norm(&x, model.output_norm(), eps, &mut hn);
    let vocab = model.output().rows;
    let mut dhn = vec![T::default(); n * e];
    let mut loss = 0.0;
    let mut logits = Vec::new();
    for r0 in (0..n).step_by(LOSS_ROWS) {
        let r1 = (r0 + LOSS_ROWS).min(n);
        if ex.targets[r0..r1].iter().all(|t| t.is_none()) {
            continue;
        }
        linear(pool, &frozen.output, None, factor, rank, &hn[r0 * e..r1 * e], &[], r1 - r0, &mut logits);
        loss += ops::cross_entropy(&mut logits, vocab, &ex.targets[r0..r1], weight);
        if grad.is_some() {
            T::frozen_backward(pool, &frozen.output, &logits, r1 - r0, &mut dhn[r0 * e..r1 * e]);
        }
    }
    let Some(grad) = grad.as_deref_mut() else { return loss };
    let mut dx = vec![T::default(); n * e];
    ops::rms_norm_back(&x, model.output_norm(), &inv_n, &dhn, &mut dx);
    for il in (0..hp.n_layer).rev() {
        let w = model.layer(il);
        let fz = &frozen.layers[il];
        let recomputed;
        let c = if frozen.recompute {
            let mut x_in = caches[il].x_in.clone();
            recomputed = layer_forward(il, &mut x_in);
            &recomputed
        } else {
            &caches[il]
        };
        let pairs = &lora.layers[il];
        let gl = &mut grad.layers[il];
        // FFN: x_out = x_mid + post(down(act(gate(h2), up(h2)))).
        let mut d_dn = dx.clone();
        if let Some(pn) = &w.post_ffn_norm {
            let mut t = vec![T::default(); d_dn.len()];
            ops::rms_norm_back(&c.dn_pre, pn, &c.inv_pd, &d_dn, &mut t);
            d_dn = t;
        }
        let mut d_act = vec![T::default(); c.act.len()];
        let (p, g) = (pairs[6].as_ref(), gl[6].as_mut());
        linear_back(pool, &fz[6], p, g, factor, rank, &c.act, &c.mask[6], &c.u[6], &d_dn, n, &mut d_act);
        let (mut d_gate, mut d_up) = (vec![T::default(); c.gate.len()], vec![T::default(); c.up.len()]);
        ops::gated_back(act, &c.gate, &c.up, &d_act, &mut d_gate, &mut d_up);
        let mut d_h2 = vec![T::default(); n * e];
        let [_, _, _, _, g4, g5, _] = &mut *gl;
        linear_back(pool, &fz[4], pairs[4].as_ref(), g4.as_mut(), factor, rank, &c.h2, &c.mask[4], &c.u[4], &d_gate, n, &mut d_h2);
        linear_back(pool, &fz[5], pairs[5].as_ref(), g5.as_mut(), factor, rank, &c.h2, &c.mask[5], &c.u[5], &d_up, n, &mut d_h2);
        ops::rms_norm_back(&c.x_mid, &w.ffn_norm, &c.inv2, &d_h2, &mut dx);
        // Attention: x_mid = x_in + post(o(attention(rope(norm(q(h1))), rope(norm(k(h1))), v(h1)))).
        let mut d_o = dx.clone();
        if let Some(pn) = &w.post_attn_norm {
            let mut t = vec![T::default(); d_o.len()];
            ops::rms_norm_back(&c.o_pre, pn, &c.inv_po, &d_o, &mut t);
            d_o = t;
        }
        let mut d_att = vec![T::default(); c.att.len()];
        linear_back(pool, &fz[3], pairs[3].as_ref(), gl[3].as_mut(), factor, rank, &c.att, &c.mask[3], &c.u[3], &d_o, n, &mut d_att);
        let (mut dq, mut dk, mut dv) = (vec![T::default(); c.q.len()], vec![T::default(); c.k.len()], vec![T::default(); c.v.len()]);
        let sh = AttnShape { t: n, nh, nkv, d, window: hp.window[il], scale: hp.attn_scale };
        ops::attention_back(&sh, &c.q, &c.k, &c.v, &d_att, &mut dq, &mut dk, &mut dv);
        let ang = angles(il);
        let hf = half(il);
        for t in 0..n {
            ops::rope(&hp.rope[il], &mut dq[t * nh * d..(t + 1) * nh * d], d, &ang[t * hf..(t + 1) * hf], true);
            ops::rope(&hp.rope[il], &mut dk[t * nkv * d..(t + 1) * nkv * d], d, &ang[t * hf..(t + 1) * hf], true);
        }
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            let (mut tq, mut tk) = (vec![T::default(); dq.len()], vec![T::default(); dk.len()]);
            ops::rms_norm_back(&c.q_pre, qn, &c.inv_q, &dq, &mut tq);
            ops::rms_norm_back(&c.k_pre, kn, &c.inv_k, &dk, &mut tk);
            (dq, dk) = (tq, tk);
        }
        let mut d_h1 = vec![T::default(); n * e];
        let [g0, g1, g2, ..] = &mut *gl;
        linear_back(pool, &fz[0], pairs[0].as_ref(), g0.as_mut(), factor, rank, &c.h1, &c.mask[0], &c.u[0], &dq, n, &mut d_h1);
        linear_back(pool, &fz[1], pairs[1].as_ref(), g1.as_mut(), factor, rank, &c.h1, &c.mask[1], &c.u[1], &dk, n, &mut d_h1);
        linear_back(pool, &fz[2], pairs[2].as_ref(), g2.as_mut(), factor, rank, &c.h1, &c.mask[2], &c.u[2], &dv, n, &mut d_h1);
        ops::rms_norm_back(&c.x_in, &w.attn_norm, &c.inv1, &d_h1, &mut dx);
    }
    loss
}
