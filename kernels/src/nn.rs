//! Fused kernels for the models' non-GEMM hot spots, as burn backend extensions: [`gelu`],
//! [`attention`] (with a key padding mask) and [`causal_attention`], [`layer_norm`],
//! [`rms_norm`] and [`swiglu`].
//!
//! Why: on flex, burn's exact GELU and its backward pass are one scalar `erf`/`exp` per element
//! on one thread (20-27 ms for a `[2048, 1536]` forward on a 2-core Xeon, where PyTorch takes
//! 1 ms), `attention` under autodiff is a composed fallback that keeps every score matrix, and
//! `layer_norm` under autodiff is a chain of elementwise ops (`docs/benchmarks.md`, "MiniLM
//! against PyTorch").
//!
//! - [`gelu`]: a vectorisable `erf` (Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7,
//!   6e-7 after f32 rounding; the form PyTorch's own vectorised CPU `erf` uses) and `exp`
//!   (Cephes' polynomial), compiled for AVX-512 / AVX2+FMA / baseline and chosen at run time,
//!   over rayon chunks.
//! - [`attention`]: per batch entry and head, two strided GEMMs and a vectorised softmax; the
//!   backward pass recomputes the probabilities. [`causal_attention`] is the same with a causal
//!   mask (LLaMA), in blocks of query rows that score only the keys they see.
//! - [`layer_norm`], [`rms_norm`]: forward and backward fused over rows.
//! - [`rotary`]: LLaMA's rotary position embedding in one pass over strided rows (burn's
//!   composition is a slice, a negation, a concatenation and three products, each with its
//!   autodiff node).
//! - [`swiglu`]: `silu(gate) · up` and its two gradients in one pass each (LLaMA's MLP; burn's
//!   `silu` under autodiff is three ops with scalar `expf`).
//!
//! Implementations: `Flex` (the kernels in `mod flex`), `CubeBackend` and its generated
//! `Fusion` wrapper (default bodies from the backend's own ops; flex uses them too for dtypes
//! other than f32), and `Autodiff` (hand-written backward passes that call the inner backend's
//! backward op).

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
use burn::tensor::{Bool, Shape, Slice, Tensor};

/// The extension behind [`gelu`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait GeluBackend: Backend {
    /// `x · Φ(x)`, the exact GELU, elementwise.
    #[fusion(default)]
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad · (Φ(x) + x · φ(x))`, the GELU's backward pass, elementwise.
    ///
    /// The default body composes it from `erf` and `exp`: burn's default `gelu_backward` (the
    /// one `CubeBackend` uses) is the derivative of the tanh approximation, about 1e-3 off the
    /// exact GELU's.
    #[fusion(default)]
    fn fast_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
        let scaled = Self::float_mul_scalar(x.clone(), std::f64::consts::FRAC_1_SQRT_2.into());
        let cdf = Self::float_add_scalar(Self::float_erf(scaled), 1.0.into());
        let cdf = Self::float_mul_scalar(cdf, 0.5.into());
        let square = Self::float_mul(x.clone(), x.clone());
        let pdf = Self::float_exp(Self::float_mul_scalar(square, (-0.5).into()));
        let pdf = Self::float_mul_scalar(pdf, INV_SQRT_2PI.into());
        let derivative = Self::float_add(cdf, Self::float_mul(x, pdf));
        Self::float_mul(grad, derivative)
    }
}

#[cfg(feature = "cube")]
impl GeluBackend for burn_cubecl::CubeBackend {}

impl<B: GeluBackend, C: CheckpointStrategy> GeluBackend for Autodiff<B, C> {
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: GeluBackend> Backward<B, 1> for GeluBackward {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = node {
                    grads.register::<B>(node.id, B::fast_gelu_backward(ops.state, grad));
                }
            }
        }

        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.primitive().clone();
                prep.finish(input.clone(), B::fast_gelu(input))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_gelu(x.into_primitive())),
        }
    }
}

/// The exact GELU, `x · Φ(x) = 0.5 · x · (1 + erf(x / √2))`, as `burn::tensor::activation::gelu`
/// computes it, with fast kernels on flex (vectorised, multithreaded, forward and backward).
///
/// Agrees with burn's `gelu` to about 1e-6 absolute (the `erf` approximation's error times
/// `|x| / 2`); differentiable on `Autodiff` devices.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// let x = Tensor::<2>::from_floats([[-1.0, 0.0, 2.0]], &Device::flex());
/// let y = peft_kernels::gelu(x.clone());
/// let reference = burn::tensor::activation::gelu(x);
/// let diff = (y - reference).abs().max().into_scalar::<f32>();
/// assert!(diff < 1e-6);
/// ```
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GeluBackend>::fast_gelu(x.into_dispatch()))
}

/// The extension behind [`swiglu`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait SwiGluBackend: Backend {
    /// `silu(gate) · up = gate · σ(gate) · up`, elementwise (same shapes).
    #[fusion(default)]
    fn fast_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        composed_swiglu::forward::<Self>(gate, up)
    }

    /// The gradients of [`fast_swiglu`](Self::fast_swiglu) for the output gradient `grad`,
    /// flattened and concatenated: `[dgate…, dup…]` (1-D), where
    /// `dup = grad · silu(gate)` and `dgate = grad · up · σ(gate) · (1 + gate · (1 − σ(gate)))`.
    #[fusion(default)]
    fn fast_swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        composed_swiglu::backward::<Self>(gate, up, grad)
    }
}

/// [`SwiGluBackend`] from the backend's own ops.
mod composed_swiglu {
    use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::Shape;

    pub(super) fn forward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
        B::float_mul(silu, up)
    }

    pub(super) fn backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let n = gate.shape().num_elements();
        let s = B::sigmoid(gate.clone());
        let silu = B::float_mul(gate.clone(), s.clone());
        let dup = B::float_mul(grad.clone(), silu);
        let one_minus = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
        let factor = B::float_add_scalar(B::float_mul(gate, one_minus), 1.0.into());
        let dgate = B::float_mul(B::float_mul(grad, up), B::float_mul(s, factor));
        let flat = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([n]));
        B::float_cat(vec![flat(dgate), flat(dup)], 0)
    }
}

#[cfg(feature = "cube")]
impl SwiGluBackend for burn_cubecl::CubeBackend {}

impl<B: SwiGluBackend, C: CheckpointStrategy> SwiGluBackend for Autodiff<B, C> {
    fn fast_swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SwiGluBackward;

        impl<B: SwiGluBackend> Backward<B, 2> for SwiGluBackward {
            /// `gate`, `up`: the sigmoid is recomputed, not saved.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (gate, up) = ops.state;
                let shape = gate.shape();
                let n = shape.num_elements();
                let all = B::fast_swiglu_backward(gate, up, grad);
                for (node, start) in ops.parents.into_iter().zip([0, n]) {
                    if let Some(node) = node {
                        let part = B::float_slice(all.clone(), &[Slice::from(start..start + n)]);
                        grads.register::<B>(node.id, B::float_reshape(part, shape.clone()));
                    }
                }
            }
        }

        match SwiGluBackward
            .prepare::<C>([gate.node(), up.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (g, u) = (gate.primitive().clone(), up.primitive().clone());
                let out = B::fast_swiglu(g.clone(), u.clone());
                prep.finish((g, u), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fast_swiglu(gate.into_primitive(), up.into_primitive()))
            }
        }
    }
}

