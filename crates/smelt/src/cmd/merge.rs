//! `smelt merge`: fold LoRA adapters into a new GGUF model, re-quantized to the base's formats.

use crate::common::model_path;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use smelt_model::lora::parse_file_scale;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a .gguf path, a stored name, or a pullable short name.
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    model: String,
    /// Adapter to fold in, FILE or FILE:SCALE (repeatable; scales as llama.cpp's --lora-scaled).
    #[arg(long, required = true, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// The merged model (GGUF).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let base = model_path(&a.model)?;
    let adapters: Vec<(PathBuf, f32)> = a.lora.iter().map(|l| parse_file_scale(l)).map(|(f, s)| (PathBuf::from(f), s)).collect();
    anyhow::ensure!(std::fs::canonicalize(&a.out).ok() != std::fs::canonicalize(&base).ok(), "--out is the base model itself; write the merged model to another file");
    let bar = ProgressBar::new(1);
    bar.set_style(ProgressStyle::with_template("merging [{bar:30}] {pos}/{len} tensors").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    let t = Instant::now();
    let stats = smelt_model::merge::merge(&base, &adapters, &a.out, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("cannot merge into {}", base.display()))?;
    bar.finish_and_clear();
    anyhow::ensure!(stats.tensors > 0, "the adapters change no tensor of {}", base.display());
    eprintln!("wrote {}: {} tensors changed ({:.1} M weights, re-quantized to their formats) in {:.1}s", a.out.display(), stats.tensors, stats.elements as f64 / 1e6, t.elapsed().as_secs_f64());
    Ok(())
}
