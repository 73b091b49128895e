//! The linear-layer product as a burn backend extension: [`linear`].
//!
//! Why: on flex, `burn::tensor::module::linear` is a `matmul` followed by a separate bias add,
//! and every `matmul` output is allocated zeroed and then copied once more to realign it (a
//! `memset` and a `memmove` of each output, about 10 % of a MiniLM LoRA step); gemm's own
//! threads also scale poorly on these shapes (`docs/benchmarks.md`, "MiniLM against PyTorch").
//!
//! On flex (f32), [`linear`] writes the product straight into an uninitialised output, starts
//! from the bias instead of adding it afterwards, and splits a large product into one block of
//! rows per thread, each a single-threaded gemm call. The backward pass uses the same product for
//! `dx = g·Wᵀ` and `dW = xᵀ·g` (transposed views, no copies) and a column sum for the bias.
//! Other backends and dtypes run burn's own ops.

use burn::backend::{
    Autodiff, Backend, Dispatch, TensorMetadata,
    autodiff::{
        NodeId,
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind, OpsPrep},
    },
    backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::{DType, Shape, Slice, Tensor};

/// The extension behind [`linear`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait LinearBackend: Backend {
    /// `lhs · rhs` for 2-D operands (`[m, k] · [k, n]`); either may be a strided view.
    #[fusion(default)]
    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// `x · weight + bias` for a 2-D `x` (`[m, k] · [k, n] + [n]`).
    #[fusion(default)]
    fn fast_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let n = bias.shape()[0];
        let product = Self::float_matmul(x, weight);
        Self::float_add(product, Self::float_reshape(bias, Shape::new([1, n])))
    }

    /// `x · weight + h · b` for 2-D operands: a product plus a low-rank term (`h`: `[m, r]`,
    /// `b`: `[r, n]`), summed into one output.
    #[fusion(default)]
    fn fast_matmul_low_rank(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        h: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(Self::float_matmul(x, weight), Self::float_matmul(h, b))
    }

    /// `x · weight + bias + h · b`: [`fast_matmul_low_rank`](Self::fast_matmul_low_rank) with a
    /// bias.
    #[fusion(default)]
    fn fast_linear_low_rank(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        h: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let n = bias.shape()[0];
        let product = Self::fast_matmul_low_rank(x, weight, h, b);
        Self::float_add(product, Self::float_reshape(bias, Shape::new([1, n])))
    }

    /// `x · weight + scale · (x · a) · b` for 2-D operands: a linear layer with a LoRA term
    /// (`a`: `[k, r]`, `b`: `[r, n]`). On `Autodiff` one op whose backward pass sums both input
    /// gradients in one product (see [`lora_linear`]).
    #[fusion(default)]
    fn fast_lora_matmul(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let h = Self::float_mul_scalar(Self::fast_matmul(x.clone(), a), scale.into());
        Self::fast_matmul_low_rank(x, weight, h, b)
    }

    /// The LoRA op's low-rank gradients for the output gradient `g` (`[m, n]`), from its input
    /// `x` (`[m, k]`), `h = scale · x·a` (`[m, r]`) and `b` (`[r, n]`): `gb = scale · g·bᵀ`
    /// (`[m, r]`, what the input gradient needs too), `da = xᵀ·gb` (`[k, r]`) and `db = hᵀ·g`
    /// (`[r, n]`), flattened and concatenated (1-D).
    #[fusion(default)]
    fn fast_lora_grads(
        g: FloatTensor<Self>,
        x: FloatTensor<Self>,
        h: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        composed_lora_grads::<Self>(g, x, h, b, scale)
    }

    /// `x · weight + bias + scale · (x · a) · b`: [`fast_lora_matmul`](Self::fast_lora_matmul)
    /// with a bias.
    #[fusion(default)]
    fn fast_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let h = Self::float_mul_scalar(Self::fast_matmul(x.clone(), a), scale.into());
        Self::fast_linear_low_rank(x, weight, bias, h, b)
    }
}

#[cfg(feature = "cube")]
impl LinearBackend for burn_cubecl::CubeBackend {}

/// [`LinearBackend::fast_lora_grads`] from three products.
fn composed_lora_grads<B: LinearBackend>(
    g: FloatTensor<B>,
    x: FloatTensor<B>,
    h: FloatTensor<B>,
    b: FloatTensor<B>,
    scale: f64,
) -> FloatTensor<B> {
    let gb = B::fast_matmul(g.clone(), B::float_transpose(b));
    let gb = B::float_mul_scalar(gb, scale.into());
    let da = B::fast_matmul(B::float_transpose(x), gb.clone());
    let db = B::fast_matmul(B::float_transpose(h), g);
    let flat = |t: FloatTensor<B>| {
        let n = t.shape().num_elements();
        B::float_reshape(t, Shape::new([n]))
    };
    B::float_cat(vec![flat(gb), flat(da), flat(db)], 0)
}

/// The backward step of [`LinearBackend::fast_matmul`] (parents `[lhs, rhs]`) and
/// [`fast_linear`](LinearBackend::fast_linear) (`[x, weight, bias]`) on `Autodiff`: `g·rhsᵀ`
/// and `lhsᵀ·g`, each only for a tracked parent, from the operand it needs; the bias gradient
/// as a column sum.
#[derive(Debug)]
struct ProductBackward;

/// What [`ProductBackward`] keeps: `lhs` when `rhs` needs a gradient and vice versa.
type Operands<B> = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

impl<B: LinearBackend, const N: usize> Backward<B, N> for ProductBackward {
    type State = Operands<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ids = ops.parents.map(|p| p.map(|n| n.id));
        let node = |i: usize| ids.get(i).copied().flatten();
        let (lhs, rhs) = ops.state;
        if let (Some(id), Some(rhs)) = (node(0), rhs) {
            grads.register::<B>(id, B::fast_matmul(grad.clone(), B::float_transpose(rhs)));
        }
        if let (Some(id), Some(lhs)) = (node(1), lhs) {
            grads.register::<B>(id, B::fast_matmul(B::float_transpose(lhs), grad.clone()));
        }
        register_bias_grad::<B>(node(2), grad, grads);
    }
}