/// LLaMA's gated MLP activation, `silu(gate) · up` (`silu(x) = x · σ(x)`), as
/// `burn::tensor::activation::silu(gate) * up` computes it, fused on flex (one vectorised,
/// multithreaded pass forward and one backward, a branch-free sigmoid from one `exp`).
///
/// Agrees with the composed ops to a few ulp; differentiable on `Autodiff` devices.
///
/// # Shapes
/// - `gate`, `up`: the same shape; returns it.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// let device = Device::flex();
/// let gate = Tensor::<2>::from_floats([[-3.0, 0.0, 2.5]], &device);
/// let up = Tensor::<2>::from_floats([[0.5, 1.0, -2.0]], &device);
/// let y = peft_kernels::swiglu(gate.clone(), up.clone());
/// let reference = burn::tensor::activation::silu(gate) * up;
/// assert!((y - reference).abs().max().into_scalar::<f32>() < 1e-6);
/// ```
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(
        gate.dims(),
        up.dims(),
        "swiglu: gate and up must have the same shape"
    );
    Tensor::from_dispatch(<Dispatch as SwiGluBackend>::fast_swiglu(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// The extension behind [`attention`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait AttentionBackend: Backend {
    /// `softmax(q · kᵀ · scale + bias) · v` over the last dimension of the scores; with
    /// `causal`, query `i` sees keys `0..=i + sk - sq` only (the queries are the last `sq`
    /// positions of the keys' sequence; a query that sees no key gets a zero output).
    ///
    /// # Shapes
    /// - `q`: `[b, h, sq, d]`; `k`: `[b, h, sk, d]`; `v`: `[b, h, sk, dv]`; `bias`: `[b, sk]`
    ///   (added to every query's scores); returns `[b, h, sq, dv]`.
    #[fusion(default)]
    fn fast_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        composed::forward::<Self>(q, k, v, bias, scale, causal)
    }

    /// The gradients of [`fast_attention`](Self::fast_attention) for the output gradient
    /// `grad`, flattened and concatenated: `[dq…, dk…, dv…]` (1-D), each in `[b, h, s, d]`
    /// order.
    #[fusion(default)]
    fn fast_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        composed::backward::<Self>(q, k, v, bias, grad, scale, causal)
    }
}

#[cfg(feature = "cube")]
impl AttentionBackend for burn_cubecl::CubeBackend {}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn fast_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
            /// `q`, `k`, `v`, `bias`, `scale`, `causal`: the probabilities are recomputed, not
            /// saved.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                f64,
                bool,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (q, k, v, bias, scale, causal) = ops.state;
                let shapes = [q.shape(), k.shape(), v.shape()];
                let all = B::fast_attention_backward(q, k, v, bias, grad, scale, causal);
                let mut start = 0;
                for (node, shape) in ops.parents.into_iter().zip(shapes) {
                    let end = start + shape.num_elements();
                    if let Some(node) = node {
                        let part = B::float_slice(all.clone(), &[Slice::from(start..end)]);
                        grads.register::<B>(node.id, B::float_reshape(part, shape));
                    }
                    start = end;
                }
            }
        }

        match AttentionBackward
            .prepare::<C>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (qp, kp, vp) = (
                    q.primitive().clone(),
                    k.primitive().clone(),
                    v.primitive().clone(),
                );
                let bias = bias.into_primitive();
                let out = B::fast_attention(
                    qp.clone(),
                    kp.clone(),
                    vp.clone(),
                    bias.clone(),
                    scale,
                    causal,
                );
                prep.finish((qp, kp, vp, bias, scale, causal), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_attention(
                q.into_primitive(),
                k.into_primitive(),
                v.into_primitive(),
                bias.into_primitive(),
                scale,
                causal,
            )),
        }
    }
}

/// Scaled dot-product attention with a key padding mask: `softmax(q·kᵀ/√d + bias)·v`, where
/// `bias[b, j]` is the most negative finite value where `key_mask[b, j]` is `true` (padding)
/// and 0 elsewhere, as Hugging Face's BERT builds it (a fully masked row attends uniformly
/// instead of giving NaN).
///
/// On flex it runs one task per (batch, head) pair: two small GEMMs and a vectorised softmax in
/// the forward pass; in the backward pass the probabilities are recomputed rather than saved
/// (`[b, h, sq, sk]` per layer less memory than burn's composed attention, which keeps them).
///
/// # Shapes
/// - `q`: `[b, h, sq, d]`; `k`: `[b, h, sk, d]`; `v`: `[b, h, sk, dv]`; `key_mask`: `[b, sk]`;
///   returns `[b, h, sq, dv]`.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_mask: Option<Tensor<2, Bool>>,
) -> Tensor<4> {
    masked_attention(q, k, v, key_mask, false)
}

/// Causal scaled dot-product attention with a key padding mask: as [`attention`], where
/// query `i` also sees only keys `0..=i + sk - sq` (the queries are the last `sq` positions;
/// `sq == sk` in a forward pass over a whole sequence), the attention of LLaMA-family decoders.
///
/// On flex the forward pass runs one task per block of query rows (all heads) and computes
/// only the scores of the keys a block sees; the backward pass runs one task per (batch,
/// head) pair. Neither keeps the `[b, h, sq, sk]` probabilities.
///
/// # Shapes
/// - `q`: `[b, h, sq, d]`; `k`: `[b, h, sk, d]`; `v`: `[b, h, sk, dv]`; `key_mask`: `[b, sk]`;
///   returns `[b, h, sq, dv]`.
pub fn causal_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_mask: Option<Tensor<2, Bool>>,
) -> Tensor<4> {
    masked_attention(q, k, v, key_mask, true)
}

fn masked_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_mask: Option<Tensor<2, Bool>>,
    causal: bool,
) -> Tensor<4> {
    let [b, _, _, d] = q.dims();
    let sk = k.dims()[2];
    let bias = Tensor::<2>::zeros([b, sk], &q.device()).cast(q.dtype());
    let bias = match key_mask {
        Some(mask) => bias.mask_fill(mask, f32::MIN),
        None => bias,
    };
    let scale = 1.0 / (d as f64).sqrt();
    Tensor::from_dispatch(<Dispatch as AttentionBackend>::fast_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.into_dispatch(),
        scale,
        causal,
    ))
}

/// The extension behind [`layer_norm`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait LayerNormBackend: Backend {
    /// `(x - mean) / sqrt(var + eps) · gamma + beta` over the last dimension.
    ///
    /// # Shapes
    /// - `x`: `[..., d]`; `gamma`, `beta`: `[d]`; returns the shape of `x`.
    #[fusion(default)]
    fn fast_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed_norm::forward::<Self>(x, gamma, beta, eps)
    }

    /// The gradients of [`fast_layer_norm`](Self::fast_layer_norm) for the output gradient
    /// `grad`, flattened and concatenated: `[dx…, dgamma…, dbeta…]` (1-D).
    #[fusion(default)]
    fn fast_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed_norm::backward::<Self>(x, gamma, grad, eps)
    }
}

#[cfg(feature = "cube")]
impl LayerNormBackend for burn_cubecl::CubeBackend {}

impl<B: LayerNormBackend, C: CheckpointStrategy> LayerNormBackend for Autodiff<B, C> {
    fn fast_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct LayerNormBackward;

