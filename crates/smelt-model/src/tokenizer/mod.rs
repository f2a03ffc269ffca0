//! Tokenizers built from GGUF metadata, matching llama.cpp token for token.
//!
//! - `llama` vocabularies: SentencePiece-style merges by token score, with byte fallback ([`spm`]).
//! - `gpt2` vocabularies: byte-level BPE with ranked merges after a pre-tokenizer split ([`bpe`]).
//!
//! Before either runs, text is split around special tokens: user-defined tokens always, control
//! tokens only when the caller asks to parse special-token text.

mod bpe;
mod pretokenize;
mod spm;
mod stream;
mod text_index;
mod word_cache;

pub use pretokenize::PreTokenizer;
pub use stream::StreamDecoder;
use text_index::TextIndex;

use crate::gguf::{GgufError, Header};
use std::collections::HashMap;

/// Hash maps keyed by vocabulary texts and ids: looked up for every candidate merge while
/// tokenizing, where SipHash cost about a fifth of the time.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Invalid(String),
}

/// Token types as stored in `tokenizer.ggml.token_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenType {
    fn from_id(id: i64) -> TokenType {
        match id {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

#[derive(Debug)]
enum Model {
    Spm(spm::Spm),
    Bpe(bpe::Bpe),
}

/// Token texts that end a turn in the chat templates llama.cpp knows; they stop generation too.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Candidates for the end-of-turn token when the metadata names none, most specific first.
const END_OF_TURN_TEXTS: &[&str] = &["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>"];

#[derive(Debug)]
pub struct Tokenizer {
    model: Model,
    texts: Vec<String>,
    types: Vec<TokenType>,
    by_text: TextIndex,
    /// Tokens split out of text before tokenizing, longest text first.
    specials: Vec<u32>,
    /// What each token decodes to, for normal (non-special) decoding.
    pieces: Vec<Vec<u8>>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Tokens that end generation: EOS, end-of-turn and similar.
    end_of_generation: Vec<u32>,
}

fn token_id(h: &Header, key: &str, n: usize) -> Result<Option<u32>, TokenizerError> {
    match h.get_u64(key)? {
        Some(id) if (id as usize) < n => Ok(Some(id as u32)),
        Some(id) => Err(TokenizerError::Invalid(format!("{key} = {id} is outside the vocabulary of {n} tokens"))),
        None => Ok(None),
    }
}

impl Tokenizer {
    /// Build the tokenizer described by a GGUF header's `tokenizer.ggml.*` keys.
    pub fn from_gguf(h: &Header) -> Result<Tokenizer, TokenizerError> {
        let kind = h.require("tokenizer.ggml.model", h.get_str("tokenizer.ggml.model"))?.to_string();
        let tokens = h.require("tokenizer.ggml.tokens", h.get_array("tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(TokenizerError::Invalid(format!("vocabulary has {n} tokens")));
        }
        let mut texts = Vec::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            let s = t.as_str().ok_or_else(|| TokenizerError::Invalid(format!("token {i} is not a string")))?;
            // llama.cpp renames empty tokens so they cannot match text.
            texts.push(if s.is_empty() { format!("[EMPTY_{i}]") } else { s.to_string() });
        }
        let types: Vec<TokenType> = match h.get_array("tokenizer.ggml.token_type")? {
            None => vec![TokenType::Normal; n],
            Some(a) if a.len() >= n => a.iter().take(n).map(|v| TokenType::from_id(v.as_i64().unwrap_or(0))).collect(),
            Some(a) => return Err(TokenizerError::Invalid(format!("token_type has {} entries for {n} tokens", a.len()))),
        };
        let scores: Vec<f32> = match h.get_array("tokenizer.ggml.scores")? {
            None => vec![0.0; n],
            Some(a) if a.len() >= n => a.iter().take(n).map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
            Some(a) => return Err(TokenizerError::Invalid(format!("scores has {} entries for {n} tokens", a.len()))),
        };
        // Later duplicates win, as in llama.cpp.
        let by_text = TextIndex::new(&texts);

        let (model, mut bos, mut eos, mut add_bos, add_eos_default) = match kind.as_str() {
            "llama" => {
                let add_space_prefix = h.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                (Model::Spm(spm::Spm::new(&texts, &by_text, scores, add_space_prefix)?), Some(1), Some(2), true, false)
            }
            "gpt2" => {
                let pre_name = h.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
                let pre = PreTokenizer::from_name(pre_name)
                    .ok_or_else(|| TokenizerError::Invalid(format!("unsupported pre-tokenizer {pre_name:?} (smelt knows: {})", PreTokenizer::known_names().join(", "))))?;
                let merges = h.require("tokenizer.ggml.merges", h.get_array("tokenizer.ggml.merges"))?;
                let add_bos = pre.adds_bos();
                (Model::Bpe(bpe::Bpe::new(&texts, &by_text, merges, pre)?), Some(11), Some(11), add_bos, false)
            }
            other => return Err(TokenizerError::Invalid(format!("unsupported tokenizer model {other:?} (smelt supports \"llama\" and \"gpt2\")"))),
        };
        // Defaults outside the vocabulary are dropped, as llama.cpp does.
        bos = bos.filter(|&b| (b as usize) < n);
        eos = eos.filter(|&e| (e as usize) < n);
        if let Some(b) = token_id(h, "tokenizer.ggml.bos_token_id", n)? {
            bos = Some(b);
        }
        if let Some(e) = token_id(h, "tokenizer.ggml.eos_token_id", n)? {
            eos = Some(e);
        }
        let mut eot = token_id(h, "tokenizer.ggml.eot_token_id", n)?;
        let eom = token_id(h, "tokenizer.ggml.eom_token_id", n)?;
        if let Some(b) = h.get_bool("tokenizer.ggml.add_bos_token")? {
            add_bos = b;
        }
        let add_eos = h.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(add_eos_default);

        let mut types = types;
        let mut end_of_generation = Vec::new();
        for id in END_OF_GENERATION_TEXTS.iter().filter_map(|t| by_text.get(t)) {
            if !end_of_generation.contains(&id) {
                end_of_generation.push(id);
                // llama.cpp treats these as control tokens even when the file says otherwise.
                if types[id as usize] != TokenType::Control {
                    types[id as usize] = TokenType::Control;
                }
            }
        }
        if eot.is_none() {
            // The first end-of-turn text the vocabulary has, in order of preference.
            eot = END_OF_TURN_TEXTS.iter().find_map(|t| by_text.get(t));
        }
        for id in [eos, eot, eom].into_iter().flatten() {
            if !end_of_generation.contains(&id) {
                end_of_generation.push(id);
            }
        }
        end_of_generation.sort_unstable();

        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| matches!(types[i as usize], TokenType::Control | TokenType::UserDefined | TokenType::Unknown))
            .collect();
        specials.sort_by(|&a, &b| texts[b as usize].len().cmp(&texts[a as usize].len()).then(a.cmp(&b)));

        let pieces = (0..n).map(|i| match &model {
            Model::Spm(_) => spm::piece(&texts[i], types[i]),
            Model::Bpe(b) => b.piece(&texts[i], types[i]),
        }).collect();

        Ok(Tokenizer { model, texts, types, by_text, specials, pieces, bos, eos, eot, add_bos, add_eos, end_of_generation })
    }

    /// Bytes held by the cache of recently tokenized words (capped; see `word_cache`).
    pub fn word_cache_bytes(&self) -> usize {
        match &self.model {
            Model::Spm(m) => m.words.bytes(),
            Model::Bpe(m) => m.words.bytes(),
        }
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }

    /// The token's text as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(|s| s.as_str())
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text)
    }

    /// Whether generating this token ends the sequence (EOS, end of turn, ...).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    pub fn end_of_generation_tokens(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Whether the token is a control/unknown token (decodes to nothing unless asked).
    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.token_type(id), Some(TokenType::Control | TokenType::Unknown))
    }

    /// Tokenize `text`. With `add_special`, BOS/EOS are added as the model's metadata asks; with
    /// `parse_special`, control-token text such as `<|im_start|>` becomes that token instead of
    /// being tokenized as plain text.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.split_specials(text, parse_special);
        let mut out = Vec::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let mut prev_special = true;
        for f in fragments {
            match f {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match &self.model {
                        Model::Spm(s) => s.encode(t, prev_special, &self.by_text, &mut out),
                        Model::Bpe(b) => b.encode(t, &self.by_text, &mut out),
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            if let Some(e) = self.eos {
                out.push(e);
            }
        }
        out
    }

    /// Tokenize a prompt the way llama.cpp does for user input: BOS as the metadata asks and
    /// special-token text parsed — without doubling BOS when the text (e.g. a rendered chat
    /// template) already starts with it.
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text, true, true);
        if self.add_bos && ids.len() >= 2 && ids[0] == ids[1] && Some(ids[0]) == self.bos {
            ids.remove(0);
        }
        ids
    }

    /// Split text around special tokens, longest token text first.
    fn split_specials<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = if text.is_empty() { vec![] } else { vec![Fragment::Text(text)] };
        // Vocabularies hold thousands of special tokens (Gemma 3: over 6,000), and searching a
        // long prompt for each is most of the tokenizer's time. A special whose first four
        // bytes appear nowhere in the text cannot occur in it: one pass over the text marks its
        // 4-byte windows, so most specials are ruled out without a search.
        let windows = ByteWindows::of(text.as_bytes());
        for &id in &self.specials {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, TokenType::Control | TokenType::Unknown) {
                continue;
            }
            let needle = self.texts[id as usize].as_str();
            if !windows.may_contain(needle.as_bytes()) || !frags.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(needle))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(mut t) => {
                        while let Some(pos) = t.find(needle) {
                            if pos > 0 {
                                next.push(Fragment::Text(&t[..pos]));
                            }
                            next.push(Fragment::Token(id));
                            t = &t[pos + needle.len()..];
                        }
                        if !t.is_empty() {
                            next.push(Fragment::Text(t));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token decodes to. Control and unknown tokens decode to nothing unless
    /// `special` is set, in which case they give their text.
    pub fn piece(&self, id: u32, special: bool) -> &[u8] {
        let i = id as usize;
        if i >= self.texts.len() {
            return &[];
        }
        if special && matches!(self.types[i], TokenType::Control | TokenType::Unknown) {
            return self.texts[i].as_bytes();
        }
        &self.pieces[i]
    }

    /// Decode tokens to text; invalid UTF-8 (a character cut by the end) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.piece(id, special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// Which 4-byte windows a text contains, as a 2^20-bit filter of their hashes (false positives
/// possible, false negatives not).
struct ByteWindows(Vec<u64>);

impl ByteWindows {
    const BITS: u32 = 20;

    fn hash(w: &[u8]) -> usize {
        let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        (v.wrapping_mul(0x9E37_79B1) >> (32 - Self::BITS)) as usize
    }

    fn of(text: &[u8]) -> ByteWindows {
        if text.len() < 256 {
            // Short texts are searched directly (no filter: everything may match).
            return ByteWindows(Vec::new());
        }
        let mut bits = vec![0u64; (1 << Self::BITS) / 64];
        for w in text.windows(4) {
            let h = Self::hash(w);
            bits[h / 64] |= 1 << (h % 64);
        }
        ByteWindows(bits)
    }

    /// False only if `needle` (of at least 4 bytes) cannot occur in the text.
    fn may_contain(&self, needle: &[u8]) -> bool {
        if needle.len() < 4 || self.0.is_empty() {
            return true;
        }
        let h = Self::hash(&needle[..4]);
        self.0[h / 64] >> (h % 64) & 1 == 1
    }
}
