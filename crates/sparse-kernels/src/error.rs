//! Errors of the sparse-kernels crate.

/// Why a sparse structure or a sparse operation was rejected.
///
/// Every variant names what was wrong and the values involved, so the caller can fix the input
/// without reading the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SparseError {
    /// A buffer has the wrong length for the declared shape.
    #[error("{what} has length {found}, expected {expected}")]
    LengthMismatch {
        /// Which buffer (`row_offsets`, `mask`, `values`, ...).
        what: &'static str,
        /// The length the shape requires.
        expected: usize,
        /// The length that was given.
        found: usize,
    },
    /// `row_offsets` does not start at 0, decreases, or does not end at the number of entries.
    #[error(
        "row_offsets is not a valid prefix sum at row {row}: {detail} (row offsets must start at 0, never decrease and end at nnz)"
    )]
    BadRowOffsets {
        /// The first row where the problem shows.
        row: usize,
        /// What is wrong there.
        detail: String,
    },
    /// A column index is outside `0..cols`.
    #[error("column index {col} of entry {entry} (row {row}) is out of bounds for {cols} columns")]
    ColumnOutOfBounds {
        /// Position of the entry in `col_indices`.
        entry: usize,
        /// Its row.
        row: usize,
        /// The offending column.
        col: u64,
        /// The number of columns of the matrix.
        cols: usize,
    },
    /// Column indices within a row are not strictly increasing (unsorted or duplicated).
    #[error(
        "columns of row {row} are not strictly increasing at entry {entry} ({prev} then {col}); sort each row and remove duplicates"
    )]
    UnsortedRow {
        /// The row.
        row: usize,
        /// Position of the entry in `col_indices`.
        entry: usize,
        /// The previous column in the row.
        prev: u32,
        /// The column that is not larger than `prev`.
        col: u32,
    },
    /// A flat index is outside `0..rows*cols`.
    #[error(
        "flat index {index} at position {position} is out of bounds for a {rows}x{cols} matrix"
    )]
    IndexOutOfBounds {
        /// Position in the given index list.
        position: usize,
        /// The offending index.
        index: u64,
        /// Rows of the matrix.
        rows: usize,
        /// Columns of the matrix.
        cols: usize,
    },
    /// The same flat index appears twice.
    #[error("flat index {index} appears more than once")]
    DuplicateIndex {
        /// The repeated index.
        index: u64,
    },
    /// A row permutation is not a permutation of `0..rows`.
    #[error("row order is not a permutation of 0..{rows}: {detail}")]
    BadRowOrder {
        /// Rows of the matrix.
        rows: usize,
        /// What is wrong.
        detail: String,
    },
    /// A dimension or the number of entries does not fit the 32-bit signed indices used on devices.
    #[error("{what} = {value} exceeds the largest supported value {max}")]
    TooLarge {
        /// Which quantity.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit (`i32::MAX`).
        max: u64,
    },
    /// `k` is larger than the number of candidates in a top-k selection.
    #[error("cannot select the top {k} of {available} scores")]
    TopKTooLarge {
        /// Requested number of entries.
        k: usize,
        /// Number of scores.
        available: usize,
    },
    /// A score is NaN, so a top-k selection is not defined.
    #[error("score at flat index {index} is NaN")]
    NanScore {
        /// Flat index of the NaN.
        index: usize,
    },
    /// Operand shapes do not agree.
    #[error("shape mismatch in {op}: {detail}")]
    ShapeMismatch {
        /// The operation.
        op: &'static str,
        /// Which shapes disagree and how.
        detail: String,
    },
}
