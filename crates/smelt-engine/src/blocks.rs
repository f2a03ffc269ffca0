//! KV block allocation with automatic prefix caching.
//!
//! Blocks hold BLOCK_SIZE positions. A full block is identified by the hash of its tokens and
//! of everything before them (the parent block's hash), so two requests whose prompts start the
//! same way map their first blocks to the same hashes and can share them. Blocks no sequence uses
//! any more stay cached (evictable, least recently used first) until their memory is needed.
//! Cached blocks are also indexed by their parent's hash with their tokens, including the last,
//! partly filled block of a finished sequence, so a request that diverges in the middle of a
//! block can still reuse that block's first positions (copied into a block of its own).

use smelt_model::kv::BLOCK_SIZE;
use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

/// Hash of a full block given its parent's hash (for the first block, the root of the chain:
/// 0 for the base model, the adapters' key otherwise, so KV computed under different adapters
/// never matches).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    // FNV-1a over the parent hash and the tokens: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ parent.rotate_left(17);
    for &t in tokens {
        for b in t.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Hashes of the full blocks of `tokens`, chained from `root`.
pub fn prefix_hashes(root: u64, tokens: &[u32]) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / BLOCK_SIZE);
    let mut parent = root;
    for chunk in tokens.chunks_exact(BLOCK_SIZE) {
        parent = block_hash(parent, chunk);
        out.push(parent);
    }
    out
}

/// What a cached block holds: the hash of the block before it and its tokens (all
/// BLOCK_SIZE of them, with `hash` set, for a full block; fewer for a partial one).
struct Entry {
    parent: u64,
    hash: Option<u64>,
    tokens: Vec<u32>,
}

pub struct BlockAllocator {
    refs: Vec<u32>,
    entry: Vec<Option<Entry>>,
    cached: HashMap<u64, BlockId>,
    /// Cached blocks (full or partial) by the hash of the block before them.
    children: HashMap<u64, Vec<BlockId>>,
    /// Cached blocks nobody uses, by last use.
    lru: BTreeMap<u64, BlockId>,
    lru_tick: Vec<u64>,
    tick: u64,
    free: Vec<BlockId>,
    /// Prefix-cache statistics, in tokens.
    pub lookups: u64,
    pub hits: u64,
}

impl BlockAllocator {
    pub fn new(n_blocks: usize) -> BlockAllocator {
        BlockAllocator {
            refs: vec![0; n_blocks],
            entry: (0..n_blocks).map(|_| None).collect(),
            cached: HashMap::new(),
            children: HashMap::new(),
            lru: BTreeMap::new(),
            lru_tick: vec![0; n_blocks],
            tick: 0,
            free: (0..n_blocks as BlockId).rev().collect(),
            lookups: 0,
            hits: 0,
        }
    }

    pub fn n_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks in use by some sequence.
    pub fn used(&self) -> usize {
        self.refs.iter().filter(|&&r| r > 0).count()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// A block for new positions, evicting the least recently used cached block if needed.
    pub fn allocate(&mut self) -> Option<BlockId> {
        self.allocate_evicting().map(|(b, _)| b)
    }

    /// As `allocate`, also telling which full block it evicted, if any, as (parent, hash,
    /// tokens): its positions are still in the pool until the caller writes the new block.
    pub fn allocate_evicting(&mut self) -> Option<(BlockId, Option<(u64, u64, Vec<u32>)>)> {
        let (b, evicted) = match self.free.pop() {
            Some(b) => (b, None),
            None => {
                let (&tick, &b) = self.lru.iter().next()?;
                self.lru.remove(&tick);
                let evicted = self.forget(b).and_then(|e| Some((e.parent, e.hash?, e.tokens)));
                (b, evicted)
            }
        };
        self.refs[b as usize] = 1;
        Some((b, evicted))
    }

    /// Remove a block from the cache indexes; what it was registered as.
    fn forget(&mut self, b: BlockId) -> Option<Entry> {
        let e = self.entry[b as usize].take()?;
        if let Some(h) = e.hash {
            self.cached.remove(&h);
        }
        if let Some(list) = self.children.get_mut(&e.parent) {
            list.retain(|&c| c != b);
            if list.is_empty() {
                self.children.remove(&e.parent);
            }
        }
        Some(e)
    }

    /// Every full block findable by its hash: (block, parent, hash, tokens).
    pub fn registered(&self) -> impl Iterator<Item = (BlockId, u64, u64, &[u32])> + '_ {
        self.cached.iter().filter_map(|(&h, &b)| self.entry[b as usize].as_ref().map(|e| (b, e.parent, h, e.tokens.as_slice())))
    }

    /// Take one more reference to a block (out of the evictable set if it was there).
    pub fn acquire(&mut self, b: BlockId) {
        if self.refs[b as usize] == 0 {
            self.lru.remove(&self.lru_tick[b as usize]);
        }
        self.refs[b as usize] += 1;
    }

    /// The longest run of cached blocks matching `hashes` from the start, each now referenced
    /// once more. `tokens` is what the lookup covers (for the hit-rate statistics).
    pub fn lookup(&mut self, hashes: &[u64], tokens: usize) -> Vec<BlockId> {
        let mut hit = Vec::new();
        for &h in hashes {
            let Some(b) = self.take_cached(h) else { break };
            hit.push(b);
        }
        self.lookups += tokens as u64;
        self.hits += (hit.len() * BLOCK_SIZE).min(tokens) as u64;
        hit
    }

    /// The cached block with hash `h`, now referenced once more.
    pub fn take_cached(&mut self, h: u64) -> Option<BlockId> {
        let b = *self.cached.get(&h)?;
        self.acquire(b);
        Some(b)
    }

