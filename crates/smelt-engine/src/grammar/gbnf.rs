//! GBNF, llama.cpp's grammar format, parsed into a compiled grammar.
//!
//! ```text
//! root   ::= object                 # rules: name ::= alternatives
//! object ::= "{" ws pair ("," ws pair)* "}" | "{}"
//! pair   ::= string ws ":" ws value
//! digit  ::= [0-9]    notq ::= [^"\\]    any ::= .
//! x?  x*  x+  x{3}  x{2,5}  x{2,}  ( grouping )  "literal\n\u00e9"  [\x00-\x1f]
//! ```
//!
//! Repetitions and groups become helper rules, so the compiled form has only sequences of
//! character classes and rule references.

use std::collections::HashMap;

/// A set of Unicode code points: sorted inclusive ranges, possibly negated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CharClass {
    pub ranges: Vec<(u32, u32)>,
    pub negated: bool,
}

impl CharClass {
    pub fn single(c: u32) -> CharClass {
        CharClass { ranges: vec![(c, c)], negated: false }
    }

    pub fn any() -> CharClass {
        CharClass { ranges: vec![], negated: true }
    }

    pub fn contains(&self, c: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= c && c <= b) != self.negated
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    Chars(CharClass),
    Rule(usize),
}

/// A compiled grammar: rules of alternatives of element sequences (an empty sequence matches
/// the empty string).
#[derive(Clone, Debug)]
pub struct Grammar {
    pub rules: Vec<Vec<Vec<Elem>>>,
    pub names: Vec<String>,
    pub root: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("grammar error at line {line}, column {column}: {msg}")]
pub struct GrammarError {
    pub line: usize,
    pub column: usize,
    pub msg: String,
}

/// Parsed but not yet compiled expression.
#[derive(Clone, Debug)]
enum Expr {
    Chars(CharClass),
    Ref(String, usize),
    Seq(Vec<Expr>),
    Alt(Vec<Expr>),
    Repeat(Box<Expr>, usize, Option<usize>),
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    /// Open parentheses around the current position.
    depth: usize,
}

/// Most nested groups (parentheses, and repetition operators on one atom) a grammar may have:
/// deeper text is refused rather than parsed by ever-deeper recursion.
pub const MAX_NESTING: usize = 100;

