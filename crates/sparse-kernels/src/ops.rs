//! The sparse operations on burn tensors, for any device and differentiable on autodiff devices.

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor};

use crate::backend::SparseBackend;
use crate::{Csr, CsrLayout};

/// SpMM: `C = A · B` with `A` sparse.
///
/// Differentiable in `a.values` (gradient by SDDMM) and `b` (gradient `Aᵀ · dC`, an SpMM).
///
/// # Shapes
/// - `a`: `[m, k]`; `b`: `[k, n]`, any strides (a transposed view is not copied on CPU);
///   returns `[m, n]`.
///
/// # Panics
/// If `b` has not `k` rows.
pub fn spmm(a: &Csr, b: Tensor<2>) -> Tensor<2> {
    let [m, k] = a.shape();
    assert_eq!(
        b.dims()[0],
        k,
        "spmm: A is {m}x{k} but B has {} rows",
        b.dims()[0]
    );
    let layout = &a.layout;
    Tensor::from_dispatch(Dispatch::csr_spmm(
        layout.indices(),
        layout.transposed_indices(),
        layout.perm_dispatch(),
        layout.inverse_perm_dispatch(),
        a.values.clone().into_dispatch(),
        b.into_dispatch(),
        m,
    ))
}

/// SDDMM: `out[e] = dot(a[row(e), :], bt[col(e), :])` for every entry `e` of `layout`, i.e. the
/// product `a · btᵀ` sampled on the structure (spops' `sddmm(mask, A, BT)`).
///
/// This is the gradient of the values of a sparse linear term: for `y = x·Sᵀ`,
/// `dS = sddmm(S, dYᵀ, Xᵀ)`. Differentiable in `a` and `bt`.
///
/// # Shapes
/// - `layout`: `[m, n]`; `a`: `[m, d]`; `bt`: `[n, d]` (any strides); returns `[nnz]`.
///
/// # Panics
/// If the shapes disagree.
pub fn sddmm(layout: &CsrLayout, a: Tensor<2>, bt: Tensor<2>) -> Tensor<1> {
    let [m, n] = layout.shape();
    let ([am, ad], [bn, bd]) = (a.dims(), bt.dims());
    assert!(
        am == m && bn == n && ad == bd,
        "sddmm: structure {m}x{n}, a {am}x{ad}, bt {bn}x{bd}: need a [{m}, d] and bt [{n}, d]"
    );
    Tensor::from_dispatch(Dispatch::csr_sddmm(
        layout.indices(),
        layout.transposed_indices(),
        layout.perm_dispatch(),
        layout.inverse_perm_dispatch(),
        a.into_dispatch(),
        bt.into_dispatch(),
    ))
}

/// CSR-add: `dense + A`. Writes into `dense`'s buffer when nothing else holds it (pass the
/// tensor by value and drop other clones to get the in-place path).
///
/// Differentiable in `a.values` (gradient: `dOut` sampled on the structure) and `dense`.
///
/// # Shapes
/// - `a`: `[m, n]`; `dense`: `[m, n]`; returns `[m, n]`.
///
/// # Panics
/// If the shapes differ.
pub fn csr_add(a: &Csr, dense: Tensor<2>) -> Tensor<2> {
    assert_eq!(
        dense.dims(),
        a.shape(),
        "csr_add: dense shape differs from the sparse shape"
    );
    Tensor::from_dispatch(Dispatch::csr_add(
        a.layout.indices(),
        a.values.clone().into_dispatch(),
        dense.into_dispatch(),
    ))
}

/// The entries of `dense` at the positions of `layout`, in CSR order (explicit zeros kept).
///
/// SFT's `dW.view(-1).gather(indices)` and the inverse of [`to_dense`]. Differentiable.
///
/// # Shapes
/// - `layout`: `[m, n]`; `dense`: `[m, n]`; returns `[nnz]`.
pub fn csr_gather(layout: &CsrLayout, dense: Tensor<2>) -> Tensor<1> {
    assert_eq!(
        dense.dims(),
        layout.shape(),
        "csr_gather: dense shape differs from the sparse shape"
    );
    Tensor::from_dispatch(Dispatch::csr_gather(
        layout.indices(),
        dense.into_dispatch(),
    ))
}

/// The dense `[m, n]` matrix of `a` (zeros where nothing is stored). Differentiable.
pub fn to_dense(a: &Csr) -> Tensor<2> {
    let zeros = Tensor::zeros(a.shape(), &a.values.device());
    csr_add(a, zeros)
}

/// The transpose of `a`, keeping every entry (explicit zeros included), and the permutation
/// with `transpose.values = a.values.select(0, perm)`. Differentiable in `a.values`.
pub fn csr_transpose(a: &Csr) -> (Csr, Tensor<1, Int>) {
    let perm = a.layout.transpose_permutation().clone();
    let values = a.values.clone().select(0, perm.clone());
    (
        Csr {
            layout: a.layout.transpose(),
            values,
        },
        perm,
    )
}

