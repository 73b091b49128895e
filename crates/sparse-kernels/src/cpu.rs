//! CPU kernels for the `Flex` backend: rayon over rows or token blocks, inner loops over
//! fixed-width lane arrays that LLVM turns into AVX-512 / AVX2 code (chosen at run time).
//!
//! Layout choices (see `docs/architecture.md`, "sparse-kernels"):
//! - SpMM `C = S·B` with `B` row-major: rows of `S` are split across threads by entry count; for
//!   each block of `LANES` columns of `B`, a row accumulates `values[k] · B[col[k], block]` in
//!   registers. No packing is needed: the block of `B` stays in L2.
//! - SpMM with `B = xᵀ` (a transposed view of a row-major activation `x`, the adapter case
//!   `y = x·Sᵀ`): each thread packs a `[cols][LANES]` panel of `x` (a block of tokens, transposed)
//!   and writes its block of `y` directly, so the result is the contiguous `y`, not `yᵀ`.
//! - SDDMM: the contracted dimension (tokens) is cut into blocks; per block both operands are
//!   packed into `[rows][LANES]` panels that fit in L2, then every entry adds the dot product of
//!   two panel rows. Threads own disjoint ranges of rows, hence of output entries.

use burn::backend::{
    Flex, TensorMetadata,
    ops::FloatTensorOps,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::{DType, FloatDType, TensorData};
use rayon::prelude::*;

use crate::backend::{CsrIndices, SparseBackend};

type FlexFloat = FloatTensor<Flex>;

/// Token-block width of the SpMM kernels (lanes kept in registers per output row).
const LANES: usize = 32;

/// Runs `$body` compiled for AVX-512, AVX2+FMA, or the baseline, whichever the CPU supports.
macro_rules! multiversion {
    (fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: `avx512` only requires the target features detected just above.
                    #[allow(unsafe_code)]
                    let out = unsafe { avx512($($arg),*) };
                    return out;
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: `avx2` only requires the target features detected just above.
                    #[allow(unsafe_code)]
                    let out = unsafe { avx2($($arg),*) };
                    return out;
                }
            }
            generic($($arg),*)
        }
    };
}

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

