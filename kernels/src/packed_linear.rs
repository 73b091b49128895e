//! The linear-layer product over a packed frozen weight as a burn backend extension:
//! [`packed_linear`].
//!
//! The weight is a [`PackedMatrix`] held on the host (NF4 or ggml blocks), shared by reference.
//! On flex the forward product and the input gradient read the packed blocks tile by tile
//! ([`PackedMatrix::forward`], [`PackedMatrix::input_grad`]); the f32 weight of the layer is never
//! built. Other backends take the default bodies, which upload the dequantized weight for each
//! product (correct, not memory-saving). The weight is frozen: its `Autodiff` backward gives the
//! input's gradient (`g·W`) and the bias's (a column sum), never a weight gradient.

use std::sync::Arc;

use burn::backend::{
    Autodiff, Backend, Dispatch, TensorMetadata,
    autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind, OpsPrep},
    },
    backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::{Shape, Tensor, TensorData};

use crate::linear::{LinearBackend, register_bias_grad, register_low_rank_grads};
use crate::quant::PackedMatrix;

/// A packed weight shared between the layer that owns it and the products that read it.
pub type PackedWeight = Arc<PackedMatrix>;

/// The extension behind [`packed_linear`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait PackedBackend: LinearBackend {
    /// `x · Wᵀ` for a 2-D `x` (`[m, in]`) and a packed `[out, in]` weight: `[m, out]`.
    #[fusion(default)]
    fn packed_matmul_t(x: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self> {
        dequantized_matmul_t::<Self>(x, &weight)
    }

    /// `x · Wᵀ + bias`: [`packed_matmul_t`](Self::packed_matmul_t) with a `[out]` bias.
    #[fusion(default)]
    fn packed_linear_t(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let n = bias.shape()[0];
        let product = Self::packed_matmul_t(x, weight);
        Self::float_add(product, Self::float_reshape(bias, Shape::new([1, n])))
    }

    /// `g · W` for a 2-D `g` (`[m, out]`): the input gradient, `[m, in]`.
    #[fusion(default)]
    fn packed_matmul(g: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self> {
        dequantized_matmul::<Self>(g, &weight)
    }

    /// `x · Wᵀ + h · b` (`h`: `[m, r]`, `b`: `[r, out]`): the packed product plus a low-rank
    /// term, summed into one output.
    #[fusion(default)]
    fn packed_matmul_t_low_rank(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        h: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(Self::packed_matmul_t(x, weight), Self::fast_matmul(h, b))
    }

    /// `x · Wᵀ + bias + h · b`: [`packed_matmul_t_low_rank`](Self::packed_matmul_t_low_rank)
    /// with a bias.
    #[fusion(default)]
    fn packed_linear_t_low_rank(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        h: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::float_add(
            Self::packed_linear_t(x, weight, bias),
            Self::fast_matmul(h, b),
        )
    }

    /// `g · W + h · aᵀ` (`h`: `[m, r]`, `a`: `[in, r]`): the input gradient plus a low-rank
    /// term (a LoRA layer's `scale · g·Bᵀ` and `A`), summed into one output.
    #[fusion(default)]
    fn packed_matmul_low_rank(
        g: FloatTensor<Self>,
        weight: PackedWeight,
        h: FloatTensor<Self>,
        a: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let low_rank = Self::fast_matmul(h, Self::float_transpose(a));
        Self::float_add(Self::packed_matmul(g, weight), low_rank)
    }

    /// `x · Wᵀ + scale · (x · a) · b`: a LoRA layer over a packed base (`a`: `[in, r]`, `b`:
    /// `[r, out]`). On `Autodiff` one op (see [`packed_lora_linear`]).
    #[fusion(default)]
    fn packed_lora_matmul_t(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let h = Self::float_mul_scalar(Self::fast_matmul(x.clone(), a), scale.into());
        Self::packed_matmul_t_low_rank(x, weight, h, b)
    }

    /// `x · Wᵀ + bias + scale · (x · a) · b`:
    /// [`packed_lora_matmul_t`](Self::packed_lora_matmul_t) with a bias.
    #[fusion(default)]
    fn packed_lora_linear_t(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let h = Self::float_mul_scalar(Self::fast_matmul(x.clone(), a), scale.into());
        Self::packed_linear_t_low_rank(x, weight, bias, h, b)
    }
}

/// The whole weight in f32 on `device` (the default bodies, here and in the head loss's).
pub(crate) fn dequantized<B: Backend>(weight: &PackedMatrix, device: &B::Device) -> FloatTensor<B> {
    let [rows, cols] = weight.shape();
    B::float_from_data(
        TensorData::new(weight.dequantize(), Shape::new([rows, cols])),
        device,
    )
}

#[cfg(feature = "cube")]
impl PackedBackend for burn_cubecl::CubeBackend {}

/// The backward step of the packed products on `Autodiff`; parents `[x]` or `[x, bias]`.
#[derive(Debug)]
struct PackedBackward;

impl<B: PackedBackend, const N: usize> Backward<B, N> for PackedBackward {
    type State = PackedWeight;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ids = ops.parents.map(|p| p.map(|n| n.id));
        register_bias_grad::<B>(ids.get(1).copied().flatten(), grad.clone(), grads);
        if let Some(Some(id)) = ids.first() {
            grads.register::<B>(*id, B::packed_matmul(grad, ops.state));
        }
    }
}

