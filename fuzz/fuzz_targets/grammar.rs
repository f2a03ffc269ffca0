//! Arbitrary text as a GBNF grammar (then bytes through what compiled): an error, or a grammar
//! that can be prepared and followed within the server's budgets — never a panic, a stack
//! overflow or a hang. Seeds in `seeds/grammar` nest thousands deep.
#![no_main]
use libfuzzer_sys::fuzz_target;
use smelt_engine::grammar::Compiled;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (text, input) = common::split(data);
    if let Ok(g) = Compiled::gbnf(&text) {
        common::exercise(&g, input);
    }
});
