//! The inner loops of the CPU kernels, with an AVX-512 version picked at run time and a
//! portable version for every other CPU: a blocked transpose (16x16 register transposes, also
//! into uninitialised memory), dot products (four FMA accumulators, one horizontal sum), the
//! adapter SpMM's column walk (`spmm_columns`) and the SDDMM's per-entry 16-lane partial sums
//! (`sddmm_lanes`).
//!
//! Every function checks its slice bounds once on entry (a structure's indices once per call,
//! through `Columns::new`); the AVX-512 bodies then use raw pointers inside those bounds. This
//! module holds the crate's `unsafe` code, besides the call of `peft_kernels::cpu::par_fill_uninit`
//! in `cpu.rs`.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Whether the AVX-512 bodies run: the CPU has AVX-512F and no narrower body is forced
/// ([`CpuBody::current`](peft_kernels::cpu_body::CpuBody::current)).
#[inline]
pub(crate) fn avx512() -> bool {
    peft_kernels::cpu_body::CpuBody::current() == peft_kernels::cpu_body::CpuBody::Avx512
}

/// `dst[j · ds + i] = src[i · ss + j]` for `i < rows`, `j < cols`.
///
/// # Panics
/// When a slice is too short for the shape and strides.
pub(crate) fn transpose(
    src: &[f32],
    ss: usize,
    dst: &mut [f32],
    ds: usize,
    rows: usize,
    cols: usize,
) {
    check_transpose(src, ss, dst.len(), ds, rows, cols);
    // SAFETY: the bounds of `src` and `dst` are checked just above.
    unsafe { transpose_ptr(src, ss, dst.as_mut_ptr(), ds, rows, cols) };
}

/// [`transpose`] into uninitialised memory that it fills whole: `dst[j · rows + i] = src[i · ss
/// + j]`, so `dst` must hold exactly `rows · cols` floats. Returns `dst`, now initialised.
///
/// # Panics
/// When `dst` does not hold `rows · cols` floats or `src` is too short.
pub(crate) fn transpose_uninit<'a>(
    src: &[f32],
    ss: usize,
    dst: &'a mut [MaybeUninit<f32>],
    rows: usize,
    cols: usize,
) -> &'a mut [f32] {
    assert_eq!(
        dst.len(),
        rows * cols,
        "transpose_uninit: dst is not rows x cols"
    );
    check_transpose(src, ss, dst.len(), rows, rows, cols);
    let p = dst.as_mut_ptr().cast::<f32>();
    // SAFETY: bounds checked above; with `ds == rows` the transpose writes every one of the
    // `rows · cols` floats of `dst`, so the returned slice is initialised.
    unsafe {
        transpose_ptr(src, ss, p, rows, rows, cols);
        std::slice::from_raw_parts_mut(p, rows * cols)
    }
}

fn check_transpose(src: &[f32], ss: usize, dst_len: usize, ds: usize, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(cols <= ss || rows == 1, "transpose: source stride");
    assert!(rows <= ds || cols == 1, "transpose: destination stride");
    assert!(
        src.len() >= (rows - 1) * ss + cols,
        "transpose: source length"
    );
    assert!(
        dst_len >= (cols - 1) * ds + rows,
        "transpose: destination length"
    );
}

/// # Safety
/// `dst` is valid for writes at every `j · ds + i`, `i < rows`, `j < cols`, and the source
/// bounds hold (`check_transpose`).
unsafe fn transpose_ptr(
    src: &[f32],
    ss: usize,
    dst: *mut f32,
    ds: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available (checked above); bounds as the caller guarantees.
        unsafe { transpose_avx512(src, ss, dst, ds, rows, cols) };
        return;
    }
    // SAFETY: as the caller guarantees.
    unsafe { transpose_tiles(src, ss, dst, ds, 0, rows, 0, cols) };
}

