//! A frozen weight matrix kept packed, and the two products a frozen base needs: the forward
//! `x·Wᵀ (+ b)` and the input gradient `g·W`. Neither builds the f32 weight: each thread decodes a
//! tile (a few rows for the forward, a stripe of columns for the gradient, at most
//! [`TILE_BYTES`] of f32) into a buffer of its own and multiplies it with gemm, so the f32 copy of
//! the layer never exists and the tile stays in cache.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use rayon::prelude::*;

use super::QuantError;
use super::ggml::{GGML_BLOCK, GgmlBlock};
use super::nf4::{self, Absmax, NF4_BLOCK, Nf4};
use super::q8;

/// The size a thread's decoded tile aims at (f32 bytes), at least one 64-row (or 64-column)
/// unit: a quarter of a 1 MB L2 cache.
pub const TILE_BYTES: usize = 256 * 1024;

/// A low-rank term added to a packed product ([`PackedMatrix::forward_low_rank`],
/// [`PackedMatrix::input_grad_low_rank`]): `h` is row-major `[n, rank]`; `b` is row-major
/// `[rank, rows]` for the forward product and `[cols, rank]` (read as its transpose) for the input
/// gradient.
#[derive(Clone, Copy, Debug)]
pub struct LowRank<'a> {
    /// The left factor, `[n, rank]`.
    pub h: &'a [f32],
    /// The right factor (see the type's documentation for its orientation).
    pub b: &'a [f32],
    /// The rank `r`.
    pub rank: usize,
}

impl LowRank<'_> {
    fn check(&self, n: usize, width: usize, shapes: &str) {
        assert!(
            self.h.len() == n * self.rank && self.b.len() == self.rank * width,
            "the low-rank factors must be {shapes}"
        );
    }

    /// `out += h·b` (`transposed`: `h·bᵀ`) for a row-major `[n, width]` `out`.
    fn add_to(&self, out: &mut [f32], n: usize, width: usize, transposed: bool) {
        let rhs = if transposed {
            (self.b.as_ptr(), 1, self.rank)
        } else {
            (self.b.as_ptr(), width, 1)
        };
        // SAFETY: `out` is `[n, width]`, `h` `[n, rank]`, `b` `rank · width` values (checked).
        #[allow(unsafe_code)]
        unsafe {
            gemm_strided(
                (n, width, self.rank),
                (out.as_mut_ptr(), width),
                (self.h.as_ptr(), self.rank, 1),
                rhs,
                true,
            );
        }
    }
}

/// How a [`PackedMatrix`] stores its values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PackedFormat {
    /// NF4 in blocks of 64 with f32 block maxima (`double: false`) or double-quantized ones.
    Nf4 {
        /// Whether the block maxima are double-quantized.
        double: bool,
    },
    /// A ggml block format, kept as a GGUF file stores it.
    Ggml(GgmlBlock),
}

impl PackedFormat {
    /// Values per block.
    pub const fn block(self) -> usize {
        match self {
            PackedFormat::Nf4 { .. } => NF4_BLOCK,
            PackedFormat::Ggml(_) => GGML_BLOCK,
        }
    }

    /// The format's name as the run file and `--base` spell it.
    pub const fn name(self) -> &'static str {
        match self {
            PackedFormat::Nf4 { double: false } => "nf4",
            PackedFormat::Nf4 { double: true } => "nf4-dq",
            PackedFormat::Ggml(b) => b.name(),
        }
    }
}

/// Bytes shared by reference: an owned buffer or a range of a memory-mapped file.
#[derive(Clone)]
pub struct PackedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl PackedBytes {
    /// `range` of what `owner` holds (a `Vec<u8>`, a memory map).
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: Range<usize>,
    ) -> Result<Self, QuantError> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(QuantError::ByteRange { range, len });
        }
        Ok(PackedBytes { owner, range })
    }

    /// The bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
}

impl From<Vec<u8>> for PackedBytes {
    fn from(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        PackedBytes {
            owner: Arc::new(v),
            range,
        }
    }
}

