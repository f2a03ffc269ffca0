//! The serving engine: one thread owns a model and its KV block pool and runs continuous
//! batching. Each step it gives every running sequence the tokens it needs to catch up — one for
//! a decoding sequence, a chunk of its prompt for a new one — within a token budget, so prompts
//! are prefilled in chunks interleaved with decodes and streams never stall; then it runs them
//! as one forward pass (weights read once for all) and samples the next token of every sequence
//! whose prompt is done.
//!
//! KV memory is a pool of fixed-size blocks (see [`crate::blocks`]): prompts reuse cached blocks
//! of any earlier request with the same prefix, and when the pool runs out the most recently
//! admitted sequence is preempted (its blocks released, to be recomputed — mostly from the prefix
//! cache — when it resumes). Requests talk to the engine through a bounded queue and stream
//! events back through a [`Sink`]; a sink whose receiver is gone cancels its sequence at once.

use crate::blocks::{block_hash, prefix_hashes, BlockAllocator, BlockId};
use crate::disk_cache::{self, DiskCache};
use crate::generate::{Decoding, FinishReason, GenerateParams, Next, Step};
use crate::grammar::{AutomatonCache, Constraint, TokenTrie};
use crate::sampling::{log_sum_exp, top_logprobs};
use smelt_kernels::pool::ThreadPool;
use smelt_model::arch::{BatchToken, Model, Workspace};
use smelt_model::kv::{BlockPool, KvTypes, PagedKv, PagedSeq, BLOCK_SIZE};
use smelt_model::lora::LoraSet;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most positions (prompt + output) per sequence.
    pub n_ctx: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// KV blocks in the pool (BLOCK_SIZE positions each).
    pub kv_blocks: usize,
    /// Most tokens per forward pass.
    pub step_tokens: usize,
    /// Requests that may wait for admission before new ones are refused.
    pub queue: usize,
    /// How the KV pool stores keys and values (checked against the model by the caller, with
    /// `Model::check_kv_types`).
    pub kv_types: KvTypes,
    /// Where full blocks go when evicted (and on `Engine::persist`), and are found again.
    pub kv_disk: Option<Arc<DiskCache>>,
}

/// Where a request's events go. `send` returns false when nobody listens any more.
pub trait Sink: Send {
    fn send(&mut self, ev: Event) -> bool;
    /// The receiver is gone (checked while a prompt is prefilled, before anything is sent).
    fn closed(&self) -> bool {
        false
    }
}

#[derive(Clone, Debug)]
pub struct PromptLogprob {
    pub token: u32,
    /// None for the first prompt token (nothing precedes it).
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Clone, Debug)]
pub enum Event {
    PromptLogprobs(Vec<PromptLogprob>),
    Token(Step),
    Done(Summary),
    /// One vector per input, and the total number of input tokens.
    Embeddings(Vec<Vec<f32>>, usize),
    Error(String),
}

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    /// Report log-probabilities of the prompt tokens (with this many alternatives).
    pub prompt_logprobs: Option<usize>,
    /// The adapters the sequence runs under (empty: the base model).
    pub lora: LoraSet,
    pub sink: Box<dyn Sink>,
}

pub struct EmbedRequest {
    pub inputs: Vec<Vec<u32>>,
    pub sink: Box<dyn Sink>,
}

pub enum Job {
    Generate(GenRequest),
    Embed(EmbedRequest),
    /// Write every cached block not yet on disk to the disk cache; reply with how many.
    Persist(SyncSender<usize>),
}

/// Counters the server exports as metrics.
#[derive(Default)]
pub struct Stats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub prefix_lookup_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// Prompt tokens whose KV was read back from the disk cache (also counted as hits).
    pub disk_hit_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub preemptions: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Grammar automata and token masks kept by the engine: estimated bytes and count.
    pub grammar_cache_bytes: AtomicUsize,
    pub grammar_cache_entries: AtomicUsize,
    /// Embedding requests queued or in progress.
    pub embeddings_pending: AtomicUsize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    QueueFull,
    Stopped,
}

