//! The LoRA / DoRA adapter of one layer and its initializations.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Distribution, Int, Tensor};
use peft_core::error::Result;
use peft_core::{Adapter, Created, LayerInfo, LayerKind, PeftError};

use crate::config::{InitLoraWeights, LoraConfig};

/// LoRA factors of one layer, in burn orientation.
///
/// For a weight `W` of shape `[rows, cols]` (a linear layer's `[d_in, d_out]`, an embedding's
/// `[num_embeddings, d_model]`), the update is `ΔW = scale · lora_a · lora_b`. Hugging Face PEFT
/// stores the transposes: `lora_A.weight = lora_aᵀ` and `lora_B.weight = lora_bᵀ`.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `[rows, r]`.
    pub lora_a: Param<Tensor<2>>,
    /// `[r, cols]`.
    pub lora_b: Param<Tensor<2>>,
    /// DoRA magnitude per output feature, `[cols]`.
    pub magnitude: Option<Param<Tensor<1>>>,
    /// Dropout on the adapter input (linear layers, activation space).
    pub dropout: Dropout,
    /// `alpha / r` or `alpha / √r`.
    #[module(skip)]
    pub scale: f64,
}

impl LoraAdapter {
    /// The rank.
    pub fn rank(&self) -> usize {
        self.lora_a.shape().dims::<2>()[1]
    }

    /// `scale · lora_a · lora_b`, `[rows, cols]`.
    pub fn delta(&self) -> Tensor<2> {
        self.lora_a.val().matmul(self.lora_b.val()) * self.scale
    }

    /// DoRA: the factor `m / ‖W + ΔW‖` per output column, with the norm treated as a constant.
    fn dora_factor(&self, base: &Tensor<2>, magnitude: &Param<Tensor<1>>) -> Tensor<2> {
        let norm = column_norm(base.clone() + self.delta().detach()).detach();
        magnitude.val().unsqueeze_dim::<2>(0) / norm
    }
}

/// L2 norm of every column, `[1, cols]`.
pub(crate) fn column_norm(w: Tensor<2>) -> Tensor<2> {
    w.powi_scalar(2).sum_dim(0).sqrt()
}

impl Adapter for LoraAdapter {
    type MergeState = Tensor<2>;

    fn weight_delta(&self, base: Tensor<2>) -> Tensor<2> {
        match &self.magnitude {
            None => self.delta(),
            Some(m) => {
                let f = self.dora_factor(&base, m);
                (f.clone() - 1.0) * base + f * self.delta()
            }
        }
    }

    fn forward_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        weight: &Tensor<2>,
        bias: Option<&Tensor<1>>,
        result: Tensor<D>,
    ) -> Tensor<D> {
        let dropped = self.dropout.forward(x.clone());
        let lora = linear(
            linear(dropped.clone(), self.lora_a.val(), None),
            self.lora_b.val(),
            None,
        ) * self.scale;
        let Some(m) = &self.magnitude else {
            return result + lora;
        };
        let f = self.dora_factor(weight, m);
        let cols = f.dims()[1];
        let mut f_shape = [1usize; D];
        f_shape[D - 1] = cols;
        let f: Tensor<D> = f.reshape(f_shape);
        // Without active dropout the base output is reused (minus its bias), as PEFT does.
        let base_result = if self.dropout.prob == 0.0 || !x.device().is_autodiff() {
            match bias {
                Some(b) => {
                    let mut b_shape = [1usize; D];
                    b_shape[D - 1] = cols;
                    result.clone() - b.clone().reshape(b_shape)
                }
                None => result.clone(),
            }
        } else {
            linear(dropped, weight.clone(), None)
        };
        result + (f.clone() - 1.0) * base_result + f * lora
    }

    fn forward_embedding(
        &self,
        ids: Tensor<2, Int>,
        _weight: &Tensor<2>,
        result: Tensor<3>,
    ) -> Tensor<3> {
        let rows = embedding(self.lora_a.val(), ids);
        result + linear(rows, self.lora_b.val(), None) * self.scale
    }

    fn merge(&self, base: Tensor<2>) -> (Tensor<2>, Option<Tensor<2>>) {
        match &self.magnitude {
            None => (base + self.delta(), None),
            Some(m) => {
                let f = self.dora_factor(&base, m).detach();
                ((base + self.delta()) * f.clone(), Some(f))
            }
        }
    }

    fn unmerge(&self, merged: Tensor<2>, state: Option<&Tensor<2>>) -> Tensor<2> {
        match state {
            None => merged - self.delta(),
            Some(f) => merged / f.clone() - self.delta(),
        }
    }

    fn supports(&self, kind: LayerKind) -> bool {
        kind == LayerKind::Linear || self.magnitude.is_none()
    }
}

