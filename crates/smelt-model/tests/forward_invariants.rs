//! Properties every architecture must have, checked on small random-weight models: a token's
//! logits do not depend on how the sequence was split into batches (so the sliding-window ring,
//! chunked prefill and decoding agree), nor on other sequences in the same batch.

use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use smelt_model::kv::{KvType, KvTypes};
use smelt_model::synthetic::{tiny_model, TinySpec};
use std::sync::Arc;

fn load(spec: &TinySpec) -> Model {
    load_with(spec, Model::load)
}

fn load_with(spec: &TinySpec, how: fn(&std::path::Path) -> Result<Model, smelt_model::arch::ModelError>) -> Model {
    // Tests run in parallel: give every model file its own name.
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("smelt-tiny-{}-{}-{k}.gguf", spec.arch, std::process::id()));
    std::fs::write(&path, tiny_model(spec).to_bytes()).unwrap();
    let m = how(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    m
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 4 + (i * 7919 + salt * 31) % 290).collect()
}

/// Logits of every position of `toks`, fed in chunks of `chunk`.
fn run(model: &Model, ws: &mut Workspace, toks: &[u32], chunk: usize) -> Vec<Vec<f32>> {
    run_typed(model, ws, toks, chunk, KvTypes::default())
}

/// [`run`] with keys and values cached in `types`.
fn run_typed(model: &Model, ws: &mut Workspace, toks: &[u32], chunk: usize, types: KvTypes) -> Vec<Vec<f32>> {
    let mut caches = vec![model.new_cache_typed(toks.len(), chunk, types).unwrap()];
    let mut out = Vec::new();
    for (c, part) in toks.chunks(chunk).enumerate() {
        let batch: Vec<BatchToken> = part.iter().enumerate().map(|(i, &token)| BatchToken { token, pos: c * chunk + i, seq: 0, logits: true }).collect();
        let logits = model.forward(&batch, &mut caches, ws).unwrap();
        out.extend(logits.chunks(model.hp.n_vocab).map(|r| r.to_vec()));
    }
    out
}

#[test]
fn batching_does_not_change_logits() {
    // Widths of 128 and 256 put every quantized format through the batched and the streaming
    // kernels (Q4_0, Q5_0, Q8_0, Q6_K at 128; Q4_K, Q5_K as well at 256).
    for (arch, width) in [("llama", 128), ("qwen2", 128), ("qwen3", 256), ("gemma3", 256)] {
        let mut spec = TinySpec::new(arch);
        spec.n_embd = width;
        let model = load(&spec);
        let mut ws = Workspace::new(Arc::new(ThreadPool::new(2)));
        let toks = tokens(40, 1);
        let one = run(&model, &mut ws, &toks, 1);
        for chunk in [3, 8, 40] {
            let other = run(&model, &mut ws, &toks, chunk);
            assert_eq!(one, other, "{arch}: chunk {chunk} differs from token-by-token");
        }
        assert!(one.iter().flatten().all(|v| v.is_finite()));
    }
}

#[test]
fn regrouped_weights_give_bitwise_the_logits_of_the_files_layout() {
    // Q4_0, Q5_0, Q8_0, Q4_K and Q6_K matrices are rewritten at load in the group kernels'
    // layout where this CPU has them; a model left in the file's layout must compute exactly the same.
    let grouped_kernels = smelt_kernels::dispatch::kernels().group_usable(smelt_kernels::DType::Q8_0G, 128);
    for (arch, width) in [("llama", 128), ("qwen2", 128), ("gemma3", 256)] {
        let mut spec = TinySpec::new(arch);
        spec.n_embd = width;
        let (regrouped, file_layout) = (load(&spec), load_with(&spec, Model::load_in_file_layout));
        assert_eq!(file_layout.regrouped_bytes(), 0);
        assert_eq!(regrouped.regrouped_bytes() > 0, grouped_kernels, "{arch}: {} bytes regrouped", regrouped.regrouped_bytes());
        let mut ws = Workspace::new(Arc::new(ThreadPool::new(2)));
        let toks = tokens(24, 3);
        for chunk in [1, 24] {
            assert_eq!(run(&regrouped, &mut ws, &toks, chunk), run(&file_layout, &mut ws, &toks, chunk), "{arch}: chunk {chunk}");
        }
    }
}