/// The vocabulary's byte trie for constrained decoding, built once on first use and shared by
/// the engine thread and whoever prepares grammars for it.
#[derive(Clone, Default)]
pub struct SharedTrie(Arc<std::sync::OnceLock<Arc<TokenTrie>>>);

impl SharedTrie {
    pub fn get(&self, model: &Model) -> Arc<TokenTrie> {
        self.0.get_or_init(|| Arc::new(TokenTrie::new(&model.tokenizer))).clone()
    }
}

/// The server's handle on an engine thread.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<Job>,
    pub stats: Arc<Stats>,
    pub model: Arc<Model>,
    pub config: EngineConfig,
    trie: SharedTrie,
}

impl Engine {
    /// Start the engine thread for `model`.
    pub fn start(model: Arc<Model>, pool: Arc<ThreadPool>, config: EngineConfig) -> Engine {
        let (tx, rx) = std::sync::mpsc::sync_channel(config.queue.max(1));
        let stats = Arc::new(Stats::default());
        let trie = SharedTrie::default();
        let (m, c, st, tr) = (model.clone(), config.clone(), stats.clone(), trie.clone());
        // The runner is made on its own thread: grammar states are not `Send`.
        std::thread::Builder::new()
            .name("smelt-engine".into())
            .spawn(move || Runner::new(m, pool, c, st, tr).run(rx))
            .expect("spawning the engine thread");
        Engine { tx, stats, model, config, trie }
    }

    /// The vocabulary's trie (built on first use, ~0.1-0.2 s), for preparing grammars.
    pub fn trie(&self) -> Arc<TokenTrie> {
        self.trie.get(&self.model)
    }

    /// Write the prefix cache's blocks to the disk cache (a server stopping), waiting up to
    /// `timeout`; how many blocks were written, or None without a disk cache or in time.
    pub fn persist(&self, timeout: std::time::Duration) -> Option<usize> {
        self.config.kv_disk.as_ref()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.tx.send(Job::Persist(tx)).ok()?;
        rx.recv_timeout(timeout).ok()
    }

    /// Queue a job; refused at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

/// A running (or preempted) generation.
struct Seq {
    req: GenRequest,
    /// Prompt then generated tokens: everything that belongs in the cache.
    tokens: Vec<u32>,
    n_prompt: usize,
    blocks: Vec<BlockId>,
    /// Positions whose KV is in `blocks`.
    computed: usize,
    /// Hash chain of the full blocks registered in the prefix cache so far (block i's hash
    /// covers every token up to the end of block i).
    hashes: Vec<u64>,
    cached_tokens: usize,
    dec: Decoding,
    prompt_lp: Vec<PromptLogprob>,
}

struct Runner {
    model: Arc<Model>,
    ws: Workspace,
    kv: BlockPool,
    alloc: BlockAllocator,
    config: EngineConfig,
    stats: Arc<Stats>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// The vocabulary's trie, built for the first constrained request.
    trie: SharedTrie,
    /// Automata of recently used grammars, shared by the requests that use the same one.
    automata: AutomatonCache,
    /// Embedding requests, worked through one chunk at a time.
    embeds: VecDeque<EmbedJob>,
    /// The disk tier of the prefix cache and this model's namespace in it.
    disk: Option<(Arc<DiskCache>, u64)>,
    /// A block's bytes on their way to or from disk.
    block_bytes: Vec<u8>,
    /// Seconds of engine time embeddings may still take before the next generation step.
    embed_credit: f64,
}

/// What one sequence contributes to a step.
struct Work {
    seq: usize,
    start: usize,
    take: usize,
}

impl Runner {
    fn new(model: Arc<Model>, pool: Arc<ThreadPool>, config: EngineConfig, stats: Arc<Stats>, trie: SharedTrie) -> Runner {
        let kv = BlockPool::new(&model.hp.window, model.kv_row(), config.kv_blocks, config.kv_types);
        stats.kv_blocks_total.store(config.kv_blocks, Ordering::Relaxed);
        let disk = config.kv_disk.clone().and_then(|cache| match smelt_model::gguf::file_digest(&model.file.path) {
            Ok(digest) => Some((cache, DiskCache::namespace(digest, config.kv_types, model.hp.n_layer, model.kv_row()))),
            Err(e) => {
                eprintln!("warning: {}: no KV disk cache: cannot read {}: {e}", model.name, model.file.path.display());
                None
            }
        });
        Runner {
            disk,
            block_bytes: Vec::new(),
            ws: Workspace::new(pool),
            kv,
            alloc: BlockAllocator::new(config.kv_blocks),
            model,
            config,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            trie,
            automata: AutomatonCache::default(),
            embeds: VecDeque::new(),
            embed_credit: 0.0,
        }
    }