impl<'a> Parser<'a> {
    fn err(&self, at: usize, msg: impl Into<String>) -> GrammarError {
        let before = &self.src[..at.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        GrammarError { line, column, msg: msg.into() }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Skip spaces and comments; newlines too when `newlines` (inside parentheses).
    fn skip(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.bump();
                }
            } else if c == ' ' || c == '\t' || c == '\r' || (newlines && c == '\n') {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                self.bump();
            } else {
                break;
            }
        }
        (self.pos > start).then(|| self.src[start..self.pos].to_string())
    }

    fn hex(&mut self, digits: usize, at: usize) -> Result<u32, GrammarError> {
        let mut v = 0u32;
        for _ in 0..digits {
            let c = self.bump().ok_or_else(|| self.err(at, "unfinished escape"))?;
            v = v * 16 + c.to_digit(16).ok_or_else(|| self.err(at, format!("bad hex digit {c:?} in escape")))?;
        }
        Ok(v)
    }

    /// One character of a literal or class, handling escapes.
    fn char_in(&mut self, ctx: &str) -> Result<u32, GrammarError> {
        let at = self.pos;
        match self.bump() {
            None => Err(self.err(at, format!("unterminated {ctx}"))),
            Some('\\') => match self.bump() {
                Some('n') => Ok('\n' as u32),
                Some('r') => Ok('\r' as u32),
                Some('t') => Ok('\t' as u32),
                Some('x') => self.hex(2, at),
                Some('u') => self.hex(4, at),
                Some('U') => self.hex(8, at),
                Some(c @ ('\\' | '"' | '[' | ']' | '-' | '^' | '/')) => Ok(c as u32),
                Some(c) => Err(self.err(at, format!("unknown escape \\{c}"))),
                None => Err(self.err(at, "unfinished escape")),
            },
            Some(c) => Ok(c as u32),
        }
    }

    fn atom(&mut self) -> Result<Option<Expr>, GrammarError> {
        let at = self.pos;
        match self.peek() {
            Some('"') => {
                self.bump();
                let mut seq = Vec::new();
                loop {
                    if self.peek() == Some('"') {
                        self.bump();
                        break;
                    }
                    if self.peek() == Some('\n') || self.peek().is_none() {
                        return Err(self.err(at, "unterminated string literal"));
                    }
                    seq.push(Expr::Chars(CharClass::single(self.char_in("string literal")?)));
                }
                Ok(Some(Expr::Seq(seq)))
            }
            Some('[') => {
                self.bump();
                let negated = self.peek() == Some('^');
                if negated {
                    self.bump();
                }
                let mut ranges = Vec::new();
                loop {
                    match self.peek() {
                        Some(']') => {
                            self.bump();
                            break;
                        }
                        None | Some('\n') => return Err(self.err(at, "unterminated character class")),
                        _ => {}
                    }
                    let lo = self.char_in("character class")?;
                    let hi = if self.peek() == Some('-') && !self.src[self.pos + 1..].starts_with(']') {
                        self.bump();
                        self.char_in("character class")?
                    } else {
                        lo
                    };
                    if hi < lo {
                        return Err(self.err(at, "character range is backwards"));
                    }
                    ranges.push((lo, hi));
                }
                ranges.sort_unstable();
                Ok(Some(Expr::Chars(CharClass { ranges, negated })))
            }
            Some('.') => {
                self.bump();
                Ok(Some(Expr::Chars(CharClass::any())))
            }
            Some('(') => {
                if self.depth >= MAX_NESTING {
                    return Err(self.err(at, format!("groups are nested more than {MAX_NESTING} deep")));
                }
                self.bump();
                self.depth += 1;
                let e = self.alternatives(true)?;
                self.depth -= 1;
                self.skip(true);
                if self.bump() != Some(')') {
                    return Err(self.err(at, "missing ')'"));
                }
                Ok(Some(e))
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let name = self.name().unwrap_or_default();
                Ok(Some(Expr::Ref(name, at)))
            }
            _ => Ok(None),
        }
    }

    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        self.src[start..self.pos].parse().ok()
    }

    fn repeated(&mut self, nl: bool) -> Result<Option<Expr>, GrammarError> {
        let Some(mut e) = self.atom()? else { return Ok(None) };
        let mut operators = 0;
        loop {
            let at = self.pos;
            if matches!(self.peek(), Some('*' | '+' | '?' | '{')) {
                operators += 1;
                if self.depth + operators > MAX_NESTING {
                    return Err(self.err(at, format!("repetitions are nested more than {MAX_NESTING} deep")));
                }
            }
            match self.peek() {
                Some('*') => {
                    self.bump();
                    e = Expr::Repeat(Box::new(e), 0, None);
                }
                Some('+') => {
                    self.bump();
                    e = Expr::Repeat(Box::new(e), 1, None);
                }
                Some('?') => {
                    self.bump();
                    e = Expr::Repeat(Box::new(e), 0, Some(1));
                }
                Some('{') => {
                    self.bump();
                    self.skip(nl);
                    let min = self.number().ok_or_else(|| self.err(at, "expected a number after '{'"))?;
                    self.skip(nl);
                    let max = if self.peek() == Some(',') {
                        self.bump();
                        self.skip(nl);
                        self.number()
                    } else {
                        Some(min)
                    };
                    self.skip(nl);
                    if self.bump() != Some('}') {
                        return Err(self.err(at, "expected '}' to close the repetition"));
                    }
                    if max.is_some_and(|m| m < min) {
                        return Err(self.err(at, "repetition maximum is below its minimum"));
                    }
                    if max.unwrap_or(min) > 10_000 {
                        return Err(self.err(at, "repetition count is too large"));
                    }
                    e = Expr::Repeat(Box::new(e), min, max);
                }
                _ => return Ok(Some(e)),
            }
        }
    }

    fn sequence(&mut self, nl: bool) -> Result<Expr, GrammarError> {
        let mut items = Vec::new();
        loop {
            self.skip(nl);
            // A new rule starts on the next line: `name ::=`.
            if !nl && self.at_rule_start() {
                break;
            }
            match self.repeated(nl)? {
                Some(e) => items.push(e),
                None => break,
            }
        }
        Ok(Expr::Seq(items))
    }

    fn at_rule_start(&self) -> bool {
        let rest = &self.src[self.pos..];
        let name_len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_')).unwrap_or(rest.len());
        name_len > 0 && rest[name_len..].trim_start_matches([' ', '\t']).starts_with("::=")
    }

    fn alternatives(&mut self, nl: bool) -> Result<Expr, GrammarError> {
        let mut alts = vec![self.sequence(nl)?];
        loop {
            self.skip(nl);
            if self.peek() == Some('|') {
                self.bump();
                alts.push(self.sequence(nl)?);
            } else {
                break;
            }
        }
        Ok(if alts.len() == 1 { alts.pop().unwrap_or(Expr::Seq(vec![])) } else { Expr::Alt(alts) })
    }
}

/// Builds the compiled grammar from parsed rules.
struct Builder {
    rules: Vec<Vec<Vec<Elem>>>,
    names: Vec<String>,
    ids: HashMap<String, usize>,
    helpers: HashMap<String, usize>,
    /// Elements made so far: nested repetitions multiply, so the total is capped.
    size: usize,
}

