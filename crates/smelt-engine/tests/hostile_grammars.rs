//! Grammars, expressions and schemas as a hostile client would write them: nested thousands
//! deep, exponentially ambiguous, huge. Each must be refused (or followed) within bounded stack,
//! time and memory — never a stack overflow, a stall or runaway memory.
//!
//! Everything runs on a thread with a 2 MiB stack, the size of the server's HTTP workers.

use serde_json::json;
use smelt_engine::grammar::matcher::Matcher;
use smelt_engine::grammar::{Budget, Compiled, TokenTrie, gbnf, json_schema, regex};
use smelt_model::gguf::parse;
use smelt_model::synthetic::{TinySpec, tiny_model};
use smelt_model::tokenizer::Tokenizer;
use std::time::{Duration, Instant};


fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(2 << 20).spawn(f).unwrap().join().expect("no panic or overflow")
}

fn trie() -> TokenTrie {
    let tok = Tokenizer::from_gguf(&parse(&tiny_model(&TinySpec::new("llama")).to_bytes()).unwrap()).unwrap();
    TokenTrie::new(&tok)
}

/// What the server gives a request's grammar before generation (see smelt-server's structured.rs).
fn server_budget() -> Budget {
    Budget::new(smelt_engine::grammar::WORK_PER_TOKEN).with_deadline(Instant::now() + Duration::from_secs(5))
}

fn nested(open: &str, inner: &str, close: &str, n: usize) -> String {
    format!("{}{inner}{}", open.repeat(n), close.repeat(n))
}

#[test]
fn deep_nesting_is_refused_naming_the_limit() {
    on_small_stack(|| {
        let e = Compiled::gbnf(&format!("root ::= {}", nested("(", "\"a\"", ")", 4000))).unwrap_err().to_string();
        assert!(e.contains(&format!("nested more than {}", gbnf::MAX_NESTING)), "{e}");
        let e = Compiled::gbnf(&format!("root ::= \"a\"{}", "*".repeat(5000))).unwrap_err().to_string();
        assert!(e.contains("nested more than"), "{e}");
        let e = Compiled::regex(&nested("(", "a", ")", 5000)).unwrap_err();
        assert!(e.contains(&format!("nested more than {}", regex::MAX_GROUP_NESTING)), "{e}");
        let e = Compiled::regex(&nested("(?:", "a", ")", 5000)).unwrap_err();
        assert!(e.contains("nested more than"), "{e}");
        let e = Compiled::json_schema(&json!({"type": "string", "pattern": nested("(", "a", ")", 5000)})).unwrap_err();
        assert!(e.contains("nested more than"), "{e}");
        // A chain of references a0 -> a1 -> ... -> a5000, and a schema nested 5000 deep inline.
        let mut defs = serde_json::Map::new();
        for i in 0..5000 {
            defs.insert(format!("a{i}"), json!({"type": "object", "properties": {"x": {"$ref": format!("#/$defs/a{}", i + 1)}}}));
        }
        defs.insert("a5000".into(), json!({"type": "string"}));
        let e = Compiled::json_schema(&json!({"$ref": "#/$defs/a0", "$defs": defs})).unwrap_err();
        assert!(e.contains(&format!("more than {} sub-schemas deep", json_schema::MAX_DEPTH)), "{e}");
        // (Inline nesting is also bounded by the JSON parser's own depth limit of 128.)
        let mut deep = json!({"type": "string"});
        for _ in 0..120 {
            deep = json!({"type": "array", "items": deep});
        }
        let e = Compiled::json_schema(&deep).unwrap_err();
        assert!(e.contains("sub-schemas deep"), "{e}");
        // Nesting just inside the limits still works.
        let ok = Compiled::gbnf(&format!("root ::= {}", nested("(", "\"a\"", ")", gbnf::MAX_NESTING - 1))).unwrap();
        assert!(ok.0.accept_bytes(&ok.0.start(), b"a").is_some_and(|s| ok.0.accepting(&s)));
        Compiled::regex(&nested("(", "a", ")", regex::MAX_GROUP_NESTING - 1)).unwrap();
    });
}

