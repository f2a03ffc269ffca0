//! `smelt run`: chat in the terminal with the model's own template. Replies stream as they are
//! generated; Ctrl-C stops a reply, Ctrl-C or Ctrl-D at the prompt exits.

use crate::common::{load, SamplingArgs};
use anyhow::{Context, Result};
use rustyline::error::ReadlineError;
use smelt_engine::{FinishReason, GenerateParams, Session};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a .gguf path, a stored name, or a pullable short name (pulled on first use).
    #[arg(value_name = "MODEL", conflicts_with = "model_flag")]
    model: Option<String>,
    /// The model, as every other command takes it (the same as the positional MODEL).
    #[arg(long = "model", short = 'm', value_name = "MODEL")]
    model_flag: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Context size in tokens (default: 4096; 0: the model's training context).
    #[arg(long)]
    ctx: Option<usize>,
    /// Apply a LoRA adapter (GGUF), optionally scaled (repeatable).
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// A system prompt for the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply (default: until the model ends its turn or the context is full).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[command(flatten)]
    kv: crate::common::KvArgs,
    #[command(flatten)]
    disk: crate::common::DiskArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

const HELP: &str = "commands: /reset (forget the conversation), /help, /exit (or Ctrl-D);\nCtrl-C stops a reply";

pub fn run(a: Args) -> Result<()> {
    let name = a.model.clone().or(a.model_flag.clone()).unwrap_or_else(|| smelt_store::DEFAULT_MODEL.to_string());
    let margs = crate::common::ModelArgs { model: name.clone(), threads: a.threads, ctx: a.ctx, lora: a.lora.clone(), kv: a.kv };
    let (model, pool, n_ctx) = load(&margs)?;
    let template = model.chat_template()?;
    let mut session = Session::new(model.clone(), pool, n_ctx);
    session.set_kv_types(margs.kv.types())?;
    session.set_lora(crate::common::loras(&model, &margs.lora)?);
    if let Some(cache) = a.disk.open()? {
        session.set_disk_cache(cache).context("cannot read the model file for the KV disk cache")?;
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C while a reply is streaming stops the reply (the prompt itself reads Ctrl-C as input).
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    }
    let mut editor = rustyline::DefaultEditor::new()?;
    let mut messages: Vec<serde_json::Value> = Vec::new();
    let system = a.system.clone();
    let reset = |messages: &mut Vec<serde_json::Value>| {
        messages.clear();
        if let Some(s) = &system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
    };
    reset(&mut messages);
    // Short lines: the banner must not wrap on an 80-column terminal.
    let size = std::fs::metadata(&model.file.path).map(|m| m.len()).unwrap_or(0);
    eprintln!("{} ({}, {}, context {n_ctx})", crate::common::model_id(&name), smelt_store::human_size(size), model.quantization());
    if let Some(format) = model.fallback_chat_format() {
        eprintln!("warning: this model has no chat template (a base model?); chat uses");
        eprintln!("{format} and replies may ramble. `smelt generate` completes text.");
    }
    eprintln!("/help for commands; Ctrl-C stops a reply, Ctrl-D exits");
    let params = GenerateParams { max_tokens: a.max_tokens.unwrap_or(usize::MAX), sampling: a.sampling.params(), ..Default::default() };
    loop {
        let line = match editor.readline(">>> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) | Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(input);
        match input {
            "/exit" | "/quit" | "/bye" => break,
            "/reset" | "/clear" => {
                reset(&mut messages);
                eprintln!("(conversation cleared)");
                continue;
            }
            "/help" | "/?" => {
                eprintln!("{HELP}");
                continue;
            }
            // A lone `/word` is a command; text such as a path (`/usr/bin`) is a message.
            cmd if cmd.starts_with('/') && cmd.len() > 1 && cmd[1..].chars().all(|c| c.is_ascii_alphabetic()) => {
                eprintln!("unknown command {cmd}; /help lists them");
                continue;
            }
            _ => {}
        }
        messages.push(serde_json::json!({"role": "user", "content": input}));
        let rendered = template.render(&serde_json::Value::Array(messages.clone()), None, true)?;
        let prompt = model.tokenizer.encode_prompt(&rendered);
        if prompt.len() >= n_ctx {
            messages.pop();
            eprintln!("(the conversation no longer fits the context of {n_ctx} tokens; /reset to start over or use --ctx)");
            continue;
        }
        interrupted.store(false, Ordering::SeqCst);
        let stdout = std::io::stdout();
        let gen = session.generate(&prompt, &params, |step| {
            let mut out = stdout.lock();
            let _ = out.write_all(step.text.as_bytes());
            let _ = out.flush();
            !interrupted.load(Ordering::SeqCst)
        });
        println!();
        match gen {
            Ok(g) => {
                match g.finish {
                    FinishReason::Cancelled => eprintln!("(stopped)"),
                    FinishReason::Length if session.tokens().len() >= n_ctx => eprintln!("(context full; /reset to start over)"),
                    FinishReason::Length => eprintln!("(cut at --max-tokens {})", params.max_tokens),
                    _ => {}
                }
                messages.push(serde_json::json!({"role": "assistant", "content": g.text}));
            }
            Err(e) => {
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
    Ok(())
}
