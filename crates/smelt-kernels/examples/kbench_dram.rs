// Decode-shaped (one activation row) products over a matrix larger than the caches, against a
// plain read of the same bytes. `K=640 THREADS=2 kbench_dram q8_0 262144` is Gemma 3's output
// projection as the model runs it.
use smelt_kernels::dispatch::kernels;
use smelt_kernels::formats::DType;
use smelt_kernels::pool::ThreadPool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

fn main() {
    let file_dtype = match std::env::args().nth(1).as_deref() { Some("q5_0") => DType::Q5_0, Some("q4_k") => DType::Q4_K, Some("q6_k") => DType::Q6_K, _ => DType::Q8_0 };
    // GROUPED=1: the matrix in the format's grouped layout, as the model loads it.
    let grouped = std::env::var("GROUPED").is_ok_and(|v| v == "1");
    let dtype = if grouped { smelt_kernels::formats::grouped::grouped(file_dtype).expect("no grouped layout") } else { file_dtype };
    let rows: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(151936);
    let k: usize = std::env::var("K").ok().and_then(|s| s.parse().ok()).unwrap_or(if dtype.block_len() == 256 { 1024 } else { 896 });
    let kt = kernels();
    let wrb = dtype.row_bytes(k).unwrap();
    // HUGE=1: the matrix in transparent huge pages (2 MiB) rather than 4 KiB pages.
    let mut w = memmap2::MmapMut::map_anon(wrb * rows).expect("allocating the matrix");
    if std::env::var("HUGE").is_ok_and(|v| v == "1") {
        w.advise(memmap2::Advice::HugePage).expect("madvise(MADV_HUGEPAGE)");
    }
    for (i, b) in w.iter_mut().enumerate() { *b = (i.wrapping_mul(2654435761) >> 9) as u8; }
    for blk in w.chunks_mut(file_dtype.block_bytes()) { blk[0] = 0; blk[1] = 0x20; }
    if grouped {
        let blocks = w.to_vec();
        smelt_kernels::formats::grouped::group_blocks(file_dtype, &blocks, &mut w);
    }
    let vt = kt.activation_type(dtype, k);
    let arb = vt.row_bytes(k).unwrap();
    let x: Vec<f32> = (0..k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let mut a = vec![0u8; arb];
    kt.quantize(vt)(&x, &mut a);
    // THREADS=N shares the rows out as the model's decode products do (chunks from one queue).
    let threads: usize = std::env::var("THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let pool = ThreadPool::new(threads);
    // CHUNKS=a,b,…: the chunk sizes (rows per task) to time.
    let chunks: Vec<usize> = std::env::var("CHUNKS").ok().map(|v| v.split(',').filter_map(|c| c.parse().ok()).collect()).unwrap_or(vec![16, 64, 256, 1024]);
    for chunk in chunks {
        let t = Instant::now();
        for _ in 0..3 {
            pool.for_chunks(rows, chunk, &|r| {
                let mut out = vec![0f32; r.len()];
                kt.gemm(dtype, k, &w[r.start * wrb..], wrb, r.len(), &a, arb, 1, &mut out);
                std::hint::black_box(&out);
            });
        }
        let dt = t.elapsed().as_secs_f64() / 3.0;
        println!("{} {} MB, {threads} threads, chunk {chunk}: {:.2} GB/s", dtype.name(), w.len() >> 20, w.len() as f64 / dt / 1e9);
    }
    // JOBS=R: the rows as a sequence of products of R rows each (a model's layers: one pool
    // job per product, rows shared out as the model does), to see what a product costs beyond
    // its bytes.
    if let Some(per) = std::env::var("JOBS").ok().and_then(|s| s.parse::<usize>().ok()) {
        let chunk = (per / (threads * 8)).clamp(16, 256) / 4 * 4;
        let t = Instant::now();
        for _ in 0..3 {
            for j0 in (0..rows).step_by(per) {
                let n = per.min(rows - j0);
                pool.for_chunks(n, chunk, &|r| {
                    let mut out = vec![0f32; r.len()];
                    kt.gemm(dtype, k, &w[(j0 + r.start) * wrb..], wrb, r.len(), &a, arb, 1, &mut out);
                    std::hint::black_box(&out);
                });
            }
        }
        let dt = t.elapsed().as_secs_f64() / 3.0;
        let jobs = rows.div_ceil(per);
        println!("{} products of {per} rows (chunks of {chunk}): {:.2} GB/s, {:.1} us per product", jobs, w.len() as f64 / dt / 1e9, dt * 1e6 / jobs as f64);
    }
    if let Ok(r) = std::fs::read_to_string("/proc/self/smaps_rollup") {
        println!("{}", r.lines().find(|l| l.starts_with("AnonHugePages")).unwrap_or("AnonHugePages: ?"));
    }
    // The same bytes read as plainly as possible (what `smelt bench` calls the bandwidth).
    for chunk in [256 * wrb, 32 << 20] {
        let t = Instant::now();
        let total = AtomicU64::new(0);
        for _ in 0..3 {
            pool.for_chunks(w.len() / 64, chunk / 64, &|r| {
                let mut acc = [0u64; 8];
                for line in w[r.start * 64..r.end * 64].chunks_exact(64) {
                    for (k, word) in line.chunks_exact(8).enumerate() {
                        acc[k] = acc[k].wrapping_add(u64::from_le_bytes(word.try_into().unwrap()));
                    }
                }
                total.fetch_add(acc.iter().fold(0, |a, &b| a.wrapping_add(b)), Ordering::Relaxed);
            });
        }
        std::hint::black_box(total.into_inner());
        println!("sum of every word, chunks of {chunk} bytes: {:.2} GB/s", w.len() as f64 * 3.0 / t.elapsed().as_secs_f64() / 1e9);
    }
}
