// Decode N sequences together (development aid): tokens/s and, with SMELT_PROFILE=1, where the
// time goes. usage: batch_decode MODEL.gguf [N=8] [THREADS=2] [STEPS=64]
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(std::path::Path::new(&args[1])).unwrap();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let steps: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(64);
    let mut ws = Workspace::new(Arc::new(ThreadPool::new(threads)));
    let mut caches: Vec<_> = (0..n).map(|_| model.new_cache(512, 64)).collect();
    let prompt = 20;
    for s in 0..n {
        let batch: Vec<BatchToken> = (0..prompt).map(|p| BatchToken { token: (100 + s * 7 + p) as u32, pos: p, seq: s, logits: p == prompt - 1 }).collect();
        model.forward(&batch, &mut caches, &mut ws).unwrap();
    }
    let _ = smelt_model::arch::blocks::profile::take();
    let t = Instant::now();
    for step in 0..steps {
        let batch: Vec<BatchToken> = (0..n).map(|s| BatchToken { token: (200 + s + step) as u32, pos: prompt + step, seq: s, logits: true }).collect();
        model.forward(&batch, &mut caches, &mut ws).unwrap();
    }
    let dt = t.elapsed().as_secs_f64();
    if std::env::var_os("SMELT_PROFILE").is_some() {
        for (k, secs, bytes) in smelt_model::arch::blocks::profile::take() {
            let rate = if bytes > 0 { format!("  {:6.1} GB/s", bytes as f64 / secs / 1e9) } else { String::new() };
            println!("  {k:12} {:8.2} ms/step{rate}", secs * 1e3 / steps as f64);
        }
    }
    println!("{n} sequences: {:.1} ms/step, {:.1} tokens/s", dt * 1e3 / steps as f64, (n * steps) as f64 / dt);
}
