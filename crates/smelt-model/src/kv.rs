//! KV caches. The forward pass sees them through [`KvStore`]; two stores exist:
//!
//! - [`KvCache`], one sequence's own cache (the CLI's sessions), described below;
//! - [`PagedKv`], sequences whose positions live in fixed-size blocks of a shared [`BlockPool`]
//!   (the server: the engine allocates blocks, shares them between sequences with a common
//!   prefix and evicts them under a memory budget).
//!
//! Both store keys and values in the cache types chosen ([`KvTypes`]: f16 by default, or
//! q8_0 / q4_0 blocks), the same way, so results do not depend on the store.
//!
//! [`KvCache`]:
//! A sequence's tokens occupy positions 0..len. Full-attention layers keep every position (slot =
//! position, storage grown on demand). Sliding-window layers keep a ring of `window + max_batch`
//! slots (slot = position mod ring): enough for the window of every query in a batch, and for
//! rolling back up to `max_batch` positions.

use half::f16;
use half::slice::HalfFloatSliceExt;
pub use smelt_kernels::kv::{KvRows, KvType};
use std::ops::Range;

/// The formats keys and values are cached in (llama.cpp's `--cache-type-k` / `--cache-type-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
}

impl KvTypes {
    /// Bytes one position takes in one layer (`row` values of keys and of values).
    pub fn bytes_per_row(self, row: usize) -> usize {
        self.k.bytes(row) + self.v.bytes(row)
    }

    /// Whether heads of `head_dim` values can be stored in both types.
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        self.k.check_head_dim(head_dim)?;
        self.v.check_head_dim(head_dim)
    }

    /// "f16" when both are the same, else "k q8_0, v f16".
    pub fn describe(self) -> String {
        if self.k == self.v {
            self.k.name().to_string()
        } else {
            format!("k {}, v {}", self.k.name(), self.v.name())
        }
    }
}

/// One layer's cached keys or values, in one [`KvType`], addressed by value index (a row of
/// `row` values per slot; quantized rows are whole blocks).
#[derive(Clone, Debug)]
pub enum KvBuf {
    F16(Vec<f16>),
    Q8_0(Vec<u8>),
    Q4_0(Vec<u8>),
}

impl KvBuf {
    pub fn new(t: KvType, values: usize) -> KvBuf {
        let mut b = match t {
            KvType::F16 => KvBuf::F16(Vec::new()),
            KvType::Q8_0 => KvBuf::Q8_0(Vec::new()),
            KvType::Q4_0 => KvBuf::Q4_0(Vec::new()),
        };
        b.resize(values);
        b
    }

    pub fn kv_type(&self) -> KvType {
        match self {
            KvBuf::F16(_) => KvType::F16,
            KvBuf::Q8_0(_) => KvType::Q8_0,
            KvBuf::Q4_0(_) => KvType::Q4_0,
        }
    }

    /// Values stored.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Grow (or shrink) to `values` values; new ones are zero.
    pub fn resize(&mut self, values: usize) {
        let t = self.kv_type();
        match self {
            KvBuf::F16(v) => v.resize(values, f16::ZERO),
            KvBuf::Q8_0(b) | KvBuf::Q4_0(b) => b.resize(t.bytes(values), 0),
        }
    }

    /// Store `src` as values `at..at + src.len()`.
    pub fn write(&mut self, at: usize, src: &[f32]) {
        let t = self.kv_type();
        match self {
            // The slice conversion uses F16C where the CPU has it (eight at a time, the same
            // rounding).
            KvBuf::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            KvBuf::Q8_0(b) | KvBuf::Q4_0(b) => t.encode(src, &mut b[t.bytes(at)..t.bytes(at + src.len())]),
        }
    }

