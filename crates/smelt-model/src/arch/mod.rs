//! Model architectures. Each is described by data ([`ArchSpec`]: which tensors it has, its
//! activation and RoPE style) plus a small file whose `layer` function composes the shared blocks
//! in [`blocks`]. Quantized and float weights go through the same code ([`Linear`]).

pub mod blocks;
mod gemma3;
mod llama;
mod qwen2;
mod qwen3;
mod weights;

pub use blocks::{BatchToken, Workspace};
pub use weights::{LayerWeights, Linear};

use crate::gguf::{GgufError, GgufFile, Header};
use crate::tokenizer::{Tokenizer, TokenizerError};
use smelt_kernels::ops::{Rope, RopeStyle, Yarn};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("unsupported architecture {0:?} (smelt supports: llama, qwen2, qwen3, gemma3)")]
    Architecture(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Batch(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: silu(gate) * up.
    Silu,
    /// GeGLU with the tanh approximation of GELU.
    GeluTanh,
}

/// What distinguishes one architecture's tensors and math from another's.
#[derive(Clone, Copy, Debug)]
pub struct ArchSpec {
    pub name: &'static str,
    /// Q, K and V projections carry biases.
    pub qkv_bias: bool,
    /// Per-head RMS norms of Q and K before RoPE.
    pub qk_norm: bool,
    /// Norms applied to the attention and FFN outputs before the residual add.
    pub post_norms: bool,
    pub activation: Activation,
    pub rope_style: RopeStyle,
    /// Token embeddings are multiplied by sqrt(n_embd).
    pub scale_embeddings: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn from_name(name: &str) -> Result<Arch, ModelError> {
        match name {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "qwen3" => Ok(Arch::Qwen3),
            "gemma3" => Ok(Arch::Gemma3),
            other => Err(ModelError::Architecture(other.to_string())),
        }
    }

    pub fn spec(self) -> &'static ArchSpec {
        match self {
            Arch::Llama => &llama::SPEC,
            Arch::Qwen2 => &qwen2::SPEC,
            Arch::Qwen3 => &qwen3::SPEC,
            Arch::Gemma3 => &gemma3::SPEC,
        }
    }

    fn layer(self) -> fn(&mut blocks::Block, &LayerWeights, usize) {
        match self {
            Arch::Llama => llama::layer,
            Arch::Qwen2 => qwen2::layer,
            Arch::Qwen3 => qwen3::layer,
            Arch::Gemma3 => gemma3::layer,
        }
    }
}

/// Hyperparameters, read from `{arch}.*` metadata.
#[derive(Clone, Debug)]
pub struct Hparams {
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub norm_eps: f32,
    /// Multiplier of q·k before the softmax.
    pub attn_scale: f32,
    /// Per layer: RoPE parameters and sliding window (None = full attention).
    pub rope: Vec<Rope>,
    pub window: Vec<Option<usize>>,
}

fn key(arch: &str, k: &str) -> String {
    format!("{arch}.{k}")
}

