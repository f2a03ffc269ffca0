//! Constrained decoding: grammars that every generated token must keep the output inside of.
//!
//! - [`gbnf`]: llama.cpp's grammar format (also the compile target of the others);
//! - [`json_schema`]: JSON Schema (and "any JSON") to grammar;
//! - [`regex`]: regular expressions to grammar;
//! - [`matcher`]: the parse state, advanced by bytes or walked over a token trie.
//!
//! Sampling checks the drawn token first (cheap, and almost always allowed by a model that
//! follows instructions); only when it is not allowed is the full mask computed — by walking the
//! vocabulary's byte trie from the current parse state, skipping every subtree whose prefix the
//! grammar rejects — and the token drawn again from the allowed ones. Drawing again after a
//! rejection samples exactly the masked distribution. Masks are cached by parse state.

pub mod gbnf;
pub mod json_schema;
pub mod matcher;
pub mod regex;
pub mod trie;

pub use gbnf::{parse as parse_gbnf, Grammar, GrammarError};

use crate::sampling::Sampler;
use matcher::{Dfa, Matcher, State};
pub use matcher::{Budget, TooComplex};
use std::cell::RefCell;
use std::rc::Rc;
use smelt_model::tokenizer::Tokenizer;
pub use trie::TokenTrie;
use std::collections::HashMap;
use std::sync::Arc;

/// Grammar work one token may spend (parse-stack frames; see [`Budget`]), about 60 ms on one
/// core: a cold mask over a 150k-token vocabulary takes tens of frames for a JSON schema and
/// ~50,000 for free text, so this only stops grammars too ambiguous to follow, and bounds how
/// long one sequence's mask can hold a step that every other sequence waits for.
pub const WORK_PER_TOKEN: u64 = 1_000_000;
/// Most bytes of token masks one automaton keeps.
pub const MAX_MASK_BYTES: usize = 8 << 20;
/// Most bytes of automata and masks an [`AutomatonCache`] keeps (besides those in use).
pub const MAX_CACHE_BYTES: usize = 96 << 20;

/// A grammar's byte automaton and mask cache. Sequences on one thread that follow the same
/// compiled grammar share one, so what one computed (states, transitions, masks) the next
/// reuses: a schema used by many requests is only ever cold once.
pub struct Automaton {
    dfa: Dfa,
    masks: HashMap<u32, Arc<Vec<u64>>>,
    mask_bytes: usize,
    /// Bumped whenever the tables are cleared (grown too big): older state numbers are void.
    epoch: u64,
}

pub type SharedAutomaton = Rc<RefCell<Automaton>>;

impl Automaton {
    /// The automaton of a trusted grammar.
    pub fn new(grammar: &Compiled) -> SharedAutomaton {
        Rc::new(RefCell::new(Automaton { dfa: Dfa::new(grammar.0.clone()), masks: HashMap::new(), mask_bytes: 0, epoch: 0 }))
    }

    /// The automaton, its start state computed within `budget`.
    pub fn within(grammar: &Compiled, budget: Budget) -> Result<SharedAutomaton, TooComplex> {
        let dfa = Dfa::within(grammar.0.clone(), budget)?;
        Ok(Rc::new(RefCell::new(Automaton { dfa, masks: HashMap::new(), mask_bytes: 0, epoch: 0 })))
    }

    /// Forget all states and masks (what happens by itself when the tables grow too big);
    /// the sequences following it carry on from their own parse states.
    pub fn clear(&mut self) {
        self.drop_masks();
        self.epoch += 1;
        let start = self.dfa.start().clone();
        self.dfa.reset_keeping(start);
    }

    fn drop_masks(&mut self) {
        self.masks.clear();
        self.mask_bytes = 0;
    }

    /// Estimated memory: the automaton's tables and its cached masks.
    pub fn bytes(&self) -> usize {
        self.dfa.bytes() + self.mask_bytes
    }
}

