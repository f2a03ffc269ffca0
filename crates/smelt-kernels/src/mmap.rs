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

/// Zeroed anonymous memory for weights rewritten at load, in transparent huge pages where the
/// system allows them (`madvise` mode or `always`): decoding streams every weight on every
/// token, and with 4 KiB pages that is a TLB miss every 4 KiB (PERF.md, item 20).
pub struct AnonymousBuffer {
    map: memmap2::MmapMut,
    /// Where the buffer starts within `map`: the first 2 MiB boundary, so huge pages cover it.
    start: usize,
    len: usize,
}

const HUGE_PAGE: usize = 2 << 20;

impl AnonymousBuffer {
    pub fn new(len: usize) -> std::io::Result<AnonymousBuffer> {
        let len = len.max(1);
        // Large buffers are mapped with room to start on a huge-page boundary; the unused
        // head and tail are never touched, so they take no memory.
        let extra = if len >= HUGE_PAGE { HUGE_PAGE } else { 0 };
        let map = memmap2::MmapMut::map_anon(len + extra)?;
        let addr = map.as_ptr() as usize;
        let start = if extra > 0 { addr.next_multiple_of(HUGE_PAGE) - addr } else { 0 };
        #[cfg(target_os = "linux")]
        if extra > 0 {
            // Only a hint: without huge pages the buffer works the same, just slower to stream.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(AnonymousBuffer { map, start, len })
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_buffers_are_zeroed_writable_and_large_ones_huge_page_aligned() {
        for len in [1, 4095, HUGE_PAGE - 1, HUGE_PAGE, 3 * HUGE_PAGE + 17] {
            let mut b = AnonymousBuffer::new(len).unwrap();
            assert_eq!(b.bytes().len(), len);
            assert!(b.bytes().iter().all(|&x| x == 0));
            b.bytes_mut()[len - 1] = 7;
            assert_eq!(b.bytes()[len - 1], 7);
            if len >= HUGE_PAGE {
                assert_eq!(b.bytes().as_ptr() as usize % HUGE_PAGE, 0);
            }
        }
    }
}
