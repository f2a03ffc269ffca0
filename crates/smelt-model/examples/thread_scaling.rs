// Prompt processing with 1 and with N threads, alternating in one process (development aid).
// Separate runs on a shared VM differ by ±10% with the moment; alternating A B B A … within one
// process compares the two thread counts over the same minutes.
// usage: thread_scaling MODEL.gguf [TOKENS=512] [THREADS=2] [ROUNDS=4]
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use std::sync::Arc;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(std::path::Path::new(args.get(1).expect("model path"))).unwrap();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512);
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let rounds: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let mut spaces = [Workspace::new(Arc::new(ThreadPool::new(1))), Workspace::new(Arc::new(ThreadPool::new(threads)))];
    let mut cache = vec![model.new_cache(n, n)];
    let batch: Vec<BatchToken> = (0..n).map(|i| BatchToken { token: (i * 37 % 1000) as u32 + 100, pos: i, seq: 0, logits: i == n - 1 }).collect();
    let mut secs = [0.0f64; 2];
    // With SMELT_PROFILE=1, where each side's time goes.
    let mut kinds: [Vec<(&str, f64)>; 2] = [Vec::new(), Vec::new()];
    let _ = smelt_model::arch::blocks::profile::take();
    for i in 0..2 * rounds {
        let side = (i / 2 + i) % 2;
        cache[0].truncate(0).unwrap();
        let t = Instant::now();
        model.forward(&batch, &mut cache, &mut spaces[side]).unwrap();
        secs[side] += t.elapsed().as_secs_f64();
        for (j, (kind, s, _)) in smelt_model::arch::blocks::profile::take().into_iter().enumerate() {
            match kinds[side].get_mut(j) {
                Some(k) => k.1 += s,
                None => kinds[side].push((kind, s)),
            }
        }
    }
    let ts = secs.map(|s| (n * rounds) as f64 / s);
    if smelt_model::arch::blocks::profile::enabled() {
        for j in 0..kinds[0].len() {
            let (a, b) = (kinds[0][j].1 / rounds as f64 * 1e3, kinds[1][j].1 / rounds as f64 * 1e3);
            println!("  {:12} {a:8.1} ms {b:8.1} ms  {:.2}x", kinds[0][j].0, a / b);
        }
    }
    println!("pp{n}: 1 thread {:.1} t/s, {threads} threads {:.1} t/s: {:.2}x ({rounds} alternating rounds)", ts[0], ts[1], ts[1] / ts[0]);
}