/// The automata of recently used grammars, by compiled grammar (the same one, not an equal
/// one), within [`MAX_CACHE_BYTES`] and 16 grammars.
#[derive(Default)]
pub struct AutomatonCache {
    entries: Vec<(Compiled, SharedAutomaton)>,
}

impl AutomatonCache {
    /// The shared automaton of `g` (made within a token's budget when new).
    pub fn get(&mut self, g: &Compiled) -> Result<SharedAutomaton, TooComplex> {
        if let Some(i) = self.entries.iter().position(|(c, _)| Arc::ptr_eq(&c.0, &g.0)) {
            // Most recently used last.
            let e = self.entries.remove(i);
            let a = e.1.clone();
            self.entries.push(e);
            return Ok(a);
        }
        let a = Automaton::within(g, Budget::new(WORK_PER_TOKEN))?;
        self.entries.push((g.clone(), a.clone()));
        self.trim();
        Ok(a)
    }

    /// Drop the least recently used automata past the limits.
    pub fn trim(&mut self) {
        while self.entries.len() > 16 || (self.entries.len() > 1 && self.bytes() > MAX_CACHE_BYTES) {
            self.entries.remove(0);
        }
    }

    /// Estimated memory of the cached automata and masks.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, a)| a.try_borrow().map(|a| a.bytes()).unwrap_or(0)).sum()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A compiled grammar being followed by one sequence.
pub struct Constraint {
    auto: SharedAutomaton,
    /// The current state's number in `auto`, valid while `epoch` matches its epoch.
    state: u32,
    epoch: u64,
    /// The current parse state itself (to number it again after the tables were cleared).
    parse: State,
    trie: Arc<TokenTrie>,
    /// Full masks computed, and time spent on grammar work (for statistics and the bench).
    pub masks_computed: usize,
    pub spent: std::time::Duration,
    /// Set when following the grammar went over its budget: the sequence must end in an error.
    pub error: Option<TooComplex>,
}

impl Constraint {
    /// Follow `grammar` with an automaton of its own.
    pub fn new(grammar: &Compiled, trie: Arc<TokenTrie>) -> Constraint {
        Constraint::shared(Automaton::new(grammar), trie)
    }

    /// Follow the grammar of a shared automaton, from its start.
    pub fn shared(auto: SharedAutomaton, trie: Arc<TokenTrie>) -> Constraint {
        let (parse, epoch) = {
            let a = auto.borrow();
            (a.dfa.start().clone(), a.epoch)
        };
        let state = auto.borrow_mut().dfa.intern(parse.clone());
        Constraint { auto, state, epoch, parse, trie, masks_computed: 0, spent: Default::default(), error: None }
    }

    /// The current state's number (renumbered if the shared tables were cleared meanwhile).
    fn current(&mut self, a: &mut Automaton) -> u32 {
        if a.epoch != self.epoch {
            self.state = a.dfa.intern(self.parse.clone());
            self.epoch = a.epoch;
        }
        self.state
    }

    /// Start an operation on the shared tables with a token's budget.
    fn begin(&mut self, a: &mut Automaton) -> u32 {
        a.dfa.begin(Budget::new(WORK_PER_TOKEN));
        self.current(a)
    }

    /// When the shared tables have grown too big, start them over from this sequence's parse
    /// state (the other sequences renumber theirs by the epoch).
    fn restart_if_too_big(&mut self, a: &mut Automaton) {
        if a.dfa.too_big() {
            a.drop_masks();
            a.epoch += 1;
            self.state = a.dfa.reset_keeping(self.parse.clone());
            self.epoch = a.epoch;
        }
    }

    /// Record a budget failure of the operation just done; true if there was one.
    fn failed(&mut self, a: &Automaton) -> bool {
        match a.dfa.failure() {
            Some(e) => {
                self.error.get_or_insert_with(|| e.clone());
                true
            }
            None => false,
        }
    }

