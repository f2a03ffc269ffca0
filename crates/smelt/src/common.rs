//! What several commands share: finding (and if needed pulling) a model, loading it, threads.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use smelt_engine::disk_cache::DiskCache;
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::kv::{KvType, KvTypes};
use smelt_model::lora::{parse_file_scale, Adapter, LoraSet};
use smelt_store::{Progress, Store};
use std::path::PathBuf;
use std::sync::Arc;

/// Options every model-running command takes.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model: a .gguf path, a stored name, or a pullable short name (pulled on first use).
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    pub model: String,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Context size in tokens (default: 4096; 0: the model's training context, also the most).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Apply a LoRA adapter (GGUF), optionally scaled (repeatable; as llama.cpp's
    /// --lora / --lora-scaled).
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,
    #[command(flatten)]
    pub kv: KvArgs,
}

/// How the KV cache stores keys and values (llama.cpp's flag names).
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct KvArgs {
    /// KV cache type for keys: f16, q8_0 (half the memory, near-identical results) or q4_0.
    #[arg(long, value_name = "TYPE", default_value = "f16", value_parser = KvType::parse)]
    pub cache_type_k: KvType,
    /// KV cache type for values: f16, q8_0 or q4_0.
    #[arg(long, value_name = "TYPE", default_value = "f16", value_parser = KvType::parse)]
    pub cache_type_v: KvType,
}

impl KvArgs {
    pub fn types(&self) -> KvTypes {
        KvTypes { k: self.cache_type_k, v: self.cache_type_v }
    }
}

/// The persistent prefix cache (`--kv-cache-dir`), for `serve`, `generate` and `run`.
#[derive(clap::Args, Clone, Debug)]
pub struct DiskArgs {
    /// Keep computed KV blocks on disk in DIR and read them back for prompts that start the
    /// same way, also in later runs (the server and the CLI share the format).
    #[arg(long, value_name = "DIR")]
    pub kv_cache_dir: Option<PathBuf>,
    /// Most disk the KV cache directory may take, e.g. 10G (least recently used blocks go first).
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = crate::cmd::serve::parse_size)]
    pub kv_disk: u64,
}

impl DiskArgs {
    pub fn open(&self) -> Result<Option<Arc<DiskCache>>> {
        let Some(dir) = &self.kv_cache_dir else { return Ok(None) };
        anyhow::ensure!(!dir.exists() || dir.is_dir(), "--kv-cache-dir {} is not a directory", dir.display());
        let cache = DiskCache::open(dir, self.kv_disk).with_context(|| format!("cannot use --kv-cache-dir {}", dir.display()))?;
        Ok(Some(Arc::new(cache)))
    }
}

pub fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template("{msg:26} [{bar:25}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// A bar counting items (model calls, probes) rather than bytes.
pub fn count_bar(msg: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(ProgressStyle::with_template("{msg:50} [{bar:30}] {pos}/{len} eta {eta}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
    pb.set_message(msg.into());
    pb
}

/// A progress callback drawing `pb`.
pub fn report_to(pb: &ProgressBar) -> impl FnMut(Progress) + '_ {
    move |p: Progress| {
        if let Some(t) = p.total {
            pb.set_length(t);
        }
        pb.set_position(p.done);
        pb.set_message(p.stage);
    }
}

/// The model file for a `--model` argument, pulling known models that are not stored yet.
pub fn model_path(model: &str) -> Result<PathBuf> {
    let store = Store::from_env();
    match store.resolve(model) {
        Ok(p) => Ok(p),
        Err(e) => {
            if smelt_store::known_models().iter().any(|m| m.name == model) {
                eprintln!("{model} is not in the store yet; pulling it");
                pull(&store, model)
            } else {
                Err(e.into())
            }
        }
    }
}

/// Text given as an argument, in a file (`-` for standard input), or piped in; `missing` is the
/// error when there is none. One final newline of a file or piped text is dropped, as llama.cpp's
/// `-f` does (an editor's or `echo`'s, not part of the prompt).
pub fn read_text(arg: Option<&str>, file: Option<&std::path::Path>, missing: &str) -> Result<String> {
    use std::io::{IsTerminal, Read};
    fn read_stdin() -> Result<String> {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("standard input is not UTF-8 text")?;
        Ok(without_final_newline(s))
    }
    fn without_final_newline(mut s: String) -> String {
        if s.ends_with('\n') {
            s.pop();
        }
        s
    }
    match (arg, file) {
        (Some(t), _) => Ok(t.to_string()),
        (None, Some(p)) if p.as_os_str() == "-" => read_stdin(),
        (None, Some(p)) => {
            let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            String::from_utf8(bytes).map(without_final_newline).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", p.display()))
        }
        // Piped-in text; nothing at all (a closed or empty input) is a missing argument.
        (None, None) if !std::io::stdin().is_terminal() => Some(read_stdin()?).filter(|t| !t.is_empty()).context(missing.to_string()),
        (None, None) => anyhow::bail!("{missing}"),
    }
}

/// A model's short name: its store name, or a file's name without `.gguf` (also its API id
/// when served).
pub fn model_id(arg: &str) -> String {
    let p = std::path::Path::new(arg);
    if p.is_file() {
        p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| arg.to_string())
    } else {
        arg.strip_suffix(".gguf").unwrap_or(arg).to_string()
    }
}

/// Pull a model with a progress bar, then say what was done in one line on standard error.
pub fn pull(store: &Store, name: &str) -> Result<PathBuf> {
    let stamp = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let before = store.path_of(name).ok().and_then(|p| stamp(&p));
    let start = std::time::Instant::now();
    let pb = progress_bar();
    let path = store.pull(name, &mut report_to(&pb))?;
    pb.finish_and_clear();
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let secs = start.elapsed().as_secs_f64();
    // A stored copy that failed its check is downloaded again: say so, by the file's new time.
    if before.is_some() && before == stamp(&path) {
        eprintln!("{name}: already in the store, checked ({})", smelt_store::human_size(bytes));
    } else {
        let rate = smelt_store::human_size((bytes as f64 / secs.max(1e-3)) as u64);
        eprintln!("{name}: pulled {} in {secs:.1}s ({rate}/s), checked", smelt_store::human_size(bytes));
    }
    Ok(path)
}

/// The default database of stored completions: `$SMELT_HOME/smelt.db`.
pub fn default_database() -> PathBuf {
    Store::from_env().root().join("smelt.db")
}

/// A duration such as `30d`, `12h`, `90m` or `45s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?} (use e.g. 30d, 12h, 90m, 45s)"))?;
    let secs = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => return Err(format!("bad duration unit in {s:?} (d, h, m or s)")),
    };
    if n == 0 {
        return Err(format!("duration must be positive, got {s:?}"));
    }
    n.checked_mul(secs).map(std::time::Duration::from_secs).ok_or_else(|| format!("duration {s:?} is too long"))
}

