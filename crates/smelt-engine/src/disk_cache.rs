//! The persistent prefix cache: full KV blocks kept on disk, so a prompt processed once is not
//! processed again, not even after a restart.
//!
//! A block's file is named by its prefix hash (the chain of block hashes the in-memory prefix
//! cache uses, rooted at the adapters' key) inside a directory named by the model's namespace: a
//! digest of the model file, the KV types and the block layout. So KV computed for another
//! model file, adapter or cache type never matches. Each file holds its parent's hash, its
//! tokens, the block's bytes and a checksum over all of it; a file that is damaged, truncated or
//! does not match what the prompt asks for is ignored (with a warning) and deleted, never used.
//! Files are written to a temporary name and renamed, so a crash leaves no half-written block.
//! The directory is kept within a byte budget, least recently used files first (file times
//! carry the order across restarts).

use smelt_model::kv::{KvTypes, BLOCK_SIZE};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Bumped whenever the bytes of a block change meaning (layout, rotation, quantization).
const FORMAT: u64 = 1;
const MAGIC: &[u8; 8] = b"SMELTKV1";

/// (namespace, block hash)
type Key = (u64, u64);

#[derive(Default)]
struct Index {
    /// Size and last use of every file.
    files: HashMap<Key, (u64, u64)>,
    lru: BTreeMap<u64, Key>,
    tick: u64,
    total: u64,
}

impl Index {
    fn touch(&mut self, key: Key, size: u64) {
        self.tick += 1;
        if let Some((old_size, old_tick)) = self.files.insert(key, (size, self.tick)) {
            self.lru.remove(&old_tick);
            self.total -= old_size;
        }
        self.lru.insert(self.tick, key);
        self.total += size;
    }

    fn remove(&mut self, key: Key) {
        if let Some((size, tick)) = self.files.remove(&key) {
            self.lru.remove(&tick);
            self.total -= size;
        }
    }
}

/// Counters for the metrics.
#[derive(Default)]
pub struct DiskStats {
    /// Blocks read back and used.
    pub read_blocks: AtomicU64,
    pub written_blocks: AtomicU64,
    /// Files found damaged or not matching, deleted.
    pub rejected_blocks: AtomicU64,
    /// Files deleted to stay within the budget.
    pub evicted_blocks: AtomicU64,
}

pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    index: Mutex<Index>,
    pub stats: DiskStats,
    /// A failed write is reported once, not for every block.
    write_failed: AtomicBool,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskCache({}, {} bytes)", self.dir.display(), self.budget)
    }
}

/// What identifies a block besides its bytes: the hash of the block before it (or the chain's
/// root), its own hash and its tokens.
pub struct BlockId<'a> {
    pub parent: u64,
    pub hash: u64,
    pub tokens: &'a [u32],
}

fn checksum(bytes: &[u8]) -> u64 {
    smelt_model::gguf::mix_bytes(0xcbf2_9ce4_8422_2325, bytes) ^ (bytes.len() as u64).wrapping_mul(0xff51_afd7_ed55_8ccd)
}

/// A file's bytes before the payload: magic, parent, hash, token count, tokens, payload length.
fn header(id: &BlockId, payload_len: usize) -> Vec<u8> {
    let mut h = Vec::with_capacity(32 + 4 * id.tokens.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&id.parent.to_le_bytes());
    h.extend_from_slice(&id.hash.to_le_bytes());
    h.extend_from_slice(&(id.tokens.len() as u32).to_le_bytes());
    for t in id.tokens {
        h.extend_from_slice(&t.to_le_bytes());
    }
    h.extend_from_slice(&(payload_len as u64).to_le_bytes());
    h
}

fn parse_hex(s: &str) -> Option<u64> {
    (s.len() == 16).then(|| u64::from_str_radix(s, 16).ok()).flatten()
}

