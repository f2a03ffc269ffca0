//! The vocabulary as a byte trie, with per-subtree summaries that let a mask take whole
//! subtrees at once.

use smelt_model::tokenizer::{TokenType, Tokenizer};

/// Byte categories: a grammar state that loops back to itself on every byte of some categories
/// accepts, at once, every subtree made only of those categories.
pub const CAT_ALNUM: u8 = 1;
pub const CAT_SPACE: u8 = 2;
pub const CAT_PUNCT: u8 = 4;
pub const CAT_QUOTE: u8 = 8;
pub const CAT_BACKSLASH: u8 = 16;
pub const CAT_CONTROL: u8 = 32;
pub const CAT_HIGH: u8 = 64;

pub fn category(b: u8) -> u8 {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => CAT_ALNUM,
        b' ' => CAT_SPACE,
        b'"' => CAT_QUOTE,
        b'\\' => CAT_BACKSLASH,
        0x00..=0x1f | 0x7f => CAT_CONTROL,
        0x80..=0xff => CAT_HIGH,
        _ => CAT_PUNCT,
    }
}

/// UTF-8 decoding states: 0 at a character boundary, 1-3 expecting that many continuation
/// bytes, 4-7 the restricted second bytes after E0, ED, F0, F4. None: invalid.
fn utf8_step(d: u8, b: u8) -> Option<u8> {
    match (d, b) {
        (0, 0x00..=0x7f) => Some(0),
        (0, 0xc2..=0xdf) => Some(1),
        (0, 0xe1..=0xec | 0xee..=0xef) => Some(2),
        (0, 0xe0) => Some(4),
        (0, 0xed) => Some(5),
        (0, 0xf1..=0xf3) => Some(3),
        (0, 0xf0) => Some(6),
        (0, 0xf4) => Some(7),
        (1, 0x80..=0xbf) => Some(0),
        (2, 0x80..=0xbf) => Some(1),
        (3, 0x80..=0xbf) => Some(2),
        (4, 0xa0..=0xbf) => Some(1),
        (5, 0x80..=0x9f) => Some(1),
        (6, 0x90..=0xbf) => Some(2),
        (7, 0x80..=0x8f) => Some(2),
        _ => None,
    }
}

/// The vocabulary's tokens as a byte trie (control and unknown tokens are left out: constrained
/// output is text). Nodes are numbered in pre-order, and tokens listed in the same order, so a
/// subtree's tokens are one contiguous range.
pub struct TokenTrie {
    /// Per node: first edge index and number of edges into `edges`.
    edge_start: Vec<u32>,
    edge_len: Vec<u32>,
    edges: Vec<(u8, u32)>,
    /// Per node: tokens whose bytes end here start at `tok_start`; the subtree's tokens run to
    /// `subtree_end`.
    tok_start: Vec<u32>,
    tok_len: Vec<u32>,
    subtree_end: Vec<u32>,
    /// Per node: categories of the bytes below it.
    cats: Vec<u8>,
    /// Per node: bit d set when every byte string below it is valid UTF-8 (possibly ending
    /// inside a character) starting from decoding state d.
    utf8_ok: Vec<u8>,
    tokens: Vec<u32>,
    pub n_vocab: usize,
}

impl TokenTrie {
    pub fn new(tok: &Tokenizer) -> TokenTrie {
        let mut entries: Vec<(&[u8], u32)> = (0..tok.n_vocab() as u32)
            .filter(|&id| !matches!(tok.token_type(id), Some(TokenType::Control | TokenType::Unknown | TokenType::Unused)))
            .map(|id| (tok.piece(id, false), id))
            .filter(|(b, _)| !b.is_empty())
            .collect();
        entries.sort_unstable();
        let mut t = TokenTrie {
            edge_start: vec![],
            edge_len: vec![],
            edges: vec![],
            tok_start: vec![],
            tok_len: vec![],
            subtree_end: vec![],
            cats: vec![],
            utf8_ok: vec![],
            tokens: vec![],
            n_vocab: tok.n_vocab(),
        };
        t.build(&entries, 0);
        t
    }

