//! Arbitrary text as a GBNF grammar, a regular expression and a JSON Schema: each either fails
//! with an error or compiles into a grammar that can start and be fed bytes — never a panic or
//! a hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use smelt_engine::grammar::matcher::Matcher;
use smelt_engine::grammar::{json_schema, parse_gbnf, regex};

fn exercise(src: &str, input: &[u8]) {
    if let Ok(g) = parse_gbnf(src, "root") {
        let m = Matcher::new(g);
        let s = m.start();
        if let Some(s) = m.accept_bytes(&s, input) {
            let _ = m.accepting(&s);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // First line: the grammar text; the rest: input to run through it.
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (head, input) = data.split_at(split);
    let text = String::from_utf8_lossy(head);
    exercise(&text, input);
    if let Ok(src) = regex::to_gbnf(&text) {
        exercise(&src, input);
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        if let Ok(src) = json_schema::to_gbnf(&v) {
            exercise(&src, input);
        }
    }
});
