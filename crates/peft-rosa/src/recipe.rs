//! The paper's two-phase recipe in one process (spec §1.7): warm LoRA up and collect
//! gradients to generate the masks, then restart from the initial adapters with both parts.
//!
//! The reference needs two runs: the first exits (`SystemExit`) after saving the masks, the
//! second loads them by substring match. Here [`generate_masks`] trains a copy of the model and
//! returns the masks, and [`restart_with_masks`] puts them into the untouched model: phase 2
//! starts from exactly the adapter values phase 1 started from (what the reference gets by
//! reusing the seed).

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Tensor;
use peft_core::PeftModel;
use peft_core::error::{PeftError, Result};
use peft_core::step::Stepper;

use crate::config::RosaConfig;
use crate::masks::RosaMasks;
use crate::scheduler::{RosaScheduler, install_masks};

/// Phase 1: train a copy of `model` with adapter `adapter`'s schedule, which must collect
/// gradients (`wl<N>` or `spa_only`, no known masks), until the masks are generated; return
/// them. `model` is not changed.
///
/// `loss(model, step)` computes the training loss of step `step` (draw the batch there).
///
/// # Errors
/// An unknown adapter, a schedule without gradient collection, or a step's error.
pub fn generate_masks<M: Module>(
    model: &PeftModel<M, RosaConfig>,
    adapter: &str,
    optim: &mut ModuleOptimizer,
    lr: f64,
    mut loss: impl FnMut(&M, usize) -> Tensor<1>,
) -> Result<RosaMasks> {
    let config = config_of(model, adapter)?;
    let mut scheduler = RosaScheduler::new(&config, adapter)?;
    let mut m = scheduler.prepare(model.model().clone())?;
    if !scheduler.collects() {
        return Err(PeftError::InvalidConfig {
            field: "schedule".into(),
            reason: format!(
                "{:?} does not collect gradients (lora_only, or masks already known), so it \
                 cannot generate masks",
                config.schedule.as_deref().unwrap_or_default()
            ),
        });
    }
    let scheduler = Arc::new(Mutex::new(scheduler));
    let mut stepper = Stepper::new().with(scheduler.clone());
    loop {
        let step = stepper.step_index();
        let l = loss(&m, step);
        m = stepper.step(m, optim, lr, l)?;
        let s = scheduler.lock().expect("scheduler lock");
        if let Some(masks) = s.masks().filter(|_| s.masks_generated()) {
            return Ok(masks.clone());
        }
    }
}

/// Phase 2: put `masks` into adapter `adapter` of `model` (zero values, so the function does
/// not change), make its config's schedule `default` (the masks in the model are known to
/// every scheduler built for it: no second collection), and return the scheduler to train
/// with. Use a fresh optimizer.
///
/// # Errors
/// An unknown adapter, or masks that do not fit the adapted layers.
pub fn restart_with_masks<M: Module>(
    model: &mut PeftModel<M, RosaConfig>,
    adapter: &str,
    masks: RosaMasks,
) -> Result<RosaScheduler> {
    let mut config = config_of(model, adapter)?;
    config.schedule = Some("default".into());
    config.mask_load_path = None;
    config.mask_save_path = None;
    config.terminate_after_mask_generation = false;
    let mut scheduler = RosaScheduler::new(&config, adapter)?;
    let inner = install_masks(model.model().clone(), adapter, &masks, true)?;
    let inner = scheduler.prepare(inner)?;
    *model.config_mut(adapter)? = config;
    model.map_model(|_| inner);
    Ok(scheduler)
}

/// Both phases in one call: [`generate_masks`] with `optimizer()`, then
/// [`restart_with_masks`] and `steps` steps of both adapters with a fresh `optimizer()`.
/// Returns the masks; `model` holds the trained adapters.
///
/// # Errors
/// As the two phases.
pub fn two_phase<M: Module>(
    model: &mut PeftModel<M, RosaConfig>,
    adapter: &str,
    mut optimizer: impl FnMut() -> ModuleOptimizer,
    lr: f64,
    steps: usize,
    mut loss: impl FnMut(&M, usize) -> Tensor<1>,
) -> Result<RosaMasks> {
    let masks = generate_masks(model, adapter, &mut optimizer(), lr, &mut loss)?;
    let scheduler = restart_with_masks(model, adapter, masks.clone())?;
    let mut optim = optimizer();
    let mut stepper = Stepper::new().with(scheduler);
    let mut m = model.model().clone();
    for step in 0..steps {
        let l = loss(&m, step);
        m = stepper.step(m, &mut optim, lr, l)?;
    }
    model.map_model(|_| m);
    Ok(masks)
}

fn config_of<M: Module>(model: &PeftModel<M, RosaConfig>, adapter: &str) -> Result<RosaConfig> {
    model
        .adapters()
        .get(adapter)
        .map(|e| e.config.clone())
        .ok_or_else(|| PeftError::UnknownAdapter {
            name: adapter.into(),
            available: model.adapters().keys().cloned().collect(),
        })
}
