//! The training step: forward and backward are the user's, then controllers and the optimizer
//! run in a fixed order, so no method-specific call can be forgotten.
//!
//! A [`PeftModel`](crate::PeftModel) builds its runner in one call,
//! [`PeftModel::stepper`](crate::PeftModel::stepper): every controller its active adapters need
//! (AdaLoRA's allocator, RoSA's scheduler, SFT's selector, …), built from the configs it holds and
//! already [`prepare`](Controller::prepare)d on the model. [`Stepper::train`] then runs one step
//! on the `PeftModel`; it refuses to start (a [`PeftError::MissingController`]) when an adapter
//! that needs a controller has none in the runner.
//!
//! Order of one step:
//! 0. after each micro-batch's backward pass, every controller's
//!    [`after_backward`](Controller::after_backward) sees that micro-batch's gradients (the
//!    training loop reports them with [`Stepper::after_backward`] or [`Stepper::backward`]);
//!    when a step reaches the optimizer with no micro-batch reported, the stepper reports the
//!    step's (accumulated) gradients as its only micro-batch, so a loop without gradient
//!    accumulation needs no extra call. Statistics the reference collects per backward call
//!    (RoSA's mask statistic, SFT's RigL candidates) are collected here;
//! 1. every controller's [`before_optimizer`](Controller::before_optimizer), in registration
//!    order, sees and may edit the gradients (RoSA gradient collection, ID3 unmasking, SFT
//!    taking its deltas' gradients);
//! 2. the optimizer updates the parameters it still has gradients for;
//! 3. every controller's [`after_optimizer`](Controller::after_optimizer) sees the updated model
//!    and may change it (AdaLoRA rank allocation, RoSA mask generation and restart, SFT's delta
//!    update and reselection);
//! 4. with [`Stepper::train`], every controller writes what it decided into its adapter's config
//!    ([`update_config`](Controller::update_config): AdaLoRA's rank pattern), so a save after
//!    any step is what PEFT would save.
//!
//! The learning rate of the step reaches every controller in [`StepInfo::lr`], so anything a
//! controller trains itself (SFT deltas, selective entries) follows the same schedule as the
//! module optimizer.

use std::any::Any;
use std::path::Path;

use burn::module::Module;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Gradients, Tensor};
use serde_json::json;

use crate::error::{PeftError, Result};

/// Where a step is in the run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// Index of this optimizer step, starting at 0.
    pub step: usize,
    /// The step's learning rate (the base rate of a per-group
    /// [`ModuleLearningRate`]), for everything a controller trains itself.
    pub lr: f64,
}

/// A training-time controller of a PEFT method.
///
/// Controllers are deterministic functions of the gradients and parameters they see, so replicas
/// of a data-parallel run that see the same (all-reduced) gradients stay in agreement.
pub trait Controller<M>: Send {
    /// The adapter this controller serves, if any (a method's controller always names one).
    fn adapter(&self) -> Option<String> {
        None
    }

    /// Set the model up before the first step (probes, trainability, known masks).
    ///
    /// # Errors
    /// Method-specific.
    fn prepare(&mut self, model: M) -> Result<M> {
        Ok(model)
    }

    /// Inspect one micro-batch's gradients, right after its backward pass (before they are
    /// accumulated). `step` is the index of the optimizer step the micro-batch belongs to and
    /// `micro_batch` its index in that step (from 0). Without gradient accumulation, or when
    /// the training loop reports no micro-batch, this runs once per step with the step's
    /// gradients (`micro_batch` 0), before [`before_optimizer`](Self::before_optimizer).
    ///
    /// # Errors
    /// Method-specific.
    fn after_backward(
        &mut self,
        step: usize,
        micro_batch: usize,
        model: &M,
        grads: &GradientsParams,
    ) -> Result<()> {
        let _ = (step, micro_batch, model, grads);
        Ok(())
    }