    /// Whether `id` may come next.
    pub fn allows(&mut self, tok: &Tokenizer, id: u32) -> bool {
        if tok.is_end_of_generation(id) {
            return self.accepting();
        }
        if tok.is_control(id) || self.error.is_some() {
            return false;
        }
        let bytes = tok.piece(id, false);
        let auto = self.auto.clone();
        let mut a = auto.borrow_mut();
        let s = self.begin(&mut a);
        let ok = !bytes.is_empty() && a.dfa.step_bytes(s, bytes).is_some();
        self.failed(&a);
        ok
    }

    /// Bitset of the tokens that may come next (end-of-generation tokens when complete). When
    /// the grammar goes over its budget the mask is empty and `error` says why.
    pub fn mask(&mut self, tok: &Tokenizer) -> Arc<Vec<u64>> {
        let auto = self.auto.clone();
        let mut a = auto.borrow_mut();
        self.restart_if_too_big(&mut a);
        let s = self.begin(&mut a);
        if let Some(m) = a.masks.get(&s) {
            return m.clone();
        }
        if self.error.is_some() {
            return Arc::new(vec![0u64; self.trie.n_vocab.div_ceil(64)]);
        }
        self.masks_computed += 1;
        let mut bits = vec![0u64; self.trie.n_vocab.div_ceil(64)];
        a.dfa.walk(s, &self.trie, &mut bits);
        if self.failed(&a) {
            bits.iter_mut().for_each(|b| *b = 0);
            return Arc::new(bits);
        }
        if a.dfa.accepting(s) {
            for &e in tok.end_of_generation_tokens() {
                bits[e as usize / 64] |= 1 << (e % 64);
            }
        }
        let m = Arc::new(bits);
        let size = m.len() * 8;
        if a.mask_bytes + size > MAX_MASK_BYTES {
            a.drop_masks();
        }
        a.mask_bytes += size;
        a.masks.insert(s, m.clone());
        m
    }

    /// Drop cached masks (benchmarks: time the walk itself).
    pub fn forget_masks(&mut self) {
        self.auto.borrow_mut().drop_masks();
    }

    /// Move past token `id` (which must be allowed).
    pub fn advance(&mut self, tok: &Tokenizer, id: u32) {
        if tok.is_end_of_generation(id) || tok.is_control(id) || self.error.is_some() {
            return;
        }
        let t = std::time::Instant::now();
        let auto = self.auto.clone();
        let mut a = auto.borrow_mut();
        let s = self.begin(&mut a);
        if let Some(next) = a.dfa.step_bytes(s, tok.piece(id, false)) {
            self.state = next;
            self.parse = a.dfa.state(next).clone();
            self.restart_if_too_big(&mut a);
        } else if !self.failed(&a) {
            self.error = Some(TooComplex("internal error: a token the grammar allowed was rejected when taken".into()));
        }
        self.spent += t.elapsed();
    }

    /// The output is a complete sentence and nothing more may follow.
    pub fn finished(&self) -> bool {
        self.auto.borrow().dfa.matcher().finished(&self.parse)
    }

    /// The output so far is a complete sentence (more may follow).
    pub fn accepting(&self) -> bool {
        self.auto.borrow().dfa.matcher().accepting(&self.parse)
    }
}

/// Draw the next token under a constraint: the unconstrained draw if allowed, else a draw from
/// the allowed tokens. None when nothing is allowed (the grammar cannot continue).
pub fn sample_constrained(sampler: &mut Sampler, c: &mut Constraint, tok: &Tokenizer, logits: &[f32], history: &[u32]) -> Option<u32> {
    let id = sampler.sample(logits, history);
    // From here on, the cost is the grammar's.
    let t = std::time::Instant::now();
    let out = (|| {
        if c.allows(tok, id) {
            return Some(id);
        }
        let mask = c.mask(tok);
        let mut work = logits.to_vec();
        let mut any = false;
        for (i, l) in work.iter_mut().enumerate() {
            if mask[i / 64] >> (i % 64) & 1 == 0 {
                *l = f32::NEG_INFINITY;
            } else {
                any = true;
            }
        }
        if !any {
            return None;
        }
        let id = sampler.sample(&work, history);
        (mask[id as usize / 64] >> (id % 64) & 1 == 1).then_some(id)
    })();
    c.spent += t.elapsed();
    out
}

/// What a request constrains its output to, compiled once and shared.
#[derive(Clone)]
pub struct Compiled(pub Arc<Matcher>);

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammar({} rules)", self.0.grammar().rules.len())
    }
}

