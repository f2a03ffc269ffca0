//! `smelt bench`: prompt-processing and generation speed, reported like llama-bench, plus the
//! weight bytes read per generated token and the share of the machine's memory bandwidth that
//! generation reaches (the bandwidth is measured here, by a multi-threaded read of a buffer
//! larger than the caches).

use crate::common::{model_path, threads};
use anyhow::Result;
use smelt_kernels::bandwidth::ReadProbe;
use smelt_kernels::pool::ThreadPool;
use smelt_kernels::formats::DType;
use smelt_model::arch::{BatchToken, Model, Workspace};
use smelt_model::kv::KvTypes;
use smelt_model::lora::LoraSet;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf path, a stored name, or a pullable short name (pulled on first use).
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    model: String,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Prompt tokens to process (0 = skip).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens to generate (0 = skip).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Measure after this many tokens of context (llama-bench's -d): the cache is filled once,
    /// untimed, and each repetition starts from it.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    n_depth: usize,
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Print a JSON array (llama-bench's keys) instead of a table.
    #[arg(long)]
    json: bool,
    /// Skip the memory-bandwidth measurement.
    #[arg(long)]
    no_bandwidth: bool,
    /// Skip the constrained-decoding (grammar mask) measurement.
    #[arg(long)]
    no_grammar: bool,
    /// Also measure generation under random LoRA adapters of this rank on every projection
    /// (f16, as llama.cpp's converter writes them): one sequence with one adapter against the
    /// base, and 8 sequences under 4 different adapters against 8 on the base.
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    #[command(flatten)]
    kv: crate::common::KvArgs,
}

/// What constrained decoding costs on this model's vocabulary.
struct MaskCost {
    trie_ms: f64,
    /// A full mask inside a JSON string (nearly every token allowed): first time, then again.
    cold_ms: f64,
    warm_ms: f64,
    /// Grammar time per generated token during a greedy JSON-schema generation.
    per_token_ms: f64,
    /// The same generation again, with the grammar's automaton and masks already made.
    again_per_token_ms: f64,
    tokens: usize,
    masks: usize,
}

const BENCH_SCHEMA: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city"]}
  }, "required": ["name", "age", "tags", "address"]}"#;

fn mask_cost(model: &Arc<Model>, pool: &Arc<ThreadPool>) -> Result<MaskCost> {
    use smelt_engine::grammar::{Compiled, Constraint, TokenTrie};
    let tok = &model.tokenizer;
    let t = Instant::now();
    let trie = Arc::new(TokenTrie::new(tok));
    let trie_ms = t.elapsed().as_secs_f64() * 1e3;
    let schema: serde_json::Value = serde_json::from_str(BENCH_SCHEMA)?;
    let g = Compiled::json_schema(&schema).map_err(anyhow::Error::msg)?;
    let mut c = Constraint::new(&g, trie);
    for id in tok.encode("{\"name\": \"Ada", false, false) {
        anyhow::ensure!(c.allows(tok, id), "bench grammar rejected its own prefix");
        c.advance(tok, id);
    }
    let t = Instant::now();
    c.mask(tok);
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    c.forget_masks();
    let t = Instant::now();
    c.mask(tok);
    let warm_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut session = smelt_engine::Session::new(model.clone(), pool.clone(), 1024);
    let sampling = smelt_engine::SamplingParams { temperature: 0.0, ..Default::default() };
    let params = smelt_engine::GenerateParams { max_tokens: 128, sampling, grammar: Some(g), ..Default::default() };
    let prompt = tok.encode_prompt("A customer record as JSON:\n");
    let gen = session.generate(&prompt, &params, |_| true)?;
    let tokens = gen.steps.len().max(1);
    // Again: a later request with the same grammar finds its automaton and masks made.
    let again = session.generate(&prompt, &params, |_| true)?;
    Ok(MaskCost {
        trie_ms,
        cold_ms,
        warm_ms,
        per_token_ms: gen.grammar_secs * 1e3 / tokens as f64,
        again_per_token_ms: again.grammar_secs * 1e3 / again.steps.len().max(1) as f64,
        tokens,
        masks: gen.grammar_masks,
    })
}

