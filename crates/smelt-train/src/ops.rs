//! The operations of a transformer layer with their backward passes, generic over the number
//! type, mirroring the inference code's math (`smelt_kernels::ops`, `smelt_model::arch::blocks`).
//! Each `*_back` takes the gradient of the output and returns or accumulates the gradient of the
//! input; the tests check every one against central differences in f64.

use crate::real::Real;
use smelt_kernels::ops::{Rope, RopeStyle};
use smelt_model::arch::Activation;

/// y = x / rms(x) · w per `w.len()`-sized row; returns each row's 1 / rms.
pub fn rms_norm<T: Real>(x: &[T], w: &[f32], eps: f32, y: &mut [T]) -> Vec<T> {
    let d = w.len();
    let mut inv = Vec::with_capacity(x.len() / d);
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let ss = T::dot(xr, xr);
        let s = T::of(1.0) / (ss / T::of(d as f64) + T::of(eps as f64)).sqrt();
        for ((yv, &xv), &g) in yr.iter_mut().zip(xr).zip(w) {
            *yv = xv * s * T::of(g as f64);
        }
        inv.push(s);
    }
    inv
}

/// dx += backward of [`rms_norm`] given dy, the input x and the saved 1 / rms.
pub fn rms_norm_back<T: Real>(x: &[T], w: &[f32], inv: &[T], dy: &[T], dx: &mut [T]) {
    let d = w.len();
    for (((xr, dyr), dxr), &s) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(inv) {
        // y_i = x_i s g_i, s = (mean x² + eps)^-1/2: dx_i = s g_i dy_i - x_i s³ Σ_j g_j dy_j x_j / d
        let mut acc = T::default();
        for ((&xv, &dv), &g) in xr.iter().zip(dyr).zip(w) {
            acc += T::of(g as f64) * dv * xv;
        }
        let c = s * s * s * acc / T::of(d as f64);
        for (((dxv, &xv), &dv), &g) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
            *dxv += s * T::of(g as f64) * dv - xv * c;
        }
    }
}

