//! Running a grammar over text, code point by code point, and over tokens.
//!
//! The state is a set of parse stacks; each stack's top points at the character class to match
//! next, and an empty stack means the input so far is a complete sentence. Stacks are persistent
//! linked lists, so advancing shares everything below the top.

use super::gbnf::{CharClass, Elem, Grammar};
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Most parse stacks one state may hold. A grammar this ambiguous (`("a"?){0,5000}` has one
/// stack per way of having read nothing yet) would make every step cost as much.
pub const MAX_STACKS: usize = 4096;

/// Grammar work that went over its budget: the grammar is too complex to follow at a useful speed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TooComplex(pub String);

/// What a piece of grammar work may spend, in parse-stack frames visited (each a small
/// allocation, tens of nanoseconds), with an optional deadline and cancellation flag (checked
/// every few thousand frames). Untrusted grammars can be exponentially ambiguous; a budget
/// turns that into an error instead of a stalled engine or runaway memory.
#[derive(Clone, Debug)]
pub struct Budget {
    left: u64,
    limit: u64,
    deadline: Option<Instant>,
    cancel: Option<Arc<AtomicBool>>,
    tick: u32,
}

impl Budget {
    pub fn new(frames: u64) -> Budget {
        Budget { left: frames, limit: frames, deadline: None, cancel: None, tick: 0 }
    }

    /// No limit (trusted, built-in grammars and tests).
    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX)
    }

    pub fn with_deadline(mut self, deadline: Instant) -> Budget {
        self.deadline = Some(deadline);
        self
    }

    pub fn with_cancel(mut self, cancel: Arc<AtomicBool>) -> Budget {
        self.cancel = Some(cancel);
        self
    }

    /// Frames spent so far.
    pub fn spent(&self) -> u64 {
        self.limit - self.left
    }

    pub fn spend(&mut self, n: u64) -> Result<(), TooComplex> {
        if self.left < n {
            self.left = 0;
            return Err(TooComplex(format!("the grammar is too complex: following it needs more than {} parse steps at once", self.limit)));
        }
        self.left -= n;
        self.tick = self.tick.wrapping_add(1);
        if self.tick % 4096 == 0 {
            if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(TooComplex("cancelled".into()));
            }
            if self.deadline.is_some_and(|d| Instant::now() > d) {
                return Err(TooComplex("the grammar is too complex: preparing it took longer than its time limit".into()));
            }
        }
        Ok(())
    }
}

/// A position in a rule: alternative `alt` of rule `rule`, before element `idx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Pos {
    rule: u32,
    alt: u32,
    idx: u32,
}

struct Frame {
    pos: Pos,
    below: Stack,
    hash: u64,
}

#[derive(Clone, Default)]
struct Stack(Option<Rc<Frame>>);

impl Drop for Frame {
    // Unlink the frames below one at a time: a deep stack (a long nested output) would
    // otherwise be freed by one recursive call per frame and could overflow the thread's stack.
    fn drop(&mut self) {
        let mut next = self.below.0.take();
        while let Some(rc) = next {
            match Rc::try_unwrap(rc) {
                Ok(mut f) => next = f.below.0.take(),
                Err(_) => break,
            }
        }
    }
}

impl Stack {
    fn hash(&self) -> u64 {
        self.0.as_ref().map(|f| f.hash).unwrap_or(0x9e37_79b9_7f4a_7c15)
    }

    fn push(&self, pos: Pos) -> Stack {
        let mut h = self.hash() ^ ((pos.rule as u64) << 40 | (pos.alt as u64) << 20 | pos.idx as u64);
        h = h.wrapping_mul(0x100_0000_01b3).rotate_left(29);
        Stack(Some(Rc::new(Frame { pos, below: self.clone(), hash: h })))
    }

    fn top(&self) -> Option<(Pos, &Stack)> {
        self.0.as_ref().map(|f| (f.pos, &f.below))
    }
}

/// A grammar's parse state.
#[derive(Clone)]
pub struct State {
    stacks: Vec<Stack>,
    /// Bytes of an incomplete UTF-8 character.
    partial: Vec<u8>,
}

pub struct Matcher {
    g: Grammar,
}

impl Matcher {
    pub fn new(g: Grammar) -> Matcher {
        Matcher { g }
    }

