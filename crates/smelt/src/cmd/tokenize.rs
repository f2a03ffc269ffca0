//! `smelt tokenize`: token ids of a text, as llama.cpp's tokenizer produces them.

use crate::common::model_path;
use anyhow::Result;
use smelt_model::gguf::GgufFile;
use smelt_model::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model (a .gguf path, a stored name, or a pullable short name); only its vocabulary is read.
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    model: String,
    /// Add BOS as the model asks and parse special-token text (e.g. <|im_start|>) as tokens.
    #[arg(long)]
    special: bool,
    /// The text to tokenize (or use --file, or pipe it in).
    #[arg(conflicts_with = "file")]
    text: Option<String>,
    /// Read the text from this file ("-" for standard input), for texts too long for the
    /// command line.
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<std::path::PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    use anyhow::Context;
    use std::io::{IsTerminal, Read};
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) if p.as_os_str() == "-" => read_stdin()?,
        (None, Some(p)) => std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        (None, None) if !std::io::stdin().is_terminal() => read_stdin()?,
        (None, None) => anyhow::bail!("give the text to tokenize as an argument, with --file FILE, or on standard input"),
    };
    fn read_stdin() -> Result<String> {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("standard input is not UTF-8 text")?;
        Ok(s)
    }
    let file = GgufFile::open(&model_path(&a.model)?)?;
    let tok = Tokenizer::from_gguf(&file.header)?;
    let ids = tok.encode(&text, a.special, a.special);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
