//! The sparse adapter term fused into its layer's dense product: [`sparse_lora_linear`].
//!
//! A RoSA layer computes `x·W + b + s·(x·A)·B + x·Sᵀ`, an SFT layer `x·W + b + x·Sᵀ`. As
//! separate ops that is a dense (or LoRA) product, a `[.., out]` SpMM output and an add in the
//! forward pass, and in the backward pass two or three `[.., in]` input gradients that autodiff
//! adds up. Here it is one op ([`SparseLinearBackend`]): the SpMM accumulates into the blocks of
//! output rows the dense product wrote (flex: in place, [`csr_linear_add`]
//! (SparseLinearBackend::csr_linear_add)), and the backward pass writes `dx = g·Wᵀ + (s·g·Bᵀ)·Aᵀ`
//! as one product into which `g·S` is accumulated the same way; `dA`, `dB` come from
//! peft-core's [`fast_lora_grads`](peft_kernels::linear::LinearBackend::fast_lora_grads) and
//! the values' gradient from the SDDMM, each only for a tracked operand.
//!
//! Over a dense base, when the SpMM's work outgrows a copy of the weight ([`merge_pays`]: many
//! rows at a high density, i.e. training batches), the op adds `S` into a copy of the weight
//! instead and runs the dense (or LoRA) product on it, in the forward pass and again for `dx`.
//! RigL's candidate term, zero values whose gradient is sampled, is [`sparse_grad_sample`]: no
//! forward work at all, one SDDMM backward.
//!
//! Over a frozen base kept packed ([`packed_sparse_lora_linear`]: QRoSA, QSFT) the same op reads
//! the packed blocks for the base product and for `dx`
//! ([`PackedBackend`](peft_kernels::packed_linear::PackedBackend)), the LoRA term joined to
//! them as in [`packed_lora_linear`](peft_kernels::packed_linear::packed_lora_linear).

use burn::backend::{
    Autodiff, Backend, Dispatch, TensorMetadata,
    autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    backend_extension,
    tensor::{FloatTensor, IntTensor},
};
use burn::tensor::{DType, Tensor};
use peft_kernels::linear::{linear, lora_linear, register_bias_grad, register_low_rank_grads};
use peft_kernels::packed_linear::{PackedBackend, PackedWeight, packed_linear, packed_lora_linear};

use crate::backend::{CsrIndices, SparseBackend};
use crate::{CsrLayout, sparse_linear};

