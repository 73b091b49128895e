//! [`PeftConfig`]: the fields every PEFT method config has (PEFT's `PeftConfig` base:
//! `target_modules`, `exclude_modules`, `modules_to_save`, `layers_to_transform`,
//! `layers_pattern`, `bias`, `inference_mode`, `task_type`, `base_model_name_or_path`) and the
//! builders they share, written once here for every method.

use crate::method::BiasMode;
use crate::target::{LayerIndices, LayersPattern, ModuleSelector, default_target_modules};

/// Mutable access to the common fields of one method config.
#[derive(Debug)]
pub struct CommonFieldsMut<'a> {
    /// `target_modules`.
    pub target_modules: &'a mut Option<ModuleSelector>,
    /// `exclude_modules`.
    pub exclude_modules: &'a mut Option<ModuleSelector>,
    /// `modules_to_save`.
    pub modules_to_save: &'a mut Option<Vec<String>>,
    /// `layers_to_transform`.
    pub layers_to_transform: &'a mut Option<LayerIndices>,
    /// `layers_pattern`.
    pub layers_pattern: &'a mut Option<LayersPattern>,
    /// `bias`.
    pub bias: &'a mut BiasMode,
    /// `inference_mode`.
    pub inference_mode: &'a mut bool,
    /// `task_type`.
    pub task_type: &'a mut Option<String>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: &'a mut Option<String>,
}

/// A method config with PEFT's common fields; the builders are the same for every method.
pub trait PeftConfig: Sized {
    /// The common fields.
    fn common_mut(&mut self) -> CommonFieldsMut<'_>;

    /// Set `target_modules`.
    #[must_use]
    fn with_targets(mut self, targets: ModuleSelector) -> Self {
        *self.common_mut().target_modules = Some(targets);
        self
    }

    /// Set `exclude_modules`.
    #[must_use]
    fn with_exclude(mut self, exclude: ModuleSelector) -> Self {
        *self.common_mut().exclude_modules = Some(exclude);
        self
    }

    /// Set `modules_to_save`.
    #[must_use]
    fn with_modules_to_save<S: Into<String>>(mut self, m: impl IntoIterator<Item = S>) -> Self {
        *self.common_mut().modules_to_save = Some(m.into_iter().map(Into::into).collect());
        self
    }

    /// Set `layers_to_transform` and `layers_pattern`.
    #[must_use]
    fn with_layers(mut self, indices: LayerIndices, pattern: Option<LayersPattern>) -> Self {
        let c = self.common_mut();
        *c.layers_to_transform = Some(indices);
        *c.layers_pattern = pattern;
        self
    }

    /// Set `bias`.
    #[must_use]
    fn with_bias(mut self, bias: BiasMode) -> Self {
        *self.common_mut().bias = bias;
        self
    }

    /// Set `task_type` (`"SEQ_CLS"` also keeps the classification head out of `"all-linear"`).
    #[must_use]
    fn with_task_type(mut self, task_type: &str) -> Self {
        *self.common_mut().task_type = Some(task_type.into());
        self
    }

    /// Set `base_model_name_or_path`.
    #[must_use]
    fn with_base_model(mut self, name_or_path: &str) -> Self {
        *self.common_mut().base_model_name_or_path = Some(name_or_path.into());
        self
    }

    /// Where `target_modules` is unset, PEFT's default for `model_type`
    /// ([`default_target_modules`]). For an unknown type it stays unset, and attaching fails with
    /// [`PeftError::TargetNotFound`](crate::PeftError::TargetNotFound) listing every candidate.
    #[must_use]
    fn with_default_targets(mut self, model_type: &str) -> Self {
        let c = self.common_mut();
        if c.target_modules.is_none() {
            *c.target_modules = default_target_modules(model_type);
        }
        self
    }
}

/// Implement [`PeftConfig`] for a config struct whose common fields are named as PEFT's.
#[macro_export]
macro_rules! impl_peft_config {
    ($config:ty) => {
        impl $crate::config::PeftConfig for $config {
            fn common_mut(&mut self) -> $crate::config::CommonFieldsMut<'_> {
                $crate::config::CommonFieldsMut {
                    target_modules: &mut self.target_modules,
                    exclude_modules: &mut self.exclude_modules,
                    modules_to_save: &mut self.modules_to_save,
                    layers_to_transform: &mut self.layers_to_transform,
                    layers_pattern: &mut self.layers_pattern,
                    bias: &mut self.bias,
                    inference_mode: &mut self.inference_mode,
                    task_type: &mut self.task_type,
                    base_model_name_or_path: &mut self.base_model_name_or_path,
                }
            }
        }
    };
}
