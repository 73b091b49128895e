//! [`RosaScheduler`]: the schedule (which adapter trains at each step) and mask generation,
//! as a training-step [`Controller`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use peft_core::error::{PeftError, Result};
use peft_core::hosts::{self, HostView};
use peft_core::step::{Controller, StepInfo};
use peft_core::{LayerKind, hf};
use serde_json::{Map, Value, json};
use sparse_kernels::CsrStructure;

use crate::adapter::RosaAdapter;
use crate::config::{Agenda, GradAccMode, RosaConfig, Schedule, Segment};
use crate::masks::RosaMasks;

const STATE_JSON: &str = "rosa_scheduler.json";
const STATE_TENSORS: &str = "rosa_scheduler.safetensors";
const STATE_MASKS: &str = "rosa_masks.safetensors";
const STATE_INITIAL: &str = "rosa_initial.safetensors";

/// The running mean of one layer's gradient statistic.
#[derive(Clone, Debug)]
struct Collected {
    /// `[rows, cols]`, burn orientation.
    mean: Tensor<2>,
    /// Backward passes (micro-batches) seen.
    count: usize,
}

/// Runs a RoSA adapter's schedule inside the training step (spec §1.4, §1.6).
///
/// - Before the first step, [`prepare`](Self::prepare) the model: it sets which parameters
///   train at step 0 and adds the gradient probes if step 0 collects gradients.
/// - At each step it freezes what the agenda does not train (LoRA factors outside `lora`,
///   sparse values outside `spa`) and nothing else: biases under `bias` and `modules_to_save`
///   keep training (the reference freezes them every step).
/// - During gradient collection every adapted layer with a sparse budget carries a zero probe
///   whose gradient is its weight gradient `xᵀ·dY`; the frozen base weight gets none. The probe
///   gradients are removed before the optimizer, so the probes stay zero and hold no optimizer
///   state. Each backward pass is one sample, as the reference's backward hooks count them:
///   the scheduler takes it in [`Controller::after_backward`], so with gradient accumulation
///   (micro-batches reported with [`Stepper::after_backward`](peft_core::step::Stepper::after_backward),
///   as `burn-peft train` and burn-train's runner do) `mean_squared` averages the squares of
///   the micro-batch gradients; a step with no micro-batch reported counts its (accumulated)
///   gradient as one sample.
/// - At the end of the last collection step it takes, per layer, the top `int(d·rows·cols)`
///   entries of `|statistic|` (the layer's own `d`, after `density_pattern`), sets the masks
///   with zero values (the outputs do not change), saves them to `mask_save_path` if set, and
///   drops the statistics and probes. From then on no dense weight-shaped gradient is formed.
/// - With [`with_restart`](Self::with_restart) (what [`PeftModel::stepper`](peft_core::PeftModel::stepper)
///   builds for a `wl<N>` schedule), the LoRA factors then restart from the values they had
///   before the first step, as new parameters (so the optimizer keeps no state from the
///   warm-up): the paper's two-phase recipe inside one run.
#[derive(Clone, Debug)]
pub struct RosaScheduler {
    adapter: String,
    schedule: Schedule,
    num_grads: usize,
    segments: Vec<Segment>,
    mode: GradAccMode,
    mask_save_path: Option<PathBuf>,
    terminate: bool,
    step: usize,
    collected: BTreeMap<String, Collected>,
    masks: Option<RosaMasks>,
    generated: bool,
    restart: bool,
    /// The LoRA factors before the first step (`[a, b]` per layer path), for the restart.
    initial: BTreeMap<String, [TensorData; 2]>,
}

/// What the scheduler needs to know of one adapted layer.
struct LayerRef {
    path: String,
    kind: LayerKind,
    base_shape: [usize; 2],
    nnz: usize,
    probe: Option<ParamId>,
    has_mask: bool,
}

fn layer_refs<M: Module>(model: &M, adapter: &str) -> Vec<LayerRef> {
    let name = adapter.to_string();
    hosts::collect(model, move |host: &HostView<'_, RosaAdapter>| {
        host.slot.get(&name).map(|a| LayerRef {
            path: host.path.clone(),
            kind: a.kind,
            base_shape: a.base_shape,
            nnz: a.nnz,
            probe: a.probe.as_ref().map(|p| p.id),
            has_mask: a.has_mask(),
        })
    })
}