multiversion! {
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

multiversion! {
    fn spmm_token_block(
        ro: &[i32],
        ci: &[i32],
        vals: &[f32],
        b: View<'_>,
        nb: usize,
        panel: &mut [f32],
        out: &mut [f32],
    ) {
        // Packs B[:, nb..nb+w] (B = xᵀ, rs == 1) into panel[c][LANES], then writes
        // out[j][o] = C[o, nb + j] for j < w: `out` is rows nb..nb+w of Cᵀ.
        let rows = ro.len() - 1;
        let w = (b.cols - nb).min(LANES);
        // Transposing copy in tiles of 16 rows of the panel, so the tile being filled stays in
        // L1 while every token row is read sequentially.
        for c0 in (0..b.rows).step_by(16) {
            let h = (b.rows - c0).min(16);
            for j in 0..w {
                let base = b.offset + (nb + j) * b.cs + c0;
                for (cc, s) in b.data[base..base + h].iter().enumerate() {
                    panel[(c0 + cc) * LANES + j] = *s;
                }
            }
        }
        for j in w..LANES {
            for c in 0..b.rows {
                panel[c * LANES + j] = 0.0;
            }
        }
        for o in 0..rows {
            let mut acc = [0f32; LANES];
            for k in ro[o] as usize..ro[o + 1] as usize {
                let v = vals[k];
                let start = ci[k] as usize * LANES;
                let src: &[f32; LANES] = panel[start..start + LANES].try_into().unwrap();
                for (a, x) in acc.iter_mut().zip(src) {
                    *a += v * x;
                }
            }
            for (j, a) in acc.iter().enumerate().take(w) {
                out[j * rows + o] = *a;
            }
        }
    }
}

fn spmm(s: &CsrIndices<Flex>, values: FlexFloat, b: FlexFloat, rows: usize) -> FlexFloat {
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
    let threads = rayon::current_num_threads();
    if bv.rs == 1 && bv.cs != 1 && n >= LANES * threads {
        // Adapter case: B is a transposed view of a row-major x. Produce Cᵀ contiguous.
        let mut out = vec![0f32; rows * n];
        out.par_chunks_mut(LANES * rows).enumerate().for_each_init(
            || vec![0f32; bv.rows * LANES],
            |panel, (blk, chunk)| spmm_token_block(&ro, &ci, vals, bv, blk * LANES, panel, chunk),
        );
        let ct = FlexFloat::from_data(TensorData::new(out, [n, rows]));
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

/// Packs columns `d0..d0+w` of `v` into `panel[i][lanes]` for rows `i0..i0+chunk/lanes`.
fn pack_rows(v: View<'_>, d0: usize, w: usize, lanes: usize, i0: usize, chunk: &mut [f32]) {
    let count = chunk.len() / lanes;
    if v.cs == 1 {
        for (i, dst) in chunk.chunks_exact_mut(lanes).enumerate() {
            let start = v.offset + (i0 + i) * v.rs + d0;
            dst[..w].copy_from_slice(&v.data[start..start + w]);
            dst[w..].fill(0.0);
        }
    } else {
        // Transposing copy in tiles of 16 panel rows (they stay in L1 while being filled).
        for t0 in (0..count).step_by(16) {
            let h = (count - t0).min(16);
            for t in 0..lanes {
                if t < w {
                    let base = v.offset + (d0 + t) * v.cs + (i0 + t0) * v.rs;
                    for i in 0..h {
                        chunk[(t0 + i) * lanes + t] = v.data[base + i * v.rs];
                    }
                } else {
                    for i in 0..h {
                        chunk[(t0 + i) * lanes + t] = 0.0;
                    }
                }
            }
        }
    }
}

fn pack(v: View<'_>, d0: usize, w: usize, lanes: usize, panel: &mut [f32]) {
    let rows_per = (v.rows / rayon::current_num_threads()).clamp(64, 4096);
    panel
        .par_chunks_mut(rows_per * lanes)
        .enumerate()
        .for_each(|(p, chunk)| pack_rows(v, d0, w, lanes, p * rows_per, chunk));
}

macro_rules! sddmm_block_kernel {
    ($name:ident, $lanes:expr) => {
        multiversion! {
            fn $name(
                ro: &[i32],
                ci: &[i32],
                pa: &[f32],
                pb: &[f32],
                r0: usize,
                r1: usize,
                out: &mut [f32],
            ) {
                const L: usize = $lanes;
                let base = ro[r0] as usize;
                for i in r0..r1 {
                    let a: &[f32; L] = pa[i * L..(i + 1) * L].try_into().unwrap();
                    for k in ro[i] as usize..ro[i + 1] as usize {
                        let start = ci[k] as usize * L;
                        let b: &[f32; L] = pb[start..start + L].try_into().unwrap();
                        let mut acc = [0f32; 16];
                        for (ac, bc) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
                            for ((s, x), y) in acc.iter_mut().zip(ac).zip(bc) {
                                *s += x * y;
                            }
                        }
                        // Pairwise (tree) sum: short dependency chains, vector shuffles.
                        let (lo, hi) = acc.split_at(8);
                        let h: [f32; 8] = std::array::from_fn(|l| lo[l] + hi[l]);
                        let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
                        out[k - base] += (q[0] + q[2]) + (q[1] + q[3]);
                    }
                }
            }
        }
    };
}
sddmm_block_kernel!(sddmm_block_16, 16);
sddmm_block_kernel!(sddmm_block_32, 32);
sddmm_block_kernel!(sddmm_block_64, 64);

fn sddmm(s: &CsrIndices<Flex>, a: FlexFloat, bt: FlexFloat) -> FlexFloat {
    let (ro, ci) = (indices(&s.row_offsets), indices(&s.col_indices));
    let nnz = ci.len();
    let (a, dtype) = prepare(a);
    let (bt, _) = prepare(bt);
    let (av, bv) = (view(&a), view(&bt));
    assert_eq!(ro.len(), av.rows + 1, "csr_sddmm: a has {} rows", av.rows);
    assert_eq!(av.cols, bv.cols, "csr_sddmm: inner dimensions differ");
    let d = av.cols;
    let mut out = vec![0f32; nnz];
    if nnz == 0 || d == 0 {
        return cast_back(FlexFloat::from_data(TensorData::new(out, [nnz])), dtype);
    }
    // Panel width: the `bt` panel (`cols x lanes`) should stay within ~1.5 MB of L2.
    let lanes = if bv.rows * 64 * 4 <= 3 << 19 {
        64
    } else if bv.rows * 32 * 4 <= 3 << 19 {
        32
    } else {
        16
    };
    let kernel = match lanes {
        64 => sddmm_block_64,
        32 => sddmm_block_32,
        _ => sddmm_block_16,
    };
    let mut pa = vec![0f32; av.rows * lanes];
    let mut pb = vec![0f32; bv.rows * lanes];
    let ranges = row_ranges(&ro, parts());
    let mut d0 = 0;
    while d0 < d {
        let w = (d - d0).min(lanes);
        pack(av, d0, w, lanes, &mut pa);
        pack(bv, d0, w, lanes, &mut pb);
        split_by_rows(&mut out, &ranges, |r| ro[r] as usize)
            .into_par_iter()
            .for_each(|(r0, r1, chunk)| kernel(&ro, &ci, &pa, &pb, r0, r1, chunk));
        d0 += lanes;
    }
    let out = FlexFloat::from_data(TensorData::new(out, [nnz]));
    cast_back(out, dtype)
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
        _st: CsrIndices<Self>,
        _perm: IntTensor<Self>,
        values: FloatTensor<Self>,
        b: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        spmm(&s, values, b, rows)
    }

    fn csr_sddmm(
        s: CsrIndices<Self>,
        _st: CsrIndices<Self>,
        _perm: IntTensor<Self>,
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
