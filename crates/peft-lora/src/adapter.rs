//! The LoRA / DoRA adapter of one layer and its initializations.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Distribution, Int, Tensor};
use peft_core::error::Result;
use peft_core::kernels::linear;
use peft_core::{Adapter, Created, LayerInfo, LayerKind, PeftError, Placement};

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
        // The scale goes on the rank-r intermediate, not on the [.., out] product: one pass
        // over r columns instead of `out` in the forward and in the backward pass.
        let lora = linear(
            linear(dropped.clone(), self.lora_a.val(), None) * self.scale,
            self.lora_b.val(),
            None,
        );
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

    fn reads_base_weight(&self) -> bool {
        // DoRA's magnitude divides by the norm of the base weight plus the delta.
        self.magnitude.is_some()
    }

    fn low_rank_factors(&self, device: &Device) -> Option<(Tensor<2>, Tensor<2>, f64)> {
        let dropout_off = self.dropout.prob == 0.0 || !device.is_autodiff();
        (self.magnitude.is_none() && dropout_off)
            .then(|| (self.lora_a.val(), self.lora_b.val(), self.scale))
    }

    fn forward_embedding(
        &self,
        ids: Tensor<2, Int>,
        _weight: &Tensor<2>,
        result: Tensor<3>,
    ) -> Tensor<3> {
        let rows = embedding(self.lora_a.val(), ids);
        result + linear(rows * self.scale, self.lora_b.val(), None)
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
    if info.placement == Placement::Weight
        && config.lora_dropout > 0.0
        && !config.base.inference_mode
    {
        return Err(PeftError::unsupported_field(
            "lora_dropout",
            config.lora_dropout,
            format!(
                "`{}` is a plain layer, adapted in weight space, where dropout on the adapter input \
                 cannot be applied; declare it as `PeftLinear`/`PeftEmbedding` or set lora_dropout = 0",
                info.candidate.path
            ),
        ));
    }
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
    let mut new_base = None;
    let (a, b) = match &config.init_lora_weights {
        InitLoraWeights::Pissa => {
            let (a, b, residual) = pissa(info.base.clone(), r, scale, &info.candidate.path)?;
            new_base = Some(residual);
            (a, b)
        }
        init => init_factors(init, kind, [rows, cols], r, &device)
            .expect("every init but PiSSA is drawn by init_factors"),
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

/// The initial factors `(a, b)` (`[rows, r]`, `[r, cols]`) that `init` draws for a layer of
/// `kind` whose weight is `[rows, cols]`, or `None` for PiSSA (it needs the base weight):
///
/// | init | linear `a`, `b` | embedding `a`, `b` |
/// |---|---|---|
/// | `Default` | `U(±1/√rows)`, zero | zero, `N(0, 1)` |
/// | `Gaussian` | `N(0, 1/r)`, zero | zero, `N(0, 1)` |
/// | `Random` | `U(±1/√rows)`, `U(±1/√r)` | `N(0, 1)`, `N(0, 1)` |
///
/// RoSA's low-rank part starts from these too.
pub fn init_factors(
    init: &InitLoraWeights,
    kind: LayerKind,
    [rows, cols]: [usize; 2],
    r: usize,
    device: &Device,
) -> Option<(Tensor<2>, Tensor<2>)> {
    let uniform = |n: usize, shape: [usize; 2]| {
        let bound = 1.0 / (n as f64).sqrt();
        Tensor::<2>::random(shape, Distribution::Uniform(-bound, bound), device)
    };
    let normal = |std: f64, shape: [usize; 2]| {
        Tensor::<2>::random(shape, Distribution::Normal(0.0, std), device)
    };
    let zeros = |shape: [usize; 2]| Tensor::<2>::zeros(shape, device);
    Some(match (init, kind) {
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
        (InitLoraWeights::Pissa, _) => return None,
    })
}

/// LoRA's scale for rank `r` and `alpha`: `alpha / r`, or `alpha / √r` with rsLoRA.
pub fn lora_scaling(r: usize, alpha: f64, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// Reduced SVD `w = u·diag(s)·vt` of a constant matrix, on any device (burn-linalg has no
/// autodiff rule, so it runs on the inner backend and the factors come back as constants).
pub(crate) fn svd(w: Tensor<2>) -> (Tensor<2>, Tensor<1>, Tensor<2>) {
    let autodiff = w.is_autodiff();
    let (u, s, vt) = burn::linalg::svd::<2, 1>(w.detach().inner(), 100);
    if autodiff {
        (
            Tensor::from_inner(u),
            Tensor::from_inner(s),
            Tensor::from_inner(vt),
        )
    } else {
        (u, s, vt)
    }
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
    let (u, s, vt) = svd(w.clone());
    let root = (s.narrow(0, 0, r) / scale).sqrt();
    let a = u.slice([0..rows, 0..r]) * root.clone().unsqueeze_dim::<2>(0);
    let b = vt.slice([0..r, 0..cols]) * root.unsqueeze_dim::<2>(1);
    let residual = w - a.clone().matmul(b.clone()) * scale;
    Ok((a, b, residual))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::Candidate;

    fn info(kind: LayerKind, rows: usize, cols: usize) -> LayerInfo {
        let device = burn::tensor::Device::flex().autodiff();
        LayerInfo {
            candidate: Candidate {
                path: "layers.0.q".into(),
                kind,
            },
            base: Tensor::random([rows, cols], Distribution::Normal(0.0, 1.0), &device),
            placement: Placement::Activation,
        }
    }

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().iter::<f32>().collect()
    }

    // The init draws come from burn's process-global generator, which tests running in
    // parallel share, so they cannot be seeded; instead every statistical bound below is at
    // least 6.1 standard errors wide (a false failure below 1e-9). The standard error of a
    // sample std over n draws is σ·√((κ − 1) / 4n), κ the kurtosis: 3 for a normal, 1.8 for a
    // uniform.
    fn std(v: &[f32]) -> f32 {
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt()
    }

    fn cfg(init: InitLoraWeights) -> LoraConfig {
        LoraConfig::new(8, 16.0, peft_core::ModuleSelector::names(["q"])).with_init(init)
    }

    #[test]
    fn default_init_is_kaiming_uniform_a_and_zero_b() {
        let c = create(
            &cfg(InitLoraWeights::Default),
            &info(LayerKind::Linear, 256, 64),
        )
        .unwrap();
        let a = values(c.adapter.lora_a.val());
        let bound = 1.0 / 256f32.sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound));
        // Uniform on [-b, b] has std b/√3; a normal of that bound would not stay inside it.
        // 2048 draws: standard error 0.0057·b, so 0.1·b is 17 of them.
        assert_eq!(a.len(), 2048);
        assert!((std(&a) - bound / 3f32.sqrt()).abs() < 0.1 * bound);
        assert!(values(c.adapter.lora_b.val()).iter().all(|x| *x == 0.0));
        assert_eq!(c.adapter.scale, 2.0);
        assert!(c.new_base.is_none());
    }

    #[test]
    fn gaussian_and_random_and_embedding_inits() {
        let g = create(
            &cfg(InitLoraWeights::Gaussian),
            &info(LayerKind::Linear, 256, 64),
        )
        .unwrap();
        // std 1/r over 2048 draws: standard error 0.00195, the bound 6.4 of them.
        let a = values(g.adapter.lora_a.val());
        assert_eq!(a.len(), 2048);
        assert!((std(&a) - 1.0 / 8.0).abs() < 0.0125);
        assert!(values(g.adapter.lora_b.val()).iter().all(|x| *x == 0.0));
        let r = create(
            &cfg(InitLoraWeights::Random),
            &info(LayerKind::Linear, 256, 64),
        )
        .unwrap();
        let b = values(r.adapter.lora_b.val());
        assert!(b.iter().any(|x| *x != 0.0) && b.iter().all(|x| x.abs() <= 1.0 / 8f32.sqrt()));
        let e = create(
            &cfg(InitLoraWeights::Default),
            &info(LayerKind::Embedding, 300, 1024),
        )
        .unwrap();
        assert!(values(e.adapter.lora_a.val()).iter().all(|x| *x == 0.0));
        // Standard normal over 8 x 1024 draws: standard error 0.0078, the bound 6.4 of them.
        let b = values(e.adapter.lora_b.val());
        assert_eq!(b.len(), 8 * 1024);
        assert!((std(&b) - 1.0).abs() < 0.05);
    }

    #[test]
    fn rslora_scaling_and_dora_magnitude_at_init() {
        let c = create(
            &cfg(InitLoraWeights::Default).with_rslora(true),
            &info(LayerKind::Linear, 32, 16),
        )
        .unwrap();
        assert_eq!(c.adapter.scale, 16.0 / 8f64.sqrt());
        let i = info(LayerKind::Linear, 32, 16);
        let d = create(&cfg(InitLoraWeights::Random).with_dora(true), &i).unwrap();
        let m = d.adapter.magnitude.as_ref().unwrap().val();
        let expected = column_norm(i.base.clone() + d.adapter.delta()).reshape([16]);
        assert!((m - expected).abs().max().into_scalar::<f32>() < 1e-5);
        // DoRA at init leaves the effective weight at W + ΔW (the magnitude matches the norm).
        let eff = i.base.clone() + d.adapter.weight_delta(i.base.clone());
        let plain = i.base.clone() + d.adapter.delta();
        assert!((eff - plain).abs().max().into_scalar::<f32>() < 1e-5);
        assert!(
            create(
                &cfg(InitLoraWeights::Default).with_dora(true),
                &info(LayerKind::Embedding, 10, 4)
            )
            .is_err()
        );
    }

    #[test]
    fn pissa_moves_the_principal_part_into_the_adapter() {
        let i = info(LayerKind::Linear, 24, 12);
        let c = create(&cfg(InitLoraWeights::Pissa), &i).unwrap();
        let residual = c.new_base.unwrap();
        let rebuilt = residual.clone() + c.adapter.delta();
        assert!((rebuilt - i.base.clone()).abs().max().into_scalar::<f32>() < 1e-4);
        // The residual has no component left along the top singular directions.
        let (_, s_res, _) = svd(residual);
        let (_, s, _) = svd(i.base.clone());
        let s: Vec<f32> = s.into_data().iter::<f32>().collect();
        let s_res: Vec<f32> = s_res.into_data().iter::<f32>().collect();
        assert!((s_res[0] - s[8]).abs() < 1e-3, "{s_res:?} vs {s:?}");
        assert!(create(&cfg(InitLoraWeights::Pissa), &info(LayerKind::Linear, 4, 6)).is_err());
    }

    #[test]
    fn weight_space_refuses_dropout_for_training_but_loads_it_for_inference() {
        let mut i = info(LayerKind::Linear, 16, 8);
        i.placement = Placement::Weight;
        let config = cfg(InitLoraWeights::Default).with_dropout(0.1);
        let err = create(&config, &i)
            .err()
            .expect("dropout in weight space is refused");
        assert!(
            err.to_string().contains("lora_dropout") && err.to_string().contains("PeftLinear"),
            "{err}"
        );
        let mut inference = config;
        inference.base.inference_mode = true;
        assert!(create(&inference, &i).is_ok());
    }

    #[test]
    fn dropout_touches_only_the_adapter_branch() {
        let i = info(LayerKind::Linear, 16, 8);
        let device = i.base.device();
        let zero_b = create(&cfg(InitLoraWeights::Default).with_dropout(0.5), &i)
            .unwrap()
            .adapter;
        let x = Tensor::<2>::random([64, 16], Distribution::Normal(0.0, 1.0), &device);
        let base = x.clone().matmul(i.base.clone());
        // With B = 0 the adapter adds exactly nothing, even with dropout active.
        let y = zero_b.forward_linear(x.clone(), &i.base, None, base.clone());
        assert_eq!(values(y), values(base.clone()));
        // With a non-zero adapter, training mode drops adapter inputs; validation mode does not.
        let ad = create(&cfg(InitLoraWeights::Random).with_dropout(0.5), &i)
            .unwrap()
            .adapter;
        let full = base.clone() + x.clone().matmul(ad.delta());
        let train = ad.forward_linear(x.clone(), &i.base, None, base.clone());
        let valid = ad.valid().forward_linear(
            x.clone().inner(),
            &i.base.clone().inner(),
            None,
            base.clone().inner(),
        );
        assert!((train - full.clone()).abs().max().into_scalar::<f32>() > 1e-3);
        assert!((valid - full.inner()).abs().max().into_scalar::<f32>() < 1e-4);
    }
}
