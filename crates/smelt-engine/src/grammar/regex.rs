//! Regular expressions to grammar. Supported: literals and escapes, `.`, classes `[a-z]`,
//! `[^...]`, `\d \w \s \D \W \S`, groups `( )` and `(?: )`, alternation `|`, quantifiers
//! `* + ? {m} {m,} {m,n}` (lazy `?` suffixes accepted), and `^`/`$` at the ends. The whole
//! output must match. Backreferences and look-around are rejected.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("regular expression error at position {pos}: {msg}")]
pub struct RegexError {
    pub pos: usize,
    pub msg: String,
}

struct P {
    s: Vec<char>,
    i: usize,
    /// The match sits inside a JSON string: characters that would need escaping there
    /// (quote, backslash, control characters) are never produced raw.
    json: bool,
    /// Groups open around the current position.
    depth: usize,
}

/// Most nested groups a regular expression may have (each becomes up to two GBNF groups,
/// within the grammar parser's own limit).
pub const MAX_GROUP_NESTING: usize = 40;

/// Escape a code point for a GBNF literal or class.
pub fn gbnf_char(c: char) -> String {
    match c {
        '"' => "\\\"".into(),
        '\\' => "\\\\".into(),
        '[' => "\\[".into(),
        ']' => "\\]".into(),
        '-' => "\\-".into(),
        '^' => "\\^".into(),
        c if (c as u32) < 0x20 || c as u32 == 0x7f => format!("\\x{:02x}", c as u32),
        c => c.to_string(),
    }
}

/// A GBNF literal matching exactly `s`.
pub fn gbnf_literal(s: &str) -> String {
    format!("\"{}\"", s.chars().map(gbnf_char).collect::<String>())
}

const DIGIT: &str = "0-9";
const WORD: &str = "a-zA-Z0-9_";
const SPACE: &str = " \\t\\n\\r\\x0b\\x0c";

impl P {
    fn err(&self, msg: &str) -> RegexError {
        RegexError { pos: self.i, msg: msg.into() }
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn alt(&mut self) -> Result<String, RegexError> {
        let mut alts = vec![self.seq()?];
        while self.peek() == Some('|') {
            self.i += 1;
            alts.push(self.seq()?);
        }
        Ok(if alts.len() == 1 { alts.pop().unwrap_or_default() } else { format!("({})", alts.join(" | ")) })
    }

    fn seq(&mut self) -> Result<String, RegexError> {
        let mut items: Vec<String> = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            let atom = self.quantified(atom)?;
            items.push(atom);
        }
        Ok(if items.is_empty() { "\"\"".into() } else { items.join(" ") })
    }

    fn quantified(&mut self, atom: String) -> Result<String, RegexError> {
        let q = match self.peek() {
            Some(c @ ('*' | '+' | '?')) => {
                self.i += 1;
                c.to_string()
            }
            Some('{') => {
                let start = self.i;
                let close = self.s[self.i..].iter().position(|&c| c == '}').ok_or_else(|| self.err("unclosed '{'"))?;
                let inner: String = self.s[self.i + 1..self.i + close].iter().collect();
                let ok = !inner.is_empty() && inner.chars().all(|c| c.is_ascii_digit() || c == ',') && inner.matches(',').count() <= 1 && !inner.starts_with(',');
                if !ok {
                    self.i = start;
                    return Err(self.err("bad repetition count"));
                }
                self.i += close + 1;
                format!("{{{inner}}}")
            }
            _ => return Ok(atom),
        };
        if self.peek() == Some('?') {
            self.i += 1; // lazy: same language
        }
        if matches!(self.peek(), Some('*' | '+' | '{')) {
            return Err(self.err("nested quantifier"));
        }
        Ok(format!("{atom}{q}"))
    }

    fn escape_class(&mut self, c: char) -> Result<(String, bool), RegexError> {
        Ok(match c {
            'd' => (DIGIT.into(), false),
            'w' => (WORD.into(), false),
            's' => (SPACE.into(), false),
            'D' => (DIGIT.into(), true),
            'W' => (WORD.into(), true),
            'S' => (SPACE.into(), true),
            _ => return Err(self.err("not a class escape")),
        })
    }

