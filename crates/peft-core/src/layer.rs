//! Activation-space hosts: drop-in replacements for `burn::nn::Linear` and `burn::nn::Embedding`.

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param,
};
use burn::nn::{Embedding, Linear};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor};

use peft_kernels::packed_linear::{PackedWeight, packed_linear, packed_lora_linear};
use peft_kernels::quant::{PackedFormat, PackedMatrix};

use crate::adapter::{Adapter, LinearBase};
use crate::error::{PeftError, Result};
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
///
/// The frozen base can also be kept packed at 4 or 8 bits ([`PeftLinear::from_packed`],
/// [`PeftLinear::pack`]: NF4 with or without double quantization, or a GGUF file's own
/// `Q4_0` / `Q4_1` / `Q8_0` blocks): the products then read the packed blocks
/// ([`peft_kernels::packed_linear`]) and `weight` is an empty `[0, 0]` placeholder, so a packed
/// layer's base is not part of a saved model (reload it from its file). Adapters work as on an
/// f32 base; merging into a packed base dequantizes, merges and quantizes again (which rounds:
/// outputs move by the format's quantization error), and [`PeftLinear::unpack`] gives back an
/// f32 layer for a full-precision merge.
#[derive(Clone, Debug)]
pub struct PeftLinear<A: Adapter> {
    /// The base weight, `[d_in, d_out]` (empty when the base is packed).
    pub weight: Param<Tensor<2>>,
    /// The base bias, `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// The adapters of this layer.
    pub adapters: AdapterSlot<A>,
    /// The base weight kept packed, `[d_out, d_in]` (PyTorch's orientation, as NF4 and GGUF
    /// store it), or `None` for an f32 base in `weight`.
    pub packed: Option<PackedWeight>,
}

