//! [`SftSelector`]: the SFT optimizer and the drop-and-grow reselection, as a training-step
//! [`Controller`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, TensorData};
use peft_core::error::{PeftError, Result};
use peft_core::hf;
use peft_core::hosts::{self, HostView, Placement};
use peft_core::step::{Controller, StepInfo};
use serde_json::{Map, Value, json};
use sparse_kernels::ProbeSink;

use crate::adapter::{SftAdapter, host_f32};
use crate::config::{SelectionAlgorithm, SftConfig};
use crate::optimizer::{AdamState, SftAdamW, SftOptimizer, SftSm3, Sm3State};
use crate::schedule::SelectionSchedule;
use crate::selection::{Candidates, Replacement, rigl_plan, sm3_plan};

const STATE_JSON: &str = "sft_selector.json";
const STATE_TENSORS: &str = "sft_selector.safetensors";

/// The selector's state of one layer.
#[derive(Clone, Debug, Default)]
struct LayerState {
    adam: Option<AdamState>,
    sm3: Option<Sm3State>,
    candidates: Option<Candidates>,
}

/// What the selector knows of one adapted layer.
struct LayerRef {
    path: String,
    k: usize,
    values: ParamId,
    probe: Option<ParamId>,
    anchor: Option<ParamId>,
    sink: Option<Arc<ProbeSink>>,
    candidates: Option<ParamId>,
}

fn layer_refs<M: Module>(model: &M, adapter: &str) -> Vec<LayerRef> {
    let name = adapter.to_string();
    hosts::collect(model, move |host: &HostView<'_, SftAdapter>| {
        host.slot.get(&name).map(|a| LayerRef {
            path: host.path.clone(),
            k: a.num_deltas(),
            values: a.delta_values.id,
            probe: a.probe.as_ref().map(|p| p.id),
            anchor: a.probe_anchor.as_ref().map(|p| p.id),
            sink: a.probe_sink.clone(),
            candidates: a.candidate_values.as_ref().map(|p| p.id),
        })
    })
}

/// What one reselection did to one layer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectionReport {
    /// The update step after which it ran.
    pub step: usize,
    /// `int(k · p)`.
    pub max_replaced: usize,
    /// Slots that got a new index.
    pub replaced: usize,
}

/// Trains SFT deltas and reselects them, inside the training step (spec §3.4 to §3.7).
///
/// It owns the deltas' optimizer ([`SftAdamW`] for RigL, [`SftSm3`] for SM3, as the reference's
/// `SftTrainer`): `before_optimizer` takes the deltas' gradients out of the
/// [`GradientsParams`] (the module optimizer never sees them and keeps no state for them; it
/// still steps every other trainable parameter: biases, `modules_to_save`; pass
/// [`Sm3Config`](crate::Sm3Config)'s optimizer there to step them as the reference's `SftSM3`
/// does with SM3 selection), and
/// `after_optimizer` updates the deltas at the step's learning rate ([`StepInfo::lr`], the one
/// every other trained value gets), then reselects when the [`SelectionSchedule`] says
/// so, then [`prepare`](Self::prepare)s the next step.
///
/// RigL statistics, per backward pass as the reference's hooks collect them (spec §3.5): the
/// top-`k` of `|dW|` (the weight gradient) of the first micro-batch of a window is the
/// candidate pool, and every micro-batch (every [`Controller::after_backward`]; with gradient
/// accumulation the training loop reports them with
/// [`Stepper::after_backward`](peft_core::step::Stepper::after_backward), as `burn-peft train`
/// and burn-train's runner do) adds one sample of `g` and `g²` at the pool. On the activation path
/// ([`PeftLinear`](peft_core::PeftLinear)) each layer carries a blockwise probe
/// ([`grad_topk_probe`](sparse_kernels::grad_topk_probe)): its backward pass computes `dW` in
/// blocks of rows (see [`set_probe_block`](Self::set_probe_block)) and keeps only the top-`k`,
/// so no dense weight-shaped gradient is ever formed (the reference forms one per layer on
/// every step). On the weight path the layer carries a zero dense probe whose gradient is `dW`
/// (autodiff forms the dense gradient of the reparameterized weight on every step there
/// anyway). On the other steps of the window the pool is sampled by SDDMM through zero
/// candidate values. A grown slot's Adam state is seeded with age `a = c / grad_accum` (`c`
/// samples, `grad_accum` micro-batches per step), as the reference. When a layer runs several
/// times in one graph, the activation path's pool is the top-`k` of the first probe call to
/// reach the backward pass and each call is a sample (the reference's hook fires per call);
/// the weight path's sample is the micro-batch's whole gradient.
///
/// Reselection keeps retained entries' values and optimizer state (they follow their index
/// into the new CSR order), zeroes new entries and seeds their state: RigL as the reference
/// (§3.5); SM3 as the reference (§3.6): the accumulators are kept.
#[derive(Clone, Debug)]
pub struct SftSelector {
    adapter: String,
    algorithm: SelectionAlgorithm,
    schedule: SelectionSchedule,
    optimizer: SftOptimizer,
    probe_block: Option<usize>,
    step: usize,
    /// Micro-batches reported in the current step (the reference's `grad_accumulation_steps`).
    grad_accum: usize,
    layers: BTreeMap<String, LayerState>,
    pending: BTreeMap<String, Vec<f32>>,
    reports: BTreeMap<String, SelectionReport>,
    /// Each layer's delta positions (sorted flat `[out, in]` indices) as last seen or set: part
    /// of the saved state, so a resume onto a freshly initialised model gets them back.
    positions: BTreeMap<String, Vec<u64>>,
    /// Dense probes on the activation path too: under data parallelism the RigL pool must be
    /// the top-`k` of the all-reduced `|dW|`, which only a gradient (the dense probe's) gives.
    dense_probes: bool,
}

