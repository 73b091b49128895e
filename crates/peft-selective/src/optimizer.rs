//! The selective optimizer: any burn [`Optimizer`] applied to the chosen entries only.
//!
//! The chosen entries of every parameter are gathered, in parameter order, into one flat vector;
//! the wrapped optimizer steps that vector with its gradient; the results are scattered back with
//! an assigning `select_assign`. Unchosen entries are never read into the update, so they stay
//! bit-identical whatever the optimizer does (weight decay and momentum included), and the
//! optimizer's state has one value per chosen entry: `O(budget)`, not `O(model)`.
//!
//! When ID3 unmasks entries, the state of the new entries starts at zero, which is exactly the
//! state a dense optimizer holds for an entry whose gradient was masked to zero so far (Adam's
//! moments, SGD's momentum). The step counter inside the state (Adam's bias correction) counts
//! optimizer steps since the first one, as in the toolkit's dense masked AdamW.
//!
//! Weight decay: the toolkit forces the wrapped optimizer's `weight_decay` to 0, and so do we by
//! default: the wrapped optimizer is handed `0` as the parameter value and its result (the update
//! alone) is added to the chosen values, which removes any decay term for every burn optimizer
//! whose update depends on the parameter only through an additive weight decay (SGD, Adam, AdamW,
//! RMSProp, AdaGrad, Lion). LAMB and Adafactor scale their step by the parameter's norm, and
//! Adan's default (proximal) decay divides the whole update: set their decay to 0 yourself and
//! use them with [`decay_chosen`](crate::SelectiveConfig::decay_chosen) on (then the optimizer
//! sees the chosen values; unchosen entries never move in either mode).
//!
//! Differences from the toolkit, on purpose:
//! * state is `O(budget)` instead of dense;
//! * ties in ID3 and PaFI are broken deterministically (parameter order, then row-major index);
//! * ID3 counts its steps and never unmasks beyond the budget.
//!
//! ID3's selection (during its `max_steps` unmasking steps) and PaFI's (once, at construction)
//! read the scores of the candidate parameters to the host and pick the global top-`u` there in
//! linear time; that transfer is transient, nothing of the model's size is kept.
//!
//! Gradient clipping is not applied by the wrapper; clip the gradients before
//! [`step`](SelectiveOptimizer::step) if you need it.

use std::collections::{HashMap, HashSet};

use burn::module::Module;
use burn::optim::{GradientsParams, LearningRate, Optimizer};
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

use crate::config::{Selection, SelectiveConfig};
use crate::error::{Result, SelectiveError};
use crate::flat_state;
use crate::format::index_tensor;
use crate::params::{self, Snapshot};
use crate::schedule::UnmaskSchedule;
use crate::select::{self, global_top};

/// One trainable parameter the optimizer knows.
#[derive(Clone)]
pub(crate) struct Tracked {
    pub path: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    /// Trained in full (a `choose_all` group, or a BitFit bias).
    pub full: bool,
    /// Chosen flat indices in the order they were chosen (empty when `full`).
    pub chosen: Vec<i64>,
    /// Device copy of `chosen`.
    pub index: Option<Tensor<1, Int>>,
    /// The value before training (`verify` only).
    pub initial: Option<Tensor<1>>,
}

impl Tracked {
    /// Entries of this parameter in the optimizer's state vector.
    pub fn count(&self) -> usize {
        if self.full {
            self.numel
        } else {
            self.chosen.len()
        }
    }
}

/// Entries and bytes the selective optimizer keeps for the chosen set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryReport {
    /// Values in the wrapped optimizer's state (e.g. `2 × chosen` for AdamW).
    pub state_entries: usize,
    /// Bytes of that state.
    pub state_bytes: usize,
    /// Chosen-entry indices kept (entries of fully trained parameters need none).
    pub index_entries: usize,
}