    fn run(mut self, rx: Receiver<Job>) {
        loop {
            // Wait for work when idle; otherwise take what has arrived without blocking.
            if self.running.is_empty() && self.waiting.is_empty() && self.embeds.is_empty() {
                match rx.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            loop {
                if self.waiting.len() >= self.config.queue {
                    break;
                }
                match rx.try_recv() {
                    Ok(job) => self.accept(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.waiting.is_empty() && self.embeds.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            let t = std::time::Instant::now();
            let generating = !self.running.is_empty();
            self.step();
            if self.embeds.is_empty() {
                self.embed_credit = 0.0;
            } else if generating {
                self.embed_credit = (self.embed_credit + t.elapsed().as_secs_f64() * EMBED_SHARE).min(EMBED_MAX_CREDIT);
            }
            self.embed_step();
            self.publish_stats();
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Embed(e) => {
                if let Some(i) = e.inputs.iter().position(|x| x.is_empty()) {
                    let mut e = e;
                    e.sink.send(Event::Error(format!("input {i} is empty")));
                    return;
                }
                if e.inputs.is_empty() {
                    let mut e = e;
                    e.sink.send(Event::Embeddings(Vec::new(), 0));
                    return;
                }
                self.embeds.push_back(EmbedJob { req: e, input: 0, done: 0, blocks: Vec::new(), sum: Vec::new(), out: Vec::new(), total: 0 });
            }
            Job::Persist(reply) => {
                let _ = reply.send(self.persist());
            }
            Job::Generate(mut req) => {
                let constraint = match &req.params.grammar {
                    None => None,
                    Some(g) => match self.automata.get(g) {
                        Ok(auto) => Some(Constraint::shared(auto, self.trie.get(&self.model))),
                        Err(e) => {
                            req.sink.send(Event::Error(e.to_string()));
                            return;
                        }
                    },
                };
                let tokens = req.prompt.clone();
                self.stats.prompt_tokens.fetch_add(tokens.len() as u64, Ordering::Relaxed);
                self.waiting.push_back(Seq {
                    n_prompt: tokens.len(),
                    tokens,
                    blocks: Vec::new(),
                    computed: 0,
                    hashes: Vec::new(),
                    cached_tokens: 0,
                    dec: Decoding::new(&req.params, constraint),
                    prompt_lp: Vec::new(),
                    req,
                });
            }
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        s.waiting.store(self.waiting.len(), Ordering::Relaxed);
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.kv_blocks_used.store(self.alloc.used(), Ordering::Relaxed);
        s.prefix_lookup_tokens.store(self.alloc.lookups, Ordering::Relaxed);
        s.prefix_hit_tokens.store(self.alloc.hits, Ordering::Relaxed);
        s.grammar_cache_bytes.store(self.automata.bytes(), Ordering::Relaxed);
        s.grammar_cache_entries.store(self.automata.len(), Ordering::Relaxed);
        s.embeddings_pending.store(self.embeds.len(), Ordering::Relaxed);
    }

    fn release(&mut self, blocks: &mut Vec<BlockId>) {
        for b in blocks.drain(..) {
            self.alloc.release(b);
        }
    }

    /// Remove sequences whose clients have gone.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.sink.closed() {
                self.retire(i);
            } else {
                i += 1;
            }
        }
        self.waiting.retain(|s| !s.req.sink.closed());
    }

    /// Move waiting sequences into the running set while there is room.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_seqs {
            let Some(mut s) = self.waiting.pop_front() else { break };
            // Reuse cached blocks, but always compute at least the last token (for its logits),
            // and everything when the prompt's own logprobs are wanted (they need every row).
            let wants_rows = s.req.prompt_logprobs.is_some() && s.dec.generated == 0;
            let reusable = if wants_rows { 0 } else { (s.tokens.len() - 1) / BLOCK_SIZE };
            let root = s.req.lora.key();
            let mut hashes = prefix_hashes(root, &s.tokens[..reusable * BLOCK_SIZE]);
            let lookup_tokens = if s.dec.generated == 0 { s.n_prompt } else { 0 };
            let mut hit = self.alloc.lookup(&hashes, lookup_tokens);
            let (more, from_disk) = self.read_from_disk(&mut hit, &hashes, root, &s.tokens);
            if s.dec.generated == 0 {
                self.alloc.record_hit(more * BLOCK_SIZE);
                self.stats.disk_hit_tokens.fetch_add((from_disk * BLOCK_SIZE) as u64, Ordering::Relaxed);
            }
            s.computed = hit.len() * BLOCK_SIZE;
            hashes.truncate(hit.len());
            let parent = hashes.last().copied().unwrap_or(root);
            s.hashes = hashes;
            s.blocks = hit;
            if !wants_rows {
                self.reuse_partial(&mut s, parent);
            }
            if s.dec.generated == 0 {
                s.cached_tokens = s.computed;
            }
            // Enough blocks for the first chunk, or wait for memory.
            let first = (s.tokens.len() - s.computed).min(self.config.step_tokens);
            let need = (s.computed + first).div_ceil(BLOCK_SIZE).saturating_sub(s.blocks.len());
            if need > self.alloc.available() && !self.running.is_empty() {
                let mut blocks = std::mem::take(&mut s.blocks);
                self.release(&mut blocks);
                s.computed = 0;
                s.hashes.clear();
                self.waiting.push_front(s);
                break;
            }
            self.running.push(s);
        }
    }

