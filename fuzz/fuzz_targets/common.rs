//! What every grammar fuzz target does with what compiled: start it, feed it bytes, and build
//! the vocabulary mask the server would build before generation, all within the same budgets
//! the server uses. Errors are fine; a panic, a stack overflow or a hang is a bug.
use smelt_engine::grammar::{Budget, Compiled, TokenTrie, WORK_PER_TOKEN};
use smelt_model::gguf::parse;
use smelt_model::synthetic::{tiny_model, TinySpec};
use smelt_model::tokenizer::Tokenizer;
use std::sync::OnceLock;

fn trie() -> &'static TokenTrie {
    static TRIE: OnceLock<TokenTrie> = OnceLock::new();
    TRIE.get_or_init(|| {
        let tok = Tokenizer::from_gguf(&parse(&tiny_model(&TinySpec::new("llama")).to_bytes()).expect("fixture")).expect("fixture");
        TokenTrie::new(&tok)
    })
}

/// Split fuzz input into the source text (before the first NUL) and the bytes to feed.
pub fn split(data: &[u8]) -> (String, &[u8]) {
    let at = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    (String::from_utf8_lossy(&data[..at]).into_owned(), data.get(at + 1..).unwrap_or(&[]))
}

pub fn exercise(g: &Compiled, input: &[u8]) {
    let _ = g.bytes();
    if g.prepare(trie(), Budget::new(WORK_PER_TOKEN)).is_err() {
        return;
    }
    let m = &g.0;
    let Ok(mut state) = m.start_within(&mut Budget::new(WORK_PER_TOKEN)) else { return };
    for chunk in input.chunks(4) {
        match m.accept_within(&state, chunk, &mut Budget::new(WORK_PER_TOKEN)) {
            Ok(Some(next)) => state = next,
            _ => return,
        }
    }
    let _ = m.accepting(&state);
}
