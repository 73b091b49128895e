//! SDDMM: `output[k] = dot(a[row(k), :], bt[col(k), :])`, and the row search shared by the
//! per-entry kernels.

use cubecl::prelude::*;

/// The row owning entry `k`: the smallest `r` with `row_offsets[r + 1] > k` (binary search, so
/// no per-entry row array is stored; empty rows are skipped naturally).
#[cube]
pub fn find_row<I: Int>(row_offsets: &Tensor<I>, k: usize) -> usize {
    let mut lo = 0usize;
    let mut hi = row_offsets.shape(0) - 1;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if usize::cast_from(row_offsets[mid + 1]) <= k {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// One thread per stored entry: the dot product of `a`'s row and `bt`'s row over `d`.
/// `a` (`[rows, d]`) and `bt` (`[cols, d]`) may have any strides.
#[cube(launch)]
pub fn csr_sddmm_kernel<F: Float, I: Int>(
    row_offsets: &Tensor<I>,
    col_indices: &Tensor<I>,
    a: &Tensor<F>,
    bt: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let k = ABSOLUTE_POS;
    if k >= output.shape(0) {
        terminate!();
    }
    let row = find_row::<I>(row_offsets, k);
    let col = usize::cast_from(col_indices[k]);
    let (a0, a1) = (row * a.stride(0), a.stride(1));
    let (b0, b1) = (col * bt.stride(0), bt.stride(1));
    let mut acc = F::new(0.0);
    for t in 0..a.shape(1) {
        acc += a[a0 + t * a1] * bt[b0 + t * b1];
    }
    output[k] = acc;
}