        impl<B: LayerNormBackend> Backward<B, 3> for LayerNormBackward {
            /// `x`, `gamma`, `eps`: the statistics are recomputed, not saved.
            type State = (FloatTensor<B>, FloatTensor<B>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, eps) = ops.state;
                let (shape, d) = (x.shape(), gamma.shape()[0]);
                let all = B::fast_layer_norm_backward(x, gamma, grad, eps);
                let n = shape.num_elements();
                let parts = [
                    (0, n, shape),
                    (n, n + d, Shape::new([d])),
                    (n + d, n + 2 * d, Shape::new([d])),
                ];
                for (node, (start, end, shape)) in ops.parents.into_iter().zip(parts) {
                    if let Some(node) = node {
                        let part = B::float_slice(all.clone(), &[Slice::from(start..end)]);
                        grads.register::<B>(node.id, B::float_reshape(part, shape));
                    }
                }
            }
        }

        match LayerNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, gp) = (x.primitive().clone(), gamma.primitive().clone());
                let out = B::fast_layer_norm(xp.clone(), gp.clone(), beta.into_primitive(), eps);
                prep.finish((xp, gp, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_layer_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                eps,
            )),
        }
    }
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var + eps) · gamma + beta`
/// (biased variance, as `burn::tensor::module::layer_norm` and PyTorch), with a fused
/// multithreaded forward and backward pass on flex.
///
/// # Shapes
/// - `x`: `[..., d]`; `gamma`, `beta`: `[d]`; returns the shape of `x`.
pub fn layer_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    eps: f64,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as LayerNormBackend>::fast_layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// The extension behind [`rms_norm`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait RmsNormBackend: Backend {
    /// `x / sqrt(mean(x²) + eps) · gamma` over the last dimension.
    ///
    /// # Shapes
    /// - `x`: `[..., d]`; `gamma`: `[d]`; returns the shape of `x`.
    #[fusion(default)]
    fn fast_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed_rms::forward::<Self>(x, gamma, eps)
    }

    /// The gradients of [`fast_rms_norm`](Self::fast_rms_norm) for the output gradient `grad`,
    /// flattened and concatenated: `[dx…, dgamma…]` (1-D).
    #[fusion(default)]
    fn fast_rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        composed_rms::backward::<Self>(x, gamma, grad, eps)
    }
}

#[cfg(feature = "cube")]
impl RmsNormBackend for burn_cubecl::CubeBackend {}

impl<B: RmsNormBackend, C: CheckpointStrategy> RmsNormBackend for Autodiff<B, C> {
    fn fast_rms_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RmsNormBackward;

        impl<B: RmsNormBackend> Backward<B, 2> for RmsNormBackward {
            /// `x`, `gamma`, `eps`: the statistics are recomputed, not saved.
            type State = (FloatTensor<B>, FloatTensor<B>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, eps) = ops.state;
                let (shape, d) = (x.shape(), gamma.shape()[0]);
                let all = B::fast_rms_norm_backward(x, gamma, grad, eps);
                let n = shape.num_elements();
                let parts = [(0, n, shape), (n, n + d, Shape::new([d]))];
                for (node, (start, end, shape)) in ops.parents.into_iter().zip(parts) {
                    if let Some(node) = node {
                        let part = B::float_slice(all.clone(), &[Slice::from(start..end)]);
                        grads.register::<B>(node.id, B::float_reshape(part, shape));
                    }
                }
            }
        }

        match RmsNormBackward
            .prepare::<C>([x.node(), gamma.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, gp) = (x.primitive().clone(), gamma.primitive().clone());
                let out = B::fast_rms_norm(xp.clone(), gp.clone(), eps);
                prep.finish((xp, gp, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_rms_norm(
                x.into_primitive(),
                gamma.into_primitive(),
                eps,
            )),
        }
    }
}

/// Root-mean-square normalisation over the last dimension, `x / sqrt(mean(x²) + eps) · gamma`
/// (LLaMA's `RMSNorm`), with a fused multithreaded forward and backward pass on flex.
///
/// # Shapes
/// - `x`: `[..., d]`; `gamma`: `[d]`; returns the shape of `x`.
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as RmsNormBackend>::fast_rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        eps,
    ))
}

/// The RMS norm from the backend's own ops (every backend but flex's f32 path).
mod composed_rms {
    use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::Shape;

    /// `x` as `[rows, d]` and `rstd = 1 / sqrt(mean(x²) + eps)` (`[rows, 1]`).
    fn rstd<B: Backend>(x: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let x = B::float_reshape(x, Shape::new([shape.num_elements() / d.max(1), d]));
        let ms = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), 1);
        (
            x,
            B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into()))),
        )
    }

    fn row<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
        let d = t.shape()[0];
        B::float_reshape(t, Shape::new([1, d]))
    }

    pub(super) fn forward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        eps: f64,
    ) -> FloatTensor<B> {
        let shape = x.shape();
        let (x, rstd) = rstd::<B>(x, eps);
        let y = B::float_mul(B::float_mul(x, rstd), row::<B>(gamma));
        B::float_reshape(y, shape)
    }

    pub(super) fn backward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        grad: FloatTensor<B>,
        eps: f64,
    ) -> FloatTensor<B> {
        let (x, rstd) = rstd::<B>(x, eps);
        let xhat = B::float_mul(x, rstd.clone());
        let g = B::float_reshape(grad, xhat.shape());
        let gg = B::float_mul(g.clone(), row::<B>(gamma));
        let mean_ggx = B::float_mean_dim(B::float_mul(gg.clone(), xhat.clone()), 1);
        let dx = B::float_mul(B::float_sub(gg, B::float_mul(xhat.clone(), mean_ggx)), rstd);
        let dgamma = B::float_sum_dim(B::float_mul(g, xhat), 0);
        let flat = |t: FloatTensor<B>| {
            let n = t.shape().num_elements();
            B::float_reshape(t, Shape::new([n]))
        };
        B::float_cat(vec![flat(dx), flat(dgamma)], 0)
    }
}

/// The extension behind [`rotary`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait RotaryBackend: Backend {
    /// The rotary embedding `x·cos + rotate_half(x)·sin` (`rotate_half([x1, x2]) = [-x2, x1]`)
    /// or, with `transposed`, its transpose `x·cos + [x2·sin2, -x1·sin1]` (the backward map).
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, d]` (any strides); `cos`, `sin`: `[seq, d]`; returns
    ///   `[batch, heads, seq, d]`.
    #[fusion(default)]
    fn fast_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        composed_rotary::<Self>(x, cos, sin, transposed)
    }
}

#[cfg(feature = "cube")]
impl RotaryBackend for burn_cubecl::CubeBackend {}

impl<B: RotaryBackend, C: CheckpointStrategy> RotaryBackend for Autodiff<B, C> {
    fn fast_rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        transposed: bool,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct RotaryBackward;

        impl<B: RotaryBackend> Backward<B, 1> for RotaryBackward {
            /// The tables and the direction (they take no gradient).
            type State = (FloatTensor<B>, FloatTensor<B>, bool);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (cos, sin, transposed) = ops.state;
                if let [Some(node)] = ops.parents {
                    grads.register::<B>(node.id, B::fast_rotary(grad, cos, sin, !transposed));
                }
            }
        }

        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RotaryBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::fast_rotary(x.into_primitive(), cos.clone(), sin.clone(), transposed);
                prep.finish((cos, sin, transposed), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::fast_rotary(x.into_primitive(), cos, sin, transposed))
            }
        }
    }
}

/// The rotary position embedding of LLaMA: `x·cos + rotate_half(x)·sin` with
/// `rotate_half([x1, x2]) = [-x2, x1]` over the halves of the last dimension, in one pass (and
/// one pass backward) on flex; the tables take no gradient.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, d]`; `cos`, `sin`: `[seq, d]`; returns `[batch, heads, seq, d]`
///   (contiguous on flex).
pub fn rotary(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as RotaryBackend>::fast_rotary(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
        false,
    ))
}

/// [`RotaryBackend::fast_rotary`] from the backend's own ops.
fn composed_rotary<B: Backend>(
    x: FloatTensor<B>,
    cos: FloatTensor<B>,
    sin: FloatTensor<B>,
    transposed: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let (seq, d) = (shape[2], shape[3]);
    let half = d / 2;
    let table = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([1, 1, seq, d]));
    let (cos, sin) = (table(cos), table(sin));
    let part = |t: FloatTensor<B>, r: std::ops::Range<usize>| {
        B::float_slice(
            t,
            &[
                Slice::from(..),
                Slice::from(..),
                Slice::from(..),
                Slice::from(r),
            ],
        )
    };
    let rotated = if transposed {
        // [x2·sin2, -x1·sin1]
        let xs = B::float_mul(x.clone(), sin);
        B::float_cat(
            vec![part(xs.clone(), half..d), B::float_neg(part(xs, 0..half))],
            3,
        )
    } else {
        let r = B::float_cat(
            vec![
                B::float_neg(part(x.clone(), half..d)),
                part(x.clone(), 0..half),
            ],
            3,
        );
        B::float_mul(r, sin)
    };
    B::float_add(B::float_mul(x, cos), rotated)
}

/// The layer norm from the backend's own ops (every backend but flex's f32 path).
mod composed_norm {
    use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::Shape;

    /// `x` as `[rows, d]`, `x̂ = (x - mean) · rstd` and `rstd` (`[rows, 1]`).
    fn normalised<B: Backend>(x: FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let x = B::float_reshape(x, Shape::new([shape.num_elements() / d.max(1), d]));
        let centred = B::float_sub(x.clone(), B::float_mean_dim(x, 1));
        let var = B::float_mean_dim(B::float_mul(centred.clone(), centred.clone()), 1);
        let rstd = B::float_recip(B::float_sqrt(B::float_add_scalar(var, eps.into())));
        (B::float_mul(centred, rstd.clone()), rstd)
    }

    fn row<B: Backend>(t: FloatTensor<B>) -> FloatTensor<B> {
        let d = t.shape()[0];
        B::float_reshape(t, Shape::new([1, d]))
    }