    /// Copy values `src` to start at value `dst` (whole blocks).
    pub fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        let t = self.kv_type();
        match self {
            KvBuf::F16(v) => v.copy_within(src, dst),
            KvBuf::Q8_0(b) | KvBuf::Q4_0(b) => b.copy_within(t.bytes(src.start)..t.bytes(src.end), t.bytes(dst)),
        }
    }

    /// Append the stored bytes of values `values` (whole blocks) to `out`, little-endian.
    pub fn save(&self, values: Range<usize>, out: &mut Vec<u8>) {
        let t = self.kv_type();
        match self {
            KvBuf::F16(v) => out.extend(v[values].iter().flat_map(|x| x.to_bits().to_le_bytes())),
            KvBuf::Q8_0(b) | KvBuf::Q4_0(b) => out.extend_from_slice(&b[t.bytes(values.start)..t.bytes(values.end)]),
        }
    }

    /// Store bytes `save` wrote as the values from `at` on; returns how many bytes it used.
    pub fn load(&mut self, at: usize, values: usize, bytes: &[u8]) -> usize {
        let t = self.kv_type();
        let n = t.bytes(values);
        match self {
            KvBuf::F16(v) => {
                for (x, b) in v[at..at + values].iter_mut().zip(bytes[..n].chunks_exact(2)) {
                    *x = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            KvBuf::Q8_0(b) | KvBuf::Q4_0(b) => b[t.bytes(at)..t.bytes(at + values)].copy_from_slice(&bytes[..n]),
        }
        n
    }

    /// The values as attention reads them.
    pub fn rows(&self) -> KvRows<'_> {
        match self {
            KvBuf::F16(v) => KvRows::F16(v),
            KvBuf::Q8_0(b) => KvRows::Q8_0(b),
            KvBuf::Q4_0(b) => KvRows::Q4_0(b),
        }
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        match self {
            KvBuf::F16(v) => std::mem::size_of_val(v.as_slice()),
            KvBuf::Q8_0(b) | KvBuf::Q4_0(b) => b.len(),
        }
    }
}

/// What the forward pass needs from the caches of the sequences in a batch.
pub trait KvStore: Sync {
    fn n_seqs(&self) -> usize;
    /// How the sequence's keys and values are stored.
    fn types(&self, seq: usize) -> KvTypes;
    /// Positions stored for a sequence (the next token goes at this position).
    fn len(&self, seq: usize) -> usize;
    /// Most positions the sequence may hold.
    fn capacity(&self, seq: usize) -> usize;
    /// Most tokens one forward pass may add to the sequence.
    fn max_batch(&self, seq: usize) -> usize;
    /// Make room for positions below `end`.
    fn reserve(&mut self, seq: usize, end: usize) -> Result<(), String>;
    /// Store the key and value rows of position `pos` in `layer`.
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]);
    /// The keys and values of `layer` (rows of n_kv_heads × head_dim floats) and the row ranges
    /// a query at `pos` attends to.
    fn view(&self, seq: usize, layer: usize, pos: usize, ranges: &mut Vec<Range<usize>>) -> (KvRows<'_>, KvRows<'_>);
    /// Record that `n` positions were added.
    fn advance(&mut self, seq: usize, n: usize);
}

#[derive(Clone, Debug)]
pub struct LayerKv {
    pub k: KvBuf,
    pub v: KvBuf,
    /// Ring size for sliding-window layers.
    pub ring: Option<usize>,
    /// Attention window (keys with query_pos - key_pos < window are visible).
    pub window: Option<usize>,
}

#[derive(Clone, Debug)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Floats per position per layer: n_kv_heads * head_dim.
    pub row: usize,
    /// Positions stored: the next token goes at position `len`.
    pub len: usize,
    /// Maximum positions (context length).
    pub n_ctx: usize,
    /// Most tokens one forward pass may add to this sequence.
    pub max_batch: usize,
    pub types: KvTypes,
}

/// Positions are allocated in steps of this many, so storage grows without per-token reallocation.
const GROW: usize = 256;

impl KvCache {
    /// `windows[l]` is layer l's sliding window (None = full attention); `types` must suit the
    /// head size (see [`KvTypes::check_head_dim`]).
    pub fn new(windows: &[Option<usize>], row: usize, n_ctx: usize, max_batch: usize, types: KvTypes) -> KvCache {
        let layers = windows
            .iter()
            .map(|&window| {
                let ring = window.map(|w| (w + max_batch).min(n_ctx));
                LayerKv { k: KvBuf::new(types.k, 0), v: KvBuf::new(types.v, 0), ring, window }
            })
            .collect();
        KvCache { layers, row, len: 0, n_ctx, max_batch, types }
    }

    /// Make room for positions up to `end` (exclusive).
    pub fn reserve(&mut self, end: usize) {
        let row = self.row;
        for l in &mut self.layers {
            let slots = match l.ring {
                Some(r) => r,
                None => end.div_ceil(GROW) * GROW,
            }
            .min(self.n_ctx.max(1));
            if l.k.len() < slots * row {
                l.k.resize(slots * row);
                l.v.resize(slots * row);
            }
        }
    }

