// Kernel micro-benchmark (development aid): GB/s and ns per block for each format.
use smelt_kernels::dispatch::{Isa, Kernels};
use smelt_kernels::formats::{grouped, WEIGHT_DTYPES};
use std::time::Instant;

fn main() {
    let rows: usize = std::env::var("ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(4864);
    let k = 896 * 2;
    let nc: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    for isa in [Isa::Avx2] {
        let kt = Kernels::for_isa(isa);
        // Each format, followed by its grouped layout where it has one.
        let dtypes = WEIGHT_DTYPES.iter().flat_map(|&t| std::iter::once(t).chain(grouped::grouped(t)));
        for dtype in dtypes {
            if k % dtype.block_len() != 0 { continue; }
            // DTYPES=Q5_0,Q4_K limits the run to those formats.
            if std::env::var("DTYPES").is_ok_and(|only| !only.split(',').any(|t| t.eq_ignore_ascii_case(dtype.name()))) { continue; }
            // K=n sets the row length (default 1792, or 1024 for the 256-element k-quant blocks).
            let k = std::env::var("K").ok().and_then(|s| s.parse().ok()).unwrap_or(if dtype.block_len() == 256 { 1024 } else { k });
            let wrb = dtype.row_bytes(k).unwrap();
            let mut w = vec![0u8; wrb * rows];
            for (i, b) in w.iter_mut().enumerate() { *b = (i * 2654435761usize >> 7) as u8; }
            // sane f16 scales: overwrite with small values every block start
            for blk in w.chunks_mut(dtype.block_bytes()) { if dtype.block_len() > 1 { blk[0] = 0; blk[1] = 0x20; } }
            if let Some(file) = grouped::ungrouped(dtype) {
                let blocks = w.clone();
                grouped::group_blocks(file, &blocks, &mut w);
            }
            let vt = kt.activation_type(dtype, k);
            let arb = vt.row_bytes(k).unwrap();
            let x: Vec<f32> = (0..k * nc).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let mut a = vec![0u8; arb * nc];
            for c in 0..nc { kt.quantize(vt)(&x[c * k..(c + 1) * k], &mut a[c * arb..(c + 1) * arb]); }
            let mut out = vec![0f32; rows * nc];
            let reps: usize = std::env::var("REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
            let mut prep = Vec::new();
            let grouped = kt.group_usable(dtype, k);
            if grouped { kt.group_prepare(k, &a, arb, nc, &mut prep); }
            let t = Instant::now();
            for _ in 0..reps {
                for r0 in (0..rows).step_by(16) {
                    if grouped {
                        kt.group_gemm(dtype, k, &w[r0 * wrb..], wrb, 16, nc, &prep, &mut out[..16 * nc]);
                    } else {
                        kt.gemm(dtype, k, &w[r0 * wrb..], wrb, 16, &a, arb, nc, &mut out[..16 * nc]);
                    }
                }
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            // Per 32-element block for the grouped layouts, as for the formats they come from.
            let blocks = (rows * k / grouped::ungrouped(dtype).map_or(dtype.block_len(), |t| t.block_len())) as f64;
            // The per-row dot product takes the format's own activation type, which the group
            // kernels replace; time it only where the two agree (and not for the grouped
            // layouts, whose per-row dot product is only the scalar reference).
            let dt2 = if vt == dtype.vec_dot_type() && grouped::ungrouped(dtype).is_none() {
                let t2 = Instant::now();
                let dot = kt.vec_dot(dtype);
                for _ in 0..reps {
                    for c in 0..nc { for r in 0..rows { out[r] = dot(k, &w[r * wrb..], &a[c * arb..]); } }
                }
                t2.elapsed().as_secs_f64() / reps as f64
            } else {
                f64::NAN
            };
            println!("{:5} nc={nc}: gemm {:6.2} GB/s {:6.2} ns/blk/col | vec_dot {:6.2} GB/s {:6.2} ns/blk/col", dtype.name(), (wrb * rows) as f64 / dt / 1e9, dt * 1e9 / blocks / nc as f64, (wrb * rows) as f64 / dt2 / 1e9, dt2 * 1e9 / blocks / nc as f64);
        }
    }
}
