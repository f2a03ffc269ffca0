//! Shared building blocks of a transformer layer, and the forward pass that runs them.
//!
//! Buffers (n = tokens in the batch, E = n_embd): `x` is the residual stream [n, E]; blocks read
//! their input from `h` (a normed copy of `x`) and write their output to `a`, which the layer then
//! norms and/or adds back into `x`.

use super::{Activation, LayerWeights, Linear, Model, ModelError};
use crate::kv::{KvStore, KvTypes};
use crate::lora::{LoraPair, LoraSet, Target, DELTA_COLS};
use smelt_kernels::ops::{self, attend, rms_norm, rms_norm_inplace};
use smelt_kernels::pool::ThreadPool;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

/// One token of a batch: its id, its position in its sequence, which sequence (index into the
/// caches passed to `forward`), and whether its logits are wanted.
#[derive(Clone, Copy, Debug)]
pub struct BatchToken {
    pub token: u32,
    pub pos: usize,
    pub seq: usize,
    pub logits: bool,
}

/// Scratch buffers for forward passes, reused across calls so the token loop does not allocate.
pub struct Workspace {
    pub pool: Arc<ThreadPool>,
    x: Vec<f32>,
    h: Vec<f32>,
    a: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    /// Final normed hidden states of the rows whose logits were computed.
    hidden: Vec<f32>,
    matmul: Vec<u8>,
    /// Adapters: per row of the current product, the sequence's set (index into the pass's
    /// sets); the low-rank intermediate and the deltas.
    lora_rows: Vec<usize>,
    lora_t: Vec<f32>,
    lora_d: Vec<f32>,
    /// Rotation angles of this batch's positions, one table per distinct rotation among the
    /// layers (layer index it was built for, n_rot/2 pairs per token); built on first use in a
    /// forward pass, so the sines and cosines are computed once per pass, not per layer.
    rope: Vec<(usize, Vec<(f32, f32)>)>,
    /// Tables of `rope` valid for the current pass (the rest are kept for their memory).
    rope_valid: usize,
}

impl Workspace {
    pub fn new(pool: Arc<ThreadPool>) -> Workspace {
        Workspace {
            pool,
            x: Vec::new(),
            h: Vec::new(),
            a: Vec::new(),
            q: Vec::new(),
            k: Vec::new(),
            v: Vec::new(),
            att: Vec::new(),
            gate: Vec::new(),
            up: Vec::new(),
            logits: Vec::new(),
            hidden: Vec::new(),
            matmul: Vec::new(),
            lora_rows: Vec::new(),
            lora_t: Vec::new(),
            lora_d: Vec::new(),
            rope: Vec::new(),
            rope_valid: 0,
        }
    }

    /// The final normed hidden states (one row of n_embd per logits row) of the last forward pass.
    pub fn hidden(&self) -> &[f32] {
        &self.hidden
    }
}

fn fit(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// The state one layer function works on.
pub struct Block<'a> {
    model: &'a Model,
    ws: &'a mut Workspace,
    batch: &'a [BatchToken],
    kv: &'a mut dyn KvStore,
    /// The adapter sets of this pass (row t of a layer's products runs under
    /// `lora_sets[ws.lora_rows[t]]`), and whether any of them changes anything.
    lora_sets: &'a [&'a LoraSet],
    lora_active: bool,
}

/// The set of sequences that run the base model.
static BASE: LoraSet = LoraSet { adapters: Vec::new() };

/// Add the adapters' deltas to the outputs of products of the input `ws.$x` [n, $cols]: for each
/// `$target => $out, $m`, the deltas of projection `$target` of layer `$il` to `ws.$out` [n, $m].
macro_rules! lora_delta {
    ($self:ident, $ws:ident, $pool:expr, $il:expr, $x:ident, $cols:expr, [$($target:expr => $out:ident, $m:expr);+]) => {
        if $self.lora_active {
            let lora = Lora { sets: $self.lora_sets, rows: &$ws.lora_rows };
            let scratch = LoraScratch { t: &mut $ws.lora_t, d: &mut $ws.lora_d };
            let mut outs: Vec<(Pick, &mut [f32], usize)> = vec![$((Pick::Layer($il, $target), &mut $ws.$out[..], $m)),+];
            lora.add(&$pool, &$ws.$x, $cols, &mut outs, scratch);
        }
    };
}