pub fn threads(requested: Option<usize>) -> usize {
    requested.filter(|&t| t > 0).unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub fn load(args: &ModelArgs) -> Result<(Arc<Model>, Arc<ThreadPool>, usize)> {
    let path = model_path(&args.model)?;
    let model = Model::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    model.check_kv_types(args.kv.types())?;
    let n_ctx = context_size(args.ctx, model.hp.n_ctx_train);
    let pool = Arc::new(ThreadPool::new(threads(args.threads)));
    Ok((Arc::new(model), pool, n_ctx))
}

/// The context for a `--ctx` argument: 4096 by default, 0 for the model's full training
/// context, never more than that.
pub fn context_size(ctx: Option<usize>, n_ctx_train: usize) -> usize {
    match ctx {
        None => 4096.min(n_ctx_train),
        Some(0) => n_ctx_train,
        Some(c) => c.min(n_ctx_train),
    }
    .max(1)
}

/// The adapters of `--lora FILE[:SCALE]` arguments, checked against `model`.
pub fn loras(model: &Model, args: &[String]) -> Result<LoraSet> {
    let mut set = LoraSet::default();
    for arg in args {
        let (file, scale) = parse_file_scale(arg);
        anyhow::ensure!(scale.is_finite(), "--lora {arg}: the scale must be a finite number");
        let name = std::path::Path::new(&file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let adapter = Adapter::load(std::path::Path::new(&file), model, &name)?;
        eprintln!("adapter {file}: rank {}, alpha {}, scale {scale}", adapter.rank(), adapter.alpha);
        set.adapters.push((Arc::new(adapter), scale));
    }
    Ok(set)
}

/// Sampling options shared by `run` and `generate`.
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature (0 = greedy).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than MIN_P × the most likely (0 = off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalize repeating recent tokens (1 = off).
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Penalty for tokens present in the recent text.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Penalty per occurrence in the recent text.
    #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties consider (0 = all).
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Bias a token's logit: ID=BIAS (repeatable; BIAS may be -inf to ban the token).
    #[arg(long = "logit-bias", value_parser = parse_bias, allow_hyphen_values = true)]
    pub logit_bias: Vec<(u32, f32)>,
    /// Random seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
}

fn parse_bias(s: &str) -> Result<(u32, f32), String> {
    let (id, b) = s.split_once('=').ok_or("expected ID=BIAS")?;
    let id = id.trim().parse::<u32>().map_err(|_| format!("bad token id {id:?}"))?;
    let b = b.trim().parse::<f32>().map_err(|_| format!("bad bias {b:?}"))?;
    Ok((id, b))
}

impl SamplingArgs {
    pub fn params(&self) -> smelt_engine::SamplingParams {
        smelt_engine::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.repeat_last_n,
            logit_bias: self.logit_bias.clone(),
            seed: self.seed,
        }
    }
}
