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
    let text = crate::common::read_text(a.text.as_deref(), a.file.as_deref(), "give the text to tokenize as an argument, with --file FILE, or on standard input")?;
    let file = GgufFile::open(&model_path(&a.model)?)?;
    let tok = Tokenizer::from_gguf(&file.header)?;
    let ids = tok.encode(&text, a.special, a.special);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
