//! The building blocks shared by the models: the linear-layer abstraction, the format the
//! frozen base is held in, and the norms.

use std::fmt;
use std::str::FromStr;

use burn::module::{Module, ModuleDisplay, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{Adapter, PeftLinear};
use peft_kernels::cross_entropy::HeadWeight;
use peft_kernels::packed_linear::PackedWeight;
use peft_kernels::quant::ggml::GgmlBlock;
use peft_kernels::quant::{PackedFormat, PackedMatrix};

use crate::error::Result;

/// How a model's frozen base weights are held in memory (`[model] base` in a run file,
/// `--base` on the command line).
///
/// | base | linear layers | token embedding, untied LM head |
/// |---|---|---|
/// | `f32` | f32 | f32 |
/// | `bf16` | bf16 blocks | bf16 blocks |
/// | `nf4` | NF4, blocks of 64, f32 block maxima | bf16 blocks |
/// | `nf4-dq` | NF4 with double-quantized maxima (QLoRA) | bf16 blocks |
/// | `gguf` | the GGUF file's blocks as stored (`Q4_0`, `Q4_1`, `Q8_0`, `F16`, `BF16`) | as stored |
///
/// As in QLoRA (bitsandbytes and Transformers skip `lm_head` and embeddings), NF4 leaves the
/// token table and the LM head at 16 bits. Packed weights are read in place by
/// [`peft_kernels::packed_linear`]; they are frozen (adapters train beside them) and not part
/// of a saved model. Norms and biases stay f32 in every format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BaseFormat {
    /// Full precision (the default).
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// NF4 (`double`: double-quantized block maxima, QLoRA's `bnb_4bit_use_double_quant`).
    Nf4 {
        /// Whether the block maxima are double-quantized.
        double: bool,
    },
    /// A GGUF file's own blocks, kept as loaded (never dequantized to f32).
    Gguf,
}

impl BaseFormat {
    /// Every format, as [`BaseFormat::name`] spells them.
    pub const NAMES: [&'static str; 5] = ["f32", "bf16", "nf4", "nf4-dq", "gguf"];

    /// The name the run file and `--base` use.
    pub const fn name(self) -> &'static str {
        match self {
            BaseFormat::F32 => "f32",
            BaseFormat::Bf16 => "bf16",
            BaseFormat::Nf4 { double: false } => "nf4",
            BaseFormat::Nf4 { double: true } => "nf4-dq",
            BaseFormat::Gguf => "gguf",
        }
    }

    /// Whether the base is held packed (every format but `f32`).
    pub const fn is_packed(self) -> bool {
        !matches!(self, BaseFormat::F32)
    }

    /// The format linear layers are quantized to from full precision (`None`: f32, or GGUF's
    /// blocks as stored).
    pub const fn linear_format(self) -> Option<PackedFormat> {
        match self {
            BaseFormat::F32 | BaseFormat::Gguf => None,
            BaseFormat::Bf16 => Some(PackedFormat::Ggml(GgmlBlock::Bf16)),
            BaseFormat::Nf4 { double } => Some(PackedFormat::Nf4 { double }),
        }
    }

    /// The format token tables and LM heads are converted to from full precision.
    pub const fn table_format(self) -> Option<PackedFormat> {
        match self {
            BaseFormat::F32 | BaseFormat::Gguf => None,
            BaseFormat::Bf16 | BaseFormat::Nf4 { .. } => Some(PackedFormat::Ggml(GgmlBlock::Bf16)),
        }
    }
}

impl fmt::Display for BaseFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for BaseFormat {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for BaseFormat {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for BaseFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "f32" => BaseFormat::F32,
            "bf16" => BaseFormat::Bf16,
            "nf4" => BaseFormat::Nf4 { double: false },
            "nf4-dq" => BaseFormat::Nf4 { double: true },
            "gguf" => BaseFormat::Gguf,
            other => {
                return Err(format!(
                    "`{other}` is not a base format (one of {})",
                    BaseFormat::NAMES.join(", ")
                ));
            }
        })
    }
}

/// A linear layer a model can be built with: `burn::nn::Linear` (plain; adapters attach in weight
/// space) or [`PeftLinear`] (adapters attach in activation space, the fast path).
///
/// Both store `<path>.weight` (`[d_in, d_out]`) and `<path>.bias`, so the same checkpoint loads
/// into either.
pub trait LinearLayer: Module + ModuleDisplay + From<Linear> {
    /// Apply the layer to `[..., d_in]`, giving `[..., d_out]`.
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D>;

    /// A layer over the frozen packed weight `weight` (`[d_out, d_in]`) and `bias`. The default
    /// dequantizes it into a plain `Linear`.
    ///
    /// # Errors
    /// A bias whose length is not `d_out`.
    fn from_packed(
        weight: PackedWeight,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> Result<Self> {
        let [d_out, d_in] = weight.shape();
        let dense =
            Tensor::<2>::from_data(TensorData::new(weight.dequantize(), [d_out, d_in]), device)
                .transpose();
        Ok(Self::from(Linear {
            weight: Param::from_tensor(dense),
            bias,
        }))
    }

    /// The layer's weight as an LM head's loss reads it (`[d_out, d_in]`), when the layer is a
    /// plain product: no bias and nothing else added. `None` (the default) makes the loss take
    /// the layer's output instead.
    fn head_weight(&self) -> Option<HeadWeight> {
        None
    }
}

impl LinearLayer for Linear {
    /// `burn::nn::Linear`'s forward through [`peft_kernels::linear`], as in
    /// [`PeftLinear`]: one 2-D product over the rows of any input (one GEMM rather than one per
    /// batch entry), fast on flex.
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        peft_kernels::linear(x, self.weight.val(), self.bias.as_ref().map(Param::val))
    }

    fn head_weight(&self) -> Option<HeadWeight> {
        self.bias
            .is_none()
            .then(|| HeadWeight::Dense(self.weight.val().transpose()))
    }
}

impl<A: Adapter> LinearLayer for PeftLinear<A> {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        PeftLinear::forward(self, x)
    }

    fn from_packed(
        weight: PackedWeight,
        bias: Option<Param<Tensor<1>>>,
        device: &Device,
    ) -> Result<Self> {
        Ok(PeftLinear::from_packed(weight, bias, device)?)
    }

    /// The base weight (packed or not) of a layer without bias and without adapters.
    fn head_weight(&self) -> Option<HeadWeight> {
        if self.bias.is_some() || !self.adapters.is_empty() {
            return None;
        }
        Some(match &self.packed {
            Some(packed) => HeadWeight::Packed(packed.clone()),
            None => HeadWeight::Dense(self.weight.val().transpose()),
        })
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
        peft_kernels::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// The rows of the packed token table `table` (`[vocab, hidden]`) for `ids` (`[batch, seq]`):
/// `[batch, seq, hidden]`, decoding only those rows (a frozen lookup: no gradient).
///
/// # Panics
/// For an id outside the table.
pub(crate) fn packed_lookup(table: &PackedMatrix, ids: Tensor<2, Int>) -> Tensor<3> {
    let [batch, seq] = ids.dims();
    let device = ids.device();
    let ids: Vec<usize> = ids
        .into_data()
        .iter::<i64>()
        .map(|id| usize::try_from(id).unwrap_or(usize::MAX))
        .collect();
    let hidden = table.shape()[1];
    Tensor::from_data(
        TensorData::new(table.gather_rows(&ids), [batch, seq, hidden]),
        &device,
    )
}