impl DiskCache {
    /// Open (creating) `dir`, index the blocks already there and trim them to `budget` bytes.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for ns_dir in std::fs::read_dir(dir)? {
            let ns_dir = ns_dir?;
            let Some(ns) = ns_dir.file_name().to_str().and_then(parse_hex) else { continue };
            if !ns_dir.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(ns_dir.path())? {
                let f = f?;
                let name = f.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.ends_with(".tmp") {
                    // Left by a writer that died before renaming.
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let Some(hash) = name.strip_suffix(".kv").and_then(parse_hex) else { continue };
                let meta = f.metadata()?;
                let used = meta.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH);
                found.push((used, (ns, hash), meta.len()));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, key, size) in found {
            index.touch(key, size);
        }
        let cache = DiskCache { dir: dir.to_path_buf(), budget, index: Mutex::new(index), stats: DiskStats::default(), write_failed: AtomicBool::new(false) };
        cache.trim(None);
        Ok(cache)
    }

    /// The namespace of a model's blocks: its file's digest, its KV types and the block layout.
    pub fn namespace(model_digest: u64, types: KvTypes, layers: usize, row: usize) -> u64 {
        let mut bytes = Vec::new();
        for v in [FORMAT, model_digest, layers as u64, row as u64, BLOCK_SIZE as u64] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(format!("k {} v {}", types.k.name(), types.v.name()).as_bytes());
        checksum(&bytes)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, (ns, hash): Key) -> PathBuf {
        self.dir.join(format!("{ns:016x}")).join(format!("{hash:016x}.kv"))
    }

    pub fn contains(&self, ns: u64, hash: u64) -> bool {
        self.index().files.contains_key(&(ns, hash))
    }

    /// Bytes and files on disk.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.index();
        (index.total, index.files.len())
    }

    /// Write a block unless it is already there. Failures (a full disk, a read-only directory)
    /// are reported once and otherwise ignored: the cache is an optimisation.
    pub fn put(&self, ns: u64, id: &BlockId, payload: &[u8]) {
        let key = (ns, id.hash);
        if self.contains(ns, id.hash) {
            return;
        }
        let mut bytes = header(id, payload.len());
        bytes.reserve(payload.len() + 8);
        bytes.extend_from_slice(payload);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        let path = self.path(key);
        let written = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().expect("a namespace directory"))?;
            static TMP: AtomicU64 = AtomicU64::new(0);
            let tmp = path.with_extension(format!("{}.{}.tmp", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            drop(f);
            std::fs::rename(&tmp, &path).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        })();
        match written {
            Ok(()) => {
                self.index().touch(key, bytes.len() as u64);
                self.stats.written_blocks.fetch_add(1, Ordering::Relaxed);
                self.trim(Some(key));
            }
            Err(e) => {
                if !self.write_failed.swap(true, Ordering::Relaxed) {
                    eprintln!("warning: cannot write the KV disk cache in {}: {e}; blocks stay in memory only", self.dir.display());
                }
            }
        }
    }

    /// The bytes of the block `id` names, if a file holds exactly that block (`payload_len`
    /// bytes, the same parent and tokens, an intact checksum). A file that does not is deleted.
    pub fn get(&self, ns: u64, id: &BlockId, payload_len: usize) -> Option<Vec<u8>> {
        let key = (ns, id.hash);
        let size = self.index().files.get(&key)?.0;
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => return self.reject(key, &path, &e.to_string()),
        };
        let want = header(id, payload_len);
        if bytes.len() != want.len() + payload_len + 8 {
            return self.reject(key, &path, &format!("{} bytes, expected {}", bytes.len(), want.len() + payload_len + 8));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if checksum(body) != u64::from_le_bytes(sum.try_into().expect("8 bytes")) {
            return self.reject(key, &path, "checksum mismatch");
        }
        if body[..want.len()] != want[..] {
            return self.reject(key, &path, "it holds another block (different tokens or parent)");
        }
        // Recently used: kept longest, here and (by its file time) after a restart.
        self.index().touch(key, size);
        if let Ok(f) = std::fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        self.stats.read_blocks.fetch_add(1, Ordering::Relaxed);
        Some(body[want.len()..].to_vec())
    }

    fn reject(&self, key: Key, path: &Path, why: &str) -> Option<Vec<u8>> {
        eprintln!("warning: ignoring the damaged KV cache file {}: {why}; it is deleted", path.display());
        let _ = std::fs::remove_file(path);
        self.index().remove(key);
        self.stats.rejected_blocks.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Delete least recently used files until the total fits the budget (`keep` last: the block
    /// just written goes only if it alone is over the budget).
    fn trim(&self, keep: Option<Key>) {
        loop {
            let victim = {
                let index = self.index();
                if index.total <= self.budget {
                    return;
                }
                let mut oldest = index.lru.values().copied();
                match oldest.find(|k| Some(*k) != keep).or(keep) {
                    Some(k) => k,
                    None => return,
                }
            };
            let _ = std::fs::remove_file(self.path(victim));
            self.index().remove(victim);
            self.stats.evicted_blocks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(i: u32) -> (Vec<u32>, Vec<u8>) {
        let tokens: Vec<u32> = (0..BLOCK_SIZE as u32).map(|t| t * 7 + i).collect();
        let payload: Vec<u8> = (0..1000u32).map(|b| (b * 31 + i) as u8).collect();
        (tokens, payload)
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("smelt-disk-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn blocks_round_trip_and_survive_reopening() {
        let dir = tmpdir("roundtrip");
        let c = DiskCache::open(&dir, 1 << 30).unwrap();
        let (tokens, payload) = block(1);
        let id = BlockId { parent: 5, hash: 77, tokens: &tokens };
        assert!(c.get(9, &id, payload.len()).is_none());
        c.put(9, &id, &payload);
        assert!(c.contains(9, 77) && !c.contains(8, 77));
        assert_eq!(c.get(9, &id, payload.len()).unwrap(), payload);
        drop(c);
        let c = DiskCache::open(&dir, 1 << 30).unwrap();
        assert_eq!(c.usage().1, 1);
        assert_eq!(c.get(9, &id, payload.len()).unwrap(), payload);
        // Asked for with other tokens, another parent or another size: not used, and deleted.
        let (other, _) = block(2);
        assert!(c.get(9, &BlockId { parent: 5, hash: 77, tokens: &other }, payload.len()).is_none());
        assert!(!c.contains(9, 77));
        assert_eq!(c.stats.rejected_blocks.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damaged_files_are_rejected_and_deleted() {
        let dir = tmpdir("damage");
        let c = DiskCache::open(&dir, 1 << 30).unwrap();
        let blocks: Vec<_> = (0..3).map(block).collect();
        for (i, (t, p)) in blocks.iter().enumerate() {
            c.put(1, &BlockId { parent: 0, hash: i as u64, tokens: t }, p);
        }
        drop(c);
        // One byte flipped, one file truncated, one left alone.
        let p0 = dir.join(format!("{:016x}/{:016x}.kv", 1, 0));
        let mut b = std::fs::read(&p0).unwrap();
        b[500] ^= 0x40;
        std::fs::write(&p0, &b).unwrap();
        let p1 = dir.join(format!("{:016x}/{:016x}.kv", 1, 1));
        let b = std::fs::read(&p1).unwrap();
        std::fs::write(&p1, &b[..b.len() / 2]).unwrap();
        // A leftover temporary file is cleaned up.
        std::fs::write(dir.join(format!("{:016x}/x.tmp", 1)), b"partial").unwrap();
        let c = DiskCache::open(&dir, 1 << 30).unwrap();
        let get = |i: usize| c.get(1, &BlockId { parent: 0, hash: i as u64, tokens: &blocks[i].0 }, blocks[i].1.len());
        assert!(get(0).is_none() && get(1).is_none());
        assert_eq!(get(2).unwrap(), blocks[2].1);
        assert!(!p0.exists() && !p1.exists() && !dir.join(format!("{:016x}/x.tmp", 1)).exists());
        assert_eq!(c.usage().1, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_budget_evicts_least_recently_used_files() {
        let dir = tmpdir("budget");
        let (tokens, payload) = block(0);
        let c = DiskCache::open(&dir, 1 << 30).unwrap();
        c.put(1, &BlockId { parent: 0, hash: 0, tokens: &tokens }, &payload);
        let one = c.usage().0;
        drop(c);
        let c = DiskCache::open(&dir, 3 * one).unwrap();
        for h in 1..3 {
            c.put(1, &BlockId { parent: 0, hash: h, tokens: &tokens }, &payload);
        }
        // Block 0 used again: block 1 is now the oldest and goes when block 3 arrives.
        assert!(c.get(1, &BlockId { parent: 0, hash: 0, tokens: &tokens }, payload.len()).is_some());
        c.put(1, &BlockId { parent: 0, hash: 3, tokens: &tokens }, &payload);
        assert_eq!(c.usage(), (3 * one, 3));
        assert!(c.contains(1, 0) && !c.contains(1, 1) && c.contains(1, 2) && c.contains(1, 3));
        assert!(!dir.join(format!("{:016x}/{:016x}.kv", 1, 1)).exists());
        // A budget below one block keeps nothing.
        drop(c);
        let c = DiskCache::open(&dir, one - 1).unwrap();
        assert_eq!(c.usage(), (0, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