    pub fn grammar(&self) -> &Grammar {
        &self.g
    }

    fn elem(&self, p: Pos) -> Option<&Elem> {
        self.g.rules[p.rule as usize][p.alt as usize].get(p.idx as usize)
    }

    /// Push the continuation after `p` (unless the alternative ends there).
    fn continue_after(&self, below: &Stack, p: Pos) -> Stack {
        let next = Pos { idx: p.idx + 1, ..p };
        if self.elem(next).is_some() {
            below.push(next)
        } else {
            below.clone()
        }
    }

    /// Expand rule references until every stack's top is a character class (or it is empty).
    /// Iterative: a chain of thousands of rules that each start with the next would otherwise
    /// recurse once per rule.
    fn expand(&self, stack: Stack, out: &mut Vec<Stack>, seen: &mut HashSet<u64>, budget: &mut Budget) -> Result<(), TooComplex> {
        let mut todo = vec![stack];
        while let Some(stack) = todo.pop() {
            budget.spend(1)?;
            let Some((p, below)) = stack.top() else {
                if seen.insert(stack.hash()) {
                    out.push(stack);
                }
                continue;
            };
            match self.elem(p) {
                Some(Elem::Chars(_)) => {
                    if seen.insert(stack.hash()) {
                        out.push(stack);
                        if out.len() > MAX_STACKS {
                            return Err(TooComplex(format!("the grammar is too ambiguous: a parse state would hold more than {MAX_STACKS} alternatives")));
                        }
                    }
                }
                Some(Elem::Rule(r)) => {
                    let rest = self.continue_after(below, p);
                    // In reverse, so the first alternative is expanded first.
                    for (a, alt) in self.g.rules[*r].iter().enumerate().rev() {
                        todo.push(if alt.is_empty() { rest.clone() } else { rest.push(Pos { rule: *r as u32, alt: a as u32, idx: 0 }) });
                    }
                }
                None => todo.push(below.clone()),
            }
        }
        Ok(())
    }

    /// The state before any input (with no limit on the work: trusted grammars).
    pub fn start(&self) -> State {
        self.start_within(&mut Budget::unlimited()).unwrap_or(State { stacks: Vec::new(), partial: Vec::new() })
    }

    /// The state before any input, within `budget`.
    pub fn start_within(&self, budget: &mut Budget) -> Result<State, TooComplex> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (a, alt) in self.g.rules[self.g.root].iter().enumerate() {
            let s = if alt.is_empty() { Stack::default() } else { Stack::default().push(Pos { rule: self.g.root as u32, alt: a as u32, idx: 0 }) };
            self.expand(s, &mut out, &mut seen, budget)?;
        }
        Ok(State { stacks: out, partial: Vec::new() })
    }

    /// Advance by one code point; the new stacks (empty: rejected).
    fn accept_char(&self, stacks: &[Stack], c: u32, budget: &mut Budget) -> Result<Vec<Stack>, TooComplex> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for s in stacks {
            let Some((p, below)) = s.top() else { continue };
            if let Some(Elem::Chars(cls)) = self.elem(p) {
                if cls.contains(c) {
                    let next = self.continue_after(below, p);
                    self.expand(next, &mut out, &mut seen, budget)?;
                }
            }
        }
        Ok(out)
    }

    /// Whether some stack's next class could take a character in `lo..=hi`.
    fn could_take(&self, stacks: &[Stack], lo: u32, hi: u32) -> bool {
        stacks.iter().any(|s| match s.top().and_then(|(p, _)| self.elem(p)) {
            Some(Elem::Chars(cls)) => class_intersects(cls, lo, hi),
            _ => false,
        })
    }

    /// Advance by bytes (which may end inside a UTF-8 character). None: rejected (or, for a
    /// grammar too complex to follow, over a generous budget; see [`Matcher::accept_within`]).
    pub fn accept_bytes(&self, state: &State, bytes: &[u8]) -> Option<State> {
        self.accept_within(state, bytes, &mut Budget::new(100_000_000)).ok().flatten()
    }

    /// Advance by bytes within `budget`. Ok(None): rejected.
    pub fn accept_within(&self, state: &State, bytes: &[u8], budget: &mut Budget) -> Result<Option<State>, TooComplex> {
        let mut stacks = state.stacks.clone();
        let mut partial = state.partial.clone();
        for &b in bytes {
            partial.push(b);
            match decode(&partial) {
                Utf8::Char(c) => {
                    stacks = self.accept_char(&stacks, c, budget)?;
                    partial.clear();
                    if stacks.is_empty() {
                        return Ok(None);
                    }
                }
                Utf8::Partial(lo, hi) => {
                    if !self.could_take(&stacks, lo, hi) {
                        return Ok(None);
                    }
                }
                Utf8::Invalid => return Ok(None),
            }
        }
        Ok(Some(State { stacks, partial }))
    }

    /// The input so far is a complete sentence of the grammar.
    pub fn accepting(&self, state: &State) -> bool {
        state.partial.is_empty() && state.stacks.iter().any(|s| s.0.is_none())
    }

    /// Nothing but the end can follow.
    pub fn finished(&self, state: &State) -> bool {
        state.partial.is_empty() && state.stacks.iter().all(|s| s.0.is_none())
    }

    /// Every stack's next class takes either all non-ASCII code points or none.
    fn uniform_above_ascii(&self, state: &State) -> bool {
        state.stacks.iter().all(|s| match s.top().and_then(|(p, _)| self.elem(p)) {
            Some(Elem::Chars(cls)) => class_covers(cls, 0x80, 0x10ffff) || !class_intersects(cls, 0x80, 0x10ffff),
            _ => true,
        })
    }

    /// A key identifying the state (for caching token masks).
    pub fn key(&self, state: &State) -> u64 {
        let mut hs: Vec<u64> = state.stacks.iter().map(|s| s.hash()).collect();
        hs.sort_unstable();
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for v in hs.into_iter().chain(state.partial.iter().map(|&b| b as u64 + 1)) {
            h ^= v;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }

}