/// The portable transpose of `rows r0..r1`, `cols c0..c1`, in 16x16 tiles.
///
/// # Safety
/// As [`transpose_ptr`].
#[allow(clippy::too_many_arguments)]
unsafe fn transpose_tiles(
    src: &[f32],
    ss: usize,
    dst: *mut f32,
    ds: usize,
    r0: usize,
    r1: usize,
    c0: usize,
    c1: usize,
) {
    for i0 in (r0..r1).step_by(16) {
        let i1 = (i0 + 16).min(r1);
        for j0 in (c0..c1).step_by(16) {
            let j1 = (j0 + 16).min(c1);
            for i in i0..i1 {
                let row = &src[i * ss + j0..i * ss + j1];
                for (j, v) in (j0..j1).zip(row) {
                    // SAFETY: i < rows and j < cols (the caller's bounds).
                    unsafe { dst.add(j * ds + i).write(*v) };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(
    src: &[f32],
    ss: usize,
    dst: *mut f32,
    ds: usize,
    rows: usize,
    cols: usize,
) {
    let (full_r, full_c) = (rows / 16 * 16, cols / 16 * 16);
    let (sp, dp) = (src.as_ptr(), dst);
    for i0 in (0..full_r).step_by(16) {
        for j0 in (0..full_c).step_by(16) {
            // SAFETY: rows i0..i0+16 < rows and columns j0..j0+16 <= cols, so every load is
            // inside `src` and every store inside `dst` (the caller's bounds).
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for (k, v) in r.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(sp.add((i0 + k) * ss + j0));
                }
                let c = transpose16(r);
                for (k, v) in c.iter().enumerate() {
                    _mm512_storeu_ps(dp.add((j0 + k) * ds + i0), *v);
                }
            }
        }
    }
    // Edges: the last rows % 16 rows and the last cols % 16 columns.
    // SAFETY: the same bounds.
    unsafe {
        transpose_tiles(src, ss, dst, ds, full_r, rows, 0, cols);
        transpose_tiles(src, ss, dst, ds, 0, full_r, full_c, cols);
    }
}

/// `dst[j · ds + i] += src[i · ss + j]` for `i < rows`, `j < cols`: [`transpose`] adding into
/// `dst` (the adapter SpMM accumulating into a layer's output rows).
///
/// # Panics
/// When a slice is too short for the shape and strides.
pub(crate) fn transpose_add(
    src: &[f32],
    ss: usize,
    dst: &mut [f32],
    ds: usize,
    rows: usize,
    cols: usize,
) {
    check_transpose(src, ss, dst.len(), ds, rows, cols);
    if rows == 0 || cols == 0 {
        return;
    }
    let (full_r, full_c) = if avx512() {
        (rows / 16 * 16, cols / 16 * 16)
    } else {
        (0, 0)
    };
    #[cfg(target_arch = "x86_64")]
    if full_r > 0 && full_c > 0 {
        // SAFETY: AVX-512F is available (`avx512`); the full tiles lie inside the bounds
        // checked above.
        unsafe { transpose_add_avx512(src, ss, dst.as_mut_ptr(), ds, full_r, full_c) };
    }
    let mut edge = |r0: usize, r1: usize, c0: usize, c1: usize| {
        for i in r0..r1 {
            for j in c0..c1 {
                dst[j * ds + i] += src[i * ss + j];
            }
        }
    };
    if full_r == 0 || full_c == 0 {
        edge(0, rows, 0, cols);
    } else {
        edge(full_r, rows, 0, cols);
        edge(0, full_r, full_c, cols);
    }
}

/// The full 16x16 tiles of [`transpose_add`] (`rows`, `cols` multiples of 16).
///
/// # Safety
/// AVX-512F is available and the bounds of [`check_transpose`] hold for `rows x cols`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_add_avx512(
    src: &[f32],
    ss: usize,
    dst: *mut f32,
    ds: usize,
    rows: usize,
    cols: usize,
) {
    let sp = src.as_ptr();
    for i0 in (0..rows).step_by(16) {
        for j0 in (0..cols).step_by(16) {
            // SAFETY: rows i0..i0+16 <= rows and columns j0..j0+16 <= cols (the caller's bounds).
            unsafe {
                let mut r = [_mm512_setzero_ps(); 16];
                for (k, v) in r.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(sp.add((i0 + k) * ss + j0));
                }
                let c = transpose16(r);
                for (k, v) in c.iter().enumerate() {
                    let p = dst.add((j0 + k) * ds + i0);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
                }
            }
        }
    }
}

/// Transposes 16 rows of 16 floats in registers: unpack pairs, then 4x4 blocks within 128-bit
/// lanes, then the lanes themselves.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    let mut t = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    // u[4q + m] holds, in 128-bit lane L, rows 4q..4q+4 of column 4L + m.
    let mut u = [_mm512_setzero_ps(); 16];
    for q in 0..4 {
        let (lo0, hi0, lo1, hi1) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        u[4 * q] = _mm512_shuffle_ps::<0x44>(lo0, lo1);
        u[4 * q + 1] = _mm512_shuffle_ps::<0xEE>(lo0, lo1);
        u[4 * q + 2] = _mm512_shuffle_ps::<0x44>(hi0, hi1);
        u[4 * q + 3] = _mm512_shuffle_ps::<0xEE>(hi0, hi1);
    }
    // v[m] / v[m + 4]: columns {m, m + 8} / {m + 4, m + 12} of rows 0..8; v[8 + ..]: rows 8..16.
    let mut v = [_mm512_setzero_ps(); 16];
    for m in 0..4 {
        v[m] = _mm512_shuffle_f32x4::<0x88>(u[m], u[4 + m]);
        v[4 + m] = _mm512_shuffle_f32x4::<0xDD>(u[m], u[4 + m]);
        v[8 + m] = _mm512_shuffle_f32x4::<0x88>(u[8 + m], u[12 + m]);
        v[12 + m] = _mm512_shuffle_f32x4::<0xDD>(u[8 + m], u[12 + m]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for m in 0..8 {
        out[m] = _mm512_shuffle_f32x4::<0x88>(v[m], v[8 + m]);
        out[8 + m] = _mm512_shuffle_f32x4::<0xDD>(v[m], v[8 + m]);
    }
    out
}

/// `Σ a[i] · b[i]`.
///
/// # Panics
/// When the lengths differ.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available; `dot_avx512` reads `a` and `b` within their common
        // length.
        return unsafe { dot_avx512(a, b) };
    }
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 16 floats at offsets i..i+16 <= n of both slices.
    unsafe {
        while i + 64 <= n {
            for (l, s) in acc.iter_mut().enumerate() {
                let x = _mm512_loadu_ps(pa.add(i + 16 * l));
                let y = _mm512_loadu_ps(pb.add(i + 16 * l));
                *s = _mm512_fmadd_ps(x, y, *s);
            }
            i += 64;
        }
        while i + 16 <= n {
            let x = _mm512_loadu_ps(pa.add(i));
            let y = _mm512_loadu_ps(pb.add(i));
            acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
            i += 16;
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut total = _mm512_reduce_add_ps(s);
    for j in i..n {
        total += a[j] * b[j];
    }
    total
}

/// `[Σ a·b0, Σ a·b1, Σ a·b2, Σ a·b3]`: four dot products sharing `a` (one load of `a` per
/// four FMAs, four independent chains).
///
/// # Panics
/// When the lengths differ.
#[inline]
pub(crate) fn dot4(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    assert!(b.iter().all(|x| x.len() == a.len()), "dot4: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512() && a.len().is_multiple_of(16) {
        // SAFETY: AVX-512F is available; `dot4_avx512` reads 16 floats at offsets below the
        // common length, a multiple of 16.
        return unsafe { dot4_avx512(a, b) };
    }
    b.map(|x| dot(a, x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot4_avx512(a: &[f32], b: [&[f32]; 4]) -> [f32; 4] {
    let n = a.len();
    let pa = a.as_ptr();
    let pb = b.map(<[f32]>::as_ptr);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i < n {
        // SAFETY: i + 16 <= n for every slice (n is a multiple of 16).
        unsafe {
            let x = _mm512_loadu_ps(pa.add(i));
            for (s, p) in acc.iter_mut().zip(pb) {
                *s = _mm512_fmadd_ps(x, _mm512_loadu_ps(p.add(i)), *s);
            }
        }
        i += 16;
    }
    acc.map(|s| _mm512_reduce_add_ps(s))
}

/// The CSR of `Sᵀ` (column offsets, row of every entry, values) for [`spmm_columns`], checked
/// once: the offsets cover exactly the entries and every column's rows are strictly increasing
/// (hence distinct) and below `rows`.
pub(crate) struct Columns<'a> {
    offsets: &'a [i32],
    rows_of: &'a [i32],
    vals: &'a [f32],
    rows: usize,
}

impl<'a> Columns<'a> {
    /// # Panics
    /// When the lengths disagree, the offsets are not non-decreasing from 0 to the entry count,
    /// or a column's rows are not strictly increasing inside `0..rows`.
    pub(crate) fn new(
        offsets: &'a [i32],
        rows_of: &'a [i32],
        vals: &'a [f32],
        rows: usize,
    ) -> Self {
        assert!(
            !offsets.is_empty() && offsets[0] == 0,
            "Columns: offsets start at 0"
        );
        assert!(
            offsets.windows(2).all(|p| p[0] <= p[1]),
            "Columns: offsets decrease"
        );
        assert_eq!(rows_of.len(), vals.len(), "Columns: lengths differ");
        assert_eq!(
            offsets[offsets.len() - 1] as usize,
            vals.len(),
            "Columns: entry count"
        );
        let inner = offsets.len() - 1;
        for j in 0..inner {
            let col = &rows_of[offsets[j] as usize..offsets[j + 1] as usize];
            assert!(
                col.iter().all(|&o| o >= 0 && (o as usize) < rows),
                "Columns: row outside 0..rows"
            );
            assert!(
                col.windows(2).all(|p| p[0] < p[1]),
                "Columns: rows of a column not strictly increasing"
            );
        }
        Columns {
            offsets,
            rows_of,
            vals,
            rows,
        }
    }

    /// Number of columns.
    fn inner(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Entries of column `j`.
    fn range(&self, j: usize) -> (usize, usize) {
        (self.offsets[j] as usize, self.offsets[j + 1] as usize)
    }
}

/// `acc[o] = fma(v, col, acc[o])` for the entries `t0..t1`, two at a time (distinct rows, so
/// the paired loads see no pending store).
///
/// # Safety
/// AVX-512F is available, `t1 <= cols.vals.len()` and every row index is below
/// `acc.len() / 16` where `ap` points at `acc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn column_update(cols: &Columns<'_>, t0: usize, t1: usize, c: __m512, ap: *mut f32) {
    let (ri, vp) = (cols.rows_of.as_ptr(), cols.vals.as_ptr());
    // SAFETY: as the caller guarantees.
    unsafe {
        let mut t = t0;
        while t + 2 <= t1 {
            let p0 = ap.add(16 * *ri.add(t) as usize);
            let p1 = ap.add(16 * *ri.add(t + 1) as usize);
            let (a0, a1) = (_mm512_loadu_ps(p0), _mm512_loadu_ps(p1));
            let v0 = _mm512_set1_ps(*vp.add(t));
            let v1 = _mm512_set1_ps(*vp.add(t + 1));
            _mm512_storeu_ps(p0, _mm512_fmadd_ps(v0, c, a0));
            _mm512_storeu_ps(p1, _mm512_fmadd_ps(v1, c, a1));
            t += 2;
        }
        if t < t1 {
            let p = ap.add(16 * *ri.add(t) as usize);
            let v = _mm512_set1_ps(*vp.add(t));
            _mm512_storeu_ps(p, _mm512_fmadd_ps(v, c, _mm512_loadu_ps(p)));
        }
    }
}

/// One block of at most 16 tokens of the adapter SpMM `y = x·Sᵀ`, in column order: for every
/// column `j` of `x`, `acc[o][l] += v · x[l, j]` for every entry `(o, v)` of column `j` of `S`.
/// The block's 16x16 tiles of `x` are transposed in registers and never stored; `acc`
/// (`16 · rows` floats) stays in L1. Lanes `w..16` of `acc` are left unspecified.
///
/// # Panics
/// When `w > 16`, `x` is too short for `w` rows of the structure's column count at stride `xs`,
/// or `acc` does not hold 16 floats per row.
pub(crate) fn spmm_columns(x: &[f32], xs: usize, w: usize, cols: &Columns<'_>, acc: &mut [f32]) {
    let inner = cols.inner();
    assert!(w <= 16, "spmm_columns: at most 16 tokens");
    assert_eq!(acc.len(), 16 * cols.rows, "spmm_columns: 16 lanes per row");
    if w == 0 || inner == 0 {
        return;
    }
    assert!(x.len() >= (w - 1) * xs + inner, "spmm_columns: x too short");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available; the bounds of x and acc are asserted above, those of
        // the structure by `Columns::new` (see `spmm_columns_avx512`).
        unsafe { spmm_columns_avx512(x, xs, w, cols, acc) };
        return;
    }
    let mut col = [0f32; 16];
    for j in 0..inner {
        for (l, c) in col.iter_mut().enumerate().take(w) {
            *c = x[l * xs + j];
        }
        let (t0, t1) = cols.range(j);
        for t in t0..t1 {
            let (o, v) = (cols.rows_of[t] as usize, cols.vals[t]);
            for (a, c) in acc[16 * o..16 * o + 16].iter_mut().zip(&col) {
                *a = v.mul_add(*c, *a);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn spmm_columns_avx512(x: &[f32], xs: usize, w: usize, cols: &Columns<'_>, acc: &mut [f32]) {
    let inner = cols.inner();
    let (xp, ap) = (x.as_ptr(), acc.as_mut_ptr());
    let full = inner / 16 * 16;
    let mut edge = [0f32; 256];
    for j0 in (0..inner).step_by(16) {
        let jw = (inner - j0).min(16);
        let tile = if w == 16 && j0 < full {
            let mut r = [_mm512_setzero_ps(); 16];
            for (l, v) in r.iter_mut().enumerate() {
                // SAFETY: row l < w and columns j0..j0 + 16 <= inner are inside x.
                *v = unsafe { _mm512_loadu_ps(xp.add(l * xs + j0)) };
            }
            transpose16(r)
        } else {
            // A partial tile: gather it through a zeroed buffer.
            edge.fill(0.0);
            for l in 0..w {
                for jj in 0..jw {
                    edge[jj * 16 + l] = x[l * xs + j0 + jj];
                }
            }
            // SAFETY: edge holds 16 rows of 16 floats.
            std::array::from_fn(|jj| unsafe { _mm512_loadu_ps(edge.as_ptr().add(16 * jj)) })
        };
        for (jj, c) in tile.iter().enumerate().take(jw) {
            let (t0, t1) = cols.range(j0 + jj);
            // SAFETY: the range and its rows were checked by `Columns::new`, acc's length by
            // the caller.
            unsafe { column_update(cols, t0, t1, *c, ap) };
        }
    }
}

/// `acc[e][l] += Σ_s a[16 s + l] · panel[cols[e] · tc + 16 s + l]` with `tc = a.len()`: one
/// row's SDDMM entries over a chunk of `tc` tokens, kept as 16 partial sums per entry (summed
/// once at the end by the caller, so no horizontal sum per chunk).
///
/// # Panics
/// When `tc` is not a multiple of 16 (or above 128), `acc` does not hold 16 floats per entry,
/// or a column's `tc` floats are outside `panel`.
#[inline]
pub(crate) fn sddmm_lanes(a: &[f32], cols: &[i32], panel: &[f32], acc: &mut [f32]) {
    let tc = a.len();
    assert!(
        tc.is_multiple_of(16) && (16..=128).contains(&tc),
        "sddmm_lanes: 16 to 128 tokens, a multiple of 16"
    );
    assert_eq!(
        acc.len(),
        16 * cols.len(),
        "sddmm_lanes: 16 lanes per entry"
    );
    let lines = panel.len() / tc;
    assert!(
        cols.iter().all(|&c| c >= 0 && (c as usize) < lines),
        "sddmm_lanes: column outside the panel"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is available; every column's `tc` floats are inside `panel` and
        // `acc` holds 16 floats per entry (asserted above).
        unsafe { sddmm_lanes_avx512(a, cols, panel, acc) };
        return;
    }
    for (&c, lanes) in cols.iter().zip(acc.chunks_exact_mut(16)) {
        let row = &panel[c as usize * tc..(c as usize + 1) * tc];
        for (x, y) in a.chunks_exact(16).zip(row.chunks_exact(16)) {
            for l in 0..16 {
                lanes[l] = x[l].mul_add(y[l], lanes[l]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sddmm_lanes_avx512(a: &[f32], cols: &[i32], panel: &[f32], acc: &mut [f32]) {
    let tc = a.len();
    let steps = tc / 16;
    let (p, out) = (panel.as_ptr(), acc.as_mut_ptr());
    let mut ra = [_mm512_setzero_ps(); 8];
    for (s, r) in ra.iter_mut().enumerate().take(steps) {
        // SAFETY: 16 (s + 1) <= tc = a.len().
        *r = unsafe { _mm512_loadu_ps(a.as_ptr().add(16 * s)) };
    }
    for (e, &c) in cols.iter().enumerate() {
        // SAFETY: `c · tc + tc <= panel.len()` and `16 e + 16 <= acc.len()` (asserted by the
        // caller).
        unsafe {
            let base = p.add(c as usize * tc);
            // Two chains per entry: the FMAs of one entry overlap with the next entry's.
            let mut s0 = _mm512_loadu_ps(out.add(16 * e));
            let mut s1 = _mm512_setzero_ps();
            let mut s = 0;
            while s + 2 <= steps {
                s0 = _mm512_fmadd_ps(ra[s], _mm512_loadu_ps(base.add(16 * s)), s0);
                s1 = _mm512_fmadd_ps(ra[s + 1], _mm512_loadu_ps(base.add(16 * s + 16)), s1);
                s += 2;
            }
            if s < steps {
                s0 = _mm512_fmadd_ps(ra[s], _mm512_loadu_ps(base.add(16 * s)), s0);
            }
            _mm512_storeu_ps(out.add(16 * e), _mm512_add_ps(s0, s1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_kernels::cpu_body::for_each_cpu_body;

    /// Runs `check` with every body this CPU supports (AVX-512 where it has it, and the
    /// portable one), named for the failure messages.
    fn both_paths(check: impl Fn(&str)) {
        for_each_cpu_body(|body| check(&format!("{body:?}")));
    }

    /// A small deterministic structure: `(offsets, indices)` of `major` lines over `minor`
    /// positions, some lines empty, sorted indices.
    fn structure(major: usize, minor: usize, seed: usize) -> (Vec<i32>, Vec<i32>) {
        let mut offsets = vec![0i32];
        let mut idx = Vec::new();
        for line in 0..major {
            for p in 0..minor {
                if (line * 31 + p * 17 + seed) % 7 < 2 {
                    idx.push(p as i32);
                }
            }
            offsets.push(idx.len() as i32);
        }
        (offsets, idx)
    }

    #[test]
    fn transpose_uninit_fills_every_float() {
        both_paths(|path| {
            for (rows, cols) in [(1, 1), (16, 16), (17, 33), (40, 16), (3, 70), (384, 5)] {
                let ss = cols + 2;
                let src = seq(rows * ss);
                let mut dst = vec![MaybeUninit::<f32>::uninit(); rows * cols];
                let out = transpose_uninit(&src, ss, &mut dst, rows, cols);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(out[j * rows + i], src[i * ss + j], "{path} {rows}x{cols}");
                    }
                }
            }
        });
    }

    #[test]
    fn spmm_columns_matches_a_scalar_sum() {
        both_paths(|path| {
            for (rows, inner, w) in [
                (1, 1, 1),
                (5, 16, 16),
                (7, 17, 16),
                (33, 40, 5),
                (20, 48, 16),
            ] {
                let (offsets, rows_of) = structure(inner, rows, inner + w);
                let vals = seq(rows_of.len() + 1)[1..].to_vec();
                let xs = inner + 3;
                let x = seq(w * xs + 7);
                let start = seq(16 * rows);
                let mut acc = start.clone();
                let cols = Columns::new(&offsets, &rows_of, &vals, rows);
                spmm_columns(&x, xs, w, &cols, &mut acc);
                for o in 0..rows {
                    for l in 0..w {
                        let mut want = start[16 * o + l];
                        for j in 0..inner {
                            for t in offsets[j] as usize..offsets[j + 1] as usize {
                                if rows_of[t] as usize == o {
                                    want += vals[t] * x[l * xs + j];
                                }
                            }
                        }
                        let got = acc[16 * o + l];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{path} {rows}x{inner} w {w}: {got} vs {want}"
                        );
                    }
                }
            }
        });
    }

    #[test]
    #[should_panic(expected = "row outside")]
    fn columns_reject_a_row_outside_the_accumulator() {
        Columns::new(&[0, 1], &[3], &[1.0], 3);
    }

    #[test]
    #[should_panic(expected = "not strictly increasing")]
    fn columns_reject_a_repeated_row() {
        // Two entries of one column on the same row would race in the paired update.
        Columns::new(&[0, 2], &[1, 1], &[1.0, 2.0], 3);
    }

    #[test]
    fn sddmm_lanes_match_dot_products() {
        both_paths(|path| {
            for tc in [16, 48, 128] {
                let (n, rows) = (9, 3);
                let (offsets, cols) = structure(rows, n, tc);
                let panel = seq(n * tc + 5)[5..].to_vec();
                let a_all = seq(rows * tc);
                let start = seq(16 * cols.len() + 2)[2..].to_vec();
                let mut acc = start.clone();
                for i in 0..rows {
                    let (k0, k1) = (offsets[i] as usize, offsets[i + 1] as usize);
                    let a = &a_all[i * tc..(i + 1) * tc];
                    sddmm_lanes(a, &cols[k0..k1], &panel, &mut acc[16 * k0..16 * k1]);
                }
                for i in 0..rows {
                    for k in offsets[i] as usize..offsets[i + 1] as usize {
                        let c = cols[k] as usize;
                        let want: f32 = start[16 * k..16 * k + 16].iter().sum::<f32>()
                            + (0..tc)
                                .map(|t| a_all[i * tc + t] * panel[c * tc + t])
                                .sum::<f32>();
                        let got: f32 = acc[16 * k..16 * k + 16].iter().sum();
                        assert!((got - want).abs() < 1e-4, "{path} tc {tc}: {got} vs {want}");
                    }
                }
            }
        });
    }

    fn seq(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    #[test]
    fn transpose_matches_the_definition_for_edges_and_strides() {
        both_paths(|_| {
            for (rows, cols) in [(1, 1), (16, 16), (17, 33), (40, 16), (3, 70), (64, 48)] {
                let (ss, ds) = (cols + 5, rows + 3);
                let src = seq(rows * ss);
                let mut dst = vec![f32::NAN; cols * ds];
                transpose(&src, ss, &mut dst, ds, rows, cols);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(dst[j * ds + i], src[i * ss + j], "{rows}x{cols} at {i},{j}");
                    }
                }
                // Padding between destination rows is untouched.
                if ds > rows {
                    assert!(dst[rows].is_nan());
                }
            }
        });
    }

    #[test]
    fn dot_products_match_scalar_sums() {
        both_paths(|_| {
            for n in [0, 5, 16, 64, 100, 129] {
                let (a, b) = (seq(n), seq(n + 3)[3..].to_vec());
                let want: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
                assert!((dot(&a, &b) as f64 - want).abs() < 1e-4, "n = {n}");
            }
            for n in [16, 48, 512, 20] {
                let a = seq(n);
                let bs: Vec<Vec<f32>> = (1..5).map(|o| seq(n + o)[o..].to_vec()).collect();
                let got = dot4(&a, [&bs[0], &bs[1], &bs[2], &bs[3]]);
                for (g, b) in got.iter().zip(&bs) {
                    assert!((g - dot(&a, b)).abs() < 1e-4, "dot4, n = {n}");
                }
            }
        });
    }
}
