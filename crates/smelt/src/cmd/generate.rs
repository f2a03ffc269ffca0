//! `smelt generate`: complete a prompt, streaming text or printing one JSON object.

use crate::common::{load, ModelArgs, SamplingArgs};
use anyhow::{Context, Result};
use smelt_engine::grammar::Compiled;
use smelt_engine::{GenerateParams, Session};
use std::io::Write;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    disk: crate::common::DiskArgs,
    /// The prompt (BOS is added as the model asks; special-token text is parsed).
    #[arg(long, short = 'p', conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file ("-" for standard input), for prompts too long for the
    /// command line.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<std::path::PathBuf>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Report the K most likely alternatives at each step (with --json).
    #[arg(long, default_value_t = 0)]
    logprobs: usize,
    /// Keep generating past end-of-generation tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object: prompt_ids, output_ids, text, steps, finish_reason.
    #[arg(long)]
    json: bool,
    /// Constrain the output to instances of the JSON Schema in FILE.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["grammar", "regex"])]
    json_schema: Option<std::path::PathBuf>,
    /// Constrain the output to the GBNF grammar (llama.cpp's format, rule `root`) in FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "regex")]
    grammar: Option<std::path::PathBuf>,
    /// Constrain the output to text the regular expression matches in full.
    #[arg(long, value_name = "RE")]
    regex: Option<String>,
}

/// The output constraint asked for on the command line.
fn constraint(a: &Args) -> Result<Option<Compiled>> {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    Ok(if let Some(p) = &a.json_schema {
        let schema: serde_json::Value = serde_json::from_str(&read(p)?).map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", p.display()))?;
        Some(Compiled::json_schema(&schema).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
    } else if let Some(p) = &a.grammar {
        Some(Compiled::gbnf(&read(p)?).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?)
    } else if let Some(re) = &a.regex {
        Some(Compiled::regex(re).map_err(|e| anyhow::anyhow!("--regex: {e}"))?)
    } else {
        None
    })
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(a.logprobs <= 100, "--logprobs must be at most 100");
    anyhow::ensure!(a.logprobs == 0 || a.json, "--logprobs needs --json (the alternatives are reported in its steps)");
    let grammar = constraint(&a)?;
    let text = crate::common::read_text(a.prompt.as_deref(), a.prompt_file.as_deref(), "give the prompt with --prompt TEXT, --prompt-file FILE, or on standard input")?;
    let (model, pool, n_ctx) = load(&a.model)?;
    let prompt = model.tokenizer.encode_prompt(&text);
    let mut session = Session::new(model.clone(), pool, n_ctx);
    session.set_kv_types(a.model.kv.types())?;
    session.set_lora(crate::common::loras(&model, &a.model.lora)?);
    if let Some(cache) = a.disk.open()? {
        session.set_disk_cache(cache).context("cannot read the model file for the KV disk cache")?;
    }
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: a.sampling.params(),
        stop: a.stop.clone(),
        ignore_eos: a.ignore_eos,
        // The JSON output reports every token's log-probability.
        logprobs: a.json,
        top_logprobs: a.logprobs,
        grammar,
    };
    let start = Instant::now();
    let mut first_token = None;
    let stdout = std::io::stdout();
    let gen = session.generate(&prompt, &params, |step| {
        first_token.get_or_insert_with(Instant::now);
        if !a.json {
            let mut out = stdout.lock();
            let _ = out.write_all(step.text.as_bytes());
            let _ = out.flush();
        }
        true
    })?;
    let end = Instant::now();
    if a.json {
        let steps: Vec<serde_json::Value> = gen
            .steps
            .iter()
            .map(|s| serde_json::json!({"id": s.id, "logprob": s.logprob, "top": s.top.iter().map(|(i, l)| serde_json::json!([i, l])).collect::<Vec<_>>()}))
            .collect();
        let out = serde_json::json!({
            "prompt_ids": prompt,
            "output_ids": gen.steps.iter().map(|s| s.id).collect::<Vec<_>>(),
            "text": gen.text,
            "steps": steps,
            "finish_reason": gen.finish,
        });
        println!("{out}");
    } else {
        println!();
        let first = first_token.unwrap_or(end);
        let pp = (first - start).as_secs_f64();
        let tg = (end - first).as_secs_f64();
        let n = gen.steps.len();
        eprintln!(
            "[prompt {} tokens{} in {:.2}s ({:.1} t/s) | generated {} tokens ({:.1} t/s) | {}]",
            prompt.len(),
            match session.disk_read_tokens {
                0 => String::new(),
                n => format!(" ({n} read from the KV disk cache)"),
            },
            pp,
            prompt.len() as f64 / pp.max(1e-9),
            n,
            if n > 1 { (n - 1) as f64 / tg.max(1e-9) } else { 0.0 },
            // The same names as --json and the API: stop, length, cancelled.
            serde_json::to_value(gen.finish).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
        );
    }
    Ok(())
}
