//! [`PeftConfigBase`]: the fields every PEFT method config has (PEFT's `PeftConfig` base:
//! `target_modules`, `exclude_modules`, `modules_to_save`, `layers_to_transform`,
//! `layers_pattern`, `bias`, `inference_mode`, `task_type`, `base_model_name_or_path`,
//! `revision`), declared once and flattened into every method config, and [`PeftConfig`], the
//! builders they share.
//!
//! A method config embeds the base as `#[serde(flatten)] pub base: PeftConfigBase`, declared
//! before its own `#[serde(flatten)] extra` map. The base knows no other key and keeps none,
//! so every key neither the base nor the method declares lands in the method's `extra` once
//! and is written back once; unknown and unsupported fields are checked there only.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::method::BiasMode;
use crate::target::{
    LayerIndices, LayersPattern, ModuleSelector, TargetFields, TargetSpec, default_target_modules,
};

/// The fields of PEFT's `PeftConfig` / `LoraConfig` that every method config shares, with
/// PEFT's names and defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeftConfigBase {
    /// Which modules get an adapter (unset: see [`PeftConfig::with_default_targets`]).
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Modules never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Modules fully trained and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Only adapt these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// Name of the layer list that `layers_to_transform` indexes.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Which base biases train (`none`, `all`, `lora_only`; RoSA writes `rosa_only`).
    #[serde(default)]
    pub bias: BiasMode,
    /// Whether the adapter was saved for inference (PEFT always writes `true`).
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT task type, kept as is (`"SEQ_CLS"` also keeps the classification head out of
    /// `"all-linear"`).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Base model name or path, kept as is.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Revision of the base model, kept as is.
    #[serde(default)]
    pub revision: Option<String>,
}

impl PeftConfigBase {
    /// The compiled target selection.
    ///
    /// # Errors
    /// Invalid regular expressions or field combinations.
    pub fn target_spec(&self) -> Result<TargetSpec> {
        TargetSpec::new(TargetFields {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            modules_to_save: self.modules_to_save.as_deref().unwrap_or(&[]),
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            task_type: self.task_type.as_deref(),
        })
    }
}

/// A value accepted as the reference (PEFT, or the method's own reference code) accepts it, but
/// that does not do what it seems to (ignored, or replaced by another value): the reference's
/// behaviour is kept and the user is told. Read with [`PeftConfig::warnings`]; the `burn-peft`
/// command prints them on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigWarning {
    /// The field, with its name in `adapter_config.json`.
    pub field: String,
    /// What happens instead.
    pub message: String,
}

impl ConfigWarning {
    /// A warning about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}`: {}", self.field, self.message)
    }
}

/// A method config built on [`PeftConfigBase`]; the builders are the same for every method.
pub trait PeftConfig: Sized {
    /// The common fields.
    fn base(&self) -> &PeftConfigBase;

    /// Values accepted for compatibility with the reference that are ignored or replaced (see
    /// [`ConfigWarning`]); empty by default.
    fn warnings(&self) -> Vec<ConfigWarning> {
        Vec::new()
    }

    /// The common fields, mutably.
    fn base_mut(&mut self) -> &mut PeftConfigBase;

    /// Set `target_modules`.
    #[must_use]
    fn with_targets(mut self, targets: ModuleSelector) -> Self {
        self.base_mut().target_modules = Some(targets);
        self
    }

    /// Set `exclude_modules`.
    #[must_use]
    fn with_exclude(mut self, exclude: ModuleSelector) -> Self {
        self.base_mut().exclude_modules = Some(exclude);
        self
    }

    /// Set `modules_to_save`.
    #[must_use]
    fn with_modules_to_save<S: Into<String>>(mut self, m: impl IntoIterator<Item = S>) -> Self {
        self.base_mut().modules_to_save = Some(m.into_iter().map(Into::into).collect());
        self
    }

    /// Set `layers_to_transform` and `layers_pattern`.
    #[must_use]
    fn with_layers(mut self, indices: LayerIndices, pattern: Option<LayersPattern>) -> Self {
        let base = self.base_mut();
        base.layers_to_transform = Some(indices);
        base.layers_pattern = pattern;
        self
    }

    /// Set `bias`.
    #[must_use]
    fn with_bias(mut self, bias: BiasMode) -> Self {
        self.base_mut().bias = bias;
        self
    }

    /// Set `task_type` (`"SEQ_CLS"` also keeps the classification head out of `"all-linear"`).
    #[must_use]
    fn with_task_type(mut self, task_type: &str) -> Self {
        self.base_mut().task_type = Some(task_type.into());
        self
    }

    /// Set `base_model_name_or_path`.
    #[must_use]
    fn with_base_model(mut self, name_or_path: &str) -> Self {
        self.base_mut().base_model_name_or_path = Some(name_or_path.into());
        self
    }

    /// Where `target_modules` is unset, PEFT's default for `model_type`
    /// ([`default_target_modules`]). For an unknown type it stays unset, and attaching fails with
    /// [`PeftError::TargetNotFound`](crate::PeftError::TargetNotFound) listing every candidate.
    /// [`PeftModel::new_typed`](crate::PeftModel::new_typed) calls it with the model's own type.
    #[must_use]
    fn with_default_targets(mut self, model_type: &str) -> Self {
        let base = self.base_mut();
        if base.target_modules.is_none() {
            base.target_modules = default_target_modules(model_type);
        }
        self
    }
}
