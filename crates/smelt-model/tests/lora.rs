//! LoRA adapters on small random-weight models: the delta each adapter adds is the one its
//! weights define (checked against a model with the adapter folded into F32 weights), every
//! format the adapter may be stored in loads, a batch mixing adapters gives each sequence
//! bitwise what it gets alone, and adapters that do not fit the base model are refused.

use smelt_kernels::formats::{dequantize_row, DType};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use smelt_model::gguf::GgufWriter;
use smelt_model::lora::{Adapter, LoraSet, Target, Values};
use smelt_model::synthetic::{tiny_adapter, tiny_model, TinySpec};
use std::path::PathBuf;
use std::sync::Arc;

fn temp(tag: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("smelt-lora-{tag}-{}-{k}.gguf", std::process::id()))
}

fn write(w: &GgufWriter, tag: &str) -> PathBuf {
    let p = temp(tag);
    std::fs::write(&p, w.to_bytes()).unwrap();
    p
}

fn load_model(w: &GgufWriter) -> Model {
    let p = write(w, "model");
    let m = Model::load(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    m
}

fn load_adapter(w: &GgufWriter, model: &Model, name: &str) -> Result<Adapter, String> {
    let p = write(w, "adapter");
    let a = Adapter::load(&p, model, name).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&p);
    a
}

fn tokens(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 4 + (i * 7919 + salt * 31) % 290)
        .collect()
}

fn ws() -> Workspace {
    Workspace::new(Arc::new(ThreadPool::new(2)))
}