/// Create the adapter `config` asks for on one layer.
///
/// # Errors
/// DoRA on an embedding, or PiSSA with a rank above the weight's smaller side.
pub(crate) fn create(config: &LoraConfig, info: &LayerInfo) -> Result<Created<LoraAdapter>> {
    let (r, alpha) = config.rank_alpha(&info.candidate.path)?;
    let scale = config.scaling(r, alpha);
    let device = info.base.device();
    let [rows, cols] = info.base.dims();
    let kind = info.candidate.kind;
    if config.use_dora && kind == LayerKind::Embedding {
        return Err(PeftError::unsupported_field(
            "use_dora",
            true,
            format!(
                "DoRA on the embedding `{}` is not implemented",
                info.candidate.path
            ),
        ));
    }
    let uniform = |n: usize, shape: [usize; 2]| {
        let bound = 1.0 / (n as f64).sqrt();
        Tensor::<2>::random(shape, Distribution::Uniform(-bound, bound), &device)
    };
    let normal = |std: f64, shape: [usize; 2]| {
        Tensor::<2>::random(shape, Distribution::Normal(0.0, std), &device)
    };
    let zeros = |shape: [usize; 2]| Tensor::<2>::zeros(shape, &device);
    let mut new_base = None;
    let (a, b) = match (&config.init_lora_weights, kind) {
        (InitLoraWeights::Default | InitLoraWeights::Gaussian, LayerKind::Embedding) => {
            (zeros([rows, r]), normal(1.0, [r, cols]))
        }
        (InitLoraWeights::Random, LayerKind::Embedding) => {
            (normal(1.0, [rows, r]), normal(1.0, [r, cols]))
        }
        (InitLoraWeights::Default, LayerKind::Linear) => {
            (uniform(rows, [rows, r]), zeros([r, cols]))
        }
        (InitLoraWeights::Gaussian, LayerKind::Linear) => {
            (normal(1.0 / r as f64, [rows, r]), zeros([r, cols]))
        }
        (InitLoraWeights::Random, LayerKind::Linear) => {
            (uniform(rows, [rows, r]), uniform(r, [r, cols]))
        }
        (InitLoraWeights::Pissa, _) => {
            let (a, b, residual) = pissa(info.base.clone(), r, scale, &info.candidate.path)?;
            new_base = Some(residual);
            (a, b)
        }
    };
    let mut adapter = LoraAdapter {
        lora_a: Param::from_tensor(a),
        lora_b: Param::from_tensor(b),
        magnitude: None,
        dropout: DropoutConfig::new(config.lora_dropout).init(),
        scale,
    };
    if config.use_dora {
        let base = new_base.clone().unwrap_or_else(|| info.base.clone());
        let norm = column_norm(base + adapter.delta()).reshape([cols]);
        adapter.magnitude = Some(Param::from_tensor(norm.detach()));
    }
    Ok(Created { adapter, new_base })
}

/// PiSSA: the top-`r` singular triplets of `W` become the adapter, the rest stays in the base.
///
/// In burn orientation `W = U·diag(S)·Vᵀ` (`[rows, cols]`): `a = U_r·diag(√(S_r/s))`,
/// `b = diag(√(S_r/s))·V_rᵀ`, residual `W − s·a·b`.
fn pissa(
    w: Tensor<2>,
    r: usize,
    scale: f64,
    path: &str,
) -> Result<(Tensor<2>, Tensor<2>, Tensor<2>)> {
    let [rows, cols] = w.dims();
    if r > rows.min(cols) {
        return Err(PeftError::InvalidConfig {
            field: "r".into(),
            reason: format!(
                "PiSSA needs r <= min(shape) at `{path}`, got r={r} for [{rows}, {cols}]"
            ),
        });
    }
    let w = w.detach();
    let (u, s, vt) = burn::linalg::svd::<2, 1>(w.clone(), 100);
    let root = (s.narrow(0, 0, r) / scale).sqrt();
    let a = u.slice([0..rows, 0..r]) * root.clone().unsqueeze_dim::<2>(0);
    let b = vt.slice([0..r, 0..cols]) * root.unsqueeze_dim::<2>(1);
    let residual = w - a.clone().matmul(b.clone()) * scale;
    Ok((a, b, residual))
}