impl RosaScheduler {
    /// A scheduler for adapter `adapter` configured by `config`. The masks are known from the
    /// start when `config` names a `mask_load_path`, or when every sparse layer of the adapter
    /// already has one at the first [`prepare`](Self::prepare) (masks given in-process, see
    /// [`MaskedAdapters`](crate::MaskedAdapters)): then no step collects gradients.
    ///
    /// # Errors
    /// An invalid config, no `schedule`, or an unreadable `mask_load_path`.
    pub fn new(config: &RosaConfig, adapter: &str) -> Result<Self> {
        config.validate()?;
        let schedule = config
            .parsed_schedule()?
            .ok_or_else(|| PeftError::InvalidConfig {
                field: "schedule".into(),
                reason:
                    "must be set to train (\"default\", \"wl<N>\", \"spa_only\" or \"lora_only\")"
                        .into(),
            })?;
        let known = config.file_masks()?;
        Ok(Self {
            adapter: adapter.into(),
            schedule,
            num_grads: config.spa_num_grads,
            segments: schedule.segments(config.spa_num_grads, known.is_none()),
            mode: config.grad_acc_mode,
            mask_save_path: config.mask_save_path.clone(),
            terminate: config.terminate_after_mask_generation,
            step: 0,
            collected: BTreeMap::new(),
            masks: known,
            generated: false,
            restart: false,
            initial: BTreeMap::new(),
        })
    }

    /// Restart the LoRA factors from their values at the start of the run once the masks are
    /// generated, with fresh parameter ids (no optimizer state carries over): the paper's
    /// `wl<N>` warm-up, masks, restart recipe in one run. The values are recorded by
    /// [`Controller::prepare`].
    #[must_use]
    pub fn with_restart(mut self, on: bool) -> Self {
        self.restart = on;
        self
    }

    /// Whether the LoRA factors restart after mask generation.
    pub fn restarts(&self) -> bool {
        self.restart
    }

