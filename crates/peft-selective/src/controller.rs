//! Running a selective optimizer inside peft-core's [`Stepper`](peft_core::step::Stepper).
//!
//! As a [`Controller`], the selective optimizer takes the gradients before the stepper's
//! `ModuleOptimizer` sees them (so that optimizer changes nothing) and performs its own update
//! after it, at the learning rate set with
//! [`set_learning_rate`](SelectiveOptimizer::set_learning_rate). This also makes it work inside
//! burn-train's `Learner` through peft-core's `Controlled` model.

use burn::module::Module;
use burn::optim::{GradientsParams, Optimizer};
use peft_core::step::{Controller, StepInfo};

use crate::optimizer::SelectiveOptimizer;

impl<M: Module, O: Optimizer> Controller<M> for SelectiveOptimizer<O> {
    fn before_optimizer(
        &mut self,
        _info: StepInfo,
        _model: &M,
        grads: &mut GradientsParams,
    ) -> peft_core::Result<()> {
        self.pending = Some(std::mem::take(grads));
        Ok(())
    }

    fn after_optimizer(&mut self, _info: StepInfo, model: M) -> peft_core::Result<M> {
        let grads = self.pending.take().unwrap_or_default();
        let lr = self.controller_lr;
        self.step(lr, model, grads).map_err(Into::into)
    }
}
