// Time tokenizing a text: the first time (nothing cached), then again with warm caches and right
// after a pass over a buffer larger than the caches (as in the server, where every forward pass
// streams the weights between requests).
use smelt_model::arch::Model;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("model path");
    let file = std::env::args().nth(2).expect("text file");
    let bytes: usize = std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let text = std::fs::read_to_string(file).expect("reading the text");
    let text: String = text.chars().scan(0, |n, c| { *n += c.len_utf8(); (*n <= bytes).then_some(c) }).collect();
    let model = Model::load(std::path::Path::new(&path)).expect("loading the model");
    let tok = &model.tokenizer;
    let t = Instant::now();
    std::hint::black_box(tok.encode_prompt(&text));
    let first = t.elapsed().as_secs_f64();
    let evict = vec![1u64; 64 << 20];
    let (mut warm, mut cold) = (f64::MAX, f64::MAX);
    let mut n = 0;
    for _ in 0..10 {
        let t = Instant::now();
        n = tok.encode_prompt(&text).len();
        warm = warm.min(t.elapsed().as_secs_f64());
        std::hint::black_box(evict.iter().fold(0u64, |a, &b| a.wrapping_add(b)));
        let t = Instant::now();
        std::hint::black_box(tok.encode_prompt(&text));
        cold = cold.min(t.elapsed().as_secs_f64());
    }
    // LOOP=k: then tokenize k more times with warm caches (for a profiler).
    for _ in 0..std::env::var("LOOP").ok().and_then(|s| s.parse().ok()).unwrap_or(0usize) {
        std::hint::black_box(tok.encode_prompt(&text));
    }
    println!("{} bytes -> {n} tokens: first time {:.2} ms; again: warm {:.2} ms, after evicting the caches {:.2} ms (best of 10)", text.len(), first * 1e3, warm * 1e3, cold * 1e3);
}