/// The result when some dimension is zero (burn's `reshape` reads a 0 as "keep this dimension",
/// so zero-sized shapes are handled here): zeros, plus the bias where there are outputs.
fn empty_output<const D: usize>(
    x: &Tensor<D>,
    out: usize,
    bias: Option<Tensor<1>>,
) -> Option<Tensor<D>> {
    let mut dims = x.dims();
    if dims.iter().all(|&d| d > 0) && out > 0 {
        return None;
    }
    dims[D - 1] = out;
    let zeros = Tensor::zeros(dims, &x.device());
    Some(match bias {
        Some(b) if dims.iter().all(|&d| d > 0) => {
            let mut shape = [1; D];
            shape[D - 1] = out;
            zeros + b.reshape(shape)
        }
        _ => zeros,
    })
}

fn flatten<const D: usize>(x: Tensor<D>) -> (Tensor<2>, [usize; D]) {
    let dims = x.dims();
    let last = dims[D - 1];
    let tokens = dims[..D - 1].iter().product();
    (x.reshape([tokens, last]), dims)
}

fn unflatten<const D: usize>(y: Tensor<2>, mut dims: [usize; D], out: usize) -> Tensor<D> {
    dims[D - 1] = out;
    y.reshape(dims)
}

/// The sparse linear term of an adapter: `y = x · Sᵀ` with `S = [out, in]` sparse.
///
/// RoSA's sparse adapter and SFT's delta in activation space. Forward is an SpMM on `xᵀ`
/// (a view: on CPU the kernel packs token blocks itself and writes `y` directly); backward
/// gives `dvalues = sddmm(S, dYᵀ, Xᵀ)` and `dx = dY · S` (an SpMM with `Sᵀ`). No dense
/// weight-shaped tensor is formed in either pass.
///
/// # Arguments
/// - `x`: input, `[..., in]`.
/// - `layout`: the structure of `S`, `[out, in]` (PyTorch's weight orientation).
/// - `values`: `S`'s values (`[nnz]`), typically a `Param`'s `val()`; gets a gradient.
///
/// # Returns
/// `[..., out]`.
///
/// # Panics
/// If `x`'s last dimension is not `in` or `values` has not `nnz` entries.
pub fn sparse_linear<const D: usize>(
    x: Tensor<D>,
    layout: &CsrLayout,
    values: Tensor<1>,
) -> Tensor<D> {
    let [out, inp] = layout.shape();
    assert_eq!(
        x.dims()[D - 1],
        inp,
        "sparse_linear: S is [{out}, {inp}] but x's last dimension is {}",
        x.dims()[D - 1]
    );
    assert_eq!(
        values.dims()[0],
        layout.nnz(),
        "sparse_linear: values length"
    );
    if let Some(y) = empty_output(&x, out, None) {
        return y;
    }
    let (x2, dims) = flatten(x);
    let s = Csr {
        layout: layout.clone(),
        values,
    };
    let yt = spmm(&s, x2.transpose());
    unflatten(yt.transpose(), dims, out)
}

/// A frozen dense linear layer plus a sparse adapter: `y = x · (W + S)ᵀ + b`, computed as
/// `x·weight + b + x·Sᵀ` so that no dense `W + S` and no dense weight gradient is formed.
///
/// With a frozen `weight` (not tracked by autodiff, the RoSA/SFT case), backward computes
/// `dx = dY·Wᵀ + dY·S` (one dense matmul, one SpMM) and `dvalues` by SDDMM. A tracked
/// `weight` still gets its (dense) gradient.
///
/// # Arguments
/// - `x`: `[..., in]`.
/// - `weight`: burn's `Linear.weight` orientation, `[in, out]`.
/// - `bias`: optional `[out]`.
/// - `layout`, `values`: `S`, `[out, in]` (PyTorch orientation, as RoSA stores it).
///
/// # Returns
/// `[..., out]`.
pub fn sparse_linear_fused<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    layout: &CsrLayout,
    values: Tensor<1>,
) -> Tensor<D> {
    let [out, inp] = layout.shape();
    assert_eq!(
        weight.dims(),
        [inp, out],
        "sparse_linear_fused: weight must be [in, out] = [{inp}, {out}]"
    );
    if let Some(y) = empty_output(&x, out, bias.clone()) {
        return y;
    }
    let (x2, dims) = flatten(x);
    let mut y = x2.clone().matmul(weight);
    if let Some(bias) = bias {
        y = y + bias.reshape([1, out]);
    }
    let s = Csr {
        layout: layout.clone(),
        values,
    };
    let y = y + spmm(&s, x2.transpose()).transpose();
    unflatten(y, dims, out)
}
