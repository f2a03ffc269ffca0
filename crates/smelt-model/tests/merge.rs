//! `merge`: an adapter folded into a copy of the model. With F32 weights the merged model
//! computes what the base model computes under the adapter; with quantized weights it does up to
//! the re-quantization, far closer to the adapted model than the base is; tied output
//! projections get an output tensor of their own; unsupported inputs are refused.

use smelt_kernels::formats::quantize::quantize_weights;
use smelt_kernels::formats::DType;
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use smelt_model::gguf::GgufWriter;
use smelt_model::lora::{Adapter, LoraSet, Target};
use smelt_model::synthetic::{tiny_adapter, tiny_model, TinySpec};
use std::path::PathBuf;
use std::sync::Arc;

fn temp(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("smelt-merge-{tag}-{}-{k}.gguf", std::process::id()))
}

/// Logits of every position of a fixed sequence.
fn logits(model: &Model, set: &LoraSet) -> Vec<f32> {
    let toks: Vec<u32> = (0..12u32).map(|i| 4 + (i * 7919) % 290).collect();
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(2)));
    let mut caches = vec![model.new_cache(toks.len(), toks.len())];
    let batch: Vec<BatchToken> = toks.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: true }).collect();
    model.forward_lora(&batch, &mut caches, &mut ws, &[set]).unwrap().to_vec()
}

/// The model with its F32 layer matrices encoded in `dtype` (weights like trained ones, where
/// the synthetic model's own quantized matrices are random blocks).
fn encoded(mut w: GgufWriter, dtype: Option<DType>) -> GgufWriter {
    let Some(dtype) = dtype else { return w };
    for (name, dims, dt, data) in w.tensors.iter_mut() {
        if name.starts_with("blk.") && dims.len() == 2 && *dt == DType::F32 {
            let x: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let mut out = vec![0u8; x.len() / dtype.block_len() * dtype.block_bytes()];
            quantize_weights(dtype, &x, &mut out);
            (*dt, *data) = (dtype, out);
        }
    }
    w
}

fn dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>().sqrt()
}

#[test]
fn a_merged_model_computes_what_the_adapter_does() {
    let cases = [("llama", Some(DType::F32), true), ("qwen2", Some(DType::Q4_K), false), ("gemma3", Some(DType::Q6_K), true), ("qwen3", Some(DType::Q5_0), false), ("llama", None, true)];
    for (arch, dtype, output) in cases {
        let spec = TinySpec { n_embd: 256, n_ff: 512, head_dim: 64, matrix_dtype: dtype.map(|_| DType::F32), ..TinySpec::new(arch) };
        let base_path = temp("base");
        std::fs::write(&base_path, encoded(tiny_model(&spec), dtype).to_bytes()).unwrap();
        let adapter_path = temp("adapter");
        std::fs::write(&adapter_path, tiny_adapter(&spec, 8, 16.0, DType::F16, &Target::ALL, output, 4).to_bytes()).unwrap();
        let out = temp("merged");
        let mut calls = 0;
        let stats = smelt_model::merge::merge(&base_path, &[(adapter_path.clone(), 0.5)], &out, &mut |_, _| calls += 1).unwrap();
        assert_eq!(stats.tensors, 7 * spec.n_layer + output as usize, "{arch}");
        assert!(calls > 0);

        let base = Model::load(&base_path).unwrap();
        let merged = Model::load(&out).unwrap();
        let adapter = Arc::new(Adapter::load(&adapter_path, &base, "a").unwrap());
        let adapted = logits(&base, &LoraSet::one(adapter, 0.5));
        let plain = logits(&base, &LoraSet::default());
        let folded = logits(&merged, &LoraSet::default());
        let (moved, left) = (dist(&plain, &adapted), dist(&folded, &adapted));
        let norm = adapted.iter().map(|x| x * x).sum::<f32>().sqrt();
        if dtype == Some(DType::F32) {
            assert!(left <= 1e-4 * norm, "{arch} F32: the merged model is {left} from the adapted one (norm {norm})");
        } else {
            assert!(left < 0.25 * moved, "{arch} {dtype:?}: the merged model is {left} from the adapted one, the base {moved}");
        }
        for p in [&base_path, &adapter_path, &out] {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn merge_refuses_what_it_cannot_write() {
    let spec = TinySpec { n_embd: 256, n_ff: 512, head_dim: 64, matrix_dtype: Some(DType::Q2_K), ..TinySpec::new("llama") };
    let base_path = temp("q2k");
    std::fs::write(&base_path, tiny_model(&spec).to_bytes()).unwrap();
    let adapter_path = temp("adapter");
    std::fs::write(&adapter_path, tiny_adapter(&spec, 4, 8.0, DType::F32, &[Target::Q], false, 2).to_bytes()).unwrap();
    let out = temp("out");
    let e = smelt_model::merge::merge(&base_path, &[(adapter_path.clone(), 1.0)], &out, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("Q2_K") && e.contains("cannot write"), "{e}");
    assert!(!out.exists());
    // An adapter for another architecture is refused as serving refuses it.
    let other = TinySpec { n_embd: 256, n_ff: 512, head_dim: 64, ..TinySpec::new("qwen2") };
    std::fs::write(&adapter_path, tiny_adapter(&other, 4, 8.0, DType::F32, &[Target::Q], false, 2).to_bytes()).unwrap();
    let e = smelt_model::merge::merge(&base_path, &[(adapter_path.clone(), 1.0)], &out, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("qwen2"), "{e}");
    for p in [&base_path, &adapter_path] {
        let _ = std::fs::remove_file(p);
    }
}
