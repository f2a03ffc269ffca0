//! Qwen2 / Qwen2.5: the Llama block with biases on Q, K, V and NeoX-style RoPE.

use super::blocks::Block;
use super::{Activation, ArchSpec, LayerWeights};
use smelt_kernels::ops::RopeStyle;

pub const SPEC: ArchSpec = ArchSpec {
    name: "qwen2",
    qkv_bias: true,
    qk_norm: false,
    post_norms: false,
    activation: Activation::Silu,
    rope_style: RopeStyle::Neox,
    scale_embeddings: false,
};

pub fn layer(b: &mut Block, w: &LayerWeights, il: usize) {
    b.pre_norm_layer(w, il, SPEC.activation);
}
