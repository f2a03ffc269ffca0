// Quick timing of a prefill + a few decode steps (development aid; `smelt bench` is the real tool).
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("model path");
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let threads: usize = std::env::args().nth(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let model = Model::load(std::path::Path::new(&path)).unwrap();
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(threads)));
    let mut caches = vec![model.new_cache(4096, 512)];
    let batch: Vec<BatchToken> = (0..n).map(|i| BatchToken { token: (i * 37 % 1000) as u32 + 100, pos: i, seq: 0, logits: i == n - 1 }).collect();
    let t = Instant::now();
    // Long prompts go in chunks of 512 tokens, as the server feeds them.
    for chunk in batch.chunks(512) {
        model.forward(chunk, &mut caches, &mut ws).unwrap();
    }
    let pp = t.elapsed().as_secs_f64();
    // TAIL=k: then time a k-token continuation (a warm prompt's uncached suffix) on its own.
    if let Some(k) = std::env::var("TAIL").ok().and_then(|s| s.parse::<usize>().ok()) {
        let _ = smelt_model::arch::blocks::profile::take();
        let tail: Vec<BatchToken> = (0..k).map(|i| BatchToken { token: (i * 53 % 1000) as u32 + 100, pos: n + i, seq: 0, logits: i == k - 1 }).collect();
        let t = Instant::now();
        model.forward(&tail, &mut caches, &mut ws).unwrap();
        println!("{k} more tokens after {n}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        for (kind, secs) in smelt_model::arch::blocks::profile::take() {
            println!("  {kind:12} {:8.2} ms", secs * 1e3);
        }
        caches[0].truncate(n).unwrap();
    }
    // The profile below covers the decode steps only.
    let _ = smelt_model::arch::blocks::profile::take();
    let t = Instant::now();
    let steps: usize = std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    for i in 0..steps {
        let b = [BatchToken { token: 200, pos: n + i, seq: 0, logits: true }];
        model.forward(&b, &mut caches, &mut ws).unwrap();
    }
    let tg = t.elapsed().as_secs_f64();
    if std::env::var_os("SMELT_PROFILE").is_some() {
        for (k, secs) in smelt_model::arch::blocks::profile::take() {
            println!("  {k:12} {:8.2} ms/token", secs * 1e3 / steps as f64);
        }
    }
    println!("pp{n}: {:.1} t/s   tg{steps}: {:.1} t/s", n as f64 / pp, steps as f64 / tg);
}