impl SftSelector {
    /// A selector for adapter `adapter` configured by `config`, for a run of `total_steps`
    /// update steps, with the reference's default optimizer of the selection algorithm.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(config: &SftConfig, adapter: &str, total_steps: usize) -> Result<Self> {
        let optimizer = match config.selection_algorithm {
            SelectionAlgorithm::Rigl => SftOptimizer::AdamW(SftAdamW::default()),
            SelectionAlgorithm::Sm3 => SftOptimizer::Sm3(SftSm3::default()),
        };
        Self::with_optimizer(config, adapter, total_steps, optimizer)
    }

    /// As [`new`](Self::new), with the optimizer's settings.
    ///
    /// # Errors
    /// An invalid config, or an optimizer that does not fit the selection algorithm (RigL
    /// seeds Adam moments, SM3 growth reads SM3 accumulators).
    pub fn with_optimizer(
        config: &SftConfig,
        adapter: &str,
        total_steps: usize,
        optimizer: SftOptimizer,
    ) -> Result<Self> {
        config.validate()?;
        match (config.selection_algorithm, optimizer) {
            (SelectionAlgorithm::Rigl, SftOptimizer::AdamW(_))
            | (SelectionAlgorithm::Sm3, SftOptimizer::Sm3(_)) => {}
            _ => {
                return Err(PeftError::InvalidConfig {
                    field: "selection_algorithm".into(),
                    reason: "rigl trains with SftAdamW and sm3 with SftSm3".into(),
                });
            }
        }
        Ok(Self {
            adapter: adapter.into(),
            algorithm: config.selection_algorithm,
            schedule: SelectionSchedule::new(config, total_steps),
            optimizer,
            probe_block: None,
            step: 0,
            grad_accum: 1,
            layers: BTreeMap::new(),
            pending: BTreeMap::new(),
            reports: BTreeMap::new(),
            positions: BTreeMap::new(),
            dense_probes: false,
        })
    }

    /// The schedule.
    pub fn schedule(&self) -> &SelectionSchedule {
        &self.schedule
    }

    /// Rows of the `[out, in]` weight gradient per block of the activation path's probe, for
    /// every layer (from the next [`prepare`](Self::prepare) on). By default each layer uses
    /// [`default_probe_block`](sparse_kernels::default_probe_block)`(in)`, about 4 MB of `f32`
    /// per block. Peak memory of the probe is `O(rows · in + k)` per layer.
    pub fn set_probe_block(&mut self, rows: usize) {
        self.probe_block = Some(rows.max(1));
    }

    /// As [`set_probe_block`](Self::set_probe_block), by value.
    #[must_use]
    pub fn with_probe_block(mut self, rows: usize) -> Self {
        self.set_probe_block(rows);
        self
    }

    /// The index of the next step (peft-core's, from 0).
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// The AdamW state of a layer, in the CSR order of its deltas.
    pub fn adam_state(&self, path: &str) -> Option<&AdamState> {
        self.layers.get(path)?.adam.as_ref()
    }

    /// The SM3 state of a layer.
    pub fn sm3_state(&self, path: &str) -> Option<&Sm3State> {
        self.layers.get(path)?.sm3.as_ref()
    }

    /// The RigL candidate pool of a layer during a window.
    pub fn candidates(&self, path: &str) -> Option<&Candidates> {
        self.layers.get(path)?.candidates.as_ref()
    }

    /// What the last reselection did, per layer.
    pub fn last_selection(&self) -> &BTreeMap<String, SelectionReport> {
        &self.reports
    }

    /// Optimizer state in floats, over all layers (O(k) plus SM3's `rows + cols`).
    pub fn state_len(&self) -> usize {
        self.layers
            .values()
            .map(|l| {
                l.adam.as_ref().map_or(0, |a| 3 * a.age.len())
                    + l.sm3
                        .as_ref()
                        .map_or(0, |s| s.row_acc.len() + s.col_acc.len() + s.momentum.len())
                    + l.candidates.as_ref().map_or(0, |c| 3 * c.indices.len())
            })
            .sum()
    }

    fn collecting(&self, step_index: usize) -> bool {
        self.algorithm == SelectionAlgorithm::Rigl && self.schedule.collects(step_index + 1)
    }

    /// Set the model up for the next step: probes on the first step of a RigL window (blockwise
    /// on the activation path, dense on the weight path), candidate sampling on the later ones,
    /// neither otherwise. Call it once before the first
    /// step (and after loading a state); the selector calls it after every step.
    ///
    /// # Errors
    /// Inconsistent candidate pools.
    pub fn prepare<M: Module>(&self, mut model: M) -> Result<M> {
        let collecting = self.collecting(self.step);
        let (name, block, dense) = (self.adapter.clone(), self.probe_block, self.dense_probes);
        let pools: BTreeMap<String, Vec<u64>> = self
            .layers
            .iter()
            .filter_map(|(p, l)| Some((p.clone(), l.candidates.as_ref()?.indices.clone())))
            .collect();
        hosts::for_each(&mut model, move |host: HostView<'_, SftAdapter>| {
            let Some(a) = host.slot.get_mut(&name) else {
                return Ok(());
            };
            let pool = pools.get(&host.path).filter(|_| collecting);
            let probe = collecting && pool.is_none() && a.num_deltas() > 0;
            let activation = host.placement == Placement::Activation;
            a.set_probe(probe && activation && !dense);
            a.set_dense_probe(probe && (!activation || dense));
            if let Some(rows) = block {
                a.set_probe_block(rows);
            }
            let same = match (pool, &a.candidates) {
                (Some(p), Some(l)) => l.structure().flat_indices() == *p,
                (None, None) => true,
                _ => false,
            };
            if !same {
                a.set_candidates(pool.map(Vec::as_slice))?;
            }
            Ok(())
        })?;
        Ok(model)
    }

    /// Apply the pending gradients with the SFT optimizer.
    fn update<M: Module>(&mut self, mut model: M, lr: f64) -> Result<M> {
        let name = self.adapter.clone();
        let pending = std::mem::take(&mut self.pending);
        let layers = Rc::new(RefCell::new(std::mem::take(&mut self.layers)));
        let optimizer = self.optimizer;
        let shared = layers.clone();
        let result = hosts::for_each(&mut model, move |host: HostView<'_, SftAdapter>| {
            let Some(a) = host.slot.get_mut(&name) else {
                return Ok(());
            };
            let Some(grad) = pending.get(&host.path) else {
                return Ok(());
            };
            let k = a.num_deltas();
            let mut values = a.values();
            let mut layers = shared.borrow_mut();
            let state = layers.entry(host.path.clone()).or_default();
            match optimizer {
                SftOptimizer::AdamW(o) => {
                    let s = state.adam.get_or_insert_with(|| AdamState::new(k));
                    o.step(lr, &mut values, grad, s);
                }
                SftOptimizer::Sm3(o) => {
                    let [rows, cols] = a.delta_shape();
                    let s = state
                        .sm3
                        .get_or_insert_with(|| Sm3State::new(rows, cols, k, o.momentum > 0.0));
                    let structure = a.layout.structure();
                    let r = structure.row_indices();
                    o.step(lr, &mut values, grad, &r, structure.col_indices(), s);
                }
            }
            a.set_values(values);
            Ok(())
        });
        self.layers = Rc::try_unwrap(layers)
            .map(RefCell::into_inner)
            .unwrap_or_else(|rc| rc.borrow().clone());
        result?;
        Ok(model)
    }

    /// Drop and regrow every layer with proportion `p`.
    fn reselect<M: Module>(&mut self, mut model: M, u: usize, p: f64) -> Result<M> {
        let name = self.adapter.clone();
        let layers = Rc::new(RefCell::new(std::mem::take(&mut self.layers)));
        let reports = Rc::new(RefCell::new(BTreeMap::new()));
        let (algorithm, optimizer, grad_accum) = (self.algorithm, self.optimizer, self.grad_accum);
        let (shared, out) = (layers.clone(), reports.clone());
        let result = hosts::for_each(&mut model, move |host: HostView<'_, SftAdapter>| {
            let Some(a) = host.slot.get_mut(&name) else {
                return Ok(());
            };
            let k = a.num_deltas();
            let indices = a.indices();
            let values = a.values();
            let mut layers = shared.borrow_mut();
            let state = layers.entry(host.path.clone()).or_default();
            let pool = state.candidates.take();
            let plan: Vec<Replacement> = match algorithm {
                SelectionAlgorithm::Rigl => match &pool {
                    Some(pool) => rigl_plan(&indices, &values, pool, p),
                    None => Vec::new(),
                },
                SelectionAlgorithm::Sm3 => {
                    let [rows, cols] = a.delta_shape();
                    let fresh;
                    let sm3 = match &state.sm3 {
                        Some(s) => s,
                        None => {
                            fresh = Sm3State::new(rows, cols, 0, false);
                            &fresh
                        }
                    };
                    // Row accumulators only: rows score alone (the reference's growth
                    // reads a column accumulator it does not keep then).
                    let ones;
                    let col = match optimizer {
                        SftOptimizer::Sm3(o) if o.row_cover_only => {
                            ones = vec![1.0; cols];
                            &ones
                        }
                        _ => &sm3.col_acc,
                    };
                    sm3_plan(&indices, &values, &sm3.row_acc, col, p)
                }
            };
            out.borrow_mut().insert(
                host.path.clone(),
                SelectionReport {
                    step: u,
                    max_replaced: ((k as f64) * p) as usize,
                    replaced: plan.len(),
                },
            );
            if plan.is_empty() {
                return Ok(());
            }
            apply_plan(
                a,
                state,
                &plan,
                pool.as_ref(),
                optimizer,
                grad_accum,
                (indices, values),
            )
        });
        self.layers = Rc::try_unwrap(layers)
            .map(RefCell::into_inner)
            .unwrap_or_else(|rc| rc.borrow().clone());
        self.reports = Rc::try_unwrap(reports)
            .map(RefCell::into_inner)
            .unwrap_or_default();
        result?;
        Ok(model)
    }

    /// Save the state (step, optimizer state, candidate pools) to `dir` for a
    /// resume. The deltas themselves are saved with the adapter (`save_pretrained`).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
            path: dir.into(),
            source,
        })?;
        let mut tensors = BTreeMap::new();
        let mut layers = Map::new();
        let floats = |v: &[f32]| TensorData::new(v.to_vec(), [v.len()]);
        for (path, l) in &self.layers {
            let mut put = |key: &str, data: TensorData| {
                tensors.insert(format!("{path}.{key}"), data);
            };
            if let Some(a) = &l.adam {
                put("exp_avg", floats(&a.exp_avg));
                put("exp_avg_sq", floats(&a.exp_avg_sq));
                put("age", floats(&a.age));
            }
            if let Some(s) = &l.sm3 {
                put("row_acc", floats(&s.row_acc));
                put("col_acc", floats(&s.col_acc));
                put("momentum", floats(&s.momentum));
            }
            if let Some(c) = &l.candidates {
                let idx: Vec<i64> = c.indices.iter().map(|&i| i as i64).collect();
                put("cand_indices", TensorData::new(idx, [c.indices.len()]));
                put("cand_sum", floats(&c.sum));
                put("cand_sum_sq", floats(&c.sum_sq));
            }
            layers.insert(
                path.clone(),
                json!({
                    "adam": l.adam.is_some(),
                    "sm3": l.sm3.is_some(),
                    "candidates": l.candidates.as_ref().map(|c| c.count),
                }),
            );
        }
        for (path, p) in &self.positions {
            let idx: Vec<i64> = p.iter().map(|&i| i as i64).collect();
            tensors.insert(format!("{path}.positions"), TensorData::new(idx, [p.len()]));
        }
        hf::write_tensors(&dir.join(STATE_TENSORS), &tensors)?;
        let state = json!({
            "adapter": self.adapter,
            "step": self.step,
            "algorithm": self.algorithm,
            "optimizer": self.optimizer,
            "layers": layers,
            "positions": self.positions.keys().collect::<Vec<_>>(),
        });
        let Value::Object(map) = state else {
            unreachable!("an object literal")
        };
        hf::write_json(&dir.join(STATE_JSON), &map)
    }

    /// Restore a state written by [`save_state`](Self::save_state). Then prepare the resumed
    /// model through the [`Controller`] (it gets the saved delta positions back, so a freshly
    /// initialised model works as well as one loaded with `from_pretrained`) and set the
    /// stepper's step index to [`step_index`](Self::step_index).
    ///
    /// # Errors
    /// Missing or inconsistent files, or a state of another adapter or algorithm.
    pub fn load_state(&mut self, dir: &Path, _device: &Device) -> Result<()> {
        let file = dir.join(STATE_JSON);
        let state = hf::read_json(&file)?;
        let bad = |reason: String| PeftError::InvalidConfig {
            field: file.display().to_string(),
            reason,
        };
        if state.get("adapter").and_then(Value::as_str) != Some(self.adapter.as_str()) {
            return Err(bad(format!(
                "the state is of adapter {}, not `{}`",
                state.get("adapter").unwrap_or(&Value::Null),
                self.adapter
            )));
        }
        let algorithm: SelectionAlgorithm =
            serde_json::from_value(state.get("algorithm").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("algorithm: {e}")))?;
        if algorithm != self.algorithm {
            return Err(bad(format!(
                "the state is of {algorithm:?} selection, this selector runs {:?}",
                self.algorithm
            )));
        }
        let optimizer: SftOptimizer =
            serde_json::from_value(state.get("optimizer").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("optimizer: {e}")))?;
        let step = state
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no `step`".into()))? as usize;
        let entries = state
            .get("layers")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `layers`".into()))?;
        let tensors_file = dir.join(STATE_TENSORS);
        let mut tensors = hf::read_tensors(&tensors_file)?;
        let mut take = |path: &str, key: &str| -> Result<TensorData> {
            tensors
                .remove(&format!("{path}.{key}"))
                .ok_or_else(|| PeftError::MissingTensor {
                    file: tensors_file.clone(),
                    key: format!("{path}.{key}"),
                })
        };
        let floats = |d: TensorData| -> Vec<f32> {
            d.convert::<f32>().try_into_vec::<f32>().unwrap_or_default()
        };
        let indices = |d: TensorData| -> Result<Vec<u64>> {
            Ok(d.convert::<i64>()
                .try_into_vec::<i64>()
                .map_err(|e| bad(format!("{e:?}")))?
                .into_iter()
                .map(|i| i as u64)
                .collect())
        };
        // Absent in states written before the positions were part of it (those resume from
        // adapter files, which hold the positions).
        let mut positions = BTreeMap::new();
        for path in state
            .get("positions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let path = path
                .as_str()
                .ok_or_else(|| bad("`positions` holds a non-string".into()))?;
            positions.insert(path.to_string(), indices(take(path, "positions")?)?);
        }
        let mut layers = BTreeMap::new();
        for (path, entry) in entries {
            let flag = |k: &str| entry.get(k).and_then(Value::as_bool).unwrap_or(false);
            let mut l = LayerState::default();
            if flag("adam") {
                l.adam = Some(AdamState {
                    exp_avg: floats(take(path, "exp_avg")?),
                    exp_avg_sq: floats(take(path, "exp_avg_sq")?),
                    age: floats(take(path, "age")?),
                });
            }
            if flag("sm3") {
                l.sm3 = Some(Sm3State {
                    row_acc: floats(take(path, "row_acc")?),
                    col_acc: floats(take(path, "col_acc")?),
                    momentum: floats(take(path, "momentum")?),
                });
            }
            if let Some(count) = entry.get("candidates").and_then(Value::as_u64) {
                l.candidates = Some(Candidates {
                    indices: indices(take(path, "cand_indices")?)?,
                    sum: floats(take(path, "cand_sum")?),
                    sum_sq: floats(take(path, "cand_sum_sq")?),
                    count: count as usize,
                });
            }
            layers.insert(path.clone(), l);
        }
        self.step = step;
        self.optimizer = optimizer;
        self.layers = layers;
        self.positions = positions;
        self.pending.clear();
        Ok(())
    }

    /// Give every layer the delta positions this selector knows (from a loaded state) where
    /// they differ, with zero values (the checkpoint's values are loaded next), then record
    /// the model's positions as known.
    fn sync_positions<M: Module>(&mut self, mut model: M) -> Result<M> {
        let (name, known) = (self.adapter.clone(), std::mem::take(&mut self.positions));
        hosts::for_each(&mut model, move |host: HostView<'_, SftAdapter>| {
            if let Some(a) = host.slot.get_mut(&name)
                && let Some(p) = known.get(&host.path)
                && *p != a.indices()
            {
                a.set_delta(p, vec![0.0; p.len()])?;
            }
            Ok(())
        })?;
        self.record_positions(&model);
        Ok(model)
    }

    fn record_positions<M: Module>(&mut self, model: &M) {
        let name = self.adapter.clone();
        self.positions = hosts::collect(model, move |host: &HostView<'_, SftAdapter>| {
            Some((host.path.clone(), host.slot.get(&name)?.indices()))
        })
        .into_iter()
        .collect();
    }
}

