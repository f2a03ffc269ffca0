//! `smelt perplexity`: a model's perplexity over a text file, computed as llama.cpp's
//! `llama-perplexity` does, so the two can be compared number for number and changes to kernels,
//! KV formats or adapters judged on quality rather than speed alone.
//!
//! The text is tokenized once (BOS as the model asks, special-token text as plain text) and cut
//! into chunks of `--ctx` tokens. Each chunk is evaluated from an empty cache, its first token
//! replaced by BOS where the model uses one, and only the second half of each chunk is scored,
//! so that every scored token has at least half a context before it.

use crate::common::{count_bar, load, loras, read_text, ModelArgs};
use anyhow::Result;
use smelt_model::arch::{BatchToken, Workspace};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf path, a stored name, or a pullable short name (pulled on first use).
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    model: String,
    /// The text (a file; "-" for standard input).
    #[arg(long, short = 'f', value_name = "FILE")]
    file: std::path::PathBuf,
    /// Tokens per chunk (llama-perplexity's default is 512; 0: the model's training context).
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks (default: as many as the text fills).
    #[arg(long)]
    chunks: Option<usize>,
    /// Tokens per forward pass.
    #[arg(long, short = 'b', default_value_t = 512)]
    batch: usize,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Apply a LoRA adapter (GGUF), optionally scaled (repeatable).
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    #[command(flatten)]
    kv: crate::common::KvArgs,
    /// Print one JSON object (perplexity, its standard error, the running value after each
    /// chunk) instead of text.
    #[arg(long)]
    json: bool,
}

/// Running sums of the negative log-likelihood, as llama-perplexity keeps them.
#[derive(Default)]
struct Nll {
    sum: f64,
    sum_sq: f64,
    count: usize,
}

impl Nll {
    fn add(&mut self, logits: &[f32], token: u32) {
        let v = -log_softmax_at(logits, token as usize);
        self.sum += v;
        self.sum_sq += v * v;
        self.count += 1;
    }

    fn perplexity(&self) -> f64 {
        (self.sum / self.count.max(1) as f64).exp()
    }

    /// The standard error of the perplexity estimate (llama-perplexity's "+/-").
    fn error(&self) -> f64 {
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = self.sum_sq / n - mean * mean;
        if var > 0.0 && self.count > 1 {
            (var / (n - 1.0)).sqrt() * mean.exp()
        } else {
            0.0
        }
    }
}

/// log p(token) under the softmax of `logits`: the maximum in f32, the sum of exponentials in
/// f64, as llama-perplexity computes it.
fn log_softmax_at(logits: &[f32], token: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max).exp()) as f64).sum();
    (logits[token] - max) as f64 - sum.ln()
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.ctx == 0 || a.ctx >= 4, "--ctx must be at least 4 tokens (or 0 for the model's training context)");
    anyhow::ensure!(a.batch >= 1, "--batch must be at least 1");
    let text = read_text(None, Some(&a.file), "give the text with --file FILE")?;
    let margs = ModelArgs { model: a.model.clone(), threads: a.threads, ctx: Some(a.ctx), lora: a.lora.clone(), kv: a.kv };
    let (model, pool, _) = load(&margs)?;
    anyhow::ensure!(a.ctx <= model.hp.n_ctx_train, "--ctx {} is beyond the model's training context of {} tokens", a.ctx, model.hp.n_ctx_train);
    let lora = loras(&model, &a.lora)?;
    let tok = &model.tokenizer;
    let tokens = tok.encode(&text, true, false);
    let n_ctx = if a.ctx == 0 { model.hp.n_ctx_train } else { a.ctx };
    anyhow::ensure!(
        tokens.len() >= 2 * n_ctx,
        "{} tokenizes to {} tokens; perplexity with --ctx {n_ctx} needs at least {} (a longer text or a smaller --ctx)",
        a.file.display(),
        tokens.len(),
        2 * n_ctx
    );
    let n_chunks = (tokens.len() / n_ctx).min(a.chunks.unwrap_or(usize::MAX));
    anyhow::ensure!(n_chunks > 0, "--chunks must be at least 1");
    let batch = a.batch.min(n_ctx);
    let first = n_ctx / 2;
    let bos = if tok.add_bos { tok.bos } else { None };
    eprintln!(
        "{} tokens; {n_chunks} chunks of {n_ctx} (scoring the last {} of each), batch {batch}, {} threads, KV cache {}",
        tokens.len(),
        n_ctx - 1 - first,
        pool.n_threads(),
        a.kv.types().describe()
    );

    let mut ws = Workspace::new(pool.clone());
    let mut nll = Nll::default();
    let mut running = Vec::with_capacity(n_chunks);
    let bar = count_bar("perplexity");
    bar.set_length(n_chunks as u64);
    let start = Instant::now();
    for c in 0..n_chunks {
        let chunk = &tokens[c * n_ctx..(c + 1) * n_ctx];
        let mut kv = vec![model.new_cache_typed(n_ctx, batch, a.kv.types())?];
        for b in (0..n_ctx).step_by(batch) {
            let end = (b + batch).min(n_ctx);
            let pass: Vec<BatchToken> = (b..end)
                .map(|pos| BatchToken { token: if pos == 0 { bos.unwrap_or(chunk[0]) } else { chunk[pos] }, pos, seq: 0, logits: pos >= first })
                .collect();
            let logits = model.forward_lora(&pass, &mut kv, &mut ws, &[&lora])?;
            // Scored as each pass returns (a chunk's logits can be gigabytes): the logits at
            // position p predict the token at p + 1, and the chunk's last position predicts
            // nothing in it.
            let scored: Vec<usize> = (b.max(first)..end).collect();
            if scored.is_empty() {
                continue;
            }
            let n_vocab = logits.len() / scored.len();
            for (row, &pos) in scored.iter().enumerate().filter(|(_, &p)| p + 1 < n_ctx) {
                nll.add(&logits[row * n_vocab..(row + 1) * n_vocab], chunk[pos + 1]);
            }
        }
        running.push(nll.perplexity());
        bar.set_message(format!("perplexity {:.4}", nll.perplexity()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    let evaluated = n_chunks * n_ctx;
    if a.json {
        let out = serde_json::json!({
            "model": crate::common::model_id(&a.model),
            "n_ctx": n_ctx,
            "type_k": a.kv.cache_type_k.name(),
            "type_v": a.kv.cache_type_v.name(),
            "chunks": n_chunks,
            "tokens_scored": nll.count,
            "perplexity": nll.perplexity(),
            "error": nll.error(),
            "running": running,
            "seconds": secs,
            "tokens_per_second": evaluated as f64 / secs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        // The running value after each chunk, then the estimate, in llama-perplexity's format.
        println!("{}", running.iter().enumerate().map(|(i, p)| format!("[{}]{p:.4}", i + 1)).collect::<Vec<_>>().join(","));
        println!("Final estimate: PPL = {:.4} +/- {:.5}", nll.perplexity(), nll.error());
        eprintln!("{evaluated} tokens evaluated in {secs:.1}s ({:.1} tokens/s)", evaluated as f64 / secs);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_the_definition() {
        let logits = [1.0f32, 2.0, 3.0, -1.0];
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for t in 0..4 {
            assert!((log_softmax_at(&logits, t) - ((logits[t] as f64).exp() / z).ln()).abs() < 1e-6);
        }
        // Uniform logits over n tokens: perplexity n.
        let mut nll = Nll::default();
        for t in 0..8 {
            nll.add(&[0.5; 8], t);
        }
        assert!((nll.perplexity() - 8.0).abs() < 1e-9);
        assert_eq!(nll.error(), 0.0);
    }
}
