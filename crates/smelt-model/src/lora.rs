//! LoRA adapters: low-rank weight deltas in llama.cpp's GGUF adapter format
//! (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and for each adapted
//! base tensor `NAME.lora_a` [in, rank] and `NAME.lora_b` [rank, out], GGML dimension order).
//!
//! A linear layer `y = W x` under adapters becomes `y = W x + Σ s · B (A x)` with
//! `s = scale · alpha / rank` (just `scale` when the file's alpha is 0, as llama.cpp does). The
//! delta is never folded into `W`: the base weights stay shared and quantized, and each
//! sequence of a batch can run under its own adapters (see `arch::blocks`).

use crate::arch::{Model, ModelError};
use crate::gguf::GgufFile;
use smelt_kernels::formats::{dequantize_row, DType};
use smelt_kernels::ops;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The projections of a layer an adapter may change, in `LayerLora` order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The base tensor's name in a layer (`blk.N.` + this + `.weight`).
    pub fn tensor(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// The short name used on the command line (`--targets q,k,v,o,gate,up,down`).
    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }
}

/// The values of one low-rank factor: f16 where the file has f16 (half the bytes to read per
/// token), f32 otherwise (other formats are decoded to f32 at load).
#[derive(Clone)]
pub enum Values {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

/// A small row-major matrix of an adapter.
#[derive(Clone)]
pub struct LowRank {
    pub rows: usize,
    pub cols: usize,
    pub values: Values,
}

impl LowRank {
    /// row `r` · x (x has `cols` values).
    pub fn dot_row(&self, r: usize, x: &[f32]) -> f32 {
        let (lo, hi) = (r * self.cols, (r + 1) * self.cols);
        match &self.values {
            Values::F32(v) => ops::dot_f32(&v[lo..hi], x),
            Values::F16(v) => ops::dot_f16_f32(&v[lo..hi], x),
        }
    }

    /// The values as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.values {
            Values::F32(v) => v.clone(),
            Values::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => 4 * v.len(),
            Values::F16(v) => 2 * v.len(),
        }
    }
}

/// Output columns per block of an adapter's delta pass.
pub const DELTA_COLS: usize = 256;

/// Bᵀ [rank × out] in blocks of [`DELTA_COLS`] columns: block c holds columns
/// c·DELTA_COLS.. of rows 0..rank one after another, so the delta pass, which works a block at
/// a time, reads the factor in order.
#[derive(Clone)]
pub struct BlockedT {
    pub rank: usize,
    pub out: usize,
    pub values: Values,
}

impl BlockedT {
    /// From B [out × rank], row-major.
    fn from_b(b: &LowRank) -> BlockedT {
        let (out, rank) = (b.rows, b.cols);
        // Position i of the blocked layout holds B[col][k] for its block c, row k, column j.
        let src = |i: usize| {
            let c = i / (DELTA_COLS * rank);
            let w = DELTA_COLS.min(out - c * DELTA_COLS);
            let (k, j) = ((i % (DELTA_COLS * rank)) / w, (i % (DELTA_COLS * rank)) % w);
            (c * DELTA_COLS + j) * rank + k
        };
        let values = match &b.values {
            Values::F32(v) => Values::F32((0..v.len()).map(|i| v[src(i)]).collect()),
            Values::F16(v) => Values::F16((0..v.len()).map(|i| v[src(i)]).collect()),
        };
        BlockedT { rank, out, values }
    }

    /// B [out × rank], row-major (what the file holds).
    pub fn b(&self) -> LowRank {
        let (out, rank) = (self.out, self.rank);
        let at = |o: usize, k: usize| {
            let (c, j) = (o / DELTA_COLS, o % DELTA_COLS);
            let w = DELTA_COLS.min(out - c * DELTA_COLS);
            c * DELTA_COLS * rank + k * w + j
        };
        let values = match &self.values {
            Values::F32(v) => Values::F32((0..out * rank).map(|i| v[at(i / rank, i % rank)]).collect()),
            Values::F16(v) => Values::F16((0..out * rank).map(|i| v[at(i / rank, i % rank)]).collect()),
        };
        LowRank { rows: out, cols: rank, values }
    }

