//! Small random-weight models built in memory, for tests and fuzzing: every architecture's code
//! path (sliding windows included) can be exercised in milliseconds without downloading weights.

use crate::gguf::{GgufWriter, Value, ValueType};
use crate::lora::Target;
use smelt_kernels::formats::DType;

/// Shape of a synthetic model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub arch: &'static str,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    /// Gemma 3 only: sliding window and pattern.
    pub window: usize,
    pub swa_pattern: usize,
    pub seed: u64,
    /// Store every matrix in this format instead of the usual mix (F32 gives a model whose
    /// weights can be changed exactly, as references for adapters do).
    pub matrix_dtype: Option<DType>,
}

impl TinySpec {
    pub fn new(arch: &'static str) -> TinySpec {
        TinySpec { arch, n_embd: 128, n_head: 4, n_head_kv: 2, head_dim: 32, n_ff: 256, n_layer: 3, window: 6, swa_pattern: 2, seed: 1, matrix_dtype: None }
    }
}

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

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Tokens in a synthetic model's vocabulary.
pub const TINY_VOCAB: usize = 300;

/// An SPM vocabulary: control tokens, 256 byte tokens and some words — [`TINY_VOCAB`] tokens.
fn vocab(w: &mut GgufWriter) -> usize {
    let mut tokens: Vec<String> = vec!["<pad>".into(), "<eos>".into(), "<bos>".into(), "<unk>".into()];
    let mut types = vec![3i32, 3, 3, 2];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for word in ["▁the", "▁a", "▁model", "▁token", "e", "t", "a", "o", "n", "▁", "s", "r", "h", "i", "l", "d", "▁is", "▁of", "<end_of_turn>", "<start_of_turn>"] {
        tokens.push(word.into());
        types.push(if word.starts_with('<') { 3 } else { 1 });
    }
    while tokens.len() < TINY_VOCAB {
        let i = tokens.len();
        tokens.push(format!("▁w{i}"));
        types.push(1);
    }
    let n = tokens.len();
    let scores: Vec<Value> = (0..n).map(|i| Value::F32(-(i as f32))).collect();
    w.kv("tokenizer.ggml.model", "llama".into())
        .kv("tokenizer.ggml.tokens", Value::strings(&tokens))
        .kv("tokenizer.ggml.scores", Value::Array(ValueType::F32, scores))
        .kv("tokenizer.ggml.token_type", Value::Array(ValueType::I32, types.into_iter().map(Value::I32).collect()))
        .kv("tokenizer.ggml.bos_token_id", Value::U32(2))
        .kv("tokenizer.ggml.eos_token_id", Value::U32(1))
        .kv("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    n
}

/// A random-weight model of the given spec: F32 norms; Q8_0 embeddings; Q4_0, F16, F32 and
/// Q8_0 attention matrices; Q5_0/Q8_0 or Q4_K/Q5_K/Q6_K feed-forward matrices.
pub fn tiny_model(s: &TinySpec) -> GgufWriter {
    let mut w = GgufWriter::default();
    let a = s.arch;
    w.kv("general.architecture", a.into()).kv("general.name", format!("tiny-{a}").as_str().into());
    let n_vocab = vocab(&mut w);
    let k = |name: &str| format!("{a}.{name}");
    w.kv(&k("context_length"), Value::U32(512))
        .kv(&k("embedding_length"), Value::U32(s.n_embd as u32))
        .kv(&k("block_count"), Value::U32(s.n_layer as u32))
        .kv(&k("feed_forward_length"), Value::U32(s.n_ff as u32))
        .kv(&k("attention.head_count"), Value::U32(s.n_head as u32))
        .kv(&k("attention.head_count_kv"), Value::U32(s.n_head_kv as u32))
        .kv(&k("attention.key_length"), Value::U32(s.head_dim as u32))
        .kv(&k("attention.value_length"), Value::U32(s.head_dim as u32))
        .kv(&k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6))
        .kv(&k("rope.freq_base"), Value::F32(10000.0));
    if a == "gemma3" {
        w.kv(&k("attention.sliding_window"), Value::U32(s.window as u32)).kv(&k("attention.sliding_window_pattern"), Value::U32(s.swa_pattern as u32));
    }
    let mut rng = Rng(s.seed.max(1));
    let mat = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize, dtype: DType, rng: &mut Rng| {
        let dtype = s.matrix_dtype.unwrap_or(dtype);
        let scale = 1.0 / (cols as f32).sqrt();
        let v: Vec<f32> = (0..cols * rows).map(|_| rng.normal() * scale).collect();
        let data = match dtype {
            DType::F32 => f32_bytes(&v),
            DType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            DType::Q8_0 => {
                let mut out = vec![0u8; dtype.row_bytes(cols).unwrap() * rows];
                smelt_kernels::formats::quantize_row(DType::Q8_0, &v, &mut out);
                out
            }
            // Other quantized formats: random blocks with small scales (values need not be
            // meaningful to exercise the kernels; the norms keep activations bounded).
            _ => {
                let bb = dtype.block_bytes();
                let mut out: Vec<u8> = (0..dtype.row_bytes(cols).unwrap() * rows).map(|i| (v[i % v.len()].to_bits() >> 7) as u8).collect();
                for (bi, blk) in out.chunks_exact_mut(bb).enumerate() {
                    for &off in smelt_kernels::formats::scale_offsets(dtype) {
                        let d = scale * 0.1 * (1.0 + (bi % 7) as f32 / 7.0);
                        blk[off..off + 2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
                    }
                }
                out
            }
        };
        w.tensor(name, &[cols as u64, rows as u64], dtype, data);
    };
    let norm = |w: &mut GgufWriter, name: &str, n: usize, rng: &mut Rng| {
        let v: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect();
        w.tensor(name, &[n as u64], DType::F32, f32_bytes(&v));
    };
    let (e, d) = (s.n_embd, s.head_dim);
    mat(&mut w, "token_embd.weight", e, n_vocab, DType::Q8_0, &mut rng);
    norm(&mut w, "output_norm.weight", e, &mut rng);
    for il in 0..s.n_layer {
        let n = |t: &str| format!("blk.{il}.{t}");
        norm(&mut w, &n("attn_norm.weight"), e, &mut rng);
        norm(&mut w, &n("ffn_norm.weight"), e, &mut rng);
        mat(&mut w, &n("attn_q.weight"), e, s.n_head * d, DType::Q4_0, &mut rng);
        mat(&mut w, &n("attn_k.weight"), e, s.n_head_kv * d, DType::F16, &mut rng);
        mat(&mut w, &n("attn_v.weight"), e, s.n_head_kv * d, DType::F32, &mut rng);
        mat(&mut w, &n("attn_output.weight"), s.n_head * d, e, DType::Q8_0, &mut rng);
        let (gate_t, up_t) = if e % 256 == 0 { (DType::Q4_K, DType::Q5_K) } else { (DType::Q5_0, DType::Q8_0) };
        mat(&mut w, &n("ffn_gate.weight"), e, s.n_ff, gate_t, &mut rng);
        mat(&mut w, &n("ffn_up.weight"), e, s.n_ff, up_t, &mut rng);
        let down_t = if s.n_ff % 256 == 0 { DType::Q6_K } else { DType::Q8_0 };
        mat(&mut w, &n("ffn_down.weight"), s.n_ff, e, down_t, &mut rng);
        if a == "qwen2" {
            for (t, len) in [("attn_q.bias", s.n_head * d), ("attn_k.bias", s.n_head_kv * d), ("attn_v.bias", s.n_head_kv * d)] {
                let v: Vec<f32> = (0..len).map(|_| 0.1 * rng.normal()).collect();
                w.tensor(&n(t), &[len as u64], DType::F32, f32_bytes(&v));
            }
        }
        if a == "qwen3" || a == "gemma3" {
            norm(&mut w, &n("attn_q_norm.weight"), d, &mut rng);
            norm(&mut w, &n("attn_k_norm.weight"), d, &mut rng);
        }
        if a == "gemma3" {
            norm(&mut w, &n("post_attention_norm.weight"), e, &mut rng);
            norm(&mut w, &n("post_ffw_norm.weight"), e, &mut rng);
        }
    }
    w
}

/// A random LoRA adapter for the synthetic model of `s`: every layer's `targets` (and the output
/// projection when `output`), rank `rank`, `adapter.lora.alpha` = `alpha`, A and B stored in
/// `dtype` (B in F32 where the rank is not whole blocks of it). B is not zero (as it would be
/// before training) so the adapter changes the logits.
pub fn tiny_adapter(s: &TinySpec, rank: usize, alpha: f32, dtype: DType, targets: &[Target], output: bool, seed: u64) -> GgufWriter {
    let mut w = GgufWriter::default();
    w.kv("general.architecture", s.arch.into())
        .kv("general.type", "adapter".into())
        .kv("general.name", "tiny-adapter".into())
        .kv("adapter.type", "lora".into())
        .kv("adapter.lora.alpha", Value::F32(alpha));
    let mut rng = Rng(seed.max(1) * 0x9e37_79b9 + 7);
    let encode = |v: &[f32], cols: usize, dtype: DType| -> (DType, Vec<u8>) {
        let dtype = if dtype.row_bytes(cols).is_some() { dtype } else { DType::F32 };
        let data = match dtype {
            DType::F32 => f32_bytes(v),
            DType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            _ => {
                let rb = dtype.row_bytes(cols).unwrap();
                let mut out = vec![0u8; rb * (v.len() / cols)];
                for (src, dst) in v.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
                    smelt_kernels::formats::quantize_row(dtype, src, dst);
                }
                out
            }
        };
        (dtype, data)
    };
    let mut pair = |w: &mut GgufWriter, base: &str, cols: usize, rows: usize| {
        let a: Vec<f32> = (0..rank * cols).map(|_| rng.normal() / (cols as f32).sqrt()).collect();
        let b: Vec<f32> = (0..rows * rank).map(|_| rng.normal() * 0.5 / (rank as f32).sqrt()).collect();
        let (ta, da) = encode(&a, cols, dtype);
        let (tb, db) = encode(&b, rank, dtype);
        w.tensor(&format!("{base}.lora_a"), &[cols as u64, rank as u64], ta, da);
        w.tensor(&format!("{base}.lora_b"), &[rank as u64, rows as u64], tb, db);
    };
    let (e, d) = (s.n_embd, s.head_dim);
    for il in 0..s.n_layer {
        for &t in targets {
            let (cols, rows) = match t {
                Target::Q => (e, s.n_head * d),
                Target::K | Target::V => (e, s.n_head_kv * d),
                Target::O => (s.n_head * d, e),
                Target::Gate | Target::Up => (e, s.n_ff),
                Target::Down => (s.n_ff, e),
            };
            pair(&mut w, &format!("blk.{il}.{}.weight", t.tensor()), cols, rows);
        }
    }
    if output {
        pair(&mut w, "output.weight", e, TINY_VOCAB);
    }
    w
}
