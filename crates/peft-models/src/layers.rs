//! The building blocks shared by the models: the linear-layer abstraction and the norms.

use burn::module::{Module, ModuleDisplay, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};
use peft_core::{Adapter, PeftLinear};

/// A linear layer a model can be built with: `burn::nn::Linear` (plain; adapters attach in weight
/// space) or [`PeftLinear`] (adapters attach in activation space, the fast path).
///
/// Both store `<path>.weight` (`[d_in, d_out]`) and `<path>.bias`, so the same checkpoint loads
/// into either.
pub trait LinearLayer: Module + ModuleDisplay + From<Linear> {
    /// Apply the layer to `[..., d_in]`, giving `[..., d_out]`.
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D>;
}

impl LinearLayer for Linear {
    /// `burn::nn::Linear`'s forward through [`peft_kernels::linear`], as in
    /// [`PeftLinear`]: one 2-D product over the rows of any input (one GEMM rather than one per
    /// batch entry), fast on flex.
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        peft_kernels::linear(x, self.weight.val(), self.bias.as_ref().map(Param::val))
    }
}

impl<A: Adapter> LinearLayer for PeftLinear<A> {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        PeftLinear::forward(self, x)
    }
}

/// Layer normalisation stored as Hugging Face stores it (`<path>.weight`, `<path>.bias`), so
/// PEFT's `bias="all"` and `modules_to_save` see the same parameter names.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// Scale, `[d]`.
    pub weight: Param<Tensor<1>>,
    /// Shift, `[d]`.
    pub bias: Param<Tensor<1>>,
    /// Added to the variance.
    #[module(skip)]
    pub eps: f64,
}

impl LayerNorm {
    /// A layer norm with unit scale and zero shift.
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            bias: Param::from_tensor(Tensor::zeros([d], device)),
            eps,
        }
    }

    /// Normalise over the last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        peft_kernels::layer_norm(x, self.weight.val(), self.bias.val(), self.eps)
    }
}

/// Root-mean-square normalisation (LLaMA's `RMSNorm`), stored as `<path>.weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale, `[d]`.
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// An RMS norm with unit scale.
    pub fn new(d: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            eps,
        }
    }

    /// Normalise over the last dimension: `x / sqrt(mean(x²) + eps) · weight`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let rms = x
            .clone()
            .square()
            .mean_dim(D - 1)
            .add_scalar(self.eps)
            .sqrt();
        let d = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = d;
        x.div(rms).mul(self.weight.val().reshape(shape))
    }
}
