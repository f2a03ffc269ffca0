//! `smelt eval`: run a suite against models or adapters, side by side.

use crate::common::{count_bar, model_path, threads};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use smelt_engine::scheduler::{Engine, EngineConfig};
use smelt_eval::engine::{EngineSampler, Resolve};
use smelt_eval::RunReport;
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::Model;
use smelt_model::kv::{BlockPool, BLOCK_SIZE};
use smelt_model::lora::{Adapter, LoraSet};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// The suite: JSONL of items, optionally led by an `{"eval": {...}}` line with the testing
    /// criteria and input template (see the README).
    suite: std::path::PathBuf,
    /// A model to evaluate (repeatable): a .gguf path, a stored or pullable name, or MODEL+ADAPTER.gguf for
    /// the model under a LoRA adapter.
    #[arg(long, short = 'm', required = true)]
    model: Vec<String>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Context per sequence (0: the model's training context).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    /// KV cache memory per model, e.g. 512M, 2G.
    #[arg(long, default_value = "512M", value_parser = crate::cmd::serve::parse_size)]
    kv_memory: u64,
    /// Write every item's answer and grades as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// Write an HTML report with a chart here.
    #[arg(long, value_name = "FILE")]
    html: Option<std::path::PathBuf>,
}

/// Engines loaded on demand, one per base model; adapters per request.
pub struct Engines {
    threads: usize,
    max_batch: usize,
    ctx: usize,
    kv_memory: u64,
    bases: HashMap<String, Engine>,
    adapters: HashMap<String, Arc<Adapter>>,
}

impl Engines {
    pub fn new(threads: usize, max_batch: usize, ctx: usize, kv_memory: u64) -> Engines {
        Engines { threads, max_batch: max_batch.max(1), ctx: if ctx == 0 { 0 } else { ctx.max(64) }, kv_memory, bases: HashMap::new(), adapters: HashMap::new() }
    }

    fn engine(&mut self, base: &str) -> Result<&Engine> {
        if !self.bases.contains_key(base) {
            let path = model_path(base)?;
            let model = Arc::new(Model::load(&path).with_context(|| format!("cannot load {}", path.display()))?);
            let n_ctx = crate::common::context_size(Some(self.ctx), model.hp.n_ctx_train);
            let block = BlockPool::block_bytes(model.hp.n_layer, model.kv_row(), Default::default());
            let kv_blocks = (self.kv_memory / block as u64) as usize;
            anyhow::ensure!(kv_blocks * BLOCK_SIZE >= n_ctx, "--kv-memory {} holds less than one context of {n_ctx} tokens of {base}; raise it or lower --ctx", smelt_store::human_size(self.kv_memory));
            eprintln!("{base}: {} layers, KV cache {}", model.hp.n_layer, smelt_store::human_size((kv_blocks * block) as u64));
            let config = EngineConfig { n_ctx, max_seqs: self.max_batch, kv_blocks, step_tokens: 256, queue: 4096, kv_types: Default::default(), kv_disk: None };
            let engine = Engine::start(model, Arc::new(ThreadPool::new(self.threads)), config);
            self.bases.insert(base.to_string(), engine);
        }
        Ok(&self.bases[base])
    }

    /// `MODEL` or `MODEL+ADAPTER.gguf` → the engine and the adapters to run under.
    pub fn load(&mut self, name: &str) -> Result<(&Engine, LoraSet)> {
        let (base, adapter) = match name.split_once('+') {
            Some((b, a)) => (b, Some(a)),
            None => (name, None),
        };
        let lora = match adapter {
            None => LoraSet::default(),
            Some(file) => {
                if !self.adapters.contains_key(name) {
                    let model = self.engine(base)?.model.clone();
                    let a = Adapter::load(std::path::Path::new(file), &model, file).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
                    self.adapters.insert(name.to_string(), Arc::new(a));
                }
                LoraSet::one(self.adapters[name].clone(), 1.0)
            }
        };
        Ok((self.engine(base)?, lora))
    }
}

impl Resolve for Engines {
    fn resolve(&mut self, model: &str) -> Result<(&Engine, LoraSet), String> {
        self.load(model).map_err(|e| format!("{e:#}"))
    }
}