    /// Inspect or edit the gradients before the optimizer step.
    ///
    /// # Errors
    /// Method-specific; the step is aborted and the model is returned unchanged.
    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        let _ = (info, model, grads);
        Ok(())
    }

    /// Inspect or change the model after the optimizer step.
    ///
    /// # Errors
    /// Method-specific.
    fn after_optimizer(&mut self, info: StepInfo, model: M) -> Result<M> {
        let _ = info;
        Ok(model)
    }

    /// Write what the controller decided into its adapter's config (a `&mut` of the method's
    /// config type; other types are left alone). Called after every step by
    /// [`Stepper::train`].
    fn update_config(&self, config: &mut dyn Any) {
        let _ = config;
    }

    /// Whether the run should stop now (RoSA's `terminate_after_mask_generation`).
    fn should_stop(&self) -> bool {
        false
    }

    /// Train as one replica of a data-parallel run ([`DataParallel`](crate::DataParallel)):
    /// every statistic the controller keeps must come from the gradients it is given (which are
    /// all-reduced then), not from a side channel of the replica's own backward pass (SFT's
    /// blockwise probe sink, whose top-`k` of a local gradient is not the top-`k` of the
    /// reduced one). [`prepare`](Self::prepare) runs after this call.
    fn set_data_parallel(&mut self, on: bool) {
        let _ = on;
    }

    /// Save the controller's state into `dir` (which exists and is its own).
    ///
    /// # Errors
    /// I/O errors.
    fn save_state(&self, dir: &Path) -> Result<()> {
        let _ = dir;
        Ok(())
    }

    /// Restore a state written by [`save_state`](Self::save_state); tensors go to `device`.
    ///
    /// # Errors
    /// Missing or malformed files.
    fn load_state(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let _ = (dir, device);
        Ok(())
    }
}

fn lock<C>(c: &std::sync::Mutex<C>) -> std::sync::MutexGuard<'_, C> {
    c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A shared controller: the stepper runs it while its owner keeps a handle, e.g. to read or
/// save its state between steps.
impl<M, C: Controller<M>> Controller<M> for std::sync::Arc<std::sync::Mutex<C>> {
    fn adapter(&self) -> Option<String> {
        lock(self).adapter()
    }

    fn prepare(&mut self, model: M) -> Result<M> {
        lock(self).prepare(model)
    }

    fn after_backward(
        &mut self,
        step: usize,
        micro_batch: usize,
        model: &M,
        grads: &GradientsParams,
    ) -> Result<()> {
        lock(self).after_backward(step, micro_batch, model, grads)
    }

    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        lock(self).before_optimizer(info, model, grads)
    }

    fn after_optimizer(&mut self, info: StepInfo, model: M) -> Result<M> {
        lock(self).after_optimizer(info, model)
    }

    fn update_config(&self, config: &mut dyn Any) {
        lock(self).update_config(config);
    }

    fn should_stop(&self) -> bool {
        lock(self).should_stop()
    }

    fn set_data_parallel(&mut self, on: bool) {
        lock(self).set_data_parallel(on);
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        lock(self).save_state(dir)
    }

    fn load_state(&mut self, dir: &Path, device: &Device) -> Result<()> {
        lock(self).load_state(dir, device)
    }
}

/// A model trained through a [`Stepper`] with its method's checks: a
/// [`PeftModel`](crate::PeftModel), or a selective model of peft-selective.
pub trait Tuned<M> {
    /// The step runner with every controller the trained adapters need, for a run of
    /// `total_steps` optimizer steps (the one call that replaces per-method wiring).
    ///
    /// # Errors
    /// A config that cannot train, or a controller's `prepare` error.
    fn stepper(&mut self, total_steps: usize) -> Result<Stepper<M>>;

    /// The model as trained.
    fn tuned_model(&self) -> &M;

    /// Replace the trained model after a step.
    fn set_tuned_model(&mut self, model: M);

    /// Check that `served` (the adapters that have a controller) covers every trained adapter
    /// whose method needs one.
    ///
    /// # Errors
    /// [`PeftError::MissingController`].
    fn check_controllers(&self, served: &[String]) -> Result<()>;

    /// Let the controllers write their decisions into the configs (after every step).
    fn update_configs(&mut self, controllers: &[Box<dyn Controller<M>>]);
}

/// Runs controllers and the optimizer in the documented order and counts steps.
pub struct Stepper<M> {
    controllers: Vec<Box<dyn Controller<M>>>,
    step: usize,
    /// Micro-batches reported for the current step.
    micro_batches: usize,
    checked: bool,
}

impl<M> std::fmt::Debug for Stepper<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stepper")
            .field("controllers", &self.controllers.len())
            .field("step", &self.step)
            .field("micro_batches", &self.micro_batches)
            .finish()
    }
}

impl<M> Default for Stepper<M> {
    fn default() -> Self {
        Self {
            controllers: Vec::new(),
            step: 0,
            micro_batches: 0,
            checked: false,
        }
    }
}

const STATE_JSON: &str = "stepper.json";

impl<M: Module> Stepper<M> {
    /// A stepper without controllers, for plain models or hand-built controller lists. A
    /// `PeftModel` gives one with its method's controllers: [`PeftModel::stepper`](crate::PeftModel::stepper).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a controller; controllers run in the order they were added. It is not
    /// [`prepare`](Controller::prepare)d: see [`push_prepared`](Self::push_prepared).
    pub fn with(mut self, controller: impl Controller<M> + 'static) -> Self {
        self.controllers.push(Box::new(controller));
        self
    }

