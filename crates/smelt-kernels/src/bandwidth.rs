//! The machine's memory-read bandwidth, measured the plain way: every thread of a pool summing
//! a buffer far larger than the caches. `smelt bench` sets decoding's weight traffic against
//! it, and the development tools do the same.

use crate::mmap::AnonymousBuffer;
use crate::pool::ThreadPool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A 1 GiB buffer, made once, to read in passes. It is the same kind of memory as the weights
/// rewritten at load (huge pages where the system has them), so the two are read alike.
pub struct ReadProbe {
    buf: AnonymousBuffer,
}

impl ReadProbe {
    pub fn new(pool: &ThreadPool) -> ReadProbe {
        let mut buf = AnonymousBuffer::new(1 << 30).expect("1 GiB of memory for the bandwidth probe");
        pool.for_rows(buf.bytes_mut(), 1 << 19, 1, &|i, row| row.iter_mut().enumerate().for_each(|(j, v)| *v = (i ^ j) as u8));
        ReadProbe { buf }
    }

    /// GB/s of one pass over the whole buffer.
    pub fn pass(&self, pool: &ThreadPool) -> f64 {
        self.pass_over(pool, self.buf.bytes().len())
    }

    /// GB/s of one pass over the buffer's first `bytes` (at most all of it).
    pub fn pass_over(&self, pool: &ThreadPool, bytes: usize) -> f64 {
        let mem = self.buf.bytes();
        let words = mem.len() / 8;
        // SAFETY: an anonymous buffer starts on a page boundary (so 8-byte aligned) and holds
        // `words` u64s, and every bit pattern is a valid u64.
        let all = unsafe { std::slice::from_raw_parts(mem.as_ptr() as *const u64, words) };
        let buf = &all[..(bytes / 8).min(words)];
        let total = AtomicU64::new(0);
        let t = Instant::now();
        pool.for_chunks(buf.len(), (buf.len() / (pool.n_threads() * 16)).max(1), &|r| {
            // Eight independent lanes so the sum vectorizes and loads stay in flight.
            let mut acc = [0u64; 8];
            for c in buf[r].chunks_exact(8) {
                for k in 0..8 {
                    acc[k] = acc[k].wrapping_add(c[k]);
                }
            }
            total.fetch_add(acc.iter().fold(0, |a, &b| a.wrapping_add(b)), Ordering::Relaxed);
        });
        let gbs = (buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9;
        std::hint::black_box(total.load(Ordering::Relaxed));
        gbs
    }
}