    fn slot(l: &LayerKv, pos: usize) -> usize {
        match l.ring {
            Some(r) => pos % r,
            None => pos,
        }
    }

    /// Store the key and value rows of position `pos` in layer `layer`.
    pub fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let row = self.row;
        let l = &mut self.layers[layer];
        let s = Self::slot(l, pos);
        l.k.write(s * row, k);
        l.v.write(s * row, v);
    }

    /// The slot ranges a query at `pos` attends to in `layer` (causal, windowed where the layer is).
    pub fn visible(&self, layer: usize, pos: usize, out: &mut Vec<std::ops::Range<usize>>) {
        out.clear();
        let l = &self.layers[layer];
        let first = match l.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        match l.ring {
            None => out.push(first..pos + 1),
            Some(r) => {
                let (a, b) = (first % r, pos % r);
                if pos + 1 - first >= r {
                    out.push(0..r);
                } else if a <= b {
                    out.push(a..b + 1);
                } else {
                    out.push(a..r);
                    out.push(0..b + 1);
                }
            }
        }
    }

    /// Forget positions from `len` on (for rollback). Sliding-window layers can only go back as
    /// far as their ring still holds the window: at most `max_batch` positions.
    pub fn truncate(&mut self, len: usize) -> Result<(), String> {
        if len > self.len {
            return Err(format!("cannot truncate a cache of {} positions to {len}", self.len));
        }
        if self.layers.iter().any(|l| l.ring.is_some()) && self.len - len > self.max_batch {
            return Err(format!("sliding-window layers can roll back at most {} positions", self.max_batch));
        }
        self.len = len;
        Ok(())
    }

    /// Append the keys and values of positions `first..first + BLOCK_SIZE` to `out`, laid out as
    /// [`BlockPool::save_block`] lays out a block (so either store reads what the other wrote).
    /// False, with nothing written, when the positions are not all stored (sliding-window layers
    /// keep only their ring: save a block right after computing it).
    pub fn save_block(&self, first: usize, out: &mut Vec<u8>) -> bool {
        // A ring slot keeps position p until position p + ring is written.
        if self.layers.iter().any(|l| l.ring.is_some_and(|r| self.len > first + r)) || first + BLOCK_SIZE > self.len {
            return false;
        }
        let row = self.row;
        for l in &self.layers {
            for buf in [&l.k, &l.v] {
                for p in first..first + BLOCK_SIZE {
                    let s = Self::slot(l, p);
                    buf.save(s * row..(s + 1) * row, out);
                }
            }
        }
        true
    }

    /// Store a block [`save_block`] wrote as positions `first..first + BLOCK_SIZE` (the caller
    /// sets `len`); false, with nothing changed, when `bytes` is not one block's worth.
    ///
    /// [`save_block`]: KvCache::save_block
    pub fn load_block(&mut self, first: usize, bytes: &[u8]) -> bool {
        if bytes.len() != BlockPool::block_bytes(self.layers.len(), self.row, self.types) || first + BLOCK_SIZE > self.n_ctx {
            return false;
        }
        self.reserve(first + BLOCK_SIZE);
        let (row, mut used) = (self.row, 0);
        for l in &mut self.layers {
            let ring = l.ring;
            for buf in [&mut l.k, &mut l.v] {
                for p in first..first + BLOCK_SIZE {
                    let s = ring.map_or(p, |r| p % r);
                    used += buf.load(s * row, row, &bytes[used..]);
                }
            }
        }
        true
    }

    /// Bytes of KV storage currently allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.bytes() + l.v.bytes()).sum()
    }
}

impl KvStore for [KvCache] {
    fn n_seqs(&self) -> usize {
        self.len()
    }
    fn types(&self, seq: usize) -> KvTypes {
        self[seq].types
    }
    fn len(&self, seq: usize) -> usize {
        self[seq].len
    }
    fn capacity(&self, seq: usize) -> usize {
        self[seq].n_ctx
    }
    fn max_batch(&self, seq: usize) -> usize {
        self[seq].max_batch
    }
    fn reserve(&mut self, seq: usize, end: usize) -> Result<(), String> {
        self[seq].reserve(end);
        Ok(())
    }
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self[seq].write(layer, pos, k, v)
    }
    fn view(&self, seq: usize, layer: usize, pos: usize, ranges: &mut Vec<Range<usize>>) -> (KvRows<'_>, KvRows<'_>) {
        let c = &self[seq];
        c.visible(layer, pos, ranges);
        (c.layers[layer].k.rows(), c.layers[layer].v.rows())
    }
    fn advance(&mut self, seq: usize, n: usize) {
        self[seq].len += n;
    }
}

