// Decode-shaped (one activation row) products over a matrix larger than the caches.
use smelt_kernels::dispatch::kernels;
use smelt_kernels::formats::DType;
use std::time::Instant;

fn main() {
    let dtype = match std::env::args().nth(1).as_deref() { Some("q5_0") => DType::Q5_0, Some("q4_k") => DType::Q4_K, _ => DType::Q8_0 };
    let rows: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(151936);
    let k: usize = std::env::var("K").ok().and_then(|s| s.parse().ok()).unwrap_or(if dtype.block_len() == 256 { 1024 } else { 896 });
    let kt = kernels();
    let wrb = dtype.row_bytes(k).unwrap();
    let mut w = vec![0u8; wrb * rows];
    for (i, b) in w.iter_mut().enumerate() { *b = (i.wrapping_mul(2654435761) >> 9) as u8; }
    for blk in w.chunks_mut(dtype.block_bytes()) { blk[0] = 0; blk[1] = 0x20; }
    let vt = kt.activation_type(dtype, k);
    let arb = vt.row_bytes(k).unwrap();
    let x: Vec<f32> = (0..k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
    let mut a = vec![0u8; arb];
    kt.quantize(vt)(&x, &mut a);
    let mut out = vec![0f32; rows];
    for chunk in [16usize, 64, 256, 1024] {
        let t = Instant::now();
        for _ in 0..3 {
            for r0 in (0..rows).step_by(chunk) {
                let nr = chunk.min(rows - r0);
                kt.gemm(dtype, k, &w[r0 * wrb..], wrb, nr, &a, arb, 1, &mut out[r0..r0 + nr]);
            }
        }
        let dt = t.elapsed().as_secs_f64() / 3.0;
        println!("{} {} MB, chunk {chunk}: {:.2} GB/s", dtype.name(), w.len() >> 20, w.len() as f64 / dt / 1e9);
    }
    let t = Instant::now();
    let mut s = 0u64;
    for _ in 0..3 { for c in w.chunks_exact(64) { s = s.wrapping_add(u64::from_le_bytes(c[..8].try_into().unwrap())); } }
    println!("touch one u64 per line: {:.2} GB/s ({s})", w.len() as f64 * 3.0 / t.elapsed().as_secs_f64() / 1e9);
}
