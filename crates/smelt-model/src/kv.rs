//! The per-sequence KV cache.
//!
//! A sequence's tokens occupy positions 0..len. Full-attention layers keep every position (slot =
//! position, storage grown on demand). Sliding-window layers keep a ring of `window + max_batch`
//! slots (slot = position mod ring): enough for the window of every query in a batch, and for
//! rolling back up to `max_batch` positions.

#[derive(Clone, Debug)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
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
}

/// Positions are allocated in steps of this many, so storage grows without per-token reallocation.
const GROW: usize = 256;

impl KvCache {
    /// `windows[l]` is layer l's sliding window (None = full attention).
    pub fn new(windows: &[Option<usize>], row: usize, n_ctx: usize, max_batch: usize) -> KvCache {
        let layers = windows
            .iter()
            .map(|&window| {
                let ring = window.map(|w| (w + max_batch).min(n_ctx));
                LayerKv { k: Vec::new(), v: Vec::new(), ring, window }
            })
            .collect();
        KvCache { layers, row, len: 0, n_ctx, max_batch }
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
                l.k.resize(slots * row, 0.0);
                l.v.resize(slots * row, 0.0);
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
        // Keys and values are kept at f16 precision, as llama.cpp's default cache does.
        for (d, &x) in l.k[s * row..(s + 1) * row].iter_mut().zip(k) {
            *d = half::f16::from_f32(x).to_f32();
        }
        for (d, &x) in l.v[s * row..(s + 1) * row].iter_mut().zip(v) {
            *d = half::f16::from_f32(x).to_f32();
        }
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

    /// Bytes of KV storage currently allocated.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_ring_covers_exactly_the_window() {
        let mut c = KvCache::new(&[None, Some(4)], 1, 100, 2);
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
            let seen: Vec<f32> = r.iter().flat_map(|s| s.clone()).map(|s| c.layers[1].k[s]).collect();
            let mut want: Vec<f32> = ((pos + 1).saturating_sub(4)..=pos).map(|p| p as f32).collect();
            let mut got = seen.clone();
            got.sort_by(f32::total_cmp);
            want.sort_by(f32::total_cmp);
            assert_eq!(got, want, "pos {pos}");
        }
    }
}