    /// A free block, evicting the least recently used cached one if needed (written to the disk
    /// cache first, when there is one).
    fn allocate(&mut self) -> Option<BlockId> {
        let (b, evicted) = self.alloc.allocate_evicting()?;
        if let Some((parent, hash, tokens)) = evicted {
            self.write_to_disk(b, parent, hash, &tokens);
        }
        Some(b)
    }

    fn write_to_disk(&mut self, b: BlockId, parent: u64, hash: u64, tokens: &[u32]) -> bool {
        let Some((cache, ns)) = &self.disk else { return false };
        if cache.contains(*ns, hash) {
            return false;
        }
        self.block_bytes.clear();
        self.kv.save_block(b, &mut self.block_bytes);
        cache.put(*ns, &disk_cache::BlockId { parent, hash, tokens }, &self.block_bytes);
        true
    }

    /// Write every cached full block not yet on disk; how many were written.
    fn persist(&mut self) -> usize {
        let blocks: Vec<(BlockId, u64, u64, Vec<u32>)> = self.alloc.registered().map(|(b, p, h, t)| (b, p, h, t.to_vec())).collect();
        blocks.into_iter().filter(|(b, p, h, t)| self.write_to_disk(*b, *p, *h, t)).count()
    }

    /// Extend `hit` (the blocks found in memory for `hashes`, the chain from `root` over
    /// `tokens`) with the blocks that follow on disk, each read into a new block and registered
    /// in memory, and with any cached in memory after them; how many were added, and how many
    /// of those came from disk.
    fn read_from_disk(&mut self, hit: &mut Vec<BlockId>, hashes: &[u64], root: u64, tokens: &[u32]) -> (usize, usize) {
        let Some((cache, ns)) = self.disk.clone() else { return (0, 0) };
        let (before, mut read) = (hit.len(), 0);
        let block_len = BlockPool::block_bytes(self.model.hp.n_layer, self.model.kv_row(), self.config.kv_types);
        while let Some(&hash) = hashes.get(hit.len()) {
            if let Some(b) = self.alloc.take_cached(hash) {
                hit.push(b);
                continue;
            }
            if !cache.contains(ns, hash) {
                break;
            }
            let i = hit.len();
            let parent = if i == 0 { root } else { hashes[i - 1] };
            let block_tokens = &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let Some(b) = self.allocate() else { break };
            match cache.get(ns, &disk_cache::BlockId { parent, hash, tokens: block_tokens }, block_len) {
                Some(bytes) if self.kv.load_block(b, &bytes) => {
                    self.alloc.register(b, parent, hash, block_tokens);
                    hit.push(b);
                    read += 1;
                }
                _ => {
                    self.alloc.release(b);
                    break;
                }
            }
        }
        (hit.len() - before, read)
    }

