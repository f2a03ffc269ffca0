//! Token text → id, laid out so a lookup touches one cache line.
//!
//! Tokenizing looks up every candidate merge's text (tens of thousands of lookups for a 10 KB
//! prompt), and in a server the table has just been pushed out of the caches by a forward pass
//! over the weights. A `HashMap<String, u32>` costs a control-byte line, a bucket line and the
//! key's heap allocation per hit. Here a slot holds the text's length and first eight bytes next
//! to the id, so texts of up to eight bytes (most candidates) are decided by the slot alone;
//! longer ones compare the rest against one shared buffer.

/// One open-addressing slot; `len == 0` marks it empty (token texts are never empty).
#[derive(Clone, Copy, Default, Debug)]
struct Slot {
    head: u64,
    len: u32,
    id: u32,
}

#[derive(Debug)]
pub struct TextIndex {
    slots: Vec<Slot>,
    mask: usize,
    /// Bytes 8.. of every text longer than eight bytes, back to back.
    tails: Vec<u8>,
    /// Where each id's tail starts in `tails`.
    tail_at: Vec<u32>,
}

/// The first eight bytes, zero-padded, as one word.
#[inline]
fn head_of(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = b.len().min(8);
    w[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(w)
}

/// SplitMix64's finalizer: every input bit affects every output bit.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[inline]
fn hash(b: &[u8]) -> u64 {
    let mut h = mix(head_of(b) ^ (b.len() as u64).rotate_right(8));
    if b.len() > 8 {
        for chunk in b[8..].chunks(8) {
            h = mix(h ^ head_of(chunk));
        }
    }
    h
}

impl TextIndex {
    /// Index `texts` by content; where a text repeats, the later id wins (as llama.cpp does).
    pub fn new(texts: &[String]) -> TextIndex {
        let cap = (texts.len() * 2).next_power_of_two().max(16);
        let mut ix = TextIndex { slots: vec![Slot::default(); cap], mask: cap - 1, tails: Vec::new(), tail_at: vec![0; texts.len()] };
        for (id, t) in texts.iter().enumerate() {
            let b = t.as_bytes();
            if b.is_empty() || b.len() > u32::MAX as usize {
                continue;
            }
            if b.len() > 8 {
                ix.tail_at[id] = ix.tails.len() as u32;
                ix.tails.extend_from_slice(&b[8..]);
            }
            let i = ix.find(b);
            ix.slots[i] = Slot { head: head_of(b), len: b.len() as u32, id: id as u32 };
        }
        ix
    }

    /// The slot holding `b`, or the empty slot where it would go.
    #[inline]
    fn find(&self, b: &[u8]) -> usize {
        let head = head_of(b);
        let mut i = hash(b) as usize & self.mask;
        loop {
            let s = self.slots[i];
            if s.len == 0 || (s.head == head && s.len as usize == b.len() && (b.len() <= 8 || self.tail(s) == &b[8..])) {
                return i;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn tail(&self, s: Slot) -> &[u8] {
        let at = self.tail_at[s.id as usize] as usize;
        &self.tails[at..at + s.len as usize - 8]
    }

    /// The id of the token whose text is exactly `text`.
    #[inline]
    pub fn get(&self, text: &str) -> Option<u32> {
        let b = text.as_bytes();
        if b.is_empty() {
            return None;
        }
        let s = self.slots[self.find(b)];
        (s.len != 0).then_some(s.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn finds_what_a_hash_map_finds() {
        // Texts of every length around the eight-byte boundary, repeats included, and probes
        // that share heads, lengths or tails with them.
        let mut seed = 0x1234_5678u64;
        let mut next = move || {
            seed = mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
            seed
        };
        let alphabet = ["a", "b", "▁", "é", "<", ">", "0"];
        let texts: Vec<String> = (0..5000)
            .map(|_| {
                let n = 1 + next() as usize % 14;
                (0..n).map(|_| alphabet[next() as usize % alphabet.len()]).collect()
            })
            .collect();
        let ix = TextIndex::new(&texts);
        let mut want = HashMap::new();
        for (i, t) in texts.iter().enumerate() {
            want.insert(t.clone(), i as u32);
        }
        for t in &texts {
            assert_eq!(ix.get(t), want.get(t).copied(), "{t:?}");
        }
        for _ in 0..20000 {
            let n = next() as usize % 16;
            let probe: String = (0..n).map(|_| alphabet[next() as usize % alphabet.len()]).collect();
            assert_eq!(ix.get(&probe), want.get(&probe).copied(), "{probe:?}");
        }
        assert_eq!(ix.get(""), None);
    }
}