/// The gradient of a bias added to every row of an output whose gradient is `grad` (`[m, n]`):
/// its column sum, registered for `node` if the bias is tracked. The backward steps of every
/// fused linear op (f32, packed and sparse bases) share it.
pub fn register_bias_grad<B: Backend>(
    node: Option<NodeId>,
    grad: FloatTensor<B>,
    grads: &mut Gradients,
) {
    if let Some(id) = node {
        let n = grad.shape()[1];
        let sum = B::float_sum_dim(grad, 0);
        grads.register::<B>(id, B::float_reshape(sum, Shape::new([n])));
    }
}

/// Run `lhs · rhs (+ bias)` on the inner backend and record it, keeping `lhs` only if `rhs`
/// is tracked and vice versa.
fn finish_product<B: LinearBackend, C: CheckpointStrategy, const N: usize>(
    prep: OpsPrep<ProductBackward, B, Operands<B>, C, N>,
    [lhs_tracked, rhs_tracked]: [bool; 2],
    [lhs, rhs]: [FloatTensor<B>; 2],
    bias: Option<FloatTensor<B>>,
) -> FloatTensor<Autodiff<B, C>> {
    let run = |lhs, rhs| match bias {
        Some(bias) => B::fast_linear(lhs, rhs, bias),
        None => B::fast_matmul(lhs, rhs),
    };
    match prep.compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = (
                rhs_tracked.then(|| lhs.clone()),
                lhs_tracked.then(|| rhs.clone()),
            );
            prep.finish(state, run(lhs, rhs))
        }
        OpsKind::UnTracked(prep) => prep.finish(run(lhs, rhs)),
    }
}

impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn fast_matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let tracked = [&lhs, &rhs].map(|t| t.is_tracked());
        let prep = ProductBackward.prepare::<C>([lhs.node(), rhs.node()]);
        let inputs = [lhs, rhs].map(|t| t.into_primitive());
        finish_product(prep, tracked, inputs, None)
    }

    fn fast_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let tracked = [&x, &weight].map(|t| t.is_tracked());
        let prep = ProductBackward.prepare::<C>([x.node(), weight.node(), bias.node()]);
        let inputs = [x, weight].map(|t| t.into_primitive());
        finish_product(prep, tracked, inputs, Some(bias.into_primitive()))
    }

    fn fast_lora_matmul(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let tracked = [&x, &weight, &a, &b].map(|t| t.is_tracked());
        let prep = LoraBackward.prepare::<C>([x.node(), weight.node(), a.node(), b.node()]);
        let inputs = [x, weight, a, b].map(|t| t.into_primitive());
        finish_lora(prep, tracked, inputs, None, scale)
    }

    fn fast_lora_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let tracked = [&x, &weight, &a, &b].map(|t| t.is_tracked());
        let nodes = [x.node(), weight.node(), a.node(), b.node(), bias.node()];
        let prep = LoraBackward.prepare::<C>(nodes);
        let inputs = [x, weight, a, b].map(|t| t.into_primitive());
        finish_lora(prep, tracked, inputs, Some(bias.into_primitive()), scale)
    }
}

/// The backward step of [`LinearBackend::fast_lora_matmul`] and
/// [`fast_lora_linear`](LinearBackend::fast_lora_linear) on `Autodiff`; its parents are
/// `[x, weight, a, b]`, then the bias if there is one.
#[derive(Debug)]
struct LoraBackward;

/// What [`LoraBackward`] keeps, each only when a gradient needs it: `x` (for `dA`, `dW`),
/// `weight` and `a` (for `dx`), `b` (for `dA`, `dx`), `h = scale · x·a` (for `dB`).
#[derive(Clone, Debug)]
struct LoraState<T> {
    x: Option<T>,
    weight: Option<T>,
    a: Option<T>,
    b: Option<T>,
    h: Option<T>,
    scale: f64,
}

impl<B: LinearBackend, const N: usize> Backward<B, N> for LoraBackward {
    type State = LoraState<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ids = ops.parents.map(|p| p.map(|n| n.id));
        let node = |i: usize| ids.get(i).copied().flatten();
        let s = ops.state;
        // `scale · g·bᵀ`, `[m, r]`: what `dA` and `dx` share.
        let gb = register_low_rank_grads::<B>(
            grads,
            &grad,
            [node(2), node(3)],
            s.x.as_ref(),
            (s.h, s.b),
            s.scale,
        );
        if let (Some(id), Some(x)) = (node(1), s.x) {
            grads.register::<B>(id, B::fast_matmul(B::float_transpose(x), grad.clone()));
        }
        register_bias_grad::<B>(node(4), grad.clone(), grads);
        // dx = g·Wᵀ + (scale · g·bᵀ)·aᵀ, as one product.
        if let (Some(id), Some(w), Some(a), Some(gb)) = (node(0), s.weight, s.a, gb) {
            let t = |t| B::float_transpose(t);
            grads.register::<B>(id, B::fast_matmul_low_rank(grad, t(w), gb, t(a)));
        }
    }
}

