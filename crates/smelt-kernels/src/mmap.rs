//! Read-only memory-mapped files: model weights are used in place, never copied on load.

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
}
