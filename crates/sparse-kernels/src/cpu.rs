//! CPU kernels for the `Flex` backend: rayon over rows or token blocks. The hot inner loops are
//! in `simd.rs` (AVX-512 bodies picked at run time, portable fallbacks); the general SpMM row
//! loop is compiled for AVX-512, AVX2+FMA and the baseline by `multiversion!`.
//!
//! Layout choices (see `docs/architecture.md`, "sparse-kernels"):
//! - SpMM `C = S·B` with `B` row-major: rows of `S` are split across threads by entry count; for
//!   each block of `LANES` columns of `B`, a row accumulates `values[k] · B[col[k], block]` in
//!   registers. No packing is needed: the block of `B` stays in L2.
//! - SpMM with `B = xᵀ` (a transposed view of a row-major activation `x`, the adapter case
//!   `y = x·Sᵀ`): rayon over blocks of 16 tokens; each block walks `S` by columns (the CSR of
//!   `Sᵀ`), transposing 16x16 tiles of `x` in registers and adding each entry's `v · x[:, j]`
//!   to a `[rows][16]` accumulator (L1-sized for BERT), then transposes it into `y` (the
//!   contiguous `y`, not `yᵀ`), which is written without being zeroed first.
//! - SDDMM, small operands: one task per thread, each claiming chunks of 64 tokens, packing them
//!   into its own panels and keeping 16 partial sums per entry; the copies are added at the end.
//! - SDDMM, large operands: the contracted dimension (tokens) is cut into chunks of 128; per
//!   chunk both operands are transposed once into shared `[rows][128]` panels, then threads own
//!   disjoint ranges of rows (hence of output entries) and walk the columns of `S` in tiles whose
//!   panel rows fit in L2, one FMA dot product per entry (four entries sharing their row's loads).

use burn::backend::{
    Flex, TensorMetadata,
    ops::FloatTensorOps,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::{DType, FloatDType, TensorData};
use peft_kernels::cpu::par_fill_uninit;
use rayon::prelude::*;
use std::cell::RefCell;
use std::mem::MaybeUninit;

use crate::backend::{CsrIndices, SparseBackend};
use crate::simd;

type FlexFloat = FloatTensor<Flex>;

/// Token-block width of the SpMM kernels (lanes kept in registers per output row).
const LANES: usize = 32;

/// A read-only strided 2-D view of an f32 buffer.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    rs: usize,
    cs: usize,
    rows: usize,
    cols: usize,
}

impl View<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset + i * self.rs + j * self.cs]
    }
}

/// An f32 tensor with non-negative strides (cast or copied if needed), plus the original dtype.
fn prepare(t: FlexFloat) -> (FlexFloat, DType) {
    let dtype = t.dtype();
    let t = if dtype == DType::F32 {
        t
    } else {
        Flex::float_cast(t, FloatDType::F32)
    };
    let ok = t.layout().strides().iter().all(|s| *s >= 0);
    (if ok { t } else { t.to_contiguous() }, dtype)
}

fn view(t: &FlexFloat) -> View<'_> {
    let layout = t.layout();
    let shape = layout.shape();
    let strides = layout.strides();
    View {
        data: t.storage::<f32>(),
        offset: layout.start_offset(),
        rs: strides[0] as usize,
        cs: strides[1] as usize,
        rows: shape[0],
        cols: shape[1],
    }
}

fn finish(data: Vec<f32>, shape: [usize; 2], dtype: DType) -> FlexFloat {
    let out = FlexFloat::from_data(TensorData::new(data, shape));
    cast_back(out, dtype)
}

fn cast_back(t: FlexFloat, dtype: DType) -> FlexFloat {
    if dtype == DType::F32 {
        t
    } else {
        Flex::float_cast(t, dtype.into())
    }
}

