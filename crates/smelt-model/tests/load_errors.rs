//! Files that parse as GGUF but cannot be run must say why, naming the architecture, tokenizer,
//! key or tensor at fault.

use smelt_model::arch::Model;
use smelt_model::gguf::{GgufFile, GgufWriter, Value};
use smelt_model::synthetic::{tiny_model, TinySpec};

fn load(w: &GgufWriter, tag: &str) -> String {
    let path = std::env::temp_dir().join(format!("smelt-load-error-{tag}-{}.gguf", std::process::id()));
    std::fs::write(&path, w.to_bytes()).unwrap();
    let r = Model::load(&path);
    let _ = std::fs::remove_file(&path);
    match r {
        Ok(_) => panic!("{tag}: loaded"),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "one line: {s}");
            s
        }
    }
}

fn set(w: &mut GgufWriter, key: &str, v: Value) {
    match w.metadata.iter_mut().find(|(k, _)| k == key) {
        Some((_, old)) => *old = v,
        None => w.metadata.push((key.to_string(), v)),
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let mut w = tiny_model(&TinySpec::new("llama"));
    set(&mut w, "general.architecture", "phi3".into());
    let e = load(&w, "arch");
    assert!(e.contains("\"phi3\"") && e.contains("llama, qwen2, qwen3, gemma3"), "{e}");
}

#[test]
fn unsupported_tokenizers_are_named() {
    let mut w = tiny_model(&TinySpec::new("llama"));
    set(&mut w, "tokenizer.ggml.model", "bert".into());
    let e = load(&w, "tok");
    assert!(e.contains("\"bert\""), "{e}");

    let f = GgufFile::open(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/random-qwen3.gguf")).unwrap();
    let mut h = f.header;
    for (k, v) in h.metadata.iter_mut() {
        if k == "tokenizer.ggml.pre" {
            *v = "klingon".into();
        }
    }
    let e = smelt_model::tokenizer::Tokenizer::from_gguf(&h).unwrap_err().to_string();
    assert!(e.contains("\"klingon\"") && e.contains("qwen2"), "{e}");
}

#[test]
fn missing_keys_and_tensors_and_bad_shapes_are_named() {
    let mut w = tiny_model(&TinySpec::new("qwen3"));
    w.metadata.retain(|(k, _)| k != "qwen3.block_count");
    let e = load(&w, "key");
    assert!(e.contains("qwen3.block_count") && e.contains("missing"), "{e}");

    let mut w = tiny_model(&TinySpec::new("qwen3"));
    w.tensors.retain(|t| t.0 != "blk.1.attn_k_norm.weight");
    let e = load(&w, "tensor");
    assert!(e.contains("blk.1.attn_k_norm.weight") && e.contains("missing"), "{e}");

    let mut w = tiny_model(&TinySpec::new("llama"));
    set(&mut w, "llama.embedding_length", Value::U32(96));
    let e = load(&w, "shape");
    assert!(e.contains("expected"), "{e}");

    let mut w = tiny_model(&TinySpec::new("llama"));
    set(&mut w, "llama.attention.head_count_kv", Value::U32(3));
    let e = load(&w, "heads");
    assert!(e.contains("KV heads"), "{e}");

    let mut w = tiny_model(&TinySpec::new("llama"));
    set(&mut w, "tokenizer.ggml.bos_token_id", Value::U32(1_000_000));
    let e = load(&w, "bos");
    assert!(e.contains("bos_token_id") && e.contains("outside the vocabulary"), "{e}");

    let mut w = tiny_model(&TinySpec::new("llama"));
    set(&mut w, "llama.rope.scaling.type", "longrope".into());
    let e = load(&w, "rope");
    assert!(e.contains("longrope"), "{e}");
}
