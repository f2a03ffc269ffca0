//! Pre-tokenizers: how byte-level BPE vocabularies split text into words before merging.
//!
//! The common patterns are hand-written state machines equivalent to their published regexes
//! (which use look-ahead that plain regex engines lack), following the same rules as llama.cpp:
//! - gpt2:   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//! - llama3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//! - qwen2:  as llama3 with single digits (\p{N}).
//!
//! `default` is a chain of regexes, each splitting the pieces of the previous one further
//! (matches and the text between them both become pieces).

use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

#[derive(Clone, Debug)]
pub enum PreTokenizer {
    Gpt2,
    /// Llama 3 family (`digits` = 3) and Qwen2 family (`digits` = 1).
    Llama3 { digits: usize, adds_bos: bool },
    /// The fallback chain llama.cpp uses for `default`.
    Default(Vec<ChainStep>),
}

#[derive(Clone, Debug)]
pub enum ChainStep {
    Gpt2,
    Regex(fancy_regex::Regex),
}

const GPT2_NAMES: &[&str] = &["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "mpt", "olmo", "jais"];
const LLAMA3_NAMES: &[&str] = &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"];
const QWEN2_NAMES: &[&str] = &["qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan"];

impl PreTokenizer {
    pub fn from_name(name: &str) -> Option<PreTokenizer> {
        if GPT2_NAMES.contains(&name) {
            Some(PreTokenizer::Gpt2)
        } else if LLAMA3_NAMES.contains(&name) {
            Some(PreTokenizer::Llama3 { digits: 3, adds_bos: true })
        } else if QWEN2_NAMES.contains(&name) {
            Some(PreTokenizer::Llama3 { digits: 1, adds_bos: false })
        } else if name == "default" {
            let re = |s: &str| ChainStep::Regex(fancy_regex::Regex::new(s).expect("built-in pattern"));
            Some(PreTokenizer::Default(vec![re(r"[\p{P}\$\+<=>\^~\|]+"), ChainStep::Gpt2, re(r"\p{N}+"), re("[0-9][0-9][0-9]")]))
        } else {
            None
        }
    }

    pub fn known_names() -> Vec<&'static str> {
        let mut v = vec!["default"];
        v.extend(GPT2_NAMES);
        v.extend(LLAMA3_NAMES);
        v.extend(QWEN2_NAMES);
        v
    }

    /// Llama 3 vocabularies add BOS by default; the metadata may override it.
    pub fn adds_bos(&self) -> bool {
        matches!(self, PreTokenizer::Llama3 { adds_bos: true, .. })
    }

    /// Llama 3 takes a whole word as one token when the vocabulary has it, skipping merges.
    pub fn ignores_merges(&self) -> bool {
        self.adds_bos()
    }

    pub fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        match self {
            PreTokenizer::Gpt2 => gpt2(text),
            PreTokenizer::Llama3 { digits, .. } => llama3(text, *digits),
            PreTokenizer::Default(steps) => {
                let mut pieces = vec![text];
                for step in steps {
                    pieces = pieces
                        .into_iter()
                        .flat_map(|p| match step {
                            ChainStep::Gpt2 => gpt2(p),
                            ChainStep::Regex(re) => regex_split(re, p),
                        })
                        .collect();
                }
                pieces
            }
        }
    }
}

/// Matches and the gaps between them, in order.
fn regex_split<'t>(re: &fancy_regex::Regex, text: &'t str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut last = 0;
    for m in re.find_iter(text).flatten() {
        if m.start() > last {
            out.push(&text[last..m.start()]);
        }
        if m.end() > m.start() {
            out.push(m.as_str());
        }
        last = m.end();
    }
    if last < text.len() {
        out.push(&text[last..]);
    }
    out
}

#[derive(Clone, Copy, Default)]
struct Flags {
    in_range: bool,
    letter: bool,
    number: bool,
    space: bool,
}

/// Characters of one text with their classes; positions past the end have no flags.
struct Chars<'t> {
    text: &'t str,
    chars: Vec<(usize, char)>,
}

impl<'t> Chars<'t> {
    fn new(text: &'t str) -> Self {
        Chars { text, chars: text.char_indices().collect() }
    }
    fn len(&self) -> usize {
        self.chars.len()
    }
    fn get(&self, pos: usize) -> Option<char> {
        self.chars.get(pos).map(|&(_, c)| c)
    }
    fn flags(&self, pos: usize) -> Flags {
        match self.get(pos) {
            None => Flags::default(),
            Some(c) => {
                let g = c.general_category_group();
                Flags { in_range: true, letter: g == GeneralCategoryGroup::Letter, number: g == GeneralCategoryGroup::Number, space: c.is_whitespace() }
            }
        }
    }
    fn byte_at(&self, pos: usize) -> usize {
        self.chars.get(pos).map(|&(b, _)| b).unwrap_or(self.text.len())
    }
}

/// Collects pieces ending at successive character positions.
struct Pieces<'t, 'c> {
    chars: &'c Chars<'t>,
    prev_end: usize,
    out: Vec<&'t str>,
}

impl<'t, 'c> Pieces<'t, 'c> {
    fn add(&mut self, end: usize) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(&self.chars.text[self.chars.byte_at(self.prev_end)..self.chars.byte_at(end)]);
        }
        self.prev_end = end;
        len
    }
}

