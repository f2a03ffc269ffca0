//! `smelt tune`: LoRA fine-tuning from a JSONL dataset, written as a GGUF adapter that smelt
//! (`--lora`, `serve --lora`) and llama.cpp load.

use crate::common::{model_path, threads};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_train::data;
use smelt_train::model::Example;
use smelt_train::train::{Trainer, TuneConfig};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a .gguf path, a stored name, or a pullable short name.
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    model: String,
    /// Training data: JSONL, one {"messages": [...]} or {"prompt", "completion"} per line.
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// Validation data (same format): its loss is measured after every epoch.
    #[arg(long)]
    validation: Option<PathBuf>,
    /// Where to write the adapter (GGUF).
    #[arg(long, short = 'o', required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// LoRA alpha (the delta is scaled by alpha / rank).
    #[arg(long, default_value_t = 32.0)]
    alpha: f32,
    /// Dropout on the LoRA branch's input.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Projections to adapt.
    #[arg(long, default_value = "q,k,v,o,gate,up,down", value_delimiter = ',')]
    targets: Vec<String>,
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 2e-4)]
    lr: f32,
    /// Tokens per optimizer step.
    #[arg(long, default_value_t = 2048)]
    batch_tokens: usize,
    /// Examples per optimizer step instead of --batch-tokens (OpenAI's batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Warmup steps (then linear decay to 0).
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Recompute activations in the backward pass instead of keeping them: the memory of one
    /// layer's activations instead of every layer's, for about a third more time.
    #[arg(long)]
    recompute: bool,
    /// Longest example in tokens.
    #[arg(long, default_value_t = 2048)]
    ctx: usize,
    /// Checkpoint directory (default: OUT with .ckpt appended).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Steps between checkpoints.
    #[arg(long, default_value_t = 10)]
    checkpoint_every: usize,
    /// Continue the run whose checkpoint is in DIR (after an interruption, even kill -9).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Print one JSON event per step on stdout instead of a progress bar.
    #[arg(long)]
    json: bool,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
}

/// What a checkpoint keeps of the command line, to resume with.
#[derive(Serialize, Deserialize)]
struct RunArgs {
    model: String,
    data: PathBuf,
    validation: Option<PathBuf>,
    out: PathBuf,
    ctx: usize,
    checkpoint_every: usize,
}

fn load_data(model: &Model, path: &Path, ctx: usize) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    data::dataset(model, &text, ctx).map_err(|errs| {
        for e in errs.iter().take(20) {
            eprintln!("{}: {e}", path.display());
        }
        if errs.len() > 20 {
            eprintln!("{}: ... and {} more", path.display(), errs.len() - 20);
        }
        anyhow::anyhow!("{}: {} bad line(s); fix them and run again (nothing was trained)", path.display(), errs.len())
    })
}

