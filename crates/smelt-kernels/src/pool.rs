//! A persistent thread pool for data-parallel kernels.
//!
//! A job is a range of work items handed out in chunks from an atomic counter, or split into one
//! contiguous part per thread that idle threads steal from; the calling thread takes part, and
//! workers join in as they notice the job. The caller never waits for a worker
//! that has not started — it closes the job once every chunk is taken and waits only for chunks
//! in progress — so a descheduled or sleeping worker cannot stall the caller (which matters when
//! the machine is busy). Workers spin briefly for the next job, then sleep on a condition variable.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type ChunkFn = dyn Fn(Range<usize>) + Sync;

/// How a job's range is handed out.
#[derive(Clone, Copy)]
enum Split {
    /// Chunks of this many items from a shared counter.
    Chunks(usize),
    /// The pool's `parts`, each taken in pieces of a quarter of what is left of it, at least
    /// this many items: from the front by its own thread, from the back by any other.
    Parts(usize),
}

/// One job: `f` over `0..n`.
struct Job {
    f: *const ChunkFn,
    n: usize,
    split: Split,
    next: AtomicUsize,
    /// The pool's per-thread parts (used by `Split::Parts`).
    parts: *const [AtomicU64],
}

/// A part's remaining range, packed as start << 32 | end.
fn unpack(v: u64) -> (usize, usize) {
    ((v >> 32) as usize, (v & 0xffff_ffff) as usize)
}

fn pack(lo: usize, hi: usize) -> u64 {
    ((lo as u64) << 32) | hi as u64
}

impl Job {
    /// The next range for thread `me` to run, or None when everything is taken.
    fn take(&self, me: usize) -> Option<Range<usize>> {
        match self.split {
            Split::Chunks(chunk) => {
                let start = self.next.fetch_add(chunk, Ordering::Relaxed);
                (start < self.n).then(|| start..(start + chunk).min(self.n))
            }
            Split::Parts(min) => {
                // SAFETY: `parts` points into the pool, which outlives every job it runs.
                let parts = unsafe { &*self.parts };
                // Own part first, then the others'.
                for i in 0..parts.len() {
                    let part = &parts[(me + i) % parts.len()];
                    let mut cur = part.load(Ordering::Relaxed);
                    loop {
                        let (lo, hi) = unpack(cur);
                        if lo >= hi {
                            break;
                        }
                        let size = ((hi - lo) / 4).max(min).min(hi - lo);
                        let (next, range) = if i == 0 { (pack(lo + size, hi), lo..lo + size) } else { (pack(lo, hi - size), hi - size..hi) };
                        match part.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                            Ok(_) => return Some(range),
                            Err(now) => cur = now,
                        }
                    }
                }
                None
            }
        }
    }

    /// Take and run ranges until none are left; `me` is the thread's index in the pool.
    fn work(&self, panicked: &AtomicBool, me: usize) {
        while let Some(range) = self.take(me) {
            // SAFETY: `f` points to the closure passed to `for_chunks` or `for_parts`, which do
            // not return (and so keep the closure alive) until no thread can be running a range.
            let f = unsafe { &*self.f };
            if catch_unwind(AssertUnwindSafe(|| f(range))).is_err() {
                panicked.store(true, Ordering::SeqCst);
            }
        }
    }
}

struct Shared {
    /// epoch * 2 + 1 while job `epoch` is open, epoch * 2 once it is closed.
    state: AtomicUsize,
    /// Workers inside the current job.
    active: AtomicUsize,
    job: AtomicPtrJob,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    shutdown: AtomicBool,
    panicked: AtomicBool,
}

/// The current job, published before `state` opens it.
struct AtomicPtrJob(std::sync::atomic::AtomicPtr<Job>);

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// One job at a time.
    run_lock: Mutex<()>,
    epoch: AtomicUsize,
    /// One remaining range per thread for `for_parts` (reset by each such job).
    parts: Box<[AtomicU64]>,
}

/// Iterations a worker spins waiting for a job before it sleeps.
const SPIN_ITERS: usize = 50_000;

impl ThreadPool {
    /// A pool with `n_threads` threads in all, the calling thread included.
    pub fn new(n_threads: usize) -> ThreadPool {
        ThreadPool::build(n_threads, false)
    }

    /// A pool whose worker threads run at the lowest CPU priority (background work such as
    /// training beside a server gets the cores the serving threads leave idle). The calling
    /// thread keeps its own priority.
    pub fn new_background(n_threads: usize) -> ThreadPool {
        ThreadPool::build(n_threads, true)
    }

