//! `smelt pull`, `smelt list`, `smelt rm`: the local model store.

use anyhow::Result;
use smelt_store::{human_size as size, known_models, Store};

#[derive(clap::Args)]
pub struct PullArgs {
    /// A short name (see `smelt list --available`) or a Hugging Face file: owner/repo/file.gguf
    name: String,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// Also list the models that can be pulled by short name.
    #[arg(long)]
    available: bool,
}

#[derive(clap::Args)]
pub struct RmArgs {
    /// The stored model's name.
    name: String,
}

pub fn pull(a: PullArgs) -> Result<()> {
    let path = crate::common::pull(&Store::from_env(), &a.name)?;
    println!("{}", path.display());
    Ok(())
}

pub fn list(a: ListArgs) -> Result<()> {
    let store = Store::from_env();
    let entries = store.list()?;
    if entries.is_empty() {
        println!("no models in {} (try `smelt pull {}`)", store.models_dir().display(), smelt_store::DEFAULT_MODEL);
    }
    for e in &entries {
        println!("{:40} {:>9}  {}", e.name, size(e.size), e.path.display());
    }
    if a.available {
        println!("\npullable by short name:");
        for m in known_models() {
            println!("{:40} {:>9}  {}", m.name, size(m.size), m.description);
        }
    }
    Ok(())
}

pub fn rm(a: RmArgs) -> Result<()> {
    let path = Store::from_env().remove(&a.name)?;
    println!("removed {}", path.display());
    Ok(())
}
