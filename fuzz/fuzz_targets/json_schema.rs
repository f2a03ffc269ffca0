//! Arbitrary text as a JSON Schema (`response_format`, tool parameters, `json_schema`), with
//! `$ref` graphs: an error or a followable grammar, never a crash or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use smelt_engine::grammar::Compiled;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (text, input) = common::split(data);
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        if let Ok(g) = Compiled::json_schema(&v) {
            common::exercise(&g, input);
        }
    }
});