    fn record_initial<M: Module>(&mut self, model: &M) {
        let name = self.adapter.clone();
        self.initial = hosts::collect(model, move |host: &HostView<'_, RosaAdapter>| {
            let a = host.slot.get(&name)?;
            let (la, lb) = (a.lora_a.as_ref()?, a.lora_b.as_ref()?);
            // An owned copy of the values: on wgpu (lavapipe) the data read back could change
            // with later reads, and the restart restored another layer's factors.
            let owned = |t: Tensor<2>| {
                let data = t.into_data();
                TensorData::new(
                    data.iter::<f32>().collect::<Vec<f32>>(),
                    data.shape().clone(),
                )
            };
            Some((host.path.clone(), [owned(la.val()), owned(lb.val())]))
        })
        .into_iter()
        .collect();
    }

    fn restore_initial<M: Module>(&self, mut model: M) -> Result<M> {
        let name = self.adapter.clone();
        let initial = self.initial.clone();
        hosts::for_each(&mut model, move |host: HostView<'_, RosaAdapter>| {
            let Some(a) = host.slot.get_mut(&name) else {
                return Ok(());
            };
            let Some([ia, ib]) = initial.get(&host.path) else {
                return Ok(());
            };
            let fresh = |p: &Option<burn::module::Param<Tensor<2>>>, data: &TensorData| {
                p.as_ref().map(|p| {
                    let t = Tensor::<2>::from_data(data.clone(), &p.device());
                    burn::module::Param::from_tensor(t).set_require_grad(p.is_require_grad())
                })
            };
            a.lora_a = fresh(&a.lora_a, ia);
            a.lora_b = fresh(&a.lora_b, ib);
            Ok(())
        })?;
        Ok(model)
    }

    /// The agenda of step `step`.
    pub fn agenda(&self, step: usize) -> Agenda {
        self.segments
            .iter()
            .find(|s| s.end.is_none_or(|end| step < end))
            .map(|s| s.agenda)
            .unwrap_or_default()
    }

    /// The schedule's segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether the schedule collects gradients for masks at some step.
    pub fn collects(&self) -> bool {
        self.segments.iter().any(|s| s.agenda.grad_collection)
    }

    /// The index of the next step.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// The masks, once known (given, loaded or generated).
    pub fn masks(&self) -> Option<&RosaMasks> {
        self.masks.as_ref()
    }

    /// Whether this scheduler generated the masks (rather than being given them).
    pub fn masks_generated(&self) -> bool {
        self.generated
    }

    /// `terminate_after_mask_generation` is set and the masks are generated and saved: the
    /// training loop should stop here (the reference exits the process instead).
    pub fn should_stop(&self) -> bool {
        self.terminate && self.generated
    }

    /// Backward passes accumulated so far per layer (empty outside collection).
    pub fn collected_counts(&self) -> BTreeMap<String, usize> {
        self.collected
            .iter()
            .map(|(p, c)| (p.clone(), c.count))
            .collect()
    }

    /// The running mean of a layer's statistic (`[rows, cols]`, burn orientation).
    pub fn collected(&self, path: &str) -> Option<Tensor<2>> {
        self.collected.get(path).map(|c| c.mean.clone())
    }

    fn collecting(&self, step: usize) -> bool {
        self.agenda(step).grad_collection && self.masks.is_none()
    }

    /// Set the model up for the next step: masks the scheduler knows are installed where
    /// missing, probes are added or removed, and the agenda's trainability applied. Before the
    /// first step, masks the model already has in every sparse layer become the known masks
    /// (no gradient collection, no restart).
    ///
    /// # Errors
    /// A known mask that does not fit its layer, or a layer without a mask.
    pub fn prepare<M: Module>(&mut self, mut model: M) -> Result<M> {
        if self.step == 0
            && self.masks.is_none()
            && !self.generated
            && let Some(masks) = model_masks(&model, &self.adapter)
        {
            self.segments = self.schedule.segments(self.num_grads, false);
            self.masks = Some(masks);
            self.restart = false;
        }
        let agenda = self.agenda(self.step);
        if let Some(masks) = &self.masks {
            model = install_masks(model, &self.adapter, masks, agenda.spa)?;
        }
        let probes = self.collecting(self.step);
        let name = self.adapter.clone();
        hosts::for_each(&mut model, move |host: HostView<'_, RosaAdapter>| {
            if let Some(a) = host.slot.get_mut(&name) {
                a.set_probe(probes && a.nnz > 0 && !a.has_mask());
            }
            Ok(())
        })?;
        let name = self.adapter.clone();
        Ok(hosts::set_trainable(model, move |path| {
            let (_, rest) = path
                .split_once(".peft.")
                .or_else(|| path.strip_prefix("peft.").map(|r| ("", r)))?;
            let (adapter, field) = rest.split_once('.')?;
            if adapter != name {
                return None;
            }
            match field {
                "lora_a" | "lora_b" if !agenda.lora => Some(false),
                "spa_values" => Some(agenda.spa),
                "probe" => Some(true),
                _ => None,
            }
        }))
    }

    fn accumulate(&mut self, path: &str, grad: Tensor<2>) {
        let stat = match self.mode {
            GradAccMode::MeanSquared => grad.clone() * grad,
            GradAccMode::Mean => grad,
        };
        let entry = self.collected.remove(path);
        let next = match entry {
            None => Collected {
                mean: stat,
                count: 1,
            },
            Some(Collected { mean, count }) => {
                let mean = mean.to_device(&stat.device());
                Collected {
                    mean: (mean * count as f64 + stat) / (count + 1) as f64,
                    count: count + 1,
                }
            }
        };
        self.collected.insert(path.to_string(), next);
    }

    /// Add one backward pass's gradients to the mask statistic (one sample per layer the loss
    /// reached).
    fn observe<M: Module>(
        &mut self,
        step: usize,
        model: &M,
        grads: &GradientsParams,
    ) -> Result<()> {
        self.step = step;
        if !self.collecting(step) {
            return Ok(());
        }
        for layer in self.probes(model)? {
            if let Some(g) = layer.probe.and_then(|id| grads.get::<2>(id)) {
                self.accumulate(&layer.path, g);
            }
        }
        Ok(())
    }

    fn probes<M: Module>(&self, model: &M) -> Result<Vec<LayerRef>> {
        let layers = layer_refs(model, &self.adapter);
        if layers
            .iter()
            .any(|l| l.nnz > 0 && !l.has_mask && l.probe.is_none())
        {
            return Err(PeftError::Unsupported(format!(
                "RoSA adapter `{}`: step {} collects gradients but the model has no gradient \
                 probes; pass the model through RosaScheduler::prepare before the first step",
                self.adapter, self.step
            )));
        }
        Ok(layers)
    }

    /// Per-layer top-k of the statistic.
    fn generate<M: Module>(&self, model: &M) -> Result<RosaMasks> {
        let mut masks = RosaMasks::new();
        for layer in layer_refs(model, &self.adapter) {
            if layer.nnz == 0 {
                continue;
            }
            let [sr, sc] = RosaAdapter::spa_shape(layer.kind, layer.base_shape);
            let scores: Vec<f32> = match self.collected.get(&layer.path) {
                Some(c) => {
                    let stat = match layer.kind {
                        LayerKind::Linear => c.mean.clone().transpose(),
                        LayerKind::Embedding => c.mean.clone(),
                    };
                    stat.abs()
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .map_err(|e| PeftError::Unsupported(format!("{e:?}")))?
                }
                // A layer the loss never reached: no signal, the lowest indices win.
                None => vec![0.0; sr * sc],
            };
            let structure = CsrStructure::from_topk(sr, sc, &scores, layer.nnz).map_err(|e| {
                PeftError::Unsupported(format!("RoSA mask of `{}`: {e}", layer.path))
            })?;
            masks.insert(layer.path, structure);
        }
        Ok(masks)
    }

    /// Save the state (step, statistics, masks) to `dir` for a resume.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
            path: dir.into(),
            source,
        })?;
        let mut tensors = BTreeMap::new();
        let mut counts = Map::new();
        for (path, c) in &self.collected {
            tensors.insert(path.clone(), c.mean.clone().into_data());
            counts.insert(path.clone(), Value::from(c.count));
        }
        hf::write_tensors(&dir.join(STATE_TENSORS), &tensors)?;
        let mut initial = BTreeMap::new();
        for (path, [a, b]) in &self.initial {
            initial.insert(format!("{path}.lora_a"), a.clone());
            initial.insert(format!("{path}.lora_b"), b.clone());
        }
        hf::write_tensors(&dir.join(STATE_INITIAL), &initial)?;
        if let Some(masks) = &self.masks {
            masks.save(&dir.join(STATE_MASKS))?;
        }
        let state = json!({
            "adapter": self.adapter,
            "step": self.step,
            "generated": self.generated,
            "has_masks": self.masks.is_some(),
            "restart": self.restart,
            "initial": self.initial.keys().collect::<Vec<_>>(),
            "counts": counts,
        });
        let Value::Object(map) = state else {
            unreachable!("an object literal")
        };
        hf::write_json(&dir.join(STATE_JSON), &map)
    }

    /// Restore a state written by [`save_state`](Self::save_state) (statistics go to `device`).
    /// Then [`prepare`](Self::prepare) the resumed model and set the stepper's step index to
    /// [`step_index`](Self::step_index).
    ///
    /// # Errors
    /// Missing or inconsistent files, or a state of another adapter.
    pub fn load_state(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let file = dir.join(STATE_JSON);
        let state = hf::read_json(&file)?;
        let bad = |reason: &str| PeftError::InvalidConfig {
            field: file.display().to_string(),
            reason: reason.into(),
        };
        if state.get("adapter").and_then(Value::as_str) != Some(self.adapter.as_str()) {
            return Err(bad(&format!(
                "the state is of adapter {}, not `{}`",
                state.get("adapter").unwrap_or(&Value::Null),
                self.adapter
            )));
        }
        let step = state
            .get("step")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no `step`"))? as usize;
        let generated = state
            .get("generated")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("no `generated`"))?;
        let has_masks = state
            .get("has_masks")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("no `has_masks`"))?;
        let counts = state
            .get("counts")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no `counts`"))?;
        let mut tensors = hf::read_tensors(&dir.join(STATE_TENSORS))?;
        let mut collected = BTreeMap::new();
        for (path, count) in counts {
            let data: TensorData =
                tensors
                    .remove(path)
                    .ok_or_else(|| PeftError::MissingTensor {
                        file: dir.join(STATE_TENSORS),
                        key: path.clone(),
                    })?;
            collected.insert(
                path.clone(),
                Collected {
                    mean: Tensor::from_data(data, device),
                    count: count
                        .as_u64()
                        .ok_or_else(|| bad("a count is not an integer"))?
                        as usize,
                },
            );
        }
        let masks = if has_masks {
            Some(RosaMasks::load(&dir.join(STATE_MASKS))?)
        } else {
            None
        };
        let mut initial = BTreeMap::new();
        if let Some(paths) = state.get("initial").and_then(Value::as_array) {
            let file = dir.join(STATE_INITIAL);
            let mut tensors = hf::read_tensors(&file)?;
            for path in paths.iter().filter_map(Value::as_str) {
                let mut take = |suffix: &str| {
                    let key = format!("{path}.{suffix}");
                    tensors
                        .remove(&key)
                        .ok_or_else(|| PeftError::MissingTensor {
                            file: file.clone(),
                            key,
                        })
                };
                initial.insert(path.to_string(), [take("lora_a")?, take("lora_b")?]);
            }
        }
        self.restart = state
            .get("restart")
            .and_then(Value::as_bool)
            .unwrap_or(self.restart);
        self.initial = initial;
        // Masks held but not generated were known from the start: no collection segment.
        self.segments = self
            .schedule
            .segments(self.num_grads, !has_masks || generated);
        self.step = step;
        self.generated = generated;
        self.collected = collected;
        self.masks = masks;
        Ok(())
    }
}

