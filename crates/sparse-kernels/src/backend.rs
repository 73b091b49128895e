//! The backend extension: the four sparse primitives, and their backward passes for `Autodiff`.
//!
//! Every primitive works on a CSR structure passed as two integer tensors ([`CsrIndices`]).
//! Implementations: [`Flex`](burn::backend::Flex) (rayon CPU kernels, `cpu.rs`), `CubeBackend`
//! (CubeCL kernels from the top-level `kernels/` folder, `cube.rs`, features `wgpu`/`cuda`), its
//! `Fusion` wrapper (generated), and `Autodiff` (below, hand-written backward passes).

use burn::backend::{
    Autodiff, Backend, ExtensionType, TensorMetadata,
    autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::Shape;

/// The index arrays of a CSR structure on a device.
///
/// `row_offsets` has `rows + 1` entries and `col_indices` one per stored entry; both are
/// integer tensors (the crate creates them as `i32`). Build them with
/// [`CsrLayout`](crate::CsrLayout), which also validates them.
#[derive(ExtensionType)]
#[extension_type(fusion: cfg(feature = "cube"))]
pub struct CsrIndices<B: Backend> {
    /// Row offsets, `rows + 1` entries.
    pub row_offsets: IntTensor<B>,
    /// Column of each entry, `nnz` entries.
    pub col_indices: IntTensor<B>,
}

impl<B: Backend> Clone for CsrIndices<B> {
    fn clone(&self) -> Self {
        Self {
            row_offsets: self.row_offsets.clone(),
            col_indices: self.col_indices.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for CsrIndices<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrIndices")
            .field("row_offsets", &self.row_offsets.shape())
            .field("col_indices", &self.col_indices.shape())
            .finish()
    }
}

#[cfg(feature = "cube")]
fn spmm_shape(b: &Shape, rows: &usize) -> Shape {
    Shape::new([*rows, b[1]])
}

#[cfg(feature = "cube")]
fn nnz_shape(s: &CsrIndicesMetadata) -> Shape {
    s.col_indices.shape.clone()
}

/// Sparse primitives on backend tensors. Use the `Tensor` functions of the crate root
/// ([`spmm`](crate::spmm), [`sddmm`](crate::sddmm), ...) rather than these.
///
/// In every method, `s` is a CSR structure of shape `rows x cols`; `st` is the structure of its
/// transpose, `perm` the permutation with `values_of_transpose = values[perm]` and `inverse` its
/// inverse (`values = values_of_transpose[inverse]`). The `Autodiff` implementation reads them to
/// run the backward pass (whose products with `Sᵀ` swap the two structures and the two
/// permutations); the flex SpMM reads `st` and `perm` to walk `S` by columns; the CubeCL kernels
/// ignore them.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait SparseBackend: Backend {
    /// SpMM: `C = S · B`, `C[i, :] = Σ_k values[k] · B[col[k], :]` over the entries `k` of row `i`.
    ///
    /// # Shapes
    /// - `values`: `[nnz]`; `b`: `[cols, n]` (any strides); returns `[rows, n]`.
    #[fusion(dtype = b, shape = spmm_shape(b, rows))]
    fn csr_spmm(
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        b: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self>;

    /// SDDMM: `out[k] = dot(a[row[k], :], bt[col[k], :])`, i.e. `a · btᵀ` sampled on `s`.
    ///
    /// # Shapes
    /// - `a`: `[rows, d]`; `bt`: `[cols, d]` (any strides); returns `[nnz]`.
    #[fusion(dtype = a, shape = nnz_shape(s))]
    fn csr_sddmm(
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        a: FloatTensor<Self>,
        bt: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// CSR-add: `dense + S`, i.e. `dense[row[k], col[k]] += values[k]`. Reuses `dense`'s buffer when
    /// it is not shared.
    ///
    /// # Shapes
    /// - `values`: `[nnz]`; `dense`: `[rows, cols]`; returns `[rows, cols]`.
    #[fusion(dtype = dense, shape = dense)]
    fn csr_add(
        #[extension_type] s: CsrIndices<Self>,
        values: FloatTensor<Self>,
        dense: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// Gather: `out[k] = dense[row[k], col[k]]`, a dense matrix sampled on the structure.
    ///
    /// # Shapes
    /// - `dense`: `[rows, cols]`; returns `[nnz]`.
    #[fusion(dtype = dense, shape = nnz_shape(s))]
    fn csr_gather(
        #[extension_type] s: CsrIndices<Self>,
        dense: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

fn cast<B: Backend>(s: CsrIndices<Autodiff<B, impl CheckpointStrategy>>) -> CsrIndices<B> {
    CsrIndices {
        row_offsets: s.row_offsets,
        col_indices: s.col_indices,
    }
}

impl<B: SparseBackend, C: CheckpointStrategy> SparseBackend for Autodiff<B, C> {
    fn csr_spmm(
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        b: FloatTensor<Self>,
        rows: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SpmmBackward;

        impl<B: SparseBackend> Backward<B, 2> for SpmmBackward {
            type State = (
                CsrIndices<B>,
                CsrIndices<B>,
                IntTensor<B>,
                IntTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_values, node_b] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (s, st, perm, inverse, values, b) = ops.state;
                let cols = b.shape()[0];
                if let Some(node) = node_values {
                    // dvalues[k] = Σ_n grad[i_k, n] · b[j_k, n]
                    // (b is [cols, n]: it is already the `bt` operand of the SDDMM.)
                    let dv = B::csr_sddmm(
                        s.clone(),
                        st.clone(),
                        perm.clone(),
                        inverse.clone(),
                        grad.clone(),
                        b,
                    );
                    grads.register::<B>(node.id, dv);
                }
                if let Some(node) = node_b {
                    // db = Sᵀ · grad
                    let values_t = B::float_select(values, 0, perm.clone());
                    let db = B::csr_spmm(st, s, inverse, perm, values_t, grad, cols);
                    grads.register::<B>(node.id, db);
                }
            }
        }

        let (s, st) = (cast(s), cast(st));
        match SpmmBackward
            .prepare::<C>([values.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (v, bp) = (values.primitive().clone(), b.primitive().clone());
                let out = B::csr_spmm(
                    s.clone(),
                    st.clone(),
                    perm.clone(),
                    inverse.clone(),
                    v.clone(),
                    bp.clone(),
                    rows,
                );
                prep.finish((s, st, perm, inverse, v, bp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::csr_spmm(
                s,
                st,
                perm,
                inverse,
                values.into_primitive(),
                b.into_primitive(),
                rows,
            )),
        }
    }

    fn csr_sddmm(
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        a: FloatTensor<Self>,
        bt: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SddmmBackward;

        impl<B: SparseBackend> Backward<B, 2> for SddmmBackward {
            type State = (
                CsrIndices<B>,
                CsrIndices<B>,
                IntTensor<B>,
                IntTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_a, node_bt] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (s, st, perm, inverse, a, bt) = ops.state;
                let (rows, cols) = (a.shape()[0], bt.shape()[0]);
                if let Some(node) = node_a {
                    // da = S(grad) · bt
                    let da = B::csr_spmm(
                        s.clone(),
                        st.clone(),
                        perm.clone(),
                        inverse.clone(),
                        grad.clone(),
                        bt,
                        rows,
                    );
                    grads.register::<B>(node.id, da);
                }
                if let Some(node) = node_bt {
                    // dbt = S(grad)ᵀ · a
                    let grad_t = B::float_select(grad, 0, perm.clone());
                    let dbt = B::csr_spmm(st, s, inverse, perm, grad_t, a, cols);
                    grads.register::<B>(node.id, dbt);
                }
            }
        }

        let (s, st) = (cast(s), cast(st));
        match SddmmBackward
            .prepare::<C>([a.node(), bt.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (ap, btp) = (a.primitive().clone(), bt.primitive().clone());
                let out = B::csr_sddmm(
                    s.clone(),
                    st.clone(),
                    perm.clone(),
                    inverse.clone(),
                    ap.clone(),
                    btp.clone(),
                );
                prep.finish((s, st, perm, inverse, ap, btp), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::csr_sddmm(
                s,
                st,
                perm,
                inverse,
                a.into_primitive(),
                bt.into_primitive(),
            )),
        }
    }

    fn csr_add(
        s: CsrIndices<Self>,
        values: FloatTensor<Self>,
        dense: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AddBackward;

        impl<B: SparseBackend> Backward<B, 2> for AddBackward {
            type State = CsrIndices<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_values, node_dense] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let s = ops.state;
                if let Some(node) = node_values {
                    grads.register::<B>(node.id, B::csr_gather(s, grad.clone()));
                }
                if let Some(node) = node_dense {
                    grads.register::<B>(node.id, grad);
                }
            }
        }

        let s = cast(s);
        match AddBackward
            .prepare::<C>([values.node(), dense.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::csr_add(s.clone(), values.into_primitive(), dense.into_primitive());
                prep.finish(s, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::csr_add(
                s,
                values.into_primitive(),
                dense.into_primitive(),
            )),
        }
    }

    fn csr_gather(s: CsrIndices<Self>, dense: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GatherBackward;

        impl<B: SparseBackend> Backward<B, 1> for GatherBackward {
            type State = (CsrIndices<B>, Shape);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_dense] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (s, shape) = ops.state;
                if let Some(node) = node_dense {
                    let device = grad.device();
                    let zeros = B::float_zeros(shape, &device, grad.dtype().into());
                    grads.register::<B>(node.id, B::csr_add(s, grad, zeros));
                }
            }
        }

        let s = cast(s);
        match GatherBackward
            .prepare::<C>([dense.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let shape = dense.shape();
                let out = B::csr_gather(s.clone(), dense.into_primitive());
                prep.finish((s, shape), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::csr_gather(s, dense.into_primitive())),
        }
    }
}