/// The grammar as a byte automaton, built lazily: parse states are interned as numbers and each
/// (state, byte) transition is computed once. Walking the vocabulary's trie then costs one table
/// lookup per trie node — inside a JSON string, where nearly every token is allowed, every step
/// lands back on the same state.
pub struct Dfa {
    matcher: std::sync::Arc<Matcher>,
    states: Vec<State>,
    ids: std::collections::HashMap<u64, u32>,
    next: Vec<[u32; 256]>,
    /// Per state: byte categories that lead straight back to it (LOOPS_UNKNOWN until needed).
    loops: Vec<u8>,
    /// Parse stacks held by the interned states (for the memory estimate).
    stack_entries: usize,
    /// What the operation in progress may spend, and why it stopped if it ran out.
    budget: Budget,
    failed: Option<TooComplex>,
    /// The state before any input (kept: recomputing it may be costly).
    start: State,
}

const LOOPS_UNKNOWN: u8 = 0xff;

const UNKNOWN: u32 = u32::MAX;
const DEAD: u32 = u32::MAX - 1;
/// Forget everything past this many bytes of tables (a state costs 1 KiB of transitions plus
/// its parse stacks).
pub const MAX_DFA_BYTES: usize = 32 << 20;

impl Dfa {
    /// The automaton of a trusted grammar (no limit on the work of its start state).
    pub fn new(matcher: std::sync::Arc<Matcher>) -> Dfa {
        Dfa::within(matcher, Budget::unlimited()).unwrap_or_else(|_| unreachable!("an unlimited budget cannot run out"))
    }