/// Logits of every position of `toks` under `set`, fed in chunks of `chunk`.
fn run(
    model: &Model,
    ws: &mut Workspace,
    toks: &[u32],
    chunk: usize,
    set: &LoraSet,
) -> Vec<Vec<f32>> {
    let mut caches = vec![model.new_cache(toks.len(), chunk)];
    let mut out = Vec::new();
    for (c, part) in toks.chunks(chunk).enumerate() {
        let batch: Vec<BatchToken> = part
            .iter()
            .enumerate()
            .map(|(i, &token)| BatchToken {
                token,
                pos: c * chunk + i,
                seq: 0,
                logits: true,
            })
            .collect();
        let logits = model.forward_lora(&batch, &mut caches, ws, &[set]).unwrap();
        out.extend(logits.chunks(model.hp.n_vocab).map(|r| r.to_vec()));
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The model of `w` (F32 layer matrices) with `adapter` × `scale` folded into its weights, in
/// f64: W + scale · factor · B · A. An adapted output projection of a tied model becomes an
/// untied F32 `output.weight`.
fn fold(w: &GgufWriter, adapter: &Adapter, scale: f32) -> GgufWriter {
    let mut out = GgufWriter {
        metadata: w.metadata.clone(),
        tensors: Vec::new(),
    };
    let add = |base: &mut [f32], cols: usize, p: &smelt_model::lora::LoraPair| {
        let (a, b, r) = (p.a.to_f32(), p.bt.b().to_f32(), p.rank());
        let c = (scale * p.factor) as f64;
        for (row, out_row) in base.chunks_exact_mut(cols).enumerate() {
            for (col, v) in out_row.iter_mut().enumerate() {
                let d: f64 = (0..r)
                    .map(|k| b[row * r + k] as f64 * a[k * cols + col] as f64)
                    .sum();
                *v = (*v as f64 + c * d) as f32;
            }
        }
    };
    for (name, dims, dtype, data) in &w.tensors {
        let pair = name.strip_prefix("blk.").and_then(|rest| {
            let (il, t) = rest.split_once('.')?;
            let t = Target::ALL
                .into_iter()
                .find(|x| format!("{}.weight", x.tensor()) == t)?;
            adapter.pair(il.parse().ok()?, t)
        });
        match pair {
            Some(p) => {
                assert_eq!(*dtype, DType::F32, "fold needs F32 layer matrices");
                let mut v: Vec<f32> = data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                add(&mut v, dims[0] as usize, p);
                out.tensor(name, dims, DType::F32, f32_bytes(&v));
            }
            None => {
                out.tensor(name, dims, *dtype, data.clone());
            }
        };
        if name == "token_embd.weight" {
            if let Some(p) = &adapter.output {
                let cols = dims[0] as usize;
                let rb = dtype.row_bytes(cols).unwrap();
                let mut v = vec![0f32; data.len() / rb * cols];
                for (src, dst) in data.chunks_exact(rb).zip(v.chunks_exact_mut(cols)) {
                    dequantize_row(*dtype, src, dst);
                }
                add(&mut v, cols, p);
                out.tensor("output.weight", dims, DType::F32, f32_bytes(&v));
            }
        }
    }
    out
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn an_adapter_adds_the_delta_its_weights_define_on_every_architecture() {
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        let mut spec = TinySpec::new(arch);
        spec.matrix_dtype = Some(DType::F32);
        let base_w = tiny_model(&spec);
        let model = load_model(&base_w);
        let adapter_w = tiny_adapter(&spec, 4, 8.0, DType::F32, &Target::ALL, true, 3);
        let adapter = Arc::new(load_adapter(&adapter_w, &model, "a").unwrap());
        assert_eq!(adapter.rank(), 4);
        let scale = 0.75;
        let folded = load_model(&fold(&base_w, &adapter, scale));
        let mut ws = ws();
        let toks = tokens(24, 1);
        let with = run(
            &model,
            &mut ws,
            &toks,
            7,
            &LoraSet::one(adapter.clone(), scale),
        );
        let want = run(&folded, &mut ws, &toks, 7, &LoraSet::default());
        let base = run(&model, &mut ws, &toks, 7, &LoraSet::default());
        let (err, changed) = (max_abs_diff(&with, &want), max_abs_diff(&with, &base));
        assert!(err < 2e-3 && changed > 100.0 * err, "{arch}: adapter vs folded weights differ by {err}, adapter changes logits by {changed}");
    }
}

#[test]
fn a_zero_scale_or_an_empty_set_is_bitwise_the_base_model() {
    let spec = TinySpec::new("qwen2");
    let model = load_model(&tiny_model(&spec));
    let adapter = Arc::new(
        load_adapter(
            &tiny_adapter(&spec, 8, 16.0, DType::F16, &Target::ALL, false, 5),
            &model,
            "a",
        )
        .unwrap(),
    );
    let mut ws = ws();
    let toks = tokens(20, 2);
    let base = run(&model, &mut ws, &toks, 20, &LoraSet::default());
    assert_eq!(
        base,
        run(
            &model,
            &mut ws,
            &toks,
            20,
            &LoraSet::one(adapter.clone(), 0.0)
        )
    );
    assert_ne!(
        base,
        run(&model, &mut ws, &toks, 20, &LoraSet::one(adapter, 1.0))
    );
}

#[test]
fn f32_f16_and_q8_0_adapters_agree_within_their_precision() {
    let spec = TinySpec::new("llama");
    let model = load_model(&tiny_model(&spec));
    let mut ws = ws();
    let toks = tokens(16, 3);
    let base = run(&model, &mut ws, &toks, 16, &LoraSet::default());
    let mut outs = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::Q8_0] {
        // Rank 32 so B is whole Q8_0 blocks too.
        let a = Arc::new(
            load_adapter(
                &tiny_adapter(&spec, 32, 32.0, dtype, &Target::ALL, true, 9),
                &model,
                "a",
            )
            .unwrap(),
        );
        if dtype == DType::Q8_0 {
            // Held decoded to f32 (only f16 is kept as the file has it).
            assert!(matches!(a.pair(0, Target::Q).unwrap().a.values, Values::F32(_)));
            assert!(matches!(a.pair(0, Target::Q).unwrap().bt.values, Values::F32(_)));
        }
        outs.push(run(&model, &mut ws, &toks, 16, &LoraSet::one(a, 1.0)));
    }
    let changed = max_abs_diff(&outs[0], &base);
    for (i, name) in [(1, "f16"), (2, "q8_0")] {
        let err = max_abs_diff(&outs[0], &outs[i]);
        assert!(
            err < 0.05 * changed,
            "{name} differs from f32 by {err}; the adapter changes logits by {changed}"
        );
    }
}

#[test]
fn a_batch_mixing_base_and_two_adapters_gives_each_sequence_its_own_logits() {
    for arch in ["qwen2", "gemma3"] {
        let spec = TinySpec::new(arch);
        let model = load_model(&tiny_model(&spec));
        let a = Arc::new(
            load_adapter(
                &tiny_adapter(&spec, 8, 16.0, DType::F16, &Target::ALL, true, 11),
                &model,
                "a",
            )
            .unwrap(),
        );
        // B adapts only the attention, in F32, with a stack of two adapters at their own scales.
        let b = Arc::new(
            load_adapter(
                &tiny_adapter(
                    &spec,
                    4,
                    0.0,
                    DType::F32,
                    &[Target::Q, Target::V, Target::O],
                    false,
                    12,
                ),
                &model,
                "b",
            )
            .unwrap(),
        );
        let sets = [
            LoraSet::default(),
            LoraSet::one(a.clone(), 1.0),
            LoraSet {
                adapters: vec![(b.clone(), 0.5), (a.clone(), 0.25)],
            },
            LoraSet::one(a, 1.0),
        ];
        let mut ws = ws();
        let seqs: Vec<Vec<u32>> = (0..4).map(|i| tokens(10 + 3 * i, i as u32 + 1)).collect();
        let alone: Vec<Vec<Vec<f32>>> = seqs
            .iter()
            .zip(&sets)
            .map(|(t, s)| run(&model, &mut ws, t, 1, s))
            .collect();
        // Prefill all four together in one pass, then decode the rest in steps of one token each.
        let mut caches: Vec<_> = (0..4).map(|_| model.new_cache(32, 32)).collect();
        let refs: Vec<&LoraSet> = sets.iter().collect();
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
        let prefill = 6;
        let mut batch = Vec::new();
        for (s, t) in seqs.iter().enumerate() {
            for (p, &token) in t[..prefill].iter().enumerate() {
                batch.push(BatchToken {
                    token,
                    pos: p,
                    seq: s,
                    logits: true,
                });
            }
        }
        let mut step = |batch: &[BatchToken], caches: &mut Vec<_>, got: &mut Vec<Vec<Vec<f32>>>| {
            let logits = model.forward_lora(batch, caches, &mut ws, &refs).unwrap();
            for (bt, row) in batch.iter().zip(logits.chunks(model.hp.n_vocab)) {
                got[bt.seq].push(row.to_vec());
            }
        };
        step(&batch, &mut caches, &mut got);
        for p in prefill.. {
            let batch: Vec<BatchToken> = seqs
                .iter()
                .enumerate()
                .filter(|(_, t)| p < t.len())
                .map(|(s, t)| BatchToken {
                    token: t[p],
                    pos: p,
                    seq: s,
                    logits: true,
                })
                .collect();
            if batch.is_empty() {
                break;
            }
            step(&batch, &mut caches, &mut got);
        }
        for s in 0..4 {
            assert_eq!(
                got[s], alone[s],
                "{arch}: sequence {s} differs in the mixed batch"
            );
        }
        assert_ne!(
            alone[1][..10],
            alone[3][..10]
                .iter()
                .map(|r| r.iter().map(|v| v + 1.0).collect())
                .collect::<Vec<Vec<f32>>>()[..]
        );
    }
}

#[test]
fn adapters_that_do_not_fit_the_base_model_are_refused_with_a_reason() {
    let spec = TinySpec::new("qwen2");
    let base_w = tiny_model(&spec);
    let model = load_model(&base_w);
    let good = tiny_adapter(&spec, 4, 8.0, DType::F32, &[Target::Q], false, 1);
    assert!(load_adapter(&good, &model, "ok").is_ok());
    let expect = |w: &GgufWriter, needle: &str| {
        let e = load_adapter(w, &model, "x")
            .err()
            .unwrap_or_else(|| panic!("loaded; expected an error with {needle:?}"));
        assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
    };
    // Another architecture.
    expect(
        &tiny_adapter(
            &TinySpec::new("llama"),
            4,
            8.0,
            DType::F32,
            &[Target::Q],
            false,
            1,
        ),
        "\"llama\" model",
    );
    // Another width: the shapes do not fit.
    let mut wide = TinySpec::new("qwen2");
    wide.n_embd = 256;
    expect(
        &tiny_adapter(&wide, 4, 8.0, DType::F32, &[Target::Q], false, 1),
        "do not fit",
    );
    // A model, not an adapter.
    expect(&base_w, "not a LoRA adapter");
    // A tensor the model has no matrix for, a missing half, a non-finite value.
    let mut w = tiny_adapter(&spec, 4, 8.0, DType::F32, &[Target::Q], false, 1);
    for t in &mut w.tensors {
        t.0 = t.0.replace("blk.0.", "blk.9.");
    }
    expect(&w, "no adaptable matrix");
    let mut w = tiny_adapter(&spec, 4, 8.0, DType::F32, &[Target::Q], false, 1);
    w.tensors
        .retain(|t| !t.0.starts_with("blk.1.") || t.0.ends_with("lora_a"));
    expect(&w, "lora_b is missing");
    let mut w = tiny_adapter(&spec, 4, 8.0, DType::F32, &[Target::Q], false, 1);
    w.tensors[0].3[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    expect(&w, "not finite");
    let mut w = tiny_adapter(&spec, 4, 8.0, DType::F32, &[Target::Q], false, 1);
    w.metadata.retain(|(k, _)| k != "adapter.type");
    expect(&w, "adapter type");
    // Truncated file: a one-line error from the GGUF reader, no panic.
    let p = write(&good, "trunc");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Adapter::load(&p, &model, "t").err().unwrap().to_string();
    assert!(e.starts_with("adapter ") && !e.contains('\n'), "{e}");
    let _ = std::fs::remove_file(&p);
}

#[test]
fn an_adapter_written_to_gguf_loads_back_bitwise() {
    let spec = TinySpec::new("gemma3");
    let model = load_model(&tiny_model(&spec));
    for dtype in [DType::F32, DType::F16] {
        let made = Arc::new(Adapter::random(&model, "r", 6, 12.0, &[Target::Q, Target::K, Target::Down], dtype, 0.3, 4));
        let back = Arc::new(load_adapter(&made.to_gguf(), &model, "r").unwrap());
        assert_eq!((back.rank(), back.alpha, back.bytes), (6, 12.0, made.bytes));
        let mut ws = ws();
        let toks = tokens(14, 5);
        let a = run(&model, &mut ws, &toks, 5, &LoraSet::one(made, 0.7));
        assert_eq!(a, run(&model, &mut ws, &toks, 5, &LoraSet::one(back, 0.7)), "{dtype}");
        assert_ne!(a, run(&model, &mut ws, &toks, 5, &LoraSet::default()));
    }
}