    /// Prepare `controller` on `model` and add it; returns the prepared model.
    ///
    /// # Errors
    /// The controller's `prepare` error (nothing is added then).
    pub fn push_prepared(&mut self, mut controller: Box<dyn Controller<M>>, model: M) -> Result<M> {
        let model = controller.prepare(model)?;
        self.controllers.push(controller);
        Ok(model)
    }

    /// The controllers, in run order.
    pub fn controllers(&self) -> &[Box<dyn Controller<M>>] {
        &self.controllers
    }

    /// The adapters that have a controller in this stepper.
    pub fn served_adapters(&self) -> Vec<String> {
        self.controllers
            .iter()
            .filter_map(|c| c.adapter())
            .collect()
    }

    /// The index of the next step.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// Resume counting at `step` (after loading a checkpoint).
    pub fn set_step_index(&mut self, step: usize) {
        self.step = step;
        self.micro_batches = 0;
    }

    /// Whether a controller asks to stop the run (e.g. RoSA's
    /// `terminate_after_mask_generation` once the masks are saved).
    pub fn should_stop(&self) -> bool {
        self.controllers.iter().any(|c| c.should_stop())
    }

    /// Micro-batches reported for the current step so far.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// Report one micro-batch's gradients, right after its backward pass: every controller's
    /// [`after_backward`](Controller::after_backward) sees them. Call it for each micro-batch of
    /// a step with gradient accumulation (then accumulate the gradients as usual and give the
    /// sum to [`optimize`](Self::optimize) / [`train_grads`](Self::train_grads)); without
    /// accumulation it is not needed.
    ///
    /// # Errors
    /// A controller's error.
    pub fn after_backward(&mut self, model: &M, grads: &GradientsParams) -> Result<()> {
        let micro = self.micro_batches;
        self.micro_batches += 1;
        for c in &mut self.controllers {
            c.after_backward(self.step, micro, model, grads)?;
        }
        Ok(())
    }

    /// A micro-batch's backward pass from its loss, reported with
    /// [`after_backward`](Self::after_backward): the gradients to accumulate.
    ///
    /// # Errors
    /// A controller's error.
    pub fn backward(&mut self, model: &M, loss: Tensor<1>) -> Result<GradientsParams> {
        let grads = GradientsParams::from_grads(loss.backward(), model);
        self.after_backward(model, &grads)?;
        Ok(grads)
    }

    /// Run controllers and the optimizer on gradients already computed.
    ///
    /// When no micro-batch was reported for this step ([`after_backward`](Self::after_backward)),
    /// `grads` is reported as the step's only one first.
    ///
    /// This is the low-level step on a bare model: it checks nothing about methods. Train a
    /// `PeftModel` with [`train`](Self::train) / [`train_grads`](Self::train_grads).
    ///
    /// # Errors
    /// A controller's error; the step counter does not advance then.
    pub fn optimize(
        &mut self,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: impl Into<ModuleLearningRate>,
        mut grads: GradientsParams,
    ) -> Result<M> {
        let lr = lr.into();
        let info = StepInfo {
            step: self.step,
            lr: lr.base(),
        };
        let reported = std::mem::take(&mut self.micro_batches);
        if reported == 0 {
            for c in &mut self.controllers {
                c.after_backward(self.step, 0, &model, &grads)?;
            }
        }
        for c in &mut self.controllers {
            c.before_optimizer(info, &model, &mut grads)?;
        }
        let mut model = optim.step(lr, model, grads);
        for c in &mut self.controllers {
            model = c.after_optimizer(info, model)?;
        }
        self.step += 1;
        Ok(model)
    }

    /// One full step from a scalar loss on a bare model: backward, controllers, optimizer
    /// (see [`optimize`](Self::optimize)).
    ///
    /// # Errors
    /// A controller's error.
    pub fn step(
        &mut self,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: impl Into<ModuleLearningRate>,
        loss: Tensor<1>,
    ) -> Result<M> {
        let grads: Gradients = loss.backward();
        let grads = GradientsParams::from_grads(grads, &model);
        self.optimize(model, optim, lr, grads)
    }

    /// Check, once, that every trained adapter of `tuned` whose method needs a controller has
    /// one here.
    ///
    /// # Errors
    /// [`PeftError::MissingController`].
    pub fn check<T: Tuned<M>>(&mut self, tuned: &T) -> Result<()> {
        if !self.checked {
            tuned.check_controllers(&self.served_adapters())?;
            self.checked = true;
        }
        Ok(())
    }

