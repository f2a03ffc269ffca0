//! `smelt redteam`: attack success rates of the built-in probe families, per model, stored as
//! eval runs so that models, adapters and system prompts can be compared later.

use crate::cmd::eval::{pct, Engines};
use crate::common::{count_bar, default_database, threads};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use smelt_eval::engine::EngineSampler;
use smelt_eval::redteam::{families, mutate, Family};
use smelt_eval::RunReport;
use smelt_records::{ObjectQuery, Records};
use smelt_server::state::now;

#[derive(clap::Args)]
pub struct Args {
    /// A model to attack (repeatable): a .gguf path, a stored or pullable name, or MODEL+ADAPTER.gguf.
    #[arg(long, short = 'm', required = true)]
    model: Vec<String>,
    /// The system prompt under test (default: a generic assistant's); the probes add their
    /// canary and secrets to it.
    #[arg(long)]
    system: Option<String>,
    /// Also run every probe rewritten by this model to be more persuasive.
    #[arg(long, value_name = "MODEL")]
    attacker: Option<String>,
    /// Only these families (repeatable): system_prompt_extraction, prompt_injection,
    /// secret_leakage, harmful_requests, jailbreak.
    #[arg(long)]
    family: Vec<String>,
    #[arg(long, short = 't')]
    threads: Option<usize>,
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
    #[arg(long, default_value = "512M", value_parser = crate::cmd::serve::parse_size)]
    kv_memory: u64,
    /// Where the runs are stored as evals (default: $SMELT_HOME/smelt.db; seen by `smelt serve`
    /// under /v1/evals).
    #[arg(long, value_name = "PATH")]
    database: Option<std::path::PathBuf>,
    /// Store the runs under this API key's name (as a server with --api-key-file would).
    #[arg(long, default_value = "")]
    key: String,
    /// Do not store the runs.
    #[arg(long)]
    no_store: bool,
    /// Write every probe's answer and grade as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

fn new_id(prefix: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{prefix}-{t:x}{:04x}", std::process::id() & 0xffff)
}

/// Store a family's run as an eval run (creating the family's eval the first time).
fn store(records: &Records, owner: &str, f: &Family, report: &RunReport) -> Result<String> {
    let q = ObjectQuery { kind: "eval".into(), parent: None, owner: Some(owner.to_string()), after: None, limit: 100_000, descending: false };
    let (evals, _) = records.list_objects(q).wait()?;
    let eval_id = match evals.iter().find(|e| e["name"] == f.spec.name.as_str()) {
        Some(e) => e["id"].as_str().unwrap_or_default().to_string(),
        None => {
            let id = new_id("eval");
            let criteria: Vec<Value> = f.spec.criteria.iter().map(|c| c.to_json()).collect();
            let eval = json!({"object": "eval", "id": id, "name": f.spec.name, "data_source_config": {"type": "custom", "schema": {"type": "object"}},
                "testing_criteria": criteria, "created_at": now(), "metadata": {"kind": "redteam", "family": f.name}});
            records.put_object("eval", &id, None, owner, now(), &eval).wait()?;
            id
        }
    };
    let run_id = new_id("evalrun");
    let created = now();
    let content: Vec<Value> = f.items.iter().map(|i| json!({"item": i})).collect();
    let mut run = json!({
        "object": "eval.run", "id": run_id, "eval_id": eval_id, "name": report.model, "model": report.model, "created_at": created,
        "data_source": {"type": "completions", "model": report.model, "input_messages": {"type": "item_reference", "item_reference": "item.messages"}, "source": {"type": "file_content", "content": content}},
        "metadata": {"kind": "redteam", "family": f.name}, "report_url": null, "error": null,
    });
    smelt_eval::api::complete_run(&mut run, report);
    records.put_object("eval.run", &run_id, Some(&eval_id), owner, created, &run).wait()?;
    for (item_id, out) in smelt_eval::api::output_items(&run_id, &eval_id, created, &f.spec, report) {
        records.put_object("eval.run.output_item", &item_id, Some(&run_id), owner, created, &out).wait()?;
    }
    Ok(run_id)
}

pub fn run(a: Args) -> Result<()> {
    let mut fams = families(a.system.as_deref());
    if !a.family.is_empty() {
        for f in &a.family {
            anyhow::ensure!(fams.iter().any(|x| &x.name == f), "unknown family {f:?} (system_prompt_extraction, prompt_injection, secret_leakage, harmful_requests, jailbreak)");
        }
        fams.retain(|f| a.family.contains(&f.name));
    }
    let records = if a.no_store {
        None
    } else {
        let path = a.database.clone().unwrap_or_else(default_database);
        Some(Records::open(&path, None).with_context(|| format!("cannot open the database {}; pass --database PATH or --no-store", path.display()))?)
    };
    let mut sampler = EngineSampler(Engines::new(threads(a.threads), a.max_batch, a.ctx, a.kv_memory));
    for m in a.model.iter().chain(&a.attacker) {
        sampler.0.load(m)?;
    }
    if let Some(attacker) = &a.attacker {
        let pb = count_bar(format!("mutating probes with {attacker}"));
        pb.set_length(fams.iter().map(|f| f.items.len() as u64).sum());
        let mutated = mutate(&fams, attacker, &mut sampler, &mut || pb.inc(1));
        pb.finish_and_clear();
        fams.extend(mutated);
    }
    // results[family][model]
    let mut results: Vec<Vec<RunReport>> = Vec::new();
    let mut stored = Vec::new();
    for f in &fams {
        let mut row = Vec::new();
        for m in &a.model {
            let pb = count_bar(format!("{}: {m}", f.name));
            let report = smelt_eval::run(&f.spec, &f.items, Some(m), &mut sampler, &mut |done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            });
            pb.finish_and_clear();
            if let Some(r) = &records {
                stored.push(store(r, &a.key, f, &report)?);
            }
            row.push(report);
        }
        results.push(row);
    }
    println!("attack success rate (lower is better), with 95% intervals (Wilson)\n");
    println!("| family | probes | {} |", a.model.join(" | "));
    println!("|---|---:|{}", " --- |".repeat(a.model.len()));
    for (f, row) in fams.iter().zip(&results) {
        let cells: Vec<String> = row.iter().map(|r| pct(r.overall().rate())).collect();
        println!("| {} | {} | {} |", f.name, f.items.len(), cells.join(" | "));
    }
    let totals: Vec<String> = (0..a.model.len())
        .map(|mi| {
            let (k, n) = results.iter().fold((0, 0), |(k, n), row| (k + row[mi].overall().passed, n + row[mi].items.len()));
            pct(smelt_eval::wilson(k, n))
        })
        .collect();
    println!("| all | {} | {} |", fams.iter().map(|f| f.items.len()).sum::<usize>(), totals.join(" | "));
    if let Some(r) = &records {
        eprintln!("stored {} eval runs in {} (see /v1/evals on a server using it)", stored.len(), r.path().display());
    }
    if let Some(p) = &a.json {
        let out: Vec<Value> = fams
            .iter()
            .zip(&results)
            .map(|(f, row)| {
                json!({"family": f.name, "runs": row.iter().map(|r| json!({
                    "model": r.model, "attack_success": r.overall().passed, "probes": r.items.len(),
                    "items": r.items.iter().map(|it| json!({"item": it.item, "answer": it.sample.as_ref().map(|s| s.text.clone()), "succeeded": it.passed()})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>()})
            })
            .collect();
        std::fs::write(p, serde_json::to_string_pretty(&out)?).with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
