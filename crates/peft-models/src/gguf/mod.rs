//! Reading GGUF files (llama.cpp's model format, versions 2 and 3): metadata, tensor infos and
//! tensor data dequantized to f32, with GGUF tensor names mapped to Hugging Face module paths.

use std::path::PathBuf;

/// One metadata value of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    String(String),
    /// `ARRAY` (of one element type).
    Array(Vec<GgufValue>),
}

/// What can go wrong when reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file is not a GGUF file or is damaged.
    #[error("{file}: {message}")]
    Format {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}