#[test]
fn self_references_and_counts_are_bounded() {
    on_small_stack(|| {
        // A self-referencing schema is a recursive grammar, not an infinite expansion.
        let tree = json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["kids"]}}});
        let g = Compiled::json_schema(&tree).unwrap();
        assert!(g.prepare(&trie(), server_budget()).is_ok());
        for key in ["maxLength", "minItems", "maxItems", "minLength"] {
            let kind = if key.contains("Items") { "array" } else { "string" };
            let e = Compiled::json_schema(&json!({"type": kind, key: 100_000})).unwrap_err();
            assert!(e.contains(&json_schema::MAX_COUNT.to_string()), "{key}: {e}");
        }
        // A schema with too many properties to make rules for.
        let props: serde_json::Map<String, serde_json::Value> = (0..30_000).map(|i| (format!("p{i}"), json!({"type": "integer"}))).collect();
        let e = Compiled::json_schema(&json!({"type": "object", "properties": props})).unwrap_err();
        assert!(e.contains("too large") || e.contains("rules"), "{e}");
    });
}

#[test]
fn long_shallow_grammars_need_no_deep_recursion() {
    on_small_stack(|| {
        // A chain of 5000 rules, each starting with the next: expanding it is iterative.
        let mut src = String::from("root ::= r0\n");
        for i in 0..5000 {
            src.push_str(&format!("r{i} ::= r{} \"x\"\n", i + 1));
        }
        src.push_str("r5000 ::= \"y\"\n");
        let g = Compiled::gbnf(&src).unwrap();
        let m = &g.0;
        let text = format!("y{}", "x".repeat(5000));
        assert!(m.accept_bytes(&m.start(), text.as_bytes()).is_some_and(|s| m.accepting(&s)));
        // A parse stack 200,000 deep is built and dropped without recursion.
        let g = Compiled::gbnf("root ::= \"(\" root \")\" | \"x\"").unwrap();
        let m = &g.0;
        let open = "(".repeat(200_000);
        let s = m.accept_within(&m.start(), open.as_bytes(), &mut Budget::unlimited()).unwrap().expect("a prefix of the language");
        assert!(!m.accepting(&s));
        drop(s);
    });
}

#[test]
fn exponential_and_ambiguous_grammars_run_out_of_budget() {
    let trie = std::sync::Arc::new(trie());
    // Ambiguous from the start: one parse stack per way of having read nothing yet.
    for (name, g) in [("(a?){0,4970}", Compiled::regex("(a?){0,4970}").unwrap()), ("(\"a\"?){0,3000}", Compiled::gbnf("root ::= (\"a\"?){0,3000}").unwrap())] {
        let t = trie.clone();
        let e = on_small_stack(move || g.prepare(&t, server_budget())).expect_err(name);
        assert!(e.0.contains("too ambiguous") || e.0.contains("too complex"), "{name}: {}", e.0);
    }
    // x{i} ::= x{i+1} x{i+1} | "a": each further "a" multiplies the ways to continue (the
    // issue's repro stalled an engine and took 10 GB). Every step runs on a per-token budget,
    // so following it either stays cheap or fails that request with an error.
    let mut src = String::from("root ::= x0\n");
    for i in 0..30 {
        src.push_str(&format!("x{i} ::= x{} x{} | \"a\"\n", i + 1, i + 1));
    }
    src.push_str("x30 ::= \"a\"\n");
    let g = Compiled::gbnf(&src).unwrap();
    let failed = on_small_stack(move || {
        let m = &g.0;
        let mut state = m.start();
        for _ in 0..5000 {
            match m.accept_within(&state, b"a", &mut Budget::new(smelt_engine::grammar::WORK_PER_TOKEN)) {
                Ok(Some(next)) => state = next,
                Ok(None) => return Some("the grammar rejected an \"a\" it allows".to_string()),
                Err(e) => return Some(e.0),
            }
        }
        None
    });
    let e = failed.expect("following 5000 bytes of an exponential grammar runs out of budget");
    assert!(e.contains("too ambiguous") || e.contains("too complex"), "{e}");
}

#[test]
fn budgets_stop_on_cancel() {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let g = Compiled::regex("(a?){0,4970}").unwrap();
    let e = g.prepare(&trie(), Budget::new(u64::MAX).with_cancel(flag)).unwrap_err();
    assert!(e.0.contains("cancel"), "{}", e.0);
    // An ordinary grammar fits an ordinary budget easily.
    let g = Compiled::json_schema(&json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 8}}})).unwrap();
    let spent = g.prepare(&trie(), server_budget()).unwrap();
    assert!(spent < smelt_engine::grammar::WORK_PER_TOKEN / 10, "{spent}");
    let _: &Matcher = &g.0;
}