    /// Build the node for `entries` (sorted, sharing their first `depth` bytes); returns its index.
    fn build(&mut self, entries: &[(&[u8], u32)], depth: usize) -> u32 {
        let node = self.edge_start.len();
        self.edge_start.push(0);
        self.edge_len.push(0);
        self.subtree_end.push(0);
        self.cats.push(0);
        self.utf8_ok.push(0);
        let ends = entries.iter().take_while(|(b, _)| b.len() == depth).count();
        self.tok_start.push(self.tokens.len() as u32);
        self.tok_len.push(ends as u32);
        self.tokens.extend(entries[..ends].iter().map(|e| e.1));
        let mut children = Vec::new();
        let mut i = ends;
        while i < entries.len() {
            let byte = entries[i].0[depth];
            let j = i + entries[i..].iter().take_while(|(b, _)| b[depth] == byte).count();
            let child = self.build(&entries[i..j], depth + 1);
            children.push((byte, child));
            i = j;
        }
        let mut cats = 0;
        let mut ok = 0xffu8;
        for &(b, c) in &children {
            cats |= category(b) | self.cats[c as usize];
            for d in 0..8u8 {
                if utf8_step(d, b).is_none_or(|e| self.utf8_ok[c as usize] >> e & 1 == 0) {
                    ok &= !(1 << d);
                }
            }
        }
        self.cats[node] = cats;
        self.utf8_ok[node] = ok;
        self.subtree_end[node] = self.tokens.len() as u32;
        self.edge_start[node] = self.edges.len() as u32;
        self.edge_len[node] = children.len() as u32;
        self.edges.extend(children);
        node as u32
    }

    pub fn children(&self, node: usize) -> &[(u8, u32)] {
        let s = self.edge_start[node] as usize;
        &self.edges[s..s + self.edge_len[node] as usize]
    }

    /// Tokens whose bytes end exactly at `node`.
    pub fn tokens(&self, node: u32) -> &[u32] {
        let s = self.tok_start[node as usize] as usize;
        &self.tokens[s..s + self.tok_len[node as usize] as usize]
    }

    /// All tokens in the subtree below `node` (excluding those ending at it).
    pub fn tokens_below(&self, node: u32) -> &[u32] {
        let n = node as usize;
        &self.tokens[(self.tok_start[n] + self.tok_len[n]) as usize..self.subtree_end[n] as usize]
    }

    /// Byte categories used below `node`.
    pub fn categories_below(&self, node: u32) -> u8 {
        self.cats[node as usize]
    }

    /// Every byte string below `node` is valid UTF-8 when read from a character boundary.
    pub fn valid_utf8_below(&self, node: u32) -> bool {
        self.utf8_ok[node as usize] & 1 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_states_agree_with_std() {
        // Every 1..=4-byte string over an interesting byte set: the decoder says valid prefix
        // exactly when std does.
        let bytes = [0x41u8, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xe1, 0xed, 0xee, 0xf0, 0xf1, 0xf4, 0xf5, 0xff];
        let check = |s: &[u8]| {
            let mut d = Some(0u8);
            for &b in s {
                d = d.and_then(|d| utf8_step(d, b));
            }
            let std_ok = match std::str::from_utf8(s) {
                Ok(_) => true,
                Err(e) => e.error_len().is_none(),
            };
            assert_eq!(d.is_some(), std_ok, "{s:02x?}");
        };
        for &a in &bytes {
            check(&[a]);
            for &b in &bytes {
                check(&[a, b]);
                for &c in &bytes {
                    check(&[a, b, c]);
                    for &e in &bytes {
                        check(&[a, b, c, e]);
                    }
                }
            }
        }
    }
}