impl KvStore for Vec<KvCache> {
    fn n_seqs(&self) -> usize {
        self.as_slice().n_seqs()
    }
    fn types(&self, seq: usize) -> KvTypes {
        self.as_slice().types(seq)
    }
    fn len(&self, seq: usize) -> usize {
        KvStore::len(self.as_slice(), seq)
    }
    fn capacity(&self, seq: usize) -> usize {
        self.as_slice().capacity(seq)
    }
    fn max_batch(&self, seq: usize) -> usize {
        self.as_slice().max_batch(seq)
    }
    fn reserve(&mut self, seq: usize, end: usize) -> Result<(), String> {
        self.as_mut_slice().reserve(seq, end)
    }
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        self.as_mut_slice().write(seq, layer, pos, k, v)
    }
    fn view(&self, seq: usize, layer: usize, pos: usize, ranges: &mut Vec<Range<usize>>) -> (KvRows<'_>, KvRows<'_>) {
        self.as_slice().view(seq, layer, pos, ranges)
    }
    fn advance(&mut self, seq: usize, n: usize) {
        self.as_mut_slice().advance(seq, n)
    }
}

/// Positions per block of a [`BlockPool`].
pub const BLOCK_SIZE: usize = 16;

/// Fixed-size blocks of KV storage shared by many sequences. Block `b` holds positions in rows
/// `b * BLOCK_SIZE .. (b + 1) * BLOCK_SIZE` of every layer's key and value arrays, so a
/// sequence's positions are found through its block table. Sliding-window layers store every
/// position too (blocks may be shared by later requests whose windows need them).
pub struct BlockPool {
    pub n_blocks: usize,
    row: usize,
    pub types: KvTypes,
    k: Vec<KvBuf>,
    v: Vec<KvBuf>,
    windows: Vec<Option<usize>>,
}

impl BlockPool {
    /// `windows[l]`: layer l's sliding window; `row`: values per position per layer; `types`
    /// must suit the head size (see [`KvTypes::check_head_dim`]).
    pub fn new(windows: &[Option<usize>], row: usize, n_blocks: usize, types: KvTypes) -> BlockPool {
        let size = n_blocks * BLOCK_SIZE * row;
        BlockPool {
            n_blocks,
            row,
            types,
            k: windows.iter().map(|_| KvBuf::new(types.k, size)).collect(),
            v: windows.iter().map(|_| KvBuf::new(types.v, size)).collect(),
            windows: windows.to_vec(),
        }
    }

    /// Copy the keys and values of the first `n` positions of block `src` into block `dst`, in
    /// every layer (a request reusing part of a cached block gets its own copy to extend).
    pub fn copy_positions(&mut self, src: u32, dst: u32, n: usize) {
        let n = n.min(BLOCK_SIZE);
        let (s, d) = (src as usize * BLOCK_SIZE * self.row, dst as usize * BLOCK_SIZE * self.row);
        for layer in self.k.iter_mut().chain(self.v.iter_mut()) {
            layer.copy_within(s..s + n * self.row, d);
        }
    }

    /// Append block `b`'s keys and values, every layer, to `out` (what [`load_block`] reads).
    ///
    /// [`load_block`]: BlockPool::load_block
    pub fn save_block(&self, b: u32, out: &mut Vec<u8>) {
        let at = b as usize * BLOCK_SIZE * self.row;
        for layer in self.k.iter().zip(&self.v) {
            layer.0.save(at..at + BLOCK_SIZE * self.row, out);
            layer.1.save(at..at + BLOCK_SIZE * self.row, out);
        }
    }

    /// Fill block `b` from bytes [`save_block`] wrote with the same layout; false (and the block
    /// left as it was) when `bytes` is not exactly one block's worth.
    ///
    /// [`save_block`]: BlockPool::save_block
    pub fn load_block(&mut self, b: u32, bytes: &[u8]) -> bool {
        if bytes.len() != Self::block_bytes(self.k.len(), self.row, self.types) {
            return false;
        }
        let (at, n) = (b as usize * BLOCK_SIZE * self.row, BLOCK_SIZE * self.row);
        let mut used = 0;
        for (k, v) in self.k.iter_mut().zip(self.v.iter_mut()) {
            used += k.load(at, n, &bytes[used..]);
            used += v.load(at, n, &bytes[used..]);
        }
        true
    }