/// Index arrays as `i32` (borrowed when they already are).
fn indices(t: &IntTensor<Flex>) -> std::borrow::Cow<'_, [i32]> {
    let t = if t.is_contiguous() && t.layout().start_offset() == 0 {
        std::borrow::Cow::Borrowed(t)
    } else {
        std::borrow::Cow::Owned(t.to_contiguous())
    };
    let convert = |v: Vec<i64>| {
        v.into_iter()
            .map(|x| i32::try_from(x).expect("sparse index does not fit in i32"))
            .collect::<Vec<_>>()
    };
    match t.dtype() {
        DType::I32 => match t {
            std::borrow::Cow::Borrowed(b) => std::borrow::Cow::Borrowed(
                b.as_slice::<i32>().expect("contiguous i32 index tensor"),
            ),
            std::borrow::Cow::Owned(o) => std::borrow::Cow::Owned(
                o.as_slice::<i32>()
                    .expect("contiguous i32 index tensor")
                    .to_vec(),
            ),
        },
        _ => {
            let data = t.into_owned().into_data().convert::<i64>();
            std::borrow::Cow::Owned(convert(
                data.try_into_vec::<i64>().expect("integer index data"),
            ))
        }
    }
}

/// Splits `0..rows` into about `parts` ranges of similar cost (entries plus one per row).
fn row_ranges(ro: &[i32], parts: usize) -> Vec<(usize, usize)> {
    let rows = ro.len() - 1;
    let cost = |r: usize| ro[r] as usize + r;
    let total = cost(rows);
    let parts = parts.clamp(1, rows.max(1));
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 1..=parts {
        let target = total * p / parts;
        let mut end = start;
        if p == parts {
            end = rows;
        } else {
            while end < rows && cost(end) < target {
                end += 1;
            }
        }
        if end > start {
            out.push((start, end));
            start = end;
        }
    }
    out
}

thread_local! {
    /// Per-thread panel scratch of the CPU kernels, kept across calls (it grows to the largest
    /// panel a thread has packed).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch (contents unspecified), starting on a
/// 64-byte boundary (whole cache lines for 16-float rows). A nested call on the same thread gets
/// a fresh buffer instead.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let aligned = |buf: &mut Vec<f32>| {
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        let skip = buf.as_ptr().align_offset(64).min(15);
        skip..skip + len
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            let range = aligned(&mut buf);
            f(&mut buf[range])
        }
        Err(_) => {
            let mut buf = Vec::new();
            let range = aligned(&mut buf);
            f(&mut buf[range])
        }
    })
}

fn parts() -> usize {
    rayon::current_num_threads() * 4
}

/// Splits `out` into the chunks owned by each row range (`unit(r)` elements before row `r`).
fn split_by_rows<'a>(
    mut out: &'a mut [f32],
    ranges: &[(usize, usize)],
    unit: impl Fn(usize) -> usize,
) -> Vec<(usize, usize, &'a mut [f32])> {
    let mut chunks = Vec::with_capacity(ranges.len());
    for &(r0, r1) in ranges {
        let (head, tail) = out.split_at_mut(unit(r1) - unit(r0));
        chunks.push((r0, r1, head));
        out = tail;
    }
    chunks
}

// ---------------------------------------------------------------------------------------------
// SpMM

peft_kernels::multiversion! {
    fn spmm_rows_block(
        ro: &[i32],
        ci: &[i32],
        vals: &[f32],
        b: View<'_>,
        r0: usize,
        r1: usize,
        out: &mut [f32],
    ) {
        // `out` holds rows r0..r1 of C, row-major with b.cols columns; b has cs == 1 or cols == 1.
        let n = b.cols;
        let mut nb = 0;
        while nb + LANES <= n {
            for (o, row_out) in (r0..r1).zip(out.chunks_exact_mut(n)) {
                let mut acc = [0f32; LANES];
                for k in ro[o] as usize..ro[o + 1] as usize {
                    let v = vals[k];
                    let start = b.offset + ci[k] as usize * b.rs + nb;
                    let src: &[f32; LANES] = b.data[start..start + LANES].try_into().unwrap();
                    for (a, x) in acc.iter_mut().zip(src) {
                        *a += v * x;
                    }
                }
                row_out[nb..nb + LANES].copy_from_slice(&acc);
            }
            nb += LANES;
        }
        if nb < n {
            let w = n - nb;
            for (o, row_out) in (r0..r1).zip(out.chunks_exact_mut(n)) {
                let mut acc = [0f32; LANES];
                for k in ro[o] as usize..ro[o + 1] as usize {
                    let v = vals[k];
                    let c = ci[k] as usize;
                    for (j, a) in acc.iter_mut().enumerate().take(w) {
                        *a += v * b.at(c, nb + j);
                    }
                }
                row_out[nb..].copy_from_slice(&acc[..w]);
            }
        }
    }
}