/// The fused sparse-adapter layer ops; use [`sparse_lora_linear`] rather than this trait.
///
/// `s`, `st`, `perm`, `inverse` describe the sparse matrix `S` (`[out, in]`) as in
/// [`SparseBackend`]; `values` are its `[nnz]` values.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait SparseLinearBackend: PackedBackend + SparseBackend {
    /// `dense + x·Sᵀ` (`x`: `[m, in]`, `dense`: `[m, out]`); on flex accumulated into `dense`'s
    /// buffer when it is not shared.
    #[fusion(default)]
    fn csr_linear_add(
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        x: FloatTensor<Self>,
        dense: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let rows = s.row_offsets.shape()[0] - 1;
        let xt = Self::float_transpose(x);
        let yt = Self::csr_spmm(s, st, perm, inverse, values, xt, rows);
        Self::float_add(dense, Self::float_transpose(yt))
    }

    /// `result + x·Sᵀ` for values that are zero: `result` itself, whose backward pass gives the
    /// values `gᵀ·x` sampled on `S` (the SDDMM) and `x` nothing (the term is zero). Use
    /// [`sparse_grad_sample`] rather than this method.
    #[fusion(default)]
    #[allow(clippy::too_many_arguments)]
    fn csr_grad_sample(
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        x: FloatTensor<Self>,
        result: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let _ = (s, st, perm, inverse, values, x);
        result
    }

    /// `weight + Sᵀ` for the `[in, out]` weight, in a new buffer (the weight is not changed):
    /// the dense weight of [`merge_pays`]'s path.
    #[fusion(default)]
    fn csr_merged_weight(
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        values: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let _ = s;
        Self::csr_add(st, Self::float_select(values, 0, perm), weight)
    }

    /// `x·weight + bias + scale·(x·a)·b + x·Sᵀ` for 2-D operands (`a`: `[in, r]`, `b`:
    /// `[r, out]`, `weight`: `[in, out]`).
    #[fusion(default)]
    #[allow(clippy::too_many_arguments)]
    fn sparse_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let merged = merges::<Self>(&x, &weight, &values);
        let sparse = (s, st, perm, inverse, values);
        dense_base_output::<Self>(merged, x, weight, sparse, |x, w| {
            Self::fast_lora_linear(x, w, bias, a, b, scale)
        })
    }

    /// `x·weight + bias + x·Sᵀ` for 2-D operands.
    #[fusion(default)]
    #[allow(clippy::too_many_arguments)]
    fn sparse_dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let merged = merges::<Self>(&x, &weight, &values);
        let sparse = (s, st, perm, inverse, values);
        dense_base_output::<Self>(merged, x, weight, sparse, |x, w| {
            Self::fast_linear(x, w, bias)
        })
    }

    /// [`sparse_lora_linear`](Self::sparse_lora_linear) over a packed base: `x·Wᵀ + bias +
    /// scale·(x·a)·b + x·Sᵀ` (`weight`: `[out, in]`).
    #[fusion(default)]
    #[allow(clippy::too_many_arguments)]
    fn packed_sparse_lora_linear(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = Self::packed_lora_linear_t(x.clone(), weight, bias, a, b, scale);
        Self::csr_linear_add(s, st, perm, inverse, values, x, y)
    }

    /// [`sparse_dense_linear`](Self::sparse_dense_linear) over a packed base: `x·Wᵀ + bias +
    /// x·Sᵀ` (`weight`: `[out, in]`).
    #[fusion(default)]
    #[allow(clippy::too_many_arguments)]
    fn packed_sparse_linear(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        #[extension_type] s: CsrIndices<Self>,
        #[extension_type] st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = Self::packed_linear_t(x.clone(), weight, bias);
        Self::csr_linear_add(s, st, perm, inverse, values, x, y)
    }
}

#[cfg(feature = "cube")]
impl SparseLinearBackend for burn_cubecl::CubeBackend {}

#[cfg(feature = "flex")]
impl SparseLinearBackend for burn::backend::Flex {
    fn csr_linear_add(
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        x: FloatTensor<Self>,
        dense: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        use burn::backend::{Flex, ops::FloatTensorOps};
        if crate::cpu::linear_add_fits(&values, &x, &dense) {
            // `dense` is handed over, not cloned: it is then written in place.
            return crate::cpu::linear_add(&st, &perm, values, x, dense);
        }
        let rows = s.row_offsets.shape()[0] - 1;
        let xt = Flex::float_transpose(x);
        let yt = Flex::csr_spmm(s, st, perm, inverse, values, xt, rows);
        Flex::float_add(dense, Flex::float_transpose(yt))
    }

    fn csr_merged_weight(
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        values: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        use burn::backend::{Flex, ops::FloatTensorOps};
        // A weight kept as the transpose of a row-major `[out, in]` buffer (a PyTorch file's
        // layout) is merged in that layout: a row copy, not a transposing one.
        if weight.layout().strides()[0] == 1 && weight.shape()[1] > 1 {
            let merged = crate::cpu::add_copy(&s, values, Flex::float_transpose(weight));
            return Flex::float_transpose(merged);
        }
        crate::cpu::add_copy(&st, Flex::float_select(values, 0, perm), weight)
    }
}

fn cast<B: Backend>(s: CsrIndices<Autodiff<B, impl CheckpointStrategy>>) -> CsrIndices<B> {
    CsrIndices {
        row_offsets: s.row_offsets,
        col_indices: s.col_indices,
    }
}

/// The sparse matrix as the backward pass needs it.
#[derive(Clone, Debug)]
struct SparseState<B: Backend> {
    s: CsrIndices<B>,
    st: CsrIndices<B>,
    perm: IntTensor<B>,
    inverse: IntTensor<B>,
    /// For `dx` (`g·S`).
    values: Option<FloatTensor<B>>,
    /// The forward pass added `S` into a copy of the dense weight ([`merges`]); `dx` does too.
    merged: bool,
}

