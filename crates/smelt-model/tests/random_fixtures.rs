//! The `llama` and `qwen3` architectures against llama.cpp, on small random-weight models built
//! for this (tools/fixtures/): every tensor format appears in them. Teacher-forced on llama.cpp's
//! greedy continuations, smelt must pick the same token at >= 98% of steps with a median
//! |Δ logprob| <= 0.02. Their tokenizers (llama-bpe and qwen2 pre-tokenizers on a small learned
//! vocabulary) must match llama.cpp exactly.

mod common;
use common::*;
use smelt_model::arch::Model;
use smelt_model::tokenizer::Tokenizer;

fn check_model(name: &str, arch: &str) {
    let model = Model::load(&data(&format!("{name}.gguf"))).unwrap();
    assert_eq!(model.spec().name, arch);
    let mut ws = workspace();
    let mut pairs = Vec::new();
    for case in jsonl(&format!("{name}.greedy.jsonl")) {
        let prompt = ids(&case["prompt_ids"]);
        let outputs = ids(&case["output_ids"]);
        let ours = teacher_forced(&model, &mut ws, &prompt, &outputs, 64);
        for (lp, step) in ours.iter().zip(case["steps"].as_array().unwrap()) {
            let id = step["id"].as_u64().unwrap() as usize;
            let top = step["top"][0][0].as_u64().unwrap() as u32;
            pairs.push((argmax(lp) == top, (lp[id] as f64 - step["logprob"].as_f64().unwrap()).abs()));
        }
    }
    let s = Spread::from_pairs(&pairs);
    println!("{name}: smelt vs llama.cpp: {s}");
    assert!(s.agreement >= 0.98 && s.median <= 0.02, "{name}: {s}");
}

#[test]
fn llama_matches_llama_cpp() {
    check_model("random-llama", "llama");
}

#[test]
fn qwen3_matches_llama_cpp() {
    check_model("random-qwen3", "qwen3");
}

/// The same model declaring YaRN RoPE scaling (factor 4 over an original context of 128;
/// tools/fixtures/make_yarn_model.py): prompts up to 700 tokens, far past where the scaling
/// matters, agree with llama.cpp's YaRN.
#[test]
fn yarn_rope_scaling_matches_llama_cpp() {
    let model = Model::load(&data("random-qwen3-yarn.gguf")).unwrap();
    let rope = &model.hp.rope[0];
    assert!(rope.yarn.is_some() && rope.freq_scale == 0.25, "{rope:?}");
    check_model("random-qwen3-yarn", "qwen3");
}

#[test]
fn fixture_tokenizers_match_llama_cpp() {
    for name in ["random-llama", "random-qwen3"] {
        let f = smelt_model::gguf::GgufFile::open(&data(&format!("{name}.gguf"))).unwrap();
        let tok = Tokenizer::from_gguf(&f.header).unwrap();
        let cases = jsonl(&format!("{name}.tokenize.jsonl"));
        for c in &cases {
            let text = c["text"].as_str().unwrap();
            assert_eq!(tok.encode(text, false, false), ids(&c["ids"]), "{name} {text:?}");
            assert_eq!(tok.encode(text, true, true), ids(&c["ids_with_bos_and_special"]), "{name} (special) {text:?}");
        }
    }
}

/// The Qwen2.5 vocabulary under each pre-tokenizer (llama.cpp's output with the pre key swapped).
#[test]
fn pre_tokenizers_match_llama_cpp() {
    for pre in ["qwen2", "llama-bpe", "gpt-2", "default"] {
        let mut f = smelt_model::gguf::GgufFile::open(&store_model(QWEN)).unwrap();
        for (k, v) in f.header.metadata.iter_mut() {
            if k == "tokenizer.ggml.pre" {
                *v = smelt_model::gguf::Value::String(pre.to_string());
            }
        }
        let tok = Tokenizer::from_gguf(&f.header).unwrap();
        let mut bad = Vec::new();
        let cases = jsonl(&format!("pretok-{pre}.jsonl"));
        for c in &cases {
            let text = c["text"].as_str().unwrap();
            if tok.encode(text, false, false) != ids(&c["ids"]) {
                bad.push(text.to_string());
            }
        }
        assert!(bad.is_empty(), "{pre}: {} of {} differ, e.g. {:?}", bad.len(), cases.len(), &bad[..bad.len().min(3)]);
    }
}
