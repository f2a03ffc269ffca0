//! Llama 2/3, Mistral, SmolLM, TinyLlama: pre-norm blocks, SwiGLU, interleaved RoPE.

use super::blocks::Block;
use super::{Activation, ArchSpec, LayerWeights};
use smelt_kernels::ops::RopeStyle;

pub const SPEC: ArchSpec = ArchSpec {
    name: "llama",
    qkv_bias: false,
    qk_norm: false,
    post_norms: false,
    activation: Activation::Silu,
    rope_style: RopeStyle::Interleaved,
    scale_embeddings: false,
};

pub fn layer(b: &mut Block, w: &LayerWeights, il: usize) {
    b.pre_norm_layer(w, il, SPEC.activation);
}
