//! `smelt serve`: the OpenAI-compatible HTTP server.

use crate::common::{default_database, model_id, model_path, parse_duration, threads};
use anyhow::{Context, Result};
use smelt_engine::disk_cache::DiskCache;
use smelt_engine::scheduler::{Engine, EngineConfig};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::kv::{BlockPool, KvType, KvTypes, BLOCK_SIZE};
use smelt_server::keys::{parse_key_file, KeySpec, Keys};
use smelt_model::lora::Adapter;
use smelt_server::state::ServedAdapter;
use smelt_server::{AppState, ModelEntry, ServerConfig};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Model to serve (repeatable): a .gguf path, a stored name, or a pullable short name.
    #[arg(long, short = 'm')]
    model: Vec<String>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require this API key (clients send `Authorization: Bearer KEY`).
    #[arg(long, env = "SMELT_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Read API keys from a file: one per line, each optionally followed by `name=NAME`,
    /// `rpm=N`, `tpm=N` (tokens per minute) and `concurrency=N`; `#` starts a comment.
    #[arg(long, conflicts_with = "api_key")]
    api_key_file: Option<std::path::PathBuf>,
    /// Context size per sequence in tokens (default 4096; 0: the model's training context, also the most).
    #[arg(long)]
    ctx: Option<usize>,
    /// Most sequences generated at once.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Memory for the KV cache of each model, e.g. 512M, 2G.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    kv_memory: u64,
    /// KV cache type for keys: f16, q8_0 (half the memory of f16, near-identical results) or
    /// q4_0; `MODEL=TYPE` sets one model's (repeatable).
    #[arg(long, value_name = "[MODEL=]TYPE")]
    cache_type_k: Vec<String>,
    /// KV cache type for values: f16, q8_0 or q4_0; `MODEL=TYPE` sets one model's (repeatable).
    #[arg(long, value_name = "[MODEL=]TYPE")]
    cache_type_v: Vec<String>,
    #[command(flatten)]
    disk: crate::common::DiskArgs,
    /// Most tokens per forward pass (prompt chunks and decodes together).
    #[arg(long, default_value_t = 256)]
    step_tokens: usize,
    /// Requests that may wait for a slot before the server answers 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    max_body: usize,
    /// Worker threads for the model (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Serve a LoRA adapter (repeatable): `NAME=FILE` for the first model, `BASE:NAME=FILE`
    /// for another. Requests pick it with the model id `BASE:NAME`; more can be loaded and
    /// unloaded while serving (POST / DELETE /v1/adapters).
    #[arg(long, value_name = "[BASE:]NAME=FILE")]
    lora: Vec<String>,
    /// Where uploaded files and fine-tuning jobs are kept (default: $SMELT_HOME/server).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<std::path::PathBuf>,
    /// Threads for fine-tuning jobs, at the lowest CPU priority (default: --threads).
    #[arg(long)]
    train_threads: Option<usize>,
    /// Which chat completions to keep in the database: those sent with `store: true`
    /// (request), every one (all), or none (off).
    #[arg(long, default_value = "request", value_parser = ["request", "all", "off"])]
    store: String,
    /// The database of stored completions and feedback (default: $SMELT_HOME/smelt.db).
    #[arg(long, value_name = "PATH")]
    database: Option<std::path::PathBuf>,
    /// Guardrails on chat requests and answers: `DIRECTION:TARGET=ACTION`, comma-separated;
    /// DIRECTION input or output, TARGET all, pii, secrets, injection or one detector (email,
    /// phone, payment_card, iban, national_id, api_key, private_key, credential), ACTION block
    /// or redact. E.g. `input:injection=block,output:pii=redact`.
    #[arg(long, value_name = "RULES", value_parser = smelt_guard::parse_policy)]
    guard: Option<smelt_guard::Policy>,
    /// One log line per request on standard error: text, json, or off.
    #[arg(long, default_value = "text", value_parser = ["text", "json", "off"])]
    log_format: String,
    /// On SIGINT/SIGTERM, how long running requests may take to finish before the server stops.
    #[arg(long, value_name = "AGE", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: std::time::Duration,
    /// The model that answers requests which name none (default: the first --model).
    #[arg(long, value_name = "MODEL")]
    default_model: Option<String>,
    /// A served model (or adapter) that judges /v1/moderations requests by default, on top of the
    /// detectors.
    #[arg(long, value_name = "MODEL")]
    moderation_model: Option<String>,
    /// Delete stored completions older than this (e.g. 30d, 12h); default: keep them.
    #[arg(long, value_name = "AGE", value_parser = parse_duration)]
    store_retention: Option<std::time::Duration>,
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("bad size {s:?} (use e.g. 512M or 2G)"))?;
    if !(v > 0.0) {
        return Err(format!("size must be positive, got {s:?}"));
    }
    Ok((v * mult as f64) as u64)
}