impl fmt::Debug for PackedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackedBytes({} bytes)", self.range.len())
    }
}

/// A `[rows, cols]` matrix (a linear layer's `[out, in]` weight, PyTorch's orientation) stored
/// packed, row after row, in blocks along each row.
///
/// NF4 rows whose length is not a multiple of 64 are padded with zeros to the next multiple (the
/// padding quantizes to NF4's exact zero and never reaches a product); bitsandbytes instead lets a
/// block run on into the next row, so for such shapes the bytes differ from its layout while
/// every value read back is the same rule applied to its own row. ggml blocks cannot be padded (a
/// GGUF file never holds such a row): a row length that is not a multiple of 32 is an error.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    format: PackedFormat,
    rows: usize,
    cols: usize,
    /// Stored values per row: `cols` rounded up to the block.
    row_len: usize,
    bytes: PackedBytes,
    /// NF4's block maxima (`None` for ggml, whose scales are inside the blocks).
    absmax: Option<Absmax>,
}

impl PackedMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix to NF4 (blocks of 64, rows padded).
    pub fn nf4(values: &[f32], rows: usize, cols: usize, double: bool) -> Result<Self, QuantError> {
        check_len(values.len(), rows, cols)?;
        let row_len = cols.next_multiple_of(NF4_BLOCK);
        let q = if row_len == cols {
            Nf4::quantize(values, NF4_BLOCK, double)?
        } else {
            let mut padded = vec![0.0; rows * row_len];
            for (dst, src) in padded
                .chunks_exact_mut(row_len)
                .zip(values.chunks_exact(cols))
            {
                dst[..cols].copy_from_slice(src);
            }
            Nf4::quantize(&padded, NF4_BLOCK, double)?
        };
        Ok(PackedMatrix {
            format: PackedFormat::Nf4 { double },
            rows,
            cols,
            row_len,
            bytes: q.packed.into(),
            absmax: Some(q.absmax),
        })
    }

    /// A ggml-packed `[rows, cols]` matrix over its bytes as a GGUF file stores them (`rows`
    /// blocks-rows of `cols / 32` blocks each).
    pub fn ggml(
        block: GgmlBlock,
        bytes: PackedBytes,
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        if !cols.is_multiple_of(GGML_BLOCK) {
            return Err(QuantError::RowNotBlocked {
                cols,
                block: GGML_BLOCK,
                format: block.name(),
            });
        }
        let expected = rows * (cols / GGML_BLOCK) * block.block_bytes();
        let found = bytes.as_slice().len();
        if found != expected {
            return Err(QuantError::ByteLength {
                format: block.name(),
                shape: [rows, cols],
                expected,
                found,
            });
        }
        Ok(PackedMatrix {
            format: PackedFormat::Ggml(block),
            rows,
            cols,
            row_len: cols,
            bytes,
            absmax: None,
        })
    }

    /// Quantizes a row-major `[rows, cols]` f32 matrix in `format` (NF4: [`nf4`](Self::nf4);
    /// ggml: one block per 32 values of a row, `cols` a multiple of 32).
    pub fn quantize(
        values: &[f32],
        rows: usize,
        cols: usize,
        format: PackedFormat,
    ) -> Result<Self, QuantError> {
        match format {
            PackedFormat::Nf4 { double } => Self::nf4(values, rows, cols, double),
            PackedFormat::Ggml(kind) => {
                check_len(values.len(), rows, cols)?;
                if !cols.is_multiple_of(GGML_BLOCK) {
                    return Err(QuantError::RowNotBlocked {
                        cols,
                        block: GGML_BLOCK,
                        format: kind.name(),
                    });
                }
                if let Some(at) = values.iter().position(|v| !v.is_finite()) {
                    return Err(QuantError::NonFinite { at });
                }
                let mut bytes = Vec::with_capacity(values.len() / GGML_BLOCK * kind.block_bytes());
                for block in values.chunks_exact(GGML_BLOCK) {
                    kind.encode(block, &mut bytes);
                }
                Self::ggml(kind, bytes.into(), rows, cols)
            }
        }
    }

    /// The storage format.
    pub fn format(&self) -> PackedFormat {
        self.format
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes the packed values and their scales take.
    pub fn size_bytes(&self) -> usize {
        self.bytes.as_slice().len() + self.absmax.as_ref().map_or(0, Absmax::size_bytes)
    }

    /// Stored bytes per row (NF4: the nibbles only; its maxima are held apart).
    fn row_bytes(&self) -> usize {
        match self.format {
            PackedFormat::Nf4 { .. } => self.row_len / 2,
            PackedFormat::Ggml(b) => self.row_len / GGML_BLOCK * b.block_bytes(),
        }
    }

    /// The same matrix with its rows reordered: row `i` of the result is row `order[i]` here (how
    /// llama.cpp's permuted Q/K rows are put back). `order` must be a permutation of the rows.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self, QuantError> {
        let mut seen = vec![false; self.rows];
        if order.len() != self.rows
            || !order
                .iter()
                .all(|&r| r < self.rows && !std::mem::replace(&mut seen[r], true))
        {
            return Err(QuantError::NotAPermutation { rows: self.rows });
        }
        let rb = self.row_bytes();
        let src = self.bytes.as_slice();
        let mut bytes = Vec::with_capacity(src.len());
        for &r in order {
            bytes.extend_from_slice(&src[r * rb..(r + 1) * rb]);
        }
        let blocks = self.row_len / self.format.block();
        let absmax = self.absmax.as_ref().map(|a| {
            // Plain maxima move with their rows; double-quantized ones are decoded first and kept
            // plain, since the second-level blocks of 256 straddle rows.
            let all = a.decoded();
            Absmax::Plain(
                order
                    .iter()
                    .flat_map(|&r| all[r * blocks..(r + 1) * blocks].iter().copied())
                    .collect(),
            )
        });
        let format = match self.format {
            PackedFormat::Nf4 { .. } => PackedFormat::Nf4 { double: false },
            f => f,
        };
        Ok(PackedMatrix {
            format,
            bytes: bytes.into(),
            absmax,
            ..self.clone()
        })
    }

    /// Decodes block columns `blocks` of row `row` into `out` (`blocks.len() · block` values).
    #[inline]
    fn decode(&self, row: usize, blocks: Range<usize>, out: &mut [f32]) {
        let block = self.format.block();
        debug_assert_eq!(out.len(), blocks.len() * block);
        let per_row = self.row_len / block;
        let bytes = self.bytes.as_slice();
        match self.format {
            PackedFormat::Nf4 { .. } => {
                let absmax = self.absmax.as_ref().expect("NF4 keeps its maxima");
                for (b, chunk) in blocks.zip(out.chunks_exact_mut(block)) {
                    let index = row * per_row + b;
                    nf4::decode_into(bytes, index * block, absmax.get(index), chunk);
                }
            }
            PackedFormat::Ggml(kind) => {
                let bb = kind.block_bytes();
                for (b, chunk) in blocks.zip(out.chunks_exact_mut(block)) {
                    let at = (row * per_row + b) * bb;
                    kind.decode(&bytes[at..at + bb], chunk);
                }
            }
        }
    }

    /// The whole matrix in f32, row-major `[rows, cols]` (tests, merging, other backends).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        let mut row = vec![0.0; self.row_len];
        let blocks = self.row_len / self.format.block();
        for (r, dst) in out
            .chunks_exact_mut(self.cols.max(1))
            .enumerate()
            .take(self.rows)
        {
            self.decode(r, 0..blocks, &mut row);
            dst.copy_from_slice(&row[..self.cols]);
        }
        out
    }

    /// Rows `rows` in f32 into `out`, row-major `[rows.len(), cols]`, on this thread (a block
    /// of an LM head's table).
    ///
    /// # Panics
    /// If `rows` ends past the matrix or `out` is not `rows.len() · cols` long.
    pub fn decode_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        assert!(
            rows.end <= self.rows,
            "rows {rows:?} of a {}-row matrix",
            self.rows
        );
        assert_eq!(
            out.len(),
            rows.len() * self.cols,
            "out must be [rows, cols]"
        );
        if self.cols == 0 {
            return;
        }
        let blocks = self.row_len / self.format.block();
        let mut row = vec![0.0; self.row_len];
        for (r, dst) in rows.zip(out.chunks_exact_mut(self.cols)) {
            self.decode(r, 0..blocks, &mut row);
            dst.copy_from_slice(&row[..self.cols]);
        }
    }

    /// Rows `ids` in f32, row-major `[ids.len(), cols]` (an embedding lookup over a packed
    /// table); only those rows are decoded.
    ///
    /// # Panics
    /// If an id is not below `rows`.
    pub fn gather_rows(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = vec![0.0; ids.len() * self.cols];
        if self.cols == 0 {
            return out;
        }
        let blocks = self.row_len / self.format.block();
        out.par_chunks_mut(self.cols)
            .zip(ids.par_iter())
            .for_each_init(
                || vec![0.0; self.row_len],
                |row, (dst, &id)| {
                    assert!(id < self.rows, "row {id} of a {}-row matrix", self.rows);
                    self.decode(id, 0..blocks, row);
                    dst.copy_from_slice(&row[..self.cols]);
                },
            );
        out
    }

    /// `x·Wᵀ (+ bias)` for a row-major `[n, cols]` `x`: the row-major `[n, rows]` output of a
    /// linear layer whose weight this is.
    pub fn forward(&self, x: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
        self.forward_low_rank(x, n, bias, None)
    }

    /// [`forward`](Self::forward) plus a low-rank term: `x·Wᵀ (+ bias) + h·b` for `h` `[n, r]`
    /// and `b` `[r, rows]` (a LoRA layer's `scale·(x·A)` and `B`), each output tile finished by
    /// the low-rank product right after the base product, while it is in cache.
    pub fn forward_low_rank(
        &self,
        x: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        low_rank: Option<LowRank<'_>>,
    ) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols, "x must be [n, in_features]");
        if let Some(b) = bias {
            assert_eq!(b.len(), self.rows, "bias must be [out_features]");
        }
        if let Some(lr) = &low_rank {
            lr.check(n, self.rows, "[n, r] and [r, out_features]");
        }
        let mut y = vec![0.0f32; n * self.rows];
        if n == 0 || self.rows == 0 {
            return y;
        }
        if n <= GEMV_ROWS {
            self.forward_few(x, n, bias, &mut y);
            if let Some(lr) = low_rank {
                lr.add_to(&mut y, n, self.rows, false);
            }
            return y;
        }
        // Tiles of whole 64-row units: gemm computes the row-major output tile transposed, so
        // the tile's rows are its microkernel's rows (64 with AVX-512: a 48- or 32-row tile
        // runs the narrower, slower kernels).
        let units = self.rows.div_ceil(GEMM_UNIT);
        let per_unit = 4 * self.row_len.max(1) * GEMM_UNIT;
        let tile = GEMM_UNIT * task_size(units, (TILE_BYTES / per_unit).max(1));
        let tiles: Vec<usize> = (0..self.rows).step_by(tile).collect();
        let out = SharedOut(y.as_mut_ptr());
        let blocks = self.row_len / self.format.block();
        tiles.par_iter().for_each_init(
            || vec![0.0f32; tile * self.row_len],
            |buf, &r0| {
                let rows = tile.min(self.rows - r0);
                for r in 0..rows {
                    let dst = &mut buf[r * self.row_len..(r + 1) * self.row_len];
                    self.decode(r0 + r, 0..blocks, dst);
                }
                let dst = out.at(r0);
                if let Some(b) = bias {
                    for i in 0..n {
                        // SAFETY: columns r0..r0 + rows of row i belong to this task alone.
                        #[allow(unsafe_code)]
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                b[r0..].as_ptr(),
                                dst.add(i * self.rows),
                                rows,
                            );
                        }
                    }
                }
                // SAFETY: `dst` addresses the `[n, rows]` column tile r0.. of `y` with row stride
                // `self.rows`, written by this task only; `x` holds `[n, cols]` and `buf` `rows`
                // decoded rows of `row_len` values, read as the `[cols, rows]` transpose.
                #[allow(unsafe_code)]
                unsafe {
                    gemm_strided(
                        (n, rows, self.cols),
                        (dst, self.rows),
                        (x.as_ptr(), self.cols, 1),
                        (buf.as_ptr(), 1, self.row_len),
                        bias.is_some(),
                    );
                    if let Some(lr) = &low_rank {
                        // The same tile plus `h·b[:, r0..r0 + rows]`.
                        gemm_strided(
                            (n, rows, lr.rank),
                            (dst, self.rows),
                            (lr.h.as_ptr(), lr.rank, 1),
                            (lr.b.as_ptr().add(r0), self.rows, 1),
                            true,
                        );
                    }
                }
            },
        );
        y
    }

    /// [`forward`](Self::forward) for a few input rows (decoding steps): each weight row is read
    /// once and dotted with every input row (NF4: block by block from its nibbles; ggml: decoded
    /// into a row buffer that stays in L1, then dotted at full vector width, [`ggml_rows`]).
    fn forward_few(&self, x: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        let bytes = self.bytes.as_slice();
        match self.format {
            PackedFormat::Nf4 { .. } => {
                let absmax = self.absmax.as_ref().expect("NF4 keeps its maxima");
                let per_row = self.row_len / NF4_BLOCK;
                self.gemv(x, n, bias, y, |rows, padded, out| {
                    for (k, r) in rows.enumerate() {
                        for (i, xi) in padded.chunks_exact(self.row_len).enumerate() {
                            out[k * n + i] = (0..per_row)
                                .map(|b| {
                                    let index = r * per_row + b;
                                    let q =
                                        &bytes[index * NF4_BLOCK / 2..(index + 1) * NF4_BLOCK / 2];
                                    absmax.get(index)
                                        * nf4_dot(q, &xi[b * NF4_BLOCK..(b + 1) * NF4_BLOCK])
                                })
                                .sum();
                        }
                    }
                });
            }
            PackedFormat::Ggml(kind) if q8::has_q8_product(kind) && q8::q8_activations() => {
                let per_row = self.row_len / GGML_BLOCK;
                // ggml rows are whole blocks: `x` needs no padding.
                let quantized = q8::Q8Rows::quantize(x);
                self.gemv(x, n, bias, y, |rows, _, out| {
                    q8::rows_q8(
                        kind,
                        bytes,
                        rows.start,
                        rows.len(),
                        per_row,
                        &quantized,
                        out,
                    );
                });
            }
            PackedFormat::Ggml(kind) => {
                let per_row = self.row_len / GGML_BLOCK;
                self.gemv(x, n, bias, y, |rows, padded, out| {
                    ggml_rows(kind, bytes, rows.start, rows.len(), per_row, padded, out);
                });
            }
        }
    }

    /// The row-parallel loop of [`forward_few`](Self::forward_few): the inputs padded to whole
    /// blocks, then `chunk(rows, padded, out)` for chunks of [`GEMV_CHUNK`] weight rows in
    /// parallel (`out[k·n + i]`: row `k` of the chunk against input row `i`), and the bias.
    fn gemv(
        &self,
        x: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        chunk: impl Fn(Range<usize>, &[f32], &mut [f32]) + Sync,
    ) {
        // Inputs padded to whole blocks (NF4 rows may end inside one).
        let mut padded = vec![0f32; n * self.row_len];
        for (dst, src) in padded
            .chunks_exact_mut(self.row_len)
            .zip(x.chunks_exact(self.cols))
        {
            dst[..self.cols].copy_from_slice(src);
        }
        let parts: Vec<Vec<f32>> = (0..self.rows.div_ceil(GEMV_CHUNK))
            .into_par_iter()
            .map(|c| {
                let rows = c * GEMV_CHUNK..((c + 1) * GEMV_CHUNK).min(self.rows);
                let mut out = vec![0f32; rows.len() * n];
                chunk(rows, &padded, &mut out);
                out
            })
            .collect();
        for (c, part) in parts.iter().enumerate() {
            for (k, row) in part.chunks_exact(n).enumerate() {
                let r = c * GEMV_CHUNK + k;
                let b = bias.map_or(0.0, |b| b[r]);
                for (i, v) in row.iter().enumerate() {
                    y[i * self.rows + r] = v + b;
                }
            }
        }
    }

    /// `g·W` for a row-major `[n, rows]` `g`: the row-major `[n, cols]` input gradient of a linear
    /// layer whose weight this is.
    pub fn input_grad(&self, g: &[f32], n: usize) -> Vec<f32> {
        self.input_grad_low_rank(g, n, None)
    }

    /// [`input_grad`](Self::input_grad) plus a low-rank term: `g·W + h·bᵀ` for `h` `[n, r]` and
    /// `b` `[cols, r]` (a LoRA layer's `scale·g·Bᵀ` and `A`), each stripe of the gradient
    /// finished by the low-rank product right after the base product.
    pub fn input_grad_low_rank(
        &self,
        g: &[f32],
        n: usize,
        low_rank: Option<LowRank<'_>>,
    ) -> Vec<f32> {
        assert_eq!(g.len(), n * self.rows, "g must be [n, out_features]");
        if let Some(lr) = &low_rank {
            lr.check(n, self.cols, "[n, r] and [in_features, r]");
        }
        let mut dx = vec![0.0f32; n * self.cols];
        if n == 0 || self.cols == 0 || self.rows == 0 {
            // No base product; an empty `dx` has nothing to add to.
            if let Some(lr) = low_rank.filter(|_| self.rows == 0) {
                lr.add_to(&mut dx, n, self.cols, true);
            }
            return dx;
        }
        let block = self.format.block();
        // Stripes of whole 64-column units (gemm's microkernel rows, as for the forward tiles;
        // a 32-column stripe ran the half-width kernel), each a whole number of blocks.
        let unit_blocks = GEMM_UNIT.div_ceil(block);
        let units = (self.row_len / block).div_ceil(unit_blocks);
        let per_unit = 4 * self.rows * unit_blocks * block;
        let stripe_blocks = unit_blocks * task_size(units, (TILE_BYTES / per_unit).max(1));
        let stripe = stripe_blocks * block;
        let stripes: Vec<usize> = (0..self.cols).step_by(stripe).collect();
        let out = SharedOut(dx.as_mut_ptr());
        stripes.par_iter().for_each_init(
            || vec![0.0f32; self.rows * stripe],
            |buf, &c0| {
                let width = stripe.min(self.cols - c0);
                let first = c0 / block;
                let nblocks = width.div_ceil(block);
                let span = nblocks * block;
                for r in 0..self.rows {
                    self.decode(
                        r,
                        first..first + nblocks,
                        &mut buf[r * span..(r + 1) * span],
                    );
                }
                // SAFETY: `dst` addresses the `[n, width]` column stripe c0.. of `dx` (row stride
                // `cols`), written by this task only; `g` holds `[n, rows]` and `buf` the `[rows,
                // span]` decoded stripe, of which the first `width` columns are read.
                #[allow(unsafe_code)]
                unsafe {
                    gemm_strided(
                        (n, width, self.rows),
                        (out.at(c0), self.cols),
                        (g.as_ptr(), self.rows, 1),
                        (buf.as_ptr(), span, 1),
                        false,
                    );
                    if let Some(lr) = &low_rank {
                        // The same stripe plus `h·bᵀ[:, c0..c0 + width]` (`b` is `[cols, r]`).
                        gemm_strided(
                            (n, width, lr.rank),
                            (out.at(c0), self.cols),
                            (lr.h.as_ptr(), lr.rank, 1),
                            (lr.b.as_ptr().add(c0 * lr.rank), 1, lr.rank),
                            true,
                        );
                    }
                }
            },
        );
        dx
    }
}

