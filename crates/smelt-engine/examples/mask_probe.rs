// Development probe: time token masks for a JSON grammar at a few parse states.
use smelt_engine::grammar::{json_schema, Compiled, Constraint, TokenTrie};
use smelt_model::gguf::GgufFile;
use smelt_model::tokenizer::Tokenizer;
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let f = GgufFile::open(std::path::Path::new(&path)).unwrap();
    let tok = Tokenizer::from_gguf(&f.header).unwrap();
    let t = Instant::now();
    let trie = Arc::new(TokenTrie::new(&tok));
    println!("trie {:.1} ms, {} nodes", t.elapsed().as_secs_f64() * 1e3, trie.n_nodes());
    let schema: serde_json::Value = serde_json::from_str(r#"{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer","minimum":0,"maximum":150},"tags":{"type":"array","items":{"type":"string"}}},"required":["name","age"]}"#).unwrap();
    let g = Compiled::gbnf(&json_schema::to_gbnf(&schema).unwrap()).unwrap();
    for prefix in ["", "{", "{\"name\": \"", "{\"name\": \"Bob", "{\"name\": \"Bob\", \"age\": ", "{\"name\": \"Bob\", \"age\": 4", "{\"name\": \"Bob\", \"age\": 42, \"tags\": [", "{\"name\": \"Bob\", \"age\": 42, \"tags\": [\"x\"]"] {
        let mut c = Constraint::new(&g, trie.clone());
        for id in tok.encode(prefix, false, false) {
            assert!(c.allows(&tok, id), "{prefix}");
            c.advance(&tok, id);
        }
        let t = Instant::now();
        let m = c.mask(&tok);
        let n: u32 = m.iter().map(|w| w.count_ones()).sum();
        let first = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        c.forget_masks();
        c.mask(&tok);
        println!("{:>50}  {first:8.2} ms, again {:8.2} ms  {n} allowed", format!("{prefix:?}"), t.elapsed().as_secs_f64() * 1e3);
    }
}