/// The adapter SpMM `Cᵀ = x·Sᵀ` for `b = xᵀ` (a transposed view, `rs == 1`), in column order:
/// rayon over blocks of 16 tokens; each block walks the columns of `x` (16x16 register
/// transposes), adds every column's entries (`Sᵀ`'s CSR: `sto`, `sti`, values `vt`) to a
/// `[rows][16]` accumulator (`simd::spmm_columns`; 24 KiB, in L1, for BERT's 384 rows; in L2
/// for LLaMA's 4096) and transposes it into `Cᵀ`.
fn spmm_token_columns(sto: &[i32], sti: &[i32], vt: &[f32], b: View<'_>, rows: usize) -> Vec<f32> {
    const TB: usize = 16;
    let cols = simd::Columns::new(sto, sti, vt, rows);
    par_transposed_blocks(b.cols, rows, TB, |blk, w, acc| {
        acc.fill(0.0);
        let x = &b.data[b.offset + blk * TB * b.cs..];
        simd::spmm_columns(x, b.cs, w, &cols, acc);
    })
}

/// A row-major `[n, rows]` matrix produced in parallel blocks of `tb` of its rows:
/// `block(b, w, acc)` fills `acc` (`[rows][tb]`, lane `t < w` for row `b·tb + t`; thread
/// scratch, 64-byte aligned), which is then transposed into place. Those transposes write every
/// float, so the result is never zero-filled first (a 3 MB memset per call at the BERT shape).
fn par_transposed_blocks(
    n: usize,
    rows: usize,
    tb: usize,
    block: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let fill = |blk: usize, chunk: &mut [MaybeUninit<f32>]| {
        let w = chunk.len() / rows;
        with_scratch(tb * rows, |acc| {
            block(blk, w, acc);
            simd::transpose_uninit(acc, tb, chunk, rows, w);
        });
    };
    // SAFETY: `transpose_uninit` initialises each chunk whole.
    #[allow(unsafe_code)]
    unsafe {
        par_fill_uninit(n * rows, tb * rows, fill)
    }
}

fn spmm(
    s: &CsrIndices<Flex>,
    st: &CsrIndices<Flex>,
    perm: &IntTensor<Flex>,
    values: FlexFloat,
    b: FlexFloat,
    rows: usize,
) -> FlexFloat {
    let (ro, ci) = (indices(&s.row_offsets), indices(&s.col_indices));
    assert_eq!(ro.len(), rows + 1, "csr_spmm: row_offsets length");
    let (values, _) = prepare(values);
    let values = values.to_contiguous();
    let vals = values.as_slice::<f32>().expect("contiguous values");
    let (b, dtype) = prepare(b);
    let n = b.shape()[1];
    if rows == 0 || n == 0 {
        return finish(vec![0.0; rows * n], [rows, n], dtype);
    }
    let bv = view(&b);
    if bv.rs == 1 && bv.cs != 1 && n >= 16 {
        // Adapter case: B is a transposed view of a row-major x. Produce Cᵀ contiguous.
        let (sto, sti, perm) = (
            indices(&st.row_offsets),
            indices(&st.col_indices),
            indices(perm),
        );
        assert_eq!(
            sto.len(),
            bv.rows + 1,
            "csr_spmm: st is not the transpose of s"
        );
        assert_eq!(perm.len(), vals.len(), "csr_spmm: perm length");
        let vt: Vec<f32> = perm.iter().map(|&p| vals[p as usize]).collect();
        let ct = spmm_token_columns(&sto, &sti, &vt, bv, rows);
        let ct = FlexFloat::from_data(TensorData::new(ct, [n, rows]));
        return cast_back(Flex::float_transpose(ct), dtype);
    }
    let b = if bv.cs == 1 || n == 1 {
        b
    } else {
        b.to_contiguous()
    };
    let bv = view(&b);
    let mut out = vec![0f32; rows * n];
    let ranges = row_ranges(&ro, parts());
    split_by_rows(&mut out, &ranges, |r| r * n)
        .into_par_iter()
        .for_each(|(r0, r1, chunk)| spmm_rows_block(&ro, &ci, vals, bv, r0, r1, chunk));
    finish(out, [rows, n], dtype)
}

// ---------------------------------------------------------------------------------------------
// SDDMM

