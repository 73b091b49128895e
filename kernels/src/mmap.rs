//! Read-only memory maps of model files, for the checkpoint readers (safetensors, GGUF), which
//! then need no `unsafe` of their own.

use std::fs::File;

pub use memmap2::Mmap;

/// Map `file` read-only.
///
/// A model file must not be modified while it is mapped: another process truncating or
/// rewriting it would change (or unmap) the bytes under the map. Every reader of memory-mapped
/// model files (llama.cpp, safetensors) makes the same assumption; this workspace never writes
/// a file it has mapped.
///
/// # Errors
/// The operating system refuses the map.
///
/// ```
/// use std::io::Write;
/// let mut file = tempfile::tempfile().unwrap();
/// file.write_all(b"GGUF").unwrap();
/// let map = peft_kernels::mmap::map_file(&file).unwrap();
/// assert_eq!(&map[..], b"GGUF");
/// ```
pub fn map_file(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and only read through the returned `Mmap`'s slice, which
    // stays inside the map. A change to the file while it is mapped (see above) would change
    // what that slice reads.
    #[allow(unsafe_code)]
    unsafe {
        Mmap::map(file)
    }
}