/// The masks of adapter `adapter` in `model` when every layer with a sparse budget has one
/// (and there is at least one such layer).
fn model_masks<M: Module>(model: &M, adapter: &str) -> Option<RosaMasks> {
    let name = adapter.to_string();
    let layers = hosts::collect(model, move |host: &HostView<'_, RosaAdapter>| {
        let a = host.slot.get(&name).filter(|a| a.nnz > 0)?;
        Some((
            host.path.clone(),
            a.spa.as_ref().map(|l| l.structure().clone()),
        ))
    });
    if layers.is_empty() {
        return None;
    }
    let mut masks = RosaMasks::new();
    for (path, structure) in layers {
        masks.insert(path, structure?);
    }
    Some(masks)
}

/// Set the masks of adapter `adapter` in every layer that has a sparse budget and no mask yet,
/// with zero values (so the model's function does not change) that train if `trainable`.
///
/// # Errors
/// A layer with a budget but no mask in `masks`, or a mask of the wrong shape or size.
pub fn install_masks<M: Module>(
    mut model: M,
    adapter: &str,
    masks: &RosaMasks,
    trainable: bool,
) -> Result<M> {
    let name = adapter.to_string();
    let masks = masks.clone();
    hosts::for_each(&mut model, move |host: HostView<'_, RosaAdapter>| {
        let Some(a) = host.slot.get_mut(&name) else {
            return Ok(());
        };
        if a.nnz == 0 || a.has_mask() {
            return Ok(());
        }
        let structure = masks
            .get(&host.path)
            .ok_or_else(|| PeftError::InvalidConfig {
                field: "masks".into(),
                reason: format!(
                    "no mask for `{}` (masks are matched by exact module path)",
                    host.path
                ),
            })?;
        let values = Tensor::<1>::zeros([a.nnz], &a.device);
        a.set_probe(false);
        a.set_mask(&host.path, structure.clone(), values, trainable)
    })?;
    Ok(model)
}

