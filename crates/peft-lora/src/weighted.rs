//! `add_weighted_adapter`: a new adapter from a weighted combination of existing ones.

use std::collections::BTreeMap;

use burn::module::Param;
use burn::nn::DropoutConfig;
use burn::tensor::Tensor;
use peft_core::error::{PeftError, Result};
use peft_core::hosts::{self, Created, HostView};
use peft_core::{ModuleSelector, PeftConfigBase};

use crate::LoraModel;
use crate::adapter::LoraAdapter;
use crate::config::LoraConfig;

/// How [`WeightedAdapters::add_weighted_adapter`] combines adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// Concatenate the factors: rank `Σ r_i`, exactly `Σ w_i·ΔW_i`.
    Cat,
    /// Truncated SVD of `Σ w_i·ΔW_i` to `rank` (default: the largest source rank).
    Svd {
        /// Rank of the result.
        rank: Option<usize>,
    },
}

/// LoRA's `add_weighted_adapter` (`use peft_lora::WeightedAdapters` to call it on a
/// [`LoraModel`]).
pub trait WeightedAdapters {
    /// Add adapter `name` equal to `Σ weights[i] · ΔW(adapters[i])` on every layer that has any
    /// of `adapters`. The result has scaling 1 (`r = lora_alpha`, rsLoRA off), whatever the
    /// sources used, so it is exact for `Cat` (PEFT 0.21.2 gives rsLoRA sources a `√r` scale by
    /// mistake). It starts inactive.
    ///
    /// # Errors
    /// Unknown or DoRA sources, mismatched lengths, or a taken name.
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        combination: Combination,
    ) -> Result<()>;
}

impl<M: burn::module::Module> WeightedAdapters for LoraModel<M> {
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        combination: Combination,
    ) -> Result<()> {
        if adapters.is_empty() || adapters.len() != weights.len() {
            return Err(PeftError::InvalidConfig {
                field: "weights".into(),
                reason: format!(
                    "{} adapters and {} weights; give one weight per adapter",
                    adapters.len(),
                    weights.len()
                ),
            });
        }
        if self.adapters().contains_key(name) {
            return Err(PeftError::DuplicateAdapter { name: name.into() });
        }
        for a in adapters {
            let entry = self
                .adapters()
                .get(*a)
                .ok_or_else(|| PeftError::UnknownAdapter {
                    name: (*a).into(),
                    available: self.adapters().keys().cloned().collect(),
                })?;
            if entry.config.use_dora {
                return Err(PeftError::Unsupported(format!(
                    "add_weighted_adapter cannot combine the DoRA adapter `{a}`"
                )));
            }
        }
        let sources: Vec<(String, f64)> = adapters
            .iter()
            .zip(weights)
            .map(|(a, w)| (a.to_string(), *w))
            .collect();
        let per_layer = hosts::collect(self.model(), move |h: &HostView<'_, LoraAdapter>| {
            let parts: Vec<(f64, LoraAdapter)> = sources
                .iter()
                .filter_map(|(a, w)| h.slot.get(a).map(|ad| (*w, ad.clone())))
                .collect();
            (!parts.is_empty()).then(|| (h.path.clone(), h.kind, parts))
        });
        let mut factors = BTreeMap::new();
        let mut new_rank = 0;
        for (path, kind, parts) in per_layer {
            let (a, b) = combine(&parts, combination);
            new_rank = new_rank.max(a.dims()[1]);
            factors.insert(path, (kind, a, b));
        }
        let first = &self.adapters()[adapters[0]].config;
        let mut config = LoraConfig {
            r: new_rank,
            lora_alpha: new_rank as f64,
            use_rslora: false,
            rank_pattern: Default::default(),
            alpha_pattern: Default::default(),
            base: PeftConfigBase {
                target_modules: Some(ModuleSelector::names(factors.keys().cloned())),
                layers_to_transform: None,
                layers_pattern: None,
                modules_to_save: None,
                bias: peft_core::BiasMode::None,
                ..first.base.clone()
            },
            ..first.clone()
        };
        // Layers whose combined rank differs from the largest get their own rank.
        for (path, (_, a, _)) in &factors {
            if a.dims()[1] != new_rank {
                config = config.with_rank_pattern(path, a.dims()[1]);
                config = config.with_alpha_pattern(path, a.dims()[1] as f64);
            }
        }
        let dropout = config.lora_dropout;
        self.add_adapter_with(name, config, move |info| {
            let (_, a, b) = factors
                .get(&info.candidate.path)
                .cloned()
                .expect("selected layer has factors");
            Ok(Created {
                adapter: LoraAdapter {
                    lora_a: Param::from_tensor(a),
                    lora_b: Param::from_tensor(b),
                    magnitude: None,
                    dropout: DropoutConfig::new(dropout).init(),
                    scale: 1.0,
                },
                new_base: None,
            })
        })
    }
}

fn combine(parts: &[(f64, LoraAdapter)], combination: Combination) -> (Tensor<2>, Tensor<2>) {
    match combination {
        Combination::Cat => {
            let a = parts
                .iter()
                .map(|(w, ad)| ad.lora_a.val() * (w * ad.scale))
                .collect();
            let b = parts.iter().map(|(_, ad)| ad.lora_b.val()).collect();
            (Tensor::cat(a, 1), Tensor::cat(b, 0))
        }
        Combination::Svd { rank } => {
            let delta = parts
                .iter()
                .map(|(w, ad)| ad.delta() * *w)
                .reduce(|x, y| x + y)
                .expect("at least one part")
                .detach();
            let [rows, cols] = delta.dims();
            let k = rank
                .unwrap_or_else(|| parts.iter().map(|(_, ad)| ad.rank()).max().unwrap_or(1))
                .min(rows.min(cols));
            let (u, s, vt) = crate::adapter::svd(delta);
            let a = u.narrow(1, 0, k);
            let b = vt.narrow(0, 0, k) * s.narrow(0, 0, k).unsqueeze_dim::<2>(1);
            (a, b)
        }
    }
}
