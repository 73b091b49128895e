//! The host-side CSR sparsity structure: construction, validation, transpose, row order.

use crate::SparseError;

/// Largest dimension or entry count: device index tensors are 32-bit signed integers.
pub const MAX_INDEX: usize = i32::MAX as usize;

/// The sparsity pattern of a `rows x cols` matrix in compressed sparse row form.
///
/// Holds no values: a structure is shared by the values tensor of an adapter, its gradient and
/// its optimizer state. Indices are `u32` (no 32767 cap as in spops' int16 indices). Within a
/// row, columns are strictly increasing. An entry whose value is zero is still an entry
/// ("explicit zero"): a structure is a set of positions, whatever their values.
///
/// Invariants (checked by every constructor):
/// - `row_offsets.len() == rows + 1`, `row_offsets[0] == 0`, non-decreasing,
///   `row_offsets[rows] == col_indices.len()`;
/// - every column index is `< cols`, strictly increasing within each row;
/// - `rows`, `cols` and the number of entries are at most `i32::MAX`;
/// - the optional row order is a permutation of `0..rows`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrStructure {
    rows: usize,
    cols: usize,
    row_offsets: Vec<u32>,
    col_indices: Vec<u32>,
    row_order: Option<Vec<u32>>,
}

fn check_dim(what: &'static str, value: usize) -> Result<(), SparseError> {
    if value > MAX_INDEX {
        return Err(SparseError::TooLarge {
            what,
            value: value as u64,
            max: MAX_INDEX as u64,
        });
    }
    Ok(())
}

impl CsrStructure {
    /// Builds a structure from its CSR arrays and checks every invariant.
    ///
    /// # Arguments
    /// - `rows`, `cols`: the matrix shape.
    /// - `row_offsets`: `rows + 1` prefix sums; row `i` owns entries `row_offsets[i]..row_offsets[i+1]`.
    /// - `col_indices`: the column of each entry, strictly increasing within a row.
    ///
    /// # Returns
    /// The structure, or the first violated invariant as a [`SparseError`].
    pub fn new(
        rows: usize,
        cols: usize,
        row_offsets: Vec<u32>,
        col_indices: Vec<u32>,
    ) -> Result<Self, SparseError> {
        check_dim("rows", rows)?;
        check_dim("cols", cols)?;
        check_dim("nnz", col_indices.len())?;
        if row_offsets.len() != rows + 1 {
            return Err(SparseError::LengthMismatch {
                what: "row_offsets",
                expected: rows + 1,
                found: row_offsets.len(),
            });
        }
        if row_offsets[0] != 0 {
            return Err(SparseError::BadRowOffsets {
                row: 0,
                detail: format!("starts at {}", row_offsets[0]),
            });
        }
        for row in 0..rows {
            let (start, end) = (row_offsets[row], row_offsets[row + 1]);
            if end < start {
                return Err(SparseError::BadRowOffsets {
                    row,
                    detail: format!("offset decreases from {start} to {end}"),
                });
            }
            if end as usize > col_indices.len() {
                return Err(SparseError::BadRowOffsets {
                    row,
                    detail: format!("offset {end} is past nnz = {}", col_indices.len()),
                });
            }
            let mut prev: Option<u32> = None;
            let row_cols = &col_indices[start as usize..end as usize];
            for (entry, &col) in (start as usize..).zip(row_cols) {
                if col as usize >= cols {
                    return Err(SparseError::ColumnOutOfBounds {
                        entry,
                        row,
                        col: col as u64,
                        cols,
                    });
                }
                if let Some(prev) = prev
                    && col <= prev
                {
                    return Err(SparseError::UnsortedRow {
                        row,
                        entry,
                        prev,
                        col,
                    });
                }
                prev = Some(col);
            }
        }
        if row_offsets[rows] as usize != col_indices.len() {
            return Err(SparseError::BadRowOffsets {
                row: rows,
                detail: format!(
                    "ends at {} but there are {} column indices",
                    row_offsets[rows],
                    col_indices.len()
                ),
            });
        }
        Ok(Self {
            rows,
            cols,
            row_offsets,
            col_indices,
            row_order: None,
        })
    }

    /// The structure with no entries.
    pub fn empty(rows: usize, cols: usize) -> Result<Self, SparseError> {
        Self::new(rows, cols, vec![0; rows + 1], Vec::new())
    }

