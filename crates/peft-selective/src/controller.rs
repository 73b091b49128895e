//! Running a selective optimizer inside peft-core's [`Stepper`](peft_core::step::Stepper),
//! and [`SelectiveModel`], the model whose one call gives that stepper.
//!
//! As a [`Controller`], the selective optimizer takes the gradients before the stepper's
//! `ModuleOptimizer` sees them (so that optimizer changes nothing) and performs its own update
//! after it, at the step's learning rate ([`StepInfo::lr`]), so a burn LR scheduler drives the
//! selected entries like any other parameter. This also makes it work inside burn-train's
//! `Learner` through peft-core's `Controlled` model.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::Device;
use peft_core::PeftError;
use peft_core::step::{Controller, StepInfo, Stepper, Tuned};

use crate::config::SelectiveConfig;
use crate::error::Result;
use crate::optimizer::SelectiveOptimizer;
use crate::summary::Summary;

/// The name under which a selective optimizer serves its model (there is one selection per
/// model, no named adapters).
pub const SELECTIVE_ADAPTER: &str = "selective";

impl<M: Module, O: Optimizer + 'static> Controller<M> for SelectiveOptimizer<O> {
    fn adapter(&self) -> Option<String> {
        Some(SELECTIVE_ADAPTER.into())
    }

    fn before_optimizer(
        &mut self,
        _info: StepInfo,
        _model: &M,
        grads: &mut GradientsParams,
    ) -> peft_core::Result<()> {
        self.pending = Some(std::mem::take(grads));
        Ok(())
    }

    fn after_optimizer(&mut self, info: StepInfo, model: M) -> peft_core::Result<M> {
        let grads = self.pending.take().unwrap_or_default();
        self.step(info.lr, model, grads).map_err(Into::into)
    }

    fn save_state(&self, dir: &Path) -> peft_core::Result<()> {
        SelectiveOptimizer::save_state(self, dir).map_err(Into::into)
    }

    fn load_state(&mut self, dir: &Path, _device: &Device) -> peft_core::Result<()> {
        SelectiveOptimizer::load_state(self, dir).map_err(Into::into)
    }
}

/// A model trained by selective PEFT (ID3, PaFI, BitFit): the counterpart of peft-core's
/// `PeftModel` for methods that train the model's own entries.
///
/// [`stepper`](Self::stepper) returns the step runner with the [`SelectiveOptimizer`] inside;
/// [`Stepper::train`] refuses a stepper without it.
///
/// ```
/// use burn::nn::LinearConfig;
/// use burn::optim::SgdConfig;
/// use burn::tensor::{Device, Tensor};
/// use peft_selective::{SelectiveConfig, SelectiveModel};
///
/// let device = Device::flex().autodiff();
/// let mut model = SelectiveModel::new(LinearConfig::new(4, 3).init(&device), SelectiveConfig::id3(6, 3));
/// let mut stepper = model.stepper(3)?;
/// let mut optim = SgdConfig::new().init(); // sees no gradient: the selection owns them
/// for _ in 0..3 {
///     let loss = model.model().forward(Tensor::<2>::ones([2, 4], &device)).powi_scalar(2).mean();
///     stepper.train(&mut model, &mut optim, 1e-2, loss)?;
/// }
/// # Ok::<(), peft_core::PeftError>(())
/// ```
#[derive(Clone)]
pub struct SelectiveModel<M> {
    model: M,
    config: SelectiveConfig,
    selection: Option<Arc<Mutex<dyn Selected<M>>>>,
}

impl<M> std::fmt::Debug for SelectiveModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectiveModel")
            .field("config", &self.config)
            .field("stepper", &self.selection.is_some())
            .finish_non_exhaustive()
    }
}

/// What a [`SelectiveModel`] reads of the optimizer inside its stepper.
trait Selected<M>: Send {
    fn summary(&self, model: &M) -> Result<Summary>;
    fn budget_used(&self) -> usize;
}

impl<M: Module, O: Optimizer> Selected<M> for SelectiveOptimizer<O> {
    fn summary(&self, model: &M) -> Result<Summary> {
        SelectiveOptimizer::summary(self, model)
    }

    fn budget_used(&self) -> usize {
        SelectiveOptimizer::budget_used(self)
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<M: Module> SelectiveModel<M> {
    /// Wrap `model` to train the entries `config` selects.
    pub fn new(model: M, config: SelectiveConfig) -> Self {
        Self {
            model,
            config,
            selection: None,
        }
    }

    /// Entries chosen so far by the optimizer of the last [`stepper`](Self::stepper) (0 before).
    pub fn budget_used(&self) -> usize {
        self.selection.as_ref().map_or(0, |s| lock(s).budget_used())
    }

    /// The chosen entries' values, `O(budget)` (save it with [`Summary::save`]).
    ///
    /// # Errors
    /// No stepper was made yet, or the summary's errors.
    pub fn summary(&self) -> Result<Summary> {
        let s = self.selection.as_ref().ok_or_else(|| {
            crate::SelectiveError::Core(PeftError::Unsupported(
                "no selection yet: make the stepper and train first".into(),
            ))
        })?;
        lock(s).summary(&self.model)
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The model, leaving the wrapper.
    pub fn into_model(self) -> M {
        self.model
    }

    /// The selection config.
    pub fn config(&self) -> &SelectiveConfig {
        &self.config
    }

    /// The step runner with the selective optimizer (AdamW with PyTorch's defaults, no weight
    /// decay, as the toolkit). ID3 unmasks over its config's `max_steps`, so `total_steps` is
    /// not used.
    ///
    /// # Errors
    /// As [`SelectiveOptimizer::new`].
    pub fn stepper(&mut self, total_steps: usize) -> Result<Stepper<M>> {
        let adamw = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .build();
        self.stepper_with(total_steps, adamw)
    }

    /// As [`stepper`](Self::stepper), with the optimizer of the chosen entries.
    ///
    /// # Errors
    /// As [`SelectiveOptimizer::new`].
    pub fn stepper_with<O: Optimizer + 'static>(
        &mut self,
        total_steps: usize,
        inner: O,
    ) -> Result<Stepper<M>> {
        let _ = total_steps;
        let optim = Arc::new(Mutex::new(SelectiveOptimizer::new(
            &self.model,
            self.config.clone(),
            inner,
        )?));
        self.selection = Some(optim.clone());
        Ok(Stepper::new().with(optim))
    }
}

impl<M: Module> Tuned<M> for SelectiveModel<M> {
    fn stepper(&mut self, total_steps: usize) -> peft_core::Result<Stepper<M>> {
        SelectiveModel::stepper(self, total_steps).map_err(Into::into)
    }

    fn tuned_model(&self) -> &M {
        &self.model
    }

    fn set_tuned_model(&mut self, model: M) {
        self.model = model;
    }

    fn check_controllers(&self, served: &[String]) -> peft_core::Result<()> {
        if served.iter().any(|s| s == SELECTIVE_ADAPTER) {
            Ok(())
        } else {
            Err(PeftError::MissingController {
                adapter: SELECTIVE_ADAPTER.into(),
                method: self.config.method.name().to_uppercase(),
            })
        }
    }

    fn update_configs(&mut self, _controllers: &[Box<dyn Controller<M>>]) {}
}