/// The low-rank term as the backward pass needs it, each only when a gradient needs it.
#[derive(Clone, Debug)]
struct LowRankState<B: Backend> {
    /// For `dx`.
    a: Option<FloatTensor<B>>,
    /// For `dA` and `dx`.
    b: Option<FloatTensor<B>>,
    /// `scale·x·a`, for `dB`.
    h: Option<FloatTensor<B>>,
    scale: f64,
}

/// The frozen or trained base weight as the backward pass needs it for `dx`.
#[derive(Clone, Debug)]
enum BaseState<B: Backend> {
    /// `[in, out]`, a parent of the op (it may be tracked).
    Dense(Option<FloatTensor<B>>),
    /// Kept packed, frozen: not a parent.
    Packed(PackedWeight),
}

/// What the fused op's backward pass keeps, each only when a gradient needs it.
#[derive(Clone, Debug)]
struct FusedState<B: Backend> {
    /// For `dW`, `dA` and the values' gradient.
    x: Option<FloatTensor<B>>,
    /// For `dx`.
    base: BaseState<B>,
    /// Absent without a low-rank term.
    low_rank: Option<LowRankState<B>>,
    sparse: SparseState<B>,
}

/// The backward step of the fused ops on `Autodiff`. Parents: `[x, weight, a, b, bias,
/// values]` with a low-rank term, `[x, weight, bias, values]` without; over a packed base the
/// same without `weight`.
#[derive(Debug)]
struct FusedBackward;

impl<B: SparseLinearBackend, const N: usize> Backward<B, N> for FusedBackward {
    type State = FusedState<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let st = ops.state;
        let mut ids = ops.parents.iter().map(|p| p.as_ref().map(|n| n.id));
        let mut next = || ids.next().flatten();
        let x_id = next();
        let w_id = match st.base {
            BaseState::Dense(_) => next(),
            BaseState::Packed(_) => None,
        };
        let (a_id, b_id) = match st.low_rank {
            Some(_) => (next(), next()),
            None => (None, None),
        };
        let (bias_id, values_id) = (next(), next());
        let t = |t| B::float_transpose(t);
        // `scale · g·bᵀ` (`[m, r]`), what `dA` and `dx` share; with `a`ᵀ for `dx`.
        let mut low_rank_dx = None;
        if let Some(LowRankState { a, b, h, scale }) = st.low_rank {
            let gb = register_low_rank_grads::<B>(
                grads,
                &grad,
                [a_id, b_id],
                st.x.as_ref(),
                (h, b),
                scale,
            );
            low_rank_dx = gb.zip(a);
        }
        if let (Some(id), Some(x)) = (w_id, &st.x) {
            grads.register::<B>(id, B::fast_matmul(t(x.clone()), grad.clone()));
        }
        register_bias_grad::<B>(bias_id, grad.clone(), grads);
        let sp = st.sparse;
        if let (Some(id), Some(x)) = (values_id, &st.x) {
            // dvalues[e] = Σ_t g[t, row(e)] · x[t, col(e)]: `gᵀ·x` sampled on `S`.
            let dv = B::csr_sddmm(
                sp.s.clone(),
                sp.st.clone(),
                sp.perm.clone(),
                sp.inverse.clone(),
                t(grad.clone()),
                t(x.clone()),
            );
            grads.register::<B>(id, dv);
        }
        if let (Some(id), Some(values)) = (x_id, sp.values) {
            // dx = g·Wᵀ (+ (s·g·Bᵀ)·Aᵀ), then g·S accumulated into it: `g·(Sᵀ)ᵀ`; or, as the
            // forward pass did, g·(W + Sᵀ)ᵀ (+ the low-rank term) in one product.
            let base = match st.base {
                BaseState::Dense(Some(w)) if sp.merged => {
                    BaseState::Dense(Some(B::csr_merged_weight(
                        sp.s.clone(),
                        sp.st.clone(),
                        sp.perm.clone(),
                        values.clone(),
                        w,
                    )))
                }
                base => base,
            };
            let dx = match (base, low_rank_dx) {
                (BaseState::Dense(Some(w)), Some((gb, a))) => {
                    B::fast_matmul_low_rank(grad.clone(), t(w), gb, t(a))
                }
                (BaseState::Dense(Some(w)), None) => B::fast_matmul(grad.clone(), t(w)),
                (BaseState::Packed(w), Some((gb, a))) => {
                    B::packed_matmul_low_rank(grad.clone(), w, gb, a)
                }
                (BaseState::Packed(w), None) => B::packed_matmul(grad.clone(), w),
                (BaseState::Dense(None), _) => unreachable!("a tracked x keeps the weight"),
            };
            if sp.merged {
                grads.register::<B>(id, dx);
                return;
            }
            let values_t = B::float_select(values, 0, sp.perm.clone());
            let dx = B::csr_linear_add(sp.st, sp.s, sp.inverse, sp.perm, values_t, grad, dx);
            grads.register::<B>(id, dx);
        }
    }
}