thread_local! {
    static ATTN_SCRATCH: RefCell<(Vec<f32>, Vec<Range<usize>>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Wall time per operation kind, collected when SMELT_PROFILE is set (a development aid: see
/// `crates/smelt-kernels/PERF.md`).
pub mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    pub const KINDS: [&str; 8] = ["q/k/v", "attention", "norm+rope", "activation", "logits", "attn out", "gate/up", "down"];
    pub const QKV: usize = 0;
    pub const ATTENTION: usize = 1;
    pub const NORM_ROPE: usize = 2;
    pub const ACTIVATION: usize = 3;
    pub const LOGITS: usize = 4;
    pub const ATTN_OUT: usize = 5;
    pub const GATE_UP: usize = 6;
    pub const DOWN: usize = 7;
    static NANOS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    /// Weight bytes the products of each kind read.
    static BYTES: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    pub fn enabled() -> bool {
        static E: OnceLock<bool> = OnceLock::new();
        *E.get_or_init(|| std::env::var_os("SMELT_PROFILE").is_some())
    }
    /// Time since `t` under `kind`, which read `bytes` of weights (0 for work other than products).
    pub fn add(kind: usize, t: std::time::Instant, bytes: usize) {
        NANOS[kind].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        BYTES[kind].fetch_add(bytes as u64, Ordering::Relaxed);
    }
    /// (kind, seconds, weight bytes) so far, and reset.
    pub fn take() -> Vec<(&'static str, f64, u64)> {
        (0..KINDS.len()).map(|i| (KINDS[i], NANOS[i].swap(0, Ordering::Relaxed) as f64 * 1e-9, BYTES[i].swap(0, Ordering::Relaxed))).collect()
    }
}

macro_rules! timed {
    ($kind:expr, $body:expr) => {
        timed!($kind, bytes: [], $body)
    };
    // A product: the weight bytes of its matrices are counted too.
    ($kind:expr, bytes: [$($w:expr),*], $body:expr) => {{
        if profile::enabled() {
            let t = std::time::Instant::now();
            let r = $body;
            profile::add($kind, t, 0 $(+ $w.data.len())*);
            r
        } else {
            $body
        }
    }};
}

/// out[n, w.rows] = x[n, w.cols] · wᵀ — how a single weight matrix is multiplied (adapters
/// add their deltas after, in [`Lora::add`]); `kind` is the profile's name for it.
fn linear(pool: &ThreadPool, w: &Linear, x: &[f32], n: usize, out: &mut Vec<f32>, scratch: &mut Vec<u8>, kind: usize) {
    fit(out, n * w.rows);
    let m = w.matrix();
    timed!(kind, bytes: [m], ops::matmul(pool, &m, x, n, out, scratch));
}

/// The adapters of one product's rows: `sets[rows[i]]` is row i's set.
struct Lora<'a> {
    sets: &'a [&'a LoraSet],
    rows: &'a [usize],
}

/// Scratch of [`Lora::add`] (borrowed from the workspace for the call).
struct LoraScratch<'a> {
    t: &'a mut Vec<f32>,
    d: &'a mut Vec<f32>,
}


/// Which pair of an adapter a product takes: a layer's projection, or the output projection.
#[derive(Clone, Copy)]
enum Pick {
    Layer(usize, Target),
    Output,
}

impl Pick {
    fn pair(self, a: &crate::lora::Adapter) -> Option<&LoraPair> {
        match self {
            Pick::Layer(il, t) => a.pair(il, t),
            Pick::Output => a.output.as_ref(),
        }
    }
}

