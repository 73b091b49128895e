//! Sparse matrices on a device: [`CsrLayout`] (the structure, uploaded once) and [`Csr`]
//! (a layout plus a values tensor).

use std::sync::Arc;

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};

use crate::backend::CsrIndices;
use crate::{CsrStructure, SparseError};

fn upload(values: &[u32], device: &Device) -> Tensor<1, Int> {
    // Every index is <= i32::MAX (checked by `CsrStructure`), so the cast is exact.
    let data: Vec<i32> = values.iter().map(|&v| v as i32).collect();
    Tensor::from_data(TensorData::new(data, [values.len()]), (device, DType::I32))
}

/// A [`CsrStructure`] uploaded to a device together with its transpose, which the backward
/// passes need (`dX = dY·S` is an SpMM with `Sᵀ`).
///
/// Cheap to clone (tensors are reference counted). One layout serves a values tensor, its
/// gradient and any optimizer state of the same structure.
#[derive(Clone, Debug)]
pub struct CsrLayout {
    structure: Arc<CsrStructure>,
    row_offsets: Tensor<1, Int>,
    col_indices: Tensor<1, Int>,
    t_row_offsets: Tensor<1, Int>,
    t_col_indices: Tensor<1, Int>,
    perm: Tensor<1, Int>,
    inverse_perm: Tensor<1, Int>,
}

impl CsrLayout {
    /// Uploads `structure` (and its transpose) to `device`. O(nnz) on the host.
    pub fn new(structure: CsrStructure, device: &Device) -> Self {
        let (transposed, perm) = structure.transpose();
        let mut inverse = vec![0u32; perm.len()];
        for (k, &p) in perm.iter().enumerate() {
            inverse[p as usize] = k as u32;
        }
        Self {
            row_offsets: upload(structure.row_offsets(), device),
            col_indices: upload(structure.col_indices(), device),
            t_row_offsets: upload(transposed.row_offsets(), device),
            t_col_indices: upload(transposed.col_indices(), device),
            perm: upload(&perm, device),
            inverse_perm: upload(&inverse, device),
            structure: Arc::new(structure),
        }
    }

    /// The host-side structure.
    pub fn structure(&self) -> &CsrStructure {
        &self.structure
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.structure.rows()
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.structure.cols()
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        self.structure.shape()
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.structure.nnz()
    }

    /// The device the index tensors live on.
    pub fn device(&self) -> Device {
        self.row_offsets.device()
    }

    /// The row offsets on the device (`i32`, `rows + 1`).
    pub fn row_offsets(&self) -> &Tensor<1, Int> {
        &self.row_offsets
    }

    /// The column indices on the device (`i32`, `nnz`).
    pub fn col_indices(&self) -> &Tensor<1, Int> {
        &self.col_indices
    }

    /// The value permutation of the transpose: `values_of_transpose = values.select(0, perm)`.
    pub fn transpose_permutation(&self) -> &Tensor<1, Int> {
        &self.perm
    }

    /// The layout of the transpose (`cols x rows`); no host work beyond the structure copy.
    pub fn transpose(&self) -> Self {
        let (transposed, _) = self.structure.transpose();
        Self {
            structure: Arc::new(transposed),
            row_offsets: self.t_row_offsets.clone(),
            col_indices: self.t_col_indices.clone(),
            t_row_offsets: self.row_offsets.clone(),
            t_col_indices: self.col_indices.clone(),
            perm: self.inverse_perm.clone(),
            inverse_perm: self.perm.clone(),
        }
    }

    /// The same layout on another device.
    pub fn to_device(&self, device: &Device) -> Self {
        Self::new((*self.structure).clone(), device)
    }

    pub(crate) fn indices(&self) -> CsrIndices<Dispatch> {
        CsrIndices {
            row_offsets: self.row_offsets.clone().into_dispatch(),
            col_indices: self.col_indices.clone().into_dispatch(),
        }
    }

    pub(crate) fn transposed_indices(&self) -> CsrIndices<Dispatch> {
        CsrIndices {
            row_offsets: self.t_row_offsets.clone().into_dispatch(),
            col_indices: self.t_col_indices.clone().into_dispatch(),
        }
    }

    pub(crate) fn perm_dispatch(&self) -> burn::backend::tensor::IntTensor<Dispatch> {
        self.perm.clone().into_dispatch()
    }

    pub(crate) fn inverse_perm_dispatch(&self) -> burn::backend::tensor::IntTensor<Dispatch> {
        self.inverse_perm.clone().into_dispatch()
    }
}

/// A sparse matrix: a [`CsrLayout`] plus its values.
///
/// `values` is an ordinary `Tensor<1>` of length `nnz`, in CSR order; it can be a burn `Param`
/// (e.g. `param.val()`) and receives gradients through every op of this crate.
#[derive(Clone, Debug)]
pub struct Csr {
    /// The structure.
    pub layout: CsrLayout,
    /// One value per entry, in CSR order.
    pub values: Tensor<1>,
}

impl Csr {
    /// Pairs a layout with values, checking the length.
    pub fn new(layout: CsrLayout, values: Tensor<1>) -> Result<Self, SparseError> {
        let found = values.dims()[0];
        if found != layout.nnz() {
            return Err(SparseError::LengthMismatch {
                what: "values",
                expected: layout.nnz(),
                found,
            });
        }
        Ok(Self { layout, values })
    }

    /// A matrix with every stored value zero (RoSA's and SFT's initial state).
    pub fn zeros(layout: CsrLayout) -> Self {
        let values = Tensor::zeros([layout.nnz()], &layout.device());
        Self { layout, values }
    }

    /// The entries of `dense` on `layout` (`dense` sampled on the structure; zeros are kept).
    ///
    /// # Shapes
    /// - `dense`: `[rows, cols]`.
    pub fn from_dense(layout: CsrLayout, dense: Tensor<2>) -> Self {
        let values = crate::ops::csr_gather(&layout, dense);
        Self { layout, values }
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        self.layout.shape()
    }

    /// The dense matrix (see [`to_dense`](crate::to_dense)).
    pub fn to_dense(&self) -> Tensor<2> {
        crate::ops::to_dense(self)
    }
}