    /// Bytes one block takes (all layers, keys and values).
    pub fn block_bytes(layers: usize, row: usize, types: KvTypes) -> usize {
        layers * BLOCK_SIZE * types.bytes_per_row(row)
    }
}

/// One sequence of a [`PagedKv`]: its block table, positions stored, and limits.
pub struct PagedSeq<'a> {
    pub blocks: &'a [u32],
    pub len: usize,
    pub capacity: usize,
    pub max_batch: usize,
}

/// Sequences whose caches are block tables into one pool.
pub struct PagedKv<'a> {
    pub pool: &'a mut BlockPool,
    pub seqs: Vec<PagedSeq<'a>>,
}

impl KvStore for PagedKv<'_> {
    fn n_seqs(&self) -> usize {
        self.seqs.len()
    }
    fn types(&self, _seq: usize) -> KvTypes {
        self.pool.types
    }
    fn len(&self, seq: usize) -> usize {
        self.seqs[seq].len
    }
    fn capacity(&self, seq: usize) -> usize {
        self.seqs[seq].capacity
    }
    fn max_batch(&self, seq: usize) -> usize {
        self.seqs[seq].max_batch
    }
    fn reserve(&mut self, seq: usize, end: usize) -> Result<(), String> {
        let have = self.seqs[seq].blocks.len() * BLOCK_SIZE;
        if end > have {
            return Err(format!("sequence {seq} has blocks for {have} positions, {end} needed"));
        }
        Ok(())
    }
    fn write(&mut self, seq: usize, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let row = self.pool.row;
        let slot = self.seqs[seq].blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE;
        self.pool.k[layer].write(slot * row, k);
        self.pool.v[layer].write(slot * row, v);
    }
    fn view(&self, seq: usize, layer: usize, pos: usize, ranges: &mut Vec<Range<usize>>) -> (KvRows<'_>, KvRows<'_>) {
        ranges.clear();
        let first = match self.pool.windows[layer] {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        };
        let blocks = self.seqs[seq].blocks;
        let mut p = first;
        while p <= pos {
            let end = ((p / BLOCK_SIZE + 1) * BLOCK_SIZE).min(pos + 1);
            let base = blocks[p / BLOCK_SIZE] as usize * BLOCK_SIZE;
            let r = base + p % BLOCK_SIZE..base + (end - 1) % BLOCK_SIZE + 1;
            // Merge with the previous range when blocks happen to be adjacent.
            match ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => ranges.push(r),
            }
            p = end;
        }
        (self.pool.k[layer].rows(), self.pool.v[layer].rows())
    }
    fn advance(&mut self, seq: usize, n: usize) {
        self.seqs[seq].len += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_ring_covers_exactly_the_window() {
        let mut c = KvCache::new(&[None, Some(4)], 1, 100, 2, KvTypes::default());
        c.reserve(20);
        let mut r = Vec::new();
        c.visible(0, 9, &mut r);
        assert_eq!(r, vec![0..10]);
        c.visible(1, 2, &mut r);
        assert_eq!(r, vec![0..3]);
        c.visible(1, 9, &mut r); // positions 6..=9, ring of 6 slots: 0, 1, 2, 3 -> slots 0..4
        assert_eq!(r, vec![0..4]);
        c.visible(1, 7, &mut r); // positions 4..=7 -> slots 4, 5, 0, 1
        assert_eq!(r, vec![4..6, 0..2]);
        // Each position written lands where `visible` looks for it.
        for pos in 0..20 {
            c.write(1, pos, &[pos as f32], &[0.0]);
            c.visible(1, pos, &mut r);
            let seen: Vec<f32> = r.iter().flat_map(|s| s.clone()).map(|s| match &c.layers[1].k {
                KvBuf::F16(k) => k[s].to_f32(),
                _ => unreachable!("an f16 cache"),
            }).collect();
            let mut want: Vec<f32> = ((pos + 1).saturating_sub(4)..=pos).map(|p| p as f32).collect();
            let mut got = seen.clone();
            got.sort_by(f32::total_cmp);
            want.sort_by(f32::total_cmp);
            assert_eq!(got, want, "pos {pos}");
        }
    }
}
