//! Tokens of recently tokenized words, shared by every caller of a tokenizer.
//!
//! Prompts repeat: a long document asked a second question, a system prompt on every request.
//! Merging a word costs tens of lookups in a vocabulary table of several megabytes (cache
//! misses, right after a forward pass has streamed the weights); a word seen before costs one
//! lookup in this much smaller map. Words are only cached where they tokenize independently of
//! their neighbours, so a hit gives exactly what merging would.

use super::FastMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Words kept before the cache starts over (a few MB at most).
const MAX_WORDS: usize = 1 << 15;
/// Longer words are merged every time (rare, and each would pin more memory).
const MAX_WORD_BYTES: usize = 64;

#[derive(Debug, Default)]
pub struct WordCache {
    map: Mutex<FastMap<Box<str>, Box<[u32]>>>,
    /// Approximate heap bytes held by the map's keys and values (for `/metrics`).
    bytes: AtomicUsize,
}

/// Heap bytes one entry costs, counting the two allocations' payloads and the table slot.
fn entry_bytes(word: &str, ids: &[u32]) -> usize {
    word.len() + 4 * ids.len() + 2 * std::mem::size_of::<usize>() * 2 + 8
}

impl WordCache {
    /// Append the tokens of `word` to `out`: from the cache, or from `merge`, whose result
    /// is then cached.
    pub fn tokens(&self, word: &str, out: &mut Vec<u32>, merge: impl FnOnce(&str, &mut Vec<u32>)) {
        if word.len() > MAX_WORD_BYTES {
            merge(word, out);
            return;
        }
        if let Some(ids) = self.lock().get(word) {
            out.extend_from_slice(ids);
            return;
        }
        let at = out.len();
        merge(word, out);
        let mut map = self.lock();
        if map.len() >= MAX_WORDS {
            map.clear();
            self.bytes.store(0, Ordering::Relaxed);
        }
        if map.insert(word.into(), out[at..].into()).is_none() {
            self.bytes.fetch_add(entry_bytes(word, &out[at..]), Ordering::Relaxed);
        }
    }

    /// Approximate bytes held; bounded by `MAX_WORDS` entries of at most `MAX_WORD_BYTES`.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, FastMap<Box<str>, Box<[u32]>>> {
        // A panic elsewhere cannot leave the map half-written: inserts are single calls.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
