//! smelt-train: LoRA fine-tuning on the CPU, with the base weights frozen in their quantized
//! formats (QLoRA-style: no full-precision copy of the model).
//!
//! - [`real`]: the number type (f32 for training, f64 for gradient checks) and the frozen
//!   weights' products in both directions.
//! - [`ops`]: each operation of a layer with its backward pass.
//! - [`model`]: the forward pass over training sequences and the backward pass to the LoRA
//!   factors, for every architecture.
//! - [`data`]: JSONL datasets (chat or prompt/completion) as training examples.
//! - [`train`]: the loop — AdamW, the data plan, validation, checkpoints.
//! - [`jobs`]: fine-tuning jobs and their files on disk, run on a background thread (what
//!   the server's OpenAI fine-tuning API serves).

pub mod model;
pub mod ops;
pub mod real;
pub mod data;
pub mod train;
pub mod jobs;
