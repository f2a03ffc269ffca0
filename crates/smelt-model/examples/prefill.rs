// Quick timing of a prefill + a few decode steps (development aid; `smelt bench` is the real tool).
use smelt_kernels::bandwidth::ReadProbe;
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
        for (kind, secs, _) in smelt_model::arch::blocks::profile::take() {
            println!("  {kind:12} {:8.2} ms", secs * 1e3);
        }
        caches[0].truncate(n).unwrap();
    }
    // The profile below covers the decode steps only, with a plain read of memory just before
    // and after them for the products' GB/s to be set against.
    let probe = ReadProbe::new(&ws.pool);
    let bw_before = probe.pass(&ws.pool);
    let _ = smelt_model::arch::blocks::profile::take();
    let t = Instant::now();
    let steps: usize = std::env::var("STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    for i in 0..steps {
        let b = [BatchToken { token: 200, pos: n + i, seq: 0, logits: true }];
        model.forward(&b, &mut caches, &mut ws).unwrap();
    }
    let tg = t.elapsed().as_secs_f64();
    let profile = smelt_model::arch::blocks::profile::take();
    let bw = (bw_before + probe.pass(&ws.pool)) / 2.0;
    if std::env::var_os("SMELT_PROFILE").is_some() {
        println!("plain read of memory around the decode steps: {bw:.1} GB/s");
        for (k, secs, bytes) in profile {
            let rate = if bytes > 0 {
                let gbs = bytes as f64 / secs / 1e9;
                format!("  {:6.1} MB/token {gbs:6.1} GB/s ({:.0}%)", bytes as f64 / steps as f64 / 1e6, 100.0 * gbs / bw)
            } else {
                String::new()
            };
            println!("  {k:12} {:8.2} ms/token{rate}", secs * 1e3 / steps as f64);
        }
    }
    println!("pp{n}: {:.1} t/s   tg{steps}: {:.1} t/s", n as f64 / pp, steps as f64 / tg);
    // PAIRS=N: N more decode steps, each right after a plain read of as many bytes as a token's
    // weights, so that both sample the same moments of a machine whose bandwidth drifts; the
    // median and the fastest of each are compared.
    if let Some(pairs) = std::env::var("PAIRS").ok().and_then(|s| s.parse::<usize>().ok()) {
        let bytes = model.weight_bytes_per_token();
        let (mut read, mut step) = (Vec::new(), Vec::new());
        for i in 0..pairs {
            read.push(probe.pass_over(&ws.pool, bytes));
            let b = [BatchToken { token: 300, pos: n + steps + i, seq: 0, logits: true }];
            let t = Instant::now();
            model.forward(&b, &mut caches, &mut ws).unwrap();
            step.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        let stats = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            (v[v.len() / 2], v[v.len() - 1])
        };
        let ((rm, rb), (sm, sb)) = (stats(&mut read), stats(&mut step));
        println!("{pairs} decode steps, each after a plain read of {} MB: median {sm:.1} vs {rm:.1} GB/s ({:.0}%), fastest {sb:.1} vs {rb:.1} GB/s ({:.0}%)", bytes >> 20, 100.0 * sm / rm, 100.0 * sb / rb);
    }
    // HEAD=N: the output projection alone, N times back to back, against the same plain read.
    if let Some(reps) = std::env::var("HEAD").ok().and_then(|s| s.parse::<usize>().ok()) {
        let m = model.output().matrix();
        let x: Vec<f32> = (0..m.cols).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let (mut out, mut scratch) = (vec![0f32; m.rows], Vec::new());
        let before = probe.pass(&ws.pool);
        let t = Instant::now();
        for _ in 0..reps {
            smelt_kernels::ops::matmul(&ws.pool, &m, &x, 1, &mut out, &mut scratch);
        }
        let gbs = (m.data.len() * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let bw = (before + probe.pass(&ws.pool)) / 2.0;
        println!("output projection alone ({}, {} MB): {gbs:.1} GB/s, {:.0}% of a {bw:.1} GB/s plain read", m.dtype.name(), m.data.len() >> 20, 100.0 * gbs / bw);
    }
}