    pub(super) fn forward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        beta: FloatTensor<B>,
        eps: f64,
    ) -> FloatTensor<B> {
        let shape = x.shape();
        let (xhat, _) = normalised::<B>(x, eps);
        let y = B::float_add(B::float_mul(xhat, row::<B>(gamma)), row::<B>(beta));
        B::float_reshape(y, shape)
    }

    pub(super) fn backward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        grad: FloatTensor<B>,
        eps: f64,
    ) -> FloatTensor<B> {
        let (xhat, rstd) = normalised::<B>(x, eps);
        let g = B::float_reshape(grad, xhat.shape());
        let gg = B::float_mul(g.clone(), row::<B>(gamma));
        let mean_gg = B::float_mean_dim(gg.clone(), 1);
        let mean_ggx = B::float_mean_dim(B::float_mul(gg.clone(), xhat.clone()), 1);
        let dx = B::float_sub(
            B::float_sub(gg, mean_gg),
            B::float_mul(xhat.clone(), mean_ggx),
        );
        let dx = B::float_mul(dx, rstd);
        let dgamma = B::float_sum_dim(B::float_mul(g.clone(), xhat), 0);
        let dbeta = B::float_sum_dim(g, 0);
        let flat = |t: FloatTensor<B>| {
            let n = t.shape().num_elements();
            B::float_reshape(t, Shape::new([n]))
        };
        B::float_cat(vec![flat(dx), flat(dgamma), flat(dbeta)], 0)
    }
}

/// The attention from the backend's own ops (every backend but flex's f32 path).
mod composed {
    use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::{Shape, TensorData};

    fn probabilities<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        bias: FloatTensor<B>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<B> {
        let [b, sk] = bias.shape().dims::<2>();
        let device = q.device();
        let scores = B::float_mul_scalar(B::float_matmul(q, B::float_transpose(k)), scale.into());
        let scores = B::float_add(scores, B::float_reshape(bias, Shape::new([b, 1, 1, sk])));
        let shape = scores.shape();
        let sq = shape[2];
        let hidden = |i: usize, j: usize| j + sq > i + sk;
        let causal_mask = causal.then(|| {
            let mask: Vec<bool> = (0..sq * sk).map(|n| hidden(n / sk, n % sk)).collect();
            let mask = B::bool_from_data(TensorData::new(mask, [1, 1, sq, sk]), &device);
            B::bool_expand(mask, shape)
        });
        let scores = match &causal_mask {
            Some(mask) => B::float_mask_fill(scores, mask.clone(), f32::MIN.into()),
            None => scores,
        };
        let max = B::float_max_dim(scores.clone(), 3);
        let e = B::float_exp(B::float_sub(scores, max));
        // Hidden keys weigh exactly 0 (a row that sees no key is all 0).
        let e = match causal_mask {
            Some(mask) => B::float_mask_fill(e, mask, 0.0.into()),
            None => e,
        };
        let sum = B::float_sum_dim(e.clone(), 3);
        let sum = B::float_clamp_min(sum, f32::MIN_POSITIVE.into());
        B::float_div(e, sum)
    }

    pub(super) fn forward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        bias: FloatTensor<B>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<B> {
        B::float_matmul(probabilities::<B>(q, k, bias, scale, causal), v)
    }

    pub(super) fn backward<B: Backend>(
        q: FloatTensor<B>,
        k: FloatTensor<B>,
        v: FloatTensor<B>,
        bias: FloatTensor<B>,
        grad: FloatTensor<B>,
        scale: f64,
        causal: bool,
    ) -> FloatTensor<B> {
        let p = probabilities::<B>(q.clone(), k.clone(), bias, scale, causal);
        let dv = B::float_matmul(B::float_transpose(p.clone()), grad.clone());
        let dp = B::float_matmul(grad, B::float_transpose(v));
        let delta = B::float_sum_dim(B::float_mul(p.clone(), dp.clone()), 3);
        let ds = B::float_mul_scalar(B::float_mul(p, B::float_sub(dp, delta)), scale.into());
        let dq = B::float_matmul(ds.clone(), k);
        let dk = B::float_matmul(B::float_transpose(ds), q);
        let flat = |t: FloatTensor<B>| {
            let n = t.shape().num_elements();
            B::float_reshape(t, Shape::new([n]))
        };
        B::float_cat(vec![flat(dq), flat(dk), flat(dv)], 0)
    }
}

#[cfg(feature = "flex")]
pub(crate) mod flex {
    use burn::backend::{Flex, ops::ActivationOps, tensor::FloatTensor};
    use burn::tensor::{DType, TensorData};
    use rayon::prelude::*;

    use super::{
        AttentionBackend, GeluBackend, LayerNormBackend, RmsNormBackend, RotaryBackend,
        SwiGluBackend,
    };

    /// Elements per rayon task (64 KiB of f32).
    const CHUNK: usize = 1 << 14;