impl Lora<'_> {
    /// For each output (pick, out [n, m]) of products of the same input x [n, cols]:
    /// out[i] += Σ scale · factor · B (A x[i]) over the adapters of row i's set that `pick`
    /// finds a pair in. The base weights were read once for all rows; each adapter's factors
    /// are read once for all the rows under it, and the outputs of one input (Q, K and V; gate
    /// and up) share two passes of the pool. Every row's delta is computed by the same sequence
    /// of operations whatever else is in the batch, so a row's result does not depend on the
    /// other rows.
    fn add(&self, pool: &ThreadPool, x: &[f32], cols: usize, outs: &mut [(Pick, &mut [f32], usize)], s: LoraScratch) {
        let n = self.rows.len();
        // (output, set index, pair, coefficient, first row of t) of every adapter that applies.
        let mut jobs: Vec<(usize, usize, &LoraPair, f32, usize)> = Vec::new();
        let mut t_rows = 0;
        for (o, (pick, _, _)) in outs.iter().enumerate() {
            for (si, set) in self.sets.iter().enumerate() {
                if !self.rows.contains(&si) {
                    continue;
                }
                for (adapter, scale) in &set.adapters {
                    if let (Some(p), true) = (pick.pair(adapter), *scale != 0.0) {
                        jobs.push((o, si, p, scale * p.factor, t_rows));
                        t_rows += p.rank();
                    }
                }
            }
        }
        if jobs.is_empty() {
            return;
        }
        // t[k][i] = A_k · x[i] for each adapter row k, over the batch rows under that adapter.
        fit(s.t, t_rows * n);
        let job_of = |k: usize| jobs.iter().rfind(|j| j.4 <= k).expect("row of some job");
        // Contiguous runs of rows per thread: they read A in order.
        pool.for_row_parts(s.t, n, 1, &|k, trow| {
            let (_, si, p, _, first) = *job_of(k);
            for (i, v) in trow.iter_mut().enumerate() {
                if self.rows[i] == si {
                    *v = p.a.dot_row(k - first, &x[i * cols..(i + 1) * cols]);
                }
            }
        });
        // delta[i][block's columns] = Σ_k coef · t[k][i] · Bᵀ_k[block's columns], in blocks of
        // DELTA_COLS columns of each output (in order: each factor's blocks are consecutive).
        let blocks: Vec<(usize, usize, std::ops::Range<usize>)> =
            outs.iter().enumerate().flat_map(|(o, (_, _, m))| (0..m.div_ceil(DELTA_COLS)).map(move |c| (o, c, c * DELTA_COLS..((c + 1) * DELTA_COLS).min(*m)))).collect();
        fit(s.d, blocks.len() * n * DELTA_COLS);
        let t: &[f32] = s.t;
        pool.for_row_parts(s.d, n * DELTA_COLS, 1, &|b, d| {
            let (o, c, range) = &blocks[b];
            let w = range.len();
            d.fill(0.0);
            for &(_, si, p, coef, first) in jobs.iter().filter(|j| j.0 == *o) {
                for i in (0..n).filter(|&i| self.rows[i] == si) {
                    let di = &mut d[i * DELTA_COLS..i * DELTA_COLS + w];
                    for k in 0..p.rank() {
                        p.bt.axpy(k, *c, coef * t[(first + k) * n + i], di);
                    }
                }
            }
        });
        for (b, (o, _, range)) in blocks.iter().enumerate() {
            let (_, out, m) = &mut outs[*o];
            for i in (0..n).filter(|&i| jobs.iter().any(|j| j.0 == *o && j.1 == self.rows[i])) {
                let d = &s.d[(b * n + i) * DELTA_COLS..][..range.len()];
                ops::add_inplace(&mut out[i * *m + range.start..i * *m + range.end], d);
            }
        }
    }
}