/// The backward step of [`SparseLinearBackend::csr_grad_sample`] on `Autodiff`. Parents:
/// `[values, result]`; state: `S` (`s`, `st`, `perm`, `inverse`) and `x`.
#[derive(Debug)]
struct SampleBackward;

type SampleState<B> = (
    CsrIndices<B>,
    CsrIndices<B>,
    IntTensor<B>,
    IntTensor<B>,
    FloatTensor<B>,
);

impl<B: SparseLinearBackend> Backward<B, 2> for SampleBackward {
    type State = SampleState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let (s, st, perm, inverse, x) = ops.state;
        let [values, result] = ops.parents.each_ref().map(|p| p.as_ref().map(|n| n.id));
        if let Some(id) = values {
            let t = |t| B::float_transpose(t);
            grads.register::<B>(
                id,
                B::csr_sddmm(s, st, perm, inverse, t(grad.clone()), t(x)),
            );
        }
        if let Some(id) = result {
            grads.register::<B>(id, grad);
        }
    }
}

impl<B: SparseLinearBackend, C: CheckpointStrategy> SparseLinearBackend for Autodiff<B, C> {
    fn csr_grad_sample(
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
        x: FloatTensor<Self>,
        result: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = SampleBackward
            .prepare::<C>([values.node(), result.node()])
            .compute_bound()
            .stateful();
        let [x, result] = [x, result].map(|t| t.into_primitive());
        match prep {
            OpsKind::Tracked(prep) => prep.finish((cast(s), cast(st), perm, inverse, x), result),
            OpsKind::UnTracked(prep) => prep.finish(result),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sparse_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [x_t, w_t, a_t, b_t, v_t] = [&x, &weight, &a, &b, &values].map(|t| t.is_tracked());
        let nodes = [
            x.node(),
            weight.node(),
            a.node(),
            b.node(),
            bias.node(),
            values.node(),
        ];
        let prep = FusedBackward.prepare::<C>(nodes).compute_bound().stateful();
        let [x, weight, bias, a, b, values] =
            [x, weight, bias, a, b, values].map(|t| t.into_primitive());
        let (s, st) = (cast(s), cast(st));
        let prep = match prep {
            OpsKind::Tracked(prep) => prep,
            OpsKind::UnTracked(prep) => {
                return prep.finish(B::sparse_lora_linear(
                    x, weight, bias, a, b, scale, s, st, perm, inverse, values,
                ));
            }
        };
        let h = B::float_mul_scalar(B::fast_matmul(x.clone(), a.clone()), scale.into());
        let merged = merges::<B>(&x, &weight, &values);
        let sparse = (s, st, perm, inverse, values);
        let state = FusedState {
            x: (a_t || w_t || v_t).then(|| x.clone()),
            base: BaseState::Dense(x_t.then(|| weight.clone())),
            low_rank: Some(LowRankState {
                a: x_t.then(|| a.clone()),
                b: (x_t || a_t).then(|| b.clone()),
                h: b_t.then(|| h.clone()),
                scale,
            }),
            sparse: sparse_state(&sparse, x_t, merged),
        };
        let y = dense_base_output::<B>(merged, x, weight, sparse, |x, w| {
            B::fast_linear_low_rank(x, w, bias, h, b)
        });
        prep.finish(state, y)
    }

    #[allow(clippy::too_many_arguments)]
    fn sparse_dense_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [x_t, w_t, v_t] = [&x, &weight, &values].map(|t| t.is_tracked());
        let nodes = [x.node(), weight.node(), bias.node(), values.node()];
        let prep = FusedBackward.prepare::<C>(nodes).compute_bound().stateful();
        let [x, weight, bias, values] = [x, weight, bias, values].map(|t| t.into_primitive());
        let (s, st) = (cast(s), cast(st));
        let prep = match prep {
            OpsKind::Tracked(prep) => prep,
            OpsKind::UnTracked(prep) => {
                return prep.finish(B::sparse_dense_linear(
                    x, weight, bias, s, st, perm, inverse, values,
                ));
            }
        };
        let merged = merges::<B>(&x, &weight, &values);
        let sparse = (s, st, perm, inverse, values);
        let state = FusedState {
            x: (w_t || v_t).then(|| x.clone()),
            base: BaseState::Dense(x_t.then(|| weight.clone())),
            low_rank: None,
            sparse: sparse_state(&sparse, x_t, merged),
        };
        let y =
            dense_base_output::<B>(merged, x, weight, sparse, |x, w| B::fast_linear(x, w, bias));
        prep.finish(state, y)
    }