/// `--cache-type-k` / `-v` arguments as (model, or None for every model; type), checked before
/// anything loads: every type known, every `MODEL=` one of `ids`.
fn parse_kv_types(flag: &str, args: &[String], ids: &[String]) -> Result<Vec<(Option<String>, KvType)>> {
    args.iter()
        .map(|arg| {
            let (model, t) = match arg.rsplit_once('=') {
                Some((m, t)) => {
                    anyhow::ensure!(ids.iter().any(|id| id == m), "{flag} {arg}: {m:?} is not one of the models served ({})", ids.join(", "));
                    (Some(m.to_string()), t)
                }
                None => (None, arg.as_str()),
            };
            Ok((model, KvType::parse(t).map_err(|e| anyhow::anyhow!("{flag} {arg}: {e}"))?))
        })
        .collect()
}

/// The type parsed arguments give model `id`: its own last `id=TYPE`, else the last plain
/// `TYPE`, else f16.
fn kv_type_for(parsed: &[(Option<String>, KvType)], id: &str) -> KvType {
    let own = parsed.iter().rev().find(|(m, _)| m.as_deref() == Some(id));
    let plain = parsed.iter().rev().find(|(m, _)| m.is_none());
    own.or(plain).map_or(KvType::F16, |p| p.1)
}

fn load_engine(arg: &str, a: &Args, kv_types: KvTypes, kv_disk: &Option<Arc<DiskCache>>) -> Result<ModelEntry> {
    let path = model_path(arg)?;
    let model = Arc::new(Model::load(&path).with_context(|| format!("cannot load {}", path.display()))?);
    let n_ctx = crate::common::context_size(a.ctx, model.hp.n_ctx_train);
    anyhow::ensure!(n_ctx >= 16, "--ctx must be at least 16");
    let id = model_id(arg);
    model.check_kv_types(kv_types).with_context(|| format!("cannot serve {id}"))?;
    let block = BlockPool::block_bytes(model.hp.n_layer, model.kv_row(), kv_types) as u64;
    let kv_blocks = (a.kv_memory / block) as usize;
    anyhow::ensure!(
        kv_blocks * BLOCK_SIZE >= n_ctx,
        "--kv-memory {} holds {} tokens of {arg}'s KV cache, less than one context of {n_ctx}; raise --kv-memory or lower --ctx",
        smelt_store::human_size(a.kv_memory),
        kv_blocks * BLOCK_SIZE
    );
    let pool = Arc::new(ThreadPool::new(threads(a.threads)));
    let config = EngineConfig { n_ctx, max_seqs: a.max_batch.max(1), kv_blocks, step_tokens: a.step_tokens.max(1), queue: a.queue.max(1), kv_types, kv_disk: kv_disk.clone() };
    let no_template = model.fallback_chat_format().map(|f| format!("; no chat template (chat requests use {f})")).unwrap_or_default();
    eprintln!(
        "{id}: {} layers, context {n_ctx}, KV cache {} {} ({} tokens){no_template}",
        model.hp.n_layer,
        smelt_store::human_size(kv_blocks as u64 * block),
        kv_types.describe(),
        kv_blocks * BLOCK_SIZE
    );
    let engine = Engine::start(model, pool, config);
    Ok(ModelEntry::new(model_id(arg), engine))
}

/// Write every model's cached KV blocks to the disk cache (the server is stopping).
fn persist_kv(state: &AppState) {
    for entry in state.models() {
        let t = std::time::Instant::now();
        if let Some(n) = entry.engine.persist(std::time::Duration::from_secs(120)) {
            eprintln!("{}: {n} KV blocks written to the disk cache in {:.1}s", entry.id, t.elapsed().as_secs_f64());
        }
    }
}

