//! Qwen3 (dense): no Q/K/V biases; instead each head of Q and K is RMS-normed before RoPE.

use super::blocks::Block;
use super::{Activation, ArchSpec, LayerWeights};
use smelt_kernels::ops::RopeStyle;

pub const SPEC: ArchSpec = ArchSpec {
    name: "qwen3",
    qkv_bias: false,
    qk_norm: true,
    post_norms: false,
    activation: Activation::Silu,
    rope_style: RopeStyle::Neox,
    scale_embeddings: false,
};

pub fn layer(b: &mut Block, w: &LayerWeights, il: usize) {
    b.pre_norm_layer(w, il, SPEC.activation);
}
