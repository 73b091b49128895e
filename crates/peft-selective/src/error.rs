//! Typed errors of peft-selective.

use std::path::PathBuf;

use peft_core::PeftError;

/// Everything that can go wrong when configuring, running, saving or applying a selective
/// optimizer.
#[derive(Debug, thiserror::Error)]
pub enum SelectiveError {
    /// A configuration value is invalid (budget 0, `max_steps` 0, negative `eps`, ...).
    #[error("invalid selective config field `{field}`: {reason}")]
    InvalidConfig {
        /// Name of the field.
        field: &'static str,
        /// What is wrong with it and what to do instead.
        reason: String,
    },
    /// The budget is larger than the number of trainable entries of the model.
    #[error(
        "budget {budget} is larger than the {available} trainable entries of the model; \
         lower the budget or unfreeze more parameters"
    )]
    BudgetTooLarge {
        /// The requested budget.
        budget: usize,
        /// Trainable entries available.
        available: usize,
    },
    /// The parameters that must be trained fully need more than the whole budget.
    #[error(
        "the fully trained parameters ({paths}) hold {needed} entries, more than the budget \
         {budget}; raise the budget or train fewer parameters fully"
    )]
    BudgetTooSmall {
        /// The requested budget.
        budget: usize,
        /// Entries the fixed selection needs.
        needed: usize,
        /// The parameters that are selected in full.
        paths: String,
    },
    /// A parameter group of `choose_all` matched no trainable parameter.
    #[error("parameter group {group} matches no trainable parameter; trainable parameters: {}", available.join(", "))]
    GroupMatchesNothing {
        /// The group, as burn prints it.
        group: String,
        /// Every trainable parameter path.
        available: Vec<String>,
    },
    /// BitFit found no parameter to train.
    #[error(
        "BitFit found no trainable {}; trainable parameters: {}",
        if *bias_only { "bias parameter (paths ending in `.bias`)" } else { "1-D parameter" },
        available.join(", ")
    )]
    NothingSelected {
        /// Whether only `.bias` paths were eligible.
        bias_only: bool,
        /// Every trainable parameter path.
        available: Vec<String>,
    },
    /// The model's frozen base is kept packed (NF4 or GGUF blocks), which selective updates
    /// cannot change: train an adapter method over a packed base, or load the base in f32.
    #[error(
        "the base of {} is kept packed ({}), and a selective method updates base weights; \
         load the model with `base = \"f32\"` or train an adapter (LoRA, AdaLoRA, RoSA, SFT) \
         over the packed base",
        if layers.len() == 1 { "1 layer".to_string() } else { format!("{} layers", layers.len()) },
        layers.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
    )]
    PackedBase {
        /// The layers whose base is packed.
        layers: Vec<String>,
    },
    /// The model does not have the parameter a summary or checkpoint refers to.
    #[error("the model has no trainable float parameter `{path}`")]
    UnknownParameter {
        /// The path that was looked for.
        path: String,
    },
    /// A parameter's shape differs between the model and a summary or checkpoint.
    #[error("parameter `{path}` has shape {found:?} in the model, but {expected:?} in the file")]
    ShapeMismatch {
        /// The parameter path.
        path: String,
        /// The shape recorded in the file.
        expected: Vec<usize>,
        /// The shape found in the model.
        found: Vec<usize>,
    },
    /// A summary or checkpoint file is inconsistent or was written for something else.
    #[error("{file}: {reason}")]
    InvalidFile {
        /// The file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The wrapped optimizer keeps state this wrapper cannot extend entry by entry.
    #[error(
        "optimizer state tensor `{name}` has shape {shape:?}; a selective optimizer needs state \
         with one value per trained entry (AdamW, Adam, SGD, RMSprop, ...)"
    )]
    UnsupportedOptimizerState {
        /// The state tensor's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// `verify` found more chosen entries than the budget allows.
    #[error("verify: {used} entries are chosen after step {step}, more than the budget {budget}")]
    BudgetExceeded {
        /// The step after which it was found.
        step: usize,
        /// Entries chosen.
        used: usize,
        /// The budget.
        budget: usize,
    },
    /// `verify` found an unchosen entry whose value changed.
    #[error(
        "verify: entry {index} of `{path}` is not chosen but changed from {before} to {after} \
         at step {step}"
    )]
    UnchosenEntryChanged {
        /// The step at which it changed.
        step: usize,
        /// The parameter.
        path: String,
        /// Row-major flat index of the entry.
        index: usize,
        /// Its value before training.
        before: f32,
        /// Its value now.
        after: f32,
    },
    /// An error from peft-core (I/O, JSON, safetensors).
    #[error(transparent)]
    Core(#[from] PeftError),
}

/// Result type of peft-selective.
pub type Result<T, E = SelectiveError> = std::result::Result<T, E>;

impl SelectiveError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn file(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::InvalidFile {
            file: file.into(),
            reason: reason.into(),
        }
    }
}

impl From<SelectiveError> for PeftError {
    fn from(e: SelectiveError) -> Self {
        match e {
            SelectiveError::Core(inner) => inner,
            other => PeftError::Unsupported(other.to_string()),
        }
    }
}
