//! The SVD-form adapter of one layer: `ΔW = (P·Λ·Q) · scale`.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Distribution, Int, Tensor};
use peft_core::error::Result;
use peft_core::kernels::linear;
use peft_core::{Adapter, Created, LayerInfo, LayerKind, PeftError, Placement};
use peft_lora::InitLoraWeights;

use crate::config::AdaLoraConfig;

/// AdaLoRA's singular-value-form update of one linear layer, in burn orientation.
///
/// PEFT stores `lora_A (r, in)`, `lora_E (r, 1)`, `lora_B (out, r)` and computes
/// `ΔWᵀ = B·(A ⊙ E)·scale`; here `lora_a = Aᵀ` (`[d_in, r]`), `lora_e = E` flattened (`[r]`),
/// `lora_b = Bᵀ` (`[r, d_out]`), and `ΔW = (lora_a ⊙ lora_e)·lora_b·scale`. The rank `r` is the
/// number of kept triplets: `init_r` while training, fewer after loading a truncated adapter.
#[derive(Module, Debug)]
pub struct AdaLoraAdapter {
    /// Right singular vectors `P`, `[d_in, r]`.
    pub lora_a: Param<Tensor<2>>,
    /// Singular values `Λ`, `[r]`.
    pub lora_e: Param<Tensor<1>>,
    /// Left singular vectors `Q`, `[r, d_out]`.
    pub lora_b: Param<Tensor<2>>,
    /// Dropout on the adapter input (activation space).
    pub dropout: Dropout,
    /// `lora_alpha / (init_r + 1e-5)`.
    #[module(skip)]
    pub scale: f64,
}

impl AdaLoraAdapter {
    /// The number of kept triplets.
    pub fn rank(&self) -> usize {
        self.lora_e.shape().dims::<1>()[0]
    }

    /// `P ⊙ Λ`, `[d_in, r]`.
    fn scaled_a(&self) -> Tensor<2> {
        self.lora_a.val() * self.lora_e.val().unsqueeze_dim::<2>(0)
    }

    /// `(P ⊙ Λ)·Q·scale`, `[d_in, d_out]`.
    pub fn delta(&self) -> Tensor<2> {
        let [rows, _] = self.lora_a.shape().dims();
        let [_, cols] = self.lora_b.shape().dims();
        if self.rank() == 0 {
            return Tensor::zeros([rows, cols], &self.lora_a.device());
        }
        self.scaled_a().matmul(self.lora_b.val()) * self.scale
    }
}

impl Adapter for AdaLoraAdapter {
    type MergeState = ();

    fn weight_delta(&self, _base: Tensor<2>) -> Tensor<2> {
        self.delta()
    }

    fn forward_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        _weight: &Tensor<2>,
        _bias: Option<&Tensor<1>>,
        result: Tensor<D>,
    ) -> Tensor<D> {
        if self.rank() == 0 {
            return result;
        }
        let dropped = self.dropout.forward(x);
        result
            + linear(
                linear(dropped, self.scaled_a(), None),
                self.lora_b.val(),
                None,
            ) * self.scale
    }

    fn forward_embedding(
        &self,
        _ids: Tensor<2, Int>,
        _weight: &Tensor<2>,
        result: Tensor<3>,
    ) -> Tensor<3> {
        // Never attached to an embedding (`supports`).
        result
    }

    fn supports(&self, kind: LayerKind) -> bool {
        kind == LayerKind::Linear
    }
}

/// Create the adapter of one layer, at rank `rank` (`init_r`, or the kept count when loading
/// a truncated adapter).
///
/// # Errors
/// An embedding layer, or dropout on a weight-space layer in training.
pub(crate) fn create(
    config: &AdaLoraConfig,
    info: &LayerInfo,
    rank: usize,
) -> Result<Created<AdaLoraAdapter>> {
    let path = &info.candidate.path;
    if info.candidate.kind != LayerKind::Linear {
        return Err(PeftError::unsupported_field(
            "target_modules",
            path.as_str(),
            "AdaLoRA adapts linear layers only (as in PEFT)",
        ));
    }
    let lora = &config.lora;
    if info.placement == Placement::Weight && lora.lora_dropout > 0.0 && !lora.base.inference_mode {
        return Err(PeftError::unsupported_field(
            "lora_dropout",
            lora.lora_dropout,
            format!(
                "`{path}` is a plain layer, adapted in weight space, where dropout on the adapter \
                 input cannot be applied; declare it as `PeftLinear` or set lora_dropout = 0"
            ),
        ));
    }
    let device = info.base.device();
    let [rows, cols] = info.base.dims();
    let std = match lora.init_lora_weights {
        InitLoraWeights::Random => 1.0,
        _ => 0.02,
    };
    let normal =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, std), &device);
    let lora_e = match lora.init_lora_weights {
        InitLoraWeights::Random => {
            Tensor::<1>::random([rank], Distribution::Normal(0.0, 1.0), &device)
        }
        _ => Tensor::<1>::zeros([rank], &device),
    };
    Ok(Created {
        adapter: AdaLoraAdapter {
            lora_a: Param::from_tensor(normal([rows, rank])),
            lora_e: Param::from_tensor(lora_e),
            lora_b: Param::from_tensor(normal([rank, cols])),
            dropout: DropoutConfig::new(lora.lora_dropout).init(),
            scale: config.scale(),
        },
        new_base: None,
    })
}