    /// y += c · Bᵀ[k][columns of block `block`] (y holds the block's columns).
    pub fn axpy(&self, k: usize, block: usize, c: f32, y: &mut [f32]) {
        let w = DELTA_COLS.min(self.out - block * DELTA_COLS);
        let at = block * DELTA_COLS * self.rank + k * w;
        match &self.values {
            Values::F32(v) => ops::axpy_f32(y, c, &v[at..at + w]),
            Values::F16(v) => ops::axpy_f16(y, c, &v[at..at + w]),
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => 4 * v.len(),
            Values::F16(v) => 2 * v.len(),
        }
    }
}

/// One adapted matrix: `delta = factor · B · A`, A [rank × in], B [out × rank], held as A and
/// Bᵀ in column blocks, so both passes read their factor in order.
#[derive(Clone)]
pub struct LoraPair {
    pub a: LowRank,
    pub bt: BlockedT,
    /// alpha / rank, or 1 when the file's alpha is 0.
    pub factor: f32,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.a.rows
    }

    pub fn bytes(&self) -> usize {
        self.a.bytes() + self.bt.bytes()
    }
}

/// A loaded adapter: its pairs by layer and projection, and the output projection's.
pub struct Adapter {
    pub name: String,
    /// Names the adapter's weights: the file's digest when loaded from one (the prefix cache
    /// keys KV by it, in memory and on disk).
    pub id: u64,
    pub arch: String,
    pub alpha: f32,
    /// Per layer, per [`Target`]: the pair adapting that projection, if any.
    pub layers: Vec<[Option<LoraPair>; 7]>,
    pub output: Option<LoraPair>,
    /// Bytes of all the pairs.
    pub bytes: usize,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn invalid(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Invalid(format!("adapter {}: {msg}", path.display()))
}

impl Adapter {
    /// Load a GGUF LoRA adapter and check it against `model`: architecture, tensor names and
    /// shapes. `name` is what requests call it by.
    pub fn load(path: &Path, model: &Model, name: &str) -> Result<Adapter, ModelError> {
        let file = GgufFile::open(path).map_err(|e| invalid(path, e))?;
        Self::from_file(&file, model, name).map_err(|e| match e {
            ModelError::Invalid(m) => invalid(path, m),
            other => other,
        })
    }

