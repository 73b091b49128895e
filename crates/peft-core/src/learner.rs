//! burn-train integration: run the PEFT step inside `Learner`'s optimizer step.
//!
//! burn-train calls [`TrainStep::optimize`] on the model after every backward pass. Wrapping the
//! model in [`Controlled`] makes that call run the [`Stepper`]: controllers before and after the
//! optimizer, in the documented order, so a `Learner` cannot skip them. Build it from the
//! `PeftModel` with [`PeftModel::controlled`](crate::PeftModel::controlled): the method's
//! controllers come with it and the missing-controller check runs once, there.
//!
//! `optimize` has no error channel: a controller error aborts that step (the model is left as
//! it was), is kept for [`Controlled::error`], later steps do nothing, and the training run is
//! stopped through the burn-train [`Interrupter`] given with
//! [`with_interrupter`](Controlled::with_interrupter). It never panics.

use std::sync::{Arc, Mutex};

use burn::module::{
    Content, Devices, DisplaySettings, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor,
};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use burn::train::{InferenceStep, Interrupter, TrainOutput, TrainStep};

use crate::error::{PeftError, Result};
use crate::method::Method;
use crate::model::PeftModel;
use crate::step::Stepper;

/// A model for burn-train's `Learner` whose optimizer step runs PEFT controllers.
///
/// Its parameters are the wrapped model's, under the path prefix `model.`. Clones share the
/// stepper (the step counter and controller state), as the learner clones the model every step.
#[derive(Clone, Debug)]
pub struct Controlled<M: Module> {
    /// The wrapped model.
    pub model: M,
    stepper: SharedStepper<M>,
}

impl<M: Module> Controlled<M> {
    fn with(self, f: impl FnOnce(M) -> M) -> Self {
        Self {
            model: f(self.model),
            stepper: self.stepper,
        }
    }
}

impl<M: Module> Module for Controlled<M> {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.model.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        self.with(|m| m.fork(device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.with(|m| m.to_device(device))
    }

    fn train(self) -> Self {
        self.with(Module::train)
    }

    fn valid(&self) -> Self {
        let model = self.model.valid();
        self.clone().with(|_| model)
    }

    fn materialize(self) -> Self {
        self.with(Module::materialize)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module("model", "Struct:Controlled");
        self.model.visit(visitor);
        visitor.exit_module("model", "Struct:Controlled");
    }

    fn map<Mp: ModuleMapper>(self, mapper: &mut Mp) -> Self {
        mapper.enter_module("model", "Struct:Controlled");
        let this = self.with(|m| m.map(mapper));
        mapper.exit_module("model", "Struct:Controlled");
        this
    }
}

impl<M: Module + ModuleDisplay> ModuleDisplayDefault for Controlled<M> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add("model", &self.model).optional()
    }
}

impl<M: Module + ModuleDisplay> ModuleDisplay for Controlled<M> {}

impl<M: Module + ModuleDisplay> std::fmt::Display for Controlled<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.format(DisplaySettings::new()))
    }
}

/// A [`Stepper`] shared between clones of a [`Controlled`] model, with the first controller
/// error and the interrupter to stop the run with.
pub struct SharedStepper<M>(Arc<Mutex<Shared<M>>>);

struct Shared<M> {
    stepper: Stepper<M>,
    error: Option<PeftError>,
    interrupter: Option<Interrupter>,
}

impl<M> SharedStepper<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<M>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<M> Clone for SharedStepper<M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<M> std::fmt::Debug for SharedStepper<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.lock().stepper.fmt(f)
    }
}

impl<M: Module> Controlled<M> {
    /// Wrap `model`; `stepper` holds the method's controllers.
    pub fn new(model: M, stepper: Stepper<M>) -> Self {
        Self {
            model,
            stepper: SharedStepper(Arc::new(Mutex::new(Shared {
                stepper,
                error: None,
                interrupter: None,
            }))),
        }
    }

    /// Stop the training run through `interrupter` (burn-train's
    /// `SupervisedTraining::interrupter()`) when a controller fails.
    #[must_use]
    pub fn with_interrupter(self, interrupter: Interrupter) -> Self {
        self.stepper.lock().interrupter = Some(interrupter);
        self
    }

    /// The index of the next optimizer step.
    pub fn step_index(&self) -> usize {
        self.stepper.lock().stepper.step_index()
    }

    /// The controller error that stopped the optimizer steps, if any (taken: a second call
    /// returns `None`).
    pub fn error(&self) -> Option<PeftError> {
        self.stepper.lock().error.take()
    }

    /// Run `f` on the stepper (save or load its state for a checkpoint, read its step index).
    pub fn with_stepper<T>(&self, f: impl FnOnce(&mut Stepper<M>) -> T) -> T {
        f(&mut self.stepper.lock().stepper)
    }

    /// The wrapped model.
    pub fn into_inner(self) -> M {
        self.model
    }
}

impl<M: Module + TrainStep> TrainStep for Controlled<M> {
    type Input = M::Input;
    type Output = M::Output;

    fn step(&self, item: Self::Input) -> TrainOutput<Self::Output> {
        self.model.step(item)
    }

    /// Controllers and optimizer, in order. A controller error leaves the model as it was,
    /// is kept for [`Controlled::error`] and stops the run (see the module docs).
    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr_module: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        let mut shared = self.stepper.lock();
        if shared.error.is_some() {
            drop(shared);
            return self;
        }
        let model = match shared
            .stepper
            .optimize(self.model.clone(), optim, lr_module, grads)
        {
            Ok(model) => model,
            Err(e) => {
                if let Some(i) = &shared.interrupter {
                    i.stop(Some(&format!("PEFT controller failed: {e}")));
                }
                shared.error = Some(e);
                self.model.clone()
            }
        };
        drop(shared);
        Self {
            model,
            stepper: self.stepper,
        }
    }
}

impl<M: Module + InferenceStep> InferenceStep for Controlled<M> {
    type Input = M::Input;
    type Output = M::Output;

    fn step(&self, item: Self::Input) -> Self::Output {
        self.model.step(item)
    }
}

impl<M: Module, C: Method> PeftModel<M, C> {
    /// The model for burn-train's `Learner`, with the method's controllers in its optimizer
    /// step ([`stepper`](Self::stepper)`(total_steps)`), checked once here.
    ///
    /// # Errors
    /// As [`stepper`](Self::stepper).
    pub fn controlled(&mut self, total_steps: usize) -> Result<Controlled<M>> {
        let mut stepper = self.stepper(total_steps)?;
        stepper.check(self)?;
        Ok(Controlled::new(self.model().clone(), stepper))
    }

    /// Take the trained model back from a [`Controlled`] (after burn-train's `launch`), with
    /// the controllers' decisions written into the configs (AdaLoRA's rank pattern), as
    /// [`Stepper::train`] does after each step.
    pub fn set_controlled(&mut self, trained: Controlled<M>) {
        trained.with_stepper(|s| crate::step::Tuned::update_configs(self, s.controllers()));
        let model = trained.into_inner();
        self.map_model(|_| model);
    }
}
