//! Arbitrary text as a regular expression (the `regex` request field and schema `pattern`s),
//! then bytes through what compiled: an error or a followable grammar, never a crash or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use smelt_engine::grammar::Compiled;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (text, input) = common::split(data);
    if let Ok(g) = Compiled::regex(&text) {
        common::exercise(&g, input);
    }
});
