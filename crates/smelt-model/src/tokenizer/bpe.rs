//! Byte-level BPE ("gpt2" vocabularies): text is split by the pre-tokenizer, each piece's bytes
//! are mapped to printable characters (GPT-2's byte-to-unicode table), then adjacent symbols are
//! merged by merge rank, lowest first.

use super::pretokenize::PreTokenizer;
use super::word_cache::WordCache;
use super::{FastMap, TextIndex, TokenType, TokenizerError};
use crate::gguf::Value;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

#[derive(Debug)]
pub struct Bpe {
    pre: PreTokenizer,
    /// Interned symbol texts: ids below the vocabulary size are tokens; the rest are merge
    /// results that are not tokens themselves.
    interned: FastMap<String, u32>,
    extra: Vec<String>,
    n_vocab: u32,
    /// (left, right) → (rank, merged).
    merges: FastMap<(u32, u32), (u32, u32)>,
    /// Token for each raw byte (its byte-level character), for the fallback.
    byte_tokens: [Option<u32>; 256],
    /// Byte-level character for each byte.
    byte_chars: [char; 256],
    /// Pre-tokenized words never merge across their edges, so each is cached as a whole.
    pub(super) words: WordCache,
    ignore_merges: bool,
}

/// GPT-2's reversible byte → printable character table.
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    table
}

struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    merged: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: lowest rank first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then(o.left.cmp(&self.left))
    }
}

struct Symbol {
    id: u32,
    prev: Option<usize>,
    next: Option<usize>,
    alive: bool,
}

impl Bpe {
    pub fn new(texts: &[String], by_text: &TextIndex, merges: &[Value], pre: PreTokenizer) -> Result<Bpe, TokenizerError> {
        let n_vocab = texts.len() as u32;
        let mut interned: FastMap<String, u32> = FastMap::with_capacity_and_hasher(texts.len(), Default::default());
        for (i, t) in texts.iter().enumerate() {
            interned.insert(t.clone(), i as u32);
        }
        let mut extra: Vec<String> = Vec::new();
        let mut intern = |s: &str, interned: &mut FastMap<String, u32>| -> u32 {
            if let Some(&id) = interned.get(s) {
                return id;
            }
            let id = n_vocab + extra.len() as u32;
            extra.push(s.to_string());
            interned.insert(s.to_string(), id);
            id
        };
        let mut table = FastMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, m) in merges.iter().enumerate() {
            let m = m.as_str().ok_or_else(|| TokenizerError::Invalid(format!("merge {rank} is not a string")))?;
            // "left right", split at the first space after the first character (as llama.cpp).
            let first_len = m.chars().next().map(|c| c.len_utf8()).unwrap_or(0);
            let Some(pos) = m[first_len..].find(' ').map(|p| p + first_len) else {
                continue;
            };
            let (l, r) = (&m[..pos], &m[pos + 1..]);
            let li = intern(l, &mut interned);
            let ri = intern(r, &mut interned);
            let merged = intern(&format!("{l}{r}"), &mut interned);
            table.entry((li, ri)).or_insert((rank as u32, merged));
        }
        let byte_chars = byte_to_char_table();
        let byte_tokens = std::array::from_fn(|b| by_text.get(&byte_chars[b].to_string()));
        Ok(Bpe { ignore_merges: pre.ignores_merges(), pre, interned, extra, n_vocab, merges: table, byte_tokens, byte_chars, words: WordCache::default() })
    }

    /// What a token decodes to (without special-token text).
    pub fn piece(&self, text: &str, ty: TokenType) -> Vec<u8> {
        match ty {
            TokenType::Normal => {
                let mut out = Vec::with_capacity(text.len());
                for c in text.chars() {
                    match self.byte_chars.iter().position(|&bc| bc == c) {
                        Some(b) => out.push(b as u8),
                        // Not a byte-level character: llama.cpp writes a marker; keep the text.
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            }
            TokenType::UserDefined => text.as_bytes().to_vec(),
            _ => Vec::new(),
        }
    }

    /// Tokenize one text fragment (special tokens already split out).
    pub fn encode(&self, fragment: &str, by_text: &TextIndex, out: &mut Vec<u32>) {
        for word in self.pre.split(fragment) {
            let encoded: String = word.bytes().map(|b| self.byte_chars[b as usize]).collect();
            if self.ignore_merges {
                if let Some(id) = by_text.get(&encoded) {
                    out.push(id);
                    continue;
                }
            }
            self.words.tokens(&encoded, out, |w, out| self.merge_word(w, out));
        }
    }

    fn merge_word(&self, word: &str, out: &mut Vec<u32>) {
        let unknown = u32::MAX;
        let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
        let mut buf = [0u8; 4];
        for (i, c) in word.chars().enumerate() {
            let id = self.interned.get(c.encode_utf8(&mut buf) as &str).copied().unwrap_or(unknown);
            symbols.push(Symbol { id, prev: i.checked_sub(1), next: None, alive: true });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            if let Some(&(rank, merged)) = self.merges.get(&(symbols[l].id, symbols[r].id)) {
                heap.push(Bigram { rank, left: l, right: r, merged });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut heap, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Skip pairs made stale by an earlier merge.
            if !symbols[l].alive || !symbols[r].alive || symbols[l].next != Some(r) {
                continue;
            }
            if self.merges.get(&(symbols[l].id, symbols[r].id)).map(|m| m.1) != Some(b.merged) {
                continue;
            }
            symbols[l].id = b.merged;
            symbols[r].alive = false;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            let (prev, next) = (symbols[l].prev, symbols[l].next);
            try_add(&mut heap, &symbols, prev, Some(l));
            try_add(&mut heap, &symbols, Some(l), next);
        }
        let mut i = if symbols.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let id = symbols[k].id;
            if id < self.n_vocab {
                out.push(id);
            } else {
                // Not a token: fall back to the tokens of its bytes.
                let text = if id == unknown {
                    word.chars().nth(k).map(String::from).unwrap_or_default()
                } else {
                    self.extra[(id - self.n_vocab) as usize].clone()
                };
                for ch in text.chars() {
                    if let Some(b) = self.byte_chars.iter().position(|&bc| bc == ch) {
                        if let Some(t) = self.byte_tokens[b] {
                            out.push(t);
                        }
                    }
                }
            }
            i = symbols[k].next;
        }
    }
}