// Rows `r0..r0 + count` of a ggml-packed matrix (`per_row` blocks a row) against the padded
// input rows: `out[k·n + i]`. Each weight row is decoded into a buffer that stays in L1, then
// dotted with every input row through 16 independent accumulators, so both loops vectorise at
// full width (per-block dots straight from the quants end each 32-value block with a horizontal
// sum, which made a decoding step twice as slow). Compiled for each CPU body.
crate::multiversion! {
    fn ggml_rows(
        kind: GgmlBlock,
        bytes: &[u8],
        r0: usize,
        count: usize,
        per_row: usize,
        padded: &[f32],
        out: &mut [f32],
    ) {
        let bb = kind.block_bytes();
        let row_len = per_row * GGML_BLOCK;
        let n = padded.len() / row_len.max(1);
        let mut w = vec![0f32; row_len];
        for k in 0..count {
            let row = &bytes[(r0 + k) * per_row * bb..(r0 + k + 1) * per_row * bb];
            for (blk, dst) in row.chunks_exact(bb).zip(w.chunks_exact_mut(GGML_BLOCK)) {
                kind.decode(blk, dst);
            }
            for (i, xi) in padded.chunks_exact(row_len).enumerate() {
                let mut acc = [0f32; 16];
                for (ws, xs) in w.chunks_exact(16).zip(xi.chunks_exact(16)) {
                    for l in 0..16 {
                        acc[l] += ws[l] * xs[l];
                    }
                }
                out[k * n + i] = acc.iter().sum();
            }
        }
    }
}