    pub fn from_file(file: &GgufFile, model: &Model, name: &str) -> Result<Adapter, ModelError> {
        let h = &file.header;
        let kind = h.get_str("general.type")?;
        if kind != Some("adapter") {
            let what = kind.map_or("a file without general.type".to_string(), |k| {
                format!("general.type {k:?}")
            });
            return Err(ModelError::Invalid(format!(
                "not a LoRA adapter ({what}; expected \"adapter\")"
            )));
        }
        let atype = h.get_str("adapter.type")?;
        if atype != Some("lora") {
            return Err(ModelError::Invalid(format!(
                "adapter type {:?} is not supported (only \"lora\")",
                atype.unwrap_or("")
            )));
        }
        let arch = h.get_str("general.architecture")?.unwrap_or("").to_string();
        if arch != model.spec().name {
            return Err(ModelError::Invalid(format!(
                "it was made for a {arch:?} model, the base model is {:?}",
                model.spec().name
            )));
        }
        let alpha = h.get_f32("adapter.lora.alpha")?.unwrap_or(0.0);
        if !alpha.is_finite() {
            return Err(ModelError::Invalid(format!(
                "adapter.lora.alpha is {alpha}"
            )));
        }
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..model.hp.n_layer).map(|_| Default::default()).collect();
        let mut output = None;
        let mut bytes = 0;
        for t in &h.tensors {
            let Some(base) = t.name.strip_suffix(".lora_a") else {
                if t.name.ends_with(".lora_b") {
                    continue;
                }
                return Err(ModelError::Invalid(format!(
                    "tensor {:?} is neither a lora_a nor a lora_b",
                    t.name
                )));
            };
            let (rows, cols) = model.base_shape(base).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "it adapts {base:?}, which the base model has no adaptable matrix for"
                ))
            })?;
            let pair = load_pair(file, base, rows, cols, alpha)?;
            bytes += pair.bytes();
            match parse_target(base) {
                Some((il, target)) => layers[il][target as usize] = Some(pair),
                None => output = Some(pair),
            }
        }
        for t in &h.tensors {
            if let Some(base) = t.name.strip_suffix(".lora_b") {
                if h.tensor(&format!("{base}.lora_a")).is_none() {
                    return Err(ModelError::Invalid(format!("{base}.lora_b has no lora_a")));
                }
            }
        }
        if bytes == 0 {
            return Err(ModelError::Invalid(
                "it holds no lora_a / lora_b tensors".into(),
            ));
        }
        // The same file gives the same KV, so its digest keys it (in memory and on disk).
        let id = crate::gguf::file_digest(&file.path).unwrap_or_else(|_| NEXT_ID.fetch_add(1, Ordering::Relaxed));
        Ok(Adapter {
            name: name.to_string(),
            id,
            arch,
            alpha,
            layers,
            output,
            bytes,
        })
    }

    /// The largest rank among the pairs.
    pub fn rank(&self) -> usize {
        let layers = self.layers.iter().flatten().flatten();
        layers
            .chain(&self.output)
            .map(|p| p.rank())
            .max()
            .unwrap_or(0)
    }

    /// The pair for `target` of layer `il`, if this adapter changes it.
    pub fn pair(&self, il: usize, target: Target) -> Option<&LoraPair> {
        self.layers.get(il)?[target as usize].as_ref()
    }
}

/// `blk.N.attn_q.weight` → (N, Q); `output.weight` → None.
pub(crate) fn parse_target(base: &str) -> Option<(usize, Target)> {
    let rest = base.strip_prefix("blk.")?;
    let (il, name) = rest.split_once('.')?;
    let name = name.strip_suffix(".weight")?;
    let target = Target::ALL.into_iter().find(|t| t.tensor() == name)?;
    Some((il.parse().ok()?, target))
}

fn load_pair(
    file: &GgufFile,
    base: &str,
    rows: usize,
    cols: usize,
    alpha: f32,
) -> Result<LoraPair, ModelError> {
    let h = &file.header;
    let (na, nb) = (format!("{base}.lora_a"), format!("{base}.lora_b"));
    let ta = h
        .tensor(&na)
        .ok_or_else(|| ModelError::Invalid(format!("{na} is missing")))?;
    let tb = h
        .tensor(&nb)
        .ok_or_else(|| ModelError::Invalid(format!("{nb} is missing")))?;
    let dims2 = |dims: &[u64]| match dims {
        [c, r] | [c, r, 1] | [c, r, 1, 1] => Some((*c as usize, *r as usize)),
        _ => None,
    };
    let ((a_cols, rank), (b_cols, b_rows)) = match (dims2(&ta.dims), dims2(&tb.dims)) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            return Err(ModelError::Invalid(format!(
                "{base}: lora_a {:?} and lora_b {:?} must be 2-D",
                ta.dims, tb.dims
            )))
        }
    };
    if a_cols != cols || b_rows != rows || b_cols != rank || rank == 0 {
        return Err(ModelError::Invalid(format!(
            "{base}: lora_a {:?} and lora_b {:?} do not fit the base matrix ({cols} in, {rows} out): expected lora_a [{cols}, r] and lora_b [r, {rows}]",
            ta.dims, tb.dims
        )));
    }
    let own = |t: &crate::gguf::TensorInfo, rows: usize, cols: usize| -> Result<LowRank, ModelError> {
        if t.dtype.row_bytes(cols).is_none() {
            return Err(ModelError::Invalid(format!("{}: {} rows of {cols} values are not whole blocks", t.name, t.dtype)));
        }
        let data = file.tensor_data(t);
        let rb = data.len() / rows.max(1);
        let mut f = vec![0f32; rows * cols];
        for (r, row) in f.chunks_exact_mut(cols).enumerate() {
            dequantize_row(t.dtype, &data[r * rb..(r + 1) * rb], row);
        }
        if f.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Invalid(format!("{} holds values that are not finite", t.name)));
        }
        let values = match t.dtype {
            DType::F16 => Values::F16(f.iter().map(|&x| half::f16::from_f32(x)).collect()),
            _ => Values::F32(f),
        };
        Ok(LowRank { rows, cols, values })
    };
    let factor = if alpha == 0.0 { 1.0 } else { alpha / rank as f32 };
    Ok(LoraPair { a: own(ta, rank, cols)?, bt: BlockedT::from_b(&own(tb, rows, rank)?), factor })
}

