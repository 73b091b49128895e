//! Activation-space hosts: drop-in replacements for `burn::nn::Linear` and `burn::nn::Embedding`.

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param,
};
use burn::nn::{Embedding, Linear};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor};

use crate::adapter::Adapter;
use crate::hook::visit_host;
use crate::kernels::{linear, lora_linear};
use crate::slot::AdapterSlot;

/// A linear layer that carries adapters and computes `x·W + b + Σ delta(x)`.
///
/// It stores its weight and bias under the same paths and container type as
/// [`burn::nn::Linear`] (`<path>.weight`, `<path>.bias`), so checkpoints, burn-store adapters
/// such as `PyTorchToBurnAdapter`, and target matching treat it exactly like a `Linear`. The
/// adapters live under `<path>.peft.<adapter name>`. Without adapters it is a plain linear layer.
///
/// This is the fast path: each adapter works on activations (`(x·A)·B` for LoRA), so no
/// weight-shaped gradient is ever formed for the frozen base.
#[derive(Clone, Debug)]
pub struct PeftLinear<A: Adapter> {
    /// The base weight, `[d_in, d_out]`.
    pub weight: Param<Tensor<2>>,
    /// The base bias, `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapters of this layer.
    pub adapters: AdapterSlot<A>,
}

impl<A: Adapter> From<Linear> for PeftLinear<A> {
    fn from(linear: Linear) -> Self {
        Self {
            weight: linear.weight,
            bias: linear.bias,
            adapters: AdapterSlot::default(),
        }
    }
}

/// `f` applied to `x` `[..., d_in]` viewed as `[rows, d_in]` (free for contiguous inputs), its
/// `[rows, d_out]` result reshaped back to `[..., d_out]`.
///
/// Linear layers use it for inputs of rank 3 or more: backends then run one large GEMM instead
/// of one per leading index (flex packs the weight once instead of once per batch entry).
pub fn on_rows<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let y = f(x.reshape([dims[..D - 1].iter().product(), dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

impl<A: Adapter> PeftLinear<A> {
    /// Apply the layer.
    ///
    /// # Shapes
    /// * `x`: `[..., d_in]`
    /// * returns `[..., d_out]`
    ///
    /// Inputs of rank 3 or more go through [`on_rows`] (one large GEMM).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if D > 2 {
            return on_rows(x, |rows| self.forward(rows));
        }
        let weight = self.weight.val();
        let bias = self.bias.as_ref().map(Param::val);
        if let Some((a, b, scale)) = self.adapters.single_low_rank(&x.device()) {
            return lora_linear(x, weight, bias, a, b, scale);
        }
        if let Some(y) = self.adapters.single_fused(&x, &weight, bias.as_ref()) {
            return y;
        }
        let result = linear(x.clone(), weight.clone(), bias.clone());
        if self.adapters.is_empty() {
            return result;
        }
        self.adapters
            .forward_linear(x, &weight, bias.as_ref(), result)
    }

    /// The plain linear layer with the current base weights; adapters are dropped unmerged.
    pub fn into_linear(self) -> Linear {
        Linear {
            weight: self.weight,
            bias: self.bias,
        }
    }
}

/// An embedding table that carries adapters.
///
/// Stored like [`burn::nn::Embedding`] (`<path>.weight`); adapters under `<path>.peft.<name>`.
#[derive(Clone, Debug)]
pub struct PeftEmbedding<A: Adapter> {
    /// The base table, `[num_embeddings, d_model]`.
    pub weight: Param<Tensor<2>>,
    /// The adapters of this layer.
    pub adapters: AdapterSlot<A>,
}

impl<A: Adapter> From<Embedding> for PeftEmbedding<A> {
    fn from(embedding: Embedding) -> Self {
        Self {
            weight: embedding.weight,
            adapters: AdapterSlot::default(),
        }
    }
}

impl<A: Adapter> PeftEmbedding<A> {
    /// Look up `ids`.
    ///
    /// # Shapes
    /// * `ids`: `[batch, seq]`
    /// * returns `[batch, seq, d_model]`
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let weight = self.weight.val();
        let result = embedding(weight.clone(), ids.clone());
        if self.adapters.is_empty() {
            return result;
        }
        self.adapters.forward_embedding(ids, &weight, result)
    }

    /// The plain embedding with the current base table; adapters are dropped unmerged.
    pub fn into_embedding(self) -> Embedding {
        Embedding {
            weight: self.weight,
        }
    }
}

macro_rules! host_module {
    ($ty:ident, $base:literal, $host:literal, $($bias:ident)?) => {
        impl<A: Adapter> Module for $ty<A> {
            fn collect_devices(&self, devices: Devices) -> Devices {
                let devices = self.weight.collect_devices(devices);
                $(let devices = self.$bias.collect_devices(devices);)?
                self.adapters.collect_devices(devices)
            }

            fn fork(self, device: &Device) -> Self {
                Self {
                    weight: self.weight.fork(device),
                    $($bias: self.$bias.fork(device),)?
                    adapters: self.adapters.fork(device),
                }
            }

            fn to_device(self, device: &Device) -> Self {
                Self {
                    weight: self.weight.to_device(device),
                    $($bias: self.$bias.to_device(device),)?
                    adapters: self.adapters.to_device(device),
                }
            }

            fn train(self) -> Self {
                Self {
                    weight: self.weight.train(),
                    $($bias: self.$bias.train(),)?
                    adapters: self.adapters.train(),
                }
            }

            fn valid(&self) -> Self {
                Self {
                    weight: self.weight.valid(),
                    $($bias: self.$bias.valid(),)?
                    adapters: self.adapters.valid(),
                }
            }

            fn materialize(self) -> Self {
                Self {
                    weight: self.weight.materialize(),
                    $($bias: self.$bias.materialize(),)?
                    adapters: self.adapters.materialize(),
                }
            }

            fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
                visitor.enter_module("weight", $base);
                self.weight.visit(visitor);
                visitor.exit_module("weight", $base);
                $(
                    visitor.enter_module(stringify!($bias), $base);
                    self.$bias.visit(visitor);
                    visitor.exit_module(stringify!($bias), $base);
                )?
                visitor.enter_module("peft", $host);
                self.adapters.visit(visitor);
                visitor.exit_module("peft", $host);
            }

            fn map<M: ModuleMapper>(mut self, mapper: &mut M) -> Self {
                visit_host(&mut self);
                mapper.enter_module("weight", $base);
                let weight = Module::map(self.weight, mapper);
                mapper.exit_module("weight", $base);
                $(
                    mapper.enter_module(stringify!($bias), $base);
                    let $bias = Module::map(self.$bias, mapper);
                    mapper.exit_module(stringify!($bias), $base);
                )?
                mapper.enter_module("peft", $host);
                let adapters = self.adapters.map(mapper);
                mapper.exit_module("peft", $host);
                Self { weight, $($bias,)? adapters }
            }
        }

        impl<A: Adapter> ModuleDisplayDefault for $ty<A> {
            fn content(&self, content: Content) -> Option<Content> {
                let [rows, cols] = self.weight.shape().dims();
                content
                    .add("shape", &format!("[{rows}, {cols}]"))
                    .add("adapters", &self.adapters)
                    .optional()
            }
        }

        impl<A: Adapter> ModuleDisplay for $ty<A> {}
    };
}

host_module!(PeftLinear, "Struct:Linear", "Struct:PeftLinear", bias);
host_module!(PeftEmbedding, "Struct:Embedding", "Struct:PeftEmbedding",);