/// The gradients of a LoRA term `h·b` (`h = scale · x·a`) for the output gradient `grad`
/// (`[m, n]`): `dA = xᵀ·gb` and `dB = hᵀ·g` registered for the tracked factors (`ids`: `[a, b]`),
/// from one pass of [`LinearBackend::fast_lora_grads`] when both are tracked; returns `gb =
/// scale · g·bᵀ` (`[m, r]`, what the input gradient needs too) when `b` was kept. The backward
/// steps of every fused LoRA op (f32, packed and sparse bases) share it.
pub fn register_low_rank_grads<B: LinearBackend>(
    grads: &mut Gradients,
    grad: &FloatTensor<B>,
    [a_id, b_id]: [Option<NodeId>; 2],
    x: Option<&FloatTensor<B>>,
    (h, b): (Option<FloatTensor<B>>, Option<FloatTensor<B>>),
    scale: f64,
) -> Option<FloatTensor<B>> {
    match (a_id, b_id, x, h, b) {
        // Both factors tracked: the three low-rank products in one pass over `g` and `x`.
        (Some(a_id), Some(b_id), Some(x), Some(h), Some(b)) => {
            let ([m, r], k, n) = (h.shape().dims(), x.shape()[1], grad.shape()[1]);
            let all = B::fast_lora_grads(grad.clone(), x.clone(), h, b, scale);
            let part = |start: usize, shape: [usize; 2]| {
                let end = start + shape[0] * shape[1];
                let part = B::float_slice(all.clone(), &[Slice::from(start..end)]);
                B::float_reshape(part, Shape::new(shape))
            };
            grads.register::<B>(a_id, part(m * r, [k, r]));
            grads.register::<B>(b_id, part(m * r + k * r, [r, n]));
            Some(part(0, [m, r]))
        }
        (a_id, b_id, x, h, b) => {
            let gb = b.map(|b| {
                let gb = B::fast_matmul(grad.clone(), B::float_transpose(b));
                B::float_mul_scalar(gb, scale.into())
            });
            if let (Some(id), Some(x), Some(gb)) = (a_id, x, &gb) {
                let da = B::fast_matmul(B::float_transpose(x.clone()), gb.clone());
                grads.register::<B>(id, da);
            }
            if let (Some(id), Some(h)) = (b_id, h) {
                grads.register::<B>(id, B::fast_matmul(B::float_transpose(h), grad.clone()));
            }
            gb
        }
    }
}

/// Run the LoRA product on the inner backend and record it, keeping what the
/// tracked inputs' gradients need (`tracked` and `inputs` in the order `x, weight, a, b`).
fn finish_lora<B: LinearBackend, C: CheckpointStrategy, const N: usize>(
    prep: OpsPrep<LoraBackward, B, LoraState<FloatTensor<B>>, C, N>,
    [x_t, w_t, a_t, b_t]: [bool; 4],
    [x, weight, a, b]: [FloatTensor<B>; 4],
    bias: Option<FloatTensor<B>>,
    scale: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let prep = match prep.compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep,
        OpsKind::UnTracked(prep) => {
            return prep.finish(match bias {
                Some(bias) => B::fast_lora_linear(x, weight, bias, a, b, scale),
                None => B::fast_lora_matmul(x, weight, a, b, scale),
            });
        }
    };
    let h = B::float_mul_scalar(B::fast_matmul(x.clone(), a.clone()), scale.into());
    let state = LoraState {
        x: (a_t || w_t).then(|| x.clone()),
        weight: x_t.then(|| weight.clone()),
        a: x_t.then(|| a.clone()),
        b: (x_t || a_t).then(|| b.clone()),
        h: b_t.then(|| h.clone()),
        scale,
    };
    prep.finish(
        state,
        match bias {
            Some(bias) => B::fast_linear_low_rank(x, weight, bias, h, b),
            None => B::fast_matmul_low_rank(x, weight, h, b),
        },
    )
}

/// `x · weight + bias`, as `burn::tensor::module::linear` computes it (`weight` is `[d_in,
/// d_out]`), with a fast product on flex: no zeroed-then-copied output, the bias as the
/// product's starting value, and one block of rows per thread (see the module documentation). Differentiable on `Autodiff` devices; inputs of rank 3 or more run as one
/// 2-D product over their rows.
///
/// # Shapes
/// * `x`: `[..., d_in]`; `weight`: `[d_in, d_out]`; `bias`: `[d_out]`; returns `[..., d_out]`.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// let device = Device::flex();
/// let x = Tensor::<3>::from_floats([[[1.0, 2.0], [3.0, 4.0]]], &device);
/// let w = Tensor::<2>::from_floats([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], &device);
/// let b = Tensor::<1>::from_floats([0.5, 0.0, 1.0], &device);
/// let y = peft_kernels::linear(x.clone(), w.clone(), Some(b.clone()));
/// let reference = burn::tensor::module::linear(x, w, Some(b));
/// let diff = (y - reference).abs().max().into_scalar::<f32>();
/// assert!(diff < 1e-6);
/// ```
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    if matches!(weight.dtype(), DType::QFloat(_)) {
        // A quantized weight keeps burn's quantized product.
        return burn::tensor::module::linear(x, weight, bias);
    }
    on_rows(x, |x| {
        let y = match bias {
            Some(b) => <Dispatch as LinearBackend>::fast_linear(
                x,
                weight.into_dispatch(),
                b.into_dispatch(),
            ),
            None => <Dispatch as LinearBackend>::fast_matmul(x, weight.into_dispatch()),
        };
        Tensor::<2>::from_dispatch(y)
    })
}

/// `x · weight + bias + scale · (x · a) · b`: a linear layer with a LoRA term, as
/// `linear(x, weight, bias) + linear(linear(x, a, None) * scale, b, None)` computes it, in one
/// differentiable op.
///
/// The LoRA term is added to each block of output rows right after the base product (no
/// separate `[.., d_out]` tensor and add), and the backward pass computes the input gradient
/// `g·weightᵀ + (scale · g·bᵀ)·aᵀ` as one product, where the composed ops make two `[.., d_in]`
/// gradients and add them. Only tracked operands get gradients, from what the forward pass
/// kept for them (a frozen `weight` keeps no `x`).
///
/// # Shapes
/// * `x`: `[..., d_in]`; `weight`: `[d_in, d_out]`; `bias`: `[d_out]`; `a`: `[d_in, r]`; `b`:
///   `[r, d_out]`; returns `[..., d_out]`.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn::tensor::module::linear;
/// let device = Device::flex();
/// let x = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &device);
/// let w = Tensor::<2>::from_floats([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]], &device);
/// let (a, b) = (Tensor::<2>::ones([2, 1], &device), Tensor::<2>::ones([1, 3], &device));
/// let y = peft_kernels::lora_linear(x.clone(), w.clone(), None, a.clone(), b.clone(), 0.5);
/// let reference = linear(x.clone(), w, None) + linear(linear(x, a, None) * 0.5, b, None);
/// let diff = (y - reference).abs().max().into_scalar::<f32>();
/// assert!(diff < 1e-6);
/// ```
pub fn lora_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    a: Tensor<2>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    if matches!(weight.dtype(), DType::QFloat(_)) {
        let base = burn::tensor::module::linear(x.clone(), weight, bias);
        return base + linear(linear(x, a, None) * scale, b, None);
    }
    on_rows(x, |x| {
        let (w, a, b) = (weight.into_dispatch(), a.into_dispatch(), b.into_dispatch());
        let y = match bias {
            Some(bias) => <Dispatch as LinearBackend>::fast_lora_linear(
                x,
                w,
                bias.into_dispatch(),
                a,
                b,
                scale,
            ),
            None => <Dispatch as LinearBackend>::fast_lora_matmul(x, w, a, b, scale),
        };
        Tensor::<2>::from_dispatch(y)
    })
}

