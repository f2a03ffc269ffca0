//! A persistent thread pool for data-parallel kernels.
//!
//! Workers live as long as the pool. A job is a borrowed closure run once on every thread (the
//! caller is thread 0); `run` returns when all threads have finished it, so the closure may borrow
//! from the caller's stack. Workers spin briefly for the next job (jobs arrive back to back during a
//! forward pass) and then sleep on a condition variable so an idle pool costs nothing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// Incremented (under `lock`) to publish a job.
    epoch: AtomicUsize,
    /// Workers still running the current job.
    pending: AtomicUsize,
    /// The current job; valid while `pending > 0`. Stored as a fat pointer with its lifetime erased.
    job: Mutex<Option<JobPtr>>,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    panicked: AtomicBool,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the pointee is `Sync` and outlives every use: `run` waits for all workers before returning.
unsafe impl Send for JobPtr {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Serializes callers: one job at a time.
    run_lock: Mutex<()>,
}

/// Iterations a worker spins on the epoch before sleeping.
const SPIN_ITERS: usize = 20_000;

impl ThreadPool {
    /// A pool with `n_threads` threads in all, the calling thread included.
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            job: Mutex::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let workers = (1..n_threads)
            .map(|ith| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("smelt-worker-{ith}"))
                    .spawn(move || worker_loop(&shared, ith, n_threads))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool { shared, workers, n_threads, run_lock: Mutex::new(()) }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Run `f(ith, nth)` on every thread of the pool and wait for all of them.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        if self.n_threads == 1 {
            f(0, 1);
            return;
        }
        let _one_job = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: erasing the lifetime is sound because this function does not return until
        // `pending` reaches zero, i.e. until no worker can touch `f` any more.
        let ptr: *const Job = unsafe { std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), *const Job>(f) };
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(JobPtr(ptr));
        self.shared.pending.store(self.n_threads - 1, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.shared.wake.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| f(0, self.n_threads)));
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *self.shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::SeqCst) {
            panic!("a thread-pool worker panicked");
        }
    }

    /// Split `0..n` into chunks of `chunk` and hand them out dynamically to all threads.
    pub fn for_chunks(&self, n: usize, chunk: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        if n == 0 {
            return;
        }
        if self.n_threads == 1 || n <= chunk {
            let mut i = 0;
            while i < n {
                f(i..(i + chunk).min(n));
                i += chunk;
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(&|_, _| loop {
            let start = next.fetch_add(chunk, Ordering::Relaxed);
            if start >= n {
                break;
            }
            f(start..(start + chunk).min(n));
        });
    }
}

impl ThreadPool {
    /// Run `f(row_index, row)` over the `row_len`-sized rows of `data`, in parallel chunks of
    /// `chunk_rows` rows. Each row is visited exactly once, by one thread.
    pub fn for_rows<T: Send>(&self, data: &mut [T], row_len: usize, chunk_rows: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
        assert!(row_len > 0 && data.len() % row_len == 0, "rows must tile the slice");
        let n_rows = data.len() / row_len;
        let base = SendPtr(data.as_mut_ptr());
        self.for_chunks(n_rows, chunk_rows, &|rows| {
            let base = &base;
            for r in rows {
                // SAFETY: `for_chunks` hands each row index to exactly one thread, rows are
                // disjoint `row_len`-sized windows of `data`, and `data` outlives the job.
                let row = unsafe { std::slice::from_raw_parts_mut(base.0.add(r * row_len), row_len) };
                f(r, row);
            }
        });
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint rows of one slice to the pool's threads (see `for_rows`).
unsafe impl<T: Send> Sync for SendPtr<T> {}

fn worker_loop(shared: &Shared, ith: usize, nth: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0;
        while shared.epoch.load(Ordering::Acquire) == seen && !shared.shutdown.load(Ordering::Acquire) {
            if spins < SPIN_ITERS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                let mut g = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                while shared.epoch.load(Ordering::Acquire) == seen && !shared.shutdown.load(Ordering::Acquire) {
                    g = shared.wake.wait(g).unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = shared.epoch.load(Ordering::Acquire);
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: the caller of `run` keeps the closure alive until `pending` reaches zero,
            // which happens only after this call returns.
            let f = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| f(ith, nth))).is_err() {
                shared.panicked.store(true, Ordering::SeqCst);
            }
        }
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::SeqCst);
        }
        self.shared.wake.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_job_once() {
        let pool = ThreadPool::new(4);
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            let mask = AtomicUsize::new(0);
            pool.run(&|ith, nth| {
                assert_eq!(nth, 4);
                hits.fetch_add(1, Ordering::SeqCst);
                mask.fetch_or(1 << ith, Ordering::SeqCst);
            });
            assert_eq!(hits.load(Ordering::SeqCst), 4);
            assert_eq!(mask.load(Ordering::SeqCst), 0b1111);
        }
    }

    #[test]
    fn chunks_cover_the_range_exactly_once() {
        let pool = ThreadPool::new(3);
        let seen: Vec<AtomicUsize> = (0..1001).map(|_| AtomicUsize::new(0)).collect();
        pool.for_chunks(1001, 7, &|r| {
            for i in r {
                seen[i].fetch_add(1, Ordering::SeqCst);
            }
        });
        assert!(seen.iter().all(|c| c.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn rows_are_each_visited_once() {
        let pool = ThreadPool::new(2);
        let mut data = vec![0usize; 5 * 3];
        pool.for_rows(&mut data, 3, 1, &|r, row| row.iter_mut().for_each(|v| *v += r + 1));
        assert_eq!(data, vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]);
    }

    #[test]
    fn a_worker_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(&|ith, _| assert_ne!(ith, 1, "boom"))));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        pool.run(&|_, _| {
            hits.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }
}
