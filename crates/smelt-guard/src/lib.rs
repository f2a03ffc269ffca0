//! smelt-guard: moderation and guardrails.
//!
//! [`scan`] finds personal data (emails, phone numbers, payment cards checked with Luhn, IBANs
//! checked modulo 97, US social security and UK national insurance numbers), secrets (API keys
//! of known services, JSON web tokens, private keys, `password = …` assignments) and
//! prompt-injection markers, as byte ranges. A [`Policy`] says what to do with each kind on the
//! way in (a request's messages) and out (the model's answer): block or redact. Streams are
//! redacted by a [`StreamGuard`], which holds back only the tail of the text that could still
//! turn out to be part of a match.

pub mod detect;
mod injection;

pub use detect::{scan, Finding, Group, Kind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Block,
    Redact,
}

/// What to do with each kind of finding, in one direction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    actions: Vec<(Kind, Action)>,
}

impl Rules {
    pub fn action(&self, kind: Kind) -> Option<Action> {
        self.actions.iter().find(|(k, _)| *k == kind).map(|&(_, a)| a)
    }

    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    fn set(&mut self, kind: Kind, action: Action) {
        self.actions.retain(|(k, _)| *k != kind);
        self.actions.push((kind, action));
    }

    /// The findings in `text` these rules act on.
    pub fn findings(&self, text: &str) -> Vec<(Finding, Action)> {
        if self.is_empty() {
            return Vec::new();
        }
        scan(text).into_iter().filter_map(|f| self.action(f.kind).map(|a| (f, a))).collect()
    }
}

/// Guardrails for requests (`input`) and answers (`output`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    pub input: Rules,
    pub output: Rules,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.input.is_empty() && self.output.is_empty()
    }
}

/// The kinds a rule's target names: `all` (or `moderation`), a group (`pii`, `secrets`,
/// `injection`), or one kind (`email`, `api_key`, ...).
fn kinds_named(target: &str) -> Option<Vec<Kind>> {
    let all = Kind::ALL.to_vec();
    Some(match target {
        "all" | "moderation" => all,
        "pii" => all.into_iter().filter(|k| k.group() == Group::Pii).collect(),
        "secrets" => all.into_iter().filter(|k| k.group() == Group::Secrets).collect(),
        "injection" | "prompt_injection" => vec![Kind::PromptInjection],
        name => vec![*Kind::ALL.iter().find(|k| k.name() == name)?],
    })
}

/// Parse `--guard` rules: `DIRECTION:TARGET=ACTION`, comma-separated, e.g.
/// `input:injection=block,input:secrets=block,output:pii=redact`. Later rules win.
pub fn parse_policy(spec: &str) -> Result<Policy, String> {
    let mut p = Policy::default();
    for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        let bad = |why: &str| format!("guard rule {rule:?}: {why} (expected DIRECTION:TARGET=ACTION, e.g. input:pii=block or output:secrets=redact)");
        let (direction, rest) = rule.split_once(':').ok_or_else(|| bad("no direction"))?;
        let (target, action) = rest.split_once('=').ok_or_else(|| bad("no action"))?;
        let action = match action {
            "block" => Action::Block,
            "redact" => Action::Redact,
            _ => return Err(bad("the action must be block or redact")),
        };
        let kinds = kinds_named(target).ok_or_else(|| {
            let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            bad(&format!("unknown target {target:?}; use all, pii, secrets, injection or one of {}", names.join(", ")))
        })?;
        let rules = match direction {
            "input" => &mut p.input,
            "output" => &mut p.output,
            _ => return Err(bad("the direction must be input or output")),
        };
        for k in kinds {
            // Injection markers in the model's own answer are not an attack on it.
            if direction == "output" && k == Kind::PromptInjection {
                if target == "injection" || target == "prompt_injection" {
                    return Err(bad("prompt-injection rules apply to input only"));
                }
                continue;
            }
            rules.set(k, action);
        }
    }
    Ok(p)
}

/// What replaces a redacted span: `[EMAIL]`, `[API_KEY]`.
pub fn redaction(kind: Kind) -> String {
    format!("[{}]", kind.name().to_ascii_uppercase())
}

/// A text after the rules: redacted, or blocked (with the first kind that blocked it).
#[derive(Clone, Debug, PartialEq)]
pub enum Checked {
    Passed(String),
    Blocked(Kind),
}

/// Apply `rules` to a whole text.
pub fn check(rules: &Rules, text: &str) -> Checked {
    let found = rules.findings(text);
    if let Some((f, _)) = found.iter().find(|(_, a)| *a == Action::Block) {
        return Checked::Blocked(f.kind);
    }
    Checked::Passed(redact_spans(text, found.iter().map(|(f, _)| f)))
}

fn redact_spans<'a>(text: &str, spans: impl Iterator<Item = &'a Finding>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    for f in spans {
        if f.range.start < pos {
            continue; // overlapping injection markers are not redacted twice
        }
        out.push_str(&text[pos..f.range.start]);
        out.push_str(&redaction(f.kind));
        pos = f.range.end;
    }
    out.push_str(&text[pos..]);
    out
}

/// Text released by a [`StreamGuard`]; after a block, nothing more is released.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Released {
    pub text: String,
    pub blocked: Option<Kind>,
}

/// Redacts (or blocks) a stream of text pieces as they come, holding back only what could still
/// be the start of a match.
pub struct StreamGuard {
    rules: Rules,
    buf: String,
    /// Bytes of `buf` already released (or dropped).
    decided: usize,
    blocked: Option<Kind>,
}

