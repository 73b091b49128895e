//! The rank allocator and the orthogonality regularizer, run by peft-core's training step.
//!
//! [`RankAllocator`] is a [`Controller`]: before the optimizer step it adds the gradient of
//! `orth_reg_weight · R` to the adapter gradients (so the regularizer cannot be forgotten, and
//! it works the same inside burn-train's `Learner`) and keeps the gradients; after the step it
//! updates the importance EMAs with the new parameters and those gradients, and masks singular
//! values to the budget, exactly as PEFT's `update_and_allocate(global_step)` does when called
//! after `optimizer.step()` (with the gradients clipped as the optimizer clips them when the
//! config carries its `grad_clipping`). After every step of [`Stepper::train`](peft_core::Stepper::train)
//! it writes the current rank pattern into the adapter's config, so a save at any point
//! truncates to it as PEFT does.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use peft_core::error::{PeftError, Result};
use peft_core::hosts::{self, HostView};
use peft_core::method::set_param;
use peft_core::step::{Controller, StepInfo};
use serde::{Deserialize, Serialize};

use crate::adapter::AdaLoraAdapter;
use crate::config::AdaLoraConfig;

/// The budget at step `t` and whether to mask then (PEFT's `budget_schedule`).
///
/// `init_bgt = init_r · M` and `target_bgt = target_r · M` for `M` adapted matrices, or
/// loralib's `target_total_rank` when set. A target at or above `init_bgt` never masks
/// anything (see `mask_to_budget`).
pub fn budget_schedule(config: &AdaLoraConfig, matrices: usize, t: usize) -> (usize, bool) {
    let init_bgt = config.init_r * matrices;
    let target_bgt = config.target_budget(matrices);
    let total = config.total_steps();
    let (tinit, tfinal) = (config.tinit, config.tfinal);
    if t <= tinit {
        (init_bgt, false)
    } else if t + tfinal > total {
        (target_bgt, true)
    } else {
        let mul = 1.0 - (t - tinit) as f64 / (total - tfinal - tinit) as f64;
        let (init, target) = (init_bgt as f64, target_bgt as f64);
        let b = ((init - target) * mul.powf(3.0) + target) as usize;
        (b, t.is_multiple_of(config.delta_t))
    }
}

/// Importance EMAs of one matrix's parameters, in PEFT's layout (row-major `A (r, in)`,
/// `E (r)`, `B (out, r)`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Ema {
    ipt: Vec<f32>,
    unc: Vec<f32>,
}

impl Ema {
    /// `Ī ← β1·Ī + (1−β1)·I`, `Ū ← β2·Ū + (1−β2)·|I − Ī|` with `I = |p ⊙ g|`.
    fn update(&mut self, p: &[f32], g: &[f32], beta1: f64, beta2: f64) {
        if self.ipt.len() != p.len() {
            self.ipt = vec![0.0; p.len()];
            self.unc = vec![0.0; p.len()];
        }
        let (b1, c1) = (beta1 as f32, (1.0 - beta1) as f32);
        let (b2, c2) = (beta2 as f32, (1.0 - beta2) as f32);
        for i in 0..p.len() {
            let ipt = (p[i] * g[i]).abs();
            self.ipt[i] = b1 * self.ipt[i] + c1 * ipt;
            self.unc[i] = b2 * self.unc[i] + c2 * (ipt - self.ipt[i]).abs();
        }
    }

    fn score(&self, i: usize) -> f32 {
        self.ipt[i] * self.unc[i]
    }
}

/// The allocator's state for one adapted matrix.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Matrix {
    a: Ema,
    e: Ema,
    b: Ema,
}

/// The allocator state saved with a checkpoint (see [`RankAllocator::state`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocatorState {
    /// Importance EMAs per layer path.
    ema: BTreeMap<String, Matrix>,
    /// The current rank pattern (kept triplets per layer path).
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    /// The threshold of the last masking step.
    pub threshold: Option<f32>,
}

/// AdaLoRA's rank allocator and orthogonality regularizer for adapter `adapter`.
pub struct RankAllocator {
    config: AdaLoraConfig,
    adapter: String,
    state: AllocatorState,
    /// The gradients of `A`, `E`, `B` per layer path seen before the optimizer step (PEFT
    /// layout), while the importance scores are still being updated.
    grads: BTreeMap<String, [Vec<f32>; 3]>,
}

