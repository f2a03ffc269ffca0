//! smelt-model: what a model is.
//!
//! - [`gguf`]: the file format (memory-mapped, validated).
//! - [`tokenizer`]: SentencePiece-style and byte-level BPE tokenizers built from GGUF metadata.
//! - [`chat`]: the model's own Jinja chat template.
//! - [`arch`]: architectures (one small file each) built from shared blocks, and their weights.
//! - [`kv`]: the per-sequence KV cache.
//! - [`lora`]: LoRA adapters (GGUF), applied per sequence at every linear layer.

pub mod gguf;
pub mod tokenizer;
pub mod arch;
pub mod chat;
pub mod kv;
pub mod lora;
pub mod merge;
pub mod synthetic;
