//! Read-only memory-mapped files: model weights are used in place, except where a matrix is
//! rewritten in a faster layout at load (and its file pages then released).

use std::fs::File;
use std::path::Path;

pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> std::io::Result<MappedFile> {
        let file = File::open(path)?;
        // SAFETY: the map is read-only and private to this process. Another process truncating or
        // rewriting the file while it is mapped could change what we read (or fault); model files
        // are treated as immutable, as llama.cpp and every other mmap-based loader do.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        #[cfg(unix)]
        {
            // Weights are read front to back on every token; let the kernel read ahead.
            let _ = map.advise(memmap2::Advice::WillNeed);
        }
        Ok(MappedFile { map })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Say that the pages within `offset..offset + len` are no longer needed (weights that were
    /// copied elsewhere): they leave the resident set; reading them again loads them back from
    /// the file.
    pub fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            let start = offset.next_multiple_of(4096);
            let end = (offset + len) / 4096 * 4096;
            if end > start && end <= self.map.len() {
                // SAFETY: the map is read-only and never written, so it holds no private copies:
                // MADV_DONTNEED only drops page-table entries, and a later read faults the file's
                // (unchanged) bytes back in.
                let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }
}

/// Zeroed anonymous memory for weights rewritten at load. (Asking for transparent huge pages
/// made no measurable difference to loading or decoding here, and can stall page faults on
/// compaction where memory is fragmented, so it does not.)
pub struct AnonymousBuffer {
    map: memmap2::MmapMut,
}

impl AnonymousBuffer {
    pub fn new(len: usize) -> std::io::Result<AnonymousBuffer> {
        Ok(AnonymousBuffer { map: memmap2::MmapMut::map_anon(len.max(1))? })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }
}