    fn build(n_threads: usize, background: bool) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            state: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            job: AtomicPtrJob(std::sync::atomic::AtomicPtr::new(std::ptr::null_mut())),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let workers = (1..n_threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("smelt-worker-{i}"))
                    .spawn(move || {
                        if background {
                            lower_this_thread_priority();
                        }
                        worker_loop(&shared, i)
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        let parts = (0..n_threads).map(|_| AtomicU64::new(0)).collect();
        ThreadPool { shared, workers, n_threads, run_lock: Mutex::new(()), epoch: AtomicUsize::new(0), parts }
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Run `f` over `0..n` split into chunks of `chunk` items, in parallel. Each index is in
    /// exactly one chunk; returns when all chunks are done.
    pub fn for_chunks(&self, n: usize, chunk: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let chunk = chunk.max(1);
        if self.n_threads == 1 || n <= chunk {
            let mut i = 0;
            while i < n {
                f(i..(i + chunk).min(n));
                i += chunk;
            }
            return;
        }
        let _one = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.run_job(n, Split::Chunks(chunk), f);
    }

    /// Run `f` over `0..n` in parallel, each thread walking its own contiguous part (an equal
    /// share) from the front in pieces; a thread done with its part takes pieces from the back
    /// of the others'. Pieces are a quarter of what is left of a part, at least `min` items.
    /// Each thread streams one long range, and the threads still finish within a short piece of
    /// each other (equal chunks from a counter leave one idle for up to a chunk at the end).
    pub fn for_parts(&self, n: usize, min: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        assert!(n < 1 << 32, "for_parts takes fewer than 2^32 items");
        if self.n_threads == 1 || n <= min.max(1) {
            if n > 0 {
                f(0..n);
            }
            return;
        }
        let _one = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let np = self.parts.len();
        for (t, part) in self.parts.iter().enumerate() {
            part.store(pack(n * t / np, n * (t + 1) / np), Ordering::Relaxed);
        }
        self.run_job(n, Split::Parts(min.max(1)), f);
    }

    /// Publish a job, take part in it, and return once it is closed and no worker is inside.
    /// The caller holds `run_lock`.
    fn run_job(&self, n: usize, split: Split, f: &(dyn Fn(Range<usize>) + Sync)) {
        // SAFETY: erasing the closure's lifetime is sound because this function returns only
        // after the job is closed and no worker is inside it (see `Job::work`).
        let fptr: *const ChunkFn = unsafe { std::mem::transmute::<*const (dyn Fn(Range<usize>) + Sync + '_), *const ChunkFn>(f) };
        let job = Job { f: fptr, n, split, next: AtomicUsize::new(0), parts: &*self.parts };
        let s = &self.shared;
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        s.job.0.store(&job as *const Job as *mut Job, Ordering::SeqCst);
        s.state.store(epoch * 2 + 1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work(&s.panicked, 0);
        s.state.store(epoch * 2, Ordering::SeqCst);
        while s.active.load(Ordering::SeqCst) != 0 {
            std::hint::spin_loop();
        }
        s.job.0.store(std::ptr::null_mut(), Ordering::SeqCst);
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a thread-pool task panicked");
        }
    }

    /// Run `f(i, n)` once for every i in 0..n, in parallel (i is a task index, not a thread).
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.n_threads;
        self.for_chunks(n, 1, &|r| {
            for i in r {
                f(i, n)
            }
        });
    }

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

    /// [`ThreadPool::for_rows`], with the rows split as [`ThreadPool::for_parts`] splits items:
    /// each thread walks a contiguous run of rows (pieces of at least `min_rows`), so work
    /// whose rows read consecutive memory streams it.
    pub fn for_row_parts<T: Send>(&self, data: &mut [T], row_len: usize, min_rows: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
        assert!(row_len > 0 && data.len() % row_len == 0, "rows must tile the slice");
        let n_rows = data.len() / row_len;
        let base = SendPtr(data.as_mut_ptr());
        self.for_parts(n_rows, min_rows, &|rows| {
            let base = &base;
            for r in rows {
                // SAFETY: `for_parts` hands each row index to exactly one thread, rows are
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

/// The loop of worker `me` (1..n_threads; the calling thread is 0).
/// Give the calling thread the lowest scheduling priority (nice 19).
pub fn lower_this_thread_priority() {
    set_this_thread_nice(19);
}

/// Set the calling thread's nice value (higher runs later); nothing elsewhere than Linux.
pub fn set_this_thread_nice(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; on Linux PRIO_PROCESS with a thread id
    // changes that thread alone. Failure leaves the priority as it was, which is harmless.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// Hand the allocator's free memory back to the system. Threads that allocate a lot and end
/// (grammar compilations) leave free space in their malloc arenas that glibc keeps otherwise.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and only releases memory no allocation uses.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Cap glibc's malloc arenas at `n` (its default is eight per core). A long-running server's
/// many short-lived threads (blocking tasks, grammar compilations) otherwise each leave an arena
/// holding freed memory, and resident memory creeps up for tens of minutes. Call it before
/// starting threads.
pub fn limit_malloc_arenas(n: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes no pointers; M_ARENA_MAX only bounds how many arenas glibc creates
    // later, and an unaccepted value leaves the default in place.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, n.clamp(1, i32::MAX as usize) as i32);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = n;
}

fn worker_loop(s: &Shared, me: usize) {
    let mut last_epoch = 0usize;
    let mut spins = 0usize;
    loop {
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        let st = s.state.load(Ordering::SeqCst);
        if st & 1 == 1 && st >> 1 != last_epoch {
            s.active.fetch_add(1, Ordering::SeqCst);
            // Join only if the job is still the same open one (the caller may have closed it).
            if s.state.load(Ordering::SeqCst) == st {
                let job = s.job.0.load(Ordering::SeqCst);
                // SAFETY: the job stays alive while it is open or `active` is non-zero, and we
                // incremented `active` before confirming it is open.
                if let Some(job) = unsafe { job.as_ref() } {
                    job.work(&s.panicked, me);
                }
            }
            last_epoch = st >> 1;
            s.active.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
            continue;
        }
        if spins < SPIN_ITERS {
            spins += 1;
            std::hint::spin_loop();
            continue;
        }
        // Sleep until the next job is published.
        let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.sleepers.fetch_add(1, Ordering::SeqCst);
        loop {
            let st = s.state.load(Ordering::SeqCst);
            if s.shutdown.load(Ordering::Acquire) || (st & 1 == 1 && st >> 1 != last_epoch) {
                break;
            }
            g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        s.sleepers.fetch_sub(1, Ordering::SeqCst);
        spins = 0;
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::SeqCst);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_index_runs_once() {
        let pool = ThreadPool::new(4);
        for _ in 0..1000 {
            let hits = AtomicUsize::new(0);
            let mask = AtomicUsize::new(0);
            pool.run(&|i, n| {
                assert_eq!(n, 4);
                hits.fetch_add(1, Ordering::SeqCst);
                mask.fetch_or(1 << i, Ordering::SeqCst);
            });
            assert_eq!(hits.load(Ordering::SeqCst), 4);
            assert_eq!(mask.load(Ordering::SeqCst), 0b1111);
        }
    }

    #[test]
    fn chunks_cover_the_range_exactly_once() {
        let pool = ThreadPool::new(3);
        for n in [1, 2, 7, 1001] {
            let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.for_chunks(n, 7, &|r| {
                for i in r {
                    seen[i].fetch_add(1, Ordering::SeqCst);
                }
            });
            assert!(seen.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        }
    }

    #[test]
    fn parts_cover_the_range_exactly_once() {
        for threads in [2, 3, 4] {
            let pool = ThreadPool::new(threads);
            for (n, min) in [(1, 1), (2, 1), (7, 3), (1001, 16), (4864, 6), (10, 100)] {
                let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.for_parts(n, min, &|r| {
                    assert!(!r.is_empty() && r.end <= n);
                    for i in r {
                        seen[i].fetch_add(1, Ordering::SeqCst);
                    }
                });
                assert!(seen.iter().all(|c| c.load(Ordering::SeqCst) == 1), "n {n}, min {min}, {threads} threads");
            }
        }
    }

    #[test]
    fn idle_threads_steal_a_slow_threads_part() {
        // The caller stalls in its first piece until the worker has run everything else: the
        // worker's own part, then the rest of the caller's, taken from its back end.
        let pool = ThreadPool::new(2);
        let n = 4000;
        let seen: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let by_worker = AtomicUsize::new(0);
        let first = AtomicUsize::new(0);
        let caller = std::thread::current().id();
        pool.for_parts(n, 10, &|r| {
            if std::thread::current().id() == caller {
                if r.start == 0 {
                    first.store(r.len(), Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                    while by_worker.load(Ordering::SeqCst) < n - r.len() && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            } else {
                by_worker.fetch_add(r.len(), Ordering::SeqCst);
            }
            for i in r {
                seen[i].fetch_add(1, Ordering::SeqCst);
            }
        });
        assert!(seen.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        // A quarter of the caller's half.
        assert_eq!(first.load(Ordering::SeqCst), n / 8);
        assert_eq!(by_worker.load(Ordering::SeqCst), n - n / 8);
    }

    #[test]
    fn rows_are_each_visited_once() {
        let pool = ThreadPool::new(2);
        let mut data = vec![0usize; 5 * 3];
        pool.for_rows(&mut data, 3, 1, &|r, row| row.iter_mut().for_each(|v| *v += r + 1));
        assert_eq!(data, vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]);
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.for_chunks(8, 1, &|r| assert_ne!(r.start, 5, "boom"))));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        pool.for_chunks(10, 1, &|_| {
            hits.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(hits.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn sleeping_workers_wake_for_new_jobs() {
        let pool = ThreadPool::new(2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let who = Mutex::new(std::collections::HashSet::new());
        for _ in 0..50 {
            pool.for_chunks(64, 1, &|_| {
                who.lock().unwrap().insert(std::thread::current().id());
                std::thread::sleep(std::time::Duration::from_micros(200));
            });
        }
        assert_eq!(who.lock().unwrap().len(), 2, "the worker took part");
    }
}