/// `[BASE:]NAME=FILE` → (base id or None for the first model, name, file).
fn parse_lora(arg: &str, ids: &[String]) -> Result<(String, String, String)> {
    let (id, file) = arg.split_once('=').with_context(|| format!("--lora {arg:?}: expected NAME=FILE or BASE:NAME=FILE"))?;
    let (base, name) = match ids.iter().filter(|b| id.len() > b.len() + 1 && id.starts_with(b.as_str()) && id.as_bytes()[b.len()] == b':').max_by_key(|b| b.len()) {
        Some(b) => (b.clone(), id[b.len() + 1..].to_string()),
        None => (ids[0].clone(), id.to_string()),
    };
    anyhow::ensure!(!name.is_empty() && !file.is_empty(), "--lora {arg:?}: expected NAME=FILE or BASE:NAME=FILE");
    Ok((base, name, file.to_string()))
}

/// Load the `--lora` adapters of the model served as `entry`.
fn load_adapters(entry: &ModelEntry, loras: &[(String, String, String)]) -> Result<()> {
    for (base, name, file) in loras.iter().filter(|(b, _, _)| *b == entry.id) {
        let adapter = Adapter::load(std::path::Path::new(file), &entry.engine.model, name).map_err(|e| anyhow::anyhow!("--lora {base}:{name}: {e}"))?;
        eprintln!("{}: adapter {name} (rank {}, {}) from {file}", entry.id, adapter.rank(), smelt_store::human_size(adapter.bytes as u64));
        let served = ServedAdapter { adapter: Arc::new(adapter), path: file.clone(), created: smelt_server::state::now() };
        let mut adapters = entry.adapters.write().unwrap_or_else(|e| e.into_inner());
        anyhow::ensure!(adapters.insert(name.clone(), served).is_none(), "--lora {base}:{name} is given twice");
    }
    Ok(())
}