/// A `[in, out]` (burn) weight gradient as the `[out, in]` row-major floats the indices
/// address.
fn flat(dw: burn::tensor::Tensor<2>) -> Vec<f32> {
    let [i, o] = dw.dims();
    host_f32(dw.transpose().reshape([i * o]))
}

/// Write a plan into an adapter and its state: new indices, zero values, seeded state; kept
/// entries keep value and state; everything re-sorted into the new CSR order.
fn apply_plan(
    a: &mut SftAdapter,
    state: &mut LayerState,
    plan: &[Replacement],
    pool: Option<&Candidates>,
    optimizer: SftOptimizer,
    grad_accum: usize,
    (mut indices, mut values): (Vec<u64>, Vec<f32>),
) -> Result<()> {
    let k = indices.len();
    if let SftOptimizer::AdamW(_) = optimizer
        && state.adam.is_none()
    {
        state.adam = Some(AdamState::new(k));
    }
    for r in plan {
        indices[r.slot] = r.index;
        values[r.slot] = 0.0;
        match optimizer {
            SftOptimizer::AdamW(o) => {
                let s = state.adam.as_mut().expect("created above");
                let (m, v, age) = match (pool, r.candidate) {
                    (Some(pool), Some(j)) => {
                        AdamState::seed(&o, pool.sum[j], pool.sum_sq[j], pool.count, grad_accum)
                    }
                    _ => (0.0, 0.0, 1.0),
                };
                s.exp_avg[r.slot] = m;
                s.exp_avg_sq[r.slot] = v;
                s.age[r.slot] = age;
            }
            // As the reference: the slot keeps its momentum (the dropped entry's) and the
            // accumulators are not reset.
            SftOptimizer::Sm3(_) => {}
        }
    }
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_unstable_by_key(|&p| indices[p]);
    let permute = |v: &mut Vec<f32>| *v = order.iter().map(|&p| v[p]).collect();
    if let Some(s) = state.adam.as_mut() {
        permute(&mut s.exp_avg);
        permute(&mut s.exp_avg_sq);
        permute(&mut s.age);
    }
    if let Some(s) = state.sm3.as_mut()
        && !s.momentum.is_empty()
    {
        permute(&mut s.momentum);
    }
    permute(&mut values);
    let sorted: Vec<u64> = order.iter().map(|&p| indices[p]).collect();
    a.set_delta(&sorted, values)
}