    #[allow(clippy::too_many_arguments)]
    fn packed_sparse_lora_linear(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [x_t, a_t, b_t, v_t] = [&x, &a, &b, &values].map(|t| t.is_tracked());
        let nodes = [x.node(), a.node(), b.node(), bias.node(), values.node()];
        let prep = FusedBackward.prepare::<C>(nodes).compute_bound().stateful();
        let [x, bias, a, b, values] = [x, bias, a, b, values].map(|t| t.into_primitive());
        let (s, st) = (cast(s), cast(st));
        let prep = match prep {
            OpsKind::Tracked(prep) => prep,
            OpsKind::UnTracked(prep) => {
                return prep.finish(B::packed_sparse_lora_linear(
                    x, weight, bias, a, b, scale, s, st, perm, inverse, values,
                ));
            }
        };
        let h = B::float_mul_scalar(B::fast_matmul(x.clone(), a.clone()), scale.into());
        let sparse = (s, st, perm, inverse, values);
        let state = FusedState {
            x: (a_t || v_t).then(|| x.clone()),
            base: BaseState::Packed(weight.clone()),
            low_rank: Some(LowRankState {
                a: x_t.then(|| a.clone()),
                b: (x_t || a_t).then(|| b.clone()),
                h: b_t.then(|| h.clone()),
                scale,
            }),
            sparse: sparse_state(&sparse, x_t, false),
        };
        let y = B::packed_linear_t_low_rank(x.clone(), weight, bias, h, b);
        let (s, st, perm, inverse, values) = sparse;
        prep.finish(state, B::csr_linear_add(s, st, perm, inverse, values, x, y))
    }

    #[allow(clippy::too_many_arguments)]
    fn packed_sparse_linear(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        s: CsrIndices<Self>,
        st: CsrIndices<Self>,
        perm: IntTensor<Self>,
        inverse: IntTensor<Self>,
        values: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [x_t, v_t] = [&x, &values].map(|t| t.is_tracked());
        let nodes = [x.node(), bias.node(), values.node()];
        let prep = FusedBackward.prepare::<C>(nodes).compute_bound().stateful();
        let [x, bias, values] = [x, bias, values].map(|t| t.into_primitive());
        let (s, st) = (cast(s), cast(st));
        let prep = match prep {
            OpsKind::Tracked(prep) => prep,
            OpsKind::UnTracked(prep) => {
                return prep.finish(B::packed_sparse_linear(
                    x, weight, bias, s, st, perm, inverse, values,
                ));
            }
        };
        let sparse = (s, st, perm, inverse, values);
        let state = FusedState {
            x: v_t.then(|| x.clone()),
            base: BaseState::Packed(weight.clone()),
            low_rank: None,
            sparse: sparse_state(&sparse, x_t, false),
        };
        let y = B::packed_linear_t(x.clone(), weight, bias);
        let (s, st, perm, inverse, values) = sparse;
        prep.finish(state, B::csr_linear_add(s, st, perm, inverse, values, x, y))
    }
}