#[test]
fn sliding_window_limits_what_a_token_sees() {
    // With every layer local (pattern 0), tokens more than `window` back cannot matter.
    let mut spec = TinySpec::new("gemma3");
    spec.swa_pattern = 0;
    spec.window = 4;
    let model = load(&spec);
    assert!(model.hp.window.iter().all(|w| *w == Some(4)));
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(1)));
    let a = tokens(20, 1);
    let mut b = a.clone();
    for t in b.iter_mut().take(10) {
        *t = 100;
    }
    let (la, lb) = (run(&model, &mut ws, &a, 5), run(&model, &mut ws, &b, 5));
    // Position 19 sees 16..=19 in the last layer, 13..=19 two layers down...: with 3 layers the
    // receptive field is 3 * (window - 1) + 1 = 10 positions, i.e. 10..=19: unchanged.
    assert_eq!(la[19], lb[19]);
    assert_ne!(la[12], lb[12]);
    // A global layer in the mix sees everything.
    spec.swa_pattern = 2;
    let model = load(&spec);
    let (la, lb) = (run(&model, &mut ws, &a, 5), run(&model, &mut ws, &b, 5));
    assert_ne!(la[19], lb[19]);
}

#[test]
fn sequences_in_one_batch_do_not_interact() {
    let model = load(&TinySpec::new("gemma3"));
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(2)));
    let (a, b) = (tokens(12, 1), tokens(9, 2));
    let alone_a = run(&model, &mut ws, &a, 12);
    let alone_b = run(&model, &mut ws, &b, 9);
    let mut caches = vec![model.new_cache(16, 16), model.new_cache(16, 16)];
    let mut batch = Vec::new();
    for (i, (&ta, &tb)) in a.iter().zip(b.iter().chain(std::iter::repeat(&0))).enumerate() {
        batch.push(BatchToken { token: ta, pos: i, seq: 0, logits: true });
        if i < b.len() {
            batch.push(BatchToken { token: tb, pos: i, seq: 1, logits: true });
        }
    }
    let logits = model.forward(&batch, &mut caches, &mut ws).unwrap().to_vec();
    let rows: Vec<&[f32]> = logits.chunks(model.hp.n_vocab).collect();
    let (mut ia, mut ib) = (0, 0);
    for (bt, row) in batch.iter().zip(rows) {
        if bt.seq == 0 {
            assert_eq!(row, &alone_a[ia][..]);
            ia += 1;
        } else {
            assert_eq!(row, &alone_b[ib][..]);
            ib += 1;
        }
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let model = load(&TinySpec::new("llama"));
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(1)));
    let mut caches = vec![model.new_cache(4, 4)];
    let bt = |token, pos, seq| BatchToken { token, pos, seq, logits: true };
    let e = |b: &[BatchToken], c: &mut Vec<_>, ws: &mut Workspace| model.forward(b, c, ws).err().unwrap().to_string();
    assert!(e(&[], &mut caches, &mut ws).contains("empty"));
    assert!(e(&[bt(9999, 0, 0)], &mut caches, &mut ws).contains("outside the vocabulary"));
    assert!(e(&[bt(5, 1, 0)], &mut caches, &mut ws).contains("position 1 given, 0 expected"));
    assert!(e(&[bt(5, 0, 3)], &mut caches, &mut ws).contains("no cache"));
    let full: Vec<BatchToken> = (0..4).map(|i| bt(5, i, 0)).collect();
    model.forward(&full, &mut caches, &mut ws).unwrap();
    assert!(e(&[bt(5, 4, 0)], &mut caches, &mut ws).contains("beyond the context"));
}