    /// After the shared full blocks: copy the first positions of a cached block that continues
    /// the same way (the longest match, always leaving the last token to compute), so only
    /// where the prompt really diverges is recomputed.
    fn reuse_partial(&mut self, s: &mut Seq, parent: u64) {
        let limit = (s.tokens.len() - 1).saturating_sub(s.computed).min(BLOCK_SIZE);
        if limit == 0 {
            return;
        }
        let Some((src, j)) = self.alloc.best_partial(parent, &s.tokens[s.computed..s.computed + limit]) else { return };
        // Hold the source so allocating the copy cannot evict it.
        self.alloc.acquire(src);
        if let Some(dst) = self.allocate() {
            self.kv.copy_positions(src, dst, j);
            s.blocks.push(dst);
            s.computed += j;
            if s.dec.generated == 0 {
                self.alloc.record_hit(j);
            }
        }
        self.alloc.release(src);
    }

    /// Keep the last, partly filled block of a sequence that is done findable in the prefix
    /// cache (see `reuse_partial`).
    fn keep_partial(&mut self, s: &Seq) {
        let (full, rest) = (s.computed / BLOCK_SIZE, s.computed % BLOCK_SIZE);
        if rest == 0 || full >= s.blocks.len() || full > s.hashes.len() {
            return;
        }
        let parent = if full == 0 { s.req.lora.key() } else { s.hashes[full - 1] };
        self.alloc.register_partial(s.blocks[full], parent, &s.tokens[full * BLOCK_SIZE..s.computed]);
    }

    /// Ensure sequence `i` has blocks up to position `end`, preempting later sequences if the
    /// pool is exhausted. False if even that cannot make room.
    fn ensure_blocks(&mut self, i: usize, end: usize) -> bool {
        while self.running[i].blocks.len() * BLOCK_SIZE < end {
            match self.allocate() {
                Some(b) => self.running[i].blocks.push(b),
                None => {
                    // Preempt the most recently admitted other sequence.
                    let Some(victim) = (0..self.running.len()).rev().find(|&j| j != i) else { return false };
                    let mut v = self.running.remove(victim);
                    self.release(&mut v.blocks);
                    v.computed = 0;
                    v.hashes.clear();
                    self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
                    self.waiting.push_front(v);
                    if victim < i {
                        return self.ensure_blocks(i - 1, end);
                    }
                }
            }
        }
        true
    }

    /// Take sequence `i` out of the running set, its last partly filled block kept findable in
    /// the prefix cache and its blocks freed (a request that is done or whose client has gone).
    fn retire(&mut self, i: usize) -> Seq {
        let mut s = self.running.swap_remove(i);
        self.keep_partial(&s);
        self.release(&mut s.blocks);
        s
    }

