//! `smelt data`: what the server stored, turned into training data.

use crate::common::default_database;
use anyhow::{Context, Result};
use smelt_records::{training_line, Query, Rated, Records};
use std::io::Write;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Write stored chat completions as OpenAI fine-tuning JSONL (for `smelt tune` or
    /// /v1/fine_tuning/jobs); a user's corrected answer replaces the model's.
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The database (default: $SMELT_HOME/smelt.db).
    #[arg(long, value_name = "PATH")]
    database: Option<std::path::PathBuf>,
    /// Only completions with this feedback: good (rated above 0), corrected, bad, any, none.
    #[arg(long, value_parser = |s: &str| s.parse::<Rated>())]
    rated: Option<Rated>,
    /// Only completions whose metadata has KEY=VALUE (repeatable; all must match).
    #[arg(long, value_name = "KEY=VALUE")]
    metadata: Vec<String>,
    /// Only completions of this model id.
    #[arg(long, short = 'm')]
    model: Option<String>,
    /// Only completions made with this API key (its name in the key file).
    #[arg(long)]
    key: Option<String>,
    /// Write here instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: Option<std::path::PathBuf>,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Export(a) => export(a),
    }
}

fn export(a: ExportArgs) -> Result<()> {
    let path = a.database.clone().unwrap_or_else(default_database);
    anyhow::ensure!(path.exists(), "no database at {} (start `smelt serve` with --store, or pass --database PATH)", path.display());
    let metadata = a
        .metadata
        .iter()
        .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).with_context(|| format!("--metadata takes KEY=VALUE, got {kv:?}")))
        .collect::<Result<Vec<_>>>()?;
    let records = Records::open(&path, None).with_context(|| format!("cannot open the database {}", path.display()))?;
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let (mut written, mut skipped) = (0usize, 0usize);
    let mut after = None;
    loop {
        let q = Query { owner: a.key.clone(), model: a.model.clone(), metadata: metadata.clone(), after: after.take(), limit: 500, descending: false, rated: a.rated, id: None };
        let page = records.list(q).wait()?;
        for r in &page.records {
            match training_line(r) {
                Some(line) => {
                    writeln!(out, "{line}")?;
                    written += 1;
                }
                None => skipped += 1,
            }
        }
        if !page.has_more {
            break;
        }
        after = page.records.last().map(|r| r.completion.id.clone());
    }
    out.flush()?;
    let to = a.output.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "standard output".into());
    eprintln!("exported {written} examples to {to}{}", if skipped > 0 { format!(" ({skipped} without an answer skipped)") } else { String::new() });
    Ok(())
}