impl std::fmt::Debug for RankAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankAllocator")
            .field("adapter", &self.adapter)
            .field("rank_pattern", &self.state.rank_pattern)
            .finish_non_exhaustive()
    }
}

/// `(path, adapter)` of every layer carrying adapter `name`.
fn layers<M: Module>(model: &M, name: &str) -> Vec<(String, AdaLoraAdapter)> {
    let name = name.to_string();
    hosts::collect(model, move |h: &HostView<'_, AdaLoraAdapter>| {
        h.slot.get(&name).map(|a| (h.path.clone(), a.clone()))
    })
}

/// A float tensor's values, row-major, on the host.
pub(crate) fn host_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("float tensor")
}

/// `‖C − I‖_F` for the `r × r` Gram matrix `C`, with a zero gradient where it is 0.
fn gram_distance(c: Tensor<2>) -> Tensor<1> {
    let r = c.dims()[0];
    let eye = Tensor::<2>::eye(r, &c.device());
    ((c - eye).powi_scalar(2).sum() + 1e-24).sqrt()
}

/// PEFT's orthogonality regularizer of adapter `name`:
/// `R = (1/N) Σ ‖AAᵀ − I‖_F + ‖BᵀB − I‖_F` over its `N` factor matrices (PyTorch layout).
pub fn orthogonality<M: Module>(model: &M, name: &str) -> Option<Tensor<1>> {
    orthogonality_of(&layers(model, name))
}

fn orthogonality_of(adapters: &[(String, AdaLoraAdapter)]) -> Option<Tensor<1>> {
    let mut terms = Vec::new();
    for (_, a) in adapters {
        if a.rank() == 0 {
            continue;
        }
        let pa = a.lora_a.val();
        let pb = a.lora_b.val();
        terms.push(gram_distance(pa.clone().transpose().matmul(pa)));
        terms.push(gram_distance(pb.clone().matmul(pb.transpose())));
    }
    let n = terms.len();
    terms
        .into_iter()
        .reduce(|x, y| x + y)
        .map(|sum| sum / n as f64)
}