/// Tokens per second of each repetition.
fn stats(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Tokens that exist in any vocabulary, spread out (llama-bench uses random tokens too).
fn tokens(model: &Model, n: usize) -> Vec<u32> {
    let v = model.hp.n_vocab as u64;
    (0..n as u64).map(|i| ((i * 2_654_435_761 + 12345) % v) as u32).collect()
}

/// A cache holding `depth` tokens of context (filled untimed), with room for `n` more.
fn filled_cache(model: &Model, ws: &mut Workspace, depth: usize, n: usize, types: KvTypes) -> Result<Vec<smelt_model::kv::KvCache>> {
    const FILL: usize = 512;
    let mut caches = vec![model.new_cache_typed(depth + n, n.max(FILL), types)?];
    let toks = tokens(model, depth);
    for (c, chunk) in toks.chunks(FILL).enumerate() {
        eprint!("\rfilling {depth} tokens of context: {}", c * FILL + chunk.len());
        let batch: Vec<BatchToken> = chunk.iter().enumerate().map(|(i, &token)| BatchToken { token, pos: c * FILL + i, seq: 0, logits: false }).collect();
        model.forward(&batch, &mut caches, ws)?;
    }
    if depth > 0 {
        eprintln!();
    }
    Ok(caches)
}

/// Prompt tokens per second of a prompt of `n` tokens after the cache's `depth`.
fn prompt_rep(model: &Model, ws: &mut Workspace, caches: &mut Vec<smelt_model::kv::KvCache>, depth: usize, n: usize) -> Result<f64> {
    caches[0].truncate(depth).map_err(anyhow::Error::msg)?;
    let batch: Vec<BatchToken> = tokens(model, n).into_iter().enumerate().map(|(i, token)| BatchToken { token, pos: depth + i, seq: 0, logits: i == n - 1 }).collect();
    let t = Instant::now();
    model.forward(&batch, caches, ws)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// Generated tokens per second of one sequence decoding `n` tokens after the cache's `depth`.
fn depth_gen_rep(model: &Model, ws: &mut Workspace, caches: &mut Vec<smelt_model::kv::KvCache>, depth: usize, n: usize) -> Result<f64> {
    caches[0].truncate(depth).map_err(anyhow::Error::msg)?;
    let toks = tokens(model, n);
    let t = Instant::now();
    for (i, &token) in toks.iter().enumerate() {
        model.forward(&[BatchToken { token, pos: depth + i, seq: 0, logits: true }], caches, ws)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// KV bytes attention reads for one token at position `pos` (sliding-window layers only their
/// window).
fn kv_bytes_at(model: &Model, pos: usize, types: KvTypes) -> usize {
    let row = types.bytes_per_row(model.kv_row());
    model.hp.window.iter().map(|w| w.map_or(pos, |w| w.min(pos)) * row).sum()
}

/// Generated tokens per second of `sets.len()` sequences decoding together for `n` steps,
/// sequence `s` under `sets[s]`.
fn batch_gen_rep(model: &Model, ws: &mut Workspace, n: usize, sets: &[&LoraSet]) -> Result<f64> {
    let seqs = sets.len();
    let mut caches: Vec<_> = (0..seqs).map(|_| model.new_cache(n, 1)).collect();
    let toks = tokens(model, n + seqs);
    let t = Instant::now();
    for pos in 0..n {
        let batch: Vec<BatchToken> = (0..seqs).map(|seq| BatchToken { token: toks[pos + seq], pos, seq, logits: true }).collect();
        model.forward_lora(&batch, &mut caches, ws, sets)?;
    }
    Ok((n * seqs) as f64 / t.elapsed().as_secs_f64())
}

/// Generation speed under adapters against the base, repetitions interleaved so drift on the
/// machine affects both alike: (base 1 seq, adapter 1 seq, base 8 seqs, 4 adapters 8 seqs), t/s.
fn lora_speeds(model: &Model, ws: &mut Workspace, rank: usize, n: usize, reps: usize) -> Result<[f64; 4]> {
    use smelt_model::lora::{Adapter, Target};
    let adapters: Vec<Arc<Adapter>> = (0..4).map(|i| Arc::new(Adapter::random(model, &format!("random{i}"), rank, 2.0 * rank as f32, &Target::ALL, DType::F16, 0.02, i as u64 + 1))).collect();
    eprintln!("adapters: 4 × rank {rank} on every projection, {} each (f16)", smelt_store::human_size(adapters[0].bytes as u64));
    let base = LoraSet::default();
    let sets: Vec<LoraSet> = adapters.iter().map(|a| LoraSet::one(a.clone(), 1.0)).collect();
    let mixed: Vec<&LoraSet> = (0..8).map(|s| &sets[s % 4]).collect();
    let mut sums = [0.0; 4];
    for rep in 0..reps {
        eprint!("\rlora: repetition {}/{reps} ", rep + 1);
        sums[0] += batch_gen_rep(model, ws, n, &[&base])?;
        sums[1] += batch_gen_rep(model, ws, n, &[&sets[0]])?;
        sums[2] += batch_gen_rep(model, ws, n, &[&base; 8])?;
        sums[3] += batch_gen_rep(model, ws, n, &mixed)?;
    }
    eprintln!();
    Ok(sums.map(|s| s / reps as f64))
}

/// Memory bandwidth sampled over the same period as the generation runs: one pass before each
/// repetition and one after the last, so that a machine whose bandwidth drifts (shared hosts)
/// is compared with itself. `mean` is what the fraction is taken of; `best` is the fastest pass.
struct Bandwidth {
    mean: f64,
    best: f64,
    passes: usize,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(a.n_prompt > 0 || a.n_gen > 0, "nothing to measure: -p and -n are both 0");
    let path = model_path(&a.model)?;
    let t_load = Instant::now();
    let model = Arc::new(Model::load(&path)?);
    let load_s = t_load.elapsed().as_secs_f64();
    let n_threads = threads(a.threads);
    anyhow::ensure!(a.n_depth + a.n_prompt.max(a.n_gen) <= model.hp.n_ctx_train, "-d + -p (or -n) exceeds the model's context of {}", model.hp.n_ctx_train);
    let pool = Arc::new(ThreadPool::new(n_threads));
    let mut ws = Workspace::new(pool.clone());
    let file_size = std::fs::metadata(&path)?.len();
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let types = a.kv.types();
    eprintln!("{name}: loaded in {load_s:.2}s, {n_threads} threads, kernels: {}, KV cache {}", smelt_kernels::dispatch::kernels().isa.name(), types.describe());

    let mut caches = filled_cache(&model, &mut ws, a.n_depth, a.n_prompt.max(a.n_gen), types)?;
    // Warm up: touch every weight once so page-cache faults are not timed.
    depth_gen_rep(&model, &mut ws, &mut caches, a.n_depth, a.n_prompt.max(a.n_gen).min(2))?;
    let at = if a.n_depth > 0 { format!(" @ d{}", a.n_depth) } else { String::new() };
    let probe = (a.n_gen > 0 && !a.no_bandwidth).then(|| ReadProbe::new(&pool));
    let mut passes = Vec::new();
    let mut results = Vec::new();
    for (test, n_prompt, n_gen) in [("pp", a.n_prompt, 0), ("tg", 0, a.n_gen)] {
        let n = n_prompt + n_gen;
        if n == 0 {
            continue;
        }
        let mut samples = Vec::new();
        // Generation: a bandwidth pass before each repetition and one after the last.
        let mut sample_bandwidth = || {
            if let Some(p) = probe.as_ref().filter(|_| n_gen > 0) {
                passes.push(p.pass(&pool));
            }
        };
        for rep in 0..a.reps {
            eprint!("\r{test}{n}: repetition {}/{} ", rep + 1, a.reps);
            sample_bandwidth();
            samples.push(if n_prompt > 0 { prompt_rep(&model, &mut ws, &mut caches, a.n_depth, n)? } else { depth_gen_rep(&model, &mut ws, &mut caches, a.n_depth, n)? });
        }
        sample_bandwidth();
        eprintln!();
        let (avg, sd) = stats(&samples);
        results.push((format!("{test}{n}{at}"), n_prompt, n_gen, avg, sd, samples));
    }
    drop(caches);
    // Bytes read per generated token: the weights, and the KV cache at the generation's middle.
    let kv_bytes = kv_bytes_at(&model, a.n_depth + a.n_gen / 2, types);
    let bytes = model.weight_bytes_per_token() + kv_bytes;
    drop(probe);
    let bw = (!passes.is_empty()).then(|| Bandwidth { mean: passes.iter().sum::<f64>() / passes.len() as f64, best: passes.iter().cloned().fold(0.0, f64::max), passes: passes.len() });
    let tg_avg = results.iter().find(|r| r.2 > 0).map(|r| r.3);
    let mask = match tg_avg {
        Some(_) if !a.no_grammar => {
            eprintln!("grammar: measuring the token-mask cost");
            Some(mask_cost(&model, &pool)?)
        }
        _ => None,
    };
    let lora = match a.lora_rank {
        0 => None,
        r => Some(lora_speeds(&model, &mut ws, r, a.n_gen.clamp(1, 64), a.reps)?),
    };
    if a.json {
        let mut out: Vec<serde_json::Value> = results
            .iter()
            .map(|(_, np, ng, avg, sd, samples)| {
                let mut o = serde_json::json!({
                    "model_filename": path.display().to_string(),
                    "model_size": file_size,
                    "n_prompt": np,
                    "n_gen": ng,
                    "n_depth": a.n_depth,
                    "type_k": types.k.name(),
                    "type_v": types.v.name(),
                    "n_threads": n_threads,
                    "avg_ts": avg,
                    "stddev_ts": sd,
                    "samples_ts": samples,
                    "kernels": smelt_kernels::dispatch::kernels().isa.name(),
                });
                if *ng > 0 {
                    if let Some(m) = &mask {
                        o["grammar_mask_ms_per_token"] = m.per_token_ms.into();
                        o["grammar_mask_ms_per_token_again"] = m.again_per_token_ms.into();
                        o["grammar_mask_fraction_of_step"] = (m.per_token_ms * avg / 1e3).into();
                        o["grammar_full_mask_ms"] = serde_json::json!({"cold": m.cold_ms, "warm": m.warm_ms});
                        o["grammar_trie_ms"] = m.trie_ms.into();
                    }
                    o["weight_bytes_per_token"] = model.weight_bytes_per_token().into();
                    o["kv_bytes_per_token"] = kv_bytes.into();
                    if let Some(bw) = &bw {
                        o["memory_bandwidth_gbs"] = bw.mean.into();
                        o["memory_bandwidth_best_gbs"] = bw.best.into();
                        o["bandwidth_fraction"] = (bytes as f64 * avg / 1e9 / bw.mean).into();
                        o["bandwidth_fraction_of_best"] = (bytes as f64 * avg / 1e9 / bw.best).into();
                    }
                }
                o
            })
            .collect();
        if let Some([base1, lora1, base8, mixed8]) = lora {
            out.push(serde_json::json!({
                "test": "lora", "lora_rank": a.lora_rank, "n_threads": n_threads, "model_filename": path.display().to_string(),
                "tg_base_ts": base1, "tg_lora_ts": lora1, "tg_lora_ratio": lora1 / base1,
                "batch8_base_ts": base8, "batch8_4_adapters_ts": mixed8, "batch8_4_adapters_ratio": mixed8 / base8,
            }));
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("| model | size | threads | test | t/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (test, _, _, avg, sd, _) in &results {
        println!("| {name} | {} | {n_threads} | {test} | {avg:.2} ± {sd:.2} |", smelt_store::human_size(file_size));
    }
    if let Some((_, _, _, avg, _, _)) = results.iter().find(|r| r.2 > 0) {
        // Binary units throughout, as for file sizes (the probe measures decimal GB/s).
        const GIB: f64 = (1u64 << 30) as f64;
        let got = bytes as f64 * avg / GIB;
        let kv = if kv_bytes > 0 { format!(" and {} of KV cache", smelt_store::human_size(kv_bytes as u64)) } else { String::new() };
        print!("generation reads {} of weights{kv} per token: {got:.1} GiB/s", smelt_store::human_size(model.weight_bytes_per_token() as u64));
        match &bw {
            Some(bw) => {
                let (mean, best) = (bw.mean * 1e9 / GIB, bw.best * 1e9 / GIB);
                println!(
                    ", {:.0}% of the {mean:.1} GiB/s a plain read of memory reached between the repetitions (mean of {} passes; bound {:.1} t/s); {:.0}% of the fastest pass ({best:.1} GiB/s)",
                    100.0 * got / mean,
                    bw.passes,
                    mean * GIB / bytes as f64,
                    100.0 * got / best,
                )
            }
            None => println!(),
        }
    }
    if let Some([base1, lora1, base8, mixed8]) = lora {
        println!(
            "lora rank {} on every projection: 1 sequence {lora1:.2} t/s vs {base1:.2} on the base ({:.0}%); 8 sequences under 4 adapters {mixed8:.2} t/s vs {base8:.2} on the base ({:.0}%)",
            a.lora_rank,
            100.0 * lora1 / base1,
            100.0 * mixed8 / base8
        );
    }
    if let (Some(m), Some(avg)) = (&mask, tg_avg) {
        println!(
            "grammar mask ({} tokens): {:.3} ms per token over {} greedy JSON-schema tokens ({:.1}% of a {:.1} ms decode step; {} full masks), {:.3} ms when the same schema comes again; a full mask inside a string {:.1} ms cold, {:.1} ms warm; trie built in {:.0} ms",
            model.tokenizer.n_vocab(),
            m.per_token_ms,
            m.tokens,
            100.0 * m.per_token_ms * avg / 1e3,
            1e3 / avg,
            m.masks,
            m.again_per_token_ms,
            m.cold_ms,
            m.warm_ms,
            m.trie_ms
        );
    }
    Ok(())
}