pub fn run(mut a: Args) -> Result<()> {
    // Bounded memory under hours of traffic: few malloc arenas, set before any thread starts
    // (see scripts/soak.py and the README's soak results).
    smelt_kernels::pool::limit_malloc_arenas(std::thread::available_parallelism().map_or(2, |n| n.get()).max(2));
    if a.model.is_empty() {
        a.model.push(smelt_store::DEFAULT_MODEL.to_string());
    }
    let ids: Vec<String> = a.model.iter().map(|m| model_id(m)).collect();
    for (i, id) in ids.iter().enumerate() {
        anyhow::ensure!(!ids[..i].contains(id), "model {id:?} is given twice");
    }
    let (kv_k, kv_v) = (parse_kv_types("--cache-type-k", &a.cache_type_k, &ids)?, parse_kv_types("--cache-type-v", &a.cache_type_v, &ids)?);
    let loras = a.lora.iter().map(|l| parse_lora(l, &ids)).collect::<Result<Vec<_>>>()?;
    let kv_disk = a.disk.open()?;
    if let (Some(cache), Some(dir)) = (&kv_disk, &a.disk.kv_cache_dir) {
        let (bytes, files) = cache.usage();
        eprintln!("KV disk cache {}: {files} blocks, {} of {}", dir.display(), smelt_store::human_size(bytes), smelt_store::human_size(a.disk.kv_disk));
    }
    let keys = match (&a.api_key, &a.api_key_file) {
        (Some(k), _) => Some(vec![KeySpec::plain(k.trim())]),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read the API key file {}", f.display()))?;
            Some(parse_key_file(&text).map_err(|e| anyhow::anyhow!("the API key file {}: {e}", f.display()))?)
        }
        _ => None,
    };
    if let Some(keys) = &keys {
        let limited = keys.iter().filter(|k| k.rpm.is_some() || k.tpm.is_some() || k.concurrency.is_some()).count();
        eprintln!("{} API key(s), {limited} with limits", keys.len());
    }
    let state = AppState::new(ServerConfig { keys: keys.map(Keys::new), max_body: a.max_body });
    match a.log_format.as_str() {
        "text" => state.set_log_format(smelt_server::LogFormat::Text),
        "json" => state.set_log_format(smelt_server::LogFormat::Json),
        _ => {}
    }
    if let Some(policy) = a.guard.clone() {
        state.set_guard(policy);
    }
    if let Some(m) = a.default_model.clone() {
        let id = model_id(&m);
        anyhow::ensure!(ids.contains(&id), "--default-model {m:?} is not one of the served models ({})", ids.join(", "));
        state.set_default_model(id);
    }
    eprintln!("requests that name no model go to {}", a.default_model.as_deref().map(model_id).unwrap_or_else(|| ids[0].clone()));
    if let Some(m) = a.moderation_model.clone() {
        let served = ids.iter().any(|id| m == *id || m.starts_with(&format!("{id}:"))) || m.starts_with("ft:");
        anyhow::ensure!(served, "--moderation-model {m:?} is not one of the served models ({})", ids.join(", "));
        state.set_moderation_model(m);
    }
    if a.store != "off" {
        let path = a.database.clone().unwrap_or_else(default_database);
        let records = smelt_records::Records::open(&path, a.store_retention).with_context(|| format!("cannot open the database {}; pass --database PATH or --store off", path.display()))?;
        eprintln!("storing {} chat completions in {}", if a.store == "all" { "all" } else { "requested (store: true)" }, path.display());
        let stale = smelt_server::evals::fail_unfinished_runs(&records);
        if stale > 0 {
            eprintln!("{stale} eval run(s) left unfinished by the last server are marked failed");
        }
        state.set_storage(smelt_server::Storage { records, all: a.store == "all" });
    }
    let data_dir = a.data_dir.clone().unwrap_or_else(|| smelt_store::Store::from_env().root().join("server"));
    // Files and fine-tuning jobs, unless another server already runs them from this directory.
    let jobs = match smelt_train::jobs::lock_dir(&data_dir) {
        Ok(lock) => {
            let store = smelt_train::jobs::JobStore::open(&data_dir).with_context(|| format!("cannot open the job store in {}; pass --data-dir DIR", data_dir.display()))?;
            Some((lock, store))
        }
        Err(e) => {
            eprintln!("warning: fine-tuning is off: {e} (give this server its own --data-dir)");
            None
        }
    };
    let train_threads = a.train_threads.unwrap_or_else(|| threads(a.threads));
    let grace = a.shutdown_timeout;
    // Freed memory goes back to the system when the server is idle (a trim locks the arenas,
    // so never under requests).
    let idle = state.clone();
    std::thread::Builder::new().name("smelt-trim".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(30));
        if idle.busy() == 0 {
            smelt_kernels::pool::return_free_memory();
        }
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        eprintln!("listening on http://{} (loading {})", listener.local_addr()?, a.model.join(", "));
        let loading = state.clone();
        let loader = tokio::task::spawn_blocking(move || -> Result<()> {
            for m in &a.model {
                let id = model_id(m);
                let entry = load_engine(m, &a, KvTypes { k: kv_type_for(&kv_k, &id), v: kv_type_for(&kv_v, &id) }, &kv_disk)?;
                load_adapters(&entry, &loras)?;
                loading.add_model(entry);
            }
            if let Some((lock, store)) = jobs {
                smelt_server::fine_tuning::start(&loading, store, train_threads);
                // The lock lasts as long as the process.
                std::mem::forget(lock);
            }
            loading.set_ready();
            eprintln!("ready");
            Ok(())
        });
        tokio::spawn(async move {
            let failure = match loader.await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("model loading failed: {e}"),
            };
            eprintln!("error: {}", failure.replace('\n', " "));
            std::process::exit(1);
        });
        let served = state.clone();
        smelt_server::serve(state, listener, grace).await.context("server error")?;
        persist_kv(&served);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_s_own_kv_type_wins_over_the_plain_one() {
        let ids: Vec<String> = ["gemma-3-270m", "qwen", "other"].map(String::from).to_vec();
        let args: Vec<String> = ["gemma-3-270m=q4_0", "q8_0", "other=f16"].map(String::from).to_vec();
        let parsed = parse_kv_types("--cache-type-k", &args, &ids).unwrap();
        assert_eq!(kv_type_for(&parsed, "gemma-3-270m"), KvType::Q4_0);
        assert_eq!(kv_type_for(&parsed, "qwen"), KvType::Q8_0);
        assert_eq!(kv_type_for(&[], "qwen"), KvType::F16);
        assert!(parse_kv_types("--cache-type-k", &["q9".to_string()], &ids).is_err());
        assert!(parse_kv_types("--cache-type-k", &["nosuch=q8_0".to_string()], &ids).is_err());
    }
}
