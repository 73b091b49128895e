//! Frozen base weights kept packed at 4 (or 8) bits, and the products that read them in place.
//!
//! * [`nf4`]: QLoRA's NF4 code in bitsandbytes' format (blocks of 64, optional double
//!   quantization of the block maxima), bit for bit.
//! * [`ggml`]: GGUF's `Q4_0`, `Q4_1` and `Q8_0` blocks, read as the file stores them.
//! * [`PackedMatrix`]: a linear layer's `[out, in]` weight in one of those formats, with the
//!   forward product `x·Wᵀ + b` and the input gradient `g·W` computed tile by tile from the packed
//!   bytes (the f32 weight of the layer is never built).
//! * [`q8`]: decoding-step products over ggml blocks with 8-bit activations (llama.cpp's
//!   arithmetic), inside [`q8::with_q8_activations`] scopes.

pub mod ggml;
pub mod nf4;
mod packed;
pub mod q8;

pub use packed::{LowRank, PackedBytes, PackedFormat, PackedMatrix, TILE_BYTES};

/// What can go wrong packing or reading a packed weight.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// A block size the code cannot use (NF4 needs a positive even size).
    #[error("block size {block} is not a positive even number")]
    BlockSize {
        /// The size asked for.
        block: usize,
    },
    /// A value to quantize is NaN or infinite.
    #[error("value {at} is not finite; a weight with NaN or infinity cannot be quantized")]
    NonFinite {
        /// Its flat position.
        at: usize,
    },
    /// The number of values does not match the shape.
    #[error("{found} values do not fill a {shape:?} matrix")]
    ValueCount {
        /// `[rows, cols]`.
        shape: [usize; 2],
        /// Values given.
        found: usize,
    },
    /// A packed tensor's byte length does not match its shape.
    #[error("a {format} tensor of shape {shape:?} takes {expected} bytes, but {found} were given")]
    ByteLength {
        /// The block format.
        format: &'static str,
        /// `[rows, cols]`.
        shape: [usize; 2],
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        found: usize,
    },
    /// A row length a block format cannot store.
    #[error("rows of {cols} values cannot be stored in {format} blocks of {block}")]
    RowNotBlocked {
        /// The row length.
        cols: usize,
        /// The format's block.
        block: usize,
        /// The format.
        format: &'static str,
    },
    /// A byte range outside its buffer.
    #[error("byte range {range:?} lies outside a buffer of {len} bytes")]
    ByteRange {
        /// The range asked for.
        range: std::ops::Range<usize>,
        /// The buffer's length.
        len: usize,
    },
    /// A row order that is not a permutation.
    #[error("the row order is not a permutation of {rows} rows")]
    NotAPermutation {
        /// The matrix's rows.
        rows: usize,
    },
}