/// Rows (forward) or columns (input gradient) of a product task come in multiples of this.
const GEMM_UNIT: usize = 64;

/// Units (weight rows, or blocks of columns) per task when `units` are split into tasks of at
/// most `max_units`: as even as possible, in a multiple of the worker threads when there are
/// enough units, so no thread is left with a short last task while the others wait.
fn task_size(units: usize, max_units: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let tasks = units.div_ceil(max_units.max(1)).div_ceil(threads) * threads;
    units.div_ceil(tasks.clamp(1, units.max(1)))
}

/// Inputs of at most this many rows take [`PackedMatrix::forward_few`].
const GEMV_ROWS: usize = 4;

/// Weight rows per task of [`PackedMatrix::forward_few`].
const GEMV_CHUNK: usize = 64;

/// `Σ NF4[q]·x` over one block (`q`: the block's 32 bytes, `x`: its 64 values), with eight
/// running sums.
#[inline]
fn nf4_dot(q: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (bytes, xs) in q.chunks_exact(4).zip(x.chunks_exact(8)) {
        for j in 0..4 {
            acc[2 * j] += nf4::NF4_CODE[(bytes[j] >> 4) as usize] * xs[2 * j];
            acc[2 * j + 1] += nf4::NF4_CODE[(bytes[j] & 0x0F) as usize] * xs[2 * j + 1];
        }
    }
    acc.iter().sum()
}

fn check_len(len: usize, rows: usize, cols: usize) -> Result<(), QuantError> {
    if len != rows * cols {
        return Err(QuantError::ValueCount {
            shape: [rows, cols],
            found: len,
        });
    }
    Ok(())
}

/// The output pointer the tasks share; each writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

// SAFETY: the tasks write disjoint column tiles of one buffer that outlives them.
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `dst = lhs·rhs` (or `dst += lhs·rhs` with `accumulate`) for an `m x n` `dst` with row stride
/// `dst_rs`; `lhs` and `rhs` are given as (pointer, row stride, column stride). One thread.
///
/// # Safety
/// Every addressed element must lie inside its allocation; `dst` must not alias the operands and
/// must be initialised when `accumulate` is set.
#[allow(unsafe_code)]
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