pub fn run(a: Args) -> Result<()> {
    let text = std::fs::read_to_string(&a.suite).with_context(|| format!("cannot read the suite {}", a.suite.display()))?;
    let name = a.suite.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "suite".into());
    let (spec, items) = smelt_eval::parse_suite(&text, &name).map_err(|e| anyhow::anyhow!("{}: {e}", a.suite.display()))?;
    let mut engines = EngineSampler(Engines::new(threads(a.threads), a.max_batch, a.ctx, a.kv_memory));
    let mut reports = Vec::new();
    for m in &a.model {
        // Load first, so a bad model or adapter is a one-line error before any work.
        engines.0.load(m)?;
        let pb = count_bar(m.clone());
        let report = smelt_eval::run(&spec, &items, Some(m), &mut engines, &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        });
        pb.finish_and_clear();
        reports.push(report);
    }
    print_table(&spec.name, items.len(), &reports);
    if let Some(p) = &a.json {
        let out: Vec<Value> = reports.iter().map(report_json).collect();
        std::fs::write(p, serde_json::to_string_pretty(&json!({"eval": spec.name, "runs": out}))?).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    if let Some(p) = &a.html {
        std::fs::write(p, html_report(&spec.name, &reports)).with_context(|| format!("cannot write {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

pub fn pct((p, lo, hi): (f64, f64, f64)) -> String {
    format!("{:.1}% [{:.1}–{:.1}]", 100.0 * p, 100.0 * lo, 100.0 * hi)
}

fn print_table(name: &str, n: usize, reports: &[RunReport]) {
    println!("eval {name}: {n} items; pass rates with 95% intervals (Wilson)\n");
    let mut head = vec!["model".to_string(), "all criteria".to_string()];
    head.extend(reports.first().map(|r| r.criteria.clone()).unwrap_or_default());
    head.extend(["errors".to_string(), "tokens in/out".to_string(), "time s".to_string()]);
    println!("| {} |", head.join(" | "));
    println!("|{}", " --- |".repeat(head.len()));
    for r in reports {
        let overall = r.overall();
        let mut row = vec![r.model.clone().unwrap_or_default(), pct(overall.rate())];
        row.extend(r.per_criterion().iter().map(|c| pct(c.rate())));
        let (p, c) = r.tokens();
        row.extend([overall.errored.to_string(), format!("{p}/{c}"), format!("{:.1}", r.seconds)]);
        println!("| {} |", row.join(" | "));
    }
}

fn report_json(r: &RunReport) -> Value {
    let counts = r.per_criterion();
    json!({
        "model": r.model,
        "seconds": r.seconds,
        "result_counts": {"total": r.items.len(), "passed": r.overall().passed, "failed": r.overall().failed, "errored": r.overall().errored},
        "per_testing_criteria_results": r.criteria.iter().zip(&counts).map(|(n, c)| json!({"testing_criteria": n, "passed": c.passed, "failed": c.failed, "errored": c.errored})).collect::<Vec<_>>(),
        "items": r.items.iter().map(|it| json!({
            "item": it.item,
            "output": it.sample.as_ref().map(|s| s.text.clone()),
            "error": it.sample_error,
            "results": r.criteria.iter().zip(&it.grades).map(|(n, g)| json!({"name": n, "passed": g.passed, "score": g.score, "error": g.error})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A self-contained page: pass rates per criterion and model as bars with their 95% intervals
/// (inline SVG), then the table of failed items.
fn html_report(name: &str, reports: &[RunReport]) -> String {
    let criteria: Vec<String> = std::iter::once("all criteria".to_string()).chain(reports.first().map(|r| r.criteria.clone()).unwrap_or_default()).collect();
    let colors = ["#3b6ea5", "#d9822b", "#4c9a2a", "#a23b72", "#6c757d"];
    let (bar, gap, top, height) = (22.0, 30.0, 20.0, 200.0);
    let group = bar * reports.len() as f64 + gap;
    let width = 60.0 + group * criteria.len() as f64;
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">"#, height + top + 60.0);
    for t in [0, 25, 50, 75, 100] {
        let y = top + height * (1.0 - t as f64 / 100.0);
        svg += &format!(r##"<line x1="40" x2="{width}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="34" y="{}" text-anchor="end">{t}%</text>"##, y + 4.0);
    }
    for (ci, c) in criteria.iter().enumerate() {
        let x0 = 50.0 + ci as f64 * group;
        for (ri, r) in reports.iter().enumerate() {
            let counts = if ci == 0 { r.overall() } else { r.per_criterion()[ci - 1] };
            let (p, lo, hi) = counts.rate();
            let x = x0 + ri as f64 * bar;
            let y = top + height * (1.0 - p);
            svg += &format!(r#"<rect x="{x}" y="{y}" width="{}" height="{}" fill="{}"><title>{}: {}</title></rect>"#, bar - 2.0, height * p, colors[ri % colors.len()], escape(r.model.as_deref().unwrap_or("")), pct((p, lo, hi)));
            let cx = x + (bar - 2.0) / 2.0;
            svg += &format!(r#"<line x1="{cx}" x2="{cx}" y1="{}" y2="{}" stroke="black"/>"#, top + height * (1.0 - hi), top + height * (1.0 - lo));
        }
        svg += &format!(r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, x0 + bar * reports.len() as f64 / 2.0, top + height + 16.0, escape(c));
    }
    for (ri, r) in reports.iter().enumerate() {
        svg += &format!(r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#, 50.0, top + height + 30.0 + 14.0 * ri as f64, colors[ri % colors.len()], 64.0, top + height + 39.0 + 14.0 * ri as f64, escape(r.model.as_deref().unwrap_or("")));
    }
    svg += "</svg>";
    let mut rows = String::new();
    for r in reports {
        for it in r.items.iter().filter(|it| !it.passed()) {
            let failed: Vec<&str> = r.criteria.iter().zip(&it.grades).filter(|(_, g)| !g.passed || g.error.is_some()).map(|(n, _)| n.as_str()).collect();
            rows += &format!(
                "<tr><td>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td><td>{}</td></tr>",
                escape(r.model.as_deref().unwrap_or("")),
                escape(&serde_json::to_string_pretty(&it.item).unwrap_or_default()),
                escape(it.sample.as_ref().map(|s| s.text.as_str()).or(it.sample_error.as_deref()).unwrap_or("")),
                escape(&failed.join(", "))
            );
        }
    }
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{n}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top}}pre{{white-space:pre-wrap;max-width:40em;margin:0}}</style></head><body><h1>{n}</h1><p>Pass rates with 95% intervals (Wilson), {items} items.</p>{svg}<h2>Failed items</h2><table><tr><th>model</th><th>item</th><th>answer</th><th>failed</th></tr>{rows}</table></body></html>",
        n = escape(name),
        items = reports.first().map(|r| r.items.len()).unwrap_or(0),
    )
}