impl Compiled {
    pub fn new(g: Grammar) -> Compiled {
        Compiled(Arc::new(Matcher::new(g)))
    }

    /// Estimated memory of the compiled grammar, in bytes.
    pub fn bytes(&self) -> usize {
        let g = self.0.grammar();
        let elem = std::mem::size_of::<gbnf::Elem>();
        let mut n = 0;
        for alts in &g.rules {
            n += 24 + alts.len() * 24;
            for alt in alts {
                n += alt.len() * elem;
                for e in alt {
                    if let gbnf::Elem::Chars(c) = e {
                        n += c.ranges.len() * 8;
                    }
                }
            }
        }
        n + g.names.iter().map(|s| s.len() + 24).sum::<usize>()
    }

    /// Check that the grammar can be followed within `budget`: its start state and the full
    /// vocabulary mask there (what the first constrained step may need). Run before a request's
    /// generation starts, off the engine's thread, so that a grammar too complex to follow is
    /// refused up front. Returns the work spent.
    pub fn prepare(&self, trie: &TokenTrie, budget: Budget) -> Result<u64, TooComplex> {
        let mut dfa = Dfa::within(self.0.clone(), budget.clone())?;
        let spent = dfa.spent();
        let mut rest = budget;
        rest.spend(spent)?;
        dfa.begin(rest);
        let mut bits = vec![0u64; trie.n_vocab.div_ceil(64)];
        dfa.walk(0, trie, &mut bits);
        match dfa.failure() {
            Some(e) => Err(e.clone()),
            None => Ok(dfa.spent()),
        }
    }

    /// A grammar in llama.cpp's GBNF format, starting at rule `root`.
    pub fn gbnf(src: &str) -> Result<Compiled, GrammarError> {
        Ok(Compiled::new(parse_gbnf(src, "root")?))
    }

    /// The instances of a JSON Schema; the error names what is not supported or wrong.
    pub fn json_schema(schema: &serde_json::Value) -> Result<Compiled, String> {
        let src = json_schema::to_gbnf(schema).map_err(|e| e.msg)?;
        Compiled::gbnf(&src).map_err(|e| format!("the schema's grammar failed to compile ({e})"))
    }

    /// Any JSON object.
    pub fn json_object() -> Compiled {
        Compiled::gbnf(&json_schema::any_object_gbnf()).expect("the built-in JSON grammar compiles")
    }