/// Apply the RoPE scaling the file declares, as llama.cpp reads it: `rope.scaling.type` none,
/// linear or yarn, with `rope.scaling.factor`, `rope.scaling.attn_factor` and, for YaRN,
/// `rope.scaling.original_context_length` (default: the training context) and
/// `rope.scaling.yarn_log_multiplier`.
fn rope_scaling(h: &Header, a: &str, mut rope: Rope, n_ctx_train: usize) -> Result<Rope, ModelError> {
    let scaling = h.get_str(&key(a, "rope.scaling.type"))?.unwrap_or("none");
    let factor = h.get_f32(&key(a, "rope.scaling.factor"))?.unwrap_or(0.0);
    let attn = h.get_f32(&key(a, "rope.scaling.attn_factor"))?.unwrap_or(1.0);
    if !(attn.is_finite() && attn > 0.0) || !(factor.is_finite() && factor >= 0.0) {
        return Err(ModelError::Invalid(format!("invalid RoPE scaling: factor {factor}, attention factor {attn}")));
    }
    // A factor of 0 (or none) means no scaling, as in llama.cpp.
    let freq_scale = if factor == 0.0 { 1.0 } else { 1.0 / factor };
    rope.attn_factor = attn;
    match scaling {
        "none" => {}
        "linear" => rope.freq_scale = freq_scale,
        "yarn" => {
            rope.freq_scale = freq_scale;
            let orig = h.get_u64(&key(a, "rope.scaling.original_context_length"))?.map_or(n_ctx_train, |v| v as usize);
            if orig == 0 {
                return Err(ModelError::Invalid("YaRN RoPE scaling with an original context length of 0".into()));
            }
            rope.yarn = Some(Yarn::new(rope.n_rot, orig, rope.base, 1.0));
            // llama.cpp's attention factor for YaRN: its `rope_yarn` multiplies by
            // 1 + 0.1 ln(factor) itself, so the factor here cancels that unless the file gives
            // a log multiplier (mscale_all_dims, with mscale 1).
            let mscale = |m: f32| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
            let log_mul = h.get_f32(&key(a, "rope.scaling.yarn_log_multiplier"))?.unwrap_or(0.0);
            let yarn_attn = if log_mul != 0.0 { mscale(1.0) / mscale(log_mul) } else { mscale(1.0) };
            rope.attn_factor = attn * yarn_attn / (1.0 + 0.1 * (1.0 / freq_scale).ln());
        }
        other => return Err(ModelError::Invalid(format!("unsupported RoPE scaling {other:?} (factor {factor})"))),
    }
    Ok(rope)
}