impl StreamGuard {
    pub fn new(rules: Rules) -> StreamGuard {
        StreamGuard { rules, buf: String::new(), decided: 0, blocked: None }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn push(&mut self, piece: &str) -> Released {
        self.buf.push_str(piece);
        self.release(false)
    }

    /// The stream ended: release the rest.
    pub fn finish(&mut self) -> Released {
        self.release(true)
    }

    fn release(&mut self, at_end: bool) -> Released {
        if self.blocked.is_some() {
            return Released::default();
        }
        let from = self.decided;
        let n = self.buf.len();
        let mut hold = if at_end { n } else { pending_start(&self.buf, from) };
        // Text before `from`, so that word boundaries and a held secret's name (`password = `)
        // are seen as they were.
        let mut ctx = from.saturating_sub(128);
        while !self.buf.is_char_boundary(ctx) {
            ctx -= 1;
        }
        let mut found: Vec<(Finding, Action)> = self.rules.findings(&self.buf[ctx..]);
        for (f, _) in found.iter_mut() {
            f.range = f.range.start + ctx..f.range.end + ctx;
        }
        found.retain(|(f, _)| f.range.start >= from);
        for (f, _) in &found {
            // A match that reaches into the held tail waits for it.
            if f.range.start < hold && f.range.end > hold {
                hold = f.range.start;
            }
        }
        let mut out = String::new();
        let mut pos = from;
        for (f, action) in found.iter().filter(|(f, _)| f.range.end <= hold) {
            if f.range.start < pos {
                continue;
            }
            out.push_str(&self.buf[pos..f.range.start]);
            if *action == Action::Block {
                self.blocked = Some(f.kind);
                self.decided = n;
                return Released { text: out, blocked: self.blocked };
            }
            out.push_str(&redaction(f.kind));
            pos = f.range.end;
        }
        out.push_str(&self.buf[pos..hold]);
        self.decided = hold;
        // Keep the buffer short: only context before what is still undecided.
        if self.decided > 4096 {
            let mut cut = self.decided - 64;
            while !self.buf.is_char_boundary(cut) {
                cut -= 1;
            }
            self.buf.drain(..cut);
            self.decided -= cut;
        }
        Released { text: out, blocked: None }
    }
}

/// The earliest byte at or after `from` where a match might be in progress at the end of `t`.
fn pending_start(t: &str, from: usize) -> usize {
    let b = t.as_bytes();
    let n = b.len();
    let mut hold = n;
    // The last word (an email, key or token being written).
    // (At most its last 1 KiB: matches inside a longer run — minified JSON — are whole and
    // found by the scan; nothing this long is a single value.)
    let mut s = n;
    let floor = from.max(n.saturating_sub(1024));
    while s > floor && !b[s - 1].is_ascii_whitespace() {
        s -= 1;
    }
    while !t.is_char_boundary(s) {
        s += 1;
    }
    hold = hold.min(s);
    // Groups of digits or short capitals joined by separators: cards, phone numbers, IBANs and
    // national ids printed in groups ("4111 1111 ", "+44 (20) ", "DE89 3704 ").
    let sep = |c: u8| matches!(c, b' ' | b'-' | b'.' | b'(' | b')' | b'+');
    let mut k = n;
    let mut seps = 0;
    while k > from && sep(b[k - 1]) && seps < 2 {
        k -= 1;
        seps += 1;
    }
    let mut chain_start = None;
    let mut has_digit = false;
    // The group at the end: one or two capitals may begin an IBAN or a national id.
    let mut last_group: Option<(usize, usize)> = None;
    while k > from && b[k - 1].is_ascii_alphanumeric() {
        let mut g = k;
        while g > from && b[g - 1].is_ascii_alphanumeric() {
            g -= 1;
        }
        let group = &b[g..k];
        let digits = group.iter().all(u8::is_ascii_digit);
        let caps = group.len() <= 4 && group.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if !(digits || caps) {
            break;
        }
        has_digit |= group.iter().any(u8::is_ascii_digit);
        last_group.get_or_insert((g, k - g));
        chain_start = Some(g);
        k = g;
        let mut seps = 0;
        while k > from && sep(b[k - 1]) && seps < 2 {
            k -= 1;
            seps += 1;
        }
        // A leading '+' or '(' belongs to the number.
        if let Some(p) = b[k..g].iter().position(|&c| c == b'+' || c == b'(') {
            chain_start = Some(k + p);
        }
    }
    if let (Some(c), true) = (chain_start, has_digit) {
        hold = hold.min(c);
    } else if let Some((g, _)) = last_group.filter(|&(g, len)| len <= 2 && b[g..g + len].iter().all(u8::is_ascii_uppercase)) {
        // Without digits yet, only a last group of one or two capitals can still become one
        // (`DE` of an IBAN, `AB` of a national insurance number).
        hold = hold.min(g);
    }
    // A private key block not closed yet.
    if let Some(i) = t[from..].rfind("-----BEGIN") {
        let block = &t[from + i..];
        let closed = block.find("-----END ").is_some_and(|j| block[j + 9..].contains("-----"));
        if !closed {
            hold = hold.min(from + i);
        }
    }
    // `password = ` with its value not (fully) written yet.
    let lower = t[from..].to_ascii_lowercase();
    let mut tail_from = lower.len().saturating_sub(80);
    while !lower.is_char_boundary(tail_from) {
        tail_from -= 1;
    }
    for name in detect::SECRET_NAMES {
        if let Some(i) = lower.get(tail_from..).and_then(|tail| tail.rfind(name)).map(|i| i + tail_from) {
            let rest = &lower[i + name.len()..];
            let assignment = rest.trim_start_matches(['"', '\'', ' ']).starts_with(['=', ':']) || rest.trim().is_empty();
            if assignment && !rest.contains('\n') {
                hold = hold.min(from + i);
            }
        }
    }
    let mut hold = hold.max(from);
    while !t.is_char_boundary(hold) {
        hold -= 1;
    }
    hold
}
