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
    b.norm_input(&w.attn_norm);
    b.attention(w, il);
    b.add_residual();
    b.norm_input(&w.ffn_norm);
    b.ffn(w, SPEC.activation);
    b.add_residual();
}