impl<B: PackedBackend, C: CheckpointStrategy> PackedBackend for Autodiff<B, C> {
    fn packed_matmul_t(x: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self> {
        let prep = PackedBackward.prepare::<C>([x.node()]);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::packed_matmul_t(x.into_primitive(), weight.clone());
                prep.finish(weight, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::packed_matmul_t(x.into_primitive(), weight)),
        }
    }

    fn packed_linear_t(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let prep = PackedBackward.prepare::<C>([x.node(), bias.node()]);
        let (x, bias) = (x.into_primitive(), bias.into_primitive());
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::packed_linear_t(x, weight.clone(), bias);
                prep.finish(weight, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::packed_linear_t(x, weight, bias)),
        }
    }

    fn packed_matmul(g: FloatTensor<Self>, weight: PackedWeight) -> FloatTensor<Self> {
        // The input gradient of a frozen weight, itself differentiable in `g` (a second-order
        // use): `g·W` is linear in `g` with the gradient `h·Wᵀ`.
        let prep = PackedTransposedBackward.prepare::<C>([g.node()]);
        match prep.compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::packed_matmul(g.into_primitive(), weight.clone());
                prep.finish(weight, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::packed_matmul(g.into_primitive(), weight)),
        }
    }

    fn packed_lora_matmul_t(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let tracked = [&x, &a, &b].map(|t| t.is_tracked());
        let prep = PackedLoraBackward.prepare::<C>([x.node(), a.node(), b.node()]);
        let inputs = [x, a, b].map(|t| t.into_primitive());
        finish_packed_lora(prep, tracked, inputs, weight, None, scale)
    }

    fn packed_lora_linear_t(
        x: FloatTensor<Self>,
        weight: PackedWeight,
        bias: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        let tracked = [&x, &a, &b].map(|t| t.is_tracked());
        let prep = PackedLoraBackward.prepare::<C>([x.node(), a.node(), b.node(), bias.node()]);
        let inputs = [x, a, b].map(|t| t.into_primitive());
        let bias = Some(bias.into_primitive());
        finish_packed_lora(prep, tracked, inputs, weight, bias, scale)
    }
}

/// The backward step of [`PackedBackend::packed_lora_matmul_t`] and
/// [`packed_lora_linear_t`](PackedBackend::packed_lora_linear_t) on `Autodiff`; its parents are
/// `[x, a, b]`, then the bias if there is one.
#[derive(Debug)]
struct PackedLoraBackward;

/// What [`PackedLoraBackward`] keeps, each only when a gradient needs it: `x` (for `dA`), `a`
/// (for `dx`), `b` (for `dA`, `dx`), `h = scale · x·a` (for `dB`); the packed weight always.
#[derive(Clone, Debug)]
struct PackedLoraState<T> {
    weight: PackedWeight,
    x: Option<T>,
    a: Option<T>,
    b: Option<T>,
    h: Option<T>,
    scale: f64,
}