    /// Builds a structure from a row-major boolean mask: `mask[i * cols + j]` marks entry `(i, j)`.
    ///
    /// # Shapes
    /// - `mask`: `rows * cols` booleans.
    pub fn from_mask(rows: usize, cols: usize, mask: &[bool]) -> Result<Self, SparseError> {
        check_dim("rows", rows)?;
        check_dim("cols", cols)?;
        if mask.len() != rows * cols {
            return Err(SparseError::LengthMismatch {
                what: "mask",
                expected: rows * cols,
                found: mask.len(),
            });
        }
        let mut row_offsets = Vec::with_capacity(rows + 1);
        let mut col_indices = Vec::new();
        row_offsets.push(0u32);
        for row in 0..rows {
            let line = &mask[row * cols..(row + 1) * cols];
            col_indices.extend(
                line.iter()
                    .enumerate()
                    .filter(|(_, m)| **m)
                    .map(|(j, _)| j as u32),
            );
            check_dim("nnz", col_indices.len())?;
            row_offsets.push(col_indices.len() as u32);
        }
        Self::new(rows, cols, row_offsets, col_indices)
    }

    /// Builds a structure from flat row-major indices (`index = row * cols + col`), in any order.
    ///
    /// This is SFT's storage (`indices` into `W.view(-1)`, unsorted after reselection).
    ///
    /// # Returns
    /// The structure and the order that maps the given values into it: if `values[p]` belongs to
    /// `indices[p]`, the CSR values are `values[order[k]]` for `k in 0..nnz`.
    /// Out-of-range and duplicated indices are errors.
    pub fn from_flat_indices(
        rows: usize,
        cols: usize,
        indices: &[u64],
    ) -> Result<(Self, Vec<u32>), SparseError> {
        check_dim("rows", rows)?;
        check_dim("cols", cols)?;
        check_dim("nnz", indices.len())?;
        let numel = (rows as u64) * (cols as u64);
        if let Some((position, &index)) = indices.iter().enumerate().find(|(_, i)| **i >= numel) {
            return Err(SparseError::IndexOutOfBounds {
                position,
                index,
                rows,
                cols,
            });
        }
        let mut order: Vec<u32> = (0..indices.len() as u32).collect();
        order.sort_unstable_by_key(|&p| indices[p as usize]);
        if let Some(w) = order
            .windows(2)
            .find(|w| indices[w[0] as usize] == indices[w[1] as usize])
        {
            return Err(SparseError::DuplicateIndex {
                index: indices[w[0] as usize],
            });
        }
        let mut row_offsets = vec![0u32; rows + 1];
        let mut col_indices = Vec::with_capacity(indices.len());
        for &p in &order {
            let index = indices[p as usize];
            let (row, col) = ((index / cols as u64) as usize, (index % cols as u64) as u32);
            row_offsets[row + 1] += 1;
            col_indices.push(col);
        }
        for row in 0..rows {
            row_offsets[row + 1] += row_offsets[row];
        }
        Ok((Self::new(rows, cols, row_offsets, col_indices)?, order))
    }

    /// Builds the structure of the `k` largest entries of a row-major score matrix.
    ///
    /// Ties are broken towards the lower flat index, so the result is deterministic. This is
    /// RoSA's mask generation (top-k of the accumulated gradient magnitudes) and RigL's growth
    /// criterion; pass `|score|` yourself if magnitudes are wanted.
    ///
    /// # Shapes
    /// - `scores`: `rows * cols` values, no NaN.
    pub fn from_topk(
        rows: usize,
        cols: usize,
        scores: &[f32],
        k: usize,
    ) -> Result<Self, SparseError> {
        if scores.len() != rows * cols {
            return Err(SparseError::LengthMismatch {
                what: "scores",
                expected: rows * cols,
                found: scores.len(),
            });
        }
        if k > scores.len() {
            return Err(SparseError::TopKTooLarge {
                k,
                available: scores.len(),
            });
        }
        if let Some(index) = scores.iter().position(|s| s.is_nan()) {
            return Err(SparseError::NanScore { index });
        }
        let mut flat: Vec<u32> = (0..scores.len() as u32).collect();
        let better = |a: &u32, b: &u32| {
            scores[*b as usize]
                .total_cmp(&scores[*a as usize])
                .then(a.cmp(b))
        };
        if k < flat.len() && k > 0 {
            flat.select_nth_unstable_by(k - 1, better);
        }
        flat.truncate(k);
        let flat: Vec<u64> = flat.into_iter().map(u64::from).collect();
        Ok(Self::from_flat_indices(rows, cols, &flat)?.0)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Number of stored entries (explicit zeros included).
    pub fn nnz(&self) -> usize {
        self.col_indices.len()
    }

    /// Fraction of the matrix that is stored (0 for an empty matrix).
    pub fn density(&self) -> f64 {
        let numel = self.rows * self.cols;
        if numel == 0 {
            0.0
        } else {
            self.nnz() as f64 / numel as f64
        }
    }

    /// The `rows + 1` row offsets.
    pub fn row_offsets(&self) -> &[u32] {
        &self.row_offsets
    }

    /// The column of every entry.
    pub fn col_indices(&self) -> &[u32] {
        &self.col_indices
    }

    /// The row of every entry (COO row indices), length `nnz`.
    pub fn row_indices(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.nnz());
        for row in 0..self.rows {
            let len = (self.row_offsets[row + 1] - self.row_offsets[row]) as usize;
            out.extend(std::iter::repeat_n(row as u32, len));
        }
        out
    }

