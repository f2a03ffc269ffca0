//! Prompt-injection markers: phrases that try to replace a model's instructions ("ignore all
//! previous instructions", "reveal your system prompt", "you are now DAN") and chat-template
//! control tokens smuggled into content. Matched on lower-cased words, so spacing, case and
//! punctuation do not hide them.

use crate::detect::{Finding, Kind};

/// One position of a phrase: any of these words; optional positions may be skipped.
struct Slot {
    words: &'static [&'static str],
    optional: bool,
}

const fn req(words: &'static [&'static str]) -> Slot {
    Slot { words, optional: false }
}

const fn opt(words: &'static [&'static str]) -> Slot {
    Slot { words, optional: true }
}

const OVERRIDE: &[&str] = &["ignore", "disregard", "forget", "override", "bypass", "skip", "drop"];
const EARLIER: &[&str] = &["previous", "prior", "above", "earlier", "preceding", "original", "initial", "system", "developer", "existing"];
const ORDERS: &[&str] = &["instructions", "instruction", "prompt", "prompts", "rules", "directions", "guidelines", "directives", "messages", "constraints", "context", "orders"];
const REVEAL: &[&str] = &["reveal", "print", "show", "repeat", "output", "display", "leak", "tell", "dump", "write", "give"];
const HIDDEN: &[&str] = &["system", "developer", "hidden", "initial", "secret", "original"];
const PROMPT: &[&str] = &["prompt", "instructions", "message", "instruction"];
const UNBOUND: &[&str] = &["dan", "jailbroken", "unrestricted", "unfiltered", "uncensored", "unbound", "evil"];

const PHRASES: &[&[Slot]] = &[
    // ignore (all) (of) (the/your) previous instructions
    &[req(OVERRIDE), opt(&["all", "any", "every"]), opt(&["of"]), opt(&["the", "your", "my", "these", "those", "its"]), req(EARLIER), req(ORDERS)],
    // ignore all instructions / ignore everything above
    &[req(OVERRIDE), req(&["all", "everything", "anything"]), opt(&["the", "your", "of"]), req(&["instructions", "rules", "above", "before", "guidelines"])],
    // reveal (me) (your/the) (full) system prompt
    &[req(REVEAL), opt(&["me", "us"]), opt(&["your", "the", "its"]), opt(&["full", "entire", "complete", "exact", "whole"]), req(HIDDEN), req(PROMPT)],
    // what is your system prompt / what are your instructions
    &[req(&["what"]), req(&["is", "are", "were", "was"]), req(&["your"]), opt(HIDDEN), req(&["prompt", "instructions"])],
    // you are now DAN / in developer mode
    &[req(&["you"]), req(&["are", "re"]), req(&["now"]), opt(&["a", "an", "in"]), req(UNBOUND)],
    &[req(&["you"]), req(&["are", "re"]), req(&["now"]), opt(&["in"]), req(&["developer", "god", "jailbreak", "admin"]), req(&["mode"])],
    // act as an unrestricted AI / pretend you are DAN
    &[req(&["act", "pretend", "roleplay", "behave"]), opt(&["as", "like", "that"]), opt(&["if"]), opt(&["you"]), opt(&["are", "were"]), opt(&["a", "an"]), req(UNBOUND)],
    // do anything now
    &[req(&["do"]), req(&["anything"]), req(&["now"])],
    // developer mode enabled
    &[req(&["developer", "jailbreak", "god"]), req(&["mode"]), req(&["enabled", "activated", "on", "unlocked"])],
    // new system prompt / system override
    &[req(&["new", "updated", "revised", "real"]), req(&["system"]), req(&["prompt", "instructions", "message"])],
    &[req(&["system"]), req(&["override", "overwrite"])],
    // end of system prompt
    &[req(&["end"]), req(&["of"]), opt(&["the"]), req(EARLIER), req(ORDERS)],
];

/// Control tokens of chat templates: content that contains them tries to start a turn of its own.
const CONTROL: &[&str] = &["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|endoftext|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"];

/// Lower-cased words with their byte ranges.
fn words(text: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        let part = c.is_alphanumeric();
        match (start, part) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                out.push((text[s..i].to_lowercase(), s, i));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// Words matched by `phrase` from word `at`, or None.
fn match_at(phrase: &[Slot], ws: &[(String, usize, usize)], at: usize) -> Option<usize> {
    fn go(phrase: &[Slot], ws: &[(String, usize, usize)], i: usize) -> Option<usize> {
        let Some((slot, rest)) = phrase.split_first() else { return Some(i) };
        if i < ws.len() && slot.words.contains(&ws[i].0.as_str()) {
            if let Some(end) = go(rest, ws, i + 1) {
                return Some(end);
            }
        }
        if slot.optional {
            return go(rest, ws, i);
        }
        None
    }
    go(phrase, ws, at)
}

pub(crate) fn markers(text: &str, out: &mut Vec<Finding>) {
    let ws = words(text);
    let mut next_free = 0;
    for at in 0..ws.len() {
        if at < next_free {
            continue;
        }
        if let Some(end) = PHRASES.iter().find_map(|p| match_at(p, &ws, at).filter(|&e| e > at)) {
            out.push(Finding { kind: Kind::PromptInjection, range: ws[at].1..ws[end - 1].2 });
            next_free = end;
        }
    }
    for tok in CONTROL {
        for (i, _) in text.match_indices(tok) {
            out.push(Finding { kind: Kind::PromptInjection, range: i..i + tok.len() });
        }
    }
}