    fn escaped_char(&mut self, c: char) -> Result<char, RegexError> {
        Ok(match c {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'f' => '\x0c',
            'v' => '\x0b',
            '0' => '\0',
            'x' => {
                let h: String = self.s.get(self.i..self.i + 2).ok_or_else(|| self.err("short \\x escape"))?.iter().collect();
                self.i += 2;
                char::from_u32(u32::from_str_radix(&h, 16).map_err(|_| self.err("bad \\x escape"))?).ok_or_else(|| self.err("bad \\x escape"))?
            }
            'u' => {
                let h: String = self.s.get(self.i..self.i + 4).ok_or_else(|| self.err("short \\u escape"))?.iter().collect();
                self.i += 4;
                char::from_u32(u32::from_str_radix(&h, 16).map_err(|_| self.err("bad \\u escape"))?).ok_or_else(|| self.err("bad \\u escape"))?
            }
            c if c.is_ascii_digit() => return Err(self.err("backreferences are not supported")),
            'b' | 'B' | 'A' | 'z' | 'Z' => return Err(self.err("word boundaries and anchors inside the pattern are not supported")),
            c if c.is_ascii_alphanumeric() => return Err(self.err(&format!("unknown escape \\{c}"))),
            c => c,
        })
    }

    fn atom(&mut self) -> Result<String, RegexError> {
        let c = self.peek().ok_or_else(|| self.err("unexpected end"))?;
        self.i += 1;
        Ok(match c {
            '(' => {
                if self.depth >= MAX_GROUP_NESTING {
                    return Err(self.err(&format!("groups are nested more than {MAX_GROUP_NESTING} deep")));
                }
                if self.peek() == Some('?') {
                    if self.s.get(self.i + 1) == Some(&':') {
                        self.i += 2;
                    } else {
                        return Err(self.err("look-around and named groups are not supported"));
                    }
                }
                self.depth += 1;
                let inner = self.alt()?;
                self.depth -= 1;
                if self.peek() != Some(')') {
                    return Err(self.err("missing ')'"));
                }
                self.i += 1;
                format!("({inner})")
            }
            '[' => self.class()?,
            '.' => if self.json { format!("[^\\n{JSON_UNSAFE}]") } else { "[^\\n]".into() },
            '\\' => {
                let e = self.peek().ok_or_else(|| self.err("trailing backslash"))?;
                self.i += 1;
                match self.escape_class(e) {
                    Ok((set, neg)) => format!("[{}{set}{}]", if neg { "^" } else { "" }, if neg && self.json { JSON_UNSAFE } else { "" }),
                    Err(_) => {
                        let c = self.escaped_char(e)?;
                        self.literal(c)
                    }
                }
            }
            '*' | '+' | '?' | '{' => return Err(self.err("quantifier with nothing to repeat")),
            '^' | '$' => return Err(self.err("anchors are only supported at the start and end")),
            c => self.literal(c),
        })
    }

    fn literal(&self, c: char) -> String {
        if self.json {
            if let Some(esc) = json_escape(c) {
                return gbnf_literal(&esc);
            }
        }
        gbnf_literal(c.encode_utf8(&mut [0; 4]))
    }

    fn class(&mut self) -> Result<String, RegexError> {
        let negated = self.peek() == Some('^');
        if negated {
            self.i += 1;
        }
        let mut ranges: Vec<(char, char)> = Vec::new();
        let mut first = true;
        loop {
            let c = self.peek().ok_or_else(|| self.err("unclosed '['"))?;
            self.i += 1;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = if c == '\\' {
                let e = self.peek().ok_or_else(|| self.err("trailing backslash"))?;
                self.i += 1;
                if let Ok((set, neg)) = self.escape_class(e) {
                    if neg {
                        return Err(self.err("negated class escapes inside [...] are not supported"));
                    }
                    ranges.extend(class_ranges(&set));
                    continue;
                }
                self.escaped_char(e)?
            } else {
                c
            };
            let mut hi = lo;
            if self.peek() == Some('-') && self.s.get(self.i + 1).is_some_and(|&n| n != ']') {
                self.i += 1;
                hi = self.peek().ok_or_else(|| self.err("unclosed '['"))?;
                self.i += 1;
                if hi == '\\' {
                    let e = self.peek().ok_or_else(|| self.err("trailing backslash"))?;
                    self.i += 1;
                    hi = self.escaped_char(e)?;
                }
                if hi < lo {
                    return Err(self.err("range is backwards"));
                }
            }
            ranges.push((lo, hi));
        }
        if self.json && !negated {
            // Leave out what a JSON string cannot hold raw (a subset of the language: still valid).
            ranges = ranges.into_iter().flat_map(|(a, b)| without_json_unsafe(a, b)).collect();
            if ranges.is_empty() {
                return Err(self.err("character class has nothing a JSON string can hold unescaped"));
            }
        }
        let mut out = String::from(if negated { "[^" } else { "[" });
        for (a, b) in ranges {
            out.push_str(&gbnf_char(a));
            if b != a {
                out.push('-');
                out.push_str(&gbnf_char(b));
            }
        }
        if negated && self.json {
            out.push_str(JSON_UNSAFE);
        }
        out.push(']');
        Ok(out)
    }
}