impl RankAllocator {
    /// The allocator of adapter `adapter` configured by `config`.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(config: &AdaLoraConfig, adapter: &str) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config: config.clone(),
            adapter: adapter.into(),
            state: AllocatorState::default(),
            grads: BTreeMap::new(),
        })
    }

    /// The current rank pattern (`None` before the first masking step).
    pub fn rank_pattern(&self) -> Option<&BTreeMap<String, Vec<bool>>> {
        self.state.rank_pattern.as_ref()
    }

    /// Write the current rank pattern into adapter `name`'s config of `peft`, so that
    /// [`save_pretrained`](peft_core::PeftModel::save_pretrained) truncates to it as PEFT does.
    ///
    /// # Errors
    /// An unknown adapter.
    pub fn write_rank_pattern<M: Module>(
        &self,
        peft: &mut peft_core::PeftModel<M, AdaLoraConfig>,
    ) -> Result<()> {
        peft.config_mut(&self.adapter)?.rank_pattern = self.state.rank_pattern.clone();
        Ok(())
    }

    /// The state to save with a checkpoint.
    pub fn state(&self) -> &AllocatorState {
        &self.state
    }

    /// Restore a saved state (resume).
    pub fn set_state(&mut self, state: AllocatorState) {
        self.state = state;
    }

    /// The state as JSON (checkpoint files).
    pub fn state_json(&self) -> String {
        serde_json::to_string(&self.state).expect("the state serializes")
    }

    /// Restore the state from [`state_json`](Self::state_json).
    ///
    /// # Errors
    /// Malformed JSON.
    pub fn load_state_json(&mut self, json: &str) -> Result<()> {
        self.state = parse_state(json, "allocator state".into())?;
        Ok(())
    }

    /// Save the state to `path` (JSON), atomically: a failed write leaves an older file intact.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_state(&self, path: &std::path::Path) -> Result<()> {
        peft_core::hf::write_atomic(path, self.state_json().as_bytes())
    }

    /// Load a state saved by [`save_state`](Self::save_state); on error nothing changes.
    ///
    /// # Errors
    /// I/O errors or a malformed file (named in the error).
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
            path: path.into(),
            source,
        })?;
        self.state = parse_state(&text, path.into())?;
        Ok(())
    }

    fn update_ipt(&mut self, current: &[(String, AdaLoraAdapter)]) {
        for (path, a) in current {
            let Some([ga, ge, gb]) = self.grads.get(path) else {
                continue;
            };
            let m = self.state.ema.entry(path.clone()).or_default();
            let (b1, b2) = (self.config.beta1, self.config.beta2);
            m.a.update(&host_vec(a.lora_a.val().transpose()), ga, b1, b2);
            m.e.update(&host_vec(a.lora_e.val()), ge, b1, b2);
            m.b.update(&host_vec(a.lora_b.val().transpose()), gb, b1, b2);
        }
    }

    /// Triplet scores `S[i] = S_E[i] + (mean_j S_A[i,j] + mean_k S_B[k,i])` of every matrix.
    fn triplet_scores(&self, current: &[(String, AdaLoraAdapter)]) -> Vec<(String, Vec<f32>)> {
        current
            .iter()
            .map(|(path, a)| {
                let r = a.rank();
                let [rows, _] = a.lora_a.shape().dims();
                let [_, cols] = a.lora_b.shape().dims();
                let scores = match self.state.ema.get(path) {
                    None => vec![0.0; r],
                    Some(m) if m.e.ipt.len() != r => vec![0.0; r],
                    Some(m) => (0..r)
                        .map(|i| {
                            let sa: f32 = (0..rows).map(|j| m.a.score(i * rows + j)).sum::<f32>()
                                / rows as f32;
                            let sb: f32 =
                                (0..cols).map(|k| m.b.score(k * r + i)).sum::<f32>() / cols as f32;
                            m.e.score(i) + (sa + sb)
                        })
                        .collect(),
                };
                (path.clone(), scores)
            })
            .collect()
    }

    /// Mask to budget `b`: the `init_bgt − b` lowest triplets (and any tied with the k-th)
    /// are zeroed.
    ///
    /// Edge cases, defined here where PEFT crashes or is silent: with `b >= init_bgt` (a budget
    /// that does not shrink, e.g. `init_r == target_r`) nothing is masked and the pattern keeps
    /// every triplet (PEFT's `kthvalue` fails); when every score is zero (no gradient reached the
    /// adapter yet), the threshold is 0 and every triplet is masked, as in PEFT (`<=`).
    fn mask_to_budget(&mut self, current: &[(String, AdaLoraAdapter)], budget: usize) {
        let scores = self.triplet_scores(current);
        let mut all: Vec<f32> = scores.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        let k = all.len().saturating_sub(budget);
        let pattern = if k == 0 {
            self.state.threshold = None;
            scores
                .into_iter()
                .map(|(p, s)| (p, vec![true; s.len()]))
                .collect()
        } else {
            all.sort_by(f32::total_cmp);
            let threshold = all[k - 1];
            self.state.threshold = Some(threshold);
            scores
                .into_iter()
                .map(|(p, s)| (p, s.iter().map(|v| *v > threshold).collect()))
                .collect()
        };
        self.state.rank_pattern = Some(pattern);
    }

    /// Zero the singular values that the rank pattern drops.
    fn apply_pattern<M: Module>(&self, mut model: M) -> Result<M> {
        let Some(pattern) = self.state.rank_pattern.clone() else {
            return Ok(model);
        };
        let name = self.adapter.clone();
        hosts::for_each(&mut model, move |host: HostView<'_, AdaLoraAdapter>| {
            let Some(keep) = pattern.get(&host.path).cloned() else {
                return Ok(());
            };
            let Some(a) = host.slot.get_mut(&name) else {
                return Ok(());
            };
            if keep.len() != a.rank() {
                return Ok(());
            }
            // A fresh leaf with the dropped values at zero (in place, as PEFT's `masked_fill_`).
            let values: Vec<f32> = host_vec(a.lora_e.val())
                .into_iter()
                .zip(&keep)
                .map(|(v, k)| if *k { v } else { 0.0 })
                .collect();
            let masked =
                Tensor::<1>::from_data(TensorData::new(values, [keep.len()]), &a.lora_e.device());
            a.lora_e = set_param(&a.lora_e, masked);
            Ok(())
        })?;
        Ok(model)
    }
}

