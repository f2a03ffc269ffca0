//! KV block allocation with automatic prefix caching.
//!
//! Blocks hold BLOCK_SIZE positions. A full block is identified by the hash of its tokens and
//! of everything before them (the parent block's hash), so two requests whose prompts start the
//! same way map their first blocks to the same hashes and can share them. Blocks no sequence uses
//! any more stay cached (evictable, least recently used first) until their memory is needed.

use smelt_model::kv::BLOCK_SIZE;
use std::collections::{BTreeMap, HashMap};

pub type BlockId = u32;

/// Hash of a full block given its parent's hash (0 for the first block).
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

/// Hashes of the full blocks of `tokens`.
pub fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / BLOCK_SIZE);
    let mut parent = 0;
    for chunk in tokens.chunks_exact(BLOCK_SIZE) {
        parent = block_hash(parent, chunk);
        out.push(parent);
    }
    out
}

pub struct BlockAllocator {
    refs: Vec<u32>,
    hash_of: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
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
            hash_of: vec![None; n_blocks],
            cached: HashMap::new(),
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
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&tick, &b) = self.lru.iter().next()?;
                self.lru.remove(&tick);
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// The longest run of cached blocks matching `hashes` from the start, each now referenced
    /// once more. `tokens` is what the lookup covers (for the hit-rate statistics).
    pub fn lookup(&mut self, hashes: &[u64], tokens: usize) -> Vec<BlockId> {
        let mut hit = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            if self.refs[b as usize] == 0 {
                self.lru.remove(&self.lru_tick[b as usize]);
            }
            self.refs[b as usize] += 1;
            hit.push(b);
        }
        self.lookups += tokens as u64;
        self.hits += (hit.len() * BLOCK_SIZE).min(tokens) as u64;
        hit
    }

    /// Make a full block findable by its prefix hash (first writer wins).
    pub fn register(&mut self, b: BlockId, hash: u64) {
        if self.hash_of[b as usize].is_none() && !self.cached.contains_key(&hash) {
            self.hash_of[b as usize] = Some(hash);
            self.cached.insert(hash, b);
        }
    }

    /// Drop one reference; unused blocks stay cached if registered, else become free.
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "releasing an unused block");
        *r = r.saturating_sub(1);
        if *r == 0 {
            if self.hash_of[b as usize].is_some() {
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
        let hashes = prefix_hashes(&doc);
        assert_eq!(hashes.len(), 3);
        assert!(a.lookup(&hashes, doc.len()).is_empty());
        let blocks: Vec<BlockId> = (0..3).map(|_| a.allocate().unwrap()).collect();
        for (b, h) in blocks.iter().zip(&hashes) {
            a.register(*b, *h);
        }
        // A second request with the same first two blocks and a different third.
        let mut other = doc[..2 * BLOCK_SIZE].to_vec();
        other.extend(toks(BLOCK_SIZE, 99));
        let hit = a.lookup(&prefix_hashes(&other), other.len());
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
        let (ha, hb) = (prefix_hashes(&a), prefix_hashes(&b));
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1], "same second block, different history");
        assert_eq!(prefix_hashes(&a[..BLOCK_SIZE + 3]), ha[..1].to_vec());
    }
}