/// `f(t, row)` for each token's row of `row` floats: through the pool when there are enough
/// tokens to pay for it, else on this thread (the result is the same).
fn per_token(pool: &ThreadPool, data: &mut [f32], row: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    if data.len() >= 8 * row {
        pool.for_rows(data, row, 2, f);
    } else {
        for (t, r) in data.chunks_exact_mut(row).enumerate() {
            f(t, r);
        }
    }
}

fn add_bias(x: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            ops::add_inplace(row, b);
        }
    }
}

impl Block<'_> {
    fn n(&self) -> usize {
        self.batch.len()
    }

    /// h = rms_norm(x) · weight
    pub fn norm_input(&mut self, weight: &[f32]) {
        let ws = &mut *self.ws;
        fit(&mut ws.h, ws.x.len());
        let (x, eps, e) = (&ws.x, self.model.hp.norm_eps, weight.len());
        timed!(profile::NORM_ROPE, per_token(&ws.pool, &mut ws.h, e, &|t, h| rms_norm(&x[t * e..(t + 1) * e], weight, eps, h)));
    }

    /// a = rms_norm(a) · weight (Gemma's post-attention and post-FFN norms)
    pub fn norm_output(&mut self, weight: &[f32]) {
        let eps = self.model.hp.norm_eps;
        timed!(profile::NORM_ROPE, per_token(&self.ws.pool, &mut self.ws.a, weight.len(), &|_, a| rms_norm_inplace(a, weight, eps)));
    }

    /// x += a
    pub fn add_residual(&mut self) {
        ops::add_inplace(&mut self.ws.x, &self.ws.a);
    }

    /// a = self-attention over h for layer `il`: project Q/K/V (+ bias, per-head norm), rotate,
    /// store K/V in each token's sequence cache, attend causally, project out.
    pub fn attention(&mut self, w: &LayerWeights, il: usize) {
        let hp = &self.model.hp;
        let n = self.n();
        let (d, nh, nkv) = (hp.head_dim, hp.n_head, hp.n_head_kv);
        let ws = &mut *self.ws;
        let pool = ws.pool.clone();
        fit(&mut ws.q, n * w.wq.rows);
        fit(&mut ws.k, n * w.wk.rows);
        fit(&mut ws.v, n * w.wv.rows);
        let (mq, mk, mv) = (w.wq.matrix(), w.wk.matrix(), w.wv.matrix());
        timed!(profile::QKV, bytes: [mq, mk, mv], ops::matmul_fused(&pool, [&mq, &mk, &mv], &ws.h, n, [&mut ws.q, &mut ws.k, &mut ws.v], &mut ws.matmul));
        let e = hp.n_embd;
        lora_delta!(self, ws, pool, il, h, e, [Target::Q => q, w.wq.rows; Target::K => k, w.wk.rows; Target::V => v, w.wv.rows]);
        add_bias(&mut ws.q, &w.bq);
        add_bias(&mut ws.k, &w.bk);
        add_bias(&mut ws.v, &w.bv);
        if let (Some(qn), Some(kn)) = (&w.q_norm, &w.k_norm) {
            let eps = hp.norm_eps;
            timed!(profile::NORM_ROPE, per_token(&pool, &mut ws.q, nh * d, &|_, q| rms_norm_inplace(q, qn, eps)));
            timed!(profile::NORM_ROPE, per_token(&pool, &mut ws.k, nkv * d, &|_, k| rms_norm_inplace(k, kn, eps)));
        }
        let rope = &hp.rope[il];
        let t_rope = std::time::Instant::now();
        let table = match ws.rope[..ws.rope_valid].iter().position(|(l, _)| hp.rope[*l] == *rope) {
            Some(i) => i,
            None => {
                if ws.rope.len() == ws.rope_valid {
                    ws.rope.push((il, Vec::new()));
                }
                let (layer, angles) = &mut ws.rope[ws.rope_valid];
                *layer = il;
                angles.clear();
                for bt in self.batch {
                    rope.angles(bt.pos, angles);
                }
                ws.rope_valid += 1;
                ws.rope_valid - 1
            }
        };
        let half = rope.n_rot / 2;
        let angles = &ws.rope[table].1;
        per_token(&pool, &mut ws.q, nh * d, &|t, q| rope.rotate(q, d, &angles[t * half..(t + 1) * half]));
        per_token(&pool, &mut ws.k, nkv * d, &|t, k| rope.rotate(k, d, &angles[t * half..(t + 1) * half]));
        let row = nkv * d;
        // Quantized caches keep keys and values rotated (see `KvType::key_rotation`): queries
        // turn with the keys, so scores are unchanged, and the output turns back below.
        let rotated = self.batch.iter().any(|bt| self.kv.types(bt.seq) != KvTypes::default());
        if rotated {
            let (kv, batch) = (&*self.kv, self.batch);
            let key_rot = |t: usize| kv.types(batch[t].seq).k.key_rotation(d);
            per_token(&pool, &mut ws.q, nh * d, &|t, q| key_rot(t).map_or((), |r| ops::hadamard(q, r)));
            per_token(&pool, &mut ws.k, row, &|t, k| key_rot(t).map_or((), |r| ops::hadamard(k, r)));
            per_token(&pool, &mut ws.v, row, &|t, v| kv.types(batch[t].seq).v.value_rotation(d).map_or((), |r| ops::hadamard(v, r)));
        }
        for (t, bt) in self.batch.iter().enumerate() {
            self.kv.write(bt.seq, il, bt.pos, &ws.k[t * row..(t + 1) * row], &ws.v[t * row..(t + 1) * row]);
        }
        if profile::enabled() {
            profile::add(profile::NORM_ROPE, t_rope, 0);
        }
        fit(&mut ws.att, n * nh * d);
        let (q, kv, batch) = (&ws.q, &*self.kv, self.batch);
        let group = nh / nkv;
        let scale = hp.attn_scale;
        // Work items: the query heads sharing a key/value head attend together, so each key and
        // value row is read once for all of them (at long contexts the cache is far larger than
        // the CPU caches, and every extra pass over it is memory traffic); when that leaves
        // threads idle, as when decoding one token of a model with a single key/value head, the
        // group splits into as few parts as keep every thread busy. A head's result is the same
        // however its group is split.
        let per_item = (1..=group).rev().find(|&p| group % p == 0 && n * nkv * (group / p) >= pool.n_threads()).unwrap_or(1);
        let items_per_token = nh / per_item;
        let t_att = std::time::Instant::now();
        pool.for_rows(&mut ws.att, per_item * d, 1, &|item, out| {
            let (t, head0) = (item / items_per_token, (item % items_per_token) * per_item);
            let bt = &batch[t];
            ATTN_SCRATCH.with(|s| {
                let (scores, ranges) = &mut *s.borrow_mut();
                let (keys, values) = kv.view(bt.seq, il, bt.pos, ranges);
                let qh = &q[(t * nh + head0) * d..][..per_item * d];
                attend(qh, d, keys, values, nkv * d, (head0 / group) * d, ranges, scale, scores, out);
            });
        });
        if rotated {
            let (kv, batch) = (&*self.kv, self.batch);
            per_token(&pool, &mut ws.att, nh * d, &|t, o| kv.types(batch[t].seq).v.value_rotation(d).map_or((), |r| ops::hadamard(o, r)));
        }
        if profile::enabled() {
            profile::add(profile::ATTENTION, t_att, 0);
        }
        linear(&pool, &w.wo, &ws.att, n, &mut ws.a, &mut ws.matmul, profile::ATTN_OUT);
        lora_delta!(self, ws, pool, il, att, w.wo.cols, [Target::O => a, w.wo.rows]);
    }

    /// The pre-norm layer Llama, Qwen2 and Qwen3 share: x += attn(norm(x)); x += ffn(norm(x)).
    pub fn pre_norm_layer(&mut self, w: &LayerWeights, il: usize, act: Activation) {
        self.norm_input(&w.attn_norm);
        self.attention(w, il);
        self.add_residual();
        self.norm_input(&w.ffn_norm);
        self.ffn(w, il, act);
        self.add_residual();
    }

    /// a = down(act(gate(h)) * up(h))
    pub fn ffn(&mut self, w: &LayerWeights, il: usize, act: Activation) {
        let n = self.n();
        let ws = &mut *self.ws;
        let pool = ws.pool.clone();
        fit(&mut ws.gate, n * w.gate.rows);
        fit(&mut ws.up, n * w.up.rows);
        let (mg, mu) = (w.gate.matrix(), w.up.matrix());
        timed!(profile::GATE_UP, bytes: [mg, mu], ops::matmul_fused(&pool, [&mg, &mu], &ws.h, n, [&mut ws.gate, &mut ws.up], &mut ws.matmul));
        lora_delta!(self, ws, pool, il, h, w.gate.cols, [Target::Gate => gate, w.gate.rows; Target::Up => up, w.up.rows]);
        let f = match act {
            Activation::Silu => ops::silu_mul,
            Activation::GeluTanh => ops::gelu_mul,
        };
        let (ff, up) = (w.gate.rows, &ws.up);
        timed!(profile::ACTIVATION, per_token(&pool, &mut ws.gate, ff, &|t, row| f(row, &up[t * ff..(t + 1) * ff])));
        linear(&pool, &w.down, &ws.gate, n, &mut ws.a, &mut ws.matmul, profile::DOWN);
        lora_delta!(self, ws, pool, il, gate, w.down.cols, [Target::Down => a, w.down.rows]);
    }
}

