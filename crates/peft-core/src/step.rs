//! The training step: forward and backward are the user's, then controllers and the optimizer
//! run in a fixed order, so no method-specific call can be forgotten.
//!
//! Order of one step (after `loss.backward()`):
//! 1. every controller's [`before_optimizer`](Controller::before_optimizer), in registration
//!    order, sees and may edit the gradients (RoSA mask generation, ID3 unmasking, SFT
//!    reselection statistics);
//! 2. the optimizer updates the parameters;
//! 3. every controller's [`after_optimizer`](Controller::after_optimizer) sees the updated model
//!    and may change it (AdaLoRA rank allocation, masking).

use burn::module::Module;
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Gradients, Tensor};

use crate::error::Result;

/// Where a step is in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepInfo {
    /// Index of this optimizer step, starting at 0.
    pub step: usize,
}

/// A training-time controller of a PEFT method.
///
/// Controllers are deterministic functions of the gradients and parameters they see, so replicas
/// of a data-parallel run that see the same (all-reduced) gradients stay in agreement.
pub trait Controller<M>: Send {
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
}

/// A shared controller: the stepper runs it while its owner keeps a handle, e.g. to read or
/// save its state between steps.
impl<M, C: Controller<M>> Controller<M> for std::sync::Arc<std::sync::Mutex<C>> {
    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> Result<()> {
        self.lock()
            .expect("a controller panicked")
            .before_optimizer(info, model, grads)
    }

    fn after_optimizer(&mut self, info: StepInfo, model: M) -> Result<M> {
        self.lock()
            .expect("a controller panicked")
            .after_optimizer(info, model)
    }
}

/// Runs controllers and the optimizer in the documented order and counts steps.
pub struct Stepper<M> {
    controllers: Vec<Box<dyn Controller<M>>>,
    step: usize,
}

impl<M> std::fmt::Debug for Stepper<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stepper")
            .field("controllers", &self.controllers.len())
            .field("step", &self.step)
            .finish()
    }
}

impl<M> Default for Stepper<M> {
    fn default() -> Self {
        Self {
            controllers: Vec::new(),
            step: 0,
        }
    }
}

impl<M: Module> Stepper<M> {
    /// A stepper without controllers (plain LoRA needs none).
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a controller; controllers run in the order they were added.
    pub fn with(mut self, controller: impl Controller<M> + 'static) -> Self {
        self.controllers.push(Box::new(controller));
        self
    }

    /// The index of the next step.
    pub fn step_index(&self) -> usize {
        self.step
    }

    /// Resume counting at `step` (after loading a checkpoint).
    pub fn set_step_index(&mut self, step: usize) {
        self.step = step;
    }

    /// Run controllers and the optimizer on gradients already computed.
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
        let info = StepInfo { step: self.step };
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

    /// One full step from a scalar loss: backward, controllers, optimizer.
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
}