/// `panel[i][t] = v[i0 + i, d0 + t]` for `i < panel.len() / tc` and `t < w`, zero for
/// `w <= t < tc`, on the calling thread.
fn pack_rows(v: View<'_>, i0: usize, d0: usize, w: usize, tc: usize, panel: &mut [f32]) {
    let h = panel.len() / tc;
    if v.rs == 1 {
        // v is a transposed view of a row-major [tokens, features] buffer.
        let src = &v.data[v.offset + d0 * v.cs + i0..];
        simd::transpose(src, v.cs, panel, tc, w, h);
    } else {
        for (i, line) in panel.chunks_exact_mut(tc).enumerate() {
            let start = v.offset + (i0 + i) * v.rs + d0 * v.cs;
            if v.cs == 1 {
                line[..w].copy_from_slice(&v.data[start..start + w]);
            } else {
                for (t, x) in line[..w].iter_mut().enumerate() {
                    *x = v.data[start + t * v.cs];
                }
            }
        }
    }
    if w < tc {
        for line in panel.chunks_exact_mut(tc) {
            line[w..].fill(0.0);
        }
    }
}

/// [`pack_rows`] for the whole of `v`, rayon over blocks of rows.
fn pack_panel(v: View<'_>, d0: usize, w: usize, tc: usize, panel: &mut [f32]) {
    const BLOCK: usize = 256;
    panel
        .par_chunks_mut(BLOCK * tc)
        .enumerate()
        .for_each(|(p, chunk)| pack_rows(v, p * BLOCK, d0, w, tc, chunk));
}

/// Adds to every entry of rows `r0..r1` the dot product of its two panel rows. The columns of
/// `S` are visited in tiles whose `pb` rows fit in L2 (a per-row cursor walks each row's
/// entries tile by tile; any column order is correct, sorted columns keep the tile in cache).
#[allow(clippy::too_many_arguments)]
fn sddmm_rows(
    ro: &[i32],
    ci: &[i32],
    pa: &[f32],
    pb: &[f32],
    tc: usize,
    tile: usize,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let base = ro[r0] as usize;
    let cols = pb.len() / tc;
    let mut cursor: Vec<usize> = (r0..r1).map(|i| ro[i] as usize).collect();
    for c1 in (tile..cols + tile).step_by(tile) {
        for (i, k) in (r0..r1).zip(cursor.iter_mut()) {
            let end = ro[i + 1] as usize;
            if *k == end || ci[*k] as usize >= c1 {
                continue;
            }
            let a = &pa[i * tc..(i + 1) * tc];
            let b = |k: usize| {
                let c = ci[k] as usize;
                &pb[c * tc..(c + 1) * tc]
            };
            // Groups of four entries share the loads of `a`.
            while *k + 4 <= end && (ci[*k + 3] as usize) < c1 {
                let d = simd::dot4(a, [b(*k), b(*k + 1), b(*k + 2), b(*k + 3)]);
                for (j, v) in d.iter().enumerate() {
                    out[*k + j - base] += v;
                }
                *k += 4;
            }
            while *k < end && (ci[*k] as usize) < c1 {
                out[*k - base] += simd::dot(a, b(*k));
                *k += 1;
            }
        }
    }
}

/// Contracted length per SDDMM pass (measured best among 64..512 on the 2-core Xeon: long
/// enough to amortise the horizontal sums, short enough that the panels stay small).
const TOKEN_CHUNK: usize = 128;

/// SDDMM `out[k] = Σ_t a[i_k, t] · bt[j_k, t]`, by [`sddmm_split_tokens`] when both operands'
/// panels are small, by [`sddmm_shared_panels`] otherwise.
fn sddmm(s: &CsrIndices<Flex>, a: FlexFloat, bt: FlexFloat) -> FlexFloat {
    let (ro, ci) = (indices(&s.row_offsets), indices(&s.col_indices));
    let nnz = ci.len();
    let (a, dtype) = prepare(a);
    let (bt, _) = prepare(bt);
    let (av, bv) = (view(&a), view(&bt));
    assert_eq!(ro.len(), av.rows + 1, "csr_sddmm: a has {} rows", av.rows);
    assert_eq!(av.cols, bv.cols, "csr_sddmm: inner dimensions differ");
    let d = av.cols;
    if nnz == 0 || d == 0 {
        let out = vec![0f32; nnz];
        return cast_back(FlexFloat::from_data(TensorData::new(out, [nnz])), dtype);
    }
    let out = if (av.rows + bv.rows) * SPLIT_CHUNK * 4 <= SPLIT_PANELS {
        sddmm_split_tokens(&ro, &ci, av, bv)
    } else {
        sddmm_shared_panels(&ro, &ci, av, bv)
    };
    let out = FlexFloat::from_data(TensorData::new(out, [nnz]));
    cast_back(out, dtype)
}