impl Model {
    fn check_batch(&self, batch: &[BatchToken], kv: &dyn KvStore) -> Result<Vec<usize>, ModelError> {
        if batch.is_empty() {
            return Err(ModelError::Batch("empty batch".into()));
        }
        let mut added = vec![0usize; kv.n_seqs()];
        for bt in batch {
            if bt.seq >= kv.n_seqs() {
                return Err(ModelError::Batch(format!("sequence {} has no cache", bt.seq)));
            }
            if bt.token as usize >= self.hp.n_vocab {
                return Err(ModelError::Batch(format!("token id {} is outside the vocabulary ({} tokens)", bt.token, self.hp.n_vocab)));
            }
            let expect = kv.len(bt.seq) + added[bt.seq];
            if bt.pos != expect {
                return Err(ModelError::Batch(format!("sequence {}: position {} given, {expect} expected next", bt.seq, bt.pos)));
            }
            if bt.pos >= kv.capacity(bt.seq) {
                return Err(ModelError::Batch(format!("sequence {}: position {} is beyond the context of {} tokens", bt.seq, bt.pos, kv.capacity(bt.seq))));
            }
            added[bt.seq] += 1;
            if added[bt.seq] > kv.max_batch(bt.seq) {
                return Err(ModelError::Batch(format!("sequence {}: more than {} tokens in one batch", bt.seq, kv.max_batch(bt.seq))));
            }
        }
        Ok(added)
    }