/// Rotate every head of a token's vector by the angles of its position (`rotate` in
/// smelt_kernels); `inverse` rotates back, which is also the backward pass.
pub fn rope<T: Real>(rope: &Rope, x: &mut [T], head_dim: usize, angles: &[(f32, f32)], inverse: bool) {
    let half = rope.n_rot / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in angles[..half].iter().enumerate() {
            let (a, b) = match rope.style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (c, s) = (T::of(c as f64), if inverse { -T::of(s as f64) } else { T::of(s as f64) });
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;

/// out = act(gate) · up
pub fn gated<T: Real>(act: Activation, gate: &[T], up: &[T], out: &mut [T]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = act_value(act, g) * u;
    }
}

fn act_value<T: Real>(act: Activation, x: T) -> T {
    match act {
        Activation::Silu => x / (T::of(1.0) + (-x).exp()),
        Activation::GeluTanh => T::of(0.5) * x * (T::of(1.0) + (T::of(SQRT_2_OVER_PI) * x * (T::of(1.0) + T::of(0.044715) * x * x)).tanh()),
    }
}

fn act_slope<T: Real>(act: Activation, x: T) -> T {
    match act {
        Activation::Silu => {
            let s = T::of(1.0) / (T::of(1.0) + (-x).exp());
            s * (T::of(1.0) + x * (T::of(1.0) - s))
        }
        Activation::GeluTanh => {
            let k = T::of(SQRT_2_OVER_PI);
            let t = (k * x * (T::of(1.0) + T::of(0.044715) * x * x)).tanh();
            T::of(0.5) * (T::of(1.0) + t) + T::of(0.5) * x * (T::of(1.0) - t * t) * k * (T::of(1.0) + T::of(3.0 * 0.044715) * x * x)
        }
    }
}

/// Backward of [`gated`]: d gate and d up (overwritten).
pub fn gated_back<T: Real>(act: Activation, gate: &[T], up: &[T], dout: &[T], dgate: &mut [T], dup: &mut [T]) {
    for i in 0..gate.len() {
        dgate[i] = dout[i] * up[i] * act_slope(act, gate[i]);
        dup[i] = dout[i] * act_value(act, gate[i]);
    }
}

/// The attention of one sequence: T tokens, `nh` query heads and `nkv` key/value heads of
/// `d` dims; token i sees tokens j ≤ i with i - j < window.
pub struct AttnShape {
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub d: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

impl AttnShape {
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
        lo..i + 1
    }

    /// The softmax weights of query head h of token i over its visible keys.
    fn probs<T: Real>(&self, q: &[T], k: &[T], i: usize, h: usize, p: &mut Vec<T>) {
        let (d, kvh) = (self.d, h / (self.nh / self.nkv));
        let qi = &q[(i * self.nh + h) * d..][..d];
        p.clear();
        let mut max = T::of(f64::NEG_INFINITY);
        for j in self.visible(i) {
            let s = T::dot(qi, &k[(j * self.nkv + kvh) * d..][..d]) * T::of(self.scale as f64);
            if s > max {
                max = s;
            }
            p.push(s);
        }
        let mut sum = T::default();
        for v in p.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in p.iter_mut() {
            *v = *v / sum;
        }
    }
}

/// out [t × nh·d] = softmax(q kᵀ · scale, causal and windowed) v
pub fn attention<T: Real>(sh: &AttnShape, q: &[T], k: &[T], v: &[T], out: &mut [T]) {
    let d = sh.d;
    let mut p = Vec::new();
    for i in 0..sh.t {
        for h in 0..sh.nh {
            sh.probs(q, k, i, h, &mut p);
            let kvh = h / (sh.nh / sh.nkv);
            let o = &mut out[(i * sh.nh + h) * d..][..d];
            o.iter_mut().for_each(|x| *x = T::default());
            for (pj, j) in p.iter().zip(sh.visible(i)) {
                T::axpy(o, *pj, &v[(j * sh.nkv + kvh) * d..][..d]);
            }
        }
    }
}

/// Backward of [`attention`] (the weights recomputed from q and k): dq, dk, dv accumulate.
pub fn attention_back<T: Real>(sh: &AttnShape, q: &[T], k: &[T], v: &[T], dout: &[T], dq: &mut [T], dk: &mut [T], dv: &mut [T]) {
    let d = sh.d;
    let scale = T::of(sh.scale as f64);
    let (mut p, mut dp) = (Vec::new(), Vec::new());
    for i in 0..sh.t {
        for h in 0..sh.nh {
            sh.probs(q, k, i, h, &mut p);
            let kvh = h / (sh.nh / sh.nkv);
            let doi = &dout[(i * sh.nh + h) * d..][..d];
            dp.clear();
            for j in sh.visible(i) {
                dp.push(T::dot(doi, &v[(j * sh.nkv + kvh) * d..][..d]));
            }
            let mut pdp = T::default();
            for (a, b) in p.iter().zip(&dp) {
                pdp += *a * *b;
            }
            let qi: Vec<T> = q[(i * sh.nh + h) * d..][..d].to_vec();
            for ((pj, dpj), j) in p.iter().zip(&dp).zip(sh.visible(i)) {
                let ds = *pj * (*dpj - pdp) * scale;
                let kv = (j * sh.nkv + kvh) * d;
                T::axpy(&mut dq[(i * sh.nh + h) * d..][..d], ds, &k[kv..kv + d]);
                T::axpy(&mut dk[kv..kv + d], ds, &qi);
                T::axpy(&mut dv[kv..kv + d], *pj, doi);
            }
        }
    }
}

/// Mean cross-entropy of the rows of `logits` [n × vocab] against `targets` (rows whose
/// target is None do not count), and its gradient in place of the logits, scaled by `weight`
/// (1 / the number of counted tokens of the whole step). Returns the summed loss of the rows.
pub fn cross_entropy<T: Real>(logits: &mut [T], vocab: usize, targets: &[Option<u32>], weight: T) -> f64 {
    let mut total = 0.0;
    for (row, tgt) in logits.chunks_exact_mut(vocab).zip(targets) {
        let Some(tgt) = tgt else {
            row.iter_mut().for_each(|x| *x = T::default());
            continue;
        };
        let mut max = row[0];
        for &v in row.iter() {
            if v > max {
                max = v;
            }
        }
        let mut sum = 0.0f64;
        for &v in row.iter() {
            sum += (v - max).f64().exp();
        }
        let lse = max.f64() + sum.ln();
        total += lse - row[*tgt as usize].f64();
        for v in row.iter_mut() {
            *v = T::of((v.f64() - lse).exp()) * weight;
        }
        row[*tgt as usize] -= weight;
    }
    total
}