pub fn run(a: Args) -> Result<()> {
    let (cfg, run_args, resume) = match &a.resume {
        Some(dir) => {
            let state = Trainer::read_checkpoint(dir).map_err(anyhow::Error::msg)?;
            let run: RunArgs = serde_json::from_value(state.extra["caller"].clone()).context("the checkpoint does not hold its run's arguments")?;
            (state.cfg.clone(), run, Some((dir.clone(), state)))
        }
        None => {
            let cfg = TuneConfig {
                rank: a.rank,
                alpha: a.alpha,
                dropout: a.dropout,
                targets: a.targets.clone(),
                epochs: a.epochs,
                lr: a.lr,
                batch_tokens: a.batch_tokens,
                batch_examples: a.batch_size.unwrap_or(0),
                warmup: a.warmup,
                weight_decay: a.weight_decay,
                seed: a.seed,
                clip: 1.0,
                recompute: a.recompute,
            };
            cfg.validate().map_err(anyhow::Error::msg)?;
            let model = std::fs::canonicalize(model_path(&a.model)?)?.to_string_lossy().into_owned();
            let abs = |p: &Path| std::fs::canonicalize(p).with_context(|| format!("cannot read {}", p.display()));
            let out = a.out.clone().expect("required");
            let run = RunArgs { model, data: abs(a.data.as_ref().expect("required"))?, validation: a.validation.as_deref().map(abs).transpose()?, out, ctx: a.ctx, checkpoint_every: a.checkpoint_every.max(1) };
            (cfg, run, None)
        }
    };
    let ckpt_dir = match (&resume, &a.checkpoint_dir) {
        (Some((dir, _)), _) => dir.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => PathBuf::from(format!("{}.ckpt", run_args.out.display())),
    };
    let model = Model::load(Path::new(&run_args.model)).with_context(|| format!("cannot load {}", run_args.model))?;
    let train = load_data(&model, &run_args.data, run_args.ctx)?;
    let valid = match &run_args.validation {
        Some(p) => load_data(&model, p, run_args.ctx)?,
        None => Vec::new(),
    };
    let pool = ThreadPool::new(threads(a.threads));
    let n_threads = pool.n_threads();
    let t_setup = Instant::now();
    let mut trainer = Trainer::new(&model, &pool, cfg, &train).map_err(anyhow::Error::msg)?;
    if let Some((dir, state)) = &resume {
        trainer.restore(dir, state).map_err(anyhow::Error::msg)?;
    }
    let counted: usize = train.iter().map(|e| e.counted()).sum();
    let total_tokens: usize = train.iter().map(|e| e.tokens.len()).sum();
    eprintln!(
        "{}: {} examples ({total_tokens} tokens, {counted} trained on), {} validation; rank {} on {}; {} steps of ~{} tokens over {} epochs; {n_threads} threads; set up in {:.1}s ({} for training)",
        model.name,
        train.len(),
        valid.len(),
        trainer.cfg.rank,
        trainer.cfg.targets.join(","),
        trainer.steps(),
        trainer.cfg.batch_tokens,
        trainer.cfg.epochs,
        t_setup.elapsed().as_secs_f64(),
        smelt_store::human_size(trainer.extra_bytes() as u64)
    );
    if trainer.step > 0 {
        eprintln!("resuming at step {} of {} from {}", trainer.step, trainer.steps(), ckpt_dir.display());
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        let pb = ProgressBar::new(trainer.steps() as u64);
        pb.set_style(ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        pb.set_position(trainer.step as u64);
        pb
    };
    let extra = serde_json::to_value(&run_args)?;
    let started = Instant::now();
    let mut tokens = 0;
    let mut last_valid = None;
    while let Some(ev) = trainer.next_step(&train, &valid, started, &mut tokens) {
        if ev.valid_loss.is_some() {
            last_valid = ev.valid_loss;
        }
        if a.json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            let v = last_valid.map_or(String::new(), |v| format!(" valid {v:.4}"));
            bar.set_message(format!("epoch {}/{} loss {:.4}{v} {:.0} tok/s eta {:.0}s", ev.epoch, ev.epochs, ev.train_loss, ev.tokens_per_s, ev.eta_s));
            bar.set_position(ev.step as u64);
        }
        if ev.step % run_args.checkpoint_every == 0 || ev.step == ev.steps {
            trainer.save_checkpoint(&ckpt_dir, extra.clone()).with_context(|| format!("cannot write the checkpoint to {}", ckpt_dir.display()))?;
        }
    }
    bar.finish_and_clear();
    let name = run_args.out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "adapter".into());
    let adapter = trainer.adapter(&name).map_err(anyhow::Error::msg)?;
    let tmp = run_args.out.with_extension("gguf.tmp");
    std::fs::write(&tmp, adapter.to_gguf().to_bytes()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &run_args.out).with_context(|| format!("cannot write {}", run_args.out.display()))?;
    let (first, last) = (trainer.history.first().map_or(0.0, |h| h.0), trainer.history.last().map_or(0.0, |h| h.0));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} (rank {}, {}); train loss {first:.4} → {last:.4}{}; {tokens} tokens in {secs:.1}s ({:.1} tokens/s, {n_threads} threads)",
        run_args.out.display(),
        adapter.rank(),
        smelt_store::human_size(adapter.bytes as u64),
        last_valid.map_or(String::new(), |v| format!(", validation loss {v:.4}")),
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