    /// Text that the regular expression matches in full.
    pub fn regex(re: &str) -> Result<Compiled, String> {
        let src = regex::to_gbnf(re).map_err(|e| e.to_string())?;
        Compiled::gbnf(&src).map_err(|e| format!("the expression's grammar failed to compile ({e})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(src: &str, text: &str) -> bool {
        let m = Matcher::new(parse_gbnf(src, "root").unwrap());
        match m.accept_bytes(&m.start(), text.as_bytes()) {
            Some(s) => m.accepting(&s),
            None => false,
        }
    }

    #[test]
    fn grammars_accept_exactly_their_language() {
        let arith = r#"
            root ::= expr
            expr ::= term (("+" | "-") term)*
            term ::= factor (("*" | "/") factor)*
            factor ::= number | "(" expr ")"
            number ::= [0-9]+
        "#;
        for ok in ["1", "1+2*3", "(1+2)*3", "((4))/2-10"] {
            assert!(matches(arith, ok), "{ok}");
        }
        for bad in ["", "1+", "(1", "1++2", "a", "1 + 2"] {
            assert!(!matches(arith, bad), "{bad}");
        }
        let chess = r#"root ::= piece? file rank | "O-O" | "O-O-O"
            piece ::= [KQRBN]
            file ::= [a-h]
            rank ::= [1-8]"#;
        assert!(matches(chess, "Nf3") && matches(chess, "e4") && matches(chess, "O-O-O"));
        assert!(!matches(chess, "Ni9") && !matches(chess, "O-O-O-O"));
        let rep = r#"root ::= "a"{2,4} [^x]? "é" "\u00e9" "\x41""#;
        assert!(matches(rep, "aabééA") && matches(rep, "aaaaééA"));
        assert!(!matches(rep, "aééA") && !matches(rep, "aaaaaaééA") && !matches(rep, "aaxééA"));
    }

    #[test]
    fn shared_automata_survive_being_cleared() {
        use smelt_model::gguf::parse;
        use smelt_model::synthetic::{tiny_model, TinySpec};
        let tok = Tokenizer::from_gguf(&parse(&tiny_model(&TinySpec::new("llama")).to_bytes()).unwrap()).unwrap();
        let trie = Arc::new(TokenTrie::new(&tok));
        let g = Compiled::gbnf("root ::= \"(\" [a-z]{1,6} (\", \" [a-z]{1,6}){0,3} \")\"").unwrap();
        let auto = Automaton::new(&g);
        let (mut a, mut b) = (Constraint::shared(auto.clone(), trie.clone()), Constraint::shared(auto.clone(), trie.clone()));
        let mut alone = Constraint::new(&g, trie);
        let feed = |c: &mut Constraint, text: &str| {
            for id in tok.encode(text, false, false) {
                assert!(c.allows(&tok, id), "{text}");
                c.advance(&tok, id);
            }
        };
        feed(&mut a, "(ab, c");
        feed(&mut b, "(x");
        feed(&mut alone, "(ab, c");
        auto.borrow_mut().clear();
        assert_eq!(a.mask(&tok), alone.mask(&tok));
        feed(&mut a, "d)");
        feed(&mut alone, "d)");
        assert!(a.finished() && alone.finished() && !b.finished());
        feed(&mut b, ", yz)");
        assert!(b.finished());
        assert_eq!(a.mask(&tok), alone.mask(&tok));
    }

    #[test]
    fn garbage_never_panics() {
        // Random text built from GBNF's own punctuation: errors or grammars, never a panic.
        let alphabet: Vec<char> = "root ::= \"ab\\x[]^-()|*+?{},.0123456789#\n é".chars().collect();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut s = String::from("root ::= ");
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            if let Ok(g) = parse_gbnf(&s, "root") {
                let m = Matcher::new(g);
                let _ = m.accept_bytes(&m.start(), b"ab(1)");
            }
            let _ = regex::to_gbnf(&s[9..]);
        }
    }

    #[test]
    fn malformed_grammars_report_positions() {
        let e = parse_gbnf("root ::= \"abc", "root").unwrap_err();
        assert_eq!((e.line, e.column), (1, 10));
        assert!(e.to_string().contains("unterminated string"), "{e}");
        let e = parse_gbnf("root ::= foo\nbar ::= \"x\"", "root").unwrap_err();
        assert!(e.msg.contains("undefined rule \"foo\"") && e.line == 1, "{e}");
        let e = parse_gbnf("root ::= root \"x\" | \"y\"", "root").unwrap_err();
        assert!(e.msg.contains("left-recursive"), "{e}");
        let e = parse_gbnf("root ::= [a-", "root").unwrap_err();
        assert!(e.msg.contains("character class"), "{e}");
        let e = parse_gbnf("root = \"x\"", "root").unwrap_err();
        assert!(e.msg.contains("::="), "{e}");
        let e = parse_gbnf("main ::= \"x\"", "root").unwrap_err();
        assert!(e.msg.contains("no \"root\" rule"), "{e}");
        let e = parse_gbnf("root ::= ((\"ab\"{1000}){1000}){1000}", "root").unwrap_err();
        assert!(e.msg.contains("too large"), "{e}");
        let e = parse_gbnf("root ::= \"x\"{3,1}", "root").unwrap_err();
        assert!(e.msg.contains("below its minimum"), "{e}");
    }
}