impl<M: Module> Controller<M> for SftSelector {
    fn adapter(&self) -> Option<String> {
        Some(self.adapter.clone())
    }

    fn prepare(&mut self, model: M) -> Result<M> {
        let model = self.sync_positions(model)?;
        SftSelector::prepare(self, model)
    }

    fn set_data_parallel(&mut self, on: bool) {
        self.dense_probes = on;
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        SftSelector::save_state(self, dir)
    }

    fn load_state(&mut self, dir: &Path, device: &Device) -> Result<()> {
        SftSelector::load_state(self, dir, device)
    }

    fn after_backward(
        &mut self,
        step: usize,
        micro_batch: usize,
        model: &M,
        grads: &GradientsParams,
    ) -> Result<()> {
        self.step = step;
        self.grad_accum = micro_batch + 1;
        if !self.collecting(step) {
            return Ok(());
        }
        for layer in layer_refs(model, &self.adapter) {
            if layer.k == 0 {
                continue;
            }
            let probe = layer.probe.and_then(|id| grads.get::<2>(id));
            let sampled = layer.candidates.and_then(|id| grads.get::<1>(id));
            let state = self.layers.entry(layer.path.clone()).or_default();
            match (&mut state.candidates, probe, sampled) {
                (None, Some(dw), _) => {
                    state.candidates = Some(Candidates::from_dense(&flat(dw), layer.k))
                }
                // A later micro-batch of the pool's first step: its gradient at the pool.
                (Some(pool), Some(dw), _) => {
                    let dw = flat(dw);
                    let at: Vec<f32> = pool.indices.iter().map(|&i| dw[i as usize]).collect();
                    pool.add(&at);
                }
                (Some(pool), None, Some(g)) => pool.add(&host_f32(g)),
                // The activation path's probe: its sink collects per backward call, taken
                // before the optimizer. Or the loss did not reach this layer: no sample.
                _ => {}
            }
        }
        Ok(())
    }

    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        self.step = info.step;
        let collecting = self.collecting(info.step);
        for layer in layer_refs(model, &self.adapter) {
            if let Some(g) = grads.remove::<1>(layer.values) {
                self.pending.insert(layer.path.clone(), host_f32(g));
            }
            // Probe and candidate gradients never reach the optimizer (sampled already).
            if let Some(id) = layer.probe {
                grads.remove::<2>(id);
            }
            if let Some(id) = layer.anchor {
                // Zero: the probe's result went to its sink.
                grads.remove::<1>(id);
            }
            if let Some(id) = layer.candidates {
                grads.remove::<1>(id);
            }
            let scored = layer.sink.as_ref().and_then(|s| s.take());
            if !collecting || layer.k == 0 {
                continue;
            }
            let state = self.layers.entry(layer.path.clone()).or_default();
            match (&state.candidates, scored) {
                (None, Some(pool)) => {
                    // The sink's own samples: one per backward call of the probe.
                    state.candidates = Some(Candidates {
                        indices: pool.indices,
                        sum: pool.sum,
                        sum_sq: pool.sum_sq,
                        count: pool.count,
                    });
                }
                (None, None)
                    if layer.probe.is_none()
                        && layer.anchor.is_none()
                        && layer.candidates.is_none() =>
                {
                    return Err(PeftError::Unsupported(format!(
                        "SFT adapter `{}`: step {} collects RigL statistics but `{}` has no \
                         probe; pass the model through SftSelector::prepare before the first step",
                        self.adapter, info.step, layer.path
                    )));
                }
                // The loss did not reach this layer: no sample.
                _ => {}
            }
        }
        Ok(())
    }

    fn after_optimizer(&mut self, info: StepInfo, model: M) -> Result<M> {
        let mut model = self.update(model, info.lr)?;
        let u = info.step + 1;
        if let Some(p) = self.schedule.selection(u) {
            model = self.reselect(model, u, p)?;
            self.record_positions(&model);
        }
        self.step = info.step + 1;
        self.prepare(model)
    }
}
