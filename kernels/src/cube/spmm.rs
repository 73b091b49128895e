//! SpMM: `output = S · b` with `S` in CSR form.

use cubecl::prelude::*;

/// One thread per output element `(row, col)`: `Σ_k values[k] · b[col_indices[k], col]` over
/// the entries `k` of `row`. Consecutive threads take consecutive columns, so reads of `b`'s
/// rows are coalesced when `b` is row-major. `b` and `output` may have any strides.
#[cube(launch)]
pub fn csr_spmm_kernel<F: Float, I: Int>(
    row_offsets: &Tensor<I>,
    col_indices: &Tensor<I>,
    values: &Tensor<F>,
    b: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let pos = ABSOLUTE_POS;
    if pos >= output.shape(0) * output.shape(1) {
        terminate!();
    }
    let n = output.shape(1);
    let row = pos / n;
    let col = pos % n;
    let start = usize::cast_from(row_offsets[row]);
    let end = usize::cast_from(row_offsets[row + 1]);
    let mut acc = F::new(0.0);
    for p in start..end {
        acc += values[p] * b[usize::cast_from(col_indices[p]) * b.stride(0) + col * b.stride(1)];
    }
    let idx = row * output.stride(0) + col * output.stride(1);
    output[idx] = acc;
}