fn is_rn(c: Option<char>) -> bool {
    matches!(c, Some('\r' | '\n'))
}

/// `'s|'t|'re|'ve|'m|'ll|'d` at `pos`: the length of the match.
fn contraction(c: &Chars, pos: usize, case_insensitive: bool) -> Option<usize> {
    if c.get(pos) != Some('\'') || pos + 1 >= c.len() {
        return None;
    }
    let low = |p: usize| c.get(p).map(|ch| if case_insensitive { ch.to_ascii_lowercase() } else { ch });
    match low(pos + 1) {
        Some('s' | 't' | 'm' | 'd') => return Some(2),
        _ => {}
    }
    if pos + 2 < c.len() {
        match (low(pos + 1), low(pos + 2)) {
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => return Some(3),
            _ => {}
        }
    }
    None
}

/// Whitespace handling shared by both machines: `\s*[\r\n]+` (llama3 only), `\s+(?!\S)`, `\s+`.
/// Returns the new position, or None when `pos` is not whitespace.
fn whitespace(c: &Chars, pos: usize, newline_rule: bool) -> Option<usize> {
    let mut n = 0;
    let mut last_rn = None;
    while c.flags(pos + n).space {
        if is_rn(c.get(pos + n)) {
            last_rn = Some(pos + n + 1);
        }
        n += 1;
    }
    if newline_rule {
        if let Some(end) = last_rn {
            return Some(end);
        }
    }
    if n > 1 && c.get(pos + n).is_some() {
        // Leave the last space to start the next word.
        return Some(pos + n - 1);
    }
    (n > 0).then_some(pos + n)
}

fn gpt2(text: &str) -> Vec<&str> {
    let c = Chars::new(text);
    let mut p = Pieces { chars: &c, prev_end: 0, out: Vec::new() };
    let mut pos = 0;
    while pos < c.len() {
        if let Some(n) = contraction(&c, pos, false) {
            pos += p.add(pos + n);
            continue;
        }
        let ch = c.get(pos);
        let skip = (ch == Some(' ')) as usize;
        let mut f2 = c.flags(pos + skip);
        if f2.letter || f2.number {
            let want_letter = f2.letter;
            pos += skip;
            while if want_letter { f2.letter } else { f2.number } {
                pos += 1;
                f2 = c.flags(pos);
            }
            p.add(pos);
            continue;
        }
        if !(f2.space || f2.letter || f2.number) && f2.in_range {
            pos += skip;
            while !(f2.space || f2.letter || f2.number) && f2.in_range {
                pos += 1;
                f2 = c.flags(pos);
            }
            p.add(pos);
            continue;
        }
        if let Some(end) = whitespace(&c, pos, false) {
            pos = end;
            p.add(pos);
            continue;
        }
        pos += 1;
        p.add(pos);
    }
    p.out
}

fn llama3(text: &str, digits: usize) -> Vec<&str> {
    let c = Chars::new(text);
    let mut p = Pieces { chars: &c, prev_end: 0, out: Vec::new() };
    let mut pos = 0;
    while pos < c.len() {
        if let Some(n) = contraction(&c, pos, true) {
            pos += p.add(pos + n);
            continue;
        }
        let ch = c.get(pos);
        let f = c.flags(pos);
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(is_rn(ch) || f.number) && (f.letter || c.flags(pos + 1).letter) {
            pos += 1;
            while c.flags(pos).letter {
                pos += 1;
            }
            p.add(pos);
            continue;
        }
        // \p{N}{1,digits}
        if f.number {
            let mut start = pos;
            while c.flags(pos).number {
                pos += 1;
                if pos - start >= digits {
                    p.add(pos);
                    start = pos;
                }
            }
            p.add(pos);
            continue;
        }
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        let mut f2 = if ch == Some(' ') { c.flags(pos + 1) } else { f };
        if !(f2.space || f2.letter || f2.number) && f.in_range {
            pos += (ch == Some(' ')) as usize;
            while !(f2.space || f2.letter || f2.number) && f2.in_range {
                pos += 1;
                f2 = c.flags(pos);
            }
            while is_rn(c.get(pos)) {
                pos += 1;
            }
            p.add(pos);
            continue;
        }
        if let Some(end) = whitespace(&c, pos, true) {
            pos = end;
            p.add(pos);
            continue;
        }
        pos += 1;
        p.add(pos);
    }
    p.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_splits_like_its_regex() {
        assert_eq!(llama3("Hello world", 3), vec!["Hello", " world"]);
        assert_eq!(llama3("I'm 12345 OK!!\n\n  x", 3), vec!["I", "'m", " ", "123", "45", " OK", "!!\n\n", " ", " x"]);
        assert_eq!(llama3("a  b", 3), vec!["a", " ", " b"]);
        assert_eq!(llama3("12345", 1), vec!["1", "2", "3", "4", "5"]);
        assert_eq!(llama3("x\n\ny", 3), vec!["x", "\n\n", "y"]);
        assert_eq!(llama3("end ", 3), vec!["end", " "]);
    }

    #[test]
    fn gpt2_splits_like_its_regex() {
        assert_eq!(gpt2("Hello world's 123 !?"), vec!["Hello", " world", "'s", " 123", " !?"]);
        assert_eq!(gpt2("a   b"), vec!["a", "  ", " b"]);
    }
}