impl<B: PackedBackend, const N: usize> Backward<B, N> for PackedLoraBackward {
    type State = PackedLoraState<FloatTensor<B>>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ids = ops.parents.map(|p| p.map(|n| n.id));
        let node = |i: usize| ids.get(i).copied().flatten();
        let s = ops.state;
        // `scale · g·bᵀ`, `[m, r]`: what `dA` and `dx` share.
        let gb = register_low_rank_grads::<B>(
            grads,
            &grad,
            [node(1), node(2)],
            s.x.as_ref(),
            (s.h, s.b),
            s.scale,
        );
        register_bias_grad::<B>(node(3), grad.clone(), grads);
        // dx = g·W + (scale · g·bᵀ)·aᵀ, as one pass over the packed blocks.
        if let (Some(id), Some(a), Some(gb)) = (node(0), s.a, gb) {
            grads.register::<B>(id, B::packed_matmul_low_rank(grad, s.weight, gb, a));
        }
    }
}

/// Run the packed LoRA product on the inner backend and record it, keeping what the tracked
/// inputs' gradients need (`tracked` and `inputs` in the order `x, a, b`).
fn finish_packed_lora<B: PackedBackend, C: CheckpointStrategy, const N: usize>(
    prep: OpsPrep<PackedLoraBackward, B, PackedLoraState<FloatTensor<B>>, C, N>,
    [x_t, a_t, b_t]: [bool; 3],
    [x, a, b]: [FloatTensor<B>; 3],
    weight: PackedWeight,
    bias: Option<FloatTensor<B>>,
    scale: f64,
) -> FloatTensor<Autodiff<B, C>> {
    let prep = match prep.compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep,
        OpsKind::UnTracked(prep) => {
            return prep.finish(match bias {
                Some(bias) => B::packed_lora_linear_t(x, weight, bias, a, b, scale),
                None => B::packed_lora_matmul_t(x, weight, a, b, scale),
            });
        }
    };
    let h = B::float_mul_scalar(B::fast_matmul(x.clone(), a.clone()), scale.into());
    let state = PackedLoraState {
        weight: weight.clone(),
        x: a_t.then(|| x.clone()),
        a: x_t.then(|| a.clone()),
        b: (x_t || a_t).then(|| b.clone()),
        h: b_t.then(|| h.clone()),
        scale,
    };
    prep.finish(
        state,
        match bias {
            Some(bias) => B::packed_linear_t_low_rank(x, weight, bias, h, b),
            None => B::packed_matmul_t_low_rank(x, weight, h, b),
        },
    )
}

/// The backward step of [`PackedBackend::packed_matmul`] on `Autodiff`.
#[derive(Debug)]
struct PackedTransposedBackward;

impl<B: PackedBackend> Backward<B, 1> for PackedTransposedBackward {
    type State = PackedWeight;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, B::packed_matmul_t(grad, ops.state));
        }
    }
}

/// `x · Wᵀ + bias` for a packed `[out, in]` weight `W` (PyTorch's orientation, as GGUF and
/// bitsandbytes store it): a linear layer whose frozen base is kept packed. Differentiable in `x`
/// and `bias` on `Autodiff` devices; inputs of rank 3 or more run as one 2-D product over their
/// rows.
///
/// # Shapes
/// * `x`: `[..., in]`; `weight`: `[out, in]`; `bias`: `[out]`; returns `[..., out]`.
pub fn packed_linear<const D: usize>(
    x: Tensor<D>,
    weight: &PackedWeight,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let (x2, out) = rows_of(x, weight);
    let y = match bias {
        Some(b) => {
            <Dispatch as PackedBackend>::packed_linear_t(x2, weight.clone(), b.into_dispatch())
        }
        None => <Dispatch as PackedBackend>::packed_matmul_t(x2, weight.clone()),
    };
    Tensor::<2>::from_dispatch(y).reshape(out)
}