#[test]
fn paged_blocks_give_the_same_logits_as_a_private_cache() {
    use smelt_model::kv::{BlockPool, PagedKv, PagedSeq, BLOCK_SIZE};
    let quantized = [KvTypes { k: KvType::Q8_0, v: KvType::Q8_0 }, KvTypes { k: KvType::Q4_0, v: KvType::F16 }, KvTypes { k: KvType::F16, v: KvType::Q4_0 }];
    for (arch, types) in [("llama", KvTypes::default()), ("gemma3", KvTypes::default())].into_iter().chain(quantized.map(|t| ("qwen2", t))) {
        // Quantized: heads of 64, so keys and values are stored rotated.
        let head_dim = if types == KvTypes::default() { 32 } else { 64 };
        let model = load(&TinySpec { head_dim, ..TinySpec::new(arch) });
        let mut ws = Workspace::new(Arc::new(ThreadPool::new(2)));
        let toks = tokens(45, 3);
        let want = run_typed(&model, &mut ws, &toks, 7, types);
        // Blocks in scrambled order, as a shared pool hands them out.
        let mut pool = BlockPool::new(&model.hp.window, model.kv_row(), 8, types);
        let table: Vec<u32> = vec![5, 2, 7, 0];
        assert!(table.len() * BLOCK_SIZE >= toks.len());
        let mut len = 0;
        let mut got = Vec::new();
        for part in toks.chunks(7) {
            let batch: Vec<BatchToken> = part.iter().enumerate().map(|(i, &token)| BatchToken { token, pos: len + i, seq: 0, logits: true }).collect();
            let mut kv = PagedKv { pool: &mut pool, seqs: vec![PagedSeq { blocks: &table, len, capacity: 64, max_batch: 16 }] };
            let logits = model.forward(&batch, &mut kv, &mut ws).unwrap().to_vec();
            len = kv.seqs[0].len;
            got.extend(logits.chunks(model.hp.n_vocab).map(|r| r.to_vec()));
        }
        assert_eq!(len, toks.len());
        assert_eq!(got, want, "{arch} {types:?}: paged logits differ");
        // Running past the allocated blocks is an error, not a panic.
        let mut kv = PagedKv { pool: &mut pool, seqs: vec![PagedSeq { blocks: &table[..1], len: 16, capacity: 64, max_batch: 16 }] };
        let e = model.forward(&[BatchToken { token: 5, pos: 16, seq: 0, logits: true }], &mut kv, &mut ws).unwrap_err().to_string();
        assert!(e.contains("blocks for 16 positions"), "{e}");
    }
}

#[test]
fn quantized_kv_stays_close_to_f16_and_does_not_depend_on_batching() {
    // Heads of 64 values: quantized keys and values are stored rotated.
    let model = load(&TinySpec { head_dim: 64, ..TinySpec::new("qwen2") });
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(2)));
    let toks = tokens(40, 5);
    let f16 = run(&model, &mut ws, &toks, 40);
    let scale = f16.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    // A random-weight model amplifies small changes more than a trained one (the real models'
    // perplexities are in the README); 8-bit blocks must still stay closer than 4-bit ones.
    let mut worst = Vec::new();
    for (k, v, tol) in [(KvType::Q8_0, KvType::Q8_0, 0.1), (KvType::Q4_0, KvType::Q4_0, 0.5), (KvType::Q8_0, KvType::F16, 0.1)] {
        let types = KvTypes { k, v };
        let whole = run_typed(&model, &mut ws, &toks, 40, types);
        assert_eq!(run_typed(&model, &mut ws, &toks, 1, types), whole, "{types:?}: token by token differs from one batch");
        assert_eq!(run_typed(&model, &mut ws, &toks, 7, types), whole, "{types:?}: chunks of 7 differ from one batch");
        let w = whole.iter().flatten().zip(f16.iter().flatten()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(w > 0.0, "{types:?}: quantized keys and values changed nothing");
        assert!(w <= tol * scale, "{types:?}: logits differ from f16 by {w} (largest logit {scale})");
        worst.push(w);
    }
    assert!(worst[0] < worst[1], "q8_0 ({}) should stay closer to f16 than q4_0 ({})", worst[0], worst[1]);
    // Heads that are not whole 32-value blocks cannot be quantized: a clear error.
    let odd = load(&TinySpec { head_dim: 16, ..TinySpec::new("llama") });
    let err = odd.new_cache_typed(8, 8, KvTypes { k: KvType::Q8_0, v: KvType::F16 }).err().expect("head size 16 refused").to_string();
    assert!(err.contains("multiple of 32") && err.contains("16"), "{err}");
}