/// [`SparseState`] from the op's operands.
/// The values are kept when `x` is tracked (`dx` needs them).
fn sparse_state<B: Backend>(
    (s, st, perm, inverse, values): &SparseParts<B>,
    x_tracked: bool,
    merged: bool,
) -> SparseState<B> {
    SparseState {
        s: s.clone(),
        st: st.clone(),
        perm: perm.clone(),
        inverse: inverse.clone(),
        values: x_tracked.then(|| values.clone()),
        merged,
    }
}

/// How many times the weight's size the SpMM's work (`nnz` entries for each row of `x`) must
/// be before [`merges`] adds `S` into a copy of the weight instead. The SpMM costs about one
/// 16-lane update per entry and 16 rows, the copy one pass over `in · out` floats, and the
/// merged product is the product the layer computes anyway (`bench_rosa`, `bench_sft`).
pub const MERGE_RATIO: usize = 16;

/// Whether a fused op over a dense base computes `x·(W + Sᵀ)` (`S` added into a copy of the
/// `[in, out]` weight, one product; the backward pass's `dx` likewise) rather than the product
/// plus the SpMM accumulated into its output: when `nnz · m >= MERGE_RATIO · in · out` for the
/// `m` rows of `x`, i.e. for many tokens at a high density (training batches), not for decoding.
/// The two differ only by rounding.
pub fn merge_pays(nnz: usize, m: usize, inp: usize, out: usize) -> bool {
    nnz > 0 && nnz.saturating_mul(m) >= MERGE_RATIO.saturating_mul(inp).saturating_mul(out)
}

/// `S` as the fused ops' bodies take it: `s`, `st`, `perm`, `inverse`, `values`.
type SparseParts<B> = (
    CsrIndices<B>,
    CsrIndices<B>,
    IntTensor<B>,
    IntTensor<B>,
    FloatTensor<B>,
);

