//! `smelt bench`: prompt-processing and generation speed, reported like llama-bench, plus the
//! weight bytes read per generated token and the share of the machine's memory bandwidth that
//! generation reaches (the bandwidth is measured here, by a multi-threaded read of a buffer
//! larger than the caches).

use crate::common::{model_path, threads};
use anyhow::Result;
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf path or a stored name.
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
    /// Repetitions of each test.
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Print a JSON array (llama-bench's keys) instead of a table.
    #[arg(long)]
    json: bool,
    /// Skip the memory-bandwidth measurement.
    #[arg(long)]
    no_bandwidth: bool,
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

fn prompt_rep(model: &Model, ws: &mut Workspace, n: usize) -> Result<f64> {
    let mut caches = vec![model.new_cache(n, n)];
    let batch: Vec<BatchToken> = tokens(model, n).into_iter().enumerate().map(|(pos, token)| BatchToken { token, pos, seq: 0, logits: pos == n - 1 }).collect();
    let t = Instant::now();
    model.forward(&batch, &mut caches, ws)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn gen_rep(model: &Model, ws: &mut Workspace, n: usize) -> Result<f64> {
    let mut caches = vec![model.new_cache(n, 1)];
    let toks = tokens(model, n);
    let t = Instant::now();
    for (pos, &token) in toks.iter().enumerate() {
        model.forward(&[BatchToken { token, pos, seq: 0, logits: true }], &mut caches, ws)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// GB/s of a parallel read of a 1 GiB buffer (best of three passes).
pub fn memory_bandwidth(pool: &ThreadPool) -> f64 {
    let words = (1usize << 30) / 8;
    let mut buf = vec![0u64; words];
    pool.for_rows(&mut buf, 1 << 16, 1, &|i, row| row.iter_mut().enumerate().for_each(|(j, v)| *v = (i ^ j) as u64));
    let chunk = words / (pool.n_threads() * 16);
    let mut best = 0f64;
    for _ in 0..3 {
        let total = std::sync::atomic::AtomicU64::new(0);
        let t = Instant::now();
        pool.for_chunks(words, chunk, &|r| {
            // Eight independent lanes so the sum vectorizes and loads stay in flight.
            let mut acc = [0u64; 8];
            for c in buf[r].chunks_exact(8) {
                for k in 0..8 {
                    acc[k] = acc[k].wrapping_add(c[k]);
                }
            }
            total.fetch_add(acc.iter().fold(0, |a, &b| a.wrapping_add(b)), std::sync::atomic::Ordering::Relaxed);
        });
        let gbs = (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box(total.load(std::sync::atomic::Ordering::Relaxed));
        best = best.max(gbs);
    }
    best
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.reps > 0, "--reps must be at least 1");
    anyhow::ensure!(a.n_prompt > 0 || a.n_gen > 0, "nothing to measure: -p and -n are both 0");
    let path = model_path(&a.model)?;
    let t_load = Instant::now();
    let model = Model::load(&path)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let n_threads = threads(a.threads);
    anyhow::ensure!(a.n_prompt + a.n_gen <= model.hp.n_ctx_train, "-p + -n exceeds the model's context of {}", model.hp.n_ctx_train);
    let pool = Arc::new(ThreadPool::new(n_threads));
    let mut ws = Workspace::new(pool.clone());
    let file_size = std::fs::metadata(&path)?.len();
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    eprintln!("{name}: loaded in {load_s:.2}s, {n_threads} threads, kernels: {}", smelt_kernels::dispatch::kernels().isa.name());

    // Warm up: touch every weight once so page-cache faults are not timed.
    gen_rep(&model, &mut ws, 2)?;
    let mut results = Vec::new();
    for (test, n_prompt, n_gen) in [("pp", a.n_prompt, 0), ("tg", 0, a.n_gen)] {
        let n = n_prompt + n_gen;
        if n == 0 {
            continue;
        }
        let mut samples = Vec::new();
        for rep in 0..a.reps {
            eprint!("\r{test}{n}: repetition {}/{} ", rep + 1, a.reps);
            samples.push(if n_prompt > 0 { prompt_rep(&model, &mut ws, n)? } else { gen_rep(&model, &mut ws, n)? });
        }
        eprintln!();
        let (avg, sd) = stats(&samples);
        results.push((format!("{test}{n}"), n_prompt, n_gen, avg, sd, samples));
    }
    let bytes = model.weight_bytes_per_token();
    let bw = if a.no_bandwidth || a.n_gen == 0 { None } else { Some(memory_bandwidth(&pool)) };
    if a.json {
        let out: Vec<serde_json::Value> = results
            .iter()
            .map(|(_, np, ng, avg, sd, samples)| {
                let mut o = serde_json::json!({
                    "model_filename": path.display().to_string(),
                    "model_size": file_size,
                    "n_prompt": np,
                    "n_gen": ng,
                    "n_threads": n_threads,
                    "avg_ts": avg,
                    "stddev_ts": sd,
                    "samples_ts": samples,
                    "kernels": smelt_kernels::dispatch::kernels().isa.name(),
                });
                if *ng > 0 {
                    o["weight_bytes_per_token"] = bytes.into();
                    if let Some(bw) = bw {
                        o["memory_bandwidth_gbs"] = bw.into();
                        o["bandwidth_fraction"] = (bytes as f64 * avg / 1e9 / bw).into();
                    }
                }
                o
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("| model | size | threads | test | t/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (test, _, _, avg, sd, _) in &results {
        println!("| {name} | {:.1} MiB | {n_threads} | {test} | {avg:.2} ± {sd:.2} |", file_size as f64 / (1 << 20) as f64);
    }
    if let Some((_, _, _, avg, _, _)) = results.iter().find(|r| r.2 > 0) {
        let per_tok = bytes as f64 / 1e6;
        print!("generation reads {per_tok:.0} MB of weights per token: {:.1} GB/s", per_tok * avg / 1e3);
        match bw {
            Some(bw) => println!(" of {bw:.1} GB/s measured memory bandwidth ({:.0}%; bound {:.1} t/s)", 100.0 * per_tok * avg / 1e3 / bw, bw * 1e3 / per_tok),
            None => println!(),
        }
    }
    Ok(())
}
