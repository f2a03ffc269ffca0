//! Gemma 3: scaled embeddings, per-head Q/K norms, norms both before and after attention and
//! FFN, GeGLU, and interleaved sliding-window layers (5 local : 1 global by default) whose RoPE
//! has its own base frequency.

use super::blocks::Block;
use super::{Activation, ArchSpec, Hparams, LayerWeights, ModelError};
use crate::gguf::Header;
use smelt_kernels::ops::RopeStyle;

pub const SPEC: ArchSpec = ArchSpec {
    name: "gemma3",
    qkv_bias: false,
    qk_norm: true,
    post_norms: true,
    activation: Activation::GeluTanh,
    rope_style: RopeStyle::Neox,
    scale_embeddings: true,
};

/// Every `pattern`-th layer is global; the rest use the sliding window.
const DEFAULT_SWA_PATTERN: usize = 6;
/// RoPE base of the sliding-window layers unless the file says otherwise.
const DEFAULT_SWA_ROPE_BASE: f32 = 10_000.0;

pub fn hparams(h: &Header, hp: &mut Hparams) -> Result<(), ModelError> {
    let window = h.get_u64("gemma3.attention.sliding_window")?.unwrap_or(0) as usize;
    if window == 0 {
        return Ok(());
    }
    let pattern = h.get_u64("gemma3.attention.sliding_window_pattern")?.map(|p| p as usize).unwrap_or(DEFAULT_SWA_PATTERN);
    let swa_base = h.get_f32("gemma3.rope.freq_base_swa")?.unwrap_or(DEFAULT_SWA_ROPE_BASE);
    for il in 0..hp.n_layer {
        let local = pattern == 0 || il % pattern < pattern - 1;
        if local {
            hp.window[il] = Some(window);
            hp.rope[il].base = swa_base;
            hp.rope[il].freq_scale = 1.0;
        }
    }
    Ok(())
}

pub fn layer(b: &mut Block, w: &LayerWeights, il: usize) {
    let (post_attn, post_ffn) = (w.post_attn_norm.as_deref().unwrap_or(&[]), w.post_ffn_norm.as_deref().unwrap_or(&[]));
    b.norm_input(&w.attn_norm);
    b.attention(w, il);
    b.norm_output(post_attn);
    b.add_residual();
    b.norm_input(&w.ffn_norm);
    b.ffn(w, il, SPEC.activation);
    b.norm_output(post_ffn);
    b.add_residual();
}