    impl GeluBackend for Flex {
        fn fast_gelu(x: FloatTensor<Flex>) -> FloatTensor<Flex> {
            if x.dtype() != DType::F32 {
                return <Flex as ActivationOps<Flex>>::gelu(x);
            }
            let mut x = if x.is_contiguous() {
                x
            } else {
                x.to_contiguous()
            };
            if let Some((start, end)) = x.layout().contiguous_offsets()
                && let Some(buf) = x.try_storage_mut::<f32>()
            {
                buf[start..end]
                    .par_chunks_mut(CHUNK)
                    .for_each(kernels::gelu_in_place);
                return x;
            }
            let src = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            let mut out = vec![0.0f32; src.len()];
            out.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, s)| kernels::gelu_into(s, o));
            let shape = x.layout().shape().clone();
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }

        fn fast_gelu_backward(x: FloatTensor<Flex>, grad: FloatTensor<Flex>) -> FloatTensor<Flex> {
            if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
                return <Flex as ActivationOps<Flex>>::gelu_backward(x, grad);
            }
            if x.layout().shape() != grad.layout().shape() {
                // Broadcasting between the two: flex's general path handles it.
                return <Flex as ActivationOps<Flex>>::gelu_backward(x, grad);
            }
            let x = if x.is_contiguous() {
                x
            } else {
                x.to_contiguous()
            };
            let mut g = if grad.is_contiguous() {
                grad
            } else {
                grad.to_contiguous()
            };
            let xs = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            if let Some((start, end)) = g.layout().contiguous_offsets()
                && let Some(buf) = g.try_storage_mut::<f32>()
            {
                buf[start..end]
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .for_each(|(gc, xc)| kernels::gelu_grad_in_place(xc, gc));
                return g;
            }
            let gs = g.as_slice::<f32>().expect("a contiguous f32 tensor");
            let mut out = gs.to_vec();
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK))
                .for_each(|(gc, xc)| kernels::gelu_grad_in_place(xc, gc));
            let shape = g.layout().shape().clone();
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }
    }

    impl SwiGluBackend for Flex {
        fn fast_swiglu(gate: FloatTensor<Flex>, up: FloatTensor<Flex>) -> FloatTensor<Flex> {
            if !all_f32(&[&gate, &up]) || gate.layout().shape() != up.layout().shape() {
                return super::composed_swiglu::forward::<Flex>(gate, up);
            }
            let (g, u) = (gate.to_contiguous(), up.to_contiguous());
            let (gs, us) = (
                g.as_slice::<f32>().expect("a contiguous f32 tensor"),
                u.as_slice::<f32>().expect("a contiguous f32 tensor"),
            );
            let mut out = vec![0.0f32; gs.len()];
            out.par_chunks_mut(CHUNK)
                .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
                .for_each(|(o, (g, u))| kernels::swiglu_into(g, u, o));
            let shape = g.layout().shape().clone();
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }

        fn fast_swiglu_backward(
            gate: FloatTensor<Flex>,
            up: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            let same = gate.layout().shape() == up.layout().shape()
                && gate.layout().shape() == grad.layout().shape();
            if !all_f32(&[&gate, &up, &grad]) || !same {
                return super::composed_swiglu::backward::<Flex>(gate, up, grad);
            }
            let (g, u, d) = (
                gate.to_contiguous(),
                up.to_contiguous(),
                grad.to_contiguous(),
            );
            let (gs, us, ds) = (
                g.as_slice::<f32>().expect("a contiguous f32 tensor"),
                u.as_slice::<f32>().expect("a contiguous f32 tensor"),
                d.as_slice::<f32>().expect("a contiguous f32 tensor"),
            );
            let n = gs.len();
            let mut out = vec![0.0f32; 2 * n];
            let (dg, du) = out.split_at_mut(n);
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
                .zip(ds.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), d)| kernels::swiglu_grad(g, u, d, dg, du));
            FloatTensor::<Flex>::from_data(TensorData::new(out, [2 * n]))
        }
    }

    /// A rank-4 strided view: base pointer offset and strides, in elements.
    #[derive(Clone, Copy)]
    struct View4 {
        offset: usize,
        strides: [usize; 4],
        dims: [usize; 4],
    }

    /// f32 with non-negative strides (copied otherwise), and its view.
    fn view4(t: FloatTensor<Flex>) -> (FloatTensor<Flex>, View4) {
        let t = if t.layout().strides().iter().all(|s| *s >= 0) {
            t
        } else {
            t.to_contiguous()
        };
        let l = t.layout();
        let s = l.strides();
        let d = l.shape();
        let view = View4 {
            offset: l.start_offset(),
            strides: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize],
            dims: [d[0], d[1], d[2], d[3]],
        };
        (t, view)
    }

    /// `dst[m×n] = beta · lhs[m×k] · rhs[k×n]` on one thread, every operand strided
    /// (`(row stride, column stride)` in elements).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        (m, n, k): (usize, usize, usize),
        dst: &mut [f32],
        (dst_rs, dst_cs): (usize, usize),
        lhs: &[f32],
        (lhs_rs, lhs_cs): (usize, usize),
        rhs: &[f32],
        (rhs_rs, rhs_cs): (usize, usize),
        beta: f32,
    ) {
        let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
            if rows == 0 || cols == 0 {
                0
            } else {
                (rows - 1) * rs + (cols - 1) * cs + 1
            }
        };
        assert!(last(m, n, dst_rs, dst_cs) <= dst.len());
        assert!(last(m, k, lhs_rs, lhs_cs) <= lhs.len());
        assert!(last(k, n, rhs_rs, rhs_cs) <= rhs.len());
        // SAFETY: the three asserts keep every element gemm touches inside its slice; `dst`
        // is borrowed mutably, so it aliases neither operand.
        #[allow(unsafe_code)]
        unsafe {
            ::gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                dst_cs as isize,
                dst_rs as isize,
                false,
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr(),
                rhs_cs as isize,
                rhs_rs as isize,
                0.0,
                beta,
                false,
                false,
                false,
                ::gemm::Parallelism::None,
            );
        }
    }

    /// The slice of `data` from the start of matrix `(b, h)` of `v`.
    fn at<'a>(data: &'a [f32], v: &View4, b: usize, h: usize) -> &'a [f32] {
        &data[v.offset + b * v.strides[0] + h * v.strides[1]..]
    }

    /// The keys query row `i` of `sq` sees among `sk`: all of them, or with `causal` the
    /// first `i + 1 + sk - sq`.
    fn visible(i: usize, sq: usize, sk: usize, causal: bool) -> usize {
        if causal {
            (i + 1 + sk).saturating_sub(sq).min(sk)
        } else {
            sk
        }
    }

    /// `p = softmax(scale · q·kᵀ + bias)` for the query rows `rows` of one (batch, head) pair,
    /// into `p` `[rows.len(), cols]`: only the first `cols` keys are scored (at least every
    /// row's [`visible`] count); the keys a row does not see get probability 0.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        p: &mut [f32],
        cols: usize,
        (qd, qv): (&[f32], &View4),
        (kd, kv): (&[f32], &View4),
        bias: &[f32],
        (b, h): (usize, usize),
        rows: std::ops::Range<usize>,
        (scale, causal): (f32, bool),
    ) {
        let [_, _, sq, d] = qv.dims;
        let sk = kv.dims[2];
        let m = rows.len();
        if m == 0 || cols == 0 {
            p[..m * cols].fill(0.0);
            return;
        }
        gemm(
            (m, cols, d),
            p,
            (cols, 1),
            &at(qd, qv, b, h)[rows.start * qv.strides[2]..],
            (qv.strides[2], qv.strides[3]),
            at(kd, kv, b, h),
            (kv.strides[3], kv.strides[2]),
            scale,
        );
        let bias = &bias[b * sk..b * sk + cols];
        let p = &mut p[..m * cols];
        if !causal {
            kernels::softmax_rows(p, bias);
            return;
        }
        for (i, row) in rows.zip(p.chunks_exact_mut(cols)) {
            let n = visible(i, sq, sk, true);
            if n > 0 {
                kernels::softmax_rows(&mut row[..n], &bias[..n]);
            }
            row[n..].fill(0.0);
        }
    }

    fn all_f32(ts: &[&FloatTensor<Flex>]) -> bool {
        ts.iter().all(|t| t.dtype() == DType::F32)
    }

    /// Rows per rayon task of the norms.
    const NORM_ROWS: usize = 32;

    /// A norm's forward pass: `rows(x, out)` over the `d`-wide rows of `xs`, in rayon tasks of
    /// [`NORM_ROWS`] rows.
    fn norm_rows(xs: &[f32], d: usize, rows: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
        let mut out = vec![0.0f32; xs.len()];
        if d > 0 {
            out.par_chunks_mut(d * NORM_ROWS)
                .zip(xs.par_chunks(d * NORM_ROWS))
                .for_each(|(o, x)| rows(x, o));
        }
        out
    }

    /// A norm's backward pass, `[dx…, params…]`: `rows(x, grad, dx, partial)` over the `d`-wide
    /// rows of `xs` and `gs`, in rayon tasks of [`NORM_ROWS`] rows, each adding its rows' share
    /// of the `params` parameter gradients into a partial of its own; the partials are added
    /// up after.
    fn norm_backward_rows(
        xs: &[f32],
        gs: &[f32],
        d: usize,
        params: usize,
        rows: impl Fn(&[f32], &[f32], &mut [f32], &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let n = xs.len();
        let mut out = vec![0.0f32; n + params];
        let (dx, sums) = out.split_at_mut(n);
        if d > 0 {
            let partials: Vec<Vec<f32>> = dx
                .par_chunks_mut(d * NORM_ROWS)
                .zip(xs.par_chunks(d * NORM_ROWS))
                .zip(gs.par_chunks(d * NORM_ROWS))
                .map(|((dx, x), gr)| {
                    let mut p = vec![0.0f32; params];
                    rows(x, gr, dx, &mut p);
                    p
                })
                .collect();
            for p in partials {
                for (acc, v) in sums.iter_mut().zip(p) {
                    *acc += v;
                }
            }
        }
        out
    }

    impl LayerNormBackend for Flex {
        fn fast_layer_norm(
            x: FloatTensor<Flex>,
            gamma: FloatTensor<Flex>,
            beta: FloatTensor<Flex>,
            eps: f64,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&x, &gamma, &beta]) {
                return super::composed_norm::forward::<Flex>(x, gamma, beta, eps);
            }
            let shape = x.layout().shape().clone();
            let d = shape[shape.num_dims() - 1];
            let x = x.to_contiguous();
            let (gamma, beta) = (gamma.to_contiguous(), beta.to_contiguous());
            let xs = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            let g = gamma.as_slice::<f32>().expect("a contiguous f32 gamma");
            let b = beta.as_slice::<f32>().expect("a contiguous f32 beta");
            let out = norm_rows(xs, d, |x, o| {
                kernels::layer_norm_rows(x, o, g, b, eps as f32)
            });
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }

        fn fast_layer_norm_backward(
            x: FloatTensor<Flex>,
            gamma: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            eps: f64,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&x, &gamma, &grad]) || x.layout().shape() != grad.layout().shape() {
                return super::composed_norm::backward::<Flex>(x, gamma, grad, eps);
            }
            let d = gamma.layout().shape()[0];
            let (x, gamma, grad) = (
                x.to_contiguous(),
                gamma.to_contiguous(),
                grad.to_contiguous(),
            );
            let xs = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            let g = gamma.as_slice::<f32>().expect("a contiguous f32 gamma");
            let gs = grad.as_slice::<f32>().expect("a contiguous f32 gradient");
            // dgamma and dbeta.
            let out = norm_backward_rows(xs, gs, d, 2 * d, |x, gr, dx, p| {
                kernels::layer_norm_backward_rows(x, gr, g, eps as f32, dx, p)
            });
            let len = out.len();
            FloatTensor::<Flex>::from_data(TensorData::new(out, [len]))
        }
    }

    impl RmsNormBackend for Flex {
        fn fast_rms_norm(
            x: FloatTensor<Flex>,
            gamma: FloatTensor<Flex>,
            eps: f64,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&x, &gamma]) {
                return super::composed_rms::forward::<Flex>(x, gamma, eps);
            }
            let shape = x.layout().shape().clone();
            let d = shape[shape.num_dims() - 1];
            let (x, gamma) = (x.to_contiguous(), gamma.to_contiguous());
            let xs = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            let g = gamma.as_slice::<f32>().expect("a contiguous f32 gamma");
            let out = norm_rows(xs, d, |x, o| kernels::rms_norm_rows(x, o, g, eps as f32));
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }

        fn fast_rms_norm_backward(
            x: FloatTensor<Flex>,
            gamma: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            eps: f64,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&x, &gamma, &grad]) || x.layout().shape() != grad.layout().shape() {
                return super::composed_rms::backward::<Flex>(x, gamma, grad, eps);
            }
            let d = gamma.layout().shape()[0];
            let (x, gamma, grad) = (
                x.to_contiguous(),
                gamma.to_contiguous(),
                grad.to_contiguous(),
            );
            let xs = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            let g = gamma.as_slice::<f32>().expect("a contiguous f32 gamma");
            let gs = grad.as_slice::<f32>().expect("a contiguous f32 gradient");
            // dgamma.
            let out = norm_backward_rows(xs, gs, d, d, |x, gr, dx, p| {
                kernels::rms_norm_backward_rows(x, gr, g, eps as f32, dx, p)
            });
            let len = out.len();
            FloatTensor::<Flex>::from_data(TensorData::new(out, [len]))
        }
    }

    /// Rows (positions of one head) per rayon task of the rotary embedding.
    const ROTARY_ROWS: usize = 64;

    impl RotaryBackend for Flex {
        fn fast_rotary(
            x: FloatTensor<Flex>,
            cos: FloatTensor<Flex>,
            sin: FloatTensor<Flex>,
            transposed: bool,
        ) -> FloatTensor<Flex> {
            let shape = x.layout().shape().clone();
            if !all_f32(&[&x, &cos, &sin]) || shape.num_dims() != 4 || !shape[3].is_multiple_of(2) {
                return super::composed_rotary::<Flex>(x, cos, sin, transposed);
            }
            let [b, h, s, d] = shape.dims::<4>();
            let (cos, sin) = (cos.to_contiguous(), sin.to_contiguous());
            let cs = cos.as_slice::<f32>().expect("a contiguous f32 table");
            let sn = sin.as_slice::<f32>().expect("a contiguous f32 table");
            assert!(
                cs.len() == s * d && sn.len() == s * d,
                "rotary: tables must be [seq, d]"
            );
            // Rows of `x` may be strided (a `[batch, seq, heads, d]` projection with its heads
            // swapped forward); each row itself must be contiguous.
            let x = if x.layout().strides()[3] == 1 && x.layout().strides().iter().all(|v| *v >= 0)
            {
                x
            } else {
                x.to_contiguous()
            };
            let st = x.layout().strides();
            let (sb, sh, ss) = (st[0] as usize, st[1] as usize, st[2] as usize);
            let base = x.layout().start_offset();
            let xs = &x.storage::<f32>()[base..];
            let mut out = vec![0.0f32; b * h * s * d];
            if d > 0 {
                out.par_chunks_mut(d * ROTARY_ROWS)
                    .enumerate()
                    .for_each(|(task, chunk)| {
                        for (i, dst) in chunk.chunks_exact_mut(d).enumerate() {
                            let row = task * ROTARY_ROWS + i;
                            let (bi, hi, si) = (row / (h * s), row / s % h, row % s);
                            let at = bi * sb + hi * sh + si * ss;
                            let table = si * d..(si + 1) * d;
                            kernels::rotary_row(
                                &xs[at..at + d],
                                &cs[table.clone()],
                                &sn[table],
                                dst,
                                transposed,
                            );
                        }
                    });
            }
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }
    }

    impl AttentionBackend for Flex {
        /// Tasks of a block of query rows of one batch entry, every head in turn (enough blocks
        /// for every thread even with one sequence); the output is written `[b, sq, h, dv]` in
        /// memory (a transposed view is returned), so that merging the heads back into
        /// `[b, sq, h·dv]` is free. With `causal` a block scores only the keys its last row
        /// sees.
        fn fast_attention(
            q: FloatTensor<Flex>,
            k: FloatTensor<Flex>,
            v: FloatTensor<Flex>,
            bias: FloatTensor<Flex>,
            scale: f64,
            causal: bool,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&q, &k, &v, &bias]) {
                return super::composed::forward::<Flex>(q, k, v, bias, scale, causal);
            }
            let ((q, qv), (k, kv), (v, vv)) = (view4(q), view4(k), view4(v));
            let bias = bias.to_contiguous();
            let bias = bias.as_slice::<f32>().expect("a contiguous f32 bias");
            let [b, h, sq, _] = qv.dims;
            let (sk, dv) = (kv.dims[2], vv.dims[3]);
            let (qd, kd, vd) = (q.storage::<f32>(), k.storage::<f32>(), v.storage::<f32>());
            let mut out = vec![0.0f32; b * sq * h * dv];
            if !out.is_empty() {
                let per_entry = (4 * rayon::current_num_threads()).div_ceil(b);
                let block = sq.div_ceil(per_entry).max(16).min(sq);
                out.par_chunks_mut(sq * h * dv)
                    .enumerate()
                    .for_each(|(bi, entry)| {
                        entry
                            .par_chunks_mut(block * h * dv)
                            .enumerate()
                            .for_each(|(blk, o)| {
                                let start = blk * block;
                                let rows = start..start + o.len() / (h * dv);
                                let cols = visible(rows.end - 1, sq, sk, causal);
                                let mut p = vec![0.0f32; rows.len() * cols];
                                for hi in 0..h {
                                    probabilities(
                                        &mut p,
                                        cols,
                                        (qd, &qv),
                                        (kd, &kv),
                                        bias,
                                        (bi, hi),
                                        rows.clone(),
                                        (scale as f32, causal),
                                    );
                                    if cols == 0 {
                                        continue;
                                    }
                                    gemm(
                                        (rows.len(), dv, cols),
                                        &mut o[hi * dv..],
                                        (h * dv, 1),
                                        &p,
                                        (cols, 1),
                                        at(vd, &vv, bi, hi),
                                        (vv.strides[2], vv.strides[3]),
                                        1.0,
                                    );
                                }
                            });
                    });
            }
            FloatTensor::<Flex>::from_data(TensorData::new(out, [b, sq, h, dv])).transpose(1, 2)
        }

        /// One task per (batch, head) pair; each gradient is written `[b, h, s, d]`.
        fn fast_attention_backward(
            q: FloatTensor<Flex>,
            k: FloatTensor<Flex>,
            v: FloatTensor<Flex>,
            bias: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            scale: f64,
            causal: bool,
        ) -> FloatTensor<Flex> {
            if !all_f32(&[&q, &k, &v, &bias, &grad]) {
                return super::composed::backward::<Flex>(q, k, v, bias, grad, scale, causal);
            }
            let ((q, qv), (k, kv), (v, vv), (g, gv)) = (view4(q), view4(k), view4(v), view4(grad));
            let bias = bias.to_contiguous();
            let bias = bias.as_slice::<f32>().expect("a contiguous f32 bias");
            let [b, h, sq, d] = qv.dims;
            let (sk, dv) = (kv.dims[2], vv.dims[3]);
            let (qd, kd, vd, gd) = (
                q.storage::<f32>(),
                k.storage::<f32>(),
                v.storage::<f32>(),
                g.storage::<f32>(),
            );
            let mut out = vec![0.0f32; b * h * (sq * d + sk * d + sk * dv)];
            let (dq, rest) = out.split_at_mut(b * h * sq * d);
            let (dk, dvv) = rest.split_at_mut(b * h * sk * d);
            let scale = scale as f32;
            if b > 0 && h > 0 && sq > 0 && sk > 0 && d > 0 && dv > 0 {
                dq.par_chunks_mut(sq * d)
                    .zip(dk.par_chunks_mut(sk * d))
                    .zip(dvv.par_chunks_mut(sk * dv))
                    .enumerate()
                    .for_each(|(pair, ((dq, dk), dv_out))| {
                        let (bi, hi) = (pair / h, pair % h);
                        let mut p = vec![0.0f32; sq * sk];
                        let mut dp = vec![0.0f32; sq * sk];
                        let qkv = ((qd, &qv), (kd, &kv));
                        probabilities(
                            &mut p,
                            sk,
                            qkv.0,
                            qkv.1,
                            bias,
                            (bi, hi),
                            0..sq,
                            (scale, causal),
                        );
                        let go = at(gd, &gv, bi, hi);
                        let gs = (gv.strides[2], gv.strides[3]);
                        // dP = dO · vᵀ
                        let vt = (vv.strides[3], vv.strides[2]);
                        let vb = at(vd, &vv, bi, hi);
                        gemm((sq, sk, dv), &mut dp, (sk, 1), go, gs, vb, vt, 1.0);
                        // dv = Pᵀ · dO
                        gemm((sk, dv, sq), dv_out, (dv, 1), &p, (1, sk), go, gs, 1.0);
                        // dS = scale · P ∘ (dP − rowsum(P ∘ dP)), in dp (0 where P is 0)
                        kernels::softmax_backward_rows(&p, &mut dp, sk, scale);
                        // dq = dS · k; dk = dSᵀ · q
                        let ks = (kv.strides[2], kv.strides[3]);
                        let kb = at(kd, &kv, bi, hi);
                        gemm((sq, d, sk), dq, (d, 1), &dp, (sk, 1), kb, ks, 1.0);
                        let qs = (qv.strides[2], qv.strides[3]);
                        let qb = at(qd, &qv, bi, hi);
                        gemm((sk, d, sq), dk, (d, 1), &dp, (1, sk), qb, qs, 1.0);
                    });
            }
            let len = out.len();
            FloatTensor::<Flex>::from_data(TensorData::new(out, [len]))
        }
    }

    /// The slice loops, compiled for AVX-512, AVX2+FMA and the baseline by
    /// [`multiversion!`](crate::multiversion); the one
    /// [`CpuBody::current`](crate::cpu_body::CpuBody::current) names runs (the widest the CPU
    /// has, unless a test forces another).
    pub(crate) mod kernels {
        use super::super::math::{exp_nonpositive, gelu, gelu_grad, sigmoid};
        crate::multiversion! {
            pub(crate) fn gelu_in_place(buf: &mut [f32]) {
                for v in buf.iter_mut() {
                    *v = gelu(*v);
                }
            }
            pub(crate) fn gelu_into(src: &[f32], dst: &mut [f32]) {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = gelu(*s);
                }
            }
            pub(crate) fn swiglu_into(gate: &[f32], up: &[f32], out: &mut [f32]) {
                for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                    *o = *g * sigmoid(*g) * *u;
                }
            }
            pub(crate) fn swiglu_grad(gate: &[f32], up: &[f32], grad: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
                for ((((dg, du), g), u), d) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(grad) {
                    let s = sigmoid(*g);
                    *du = *d * *g * s;
                    *dg = *d * *u * s * (1.0 + *g * (1.0 - s));
                }
            }
            pub(crate) fn gelu_grad_in_place(x: &[f32], grad: &mut [f32]) {
                for (g, x) in grad.iter_mut().zip(x) {
                    *g *= gelu_grad(*x);
                }
            }
            pub(crate) fn layer_norm_rows(x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
                let d = gamma.len();
                for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                    let (mean, rstd) = moments(xr, eps);
                    for (((o, v), g), b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                        *o = (*v - mean) * rstd * g + b;
                    }
                }
            }
            pub(crate) fn layer_norm_backward_rows(
                x: &[f32],
                grad: &[f32],
                gamma: &[f32],
                eps: f32,
                dx: &mut [f32],
                params: &mut [f32]
            ) {
                let d = gamma.len();
                let (dgamma, dbeta) = params.split_at_mut(d);
                let rows = x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
                for ((xr, gr), dxr) in rows {
                    let (mean, rstd) = moments(xr, eps);
                    // dxr holds x̂ for now; gg = g·γ is recomputed in the second pass.
                    for (o, v) in dxr.iter_mut().zip(xr) {
                        *o = (*v - mean) * rstd;
                    }
                    let mut acc_g = [0.0f32; 16];
                    let mut acc_gx = [0.0f32; 16];
                    let (mut tail_g, mut tail_gx) = (0.0f32, 0.0f32);
                    let full = d / 16 * 16;
                    for c in (0..full).step_by(16) {
                        for l in 0..16 {
                            let gg = gr[c + l] * gamma[c + l];
                            acc_g[l] += gg;
                            acc_gx[l] += gg * dxr[c + l];
                        }
                    }
                    for i in full..d {
                        let gg = gr[i] * gamma[i];
                        tail_g += gg;
                        tail_gx += gg * dxr[i];
                    }
                    let inv_d = 1.0 / d as f32;
                    let mean_g = (acc_g.iter().sum::<f32>() + tail_g) * inv_d;
                    let mean_gx = (acc_gx.iter().sum::<f32>() + tail_gx) * inv_d;
                    for i in 0..d {
                        let xhat = dxr[i];
                        dgamma[i] += gr[i] * xhat;
                        dbeta[i] += gr[i];
                        dxr[i] = (gr[i] * gamma[i] - mean_g - xhat * mean_gx) * rstd;
                    }
                }
            }
            pub(crate) fn rms_norm_rows(x: &[f32], y: &mut [f32], gamma: &[f32], eps: f32) {
                let d = gamma.len();
                for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
                    let rstd = rms_rstd(xr, eps);
                    for ((o, v), g) in yr.iter_mut().zip(xr).zip(gamma) {
                        *o = *v * rstd * g;
                    }
                }
            }
            pub(crate) fn rms_norm_backward_rows(
                x: &[f32],
                grad: &[f32],
                gamma: &[f32],
                eps: f32,
                dx: &mut [f32],
                dgamma: &mut [f32]
            ) {
                let d = gamma.len();
                let rows = x.chunks_exact(d).zip(grad.chunks_exact(d)).zip(dx.chunks_exact_mut(d));
                for ((xr, gr), dxr) in rows {
                    let rstd = rms_rstd(xr, eps);
                    let mut acc = [0.0f32; 16];
                    let mut tail = 0.0f32;
                    let full = d / 16 * 16;
                    for c in (0..full).step_by(16) {
                        for l in 0..16 {
                            acc[l] += gr[c + l] * gamma[c + l] * xr[c + l];
                        }
                    }
                    for i in full..d {
                        tail += gr[i] * gamma[i] * xr[i];
                    }
                    // mean(g·γ·x̂) = rstd · mean(g·γ·x).
                    let mean_ggx = (acc.iter().sum::<f32>() + tail) * rstd / d as f32;
                    for i in 0..d {
                        let xhat = xr[i] * rstd;
                        dgamma[i] += gr[i] * xhat;
                        dxr[i] = (gr[i] * gamma[i] - xhat * mean_ggx) * rstd;
                    }
                }
            }
            pub(crate) fn rotary_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], transposed: bool) {
                let half = x.len() / 2;
                let (x1, x2) = x.split_at(half);
                let (c1, c2) = cos.split_at(half);
                let (s1, s2) = sin.split_at(half);
                let (o1, o2) = out.split_at_mut(half);
                if transposed {
                    for i in 0..half {
                        o1[i] = x1[i] * c1[i] + x2[i] * s2[i];
                        o2[i] = x2[i] * c2[i] - x1[i] * s1[i];
                    }
                } else {
                    for i in 0..half {
                        o1[i] = x1[i] * c1[i] - x2[i] * s1[i];
                        o2[i] = x2[i] * c2[i] + x1[i] * s2[i];
                    }
                }
            }
            pub(crate) fn softmax_rows(p: &mut [f32], bias: &[f32]) {
                let cols = bias.len();
                for row in p.chunks_exact_mut(cols) {
                    for (x, b) in row.iter_mut().zip(bias) {
                        *x += *b;
                    }
                    let max = lanes(row, f32::MIN, |acc, x| acc.max(x), f32::max);
                    for x in row.iter_mut() {
                        *x = exp_nonpositive(*x - max);
                    }
                    let inv = 1.0 / lanes(row, 0.0, |acc, x| acc + x, |a, b| a + b);
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                }
            }
            // Fold each `cols`-wide row of `block` into its running maximum `max[i]` and sum of
            // `exp(x - max[i])` `sum[i]` (an online log-sum-exp over blocks of columns).
            pub(crate) fn lse_fold_rows(block: &[f32], cols: usize, max: &mut [f32], sum: &mut [f32]) {
                for ((row, m), s) in block.chunks_exact(cols).zip(max.iter_mut()).zip(sum.iter_mut()) {
                    let new = m.max(lanes(row, f32::MIN, |acc, x| acc.max(x), f32::max));
                    let added = lanes(row, 0.0, |acc, x| acc + exp_nonpositive(x - new), |a, b| a + b);
                    *s = *s * exp_nonpositive(*m - new) + added;
                    *m = new;
                }
            }
            // Each `cols`-wide row of `block` (logits) becomes `scale · exp(x - lse[i])`, the
            // softmax scaled by the loss gradient.
            pub(crate) fn softmax_scaled_rows(block: &mut [f32], cols: usize, lse: &[f32], scale: f32) {
                for (row, l) in block.chunks_exact_mut(cols).zip(lse) {
                    for x in row.iter_mut() {
                        *x = scale * exp_nonpositive(*x - l);
                    }
                }
            }
            pub(crate) fn softmax_backward_rows(p: &[f32], dp: &mut [f32], cols: usize, scale: f32) {
                for (pr, dr) in p.chunks_exact(cols).zip(dp.chunks_exact_mut(cols)) {
                    let mut acc = [0.0f32; 16];
                    let (pc, dc) = (pr.chunks_exact(16), dr.chunks_exact(16));
                    let mut delta = pc.remainder().iter().zip(dc.remainder()).map(|(a, b)| a * b).sum::<f32>();
                    for (a, b) in pc.zip(dc) {
                        for l in 0..16 {
                            acc[l] += a[l] * b[l];
                        }
                    }
                    delta += acc.iter().sum::<f32>();
                    for (a, b) in pr.iter().zip(dr.iter_mut()) {
                        *b = scale * a * (*b - delta);
                    }
                }
            }
        }

        /// `1 / sqrt(mean(x²) + eps)` of a row.
        #[inline(always)]
        fn rms_rstd(x: &[f32], eps: f32) -> f32 {
            let ms = lanes(x, 0.0, |a, v| a + v * v, |a, b| a + b) / x.len() as f32;
            1.0 / (ms + eps).sqrt()
        }

        /// The mean and `1 / sqrt(var + eps)` of a row (two passes, biased variance).
        #[inline(always)]
        fn moments(x: &[f32], eps: f32) -> (f32, f32) {
            let inv_d = 1.0 / x.len() as f32;
            let mean = lanes(x, 0.0, |a, v| a + v, |a, b| a + b) * inv_d;
            let var = lanes(x, 0.0, |a, v| a + (v - mean) * (v - mean), |a, b| a + b) * inv_d;
            (mean, 1.0 / (var + eps).sqrt())
        }

        /// A reduction over 16 independent lanes (so that it vectorises), then across them.
        #[inline(always)]
        fn lanes(
            xs: &[f32],
            init: f32,
            step: impl Fn(f32, f32) -> f32,
            join: impl Fn(f32, f32) -> f32,
        ) -> f32 {
            let mut acc = [init; 16];
            let chunks = xs.chunks_exact(16);
            let tail = chunks.remainder().iter().fold(init, |a, x| step(a, *x));
            for c in chunks {
                for l in 0..16 {
                    acc[l] = step(acc[l], c[l]);
                }
            }
            acc.into_iter().fold(tail, join)
        }
    }
}