    /// Run the model on a batch of tokens (from one or more sequences), appending their keys and
    /// values to the sequences' caches. Returns the logits [rows, n_vocab] of the tokens whose
    /// `logits` flag is set, in batch order.
    pub fn forward<'w>(&self, batch: &[BatchToken], kv: &mut dyn KvStore, ws: &'w mut Workspace) -> Result<&'w [f32], ModelError> {
        self.run(batch, kv, ws, &[], true)
    }

    /// [`Model::forward`] with adapters: sequence `s` runs under `loras[s]` (the base model
    /// where that is empty, or `s` is past the end). Sequences under different adapters share
    /// the pass; each token's result is the one it gets in a batch of its own.
    pub fn forward_lora<'w>(&self, batch: &[BatchToken], kv: &mut dyn KvStore, ws: &'w mut Workspace, loras: &[&LoraSet]) -> Result<&'w [f32], ModelError> {
        self.run(batch, kv, ws, loras, true)
    }

    /// Like [`Model::forward`], but returns the final normed hidden states [rows, n_embd] of the
    /// flagged tokens instead of logits (embeddings), skipping the output projection.
    pub fn forward_hidden<'w>(&self, batch: &[BatchToken], kv: &mut dyn KvStore, ws: &'w mut Workspace) -> Result<&'w [f32], ModelError> {
        self.run(batch, kv, ws, &[], false)?;
        Ok(&ws.hidden)
    }

    fn run<'w>(&self, batch: &[BatchToken], kv: &mut dyn KvStore, ws: &'w mut Workspace, loras: &[&LoraSet], logits: bool) -> Result<&'w [f32], ModelError> {
        let added = self.check_batch(batch, kv)?;
        let hp = &self.hp;
        let (n, e) = (batch.len(), hp.n_embd);
        for (seq, &add) in added.iter().enumerate() {
            if add > 0 {
                kv.reserve(seq, kv.len(seq) + add).map_err(ModelError::Batch)?;
            }
        }
        fit(&mut ws.x, n * e);
        ws.rope_valid = 0;
        let scale = if self.spec().scale_embeddings { (e as f32).sqrt() } else { 1.0 };
        for (t, bt) in batch.iter().enumerate() {
            let row = &mut ws.x[t * e..(t + 1) * e];
            self.token_embd.row_f32(bt.token as usize, row);
            if scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        // The adapter sets, the base model's last; each row's index into them.
        let mut lora_sets: Vec<&LoraSet> = loras.to_vec();
        lora_sets.push(&BASE);
        let lora_active = loras.iter().any(|s| !s.is_empty());
        ws.lora_rows.clear();
        ws.lora_rows.extend(batch.iter().map(|bt| bt.seq.min(loras.len())));
        {
            let layer_fn = self.arch.layer();
            let mut block = Block { model: self, ws: &mut *ws, batch, kv: &mut *kv, lora_sets: &lora_sets, lora_active };
            for (il, lw) in self.layers.iter().enumerate() {
                layer_fn(&mut block, lw, il);
            }
        }
        for (seq, &add) in added.iter().enumerate() {
            if add > 0 {
                kv.advance(seq, add);
            }
        }
        let rows: Vec<usize> = (0..n).filter(|&t| batch[t].logits).collect();
        fit(&mut ws.hidden, rows.len() * e);
        for (i, &t) in rows.iter().enumerate() {
            rms_norm(&ws.x[t * e..(t + 1) * e], &self.output_norm, hp.norm_eps, &mut ws.hidden[i * e..(i + 1) * e]);
        }
        if rows.is_empty() || !logits {
            return Ok(&[]);
        }
        let pool = ws.pool.clone();
        fit(&mut ws.logits, rows.len() * self.output.rows);
        let m = self.output.matrix();
        timed!(profile::LOGITS, bytes: [m], ops::matmul(&pool, &m, &ws.hidden, rows.len(), &mut ws.logits, &mut ws.matmul));
        if lora_active {
            ws.lora_rows.clear();
            ws.lora_rows.extend(rows.iter().map(|&t| batch[t].seq.min(loras.len())));
            let lora = Lora { sets: &lora_sets, rows: &ws.lora_rows };
            let scratch = LoraScratch { t: &mut ws.lora_t, d: &mut ws.lora_d };
            let mut outs: Vec<(Pick, &mut [f32], usize)> = vec![(Pick::Output, &mut ws.logits[..], self.output.rows)];
            lora.add(&pool, &ws.hidden, e, &mut outs, scratch);
        }
        Ok(&ws.logits)
    }
}