/// Most elements a compiled grammar may have (after expanding repetitions).
const MAX_ELEMENTS: usize = 1_000_000;

impl Builder {
    fn id(&mut self, name: &str) -> usize {
        if let Some(&i) = self.ids.get(name) {
            return i;
        }
        let i = self.rules.len();
        self.rules.push(Vec::new());
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), i);
        i
    }

    fn helper(&mut self, key: String, alts: Vec<Vec<Elem>>) -> usize {
        if let Some(&i) = self.helpers.get(&key) {
            return i;
        }
        let i = self.rules.len();
        self.rules.push(alts);
        self.names.push(format!("_h{i}"));
        self.helpers.insert(key, i);
        i
    }

    /// Append the elements matching `e` to `out`.
    fn emit(&mut self, e: &Expr, out: &mut Vec<Elem>) {
        match e {
            Expr::Chars(c) => {
                self.size += 1;
                out.push(Elem::Chars(c.clone()));
            }
            Expr::Ref(name, _) => {
                let id = self.id(name);
                out.push(Elem::Rule(id));
            }
            Expr::Seq(items) => {
                for it in items {
                    self.emit(it, out);
                }
            }
            Expr::Alt(alts) => {
                let compiled: Vec<Vec<Elem>> = alts
                    .iter()
                    .map(|a| {
                        let mut v = Vec::new();
                        self.emit(a, &mut v);
                        v
                    })
                    .collect();
                let id = self.helper(format!("{compiled:?}"), compiled);
                out.push(Elem::Rule(id));
            }
            Expr::Repeat(inner, min, max) => {
                let mut one = Vec::new();
                self.emit(inner, &mut one);
                let copies = min + max.map_or(1, |m| m - min);
                self.size = self.size.saturating_add(one.len().saturating_mul(copies));
                if self.size > MAX_ELEMENTS {
                    return;
                }
                for _ in 0..*min {
                    out.extend(one.iter().cloned());
                }
                match max {
                    // x{m,}: then x*, as a right-recursive helper: R ::= x R | ε
                    None => {
                        let key = format!("star {one:?}");
                        let id = self.helper(key.clone(), Vec::new());
                        let mut rec = one.clone();
                        rec.push(Elem::Rule(id));
                        self.rules[id] = vec![rec, vec![]];
                        out.push(Elem::Rule(id));
                    }
                    // x{m,n}: then up to n-m optional copies, nested: R_k ::= x R_{k-1} | ε
                    Some(max) => {
                        let mut tail: Option<usize> = None;
                        for k in 0..max - min {
                            let mut alt = one.clone();
                            if let Some(t) = tail {
                                alt.push(Elem::Rule(t));
                            }
                            tail = Some(self.helper(format!("opt{k} {one:?}"), vec![alt, vec![]]));
                        }
                        if let Some(t) = tail {
                            out.push(Elem::Rule(t));
                        }
                    }
                }
            }
        }
    }
}

/// Parse GBNF text. `root` names the start rule ("root" in llama.cpp's convention).
pub fn parse(src: &str, root: &str) -> Result<Grammar, GrammarError> {
    let mut p = Parser { src, pos: 0, depth: 0 };
    let mut defs: Vec<(String, usize, Expr)> = Vec::new();
    loop {
        p.skip(true);
        if p.peek().is_none() {
            break;
        }
        let at = p.pos;
        let name = p.name().ok_or_else(|| p.err(at, "expected a rule name"))?;
        p.skip(false);
        if !p.src[p.pos..].starts_with("::=") {
            return Err(p.err(p.pos, format!("expected '::=' after rule name {name:?}")));
        }
        p.pos += 3;
        let body = p.alternatives(false)?;
        p.skip(false);
        match p.peek() {
            None | Some('\n') => {}
            Some(c) => return Err(p.err(p.pos, format!("unexpected {c:?}"))),
        }
        if defs.iter().any(|d| d.0 == name) {
            return Err(p.err(at, format!("rule {name:?} is defined twice")));
        }
        defs.push((name, at, body));
    }
    if defs.is_empty() {
        return Err(GrammarError { line: 1, column: 1, msg: "the grammar has no rules".into() });
    }
    let mut b = Builder { rules: Vec::new(), names: Vec::new(), ids: HashMap::new(), helpers: HashMap::new(), size: 0 };
    for (name, _, _) in &defs {
        b.id(name);
    }
    for (name, at, body) in &defs {
        let alts = match body {
            Expr::Alt(a) => a.clone(),
            other => vec![other.clone()],
        };
        let compiled: Vec<Vec<Elem>> = alts
            .iter()
            .map(|a| {
                let mut v = Vec::new();
                b.emit(a, &mut v);
                v
            })
            .collect();
        if b.size > MAX_ELEMENTS {
            return Err(p.err(*at, format!("the grammar is too large: its repetitions expand past {MAX_ELEMENTS} elements")));
        }
        let id = b.ids[name];
        b.rules[id] = compiled;
    }
    // References to rules that were never defined.
    for (name, at, body) in &defs {
        let mut missing = None;
        find_undefined(body, &b.ids, &defs, &mut missing);
        if let Some((m, pos)) = missing {
            let _ = (name, at);
            return Err(p.err(pos, format!("undefined rule {m:?}")));
        }
    }
    let root_id = *b.ids.get(root).ok_or_else(|| GrammarError { line: 1, column: 1, msg: format!("the grammar has no {root:?} rule") })?;
    let g = Grammar { rules: b.rules, names: b.names, root: root_id };
    if let Some(r) = left_recursive(&g) {
        let at = defs.iter().find(|d| d.0 == g.names[r]).map(|d| d.1).unwrap_or(0);
        return Err(p.err(at, format!("rule {:?} is left-recursive (it can reach itself before consuming a character)", g.names[r])));
    }
    Ok(g)
}