impl<M: Module> Controller<M> for RosaScheduler {
    fn adapter(&self) -> Option<String> {
        Some(self.adapter.clone())
    }

    fn prepare(&mut self, model: M) -> Result<M> {
        let model = RosaScheduler::prepare(self, model)?;
        if self.restart && self.masks.is_none() && self.initial.is_empty() {
            self.record_initial(&model);
        }
        Ok(model)
    }

    fn should_stop(&self) -> bool {
        RosaScheduler::should_stop(self)
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        RosaScheduler::save_state(self, dir)
    }

    fn load_state(&mut self, dir: &Path, device: &Device) -> Result<()> {
        RosaScheduler::load_state(self, dir, device)
    }

    fn after_backward(
        &mut self,
        step: usize,
        _micro_batch: usize,
        model: &M,
        grads: &GradientsParams,
    ) -> Result<()> {
        self.observe(step, model, grads)
    }

    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        self.step = info.step;
        for layer in layer_refs(model, &self.adapter) {
            // Probe gradients never reach the optimizer: the probes stay zero, stateless.
            if let Some(id) = layer.probe {
                grads.remove::<2>(id);
            }
        }
        Ok(())
    }

    fn after_optimizer(&mut self, info: StepInfo, mut model: M) -> Result<M> {
        let next = info.step + 1;
        if self.collecting(info.step) && !self.agenda(next).grad_collection {
            let masks = self.generate(&model)?;
            if let Some(path) = &self.mask_save_path {
                masks.save(path)?;
            }
            self.masks = Some(masks);
            self.generated = true;
            self.collected.clear();
            if self.restart {
                model = self.restore_initial(model)?;
                self.initial.clear();
            }
        }
        self.step = next;
        self.prepare(model)
    }
}