    /// The automaton, its start state computed within `budget`.
    pub fn within(matcher: std::sync::Arc<Matcher>, mut budget: Budget) -> Result<Dfa, TooComplex> {
        let start = matcher.start_within(&mut budget)?;
        let mut d = Dfa { matcher, states: Vec::new(), ids: Default::default(), next: Vec::new(), loops: Vec::new(), stack_entries: 0, budget, failed: None, start: start.clone() };
        d.intern(start);
        Ok(d)
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    pub fn start(&self) -> &State {
        &self.start
    }

    /// Start an operation that may spend `budget` (forgetting an earlier failure).
    pub fn begin(&mut self, budget: Budget) {
        self.budget = budget;
        self.failed = None;
    }

    /// Why the operation in progress stopped early, if it ran out of budget: the steps it
    /// reported as rejected since may not be.
    pub fn failure(&self) -> Option<&TooComplex> {
        self.failed.as_ref()
    }

    /// Work spent by the operation in progress.
    pub fn spent(&self) -> u64 {
        self.budget.spent()
    }

    pub fn intern(&mut self, s: State) -> u32 {
        let key = self.matcher.key(&s);
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = self.states.len() as u32;
        self.stack_entries += s.stacks.len();
        self.states.push(s);
        self.next.push([UNKNOWN; 256]);
        self.loops.push(LOOPS_UNKNOWN);
        self.ids.insert(key, id);
        id
    }

    /// Estimated memory of the tables, in bytes.
    pub fn bytes(&self) -> usize {
        let per_state = std::mem::size_of::<[u32; 256]>() + std::mem::size_of::<State>() + 1 + 24;
        // A parse stack: its entry in the state, and (at most) one new frame.
        self.states.len() * per_state + self.stack_entries * (std::mem::size_of::<Stack>() + std::mem::size_of::<Frame>() + 16)
    }

    /// The tables have grown past half their budget: time to start afresh between steps, so a
    /// step always has room.
    pub fn too_big(&self) -> bool {
        self.bytes() >= MAX_DFA_BYTES / 2
    }

    /// Forget every state (numbers handed out before are void); returns the new number of `s`.
    pub fn reset_keeping(&mut self, s: State) -> u32 {
        self.states.clear();
        self.next.clear();
        self.loops.clear();
        self.ids.clear();
        self.stack_entries = 0;
        self.intern(s)
    }

    /// The parse state behind a number.
    pub fn state(&self, id: u32) -> &State {
        &self.states[id as usize]
    }

    pub fn step(&mut self, from: u32, byte: u8) -> Option<u32> {
        let t = self.next[from as usize][byte as usize];
        if t == UNKNOWN {
            if self.failed.is_some() {
                return None;
            }
            let t = match self.matcher.accept_within(&self.states[from as usize], &[byte], &mut self.budget) {
                Ok(Some(_)) if self.bytes() > MAX_DFA_BYTES => {
                    self.failed = Some(TooComplex(format!("the grammar is too complex: one step of it needs more than {} MiB of automaton", MAX_DFA_BYTES >> 20)));
                    return None;
                }
                Ok(Some(s)) => self.intern(s),
                Ok(None) => DEAD,
                Err(e) => {
                    // Not cached: the transition is unknown, not dead.
                    self.failed = Some(e);
                    return None;
                }
            };
            self.next[from as usize][byte as usize] = t;
            return (t != DEAD).then_some(t);
        }
        (t != DEAD).then_some(t)
    }

    pub fn step_bytes(&mut self, mut from: u32, bytes: &[u8]) -> Option<u32> {
        for &b in bytes {
            from = self.step(from, b)?;
        }
        Some(from)
    }

    pub fn accepting(&self, s: u32) -> bool {
        self.matcher.accepting(&self.states[s as usize])
    }

    /// The byte categories (see [`super::trie::category`]) on which state `s` returns to itself
    /// for every byte (every character, for non-ASCII).
    fn loops(&mut self, s: u32) -> u8 {
        let known = self.loops[s as usize];
        if known != LOOPS_UNKNOWN {
            return known;
        }
        use super::trie::*;
        let mut loops = 0;
        if self.states[s as usize].partial.is_empty() {
            for cat in [CAT_ALNUM, CAT_SPACE, CAT_PUNCT, CAT_QUOTE, CAT_BACKSLASH, CAT_CONTROL] {
                if (0u8..0x80).filter(|&b| category(b) == cat).all(|b| self.step(s, b) == Some(s)) {
                    loops |= cat;
                }
            }
            // Non-ASCII: when every parse stack's next class takes all of them or none, they all
            // lead to the same state, so one character decides.
            if self.matcher.uniform_above_ascii(&self.states[s as usize]) && self.step_bytes(s, "é".as_bytes()) == Some(s) {
                loops |= CAT_HIGH;
            }
        }
        self.loops[s as usize] = loops;
        loops
    }

    /// Set the bit of every token of the trie whose bytes the grammar accepts from state `s`.
    /// Subtrees whose prefix is rejected are skipped; subtrees made only of bytes that loop back
    /// to their state are taken whole.
    pub fn walk(&mut self, s: u32, trie: &super::TokenTrie, bits: &mut [u64]) {
        let set = |bits: &mut [u64], toks: &[u32]| {
            for &t in toks {
                bits[t as usize / 64] |= 1 << (t % 64);
            }
        };
        let mut todo = vec![(0u32, s)];
        while let Some((node, st)) = todo.pop() {
            for &(byte, child) in trie.children(node as usize) {
                let Some(t) = self.step(st, byte) else { continue };
                set(bits, trie.tokens(child));
                let below = trie.categories_below(child);
                if below == 0 {
                    continue;
                }
                if self.loops(t) & below == below && trie.valid_utf8_below(child) {
                    set(bits, trie.tokens_below(child));
                } else {
                    todo.push((child, t));
                }
            }
        }
    }
}

/// Whether `cls` contains every code point in lo..=hi.
fn class_covers(cls: &CharClass, lo: u32, hi: u32) -> bool {
    if cls.negated {
        return !cls.ranges.iter().any(|&(a, b)| a <= hi && lo <= b);
    }
    let mut next = lo;
    for &(a, b) in &cls.ranges {
        if a > next {
            break;
        }
        if b >= next {
            if b >= hi {
                return true;
            }
            next = b + 1;
        }
    }
    false
}

fn class_intersects(cls: &CharClass, lo: u32, hi: u32) -> bool {
    if cls.negated {
        // Not all of lo..=hi is excluded.
        let mut covered = lo;
        for &(a, b) in &cls.ranges {
            if a > covered {
                break;
            }
            if b >= covered {
                covered = b.saturating_add(1);
            }
            if covered > hi {
                return false;
            }
        }
        covered <= hi
    } else {
        cls.ranges.iter().any(|&(a, b)| a <= hi && lo <= b)
    }
}

enum Utf8 {
    Char(u32),
    /// An incomplete character that could still become any code point in lo..=hi.
    Partial(u32, u32),
    Invalid,
}

fn decode(b: &[u8]) -> Utf8 {
    let lead = b[0];
    let (len, init) = match lead {
        0x00..=0x7f => return Utf8::Char(lead as u32),
        0xc2..=0xdf => (2, (lead & 0x1f) as u32),
        0xe0..=0xef => (3, (lead & 0x0f) as u32),
        0xf0..=0xf4 => (4, (lead & 0x07) as u32),
        _ => return Utf8::Invalid,
    };
    let mut v = init;
    for &c in &b[1..] {
        if c & 0xc0 != 0x80 {
            return Utf8::Invalid;
        }
        v = (v << 6) | (c & 0x3f) as u32;
    }
    let missing = len - b.len();
    if missing == 0 {
        return match std::str::from_utf8(b) {
            Ok(s) => s.chars().next().map(|ch| Utf8::Char(ch as u32)).unwrap_or(Utf8::Invalid),
            Err(_) => Utf8::Invalid,
        };
    }
    // The code points the character can still become (no overlong forms, nothing past U+10FFFF).
    let shift = 6 * missing as u32;
    let least = [0, 0, 0x80, 0x800, 0x10000][len];
    let lo = (v << shift).max(least);
    let hi = ((v << shift) | ((1 << shift) - 1)).min(0x10ffff);
    if lo > hi || (0xd800 <= lo && hi <= 0xdfff) {
        return Utf8::Invalid;
    }
    Utf8::Partial(lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_characters_are_exactly_the_valid_utf8_prefixes() {
        let bytes = [0x41u8, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc2, 0xdf, 0xe0, 0xe1, 0xed, 0xee, 0xf0, 0xf1, 0xf4, 0xf5, 0xff];
        let check = |s: &[u8]| {
            let std_ok = match std::str::from_utf8(s) {
                Ok(t) => t.chars().count() == 1,
                Err(e) => e.valid_up_to() == 0 && e.error_len().is_none(),
            };
            let ours = !matches!(decode(s), Utf8::Invalid);
            assert_eq!(ours, std_ok, "{s:02x?}");
        };
        for &a in &bytes {
            check(&[a]);
            for &b in &bytes {
                if matches!(decode(&[a]), Utf8::Partial(..)) {
                    check(&[a, b]);
                    for &c in &bytes {
                        if matches!(decode(&[a, b]), Utf8::Partial(..)) {
                            check(&[a, b, c]);
                            for &d in &bytes {
                                if matches!(decode(&[a, b, c]), Utf8::Partial(..)) {
                                    check(&[a, b, c, d]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
