//! Tokenization against llama.cpp's recorded output for both public models: every case must
//! match exactly, with and without BOS/special-token parsing, the first time and again (from the
//! word cache). Decoding must give the text back.

mod common;
use common::*;
use smelt_model::gguf::GgufFile;
use smelt_model::tokenizer::Tokenizer;

fn tokenizer(name: &str) -> Tokenizer {
    let f = GgufFile::open(&store_model(name)).unwrap();
    Tokenizer::from_gguf(&f.header).unwrap()
}

fn check(name: &str, file: &str, with_special: bool) -> usize {
    let tok = tokenizer(name);
    let mut failures = Vec::new();
    let cases = jsonl(file);
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        // The second time, words come from the tokenizer's word cache.
        for pass in ["", "(again) "] {
            let got = tok.encode(text, false, false);
            if got != want {
                failures.push(format!("{pass}{text:?}\n   got  {got:?}\n   want {want:?}"));
            }
        }
        if with_special {
            let got = tok.encode(text, true, true);
            let want = ids(&case["ids_with_bos_and_special"]);
            if got != want {
                failures.push(format!("(special) {text:?}\n   got  {got:?}\n   want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{name} {file}: {} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    cases.len()
}

#[test]
fn gemma_matches_llama_cpp() {
    assert_eq!(check(GEMMA, "golden/gemma-3-270m.tokenize.jsonl", true), 24);
    assert_eq!(check(GEMMA, "golden/gemma-3-270m.tokenize-extended.jsonl", false), 190);
}

#[test]
fn qwen_matches_llama_cpp() {
    assert_eq!(check(QWEN, "golden/qwen2.5-coder-0.5b-instruct.tokenize.jsonl", true), 24);
    assert_eq!(check(QWEN, "golden/qwen2.5-coder-0.5b-instruct.tokenize-extended.jsonl", false), 190);
}

#[test]
fn decoding_round_trips() {
    for name in [GEMMA, QWEN] {
        let tok = tokenizer(name);
        for file in ["tokenize", "tokenize-extended"] {
            let path = format!("golden/{}.{file}.jsonl", if name == GEMMA { "gemma-3-270m" } else { QWEN });
            for case in jsonl(&path) {
                let text = case["text"].as_str().unwrap();
                let ids = tok.encode(text, false, false);
                assert_eq!(tok.decode(&ids, false), text, "{name}: {text:?}");
            }
        }
    }
}

#[test]
fn special_tokens_and_end_of_generation() {
    let q = tokenizer(QWEN);
    let im_end = q.token_id("<|im_end|>").unwrap();
    assert!(q.is_end_of_generation(im_end));
    assert!(q.is_end_of_generation(q.eos.unwrap()));
    assert!(!q.add_bos);
    assert_eq!(q.piece(im_end, false), b"");
    assert_eq!(q.piece(im_end, true), b"<|im_end|>");
    let g = tokenizer(GEMMA);
    let eot = g.token_id("<end_of_turn>").unwrap();
    assert!(g.is_end_of_generation(eot));
    assert_eq!(g.bos, Some(2));
    assert!(g.add_bos);
    // Without parse_special, control-token text is plain text.
    assert_ne!(g.encode("<end_of_turn>", false, false), vec![eot]);
    assert_eq!(g.encode("<end_of_turn>", false, true), vec![eot]);
    // In long texts too (where specials are first ruled out by a filter of the text's 4-byte
    // windows): each special comes out as its token, and the text between as plain text.
    let filler = "plain words and <angle brackets> that are not tokens, ".repeat(12);
    for (tok, names) in [(&g, ["<start_of_turn>", "<end_of_turn>", "<pad>"]), (&q, ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])] {
        let mut text = String::new();
        let mut want = Vec::new();
        for name in names {
            text.push_str(&filler);
            text.push_str(name);
            want.extend(tok.encode(&filler, false, true));
            want.push(tok.token_id(name).unwrap());
        }
        assert!(text.len() > 1000);
        assert_eq!(tok.encode(&text, false, true), want);
    }
}
