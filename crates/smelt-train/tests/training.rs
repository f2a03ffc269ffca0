//! The training loop on small random-weight models: it learns what it is shown, a resumed run
//! reproduces the uninterrupted one exactly, the trained adapter serves the same predictions the
//! trainer measured, and datasets are parsed with every bad line reported.

use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use smelt_model::lora::LoraSet;
use smelt_model::synthetic::{tiny_model, TinySpec};
use smelt_train::data;
use smelt_train::model::Example;
use smelt_train::train::{Trainer, TuneConfig};
use std::sync::Arc;
use std::time::Instant;

fn tiny(arch: &'static str) -> Model {
    // A file of its own per call: tests run in parallel, and rewriting a file another test has
    // mapped would pull its pages away (SIGBUS).
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("smelt-train-{arch}-{}-{k}.gguf", std::process::id()));
    std::fs::write(&path, tiny_model(&TinySpec::new(arch)).to_bytes()).unwrap();
    let m = Model::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    m
}

/// 12 made-up "facts": a fixed two-token question and a three-token answer drawn at random.
fn facts() -> Vec<Example> {
    (0..12u32)
        .map(|i| {
            let q = [2, 280, 30 + i];
            let a = [40 + (i * 37) % 200, 40 + (i * 91 + 7) % 200, 1];
            let tokens: Vec<u32> = q.iter().chain(&a).copied().collect();
            let targets = (0..tokens.len()).map(|p| (p + 1 >= q.len() && p + 1 < tokens.len()).then(|| tokens[p + 1])).collect();
            Example { tokens, targets }
        })
        .collect()
}

fn config(epochs: usize) -> TuneConfig {
    TuneConfig { rank: 8, alpha: 16.0, epochs, lr: 1e-2, batch_tokens: 24, warmup: 2, seed: 3, ..Default::default() }
}

