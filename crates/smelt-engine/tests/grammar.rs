//! Token masks on the real vocabularies (Gemma 3's 262k tokens, Qwen 2.5's 152k): the fast mask
//! (subtrees taken whole, a lazily built byte automaton) must equal checking every token against
//! the grammar one by one, and a random walk through allowed tokens must stay inside the
//! language. Needs both models in the store (`smelt pull`).

use smelt_engine::grammar::{Compiled, Constraint, TokenTrie};
use smelt_model::gguf::GgufFile;
use smelt_model::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::Arc;

fn tokenizer(name: &str) -> Tokenizer {
    let home = std::env::var_os("SMELT_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/smelt"));
    let p = home.join("models").join(format!("{name}.gguf"));
    assert!(p.exists(), "model {name} is not in the store ({}); run `smelt pull {name}`", p.display());
    Tokenizer::from_gguf(&GgufFile::open(&p).unwrap().header).unwrap()
}

fn grammars() -> Vec<(&'static str, Compiled)> {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": -5, "maximum": 130},
            "tags": {"type": "array", "items": {"enum": ["a\"b", "ü", "x y"]}, "maxItems": 4},
            "note": {"type": "string"},
            "ok": {"type": ["boolean", "null"]}
        },
        "required": ["name", "age"]
    });
    vec![
        ("schema", Compiled::json_schema(&schema).unwrap()),
        ("any object", Compiled::json_object()),
        ("arithmetic", Compiled::gbnf("root ::= expr\nexpr ::= term ((\"+\" | \"-\") term)*\nterm ::= [0-9]+ | \"(\" expr \")\"").unwrap()),
        ("regex", Compiled::regex(r"(\w+ ){1,3}[éü€😀]+\.").unwrap()),
        ("free text", Compiled::gbnf("root ::= [^\\x00]* \"!\"").unwrap()),
    ]
}

/// Deterministic pseudo-random numbers for the walk.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn check(model: &str) {
    let tok = tokenizer(model);
    let trie = Arc::new(TokenTrie::new(&tok));
    for (name, g) in grammars() {
        let m = g.0.clone();
        for walk in 0..3u64 {
            let mut rng = Lcg(walk * 7919 + 17);
            let mut c = Constraint::new(&g, trie.clone());
            let mut text: Vec<u8> = Vec::new();
            for step in 0..40 {
                let mask = c.mask(&tok);
                let allowed: Vec<u32> = (0..tok.n_vocab() as u32).filter(|&t| mask[t as usize / 64] >> (t % 64) & 1 == 1).collect();
                if step % 4 == 0 {
                    // Every token, checked directly against the grammar from the text so far.
                    let state = m.accept_bytes(&m.start(), &text).expect("the walk stays in the language");
                    for id in 0..tok.n_vocab() as u32 {
                        let want = if tok.is_end_of_generation(id) {
                            m.accepting(&state)
                        } else if tok.is_control(id) {
                            false
                        } else {
                            let b = tok.piece(id, false);
                            !b.is_empty() && m.accept_bytes(&state, b).is_some()
                        };
                        let got = mask[id as usize / 64] >> (id % 64) & 1 == 1;
                        assert_eq!(got, want, "{model} / {name}: token {id} {:?} after {:?}", String::from_utf8_lossy(tok.piece(id, false)), String::from_utf8_lossy(&text));
                        assert_eq!(c.allows(&tok, id), want, "{model} / {name}: allows({id})");
                    }
                }
                if allowed.is_empty() {
                    panic!("{model} / {name}: nothing allowed after {:?}", String::from_utf8_lossy(&text));
                }
                // Prefer short tokens now and then so the walk reaches deeper states.
                let id = allowed[rng.next(allowed.len())];
                if std::env::var_os("TRACE").is_some() { eprintln!("{id} {:02x?}", tok.piece(id, false)); }
                if tok.is_end_of_generation(id) {
                    assert!(m.accept_bytes(&m.start(), &text).is_some_and(|s| m.accepting(&s)));
                    break;
                }
                c.advance(&tok, id);
                text.extend_from_slice(tok.piece(id, false));
                assert!(m.accept_bytes(&m.start(), &text).is_some(), "{model} / {name}: left the language at {:?}", String::from_utf8_lossy(&text));
                if c.finished() {
                    assert!(m.accept_bytes(&m.start(), &text).is_some_and(|s| m.accepting(&s)));
                    if name == "schema" || name == "any object" {
                        serde_json::from_slice::<serde_json::Value>(&text).expect("complete output parses as JSON");
                    }
                    break;
                }
            }
        }
    }
}

#[test]
fn gemma_masks_equal_a_token_by_token_check() {
    check("gemma-3-270m");
}

#[test]
fn qwen_masks_equal_a_token_by_token_check() {
    check("qwen2.5-coder-0.5b-instruct");
}
