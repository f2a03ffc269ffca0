//! `smelt tokenize`: token ids of a text, as llama.cpp's tokenizer produces them.

use crate::common::model_path;
use anyhow::Result;
use smelt_model::gguf::GgufFile;
use smelt_model::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    /// Model (path or stored name); only its vocabulary is read.
    #[arg(long, short = 'm', default_value = smelt_store::DEFAULT_MODEL)]
    model: String,
    /// Add BOS as the model asks and parse special-token text (e.g. <|im_start|>) as tokens.
    #[arg(long)]
    special: bool,
    /// The text to tokenize.
    text: String,
}

pub fn run(a: Args) -> Result<()> {
    let file = GgufFile::open(&model_path(&a.model)?)?;
    let tok = Tokenizer::from_gguf(&file.header)?;
    let ids = tok.encode(&a.text, a.special, a.special);
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