    /// Retire a finished sequence and update the counters before telling the client,
    /// so whoever reads the metrics after the response sees them settled.
    fn finish(&mut self, i: usize, finish: FinishReason) {
        let mut s = self.retire(i);
        self.publish_stats();
        let summary = Summary { finish, prompt_tokens: s.n_prompt, completion_tokens: s.dec.generated, cached_tokens: s.cached_tokens };
        s.req.sink.send(Event::Done(summary));
    }

    fn fail(&mut self, i: usize, msg: String) {
        let mut s = self.running.swap_remove(i);
        self.release(&mut s.blocks);
        self.publish_stats();
        s.req.sink.send(Event::Error(msg));
    }

    /// Plan one step: decoding sequences first (one token each), then prompt chunks.
    fn plan(&mut self) -> Vec<Work> {
        let mut budget = self.config.step_tokens.max(1);
        let mut work = Vec::new();
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].tokens.len() - self.running[i].computed > 1);
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let pending = s.tokens.len() - s.computed;
            // Prompt logprobs need logits for every row: keep those chunks small.
            let cap = if s.req.prompt_logprobs.is_some() { 32 } else { usize::MAX };
            let take = pending.min(budget).min(cap);
            budget -= take;
            work.push(Work { seq: i, start: s.computed, take });
        }
        work
    }

    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let mut work = self.plan();
        // Blocks for this step; a sequence that cannot get them even alone fails.
        let mut k = 0;
        while k < work.len() {
            let (i, end) = (work[k].seq, work[k].start + work[k].take);
            let before = self.running.len();
            if !self.ensure_blocks(i, end) {
                let need = end.div_ceil(BLOCK_SIZE);
                self.fail(i, format!("the KV cache is too small for this request: it needs {need} blocks of {BLOCK_SIZE} positions, the pool has {}; raise --kv-memory or shorten the prompt", self.alloc.n_blocks()));
                return;
            }
            if self.running.len() != before {
                // Preemption reshuffled the running set: plan again.
                work = self.plan();
                k = 0;
                continue;
            }
            k += 1;
        }
        let mut batch = Vec::new();
        for (slot, w) in work.iter().enumerate() {
            let s = &self.running[w.seq];
            let last = w.start + w.take == s.tokens.len();
            let all_rows = s.req.prompt_logprobs.is_some() && w.start < s.n_prompt;
            for p in w.start..w.start + w.take {
                batch.push(BatchToken { token: s.tokens[p], pos: p, seq: slot, logits: all_rows || (last && p == s.tokens.len() - 1) });
            }
        }
        let n_vocab = self.model.hp.n_vocab;
        let result = {
            let seqs = work
                .iter()
                .map(|w| {
                    let s = &self.running[w.seq];
                    PagedSeq { blocks: &s.blocks, len: s.computed, capacity: self.config.n_ctx, max_batch: w.take.max(1) }
                })
                .collect();
            let mut kv = PagedKv { pool: &mut self.kv, seqs };
            let loras: Vec<&LoraSet> = work.iter().map(|w| &self.running[w.seq].req.lora).collect();
            self.model.forward_lora(&batch, &mut kv, &mut self.ws, &loras)
        };
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Nothing in a well-formed step can fail; report it to every participant.
                let mut idx: Vec<usize> = work.iter().map(|w| w.seq).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    self.fail(i, format!("internal error: {e}"));
                }
                return;
            }
        };
        // Walk the logits rows in batch order.
        let mut row = 0;
        // (running index, finish reason or error); Cancelled means the client is gone: no Done event.
        let mut finished: Vec<(usize, Result<FinishReason, String>)> = Vec::new();
        for w in &work {
            let s = &mut self.running[w.seq];
            s.computed += w.take;
            let all_rows = s.req.prompt_logprobs.is_some() && w.start < s.n_prompt;
            let mut last_row = None;
            for p in w.start..w.start + w.take {
                let flagged = all_rows || (w.start + w.take == s.tokens.len() && p == s.tokens.len() - 1);
                if !flagged {
                    continue;
                }
                let lrow = &logits[row * n_vocab..(row + 1) * n_vocab];
                row += 1;
                if all_rows && p + 1 < s.n_prompt {
                    let lse = log_sum_exp(lrow);
                    let next = s.tokens[p + 1];
                    let k = s.req.prompt_logprobs.unwrap_or(0);
                    s.prompt_lp.push(PromptLogprob { token: next, logprob: Some(lrow[next as usize] - lse), top: top_logprobs(lrow, lse, k) });
                }
                if p == s.tokens.len() - 1 {
                    last_row = Some(lrow);
                }
            }
            // Register newly completed full blocks in the prefix cache.
            let full = s.computed / BLOCK_SIZE;
            for b in s.hashes.len()..full {
                let parent = s.hashes.last().copied().unwrap_or_else(|| s.req.lora.key());
                let tokens = &s.tokens[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
                let hash = block_hash(parent, tokens);
                self.alloc.register(s.blocks[b], parent, hash, tokens);
                s.hashes.push(hash);
            }
            let Some(lrow) = last_row else { continue };
            if s.dec.generated == 0 && s.req.prompt_logprobs.is_some() {
                let first = PromptLogprob { token: s.tokens[0], logprob: None, top: Vec::new() };
                let mut lp = vec![first];
                lp.append(&mut s.prompt_lp);
                if !s.req.sink.send(Event::PromptLogprobs(lp)) {
                    finished.push((w.seq, Ok(FinishReason::Cancelled)));
                    continue;
                }
            }
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            match sample_next(s, lrow, &self.model, self.config.n_ctx) {
                Ok(Some(reason)) => finished.push((w.seq, Ok(reason))),
                Ok(None) => {}
                Err(e) => finished.push((w.seq, Err(e))),
            }
        }
        // Retire finished, failed and cancelled sequences, highest index first (swap_remove).
        finished.sort_by(|a, b| b.0.cmp(&a.0));
        for (i, reason) in finished {
            match reason {
                Ok(FinishReason::Cancelled) => {
                    self.retire(i);
                }
                Ok(reason) => self.finish(i, reason),
                Err(e) => {
                    let mut s = self.retire(i);
                    self.publish_stats();
                    s.req.sink.send(Event::Error(e));
                }
            }
        }
    }

    /// Embeddings: mean of the final normed hidden states, L2-normalized. One chunk of the
    /// front request per loop, so a large request never holds the model for long: while
    /// sequences are generating, embeddings get at most [`EMBED_SHARE`] of the engine's time
    /// (their chunks kept small), and a request whose client has gone is dropped between chunks.
    fn embed_step(&mut self) {
        let Some(job) = self.embeds.front_mut() else { return };
        if job.req.sink.closed() {
            let mut job = self.embeds.pop_front().expect("front exists");
            self.release(&mut job.blocks);
            return;
        }
        let busy = !self.running.is_empty();
        if busy && self.embed_credit < 0.0 {
            return;
        }
        let t = std::time::Instant::now();
        let job = self.embeds.front().expect("front exists");
        if job.done == 0 {
            // Blocks for the whole input, freed when it is done.
            let need = job.req.inputs[job.input].len().div_ceil(BLOCK_SIZE);
            let mut blocks = Vec::with_capacity(need);
            while blocks.len() < need {
                match self.allocate() {
                    Some(b) => blocks.push(b),
                    None => break,
                }
            }
            if blocks.len() < need {
                self.release(&mut blocks);
                let mut job = self.embeds.pop_front().expect("front exists");
                let n = job.req.inputs[job.input].len();
                job.req.sink.send(Event::Error(format!("not enough KV memory to embed {n} tokens; raise --kv-memory")));
                return;
            }
            let job = self.embeds.front_mut().expect("front exists");
            job.blocks = blocks;
            job.sum = vec![0f64; self.model.hp.n_embd];
        }
        let job = self.embeds.front_mut().expect("front exists");
        let input = &job.req.inputs[job.input];
        let limit = self.config.step_tokens.min(if busy { EMBED_CHUNK_BUSY } else { EMBED_CHUNK });
        let take = (input.len() - job.done).min(limit.max(1));
        let batch: Vec<BatchToken> = input[job.done..job.done + take].iter().enumerate().map(|(i, &token)| BatchToken { token, pos: job.done + i, seq: 0, logits: true }).collect();
        let result = {
            let mut kv = PagedKv { pool: &mut self.kv, seqs: vec![PagedSeq { blocks: &job.blocks, len: job.done, capacity: self.config.n_ctx, max_batch: take }] };
            self.model.forward_hidden(&batch, &mut kv, &mut self.ws)
        };
        let e_dim = self.model.hp.n_embd;
        match result {
            Ok(h) => {
                for r in h.chunks_exact(e_dim) {
                    for (a, &v) in job.sum.iter_mut().zip(r) {
                        *a += v as f64;
                    }
                }
            }
            Err(err) => {
                let mut job = self.embeds.pop_front().expect("front exists");
                self.release(&mut job.blocks);
                job.req.sink.send(Event::Error(err.to_string()));
                return;
            }
        }
        job.done += take;
        if job.done == input.len() {
            let len = job.done;
            let mean: Vec<f64> = job.sum.iter().map(|v| v / len as f64).collect();
            let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            job.out.push(mean.iter().map(|v| (v / norm) as f32).collect());
            job.total += len;
            job.input += 1;
            job.done = 0;
            let mut blocks = std::mem::take(&mut job.blocks);
            self.release(&mut blocks);
        }
        let job = self.embeds.front_mut().expect("front exists");
        if job.input == job.req.inputs.len() {
            let mut job = self.embeds.pop_front().expect("front exists");
            let out = std::mem::take(&mut job.out);
            job.req.sink.send(Event::Embeddings(out, job.total));
        }
        // Charged even when idle, so that generation arriving after a run of chunks is not
        // followed at once by another one (the debt is bounded, so embeddings still progress).
        self.embed_credit = (self.embed_credit - t.elapsed().as_secs_f64()).max(-EMBED_MAX_DEBT);
    }
}

