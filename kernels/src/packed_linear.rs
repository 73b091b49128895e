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
        ops::{Backward, Ops, OpsKind},
    },
    backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::{Shape, Tensor, TensorData};

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
pub trait PackedBackend: Backend {
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
        if let Some(Some(id)) = ids.get(1) {
            let n = grad.shape()[1];
            let sum = B::float_sum_dim(grad.clone(), 0);
            grads.register::<B>(*id, B::float_reshape(sum, Shape::new([n])));
        }
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
    let dims = x.dims();
    let [out_features, in_features] = weight.shape();
    assert_eq!(
        dims[D - 1],
        in_features,
        "packed linear: input has {} features for a [{out_features}, {in_features}] weight",
        dims[D - 1]
    );
    let rows: usize = dims[..D - 1].iter().product();
    let x2 = x.reshape([rows, in_features]).into_dispatch();
    let y = match bias {
        Some(b) => {
            <Dispatch as PackedBackend>::packed_linear_t(x2, weight.clone(), b.into_dispatch())
        }
        None => <Dispatch as PackedBackend>::packed_matmul_t(x2, weight.clone()),
    };
    let mut out = dims;
    out[D - 1] = out_features;
    Tensor::<2>::from_dispatch(y).reshape(out)
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::{Flex, tensor::FloatTensor};
    use burn::tensor::{DType, Shape, TensorData};

    use super::{PackedBackend, PackedWeight};

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
