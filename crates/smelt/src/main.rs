//! The `smelt` command line.

mod cmd;
mod common;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "smelt", version, about = "Run, serve and customize foundation models on your own hardware.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a model in the terminal (its own chat template, streamed replies).
    Run(cmd::run::Args),
    /// Complete a prompt (raw text, no chat template).
    Generate(cmd::generate::Args),
    /// Print the token ids of a text as a JSON array.
    Tokenize(cmd::tokenize::Args),
    /// Serve models over an OpenAI-compatible HTTP API.
    Serve(cmd::serve::Args),
    /// Measure prompt-processing and generation speed (like llama-bench).
    Bench(cmd::bench::Args),
    /// Perplexity of a model over a text file (chunked as llama.cpp's llama-perplexity does).
    Perplexity(cmd::perplexity::Args),
    /// Fine-tune a LoRA adapter from a JSONL dataset (OpenAI chat format or prompt/completion).
    Tune(cmd::tune::Args),
    /// Fold LoRA adapters into a new GGUF model (re-quantized to the base's formats).
    Merge(cmd::merge::Args),
    /// Run an eval suite against models or adapters and compare them (pass rates with 95%
    /// intervals).
    Eval(cmd::eval::Args),
    /// Attack models with built-in red-team probes (prompt injection, system-prompt extraction,
    /// secret leakage, harmful requests, jailbreaks) and report attack success rates.
    Redteam(cmd::redteam::Args),
    /// Stored chat completions and feedback: export them as training data.
    #[command(subcommand)]
    Data(cmd::data::Command),
    /// Download a model into the local store.
    Pull(cmd::store::PullArgs),
    /// List the models in the local store.
    List(cmd::store::ListArgs),
    /// Remove a model from the local store.
    Rm(cmd::store::RmArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Tokenize(a) => cmd::tokenize::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Perplexity(a) => cmd::perplexity::run(a),
        Command::Tune(a) => cmd::tune::run(a),
        Command::Merge(a) => cmd::merge::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Redteam(a) => cmd::redteam::run(a),
        Command::Data(c) => cmd::data::run(c),
        Command::Pull(a) => cmd::store::pull(a),
        Command::List(a) => cmd::store::list(a),
        Command::Rm(a) => cmd::store::rm(a),
    };
    if let Err(e) = result {
        // One line: the error and its causes.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