/// `f` over the rows of `x` (`[..., d_in]` as a 2-D dispatch tensor), reshaped back to `[...,
/// d_out]`.
fn on_rows<const D: usize>(
    x: Tensor<D>,
    f: impl FnOnce(FloatTensor<Dispatch>) -> Tensor<2>,
) -> Tensor<D> {
    let dims = x.dims();
    let d_in = dims[D - 1];
    let rows = dims[..D - 1].iter().product();
    // flex copies a non-contiguous tensor on any reshape, even to its own shape, one strided
    // element at a time (3.5 ms for the `[384, 2048]` transposed view `xᵀ`).
    let x = if D == 2 {
        Tensor::<2>::from_dispatch(x.into_dispatch())
    } else {
        x.reshape([rows, d_in])
    };
    let y = f(x.into_dispatch());
    if D == 2 {
        return Tensor::from_dispatch(y.into_dispatch());
    }
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

#[cfg(feature = "flex")]
pub(crate) mod flex {
    use burn::backend::{
        Flex,
        ops::{FloatTensorOps, ModuleOps},
        tensor::FloatTensor,
    };
    use burn::tensor::{DType, Shape, TensorData};
    use rayon::prelude::*;
    use std::mem::MaybeUninit;

    use super::LinearBackend;
    use crate::cpu::{fill_uninit, par_fill_uninit};

    /// Products of at least this many multiply-adds use gemm's threads (flex's own threshold).
    const PARALLEL_WORK: usize = 192 * 192 * 192;

    /// Inner-dimension length per thread from which a product with too few rows to split runs
    /// as partial products over slices of it ([`inner_split`]).
    const INNER_SPLIT: usize = 256;

    /// Products of at most this many rows, below the threading threshold, whose right-hand side
    /// has at least [`COLUMN_SPLIT_WEIGHT`] elements run as one block of output columns per
    /// thread ([`column_split`]): a decoding step's `[1, d_in] · [d_in, d_out]` is bound by
    /// reading the weight, which one core alone cannot read at the memory's full rate.
    const COLUMN_SPLIT_ROWS: usize = 8;

    /// See [`COLUMN_SPLIT_ROWS`]: 128 Ki elements (512 KB of f32 weight).
    const COLUMN_SPLIT_WEIGHT: usize = 1 << 17;

    impl LinearBackend for Flex {
        fn fast_matmul(lhs: FloatTensor<Flex>, rhs: FloatTensor<Flex>) -> FloatTensor<Flex> {
            if !supported(&[&lhs, &rhs]) {
                return Flex::float_matmul(lhs, rhs);
            }
            product(lhs, rhs, None, None)
        }

        fn fast_linear(
            x: FloatTensor<Flex>,
            weight: FloatTensor<Flex>,
            bias: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !supported(&[&x, &weight]) || bias.dtype() != DType::F32 {
                return Flex::linear(x, weight, Some(bias));
            }
            product(x, weight, Some(bias), None)
        }

        fn fast_lora_grads(
            g: FloatTensor<Flex>,
            x: FloatTensor<Flex>,
            h: FloatTensor<Flex>,
            b: FloatTensor<Flex>,
            scale: f64,
        ) -> FloatTensor<Flex> {
            let rank = h.layout().shape().dims::<2>()[1];
            if supported(&[&g, &x, &h, &b]) && rank < 16 && rows::available(16) {
                return padded_lora_grads(g, x, h, b, scale as f32);
            }
            if !supported(&[&g, &x, &h, &b]) || !rows::available(rank) {
                return super::composed_lora_grads::<Flex>(g, x, h, b, scale);
            }
            lora_grads(g, x, h, b, scale as f32)
        }

        fn fast_matmul_low_rank(
            x: FloatTensor<Flex>,
            weight: FloatTensor<Flex>,
            h: FloatTensor<Flex>,
            b: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !supported(&[&x, &weight, &h, &b]) {
                let product = Flex::float_matmul(x, weight);
                return Flex::float_add(product, Flex::float_matmul(h, b));
            }
            product(x, weight, None, Some((h, b)))
        }

        fn fast_linear_low_rank(
            x: FloatTensor<Flex>,
            weight: FloatTensor<Flex>,
            bias: FloatTensor<Flex>,
            h: FloatTensor<Flex>,
            b: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !supported(&[&x, &weight, &h, &b]) || bias.dtype() != DType::F32 {
                let product = Flex::linear(x, weight, Some(bias));
                return Flex::float_add(product, Flex::float_matmul(h, b));
            }
            product(x, weight, Some(bias), Some((h, b)))
        }
    }

    /// 2-D f32 operands.
    fn supported(ts: &[&FloatTensor<Flex>]) -> bool {
        ts.iter()
            .all(|t| t.dtype() == DType::F32 && t.layout().shape().num_dims() == 2)
    }

    /// A 2-D operand with non-negative strides (copied otherwise): the tensor, its element
    /// offset and its `(row, column)` strides.
    pub(crate) fn operand(t: FloatTensor<Flex>) -> (FloatTensor<Flex>, usize, [usize; 2]) {
        let t = if t.layout().strides().iter().all(|s| *s >= 0) {
            t
        } else {
            t.to_contiguous()
        };
        let s = t.layout().strides();
        let (offset, strides) = (t.layout().start_offset(), [s[0] as usize, s[1] as usize]);
        (t, offset, strides)
    }

    /// `lhs · rhs (+ bias) (+ h · b)` into a new row-major `[m, n]` tensor, `low_rank` being
    /// `(h, b)`: each block of rows gets its low-rank term while it is still in cache.
    fn product(
        lhs: FloatTensor<Flex>,
        rhs: FloatTensor<Flex>,
        bias: Option<FloatTensor<Flex>>,
        low_rank: Option<(FloatTensor<Flex>, FloatTensor<Flex>)>,
    ) -> FloatTensor<Flex> {
        let (m, k) = (lhs.layout().shape()[0], lhs.layout().shape()[1]);
        let n = rhs.layout().shape()[1];
        assert_eq!(
            rhs.layout().shape()[0],
            k,
            "linear: inner dimensions differ ({m}x{k} · {}x{n})",
            rhs.layout().shape()[0]
        );
        let bias = bias.map(|b| b.to_contiguous());
        let bias = bias
            .as_ref()
            .map(|b| b.as_slice::<f32>().expect("a contiguous f32 bias"));
        if let Some(b) = bias {
            assert_eq!(
                b.len(),
                n,
                "linear: bias has {} entries for {n} outputs",
                b.len()
            );
        }
        let (lhs, lhs_off, lhs_s) = operand(lhs);
        let (rhs, rhs_off, rhs_s) = operand(rhs);
        let lhs = Matrix {
            data: &lhs.storage::<f32>()[lhs_off..],
            strides: lhs_s,
        };
        let rhs = Matrix {
            data: &rhs.storage::<f32>()[rhs_off..],
            strides: rhs_s,
        };
        assert!(
            lhs.fits(m, k) && rhs.fits(k, n),
            "linear: operand view out of bounds"
        );
        let low_rank = low_rank.map(|(h, b)| {
            let r = h.layout().shape()[1];
            assert!(
                h.layout().shape()[0] == m && b.layout().shape().dims::<2>() == [r, n],
                "linear: low-rank term {:?} · {:?} for a {m}x{n} output",
                h.layout().shape(),
                b.layout().shape()
            );
            (operand(h), operand(b), r)
        });
        let low_rank = low_rank
            .as_ref()
            .map(|((h, h_off, h_s), (b, b_off, b_s), r)| {
                let h = Matrix {
                    data: &h.storage::<f32>()[*h_off..],
                    strides: *h_s,
                };
                let b = Matrix {
                    data: &b.storage::<f32>()[*b_off..],
                    strides: *b_s,
                };
                assert!(
                    h.fits(m, *r) && b.fits(*r, n),
                    "linear: low-rank view out of bounds"
                );
                (h, b, *r)
            });
        let len = m * n;
        // Row blocks, one per thread for large products: each runs gemm on one thread against
        // its own rows (gemm's own threads scale worse on these shapes, `docs/benchmarks.md`).
        let threads = if m * n * k >= PARALLEL_WORK {
            rayon::current_num_threads()
        } else {
            1
        };
        let cores = rayon::current_num_threads();
        if threads == 1 && cores > 1 && m <= COLUMN_SPLIT_ROWS && k * n >= COLUMN_SPLIT_WEIGHT {
            let out = column_split((m, n, k), (lhs, rhs), bias, low_rank, cores);
            return FloatTensor::<Flex>::from_data(TensorData::new(out, Shape::new([m, n])));
        }
        let block = m.div_ceil(threads).next_multiple_of(16).max(1);
        let few_rows = threads > 1 && block >= m;
        if few_rows && k >= INNER_SPLIT * threads {
            // Too few rows to split but a long inner dimension (LoRA's `B` gradient `hᵀ·g`, 16
            // rows deep in tokens): one slice of the inner dimension per thread.
            let mut out = inner_split((m, n, k), (lhs, rhs), bias, threads);
            if let Some((h, b, r)) = low_rank
                && m * n * r > 0
            {
                // SAFETY: `out` holds the `m·n` initialised outputs; `fits` was checked above.
                #[allow(unsafe_code)]
                unsafe {
                    gemm_into(
                        out.as_mut_ptr(),
                        (m, n, r),
                        (h, b),
                        true,
                        gemm::Parallelism::None,
                    );
                }
            }
            return FloatTensor::<Flex>::from_data(TensorData::new(out, Shape::new([m, n])));
        }
        // Too few rows to split and a short inner dimension: gemm's own threads.
        let parallelism = if few_rows {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        let rows_block = |i: usize, chunk: &mut [MaybeUninit<f32>]| {
            let rows = chunk.len() / n.max(1);
            let lhs = lhs.rows(i * block);
            let low_rank = low_rank.map(|(h, b, r)| (h.rows(i * block), b, r));
            block_product((rows, n, k), chunk, (lhs, rhs), bias, low_rank, parallelism);
        };
        // SAFETY: `block_product` initialises every element of each block it gets.
        #[allow(unsafe_code)]
        let out = unsafe { par_fill_uninit(len, (block * n).max(1), rows_block) };
        FloatTensor::<Flex>::from_data(TensorData::new(out, Shape::new([m, n])))
    }

    /// [`LinearBackend::fast_lora_grads`] in one pass over the rows of `g` and `x`, one block
    /// of rows per thread: each row's `gb` is formed from `g`'s row while that row also
    /// updates the thread's `hᵀ·g`, then `x`'s row updates its `xᵀ·gb`; the threads' partial
    /// sums are added at the end. Three separate products read `g` twice and `x` once more,
    /// each through gemm's packing for a 16-wide output.
    fn lora_grads(
        g: FloatTensor<Flex>,
        x: FloatTensor<Flex>,
        h: FloatTensor<Flex>,
        b: FloatTensor<Flex>,
        scale: f32,
    ) -> FloatTensor<Flex> {
        let contiguous = |t: FloatTensor<Flex>| {
            if t.is_contiguous() {
                t
            } else {
                t.to_contiguous()
            }
        };
        let [m, n] = g.layout().shape().dims::<2>();
        let [_, k] = x.layout().shape().dims::<2>();
        let [_, r] = h.layout().shape().dims::<2>();
        assert!(
            x.layout().shape().dims::<2>()[0] == m
                && h.layout().shape().dims::<2>()[0] == m
                && b.layout().shape().dims::<2>() == [r, n],
            "lora grads: g {:?}, x {:?}, h {:?}, b {:?}",
            g.layout().shape(),
            x.layout().shape(),
            h.layout().shape(),
            b.layout().shape()
        );
        let (g, x, h) = (contiguous(g), contiguous(x), contiguous(h));
        // bᵀ, `[n, r]` row-major: one `r`-wide row per output column.
        let bt = Flex::float_transpose(b).to_contiguous();
        fn slice(t: &FloatTensor<Flex>) -> &[f32] {
            t.as_slice::<f32>().expect("a contiguous f32 tensor")
        }
        let (gs, xs, hs, bts) = (slice(&g), slice(&x), slice(&h), slice(&bt));
        let mut out = vec![0.0f32; m * r + k * r + r * n];
        let (gb, rest) = out.split_at_mut(m * r);
        let block = m
            .div_ceil(rayon::current_num_threads())
            .next_multiple_of(4)
            .max(4);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = gb
            .par_chunks_mut(block * r)
            .enumerate()
            .map(|(i, gb)| {
                let (first, count) = (i * block, gb.len() / r);
                let (mut dbt, mut da) = (vec![0.0f32; n * r], vec![0.0f32; k * r]);
                let rows = rows::Rows {
                    g: &gs[first * n..(first + count) * n],
                    x: &xs[first * k..(first + count) * k],
                    h: &hs[first * r..(first + count) * r],
                };
                rows::lora_grads(rows, bts, scale, gb, &mut dbt, &mut da);
                (dbt, da)
            })
            .collect();
        let (da, db) = rest.split_at_mut(k * r);
        for (dbt, part) in &partials {
            da.iter_mut().zip(part).for_each(|(o, v)| *o += v);
            // db[l][j] += dbt[j][l]
            for (j, row) in dbt.chunks_exact(r).enumerate() {
                for (l, v) in row.iter().enumerate() {
                    db[l * n + j] += v;
                }
            }
        }
        let len = out.len();
        FloatTensor::<Flex>::from_data(TensorData::new(out, Shape::new([len])))
    }

    /// The row loop of [`lora_grads`]: AVX-512 for rank 16, one 16-lane register per row of
    /// `h`, `gb`, `bᵀ`, `hᵀ·g` and `xᵀ·gb`. Other ranks and CPUs take the three products.
    mod rows {
        /// Rows per register block: each `bᵀ`, `hᵀ·g` and `xᵀ·gb` row is loaded once for this
        /// many rows' updates (`2·GROUP + 4` of the 32 vector registers).
        const GROUP: usize = 8;

        /// Whether the kernel runs for `rank`: rank 16 with the AVX-512 body
        /// ([`CpuBody::current`](crate::cpu_body::CpuBody::current), never wider than the CPU).
        pub(super) fn available(rank: usize) -> bool {
            rank == 16 && crate::cpu_body::CpuBody::current() == crate::cpu_body::CpuBody::Avx512
        }

        /// One thread's rows of `g` (`[rows, n]`), `x` (`[rows, k]`) and `h` (`[rows, 16]`).
        #[derive(Clone, Copy)]
        pub(super) struct Rows<'a> {
            pub g: &'a [f32],
            pub x: &'a [f32],
            pub h: &'a [f32],
        }

        /// `gb = scale · g·bᵀ` for these rows (written), `dbt += gᵀ·h` (`[n, 16]`), `da +=
        /// xᵀ·gb` (`[k, 16]`); `bt` is `bᵀ`, `[n, 16]`. Only where [`available`] says so.
        pub(super) fn lora_grads(
            rows: Rows<'_>,
            bt: &[f32],
            scale: f32,
            gb: &mut [f32],
            dbt: &mut [f32],
            da: &mut [f32],
        ) {
            // The CPU's features, not the body in force: a test may force another body between
            // the dispatch and this call, but the instructions must exist.
            assert!(
                crate::cpu_body::CpuBody::detected() == crate::cpu_body::CpuBody::Avx512,
                "the rank-16 LoRA gradient kernel needs AVX-512"
            );
            #[cfg(target_arch = "x86_64")]
            {
                let (bt, _) = bt.as_chunks::<16>();
                let (dbt, _) = dbt.as_chunks_mut::<16>();
                let (da, _) = da.as_chunks_mut::<16>();
                let (gb, _) = gb.as_chunks_mut::<16>();
                let (h, _) = rows.h.as_chunks::<16>();
                let (n, k) = (bt.len(), da.len());
                assert!(
                    dbt.len() == n && rows.g.len() >= gb.len() * n && rows.x.len() >= gb.len() * k
                );
                let mut first = 0;
                while first < gb.len() {
                    let group = (gb.len() - first).min(GROUP);
                    let g = |t: usize| &rows.g[(first + t) * n..][..n];
                    let x = |t: usize| &rows.x[(first + t) * k..][..k];
                    if group == GROUP {
                        let (gs, xs) = (std::array::from_fn(g), std::array::from_fn(x));
                        let hs = std::array::from_fn(|t| h[first + t]);
                        // SAFETY: `available` checked AVX-512 above.
                        #[allow(unsafe_code)]
                        let out = unsafe { block::<GROUP>(gs, xs, hs, bt, scale, dbt, da) };
                        gb[first..first + GROUP].copy_from_slice(&out);
                    } else {
                        for t in 0..group {
                            // SAFETY: as above.
                            #[allow(unsafe_code)]
                            let [out] = unsafe {
                                block::<1>([g(t)], [x(t)], [h[first + t]], bt, scale, dbt, da)
                            };
                            gb[first + t] = out;
                        }
                    }
                    first += group;
                }
            }
        }

        /// `Q` rows (`g`, `x` each at least `n`, `k` long): their `scale · g·bᵀ` rows
        /// (returned), `dbt += gᵀ·h`, `da += xᵀ·gb`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[allow(unsafe_code)]
        fn block<const Q: usize>(
            g: [&[f32]; Q],
            x: [&[f32]; Q],
            h: [[f32; 16]; Q],
            bt: &[[f32; 16]],
            scale: f32,
            dbt: &mut [[f32; 16]],
            da: &mut [[f32; 16]],
        ) -> [[f32; 16]; Q] {
            use std::arch::x86_64::{
                __m512, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_set1_ps,
                _mm512_setzero_ps, _mm512_storeu_ps,
            };
            let (n, k) = (bt.len(), da.len());
            assert!(
                dbt.len() == n && g.iter().all(|r| r.len() >= n) && x.iter().all(|r| r.len() >= k)
            );
            // SAFETY: every load and store is of a 16-float row of `bt`, `dbt`, `da`, `h` or the
            // returned rows, or a single element of `g`/`x` below `n`/`k` (asserted above).
            unsafe {
                let hv: [__m512; Q] = std::array::from_fn(|t| _mm512_loadu_ps(h[t].as_ptr()));
                let mut acc = [_mm512_setzero_ps(); Q];
                for j in 0..n {
                    let b = _mm512_loadu_ps(bt.get_unchecked(j).as_ptr());
                    let row = dbt.get_unchecked_mut(j).as_mut_ptr();
                    let mut d = _mm512_loadu_ps(row);
                    for t in 0..Q {
                        let v = _mm512_set1_ps(*g[t].get_unchecked(j));
                        acc[t] = _mm512_fmadd_ps(v, b, acc[t]);
                        d = _mm512_fmadd_ps(v, hv[t], d);
                    }
                    _mm512_storeu_ps(row, d);
                }
                let s = _mm512_set1_ps(scale);
                for a in &mut acc {
                    *a = _mm512_mul_ps(*a, s);
                }
                for c in 0..k {
                    let row = da.get_unchecked_mut(c).as_mut_ptr();
                    let mut d = _mm512_loadu_ps(row);
                    for t in 0..Q {
                        d = _mm512_fmadd_ps(_mm512_set1_ps(*x[t].get_unchecked(c)), acc[t], d);
                    }
                    _mm512_storeu_ps(row, d);
                }
                std::array::from_fn(|t| {
                    let mut out = [0.0f32; 16];
                    _mm512_storeu_ps(out.as_mut_ptr(), acc[t]);
                    out
                })
            }
        }
    }

    /// `lhs · rhs (+ bias)` as `threads` partial products over slices of the inner dimension,
    /// each on its own thread, then summed: for products with few rows and a long inner
    /// dimension, where row blocks cannot split the work.
    fn inner_split(
        (m, n, k): (usize, usize, usize),
        (lhs, rhs): (Matrix<'_>, Matrix<'_>),
        bias: Option<&[f32]>,
        threads: usize,
    ) -> Vec<f32> {
        let depth = k.div_ceil(threads);
        let mut partials: Vec<Vec<f32>> = (0..threads)
            .into_par_iter()
            .map(|t| {
                let (first, len) = (t * depth, depth.min(k - (t * depth).min(k)));
                let (lhs, rhs) = (lhs.cols(first), rhs.rows(first));
                let product = |dst: &mut [MaybeUninit<f32>]| {
                    block_product(
                        (m, n, len),
                        dst,
                        (lhs, rhs),
                        None,
                        None,
                        gemm::Parallelism::None,
                    )
                };
                // SAFETY: `block_product` initialises all `m·n` elements.
                #[allow(unsafe_code)]
                unsafe {
                    fill_uninit(m * n, product)
                }
            })
            .collect();
        let mut out = partials.swap_remove(0);
        for part in &partials {
            out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
        }
        if let Some(b) = bias {
            for row in out.chunks_mut(n.max(1)) {
                row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
            }
        }
        out
    }

    /// `lhs · rhs (+ bias) (+ h · b)` for a product with a few rows and a large right-hand side:
    /// one block of output columns per thread (each reads only its columns of `rhs`), then the
    /// blocks' rows laid side by side (a copy of the few output rows).
    fn column_split(
        (m, n, k): (usize, usize, usize),
        (lhs, rhs): (Matrix<'_>, Matrix<'_>),
        bias: Option<&[f32]>,
        low_rank: Option<(Matrix<'_>, Matrix<'_>, usize)>,
        threads: usize,
    ) -> Vec<f32> {
        let width = n.div_ceil(threads).next_multiple_of(16);
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(width))
            .into_par_iter()
            .map(|t| {
                let first = t * width;
                let cols = width.min(n - first);
                let product = |dst: &mut [MaybeUninit<f32>]| {
                    block_product(
                        (m, cols, k),
                        dst,
                        (lhs, rhs.cols(first)),
                        bias.map(|b| &b[first..first + cols]),
                        low_rank.map(|(h, b, r)| (h, b.cols(first), r)),
                        gemm::Parallelism::None,
                    )
                };
                // SAFETY: `block_product` initialises all `m·cols` elements.
                #[allow(unsafe_code)]
                unsafe {
                    fill_uninit(m * cols, product)
                }
            })
            .collect();
        let mut out = Vec::with_capacity(m * n);
        for row in 0..m {
            for part in &blocks {
                let cols = part.len() / m;
                out.extend_from_slice(&part[row * cols..(row + 1) * cols]);
            }
        }
        out
    }

    /// A strided view into a storage slice.
    #[derive(Clone, Copy)]
    pub(crate) struct Matrix<'a> {
        pub(crate) data: &'a [f32],
        /// `(row, column)` strides in elements.
        pub(crate) strides: [usize; 2],
    }

    impl Matrix<'_> {
        /// Whether every element of a `rows x cols` view lies inside the slice.
        pub(crate) fn fits(&self, rows: usize, cols: usize) -> bool {
            rows == 0
                || cols == 0
                || (rows - 1) * self.strides[0] + (cols - 1) * self.strides[1] < self.data.len()
        }

        /// The view from column `first` on (empty past the end).
        fn cols(self, first: usize) -> Self {
            let start = (first * self.strides[1]).min(self.data.len());
            Self {
                data: &self.data[start..],
                strides: self.strides,
            }
        }

        /// The view from row `first` on (empty past the end).
        pub(crate) fn rows(self, first: usize) -> Self {
            let start = (first * self.strides[0]).min(self.data.len());
            Self {
                data: &self.data[start..],
                strides: self.strides,
            }
        }
    }

    /// `lhs · rhs (+ bias) (+ h · b)` for an `m x n` block (on this thread unless `parallelism`
    /// says otherwise), written row-major into `dst` (exactly `m·n` elements, uninitialised).
    /// The operands must hold the `m x k`, `k x n`, `m x r` and `r x n` views (`Matrix::fits`).
    fn block_product(
        (m, n, k): (usize, usize, usize),
        dst: &mut [MaybeUninit<f32>],
        (lhs, rhs): (Matrix<'_>, Matrix<'_>),
        bias: Option<&[f32]>,
        low_rank: Option<(Matrix<'_>, Matrix<'_>, usize)>,
        parallelism: gemm::Parallelism,
    ) {
        assert!(dst.len() == m * n && lhs.fits(m, k) && rhs.fits(k, n));
        match bias {
            // Every row starts as the bias.
            Some(b) => {
                for row in dst.chunks_exact_mut(n.max(1)) {
                    row.write_copy_of_slice(b);
                }
            }
            None if k == 0 => dst.iter_mut().for_each(|d| {
                d.write(0.0);
            }),
            None => {}
        }
        if m == 0 || n == 0 {
            return;
        }
        let dst = dst.as_mut_ptr().cast::<f32>();
        if k > 0 {
            // SAFETY: the assert keeps both operand views inside their slices and `dst` holds
            // the `m·n` elements. With a bias every element was initialised above; without one
            // gemm does not read `dst` (`read_dst` false) and writes each element (k > 0).
            #[allow(unsafe_code)]
            unsafe {
                gemm_into(dst, (m, n, k), (lhs, rhs), bias.is_some(), parallelism);
            }
        }
        // Every element is initialised now: by the bias, the zeros (k = 0) or the product.
        if let Some((h, b, r)) = low_rank
            && r > 0
        {
            assert!(h.fits(m, r) && b.fits(r, n));
            // SAFETY: as above, with every element of `dst` initialised for `read_dst`.
            #[allow(unsafe_code)]
            unsafe {
                gemm_into(dst, (m, n, r), (h, b), true, parallelism);
            }
        }
    }

    /// `dst = lhs · rhs`, or `dst += lhs · rhs` with `read_dst`, for a row-major `m x n` `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `m·n` writes (and reads with `read_dst`, initialised), alias
    /// neither operand, and `lhs`, `rhs` must hold their `m x k`, `k x n` views.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn gemm_into(
        dst: *mut f32,
        (m, n, k): (usize, usize, usize),
        (lhs, rhs): (Matrix<'_>, Matrix<'_>),
        read_dst: bool,
        parallelism: gemm::Parallelism,
    ) {
        debug_assert!(lhs.fits(m, k) && rhs.fits(k, n));
        // SAFETY: the caller's contract.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                n as isize,
                read_dst,
                lhs.data.as_ptr(),
                lhs.strides[1] as isize,
                lhs.strides[0] as isize,
                rhs.data.as_ptr(),
                rhs.strides[1] as isize,
                rhs.strides[0] as isize,
                if read_dst { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// [`lora_grads`] for a rank below 16 where the rank-16 row kernel runs: `h` and `b`
    /// padded with zero columns (rows) to rank 16, the padded lanes' gradients (zero) dropped.
    /// RoSA's LoRA part (ranks 8 and 12 in the benchmarks) then takes the one-pass kernel too.
    fn padded_lora_grads(
        g: FloatTensor<Flex>,
        x: FloatTensor<Flex>,
        h: FloatTensor<Flex>,
        b: FloatTensor<Flex>,
        scale: f32,
    ) -> FloatTensor<Flex> {
        const R: usize = 16;
        let [m, r] = h.layout().shape().dims::<2>();
        let [_, n] = b.layout().shape().dims::<2>();
        let k = x.layout().shape().dims::<2>()[1];
        let contiguous = |t: FloatTensor<Flex>| {
            if t.is_contiguous() {
                t
            } else {
                t.to_contiguous()
            }
        };
        let (h, b) = (contiguous(h), contiguous(b));
        let hs = h.as_slice::<f32>().expect("a contiguous f32 tensor");
        let bs = b.as_slice::<f32>().expect("a contiguous f32 tensor");
        let mut hp = vec![0f32; m * R];
        for (dst, src) in hp.chunks_exact_mut(R).zip(hs.chunks_exact(r.max(1))) {
            dst[..r].copy_from_slice(src);
        }
        let mut bp = vec![0f32; R * n];
        bp[..r * n].copy_from_slice(&bs[..r * n]);
        let hp = FloatTensor::<Flex>::from_data(TensorData::new(hp, Shape::new([m, R])));
        let bp = FloatTensor::<Flex>::from_data(TensorData::new(bp, Shape::new([R, n])));
        let all = lora_grads(g, x, hp, bp, scale);
        let all = all.as_slice::<f32>().expect("a contiguous f32 tensor");
        let (gb, rest) = all.split_at(m * R);
        let (da, db) = rest.split_at(k * R);
        let mut out = Vec::with_capacity(m * r + k * r + r * n);
        for row in gb.chunks_exact(R).chain(da.chunks_exact(R)) {
            out.extend_from_slice(&row[..r]);
        }
        out.extend_from_slice(&db[..r * n]);
        let len = out.len();
        FloatTensor::<Flex>::from_data(TensorData::new(out, Shape::new([len])))
    }
}