/// Contracted length per pass of [`sddmm_split_tokens`].
const SPLIT_CHUNK: usize = 64;
/// Largest panels (bytes, both operands) for which every thread packs its own chunk of tokens:
/// two threads' panels then fit in this CPU's 2 MiB L2 with room to spare.
const SPLIT_PANELS: usize = 1 << 20;

/// SDDMM for small operands (a BERT layer, say): one rayon task per thread, task `w` taking
/// the chunks `w, w + workers, …` of [`SPLIT_CHUNK`] tokens, packing both operands' chunk into
/// its own panels and adding every entry's partial dot product to its own copy of the output;
/// the copies are summed at the end in task order. No barrier per chunk, the scratch panels are
/// reused across calls, and the result does not depend on thread timing (a fixed assignment and
/// summation order: a run gives the same bits every time on the same thread count).
fn sddmm_split_tokens(ro: &[i32], ci: &[i32], av: View<'_>, bv: View<'_>) -> Vec<f32> {
    let (m, n, d, nnz) = (av.rows, bv.rows, av.cols, ci.len());
    let tc = SPLIT_CHUNK;
    let chunks = d.div_ceil(tc);
    let workers = rayon::current_num_threads().min(chunks);
    let partials: Vec<Vec<f32>> = (0..workers)
        .into_par_iter()
        .map(|w| {
            // 16 partial sums per entry, summed once after the last chunk.
            let mut lanes = vec![0f32; 16 * nnz];
            with_scratch((m + n) * tc, |scratch| {
                let (pa, pb) = scratch.split_at_mut(m * tc);
                for c in (w..chunks).step_by(workers) {
                    let (d0, w) = (c * tc, (d - c * tc).min(tc));
                    pack_rows(av, 0, d0, w, tc, pa);
                    pack_rows(bv, 0, d0, w, tc, pb);
                    for (i, a) in pa.chunks_exact(tc).enumerate() {
                        let (k0, k1) = (ro[i] as usize, ro[i + 1] as usize);
                        simd::sddmm_lanes(a, &ci[k0..k1], pb, &mut lanes[16 * k0..16 * k1]);
                    }
                }
            });
            lanes
                .chunks_exact(16)
                .map(|l| l.iter().sum::<f32>())
                .collect::<Vec<f32>>()
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut out = partials.next().expect("at least one worker");
    for p in partials {
        out.iter_mut().zip(&p).for_each(|(x, y)| *x += y);
    }
    out
}

/// SDDMM for large operands (LLaMA-sized): the contracted dimension is cut into chunks of
/// [`TOKEN_CHUNK`]; per chunk both operands are transposed once into shared `[rows][chunk]`
/// panels, then rayon over row ranges (balanced by entry count) adds one dot product per entry.
fn sddmm_shared_panels(ro: &[i32], ci: &[i32], av: View<'_>, bv: View<'_>) -> Vec<f32> {
    let d = av.cols;
    let mut out = vec![0f32; ci.len()];
    let tc = d.min(TOKEN_CHUNK).next_multiple_of(16);
    // Columns of S per tile: their `pb` rows take about 1 MiB (half of this CPU's L2).
    let tile = ((1 << 20) / (tc * 4)).max(16);
    let mut pa = vec![0f32; av.rows * tc];
    let mut pb = vec![0f32; bv.rows * tc];
    let ranges = row_ranges(ro, parts());
    for d0 in (0..d).step_by(tc) {
        let w = (d - d0).min(tc);
        pack_panel(av, d0, w, tc, &mut pa);
        pack_panel(bv, d0, w, tc, &mut pb);
        split_by_rows(&mut out, &ranges, |r| ro[r] as usize)
            .into_par_iter()
            .for_each(|(r0, r1, chunk)| sddmm_rows(ro, ci, &pa, &pb, tc, tile, r0, r1, chunk));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// CSR-add and gather

fn csr_add(s: &CsrIndices<Flex>, values: FlexFloat, dense: FlexFloat) -> FlexFloat {
    let (ro, ci) = (indices(&s.row_offsets), indices(&s.col_indices));
    let (values, _) = prepare(values);
    let values = values.to_contiguous();
    let vals = values.as_slice::<f32>().expect("contiguous values");
    let (dense, dtype) = prepare(dense);
    let [rows, cols] = [dense.shape()[0], dense.shape()[1]];
    assert_eq!(ro.len(), rows + 1, "csr_add: dense has {rows} rows");
    let mut dense = if dense.is_contiguous() && dense.layout().start_offset() == 0 {
        dense
    } else {
        dense.to_contiguous()
    };
    if rows * cols > 0 {
        // In place when the buffer is not shared (copy-on-write otherwise).
        let buf = &mut dense.storage_mut::<f32>()[..rows * cols];
        buf.par_chunks_mut(cols).enumerate().for_each(|(r, line)| {
            for k in ro[r] as usize..ro[r + 1] as usize {
                line[ci[k] as usize] += vals[k];
            }
        });
    }
    cast_back(dense, dtype)
}

/// `dense + S` in a new row-major buffer, rayon over blocks of rows: each row is copied from
/// `dense` (read through its strides) with its entries added on the way (columns are strictly
/// increasing within a row). `dense` is left as it was.
pub(crate) fn add_copy(s: &CsrIndices<Flex>, values: FlexFloat, dense: FlexFloat) -> FlexFloat {
    const ROWS: usize = 8;
    let (ro, ci) = (indices(&s.row_offsets), indices(&s.col_indices));
    let (values, _) = prepare(values);
    let values = values.to_contiguous();
    let vals = values.as_slice::<f32>().expect("contiguous values");
    let (dense, dtype) = prepare(dense);
    let dv = view(&dense);
    let (rows, cols) = (dv.rows, dv.cols);
    assert_eq!(
        ro.len(),
        rows + 1,
        "csr_merged_weight: the weight has {rows} rows"
    );
    let fill = |blk: usize, chunk: &mut [MaybeUninit<f32>]| {
        for (i, line) in chunk.chunks_exact_mut(cols).enumerate() {
            let r = blk * ROWS + i;
            let start = dv.offset + r * dv.rs;
            let at = |j: usize| dv.data[start + j * dv.cs];
            let copy = |line: &mut [MaybeUninit<f32>], j0: usize| {
                if dv.cs == 1 {
                    let src = &dv.data[start + j0..start + j0 + line.len()];
                    for (d, &v) in line.iter_mut().zip(src) {
                        d.write(v);
                    }
                } else {
                    for (j, d) in (j0..).zip(line) {
                        d.write(at(j));
                    }
                }
            };
            let mut j0 = 0;
            for k in ro[r] as usize..ro[r + 1] as usize {
                let c = ci[k] as usize;
                copy(&mut line[j0..c], j0);
                line[c].write(at(c) + vals[k]);
                j0 = c + 1;
            }
            copy(&mut line[j0..], j0);
        }
    };
    if rows * cols == 0 {
        return finish(Vec::new(), [rows, cols], dtype);
    }
    // SAFETY: `fill` writes every element of its block (each row whole, in column order).
    #[allow(unsafe_code)]
    let data = unsafe { par_fill_uninit(rows * cols, ROWS * cols, fill) };
    finish(data, [rows, cols], dtype)
}

fn csr_gather(s: &CsrIndices<Flex>, dense: FlexFloat) -> FlexFloat {
    let (ro, ci) = (indices(&s.row_offsets), indices(&s.col_indices));
    let (dense, dtype) = prepare(dense);
    let dv = view(&dense);
    assert_eq!(
        ro.len(),
        dv.rows + 1,
        "csr_gather: dense has {} rows",
        dv.rows
    );
    let nnz = ci.len();
    let mut out = vec![0f32; nnz];
    let ranges = row_ranges(&ro, parts());
    split_by_rows(&mut out, &ranges, |r| ro[r] as usize)
        .into_par_iter()
        .for_each(|(r0, r1, chunk)| {
            let base = ro[r0] as usize;
            for r in r0..r1 {
                for k in ro[r] as usize..ro[r + 1] as usize {
                    chunk[k - base] = dv.at(r, ci[k] as usize);
                }
            }
        });
    let out = FlexFloat::from_data(TensorData::new(out, [nnz]));
    cast_back(out, dtype)
}

impl SparseBackend for Flex {
    fn csr_spmm(
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        _inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        b: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        spmm(&s, &st, &perm, values, b, rows)
    }

    fn csr_sddmm(
        s: CsrIndices<Self>,
        _st: CsrIndices<Self>,
        _perm: IntTensor<Self>,
        _inverse: IntTensor<Self>,
        a: FloatTensor<Self>,
        bt: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        sddmm(&s, a, bt)
    }

    fn csr_add(
        s: CsrIndices<Self>,
        values: FloatTensor<Self>,
        dense: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        csr_add(&s, values, dense)
    }

    fn csr_gather(s: CsrIndices<Self>, dense: FloatTensor<Self>) -> FloatTensor<Self> {
        csr_gather(&s, dense)
    }
}

// ---------------------------------------------------------------------------------------------
// The sparse linear term accumulated into a dense output

/// `dense + x·Sᵀ` for the structure `S` (`[out, in]`, its transpose `st`, `perm` as in
/// [`SparseBackend`]), `x` `[tokens, in]`, `dense` `[tokens, out]`: the adapter SpMM of
/// [`spmm_token_columns`] (blocks of 16 tokens walking `S` by columns), each block's
/// `[out][16]` accumulator transposed and added into its 16 rows of `dense` in place (no
/// `[tokens, out]` temporary, no separate add). `dense` is written in place when its buffer is
/// not shared (the caller hands it over: a clone kept elsewhere would make this a copy of the
/// whole output). Other dtypes and a column-strided `x` take the composed ops
/// ([`linear_add_fits`] says which).
pub(crate) fn linear_add(
    st: &CsrIndices<Flex>,
    perm: &IntTensor<Flex>,
    values: FlexFloat,
    x: FlexFloat,
    dense: FlexFloat,
) -> FlexFloat {
    assert!(
        linear_add_fits(&values, &x, &dense),
        "csr_linear_add: f32 operands and a row-major x"
    );
    let [tokens, out] = dense.shape().dims::<2>();
    let inp = x.shape()[1];
    assert_eq!(
        x.shape()[0],
        tokens,
        "csr_linear_add: x and dense rows differ"
    );
    let (sto, sti, perm) = (
        indices(&st.row_offsets),
        indices(&st.col_indices),
        indices(perm),
    );
    assert_eq!(sto.len(), inp + 1, "csr_linear_add: S has not x's columns");
    let values = values.to_contiguous();
    let vals = values.as_slice::<f32>().expect("contiguous values");
    assert_eq!(perm.len(), vals.len(), "csr_linear_add: perm length");
    let vt: Vec<f32> = perm.iter().map(|&p| vals[p as usize]).collect();
    let mut dense = if dense.is_contiguous() && dense.layout().start_offset() == 0 {
        dense
    } else {
        dense.to_contiguous()
    };
    if tokens * out == 0 || vt.is_empty() {
        return dense;
    }
    let xv = view(&x);
    let cols = simd::Columns::new(&sto, &sti, &vt, out);
    const TB: usize = 16;
    // In place when the buffer is not shared (copy-on-write otherwise).
    let buf = &mut dense.storage_mut::<f32>()[..tokens * out];
    buf.par_chunks_mut(TB * out)
        .enumerate()
        .for_each(|(blk, chunk)| {
            let w = chunk.len() / out;
            with_scratch(TB * out, |acc| {
                acc.fill(0.0);
                let rows = &xv.data[xv.offset + blk * TB * xv.rs..];
                simd::spmm_columns(rows, xv.rs, w, &cols, acc);
                simd::transpose_add(acc, TB, chunk, out, out, w);
            });
        });
    dense
}

/// Whether [`linear_add`] takes these operands: f32, and `x` with contiguous rows.
pub(crate) fn linear_add_fits(values: &FlexFloat, x: &FlexFloat, dense: &FlexFloat) -> bool {
    let f32s = [values, x, dense].iter().all(|t| t.dtype() == DType::F32);
    f32s && x.layout().strides()[1] == 1 && x.layout().strides()[0] >= 0
}
