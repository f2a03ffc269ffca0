//! SentencePiece-style tokenization ("llama" vocabularies): spaces become "▁", then adjacent
//! symbols are merged greedily, highest-scoring resulting token first; characters left without a
//! token fall back to `<0xXX>` byte tokens.

use super::word_cache::WordCache;
use super::{TextIndex, TokenType, TokenizerError};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

pub const SPACE: &str = "\u{2581}";

#[derive(Debug)]
pub struct Spm {
    scores: Vec<f32>,
    byte_tokens: [Option<u32>; 256],
    add_space_prefix: bool,
    /// Characters that some vocabulary text has right before a "▁" (sorted).
    joins_space: Vec<char>,
    pub(super) words: WordCache,
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
    pub fn new(texts: &[String], by_text: &TextIndex, scores: Vec<f32>, add_space_prefix: bool) -> Result<Spm, TokenizerError> {
        // Byte fallback: the `<0xXX>` token, else a token whose text is that single (ASCII) byte.
        let byte_tokens = std::array::from_fn(|b| {
            by_text.get(&format!("<0x{b:02X}>")).or_else(|| {
                let ch = b as u8;
                ch.is_ascii().then(|| by_text.get(&(ch as char).to_string())).flatten()
            })
        });
        let mut joins_space: Vec<char> = Vec::new();
        for t in texts {
            let mut prev = None;
            for c in t.chars() {
                if let (Some(p), '\u{2581}') = (prev, c) {
                    if !joins_space.contains(&p) {
                        joins_space.push(p);
                    }
                }
                prev = Some(c);
            }
        }
        joins_space.sort_unstable();
        Ok(Spm { scores, byte_tokens, add_space_prefix, joins_space, words: WordCache::default() })
    }

    /// Tokenize one text fragment (special tokens already split out).
    ///
    /// A merge joins two adjacent symbols into a vocabulary text, so no symbol can ever span two
    /// adjacent characters that appear next to each other in no vocabulary text. The text is
    /// cut before each "▁" whose preceding character never precedes "▁" in the vocabulary
    /// (for Gemma 3, every space but one after ">"): the words then merge independently, with
    /// exactly the result of merging the whole text at once, and a word seen before (in any
    /// call) comes from the word cache.
    pub fn encode(&self, fragment: &str, after_special: bool, by_text: &TextIndex, out: &mut Vec<u32>) {
        let mut text = String::with_capacity(fragment.len() + 3);
        if self.add_space_prefix && after_special {
            text.push(' ');
        }
        text.push_str(fragment);
        let text = text.replace(' ', SPACE);
        let (mut start, mut prev) = (0, None);
        let merge = |w: &str, out: &mut Vec<u32>| self.merge(w, by_text, out);
        for (i, c) in text.char_indices() {
            if c == '\u{2581}' && i > start && prev.is_some_and(|p| self.joins_space.binary_search(&p).is_err()) {
                self.words.tokens(&text[start..i], out, merge);
                start = i;
            }
            prev = Some(c);
        }
        if start < text.len() {
            self.words.tokens(&text[start..], out, merge);
        }
    }

    /// Merge adjacent symbols of `text`, highest-scoring resulting token first.
    fn merge(&self, text: &str, by_text: &TextIndex, out: &mut Vec<u32>) {
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
            if let Some(id) = by_text.get(s) {
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
                Some(id) => out.push(id),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Cutting at spaces and caching words must give exactly what merging the whole text gives,
    /// including with tokens that hold a "▁" after another character (which forbid a cut).
    #[test]
    fn words_merge_as_the_whole_text_does() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let chars = ["a", "b", "c", ">", "\u{2581}", "é"];
        let mut texts: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        for _ in 0..400 {
            let n = 2 + next() % 5;
            texts.push((0..n).map(|_| chars[next() % chars.len()]).collect());
        }
        texts.push("b>\u{2581}a".into());
        let scores: Vec<f32> = (0..texts.len()).map(|_| (next() % 1000) as f32).collect();
        let index = TextIndex::new(&texts);
        let spm = Spm::new(&texts, &index, scores, false).unwrap();
        assert!(!spm.joins_space.is_empty(), "the vocabulary has texts that forbid some cuts");
        for round in 0..2 {
            for _ in 0..300 {
                let n = next() % 40;
                let text: String = (0..n).map(|_| ["a", "b", "c", ">", " ", " ", "é"][next() % 7]).collect();
                let mut cut = Vec::new();
                spm.encode(&text, false, &index, &mut cut);
                let mut whole = Vec::new();
                spm.merge(&text.replace(' ', SPACE), &index, &mut whole);
                assert_eq!(cut, whole, "round {round}: {text:?}");
            }
        }
    }
}