const STATE_FILE: &str = "adalora_allocator.json";

impl<M: Module> Controller<M> for RankAllocator {
    fn adapter(&self) -> Option<String> {
        Some(self.adapter.clone())
    }

    fn update_config(&self, config: &mut dyn std::any::Any) {
        if let Some(config) = config.downcast_mut::<AdaLoraConfig>()
            && self.state.rank_pattern.is_some()
        {
            config.rank_pattern = self.state.rank_pattern.clone();
        }
    }

    fn save_state(&self, dir: &std::path::Path) -> Result<()> {
        RankAllocator::save_state(self, &dir.join(STATE_FILE))
    }

    fn load_state(&mut self, dir: &std::path::Path, _device: &burn::tensor::Device) -> Result<()> {
        RankAllocator::load_state(self, &dir.join(STATE_FILE))
    }

    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        let current = layers(model, &self.adapter);
        if self.config.orth_reg_weight > 0.0
            && current.iter().any(|(_, a)| a.lora_a.is_require_grad())
            && let Some(reg) = orthogonality_of(&current)
            && reg.device().is_autodiff()
        {
            let reg_grads = (reg * self.config.orth_reg_weight).backward();
            let reg_grads = GradientsParams::from_grads(reg_grads, model);
            for (_, a) in &current {
                for id in [a.lora_a.id, a.lora_b.id] {
                    if let Some(g) = reg_grads.get::<2>(id) {
                        let total = match grads.remove::<2>(id) {
                            Some(existing) => existing + g,
                            None => g,
                        };
                        grads.register(id, total);
                    }
                }
            }
        }
        // The scores use this step's gradients only while they are still updated (t < T - tfinal),
        // clipped per parameter as the optimizer will clip them (burn's `ModuleOptimizer`).
        self.grads.clear();
        if info.step + self.config.tfinal < self.config.total_steps() {
            let clipping = self.config.grad_clipping.as_ref().map(|c| c.init());
            let clip2 = |g: Tensor<2>| match &clipping {
                Some(c) => c.clip_gradient(g),
                None => g,
            };
            let clip1 = |g: Tensor<1>| match &clipping {
                Some(c) => c.clip_gradient(g),
                None => g,
            };
            for (path, a) in &current {
                if let (Some(ga), Some(ge), Some(gb)) = (
                    grads.get::<2>(a.lora_a.id),
                    grads.get::<1>(a.lora_e.id),
                    grads.get::<2>(a.lora_b.id),
                ) {
                    let seen = [
                        host_vec(clip2(ga).transpose()),
                        host_vec(clip1(ge)),
                        host_vec(clip2(gb).transpose()),
                    ];
                    self.grads.insert(path.clone(), seen);
                }
            }
        }
        Ok(())
    }

    fn after_optimizer(&mut self, info: StepInfo, model: M) -> Result<M> {
        let t = info.step;
        let end = self.config.total_steps() - self.config.tfinal;
        let apply = if t < end {
            let current = layers(&model, &self.adapter);
            self.update_ipt(&current);
            let (budget, mask) = budget_schedule(&self.config, current.len(), t);
            if mask {
                self.mask_to_budget(&current, budget);
            }
            mask
        } else {
            if t == end {
                // The forced final mask: it fixes the rank pattern for the rest of training.
                let current = layers(&model, &self.adapter);
                let (budget, _) = budget_schedule(&self.config, current.len(), t);
                self.mask_to_budget(&current, budget);
                self.state.ema.clear();
            }
            true
        };
        self.grads.clear();
        if apply {
            self.apply_pattern(model)
        } else {
            Ok(model)
        }
    }
}

fn parse_state(text: &str, file: std::path::PathBuf) -> Result<AllocatorState> {
    serde_json::from_str(text).map_err(|source| PeftError::Json { file, source })
}
