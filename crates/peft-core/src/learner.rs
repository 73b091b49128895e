//! burn-train integration: run the PEFT step inside `Learner`'s optimizer step.
//!
//! burn-train calls [`TrainStep::optimize`] on the model after every backward pass. Wrapping the
//! model in [`Controlled`] makes that call run the [`Stepper`]: controllers before and after the
//! optimizer, in the documented order, so a `Learner` cannot skip them.

use std::sync::{Arc, Mutex};

use burn::module::{
    Content, Devices, DisplaySettings, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor,
};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Device;
use burn::train::{InferenceStep, TrainOutput, TrainStep};

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

/// A [`Stepper`] shared between clones of a [`Controlled`] model.
pub struct SharedStepper<M>(Arc<Mutex<Stepper<M>>>);

impl<M> Clone for SharedStepper<M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<M> std::fmt::Debug for SharedStepper<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.lock() {
            Ok(s) => s.fmt(f),
            Err(_) => f.write_str("Stepper(poisoned)"),
        }
    }
}

impl<M: Module> Controlled<M> {
    /// Wrap `model`; `stepper` holds the method's controllers.
    pub fn new(model: M, stepper: Stepper<M>) -> Self {
        Self {
            model,
            stepper: SharedStepper(Arc::new(Mutex::new(stepper))),
        }
    }

    /// The index of the next optimizer step.
    pub fn step_index(&self) -> usize {
        self.stepper.0.lock().expect("stepper lock").step_index()
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

    /// # Panics
    /// When a controller fails: `Learner` has no error channel for the optimizer step.
    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr_module: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        let model = self
            .stepper
            .0
            .lock()
            .expect("stepper lock")
            .optimize(self.model, optim, lr_module, grads)
            .unwrap_or_else(|e| panic!("PEFT controller failed: {e}"));
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