    /// One training step of a [`PeftModel`](crate::PeftModel) (or any [`Tuned`] model) from
    /// its loss: backward, controllers, optimizer, config updates. `lr` is the step's learning
    /// rate (a number or what a burn LR scheduler's `step()` returns); it reaches the module
    /// optimizer and every controller.
    ///
    /// # Errors
    /// [`PeftError::MissingController`] on the first step when an adapter lacks its
    /// controller; a controller's error (the model is unchanged then).
    pub fn train<T: Tuned<M>>(
        &mut self,
        tuned: &mut T,
        optim: &mut ModuleOptimizer,
        lr: impl Into<ModuleLearningRate>,
        loss: Tensor<1>,
    ) -> Result<()> {
        self.check(tuned)?;
        let grads = GradientsParams::from_grads(loss.backward(), tuned.tuned_model());
        self.train_grads(tuned, optim, lr, grads)
    }

    /// As [`train`](Self::train), from gradients already computed (gradient accumulation).
    ///
    /// # Errors
    /// As [`train`](Self::train).
    pub fn train_grads<T: Tuned<M>>(
        &mut self,
        tuned: &mut T,
        optim: &mut ModuleOptimizer,
        lr: impl Into<ModuleLearningRate>,
        grads: GradientsParams,
    ) -> Result<()> {
        self.check(tuned)?;
        let model = self.optimize(tuned.tuned_model().clone(), optim, lr, grads)?;
        tuned.set_tuned_model(model);
        tuned.update_configs(&self.controllers);
        Ok(())
    }

    /// Make every controller train as one replica of a data-parallel run
    /// ([`Controller::set_data_parallel`]) and prepare `model` for that again.
    ///
    /// # Errors
    /// A controller's `prepare` error.
    pub fn data_parallel(&mut self, mut model: M) -> Result<M> {
        for c in &mut self.controllers {
            c.set_data_parallel(true);
            model = c.prepare(model)?;
        }
        Ok(model)
    }

    /// Save the step index and every controller's state into `dir` (created if needed):
    /// `stepper.json` and one folder `controller-<i>` per controller.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        for (i, c) in self.controllers.iter().enumerate() {
            let sub = dir.join(format!("controller-{i}"));
            std::fs::create_dir_all(&sub).map_err(|source| PeftError::Io {
                path: sub.clone(),
                source,
            })?;
            c.save_state(&sub)?;
        }
        let state = json!({ "step": self.step, "controllers": self.controllers.len() });
        let serde_json::Value::Object(map) = state else {
            unreachable!("an object literal")
        };
        crate::hf::write_json(&dir.join(STATE_JSON), &map)
    }

    /// Resume a run: [`load_state`](Self::load_state), then prepare `tuned`'s model for the
    /// next step again (the controllers' probes, masks and trainability of that step). Build
    /// the stepper with the model's `stepper(total_steps)` first, from the restored adapters.
    ///
    /// # Errors
    /// As [`load_state`](Self::load_state), or a controller's `prepare` error.
    pub fn resume<T: Tuned<M>>(
        &mut self,
        tuned: &mut T,
        dir: &Path,
        device: &Device,
    ) -> Result<()> {
        let model = self.restore(tuned.tuned_model().clone(), dir, device)?;
        tuned.set_tuned_model(model);
        Ok(())
    }

    /// [`load_state`](Self::load_state), then every controller prepares `model` for the next
    /// step (the structure its state implies: RoSA's masks, SFT's delta positions and
    /// candidate pool; probes and trainability).
    ///
    /// # Errors
    /// As [`load_state`](Self::load_state), or a controller's `prepare` error.
    pub fn restore(&mut self, mut model: M, dir: &Path, device: &Device) -> Result<M> {
        self.load_state(dir, device)?;
        for c in &mut self.controllers {
            model = c.prepare(model)?;
        }
        Ok(model)
    }

    /// Restore a state written by [`save_state`](Self::save_state) into a stepper built the
    /// same way (same model, same configs).
    ///
    /// # Errors
    /// Missing or malformed files, or a different number of controllers.
    pub fn load_state(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let file = dir.join(STATE_JSON);
        let state = crate::hf::read_json(&file)?;
        let bad = |reason: String| PeftError::InvalidConfig {
            field: file.display().to_string(),
            reason,
        };
        let step = state
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("no `step`".into()))? as usize;
        let n = state
            .get("controllers")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("no `controllers`".into()))? as usize;
        if n != self.controllers.len() {
            return Err(bad(format!(
                "the state has {n} controllers, this stepper {}",
                self.controllers.len()
            )));
        }
        for (i, c) in self.controllers.iter_mut().enumerate() {
            c.load_state(&dir.join(format!("controller-{i}")), device)?;
        }
        self.step = step;
        self.micro_batches = 0;
        Ok(())
    }
}