    /// The flat row-major index `row * cols + col` of every entry, in CSR order.
    pub fn flat_indices(&self) -> Vec<u64> {
        self.row_indices()
            .into_iter()
            .zip(&self.col_indices)
            .map(|(r, &c)| r as u64 * self.cols as u64 + c as u64)
            .collect()
    }

    /// The optional load-balancing row order (see [`with_row_order`](Self::with_row_order)).
    pub fn row_order(&self) -> Option<&[u32]> {
        self.row_order.as_deref()
    }

    /// Attaches the row permutation sorted by decreasing row length (spops' `row_idx`,
    /// `argsort(-diff(row_offsets))`, stable), which GPU kernels can use to schedule long rows first.
    pub fn with_row_order(mut self) -> Self {
        let mut order: Vec<u32> = (0..self.rows as u32).collect();
        order.sort_by_key(|&r| {
            std::cmp::Reverse(self.row_offsets[r as usize + 1] - self.row_offsets[r as usize])
        });
        self.row_order = Some(order);
        self
    }

    /// Attaches a caller-supplied row order after checking it is a permutation of `0..rows`.
    pub fn with_custom_row_order(mut self, order: Vec<u32>) -> Result<Self, SparseError> {
        if order.len() != self.rows {
            return Err(SparseError::BadRowOrder {
                rows: self.rows,
                detail: format!("length {}", order.len()),
            });
        }
        let mut seen = vec![false; self.rows];
        for &r in &order {
            let slot = seen
                .get_mut(r as usize)
                .ok_or_else(|| SparseError::BadRowOrder {
                    rows: self.rows,
                    detail: format!("row {r} is out of range"),
                })?;
            if *slot {
                return Err(SparseError::BadRowOrder {
                    rows: self.rows,
                    detail: format!("row {r} appears twice"),
                });
            }
            *slot = true;
        }
        self.row_order = Some(order);
        Ok(self)
    }

    /// The transposed structure (`cols x rows`) and the permutation of the values.
    ///
    /// Every entry is kept, explicit zeros included (spops' torch path drops them, which is
    /// why RoSA transposes `arange(nnz) + 1`): the values of the transpose are
    /// `values[perm[k]]`. O(nnz + rows + cols), a counting sort.
    pub fn transpose(&self) -> (Self, Vec<u32>) {
        let mut counts = vec![0u32; self.cols + 1];
        for &c in &self.col_indices {
            counts[c as usize + 1] += 1;
        }
        for c in 0..self.cols {
            counts[c + 1] += counts[c];
        }
        let row_offsets = counts.clone();
        let mut next = counts;
        let mut col_indices = vec![0u32; self.nnz()];
        let mut perm = vec![0u32; self.nnz()];
        for row in 0..self.rows {
            for k in self.row_offsets[row] as usize..self.row_offsets[row + 1] as usize {
                let c = self.col_indices[k] as usize;
                let dst = next[c] as usize;
                next[c] += 1;
                col_indices[dst] = row as u32;
                perm[dst] = k as u32;
            }
        }
        let transposed = Self {
            rows: self.cols,
            cols: self.rows,
            row_offsets,
            col_indices,
            row_order: None,
        };
        (transposed, perm)
    }
}