/// A burn optimizer that updates only a budgeted selection of the model's entries.
///
/// # Example
/// ```
/// use burn::nn::LinearConfig;
/// use burn::optim::{AdamWConfig, GradientsParams};
/// use burn::tensor::{Device, Tensor};
/// use peft_selective::{SelectiveConfig, SelectiveOptimizer};
///
/// let device = Device::flex().autodiff();
/// let model = LinearConfig::new(4, 3).init(&device);
/// let config = SelectiveConfig::id3(5, 2);
/// let mut optim = SelectiveOptimizer::new(&model, config, AdamWConfig::new().build())?;
/// let x = Tensor::<2>::ones([2, 4], &device);
/// let loss = model.forward(x).powi_scalar(2).mean();
/// let grads = GradientsParams::from_grads(loss.backward(), &model);
/// let model = optim.step(1e-2, model, grads)?;
/// assert_eq!(optim.budget_used(), 3); // u(0) = 5/2 + 1
/// # let _ = model;
/// # Ok::<(), peft_selective::SelectiveError>(())
/// ```
pub struct SelectiveOptimizer<O: Optimizer> {
    pub(crate) inner: O,
    pub(crate) config: SelectiveConfig,
    pub(crate) budget: usize,
    pub(crate) fixed: usize,
    pub(crate) params: Vec<Tracked>,
    pub(crate) lookup: HashMap<String, usize>,
    pub(crate) state: Option<O::State<1>>,
    pub(crate) step: usize,
    pub(crate) device: Device,
    pub(crate) pending: Option<GradientsParams>,
}

impl<O: Optimizer> std::fmt::Debug for SelectiveOptimizer<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectiveOptimizer")
            .field("method", &self.config.method)
            .field("budget", &self.budget)
            .field("used", &self.budget_used())
            .field("step", &self.step)
            .finish()
    }
}