/// GBNF class text for what a JSON string must escape.
const JSON_UNSAFE: &str = "\\x00-\\x1f\\\"\\\\";

/// How a character is written inside a JSON string, when it cannot appear raw.
fn json_escape(c: char) -> Option<String> {
    match c {
        '"' => Some("\\\"".into()),
        '\\' => Some("\\\\".into()),
        '\n' => Some("\\n".into()),
        '\t' => Some("\\t".into()),
        '\r' => Some("\\r".into()),
        c if (c as u32) < 0x20 => Some(format!("\\u{:04x}", c as u32)),
        _ => None,
    }
}

/// The ranges of a class escape's set (as written in DIGIT/WORD/SPACE).
fn class_ranges(set: &str) -> Vec<(char, char)> {
    match set {
        DIGIT => vec![('0', '9')],
        WORD => vec![('a', 'z'), ('A', 'Z'), ('0', '9'), ('_', '_')],
        _ => vec![(' ', ' '), ('\t', '\r')],
    }
}

fn without_json_unsafe(a: char, b: char) -> Vec<(char, char)> {
    let mut out = Vec::new();
    let mut lo = (a as u32).max(0x20);
    for cut in [0x22u32, 0x5c] {
        if lo <= cut && cut <= b as u32 {
            if lo < cut {
                out.push((lo, cut - 1));
            }
            lo = cut + 1;
        }
    }
    if lo <= b as u32 {
        out.push((lo, b as u32));
    }
    out.into_iter().filter_map(|(x, y)| Some((char::from_u32(x)?, char::from_u32(y)?))).collect()
}

/// A GBNF expression matching exactly the regex's language.
pub fn to_gbnf_expr(re: &str) -> Result<String, RegexError> {
    expr(re, false)
}

/// A GBNF expression for the regex's matches as they are written inside a JSON string
/// (JSON Schema's `pattern`).
pub fn to_json_string_expr(re: &str) -> Result<String, RegexError> {
    expr(re, true)
}

fn expr(re: &str, json: bool) -> Result<String, RegexError> {
    let mut body = re;
    if let Some(b) = body.strip_prefix('^') {
        body = b;
    }
    if body.ends_with('$') && !body.ends_with("\\$") {
        body = &body[..body.len() - 1];
    }
    let mut p = P { s: body.chars().collect(), i: 0, json, depth: 0 };
    let e = p.alt()?;
    if p.i < p.s.len() {
        return Err(p.err("unmatched ')'"));
    }
    Ok(e)
}

/// A full grammar (rule `root`) for a regex.
pub fn to_gbnf(re: &str) -> Result<String, RegexError> {
    Ok(format!("root ::= {}\n", to_gbnf_expr(re)?))
}

#[cfg(test)]
mod tests {
    use super::super::gbnf::parse;
    use super::super::matcher::Matcher;
    use super::*;

    fn full(re: &str, text: &str) -> bool {
        let m = Matcher::new(parse(&to_gbnf(re).unwrap(), "root").unwrap());
        m.accept_bytes(&m.start(), text.as_bytes()).is_some_and(|s| m.accepting(&s))
    }

    #[test]
    fn regexes_match_whole_outputs() {
        assert!(full(r"\d{3}-\d{4}", "555-1234") && !full(r"\d{3}-\d{4}", "555-12345"));
        assert!(full(r"^(yes|no)$", "yes") && !full("(yes|no)", "maybe"));
        assert!(full(r"[A-Z][a-z]+(?: [A-Z][a-z]+)*", "Ada Lovelace") && !full(r"[A-Z][a-z]+", "ada"));
        assert!(full(r"\w+@\w+\.com", "a_1@b.com") && !full(r"\w+@\w+\.com", "a@b.org"));
        assert!(full(r"[^\n]{2,3}x?", "abx") && !full(r"a{2,3}", "aaaa"));
        assert!(full(r"\[\]\\", "[]\\"));
    }

    #[test]
    fn unsupported_features_are_named() {
        assert!(to_gbnf(r"(a)\1").unwrap_err().msg.contains("backreferences"));
        assert!(to_gbnf(r"(?=a)b").unwrap_err().msg.contains("look-around"));
        assert!(to_gbnf(r"a**").unwrap_err().msg.contains("nested quantifier"));
        assert!(to_gbnf(r"(ab").unwrap_err().msg.contains("missing ')'"));
        assert_eq!(to_gbnf(r"ab)").unwrap_err().pos, 2);
    }
}