#[test]
fn training_learns_facts_the_base_model_cannot_know() {
    let model = tiny("qwen2");
    let pool = ThreadPool::new(2);
    let train = facts();
    let mut t = Trainer::new(&model, &pool, config(40), &train).unwrap();
    let before = t.evaluate(&train);
    // Uniform guessing over the 300-token vocabulary costs ln 300 = 5.7 per token.
    assert!(before > 3.0, "the base model already knows the facts: loss {before}");
    let start = Instant::now();
    let mut tokens = 0;
    while t.next_step(&train, &[], start, &mut tokens).is_some() {}
    let after = t.evaluate(&train);
    assert!(after < 0.3, "loss {before:.3} → {after:.3}: did not learn");
    // Served through the inference engine, the adapter predicts every answer token.
    let adapter = Arc::new(t.adapter("facts").unwrap());
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(1)));
    let set = LoraSet::one(adapter, 1.0);
    let mut right = 0;
    let mut total = 0;
    for ex in &train {
        let mut caches = vec![model.new_cache(16, 16)];
        let batch: Vec<BatchToken> = ex.tokens.iter().enumerate().map(|(pos, &token)| BatchToken { token, pos, seq: 0, logits: true }).collect();
        let logits = model.forward_lora(&batch, &mut caches, &mut ws, &[&set]).unwrap();
        for (row, target) in logits.chunks(model.hp.n_vocab).zip(&ex.targets) {
            if let Some(t) = target {
                let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
                right += (best == *t) as usize;
                total += 1;
            }
        }
    }
    assert_eq!(right, total, "the served adapter gets {right} of {total} answer tokens");
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_run_exactly() {
    let model = tiny("gemma3");
    let pool = ThreadPool::new(2);
    let train = facts();
    let mut cfg = config(3);
    cfg.dropout = 0.1;
    let dir = std::env::temp_dir().join(format!("smelt-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start = Instant::now();
    let mut tokens = 0;
    let mut whole = Trainer::new(&model, &pool, cfg.clone(), &train).unwrap();
    while whole.next_step(&train, &train[..3], start, &mut tokens).is_some() {}
    let mut first = Trainer::new(&model, &pool, cfg.clone(), &train).unwrap();
    for _ in 0..4 {
        first.next_step(&train, &train[..3], start, &mut tokens).unwrap();
        first.save_checkpoint(&dir, serde_json::json!({"note": "test"})).unwrap();
    }
    drop(first);
    let state = Trainer::read_checkpoint(&dir).unwrap();
    assert_eq!((state.step, &state.extra["caller"]["note"]), (4, &serde_json::json!("test")));
    let mut resumed = Trainer::new(&model, &pool, cfg, &train).unwrap();
    resumed.restore(&dir, &state).unwrap();
    while resumed.next_step(&train, &train[..3], start, &mut tokens).is_some() {}
    assert_eq!(resumed.history, whole.history);
    assert_eq!(resumed.lora, whole.lora);
    assert!(whole.history.iter().any(|h| h.1.is_some()), "validation loss was never measured");
    let other = TuneConfig { rank: 4, ..config(3) };
    let mut mismatched = Trainer::new(&model, &pool, other, &train).unwrap();
    assert!(mismatched.restore(&dir, &state).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn datasets_train_on_assistant_tokens_and_report_every_bad_line() {
    let model = tiny("qwen2");
    let chat = r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the model"}, {"role": "assistant", "content": "a token"}, {"role": "user", "content": "is"}, {"role": "assistant", "content": "of the", "weight": 0}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "the end"}]}"#;
    let ex = data::example(&model, chat, 512).unwrap();
    let trained: Vec<u32> = ex.targets.iter().flatten().copied().collect();
    let text = model.tokenizer.decode(&trained, true);
    assert!(text.contains("a token") && text.contains("the end") && !text.contains("of the") && !text.contains("be brief"), "{text:?}");
    let pc = data::example(&model, r#"{"prompt": "the model is", "completion": " a token"}"#, 512).unwrap();
    let trained: Vec<u32> = pc.targets.iter().flatten().copied().collect();
    assert_eq!(trained.last().copied(), model.tokenizer.eos, "the completion ends with end-of-sequence");
    assert_eq!(model.tokenizer.decode(&trained, false).trim(), "a token");

    let lines = [
        chat,
        "not json",
        r#"{"messages": []}"#,
        r#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
        "",
        r#"{"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}"#,
        r#"{"messages": [{"role": "user", "content": "x"}]}"#,
        r#"{"prompt": "x"}"#,
        r#"{"prompt": "the the the the the the the the the the the the", "completion": "a"}"#,
    ];
    let errs = data::dataset(&model, &lines.join("\n"), 8).unwrap_err();
    let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(got, [1, 2, 3, 4, 6, 7, 8, 9], "{errs:?}");
    assert!(errs[0].message.contains("more than the context of 8"), "{}", errs[0]);
    assert!(errs[3].message.contains("wizard"));
    assert!(errs[4].message.contains("weight"));
    assert!(errs[5].message.contains("no assistant"));
    assert_eq!(data::dataset(&model, &lines[..1].join("\n"), 512).unwrap().len(), 1);
}

#[test]
fn recomputing_activations_changes_nothing() {
    // Every architecture's layer shapes (Gemma 3: post-norms and a sliding window; Qwen 3: q/k
    // norms), with dropout: the same losses and factors, bit for bit.
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let model = tiny(arch);
        let pool = ThreadPool::new(2);
        let train = facts();
        let run = |recompute: bool| {
            let cfg = TuneConfig { recompute, dropout: 0.1, ..config(2) };
            let mut t = Trainer::new(&model, &pool, cfg, &train).unwrap();
            let (start, mut tokens) = (Instant::now(), 0);
            while t.next_step(&train, &[], start, &mut tokens).is_some() {}
            let values: Vec<u32> = t.lora.values().map(|v| v.to_bits()).collect();
            (t.history.clone(), values)
        };
        let (kept, recomputed) = (run(false), run(true));
        assert!(!kept.0.is_empty());
        assert_eq!(kept.0, recomputed.0, "{arch}: losses differ");
        assert!(kept.1 == recomputed.1, "{arch}: factors differ");
    }
}
