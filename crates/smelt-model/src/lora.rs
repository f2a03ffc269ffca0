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
use smelt_kernels::ops::Matrix;
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

/// A matrix held in memory in one of the kernels' formats.
#[derive(Clone)]
pub struct OwnedMatrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

impl OwnedMatrix {
    pub fn matrix(&self) -> Matrix<'_> {
        Matrix::new(self.dtype, self.rows, self.cols, &self.data)
    }

    /// The values as f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let rb = self.data.len() / self.rows.max(1);
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            dequantize_row(self.dtype, &self.data[r * rb..(r + 1) * rb], row);
        }
        out
    }
}

/// One adapted matrix: `delta = factor · B · A`, A [rank × in], B [out × rank].
#[derive(Clone)]
pub struct LoraPair {
    pub a: OwnedMatrix,
    pub b: OwnedMatrix,
    /// alpha / rank, or 1 when the file's alpha is 0.
    pub factor: f32,
}

impl LoraPair {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

/// A loaded adapter: its pairs by layer and projection, and the output projection's.
pub struct Adapter {
    pub name: String,
    /// Distinguishes this load from every other in the process (the prefix cache keys KV by it).
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
            bytes += pair.a.data.len() + pair.b.data.len();
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
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
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
    let own = |t: &crate::gguf::TensorInfo,
               rows: usize,
               cols: usize|
     -> Result<OwnedMatrix, ModelError> {
        if t.dtype.row_bytes(cols).is_none() {
            return Err(ModelError::Invalid(format!(
                "{}: {} rows of {cols} values are not whole blocks",
                t.name, t.dtype
            )));
        }
        let data = file.tensor_data(t).to_vec();
        let m = OwnedMatrix {
            dtype: t.dtype,
            rows,
            cols,
            data,
        };
        if m.to_f32().iter().any(|v| !v.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "{} holds values that are not finite",
                t.name
            )));
        }
        Ok(m)
    };
    let factor = if alpha == 0.0 {
        1.0
    } else {
        alpha / rank as f32
    };
    Ok(LoraPair {
        a: own(ta, rank, cols)?,
        b: own(tb, rows, rank)?,
        factor,
    })
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