impl<A: Adapter> From<Linear> for PeftLinear<A> {
    fn from(linear: Linear) -> Self {
        Self {
            weight: linear.weight,
            bias: linear.bias,
            adapters: AdapterSlot::default(),
            packed: None,
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
        let bias = self.bias.as_ref().map(Param::val);
        if let Some(packed) = &self.packed {
            return self.forward_packed(x, packed, bias);
        }
        let weight = self.weight.val();
        if let Some((a, b, scale)) = self.adapters.single_low_rank(&x.device()) {
            return lora_linear(x, weight, bias, a, b, scale);
        }
        if let Some(y) = self
            .adapters
            .single_fused(&x, LinearBase::Dense(&weight), bias.as_ref())
        {
            return y;
        }
        let result = linear(x.clone(), weight.clone(), bias.clone());
        if self.adapters.is_empty() {
            return result;
        }
        self.adapters
            .forward_linear(x, &weight, bias.as_ref(), result)
    }

    /// [`forward`](Self::forward) over a packed base: the base product reads the packed blocks;
    /// a plain LoRA adapter runs with it as one op ([`packed_lora_linear`]), RoSA and SFT their
    /// fused op over the packed base ([`Adapter::fused_linear`]); other adapters add their terms
    /// as on an f32 base (a DoRA adapter gets the dequantized weight, built for that call).
    fn forward_packed<const D: usize>(
        &self,
        x: Tensor<D>,
        packed: &PackedWeight,
        bias: Option<Tensor<1>>,
    ) -> Tensor<D> {
        if let Some((a, b, scale)) = self.adapters.single_low_rank(&x.device()) {
            return packed_lora_linear(x, packed, bias, a, b, scale);
        }
        if let Some(y) = self
            .adapters
            .single_fused(&x, LinearBase::Packed(packed), bias.as_ref())
        {
            return y;
        }
        let result = packed_linear(x.clone(), packed, bias.clone());
        if self.adapters.is_empty() {
            return result;
        }
        let weight = if self.adapters.reads_base_weight() {
            self.base_weight()
        } else {
            self.weight.val()
        };
        self.adapters
            .forward_linear(x, &weight, bias.as_ref(), result)
    }

    /// A layer whose frozen base is `weight` (`[d_out, d_in]`) kept packed, on `device`.
    ///
    /// # Errors
    /// A bias whose length is not `d_out`.
    pub fn from_packed(
        weight: impl Into<PackedWeight>,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> Result<Self> {
        let weight = weight.into();
        let [d_out, _] = weight.shape();
        if let Some(b) = &bias
            && b.dims() != [d_out]
        {
            return Err(PeftError::Unsupported(format!(
                "a packed [{d_out}, {}] weight with a bias of shape {:?}",
                weight.shape()[1],
                b.dims()
            )));
        }
        Ok(Self {
            weight: Param::from_tensor(Tensor::zeros([0, 0], device)).set_require_grad(false),
            bias,
            adapters: AdapterSlot::default(),
            packed: Some(weight),
        })
    }

    /// This layer with its base packed in `format` (quantized from the f32 weight; an already
    /// packed base is left as it is). `Ggml` formats need `d_in` to be a multiple of 32; NF4
    /// pads rows to whole blocks of 64.
    ///
    /// # Errors
    /// A weight the format cannot store (non-finite values, rows of the wrong length), or a layer
    /// with merged adapters (unmerge first: their deltas are folded into the f32 weight).
    pub fn pack(self, format: PackedFormat) -> Result<Self> {
        if self.packed.is_some() {
            return Ok(self);
        }
        if self.adapters.merged().next().is_some() {
            return Err(PeftError::Unsupported(
                "packing a layer with merged adapters (unmerge them first)".into(),
            ));
        }
        let device = self.weight.device();
        let packed = pack_weight(self.weight.val(), format)?;
        Ok(Self {
            weight: Param::from_tensor(Tensor::zeros([0, 0], &device)).set_require_grad(false),
            packed: Some(packed),
            ..self
        })
    }

    /// This layer with an f32 base again (the packed values, dequantized; frozen).
    pub fn unpack(self) -> Self {
        match &self.packed {
            None => self,
            Some(_) => {
                let weight = self.base_weight();
                Self {
                    weight: Param::from_tensor(weight).set_require_grad(false),
                    packed: None,
                    ..self
                }
            }
        }
    }

    /// The base weight in f32, `[d_in, d_out]`: `weight`, or the packed base dequantized.
    pub fn base_weight(&self) -> Tensor<2> {
        match &self.packed {
            None => self.weight.val(),
            Some(p) => unpacked(p, &self.weight.device()),
        }
    }

    /// The plain linear layer with the current base weights (a packed base dequantized);
    /// adapters are dropped unmerged.
    pub fn into_linear(self) -> Linear {
        let weight = match &self.packed {
            None => self.weight,
            Some(_) => Param::from_tensor(self.base_weight()).set_require_grad(false),
        };
        Linear {
            weight,
            bias: self.bias,
        }
    }
}

/// The container type of the empty `packed` module a layer with a packed base shows visitors.
pub(crate) const PACKED_BASE: &str = "Struct:PackedBase";

impl<A: Adapter> PeftLinear<A> {
    /// The weight visitors see: `weight`, or for a packed base a frozen zero view of the layer's
    /// real shape `[d_in, d_out]` (same id; one element broadcast, no memory), so inventories
    /// (adapter targeting, budgets, parameter counts) see the layer's true shape while the model
    /// holds only the packed blocks. It is not the weight's values: a packed base is not part of
    /// a saved model ([`PeftLinear::unpack`] first to save it). (A lazy parameter that would
    /// dequantize when read does not work: burn's optimizers ask every parameter whether it
    /// requires a gradient, which builds it, so every step would dequantize every layer.)
    fn visited_weight(&self) -> Param<Tensor<2>> {
        match &self.packed {
            None => self.weight.clone(),
            Some(p) => {
                let [d_out, d_in] = p.shape();
                let view = Tensor::<2>::zeros([1, 1], &self.weight.device()).expand([d_in, d_out]);
                Param::initialized(self.weight.id, view).set_require_grad(false)
            }
        }
    }
}

impl<A: Adapter> PeftEmbedding<A> {
    fn visited_weight(&self) -> Param<Tensor<2>> {
        self.weight.clone()
    }
}

/// A packed `[d_out, d_in]` weight as an f32 `[d_in, d_out]` tensor on `device`.
pub(crate) fn unpacked(packed: &PackedMatrix, device: &Device) -> Tensor<2> {
    let [d_out, d_in] = packed.shape();
    Tensor::<2>::from_data(
        burn::tensor::TensorData::new(packed.dequantize(), [d_out, d_in]),
        device,
    )
    .transpose()
}

/// An f32 `[d_in, d_out]` weight packed in `format` (`[d_out, d_in]`).
pub(crate) fn pack_weight(weight: Tensor<2>, format: PackedFormat) -> Result<PackedWeight> {
    let [d_in, d_out] = weight.dims();
    let values = weight
        .transpose()
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| PeftError::Unsupported(format!("reading a weight to pack it: {e:?}")))?;
    PackedMatrix::quantize(&values, d_out, d_in, format)
        .map(PackedWeight::new)
        .map_err(|e| PeftError::Unsupported(format!("packing a [{d_out}, {d_in}] weight: {e}")))
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
    ($ty:ident, $base:literal, $host:literal, $($bias:ident, $packed:ident)?) => {
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
                    $($packed: self.$packed,)?
                }
            }