    /// The cached block after `parent` (0: the first block) whose tokens share the longest
    /// start with `want`, and that length (at least 1), if any.
    pub fn best_partial(&self, parent: u64, want: &[u32]) -> Option<(BlockId, usize)> {
        let mut best: Option<(BlockId, usize)> = None;
        for &b in self.children.get(&parent)? {
            let Some(e) = &self.entry[b as usize] else { continue };
            let j = e.tokens.iter().zip(want).take_while(|(a, b)| a == b).count();
            if j > best.map_or(0, |(_, n)| n) {
                best = Some((b, j));
            }
        }
        best
    }

    /// Count `n` tokens reused from a partial match (hit-rate statistics).
    pub fn record_hit(&mut self, n: usize) {
        self.hits += n as u64;
    }

    /// Make a full block findable by its prefix hash (first writer wins). `parent` is the hash
    /// of the block before it (0 for the first), `tokens` its BLOCK_SIZE tokens.
    pub fn register(&mut self, b: BlockId, parent: u64, hash: u64, tokens: &[u32]) {
        if self.entry[b as usize].as_ref().is_some_and(|e| e.hash.is_some()) || self.cached.contains_key(&hash) {
            return;
        }
        self.forget(b);
        self.entry[b as usize] = Some(Entry { parent, hash: Some(hash), tokens: tokens.to_vec() });
        self.cached.insert(hash, b);
        self.children.entry(parent).or_default().push(b);
    }

    /// Keep a partly filled block (its first `tokens.len()` positions) findable after `parent`
    /// once its sequence is done with it.
    pub fn register_partial(&mut self, b: BlockId, parent: u64, tokens: &[u32]) {
        if self.entry[b as usize].is_some() || tokens.is_empty() || tokens.len() >= BLOCK_SIZE {
            return;
        }
        self.entry[b as usize] = Some(Entry { parent, hash: None, tokens: tokens.to_vec() });
        self.children.entry(parent).or_default().push(b);
    }

    /// Drop one reference; unused blocks stay cached if registered, else become free.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "releasing an unused block");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.entry[b as usize].is_some() {
                self.tick += 1;
                self.lru_tick[b as usize] = self.tick;
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn shared_prefixes_hit_and_unused_blocks_are_evicted_oldest_first() {
        let mut a = BlockAllocator::new(4);
        let doc = toks(3 * BLOCK_SIZE, 1);
        let hashes = prefix_hashes(0, &doc);
        assert_eq!(hashes.len(), 3);
        assert!(a.lookup(&hashes, doc.len()).is_empty());
        let blocks: Vec<BlockId> = (0..3).map(|_| a.allocate().unwrap()).collect();
        for (i, (b, h)) in blocks.iter().zip(&hashes).enumerate() {
            a.register(*b, if i == 0 { 0 } else { hashes[i - 1] }, *h, &doc[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
        }
        // A second request with the same first two blocks and a different third.
        let mut other = doc[..2 * BLOCK_SIZE].to_vec();
        other.extend(toks(BLOCK_SIZE, 99));
        let hit = a.lookup(&prefix_hashes(0, &other), other.len());
        assert_eq!(hit, blocks[..2].to_vec());
        assert_eq!(a.hits, 2 * BLOCK_SIZE as u64);
        // The first request finishes: block 3 (unshared) becomes evictable, 1-2 stay in use.
        for b in &blocks {
            a.release(*b);
        }
        assert_eq!(a.used(), 2);
        assert_eq!(a.available(), 2);
        // Allocation takes the free block, then evicts the cached third block.
        let x = a.allocate().unwrap();
        let y = a.allocate().unwrap();
        assert!(![x, y].contains(&blocks[0]) && [x, y].contains(&blocks[2]));
        assert!(a.allocate().is_none());
        // The evicted block is no longer found.
        assert_eq!(a.lookup(&hashes, doc.len()).len(), 2);
    }

    #[test]
    fn hashes_depend_on_everything_before() {
        let a = toks(2 * BLOCK_SIZE, 1);
        let mut b = a.clone();
        b[0] += 1;
        let (ha, hb) = (prefix_hashes(0, &a), prefix_hashes(0, &b));
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1], "same second block, different history");
        assert_eq!(prefix_hashes(0, &a[..BLOCK_SIZE + 3]), ha[..1].to_vec());
    }

    #[test]
    fn partial_matches_find_the_longest_shared_start_and_leave_with_eviction() {
        let mut a = BlockAllocator::new(3);
        let doc = toks(BLOCK_SIZE + 5, 3);
        let h = prefix_hashes(0, &doc);
        let (b0, b1) = (a.allocate().unwrap(), a.allocate().unwrap());
        a.register(b0, 0, h[0], &doc[..BLOCK_SIZE]);
        a.register_partial(b1, h[0], &doc[BLOCK_SIZE..]);
        // After the first block, a request sharing three of the five tokens finds b1.
        let mut want = doc[BLOCK_SIZE..BLOCK_SIZE + 3].to_vec();
        want.push(12345);
        assert_eq!(a.best_partial(h[0], &want), Some((b1, 3)));
        // From the start, the full block matches as far as the request goes.
        assert_eq!(a.best_partial(0, &doc[..7]), Some((b0, 7)));
        assert_eq!(a.best_partial(h[0], &[999]), None);
        assert_eq!(a.best_partial(12, &want), None);
        // Released, both stay cached; evicted, the partial block is no longer offered.
        a.release(b0);
        a.release(b1);
        assert_eq!(a.available(), 3);
        let _free = a.allocate().unwrap();
        let _b0_again = a.allocate().unwrap();
        let _b1_again = a.allocate().unwrap();
        assert_eq!(a.best_partial(h[0], &want), None);
        assert_eq!(a.best_partial(0, &doc[..7]), None);
    }
}
