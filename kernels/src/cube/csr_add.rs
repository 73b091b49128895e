//! CSR-add (`dense[row(k), col(k)] += values[k]`), gather (`out[k] = dense[row(k), col(k)]`)
//! and a strided copy used when `dense` cannot be updated in place.

use cubecl::prelude::*;

use crate::cube::sddmm::find_row;

/// One thread per stored entry. Entries of a valid CSR are distinct positions, so there are no
/// write conflicts. `dense` may have any (non-aliasing) strides.
#[cube(launch)]
pub fn csr_add_kernel<F: Float, I: Int>(
    row_offsets: &Tensor<I>,
    col_indices: &Tensor<I>,
    values: &Tensor<F>,
    dense: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let k = ABSOLUTE_POS;
    if k >= values.shape(0) {
        terminate!();
    }
    let row = find_row::<I>(row_offsets, k);
    let col = usize::cast_from(col_indices[k]);
    let idx = row * dense.stride(0) + col * dense.stride(1);
    dense[idx] += values[k];
}

/// One thread per stored entry: `output[k] = dense[row(k), col(k)]`.
#[cube(launch)]
pub fn csr_gather_kernel<F: Float, I: Int>(
    row_offsets: &Tensor<I>,
    col_indices: &Tensor<I>,
    dense: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let k = ABSOLUTE_POS;
    if k >= output.shape(0) {
        terminate!();
    }
    let row = find_row::<I>(row_offsets, k);
    let col = usize::cast_from(col_indices[k]);
    output[k] = dense[row * dense.stride(0) + col * dense.stride(1)];
}

/// One thread per element: a strided 2-D `input` copied into `output`.
#[cube(launch)]
pub fn copy_2d_kernel<F: Float>(
    input: &Tensor<F>,
    output: &mut Tensor<F>,
    #[define(F)] _dtype: ElemType,
) {
    let pos = ABSOLUTE_POS;
    let cols = output.shape(1);
    if pos >= output.shape(0) * cols {
        terminate!();
    }
    let (r, c) = (pos / cols, pos % cols);
    let idx = r * output.stride(0) + c * output.stride(1);
    output[idx] = input[r * input.stride(0) + c * input.stride(1)];
}