/// The output of a fused op over a dense base whose `product(x, weight)` is the dense (or LoRA)
/// product: on the merged weight when `merged` ([`merges`]), else the product with the SpMM
/// accumulated into it.
fn dense_base_output<B: SparseLinearBackend>(
    merged: bool,
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    (s, st, perm, inverse, values): SparseParts<B>,
    product: impl FnOnce(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<B> {
    if merged {
        return product(x, B::csr_merged_weight(s, st, perm, values, weight));
    }
    let y = product(x.clone(), weight);
    B::csr_linear_add(s, st, perm, inverse, values, x, y)
}

/// [`merge_pays`] for a fused op's operands (`x`: `[m, in]`, `weight`: `[in, out]`).
fn merges<B: Backend>(
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    values: &FloatTensor<B>,
) -> bool {
    let (x, weight) = (x.shape(), weight.shape());
    merge_pays(values.shape()[0], x[0], weight[0], weight[1])
}

/// `x · weight + bias (+ scale · (x·a)·b) + x · Sᵀ`: a linear layer with a sparse adapter term
/// and optionally a LoRA term, as `lora_linear(x, weight, bias, a, b, scale) + sparse_linear(x,
/// layout, values)` (or `linear(..) + sparse_linear(..)`) computes it, in one differentiable op
/// (see the module documentation).
///
/// # Arguments
/// - `x`: the layer input, `[..., in]`.
/// - `weight`: `[in, out]` (burn's `Linear.weight`); `bias`: `[out]`.
/// - `low_rank`: `(a, b, scale)` with `a`: `[in, r]`, `b`: `[r, out]`.
/// - `layout`, `values`: `S`, `[out, in]` (PyTorch orientation), `[nnz]` values.
///
/// # Returns
/// `[..., out]`.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use sparse_kernels::{CsrLayout, CsrStructure, sparse_linear, sparse_lora_linear};
/// let device = Device::flex().autodiff();
/// let mask = [false, true, false, true, false, true];
/// let layout = CsrLayout::new(CsrStructure::from_mask(2, 3, &mask).unwrap(), &device);
/// let values = Tensor::<1>::from_floats([2.0, 1.0, -1.0], &device);
/// let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
/// let w = Tensor::<2>::ones([3, 2], &device);
/// let (a, b) = (Tensor::<2>::ones([3, 1], &device), Tensor::<2>::ones([1, 2], &device));
/// let y = sparse_lora_linear(x.clone(), w.clone(), None, Some((a.clone(), b.clone(), 0.5)), &layout, values.clone());
/// let reference = peft_kernels::linear::lora_linear(x.clone(), w, None, a, b, 0.5)
///     + sparse_linear(x, &layout, values);
/// assert!((y - reference).abs().max().into_scalar::<f32>() < 1e-6);
/// ```
pub fn sparse_lora_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    low_rank: Option<(Tensor<2>, Tensor<2>, f64)>,
    layout: &CsrLayout,
    values: Tensor<1>,
) -> Tensor<D> {
    let [out, inp] = layout.shape();
    let dims = x.dims();
    let composed = matches!(weight.dtype(), DType::QFloat(_))
        || dims.contains(&0)
        || out == 0
        || weight.dims() != [inp, out];
    if composed {
        let dense = match low_rank {
            Some((a, b, scale)) => lora_linear(x.clone(), weight, bias, a, b, scale),
            None => linear(x.clone(), weight, bias),
        };
        return dense + sparse_linear(x, layout, values);
    }
    let w = weight.into_dispatch();
    on_sparse_rows(x, bias, layout, values, |x, bias, s| match low_rank {
        Some((a, b, scale)) => Dispatch::sparse_lora_linear(
            x,
            w,
            bias,
            a.into_dispatch(),
            b.into_dispatch(),
            scale,
            s.s,
            s.st,
            s.perm,
            s.inverse,
            s.values,
        ),
        None => Dispatch::sparse_dense_linear(x, w, bias, s.s, s.st, s.perm, s.inverse, s.values),
    })
}

/// `S`'s operands as the fused ops take them.
struct SparseOperands {
    s: CsrIndices<Dispatch>,
    st: CsrIndices<Dispatch>,
    perm: IntTensor<Dispatch>,
    inverse: IntTensor<Dispatch>,
    values: FloatTensor<Dispatch>,
}

/// The frame of the public fused ops: `x` (`[..., in]`) as `[rows, in]` (a 2-D `x` as it is:
/// flex copies a non-contiguous tensor on any reshape), the bias (zeros when absent) and `S`'s
/// operands handed to `run`, whose `[rows, out]` result comes back as `[..., out]`.
/// `result + x·Sᵀ` for `values` that are zero (RigL's candidate positions while their gradient
/// is sampled): the output is `result`, the backward pass gives `values` the gradient `gᵀ·x`
/// sampled on `S` (one SDDMM) and `x` none (the term is zero, and so is its gradient with
/// respect to `x`). Against `result + sparse_linear(x, layout, values)` it skips the forward
/// SpMM, the backward `g·S` and the two adds; the values' contents are not read.
///
/// # Arguments
/// - `x`: the layer input, `[..., in]`; `result`: the layer output so far, `[..., out]`.
/// - `layout`, `values`: `S`, `[out, in]`, `[nnz]` values (zero).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use sparse_kernels::{CsrLayout, CsrStructure, sparse_grad_sample};
/// let device = Device::flex().autodiff();
/// let layout = CsrLayout::new(CsrStructure::from_mask(1, 2, &[false, true]).unwrap(), &device);
/// let values = Tensor::<1>::zeros([1], &device).require_grad();
/// let x = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
/// let result = Tensor::<2>::from_floats([[5.0], [6.0]], &device);
/// let y = sparse_grad_sample(x, &layout, values.clone(), result);
/// let grads = y.sum().backward();
/// // d values = Σ_t g[t, 0] · x[t, 1] = 2 + 4.
/// assert_eq!(values.grad(&grads).unwrap().into_scalar::<f32>(), 6.0);
/// ```
pub fn sparse_grad_sample<const D: usize>(
    x: Tensor<D>,
    layout: &CsrLayout,
    values: Tensor<1>,
    result: Tensor<D>,
) -> Tensor<D> {
    let [out, inp] = layout.shape();
    let dims = result.dims();
    if dims.contains(&0) || layout.nnz() == 0 {
        return result;
    }
    let rows: usize = dims[..D - 1].iter().product();
    let (x2, r2) = (x.reshape([rows, inp]), result.reshape([rows, out]));
    let y = Dispatch::csr_grad_sample(
        layout.indices(),
        layout.transposed_indices(),
        layout.perm_dispatch(),
        layout.inverse_perm_dispatch(),
        values.into_dispatch(),
        x2.into_dispatch(),
        r2.into_dispatch(),
    );
    Tensor::<2>::from_dispatch(y).reshape(dims)
}

fn on_sparse_rows<const D: usize>(
    x: Tensor<D>,
    bias: Option<Tensor<1>>,
    layout: &CsrLayout,
    values: Tensor<1>,
    run: impl FnOnce(
        FloatTensor<Dispatch>,
        FloatTensor<Dispatch>,
        SparseOperands,
    ) -> FloatTensor<Dispatch>,
) -> Tensor<D> {
    let [out, inp] = layout.shape();
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let x2 = if D == 2 {
        Tensor::<2>::from_dispatch(x.into_dispatch())
    } else {
        x.reshape([rows, inp])
    };
    let bias = bias.unwrap_or_else(|| Tensor::zeros([out], &x2.device()));
    let operands = SparseOperands {
        s: layout.indices(),
        st: layout.transposed_indices(),
        perm: layout.perm_dispatch(),
        inverse: layout.inverse_perm_dispatch(),
        values: values.into_dispatch(),
    };
    let y = Tensor::<2>::from_dispatch(run(x2.into_dispatch(), bias.into_dispatch(), operands));
    if D == 2 {
        return Tensor::from_dispatch(y.into_dispatch());
    }
    let mut shape = dims;
    shape[D - 1] = out;
    y.reshape(shape)
}

/// [`sparse_lora_linear`] over a frozen base `weight` (`[out, in]`) kept packed (QRoSA, QSFT):
/// `x·Wᵀ + bias (+ scale·(x·a)·b) + x·Sᵀ`, as `packed_lora_linear(..) + sparse_linear(..)` (or
/// `packed_linear(..) + sparse_linear(..)`) computes it, in one differentiable op whose base
/// product and input gradient read the packed blocks.
///
/// # Arguments
/// - `x`: the layer input, `[..., in]`.
/// - `weight`: the packed base, `[out, in]`; `bias`: `[out]`.
/// - `low_rank`: `(a, b, scale)` with `a`: `[in, r]`, `b`: `[r, out]`.
/// - `layout`, `values`: `S`, `[out, in]`, `[nnz]` values.
pub fn packed_sparse_lora_linear<const D: usize>(
    x: Tensor<D>,
    weight: &PackedWeight,
    bias: Option<Tensor<1>>,
    low_rank: Option<(Tensor<2>, Tensor<2>, f64)>,
    layout: &CsrLayout,
    values: Tensor<1>,
) -> Tensor<D> {
    let [out, inp] = layout.shape();
    let dims = x.dims();
    if dims.contains(&0) || out == 0 || weight.shape() != [out, inp] {
        let dense = match low_rank {
            Some((a, b, scale)) => packed_lora_linear(x.clone(), weight, bias, a, b, scale),
            None => packed_linear(x.clone(), weight, bias),
        };
        return dense + sparse_linear(x, layout, values);
    }
    on_sparse_rows(x, bias, layout, values, |x, bias, s| match low_rank {
        Some((a, b, scale)) => Dispatch::packed_sparse_lora_linear(
            x,
            weight.clone(),
            bias,
            a.into_dispatch(),
            b.into_dispatch(),
            scale,
            s.s,
            s.st,
            s.perm,
            s.inverse,
            s.values,
        ),
        None => Dispatch::packed_sparse_linear(
            x,
            weight.clone(),
            bias,
            s.s,
            s.st,
            s.perm,
            s.inverse,
            s.values,
        ),
    })
}