/// `x` (`[..., in]`) as the 2-D `[rows, in]` operand of a product with the packed `weight`, and
/// the product's output shape `[..., out]`.
fn rows_of<const D: usize>(
    x: Tensor<D>,
    weight: &PackedMatrix,
) -> (FloatTensor<Dispatch>, [usize; D]) {
    let dims = x.dims();
    let [out_features, in_features] = weight.shape();
    assert_eq!(
        dims[D - 1],
        in_features,
        "packed linear: input has {} features for a [{out_features}, {in_features}] weight",
        dims[D - 1]
    );
    let rows: usize = dims[..D - 1].iter().product();
    let mut out = dims;
    out[D - 1] = out_features;
    (x.reshape([rows, in_features]).into_dispatch(), out)
}

/// `x · Wᵀ + bias + scale · (x · a) · b`: a LoRA layer whose frozen base `W` (`[out, in]`) is kept
/// packed, as `packed_linear(x, W, bias) + linear(linear(x, a) * scale, b)` computes it, in one
/// differentiable op.
///
/// On flex the low-rank term is added to each tile of the output right after the packed
/// product, and the backward pass computes the input gradient `g·W + (scale · g·bᵀ)·aᵀ` in one
/// pass over the packed blocks, each stripe finished by its low-rank term (the composed ops make
/// two `[.., in]` gradients and add them); `dA` and `dB` come from
/// [`LinearBackend::fast_lora_grads`], as on an f32 base. Only tracked operands get gradients.
///
/// # Shapes
/// * `x`: `[..., in]`; `weight`: `[out, in]`; `bias`: `[out]`; `a`: `[in, r]`; `b`: `[r, out]`;
///   returns `[..., out]`.
pub fn packed_lora_linear<const D: usize>(
    x: Tensor<D>,
    weight: &PackedWeight,
    bias: Option<Tensor<1>>,
    a: Tensor<2>,
    b: Tensor<2>,
    scale: f64,
) -> Tensor<D> {
    let (x2, out) = rows_of(x, weight);
    let (a, b) = (a.into_dispatch(), b.into_dispatch());
    let y = match bias {
        Some(bias) => <Dispatch as PackedBackend>::packed_lora_linear_t(
            x2,
            weight.clone(),
            bias.into_dispatch(),
            a,
            b,
            scale,
        ),
        None => <Dispatch as PackedBackend>::packed_lora_matmul_t(x2, weight.clone(), a, b, scale),
    };
    Tensor::<2>::from_dispatch(y).reshape(out)
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::{Flex, tensor::FloatTensor};
    use burn::tensor::{DType, Shape, TensorData};

    use super::{PackedBackend, PackedWeight};
    use crate::linear::LinearBackend;
    use crate::quant::LowRank;

    /// A contiguous f32 copy (or the tensor itself) and its 2-D shape.
    fn rows(t: FloatTensor<Flex>) -> (FloatTensor<Flex>, [usize; 2]) {
        let t = t.to_contiguous();
        let shape = t.layout().shape().dims::<2>();
        (t, shape)
    }

    fn tensor(values: Vec<f32>, shape: [usize; 2]) -> FloatTensor<Flex> {
        FloatTensor::<Flex>::from_data(TensorData::new(values, Shape::new(shape)))
    }

    fn f32s(t: &FloatTensor<Flex>) -> &[f32] {
        t.as_slice::<f32>().expect("a contiguous f32 tensor")
    }

    impl PackedBackend for Flex {
        fn packed_matmul_t(x: FloatTensor<Flex>, weight: PackedWeight) -> FloatTensor<Flex> {
            if x.dtype() != DType::F32 {
                return super::dequantized_matmul_t::<Flex>(x, &weight);
            }
            let (x, [m, _]) = rows(x);
            tensor(weight.forward(f32s(&x), m, None), [m, weight.shape()[0]])
        }

        fn packed_linear_t(
            x: FloatTensor<Flex>,
            weight: PackedWeight,
            bias: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if x.dtype() != DType::F32 || bias.dtype() != DType::F32 {
                let n = weight.shape()[0];
                let product = super::dequantized_matmul_t::<Flex>(x, &weight);
                return Flex::float_add(product, Flex::float_reshape(bias, Shape::new([1, n])));
            }
            let (x, [m, _]) = rows(x);
            let bias = bias.to_contiguous();
            tensor(
                weight.forward(f32s(&x), m, Some(f32s(&bias))),
                [m, weight.shape()[0]],
            )
        }

        fn packed_matmul(g: FloatTensor<Flex>, weight: PackedWeight) -> FloatTensor<Flex> {
            if g.dtype() != DType::F32 {
                return super::dequantized_matmul::<Flex>(g, &weight);
            }
            let (g, [m, _]) = rows(g);
            tensor(weight.input_grad(f32s(&g), m), [m, weight.shape()[1]])
        }

        fn packed_matmul_t_low_rank(
            x: FloatTensor<Flex>,
            weight: PackedWeight,
            h: FloatTensor<Flex>,
            b: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&x, &h, &b]) {
                let product = Flex::packed_matmul_t(x, weight);
                return Flex::float_add(product, Flex::fast_matmul(h, b));
            }
            low_rank_forward(x, &weight, None, h, b)
        }

        fn packed_linear_t_low_rank(
            x: FloatTensor<Flex>,
            weight: PackedWeight,
            bias: FloatTensor<Flex>,
            h: FloatTensor<Flex>,
            b: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&x, &bias, &h, &b]) {
                let product = Flex::packed_linear_t(x, weight, bias);
                return Flex::float_add(product, Flex::fast_matmul(h, b));
            }
            low_rank_forward(x, &weight, Some(bias), h, b)
        }

        fn packed_matmul_low_rank(
            g: FloatTensor<Flex>,
            weight: PackedWeight,
            h: FloatTensor<Flex>,
            a: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&g, &h, &a]) {
                let low_rank = Flex::fast_matmul(h, Flex::float_transpose(a));
                return Flex::float_add(Flex::packed_matmul(g, weight), low_rank);
            }
            let (g, [m, _]) = rows(g);
            let (h, [_, rank]) = rows(h);
            let a = a.to_contiguous();
            let low_rank = LowRank {
                h: f32s(&h),
                b: f32s(&a),
                rank,
            };
            let dx = weight.input_grad_low_rank(f32s(&g), m, Some(low_rank));
            tensor(dx, [m, weight.shape()[1]])
        }
    }

    fn all_f32(tensors: &[&FloatTensor<Flex>]) -> bool {
        tensors.iter().all(|t| t.dtype() == DType::F32)
    }

    /// `x·Wᵀ (+ bias) + h·b` through [`PackedMatrix::forward_low_rank`](crate::quant::PackedMatrix::forward_low_rank).
    fn low_rank_forward(
        x: FloatTensor<Flex>,
        weight: &PackedWeight,
        bias: Option<FloatTensor<Flex>>,
        h: FloatTensor<Flex>,
        b: FloatTensor<Flex>,
    ) -> FloatTensor<Flex> {
        let (x, [m, _]) = rows(x);
        let (h, [_, rank]) = rows(h);
        let (b, bias) = (b.to_contiguous(), bias.map(|b| b.to_contiguous()));
        let low_rank = LowRank {
            h: f32s(&h),
            b: f32s(&b),
            rank,
        };
        let y = weight.forward_low_rank(f32s(&x), m, bias.as_ref().map(f32s), Some(low_rank));
        tensor(y, [m, weight.shape()[0]])
    }

    use burn::backend::ops::FloatTensorOps;
}

/// `x · Wᵀ` from the dequantized weight: the default body of
/// [`PackedBackend::packed_matmul_t`], and flex's for dtypes its packed body does not take.
fn dequantized_matmul_t<B: Backend>(x: FloatTensor<B>, weight: &PackedMatrix) -> FloatTensor<B> {
    let w = dequantized::<B>(weight, &x.device());
    B::float_matmul(x, B::float_transpose(w))
}

/// `g · W` from the dequantized weight: the default body of [`PackedBackend::packed_matmul`],
/// and flex's for dtypes its packed body does not take.
fn dequantized_matmul<B: Backend>(g: FloatTensor<B>, weight: &PackedMatrix) -> FloatTensor<B> {
    let w = dequantized::<B>(weight, &g.device());
    B::float_matmul(g, w)
}