impl<O: Optimizer> SelectiveOptimizer<O> {
    /// Build the optimizer for `model`: find the trainable parameters, check the budget, and make
    /// the initial selection (PaFI's smallest magnitudes, BitFit's biases, `choose_all` groups).
    ///
    /// The model is not changed; parameters stay trainable and simply are not updated outside
    /// the selection (see [`freeze_unselected`](Self::freeze_unselected) to save their gradients).
    ///
    /// # Errors
    /// An invalid config, a budget of 0 or larger than the trainable entries, `choose_all`
    /// groups that match nothing or exceed the budget, BitFit without any candidate;
    /// [`SelectiveError::PackedBase`] for a model whose base is kept packed.
    pub fn new<M: Module>(model: &M, config: SelectiveConfig, inner: O) -> Result<Self> {
        config.validate()?;
        let packed = peft_core::hosts::packed_paths(model);
        if !packed.is_empty() {
            return Err(SelectiveError::PackedBase { layers: packed });
        }
        let inventory = params::inventory(model);
        let trainable: Vec<&params::ParamInfo> =
            inventory.iter().filter(|p| p.require_grad).collect();
        let available_paths = || trainable.iter().map(|p| p.path.clone()).collect::<Vec<_>>();
        let mut full: Vec<bool> = vec![false; trainable.len()];
        for group in &config.choose_all {
            let mut any = false;
            for (i, p) in trainable.iter().enumerate() {
                if group.matches(&p.id, Some(&p.path)) {
                    full[i] = true;
                    any = true;
                }
            }
            if !any {
                return Err(SelectiveError::GroupMatchesNothing {
                    group: format!("{group:?}"),
                    available: available_paths(),
                });
            }
        }
        let available: usize = trainable.iter().map(|p| numel(&p.shape)).sum();
        let fixed: usize = trainable
            .iter()
            .zip(&full)
            .filter(|(_, f)| **f)
            .map(|(p, _)| numel(&p.shape))
            .sum();
        if let Some(budget) = config.budget
            && fixed > budget
        {
            let paths: Vec<&str> = trainable
                .iter()
                .zip(&full)
                .filter(|(_, f)| **f)
                .map(|(p, _)| p.path.as_str())
                .collect();
            return Err(SelectiveError::BudgetTooSmall {
                budget,
                needed: fixed,
                paths: paths.join(", "),
            });
        }
        // BitFit: the candidates in model order, whole while the budget allows; the one at the
        // boundary keeps its first entries (the toolkit's `mask[:remaining]`), later ones none.
        let mut partial: Vec<(usize, Vec<i64>)> = Vec::new();
        if let Selection::BitFit { bias_only } = config.method {
            let mut remaining = config.budget.map(|b| b - fixed);
            let mut any = false;
            for (i, p) in trainable.iter().enumerate() {
                let bias = p.path == "bias" || p.path.ends_with(".bias");
                if full[i] || !(if bias_only { bias } else { p.shape.len() == 1 }) {
                    continue;
                }
                any = true;
                let n = numel(&p.shape);
                match &mut remaining {
                    None => full[i] = true,
                    Some(left) if n <= *left => {
                        full[i] = true;
                        *left -= n;
                    }
                    Some(left) => {
                        if *left > 0 {
                            partial.push((i, (0..*left as i64).collect()));
                        }
                        *left = 0;
                    }
                }
            }
            if !any {
                return Err(SelectiveError::NothingSelected {
                    bias_only,
                    available: available_paths(),
                });
            }
        }
        let fixed: usize = trainable
            .iter()
            .zip(&full)
            .filter(|(_, f)| **f)
            .map(|(p, _)| numel(&p.shape))
            .sum::<usize>()
            + partial.iter().map(|(_, c)| c.len()).sum::<usize>();
        let budget = config.budget.unwrap_or(fixed);
        // BitFit's budget is a cap, as in the toolkit: one above the model's size only means
        // that every candidate fits.
        let bitfit = matches!(config.method, Selection::BitFit { .. });
        if budget > available && !bitfit {
            return Err(SelectiveError::BudgetTooLarge { budget, available });
        }
        let params: Vec<Tracked> = trainable
            .iter()
            .zip(&full)
            .map(|(p, f)| Tracked {
                path: p.path.clone(),
                shape: p.shape.clone(),
                numel: numel(&p.shape),
                full: *f,
                chosen: Vec::new(),
                index: None,
                initial: None,
            })
            .collect();
        let lookup: HashMap<String, usize> = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.path.clone(), i))
            .collect();
        let snaps = params::snapshots(model, &lookup, None);
        let device = snapshot(&snaps, 0).value.device().without_autodiff();
        let mut this = Self {
            inner,
            config,
            budget,
            fixed,
            params,
            lookup,
            state: None,
            step: 0,
            device,
            pending: None,
        };
        this.add_chosen(partial)?;
        if this.config.method == Selection::Pafi {
            let scores = this
                .candidates()
                .map(|i| (i, snapshot(&snaps, i).value.clone().abs().neg()))
                .collect();
            let picked = global_top(scores, budget - fixed);
            this.add_chosen(picked)?;
        }
        if this.config.verify {
            for (i, p) in this.params.iter_mut().enumerate() {
                p.initial = Some(snapshot(&snaps, i).value.clone());
            }
        }
        Ok(this)
    }

    /// Tracked parameters that take part in the entry selection (not trained in full).
    fn candidates(&self) -> impl Iterator<Item = usize> + '_ {
        self.params
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.full)
            .map(|(i, _)| i)
    }

    /// One optimizer step on the chosen entries; ID3 first unmasks this step's entries from
    /// `grads`. Returns the updated model.
    ///
    /// A parameter with chosen entries but no gradient (unused by the loss) is stepped with a
    /// zero gradient, as part of the one state vector of all chosen entries.
    ///
    /// # Errors
    /// A tracked parameter is missing from `model`; with `verify`, the budget is exceeded or an
    /// unchosen entry changed (the model is then dropped: this is a bug to report).
    pub fn step<M: Module>(
        &mut self,
        lr: LearningRate,
        model: M,
        grads: GradientsParams,
    ) -> Result<M> {
        let snaps = params::snapshots(&model, &self.lookup, Some(&grads));
        drop(grads);
        for (i, s) in snaps.iter().enumerate() {
            if s.is_none() {
                return Err(SelectiveError::UnknownParameter {
                    path: self.params[i].path.clone(),
                });
            }
        }
        self.unmask(&snaps)?;
        let values = self.update(lr, &snaps);
        let model = params::write(model, &self.lookup, values);
        if self.config.verify {
            self.verify(&model)?;
        }
        self.step += 1;
        Ok(model)
    }

    /// ID3: choose this step's entries from the D3 metric of the current gradients.
    fn unmask(&mut self, snaps: &[Option<Snapshot>]) -> Result<()> {
        let Selection::Id3(c) = &self.config.method else {
            return Ok(());
        };
        let schedule = UnmaskSchedule::new(self.budget - self.fixed, c.max_steps);
        let quota = schedule.quota(self.step, self.budget_used() - self.fixed);
        if quota == 0 {
            return Ok(());
        }
        let (eps, exp) = (c.eps, c.exp);
        let mut scores = Vec::new();
        for i in self.candidates() {
            let s = snapshot(snaps, i);
            let Some(g) = &s.grad else { continue };
            let mut d3 = g.clone().abs();
            if exp != 0.0 {
                let denom = s.value.clone().abs().add_scalar(eps);
                let denom = if exp == 1.0 {
                    denom
                } else {
                    denom.powf_scalar(exp)
                };
                d3 = d3.div(denom);
            }
            if let Some(idx) = &self.params[i].index {
                let n = self.params[i].chosen.len();
                let fill = Tensor::<1>::full([n], f32::NEG_INFINITY, &self.device);
                d3 = d3.select_assign(0, idx.clone(), fill, IndexingUpdateOp::Assign);
            }
            scores.push((i, d3));
        }
        let picked = global_top(scores, quota);
        self.add_chosen(picked)
    }

    /// Append newly chosen entries, extending the optimizer state with zeros for them.
    pub(crate) fn add_chosen(&mut self, picked: Vec<(usize, Vec<i64>)>) -> Result<()> {
        if picked.is_empty() {
            return Ok(());
        }
        let old: Vec<usize> = self.params.iter().map(Tracked::count).collect();
        for (i, new) in picked {
            let p = &mut self.params[i];
            p.chosen.extend(new);
            p.index = Some(index_tensor(&p.chosen, &self.device));
        }
        if let Some(s) = self.state.take() {
            let new: Vec<usize> = self.params.iter().map(Tracked::count).collect();
            self.state = Some(flat_state::grow::<O>(s, &old, &new, &self.device)?);
        }
        Ok(())
    }

    /// Gather, step and scatter. Returns the new flat value of every parameter that changed.
    fn update(&mut self, lr: LearningRate, snaps: &[Option<Snapshot>]) -> Vec<Option<Tensor<1>>> {
        let mut out: Vec<Option<Tensor<1>>> = (0..self.params.len()).map(|_| None).collect();
        let active: Vec<usize> = (0..self.params.len())
            .filter(|&i| self.params[i].count() > 0)
            .collect();
        if active.is_empty() {
            return out;
        }
        let mut values = Vec::with_capacity(active.len());
        let mut grads = Vec::with_capacity(active.len());
        for &i in &active {
            let p = &self.params[i];
            let s = snapshot(snaps, i);
            let gather = |t: Tensor<1>| match &p.index {
                Some(idx) if !p.full => t.select(0, idx.clone()),
                _ => t,
            };
            values.push(gather(s.value.clone()));
            grads.push(match &s.grad {
                Some(g) => gather(g.clone()),
                None => Tensor::zeros([p.count()], &self.device),
            });
        }
        let values = Tensor::cat(values, 0);
        let grads = Tensor::cat(grads, 0);
        let state = self.state.take().map(|s| O::to_device(s, &self.device));
        let (values, state) = if self.config.decay_chosen {
            self.inner.step::<1>(lr, values, grads, state)
        } else {
            // The toolkit's `weight_decay = 0`: the wrapped optimizer steps the chosen entries
            // from 0, so a decay term (a multiple of the parameter) vanishes and its result is
            // the update alone, added back; `θ + (0 − u)` is `θ − u` bit for bit.
            let zeros = values.zeros_like();
            let (update, state) = self.inner.step::<1>(lr, zeros, grads, state);
            (values + update, state)
        };
        self.state = state;
        let mut offset = 0;
        for &i in &active {
            let p = &self.params[i];
            let n = p.count();
            let piece = values.clone().slice(offset..offset + n);
            offset += n;
            out[i] = Some(match &p.index {
                Some(idx) if !p.full => snapshot(snaps, i).value.clone().select_assign(
                    0,
                    idx.clone(),
                    piece,
                    IndexingUpdateOp::Assign,
                ),
                _ => piece,
            });
        }
        out
    }

    /// Check the budget and that every unchosen entry still has its initial value.
    fn verify<M: Module>(&self, model: &M) -> Result<()> {
        let used = self.budget_used();
        if used > self.budget {
            return Err(SelectiveError::BudgetExceeded {
                step: self.step,
                used,
                budget: self.budget,
            });
        }
        let snaps = params::snapshots(model, &self.lookup, None);
        for (i, p) in self.params.iter().enumerate() {
            let (Some(initial), false) = (&p.initial, p.full) else {
                continue;
            };
            let now = snapshot(&snaps, i).value.clone();
            let both_nan = now.clone().is_nan().bool_and(initial.clone().is_nan());
            let changed = now
                .clone()
                .not_equal(initial.clone())
                .bool_and(both_nan.bool_not());
            let changed = select::positions(changed);
            if changed.is_empty() {
                continue;
            }
            let chosen: HashSet<i64> = p.chosen.iter().copied().collect();
            if let Some(&index) = changed.iter().find(|j| !chosen.contains(j)) {
                let at = |t: &Tensor<1>| {
                    let j = index as usize;
                    t.clone().slice(j..j + 1).into_scalar::<f32>()
                };
                return Err(SelectiveError::UnchosenEntryChanged {
                    step: self.step,
                    path: p.path.clone(),
                    index: index as usize,
                    before: at(initial),
                    after: at(&now),
                });
            }
        }
        Ok(())
    }

    /// The selection method.
    pub fn method(&self) -> &Selection {
        &self.config.method
    }

    /// The configuration.
    pub fn config(&self) -> &SelectiveConfig {
        &self.config
    }

    /// The budget: the most entries that will ever be chosen (for BitFit without a budget, the
    /// number of its candidates' entries).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Entries chosen now, fully trained parameters included.
    pub fn budget_used(&self) -> usize {
        self.params.iter().map(Tracked::count).sum()
    }

    /// Index of the next step (the number of steps taken).
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// Paths of the parameters the optimizer tracks (the model's trainable float parameters at
    /// construction), in model order.
    pub fn paths(&self) -> Vec<String> {
        self.params.iter().map(|p| p.path.clone()).collect()
    }

    /// The chosen flat (row-major) indices of the parameter at `path`, ascending; `None` for a
    /// path the optimizer does not track.
    pub fn chosen(&self, path: &str) -> Option<Vec<usize>> {
        let p = &self.params[*self.lookup.get(path)?];
        Some(if p.full {
            (0..p.numel).collect()
        } else {
            let mut v: Vec<usize> = p.chosen.iter().map(|&j| j as usize).collect();
            v.sort_unstable();
            v
        })
    }

    /// Whether the parameter at `path` is trained in full (`choose_all`, BitFit).
    pub fn is_full(&self, path: &str) -> bool {
        self.lookup.get(path).is_some_and(|&i| self.params[i].full)
    }

    /// Exact memory the selection costs: the wrapped optimizer's state and the indices.
    pub fn memory(&self) -> MemoryReport {
        let (state_entries, state_bytes) = self
            .state
            .as_ref()
            .map(flat_state::size::<O>)
            .unwrap_or((0, 0));
        MemoryReport {
            state_entries,
            state_bytes,
            index_entries: self
                .params
                .iter()
                .filter(|p| !p.full)
                .map(|p| p.chosen.len())
                .sum(),
        }
    }

    /// A copy of `model` where only parameters with chosen entries keep `require_grad`, so the
    /// backward pass computes no gradient for the others (PaFI and BitFit after construction,
    /// ID3 once its budget is chosen). The optimizer keeps working on the copy;
    /// [`restore_trainability`](Self::restore_trainability) undoes it.
    pub fn freeze_unselected<M: Module>(&self, model: M) -> M {
        peft_core::hosts::set_trainable(model, |path| {
            self.lookup.get(path).map(|&i| self.params[i].count() > 0)
        })
    }

    /// Make every tracked parameter trainable again (undoes
    /// [`freeze_unselected`](Self::freeze_unselected)).
    pub fn restore_trainability<M: Module>(&self, model: M) -> M {
        peft_core::hosts::set_trainable(model, |path| self.lookup.get(path).map(|_| true))
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn snapshot(snaps: &[Option<Snapshot>], i: usize) -> &Snapshot {
    snaps[i]
        .as_ref()
        .expect("snapshots of tracked parameters are checked before use")
}