/// Share of the engine's time embeddings may take while sequences are generating (relative to
/// the time of the generation steps), and the most tokens per embedding chunk then and when
/// idle. Chunks are small because a request that arrives mid-chunk waits for it: 16 tokens
/// of a 0.3B model are ~0.1 s on two slow cores, while the weights read per chunk stay a small
/// part of its cost.
const EMBED_SHARE: f64 = 0.25;
const EMBED_CHUNK_BUSY: usize = 16;
const EMBED_CHUNK: usize = 16;
/// Seconds of engine time embeddings may bank while waiting, or owe after running.
const EMBED_MAX_CREDIT: f64 = 0.05;
const EMBED_MAX_DEBT: f64 = 0.5;

/// An embedding request in progress.
struct EmbedJob {
    req: EmbedRequest,
    /// The input being embedded, and how many of its tokens are done.
    input: usize,
    done: usize,
    blocks: Vec<BlockId>,
    sum: Vec<f64>,
    out: Vec<Vec<f32>>,
    total: usize,
}

/// Sample the next token of a sequence from its logits row, stream it, and say whether (and
/// why) the sequence is finished.
fn sample_next(s: &mut Seq, lrow: &[f32], model: &Model, n_ctx: usize) -> Result<Option<FinishReason>, String> {
    // The scheduler stops one position short of the context's end.
    let room = s.tokens.len() + 1 < n_ctx;
    let (step, finish) = match s.dec.next(&model.tokenizer, lrow, &s.tokens, room) {
        Next::Token(step, finish) => (step, finish),
        Next::Stuck => return Ok(Some(FinishReason::Stop)),
        Next::Failed(e) => return Err(e),
    };
    let id = step.id;
    if !s.req.sink.send(Event::Token(step)) {
        return Ok(Some(FinishReason::Cancelled));
    }
    s.tokens.push(id);
    Ok(finish)
}