            fn to_device(self, device: &Device) -> Self {
                Self {
                    weight: self.weight.to_device(device),
                    $($bias: self.$bias.to_device(device),)?
                    adapters: self.adapters.to_device(device),
                    $($packed: self.$packed,)?
                }
            }

            fn train(self) -> Self {
                Self {
                    weight: self.weight.train(),
                    $($bias: self.$bias.train(),)?
                    adapters: self.adapters.train(),
                    $($packed: self.$packed,)?
                }
            }

            fn valid(&self) -> Self {
                Self {
                    weight: self.weight.valid(),
                    $($bias: self.$bias.valid(),)?
                    adapters: self.adapters.valid(),
                    $($packed: self.$packed.clone(),)?
                }
            }

            fn materialize(self) -> Self {
                Self {
                    weight: self.weight.materialize(),
                    $($bias: self.$bias.materialize(),)?
                    adapters: self.adapters.materialize(),
                    $($packed: self.$packed,)?
                }
            }

            fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
                visitor.enter_module("weight", $base);
                self.visited_weight().visit(visitor);
                visitor.exit_module("weight", $base);
                $(
                    if self.$packed.is_some() {
                        // An empty marker: [`crate::hosts::packed_paths`] finds packed bases.
                        visitor.enter_module("packed", PACKED_BASE);
                        visitor.exit_module("packed", PACKED_BASE);
                    }
                )?
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
                Self { weight, $($bias,)? adapters, $($packed: self.$packed,)? }
            }
        }

        impl<A: Adapter> ModuleDisplayDefault for $ty<A> {
            fn content(&self, content: Content) -> Option<Content> {
                let [rows, cols] = self.weight.shape().dims();
                #[allow(unused_mut)]
                let mut shape = format!("[{rows}, {cols}]");
                $(
                    if let Some(p) = &self.$packed {
                        let [d_out, d_in] = p.shape();
                        shape = format!("[{d_in}, {d_out}] packed {}", p.format().name());
                    }
                )?
                content
                    .add("shape", &shape)
                    .add("adapters", &self.adapters)
                    .optional()
            }
        }

        impl<A: Adapter> ModuleDisplay for $ty<A> {}
    };
}

host_module!(
    PeftLinear,
    "Struct:Linear",
    "Struct:PeftLinear",
    bias,
    packed
);
host_module!(PeftEmbedding, "Struct:Embedding", "Struct:PeftEmbedding",);