/// The adapters one sequence runs under, each with its scale (llama.cpp's `--lora-scaled`).
/// Empty: the base model.
#[derive(Clone, Default)]
pub struct LoraSet {
    pub adapters: Vec<(Arc<Adapter>, f32)>,
}

impl LoraSet {
    pub fn one(adapter: Arc<Adapter>, scale: f32) -> LoraSet {
        LoraSet {
            adapters: vec![(adapter, scale)],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.iter().all(|(_, s)| *s == 0.0)
    }

    /// A key that differs between any two sets that change the model differently (0 for the
    /// base model): the prefix cache starts each hash chain from it, so KV computed under one
    /// set of adapters is never reused under another.
    pub fn key(&self) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
        for (a, s) in &self.adapters {
            for v in [a.id, s.to_bits() as u64] {
                h = (h ^ v).wrapping_mul(0x0100_0000_01b3).rotate_left(23);
            }
        }
        h | 1
    }
}

/// Parse `FILE[:SCALE]` (the scale defaults to 1).
pub fn parse_file_scale(arg: &str) -> (String, f32) {
    if let Some((file, scale)) = arg.rsplit_once(':') {
        if let Ok(s) = scale.parse::<f32>() {
            return (file.to_string(), s);
        }
    }
    (arg.to_string(), 1.0)
}

/// A small xorshift generator for random adapters (deterministic across platforms).
struct Rng(u64);

impl Rng {
    fn normal(&mut self) -> f32 {
        let mut u = || {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        };
        let (a, b) = (u(), u());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    }
}

/// `v` (rows × cols, row-major) held in `dtype` (F16, else F32).
fn encode(v: Vec<f32>, rows: usize, cols: usize, dtype: DType) -> LowRank {
    let values = match dtype {
        DType::F16 => Values::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        _ => Values::F32(v),
    };
    LowRank { rows, cols, values }
}

impl Adapter {
    /// A random adapter of rank `rank` on `targets` of every layer of `model`, held in `dtype`
    /// (F32 or F16): A ~ N(0, 1/in), B ~ N(0, `b_std`²) (0 gives an adapter that starts as the
    /// base model, as training does). For benchmarks and as a starting point for training.
    pub fn random(model: &Model, name: &str, rank: usize, alpha: f32, targets: &[Target], dtype: DType, b_std: f32, seed: u64) -> Adapter {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let factor = if alpha == 0.0 { 1.0 } else { alpha / rank as f32 };
        let mut bytes = 0;
        let layers = (0..model.hp.n_layer)
            .map(|il| {
                let mut pairs: [Option<LoraPair>; 7] = Default::default();
                for &t in targets {
                    let m = model.layer_matrices(il)[t as usize];
                    let (rows, cols) = (m.rows, m.cols);
                    let a: Vec<f32> = (0..rank * cols).map(|_| rng.normal() / (cols as f32).sqrt()).collect();
                    let b: Vec<f32> = (0..rows * rank).map(|_| rng.normal() * b_std).collect();
                    let pair = LoraPair { a: encode(a, rank, cols, dtype), bt: BlockedT::from_b(&encode(b, rows, rank, dtype)), factor };
                    bytes += pair.bytes();
                    pairs[t as usize] = Some(pair);
                }
                pairs
            })
            .collect();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Adapter { name: name.to_string(), id, arch: model.spec().name.to_string(), alpha, layers, output: None, bytes }
    }
}

