//! SentencePiece-style tokenization ("llama" vocabularies): spaces become "▁", then adjacent
//! symbols are merged greedily, highest-scoring resulting token first; characters left without a
//! token fall back to `<0xXX>` byte tokens.

use super::{FastMap, TokenType, TokenizerError};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub const SPACE: &str = "\u{2581}";

#[derive(Debug)]
pub struct Spm {
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
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
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// The byte a `<0xXX>` token stands for.
pub fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// What a token decodes to (without special-token text).
pub fn piece(text: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Normal => text.replace(SPACE, " ").into_bytes(),
        TokenType::UserDefined => text.as_bytes().to_vec(),
        TokenType::Byte => byte_token_value(text).map(|b| vec![b]).unwrap_or_default(),
        _ => Vec::new(),
    }
}

impl Spm {
    pub fn new(by_text: &FastMap<String, u32>, scores: Vec<f32>, add_space_prefix: bool) -> Result<Spm, TokenizerError> {
        // Byte fallback: the `<0xXX>` token, else a token whose text is that single (ASCII) byte.
        let byte_tokens = std::array::from_fn(|b| {
            by_text.get(&format!("<0x{b:02X}>")).copied().or_else(|| {
                let ch = b as u8;
                ch.is_ascii().then(|| by_text.get(&(ch as char).to_string()).copied()).flatten()
            })
        });
        Ok(Spm { scores, byte_tokens, add_space_prefix })
    }

    /// Tokenize one text fragment (special tokens already split out).
    pub fn encode(&self, fragment: &str, after_special: bool, by_text: &FastMap<String, u32>, out: &mut Vec<u32>) {
        let mut text = String::with_capacity(fragment.len() + 3);
        if self.add_space_prefix && after_special {
            text.push(' ');
        }
        text.push_str(fragment);
        let text = text.replace(' ', SPACE);

        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, ch) in text.char_indices() {
            let i = symbols.len();
            symbols.push(Symbol { start, len: ch.len_utf8(), prev: i.checked_sub(1), next: None });
            if i > 0 {
                symbols[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], l: Option<usize>, r: Option<usize>| {
            let (Some(l), Some(r)) = (l, r) else { return };
            let s = &text[symbols[l].start..symbols[r].start + symbols[r].len];
            if let Some(&id) = by_text.get(s) {
                heap.push(Bigram { score: self.scores[id as usize], left: l, right: r, len: s.len() });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut heap, &symbols, Some(i - 1), Some(i));
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Skip pairs made stale by an earlier merge.
            if symbols[l].len == 0 || symbols[r].len == 0 || symbols[l].len + symbols[r].len != b.len {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
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
            let s = &text[symbols[k].start..symbols[k].start + symbols[k].len];
            match by_text.get(s) {
                Some(&id) => out.push(id),
                None => {
                    for b in s.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize] {
                            out.push(id);
                        }
                    }
                }
            }
            i = symbols[k].next;
        }
    }
}