fn find_undefined(e: &Expr, ids: &HashMap<String, usize>, defs: &[(String, usize, Expr)], out: &mut Option<(String, usize)>) {
    if out.is_some() {
        return;
    }
    match e {
        Expr::Ref(n, pos) => {
            if !defs.iter().any(|d| &d.0 == n) && ids.contains_key(n) {
                *out = Some((n.clone(), *pos));
            }
        }
        Expr::Seq(v) | Expr::Alt(v) => v.iter().for_each(|x| find_undefined(x, ids, defs, out)),
        Expr::Repeat(x, ..) => find_undefined(x, ids, defs, out),
        Expr::Chars(_) => {}
    }
}

/// Rules that can derive the empty string.
fn nullable(g: &Grammar) -> Vec<bool> {
    // Worklist, linear in the grammar's size: each alternative counts the rule references it
    // still waits on; one with a character class never becomes empty.
    let mut null = vec![false; g.rules.len()];
    let mut waits: Vec<Vec<usize>> = Vec::with_capacity(g.rules.len());
    let mut uses: Vec<Vec<(usize, usize)>> = vec![Vec::new(); g.rules.len()];
    let mut todo = Vec::new();
    for (i, alts) in g.rules.iter().enumerate() {
        let mut w = Vec::with_capacity(alts.len());
        for (j, a) in alts.iter().enumerate() {
            if a.iter().any(|e| matches!(e, Elem::Chars(_))) {
                w.push(usize::MAX);
                continue;
            }
            w.push(a.len());
            for e in a {
                if let Elem::Rule(r) = e {
                    uses[*r].push((i, j));
                }
            }
            if a.is_empty() && !null[i] {
                null[i] = true;
                todo.push(i);
            }
        }
        waits.push(w);
    }
    while let Some(r) = todo.pop() {
        for &(i, j) in &uses[r] {
            let w = &mut waits[i][j];
            *w -= 1;
            if *w == 0 && !null[i] {
                null[i] = true;
                todo.push(i);
            }
        }
    }
    null
}

/// A rule that can reach itself without consuming input, if any.
fn left_recursive(g: &Grammar) -> Option<usize> {
    let null = nullable(g);
    // first[i]: rules reachable at the start of rule i.
    let starts: Vec<Vec<usize>> = g
        .rules
        .iter()
        .map(|alts| {
            let mut v = Vec::new();
            for a in alts {
                for e in a {
                    match e {
                        Elem::Rule(r) => {
                            v.push(*r);
                            if !null[*r] {
                                break;
                            }
                        }
                        Elem::Chars(_) => break,
                    }
                }
            }
            v
        })
        .collect();
    // A cycle in the graph of rules reachable at the start: one depth-first pass, iterative
    // (a grammar may chain thousands of rules) and linear in the size of the graph.
    let n = g.rules.len();
    let mut state = vec![0u8; n]; // 0: not visited, 1: on the current path, 2: done
    for root in 0..n {
        if state[root] != 0 {
            continue;
        }
        state[root] = 1;
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        while let Some((r, k)) = path.last_mut() {
            match starts[*r].get(*k) {
                Some(&next) => {
                    *k += 1;
                    match state[next] {
                        0 => {
                            state[next] = 1;
                            path.push((next, 0));
                        }
                        1 => return Some(next),
                        _ => {}
                    }
                }
                None => {
                    state[*r] = 2;
                    path.pop();
                }
            }
        }
    }
    None
}