impl Adapter {
    /// The adapter as a GGUF file in llama.cpp's adapter format (what [`Adapter::load`] and
    /// llama.cpp's `--lora` read): each factor in the format it is held in.
    pub fn to_gguf(&self) -> crate::gguf::GgufWriter {
        use crate::gguf::Value;
        let mut w = crate::gguf::GgufWriter::default();
        w.kv("general.architecture", self.arch.as_str().into())
            .kv("general.type", "adapter".into())
            .kv("general.name", self.name.as_str().into())
            .kv("adapter.type", "lora".into())
            .kv("adapter.lora.alpha", Value::F32(self.alpha));
        let put = |w: &mut crate::gguf::GgufWriter, name: &str, m: &LowRank| {
            let (dtype, data) = match &m.values {
                Values::F32(v) => (DType::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                Values::F16(v) => (DType::F16, v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect()),
            };
            w.tensor(name, &[m.cols as u64, m.rows as u64], dtype, data);
        };
        let mut pairs: Vec<(String, &LoraPair)> = Vec::new();
        for (il, layer) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &layer[t as usize] {
                    pairs.push((format!("blk.{il}.{}.weight", t.tensor()), p));
                }
            }
        }
        if let Some(p) = &self.output {
            pairs.push(("output.weight".to_string(), p));
        }
        for (base, p) in pairs {
            put(&mut w, &format!("{base}.lora_a"), &p.a);
            put(&mut w, &format!("{base}.lora_b"), &p.bt.b());
        }
        w
    }
}

impl Adapter {
    /// An adapter from trained factors: per layer and [`Target`], A [rank × in] and B
    /// [out × rank] in f32, checked against `model`'s shapes.
    pub fn from_factors(model: &Model, name: &str, alpha: f32, rank: usize, layers: Vec<[Option<(Vec<f32>, Vec<f32>)>; 7]>) -> Result<Adapter, ModelError> {
        if layers.len() != model.hp.n_layer || rank == 0 {
            return Err(ModelError::Invalid(format!("{} layers of rank {rank} for a model of {} layers", layers.len(), model.hp.n_layer)));
        }
        let factor = if alpha == 0.0 { 1.0 } else { alpha / rank as f32 };
        let mut bytes = 0;
        let mut out = Vec::with_capacity(layers.len());
        for (il, layer) in layers.into_iter().enumerate() {
            let mut pairs: [Option<LoraPair>; 7] = Default::default();
            for (t, f) in layer.into_iter().enumerate() {
                let Some((a, b)) = f else { continue };
                let m = model.layer_matrices(il)[t];
                if a.len() != rank * m.cols || b.len() != m.rows * rank {
                    return Err(ModelError::Invalid(format!("layer {il} {}: factors of {} and {} values do not fit [{rank} × {}] and [{} × {rank}]", Target::ALL[t].tensor(), a.len(), b.len(), m.cols, m.rows)));
                }
                let pair = LoraPair { a: encode(a, rank, m.cols, DType::F32), bt: BlockedT::from_b(&encode(b, m.rows, rank, DType::F32)), factor };
                bytes += pair.bytes();
                pairs[t] = Some(pair);
            }
            out.push(pairs);
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Adapter { name: name.to_string(), id, arch: model.spec().name.to_string(), alpha, layers: out, output: None, bytes })
    }
}