impl Hparams {
    fn read(h: &Header, arch: Arch, n_vocab: usize) -> Result<Hparams, ModelError> {
        let a = arch.spec().name;
        let req = |k: &str| -> Result<usize, ModelError> {
            let full = key(a, k);
            Ok(h.require(&full, h.get_u64(&full))? as usize)
        };
        let n_embd = req("embedding_length")?;
        let n_layer = req("block_count")?;
        let n_head = req("attention.head_count")?;
        let n_ff = req("feed_forward_length")?;
        let n_head_kv = h.get_u64(&key(a, "attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 || n_layer == 0 || n_embd == 0 || n_layer > 1024 {
            return Err(ModelError::Invalid(format!(
                "invalid shape: {n_layer} layers, {n_head} heads, {n_head_kv} KV heads, embedding {n_embd}"
            )));
        }
        let head_dim = h.get_u64(&key(a, "attention.key_length"))?.map(|v| v as usize).unwrap_or(n_embd / n_head);
        if let Some(vl) = h.get_u64(&key(a, "attention.value_length"))? {
            if vl as usize != head_dim {
                return Err(ModelError::Invalid(format!("value length {vl} differs from key length {head_dim}")));
            }
        }
        let norm_eps = h.get_f32(&key(a, "attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5);
        let n_ctx_train = h.get_u64(&key(a, "context_length"))?.map(|v| v as usize).unwrap_or(4096);
        let n_rot = h.get_u64(&key(a, "rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 || head_dim == 0 || head_dim > 1024 {
            return Err(ModelError::Invalid(format!("invalid head size {head_dim} / rotary dims {n_rot}")));
        }
        let base = h.get_f32(&key(a, "rope.freq_base"))?.unwrap_or(10000.0);
        let rope = Rope { style: arch.spec().rope_style, n_rot, base, freq_scale: 1.0, freq_factors: None, attn_factor: 1.0, yarn: None };
        let rope = rope_scaling(h, a, rope, n_ctx_train)?;
        let mut hp = Hparams {
            n_vocab,
            n_ctx_train,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            norm_eps,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            rope: vec![rope; n_layer],
            window: vec![None; n_layer],
        };
        if arch == Arch::Gemma3 {
            gemma3::hparams(h, &mut hp)?;
        }
        Ok(hp)
    }
}

/// A loaded model: hyperparameters, tokenizer, chat template and memory-mapped weights.
pub struct Model {
    pub arch: Arch,
    pub name: String,
    pub hp: Hparams,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<String>,
    pub file: Arc<GgufFile>,
    token_embd: Linear,
    output_norm: Vec<f32>,
    output: Linear,
    layers: Vec<LayerWeights>,
}

/// Everything of a model that comes from its tensors (and the hyperparameters that shape them).
struct Weights {
    arch: Arch,
    hp: Hparams,
    token_embd: Linear,
    output_norm: Vec<f32>,
    output: Linear,
    layers: Vec<LayerWeights>,
}

impl Weights {
    fn load(file: &Arc<GgufFile>, n_vocab: usize, regroup: bool) -> Result<Weights, ModelError> {
        let h = &file.header;
        let arch_name = h.require("general.architecture", h.get_str("general.architecture"))?;
        let arch = Arch::from_name(arch_name)?;
        let mut hp = Hparams::read(h, arch, n_vocab)?;
        let spec = arch.spec();
        let token_embd = Linear::load(file, "token_embd.weight", hp.n_embd, None)?;
        if token_embd.rows != hp.n_vocab {
            return Err(ModelError::Invalid(format!(
                "token_embd.weight has {} rows but the vocabulary has {} tokens",
                token_embd.rows, hp.n_vocab
            )));
        }
        let tied = h.tensor("output.weight").is_none();
        let mut output = if tied { token_embd.clone() } else { Linear::load(file, "output.weight", hp.n_embd, Some(hp.n_vocab))? };
        let output_norm = weights::vector(file, "output_norm.weight", hp.n_embd)?;
        if let Some(t) = h.tensor("rope_freqs.weight") {
            let half = hp.rope[0].n_rot / 2;
            let f = weights::vector(file, &t.name, half)?;
            for r in &mut hp.rope {
                r.freq_factors = Some(f.clone());
            }
        }
        let mut layers = (0..hp.n_layer).map(|il| LayerWeights::load(file, il, &hp, spec)).collect::<Result<Vec<_>, _>>()?;
        if regroup {
            weights::regroup(layers.iter_mut().flat_map(|l| l.matrices_mut()).chain([&mut output]).collect());
        }
        // A tied embedding shares the output projection's (possibly regrouped) bytes; an untied
        // one is only read a row at a time and stays in the file.
        let token_embd = if tied { output.clone() } else { token_embd };
        Ok(Weights { arch, hp, token_embd, output_norm, output, layers })
    }
}

/// Move the `tokenizer.ggml.*` entries out of a header's metadata (the small ones are copied:
/// they stay readable in the header).
fn take_tokenizer_entries(metadata: &mut Vec<(String, crate::gguf::Value)>) -> Vec<(String, crate::gguf::Value)> {
    let big = |k: &str| matches!(k, "tokenizer.ggml.tokens" | "tokenizer.ggml.scores" | "tokenizer.ggml.token_type" | "tokenizer.ggml.merges");
    let mut out: Vec<_> = metadata.iter().filter(|(k, _)| k.starts_with("tokenizer.ggml.") && !big(k)).cloned().collect();
    let (moved, kept): (Vec<_>, Vec<_>) = std::mem::take(metadata).into_iter().partition(|(k, _)| big(k));
    *metadata = kept;
    out.extend(moved);
    out
}

impl Model {
    pub fn load(path: &Path) -> Result<Model, ModelError> {
        Self::from_file(GgufFile::open(path)?)
    }

    /// [`Model::load`] leaving every matrix in the file's layout (no grouped copies: products
    /// give bitwise the same results, decoding is slower). For comparisons.
    pub fn load_in_file_layout(path: &Path) -> Result<Model, ModelError> {
        Self::from_file_with(GgufFile::open(path)?, false)
    }

    pub fn from_file(file: GgufFile) -> Result<Model, ModelError> {
        Self::from_file_with(file, true)
    }

    fn from_file_with(mut file: GgufFile, regroup: bool) -> Result<Model, ModelError> {
        // The tokenizer is built on another thread while the weights load and are regrouped
        // (each takes a few hundred ms for a 150k-token vocabulary). Its vocabulary entries move
        // out of the header for that, and are dropped once it is built (tens of MB for
        // 262k-token vocabularies).
        let vocab = Header {
            version: file.header.version,
            alignment: file.header.alignment,
            metadata: take_tokenizer_entries(&mut file.header.metadata),
            tensors: Vec::new(),
            data_offset: file.header.data_offset,
        };
        let n_vocab = vocab.get_array("tokenizer.ggml.tokens").ok().flatten().map_or(0, |a| a.len());
        let file = Arc::new(file);
        let (tokenizer, weights) = std::thread::scope(|s| {
            let tokenizer = s.spawn(|| Tokenizer::from_gguf(&vocab));
            let weights = Weights::load(&file, n_vocab, regroup);
            (tokenizer.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), weights)
        });
        // The tokenizer's errors first, as when it was built before the weights.
        let tokenizer = tokenizer?;
        let Weights { arch, hp, token_embd, output_norm, output, layers } = weights?;
        let h = &file.header;
        let chat_template = h.get_str("tokenizer.chat_template")?.map(String::from);
        let name = match h.get_str("general.name")? {
            Some(n) => n.to_string(),
            None => h.get_str("general.architecture")?.unwrap_or_default().to_string(),
        };
        Ok(Model { arch, name, hp, tokenizer, chat_template, file, token_embd, output_norm, output, layers })
    }

    pub fn spec(&self) -> &'static ArchSpec {
        self.arch.spec()
    }

    /// The chat format a model without its own template gets (see [`Model::chat_template`]);
    /// None when it has one.
    pub fn fallback_chat_format(&self) -> Option<&'static str> {
        match (&self.chat_template, self.arch) {
            (Some(_), _) => None,
            (None, Arch::Gemma3) => Some("Gemma's turn format"),
            (None, _) => Some("ChatML"),
        }
    }

    /// The file's quantization as llama.cpp names it (`Q4_K_M`, from `general.file_type`), or,
    /// without that key, the format holding most of the weights' bytes.
    pub fn quantization(&self) -> String {
        const NAMES: [(u64, &str); 35] = [
            (0, "F32"), (1, "F16"), (2, "Q4_0"), (3, "Q4_1"), (7, "Q8_0"), (8, "Q5_0"), (9, "Q5_1"), (10, "Q2_K"),
            (11, "Q3_K_S"), (12, "Q3_K_M"), (13, "Q3_K_L"), (14, "Q4_K_S"), (15, "Q4_K_M"), (16, "Q5_K_S"), (17, "Q5_K_M"),
            (18, "Q6_K"), (19, "IQ2_XXS"), (20, "IQ2_XS"), (21, "Q2_K_S"), (22, "IQ3_XS"), (23, "IQ3_XXS"), (24, "IQ1_S"),
            (25, "IQ4_NL"), (26, "IQ3_S"), (27, "IQ3_M"), (28, "IQ2_S"), (29, "IQ2_M"), (30, "IQ4_XS"), (31, "IQ1_M"),
            (32, "BF16"), (36, "TQ1_0"), (37, "TQ2_0"), (38, "MXFP4"), (4, "Q4_1_F16"), (6, "Q4_3"),
        ];
        let h = &self.file.header;
        // Bit 10 (1024) marks files whose type was guessed by the converter.
        if let Some(name) = h.get_u64("general.file_type").ok().flatten().and_then(|t| NAMES.iter().find(|(k, _)| *k == t & !1024)).map(|(_, n)| n) {
            return name.to_string();
        }
        let mut bytes: Vec<(smelt_kernels::formats::DType, u64)> = Vec::new();
        for t in &h.tensors {
            match bytes.iter_mut().find(|(d, _)| *d == t.dtype) {
                Some((_, b)) => *b += t.n_bytes,
                None => bytes.push((t.dtype, t.n_bytes)),
            }
        }
        bytes.into_iter().max_by_key(|(_, b)| *b).map(|(d, _)| d.name().to_string()).unwrap_or_default()
    }

    /// A KV cache for one sequence of up to `n_ctx` positions, fed at most `max_batch` tokens per pass.
    pub fn new_cache(&self, n_ctx: usize, max_batch: usize) -> crate::kv::KvCache {
        crate::kv::KvCache::new(&self.hp.window, self.kv_row(), n_ctx, max_batch, Default::default())
    }

    /// [`Model::new_cache`] storing keys and values in `types`; an error when this model's head
    /// size does not suit them.
    pub fn new_cache_typed(&self, n_ctx: usize, max_batch: usize, types: crate::kv::KvTypes) -> Result<crate::kv::KvCache, ModelError> {
        self.check_kv_types(types)?;
        Ok(crate::kv::KvCache::new(&self.hp.window, self.kv_row(), n_ctx, max_batch, types))
    }

    /// Whether keys and values of this model can be cached in `types`.
    pub fn check_kv_types(&self, types: crate::kv::KvTypes) -> Result<(), ModelError> {
        types.check_head_dim(self.hp.head_dim).map_err(ModelError::Invalid)
    }

    /// Values one position stores per layer, for keys and for values alike.
    pub fn kv_row(&self) -> usize {
        self.hp.n_head_kv * self.hp.head_dim
    }

    /// Bytes of KV cache one position takes across all layers.
    pub fn kv_bytes_per_position(&self, types: crate::kv::KvTypes) -> usize {
        self.hp.n_layer * types.bytes_per_row(self.kv_row())
    }

    /// The model's chat template, or a fallback for models without one (Gemma's turn format for
    /// Gemma models, ChatML otherwise).
    pub fn chat_template(&self) -> Result<crate::chat::ChatTemplate, crate::chat::ChatError> {
        let text = |id: Option<u32>| id.and_then(|i| self.tokenizer.token_text(i)).unwrap_or("").to_string();
        let source = match (&self.chat_template, self.arch) {
            (Some(s), _) => s.as_str(),
            (None, Arch::Gemma3) => crate::chat::GEMMA,
            (None, _) => crate::chat::CHATML,
        };
        crate::chat::ChatTemplate::new(source, &text(self.tokenizer.bos), &text(self.tokenizer.eos))
    }

    /// (rows, cols) of the matrix an adapter tensor's base name refers to: a layer's projection
    /// (`blk.N.attn_q.weight`, … in [`crate::lora::Target`] order) or `output.weight`.
    pub fn base_shape(&self, name: &str) -> Option<(usize, usize)> {
        if name == "output.weight" {
            return Some((self.output.rows, self.output.cols));
        }
        let (il, target) = crate::lora::parse_target(name)?;
        let m = self.layers.get(il)?.matrices()[target as usize];
        Some((m.rows, m.cols))
    }

    /// Layer `il`'s weights (for training, which runs its own forward and backward passes).
    pub fn layer(&self, il: usize) -> &LayerWeights {
        &self.layers[il]
    }

    /// The token embedding matrix.
    pub fn token_embd(&self) -> &Linear {
        &self.token_embd
    }

    /// The final norm's weights.
    pub fn output_norm(&self) -> &[f32] {
        &self.output_norm
    }

    /// A layer's weight matrices (wq, wk, wv, wo, gate, up, down: [`crate::lora::Target`] order).
    pub fn layer_matrices(&self, il: usize) -> [&Linear; 7] {
        self.layers[il].matrices()
    }

    /// The output projection (for measurements of its product alone).
    pub fn output(&self) -> &Linear {
        &self.output
    }

    /// Bytes of the matrices held in a grouped layout (see [`Linear::regroup`]).
    pub fn regrouped_bytes(&self) -> usize {
        let layers = self.layers.iter().flat_map(|l| l.matrices());
        layers.chain([&self.output]).filter(|m| m.is_regrouped()).map(|m| m.bytes()).sum()
    }

    /// Bytes of weights read per generated token (every matrix once, plus one embedding row).
    pub fn weight_bytes_per_token(&self) -> usize {
        let mut total: usize = self.layers.iter().map(|l| l.matrix_bytes()).sum();
        total += self.output.bytes();
        total += self.token_embd.bytes() / self.hp.n_vocab.max(1);
        total
    }
}