/// Branch-free scalar forms that the compiler vectorises.
mod math {
    /// `exp(z)` for `z ≤ 0` (Cephes' `expf` polynomial; relative error about 1e-7; `z` below
    /// -87 gives about 1.6e-38 instead of a denormal).
    #[inline(always)]
    pub(crate) fn exp_nonpositive(z: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let z = z.max(-87.0);
        let m = z * std::f32::consts::LOG2_E + MAGIC;
        let n = m - MAGIC;
        let r = z - n * LN2_HI - n * LN2_LO;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 0.5;
        let p = p * r * r + r + 1.0;
        // 2ⁿ from the integer left in m's mantissa.
        let e = (m.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
        p * f32::from_bits(e as u32)
    }

    /// `σ(x) = 1 / (1 + exp(-x))` from one `exp` of `-|x|` (no overflow, branch-free).
    #[inline(always)]
    pub(crate) fn sigmoid(x: f32) -> f32 {
        let e = exp_nonpositive(-x.abs());
        let r = 1.0 / (1.0 + e);
        if x >= 0.0 { r } else { e * r }
    }

    /// `(erf(u), exp(-u²))` (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 in exact arithmetic,
    /// < 6e-7 in f32).
    #[inline(always)]
    pub(crate) fn erf_and_gauss(u: f32) -> (f32, f32) {
        const P: f32 = 0.327_591_1;
        const A: [f32; 5] = [
            0.254_829_6,
            -0.284_496_74,
            1.421_413_7,
            -1.453_152,
            1.061_405_4,
        ];
        let a = u.abs();
        let t = 1.0 / (1.0 + P * a);
        let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
        let gauss = exp_nonpositive(-u * u);
        ((1.0 - poly * gauss).copysign(u), gauss)
    }

    /// `x · Φ(x)`.
    #[inline(always)]
    pub(crate) fn gelu(x: f32) -> f32 {
        let (erf, _) = erf_and_gauss(x * std::f32::consts::FRAC_1_SQRT_2);
        0.5 * x * (1.0 + erf)
    }

    /// `Φ(x) + x · φ(x)`.
    #[inline(always)]
    pub(crate) fn gelu_grad(x: f32) -> f32 {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let (erf, gauss) = erf_and_gauss(x * std::f32::consts::FRAC_1_SQRT_2);
        0.5 * (1.0 + erf) + x * gauss * INV_SQRT_2PI
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp_matches_std_over_its_range() {
            let mut worst = 0.0f32;
            for i in 0..=200_000 {
                let z = -87.0 * i as f32 / 200_000.0;
                let rel = (exp_nonpositive(z) - z.exp()).abs() / z.exp();
                worst = worst.max(rel);
            }
            assert!(worst < 3e-7, "worst relative error {worst}");
            assert_eq!(exp_nonpositive(0.0), 1.0);
            assert!(exp_nonpositive(-1e30) > 0.0 && exp_nonpositive(-1e30) < 2e-38);
        }

        #[test]
        fn erf_is_within_the_bound_of_a_and_s() {
            let mut worst = 0.0f64;
            for i in -40_000..=40_000 {
                let u = i as f32 / 8_000.0;
                let (erf, gauss) = erf_and_gauss(u);
                worst = worst.max((erf as f64 - libm_erf(u as f64)).abs());
                assert!((gauss as f64 - (-(u as f64).powi(2)).exp()).abs() < 1e-7);
            }
            // A&S bound 1.5e-7 in exact arithmetic; f32 rounding of `1 - poly·gauss` adds a few ulp.
            assert!(worst < 6e-7, "worst absolute error {worst}");
        }

        /// erf in f64 by its Taylor series (|u| ≤ 3) or continued fraction, for reference.
        fn libm_erf(u: f64) -> f64 {
            let a = u.abs();
            let v = if a < 3.0 {
                let (mut term, mut sum, mut n) = (a, a, 0.0);
                while term.abs() > 1e-17 * sum.abs() {
                    n += 1.0;
                    term *= -a * a / n;
                    sum += term / (2.0 * n + 1.0);
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
                let mut f = a;
                for k in (1..60).rev() {
                    f = a + (k as f64 / 2.0) / f;
                }
                1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
            };
            v.copysign(u)
        }
    }
}
