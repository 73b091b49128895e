//! Typed errors of peft-core.

use std::path::PathBuf;

/// Everything that can go wrong when attaching, managing, saving or loading adapters.
///
/// Errors caused by bad configurations, files or adapter names are reported here; misuse of
/// tensors (wrong ranks in a forward pass) panics, as in burn itself.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// No module of the model matched the target specification.
    #[error("target modules {pattern} matched no module of the model; available modules: {}", available.join(", "))]
    TargetNotFound {
        /// The target specification as the user wrote it.
        pattern: String,
        /// Every module path that could have been targeted.
        available: Vec<String>,
    },
    /// A configuration field holds a value this library does not implement.
    #[error("config field `{field}` = {value} is not supported: {reason}")]
    UnsupportedField {
        /// Name of the field, as in `adapter_config.json`.
        field: String,
        /// The offending value, JSON-encoded.
        value: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A configuration field holds a value that is invalid for every implementation.
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig {
        /// Name of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor in a file does not have the shape the model expects.
    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor's key in the file.
        key: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor the adapter needs is absent from the file.
    #[error("adapter file {file} has no tensor `{key}`")]
    MissingTensor {
        /// The file that was read.
        file: PathBuf,
        /// The key that was looked for.
        key: String,
    },
    /// A file holds tensors that no module of the model can take.
    #[error("adapter file {file} has tensors that match no adapted module: {}", keys.join(", "))]
    UnexpectedTensors {
        /// The file that was read.
        file: PathBuf,
        /// Keys left over after loading.
        keys: Vec<String>,
    },
    /// A tensor has a dtype the loader cannot convert.
    #[error("tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor's key.
        key: String,
        /// The dtype found.
        dtype: String,
    },
    /// The adapter name is unknown.
    #[error("no adapter named `{name}`; adapters: [{}]", available.join(", "))]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The adapters the model has.
        available: Vec<String>,
    },
    /// An adapter with this name exists already.
    #[error("an adapter named `{name}` already exists")]
    DuplicateAdapter {
        /// The name asked for.
        name: String,
    },
    /// The operation is impossible while the adapter is merged into the base weights.
    #[error("adapter `{name}` is merged; unmerge it first")]
    AdapterMerged {
        /// The merged adapter.
        name: String,
    },
    /// Merging would produce NaN or infinite weights; nothing was changed.
    #[error(
        "NaNs detected in the merged weights. The adapter {name} seems to be broken (module {module})"
    )]
    NonFiniteMerge {
        /// The adapter whose delta is not finite.
        name: String,
        /// The first module where it was detected.
        module: String,
    },
    /// An adapter whose method needs a training-time controller is trained by a stepper that
    /// has none for it.
    #[error(
        "adapter `{adapter}` ({method}) needs its controller to train; build the stepper with \
         `PeftModel::stepper(total_steps)` instead of `Stepper::new()`"
    )]
    MissingController {
        /// The adapter without controller.
        adapter: String,
        /// Its method's `peft_type`.
        method: String,
    },
    /// The operation is not available for this kind of layer or adapter.
    #[error("{0}")]
    Unsupported(String),
    /// JSON could not be parsed or written.
    #[error("{file}: {source}")]
    Json {
        /// The file involved.
        file: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// A safetensors file could not be parsed or written.
    #[error("{file}: {message}")]
    Safetensors {
        /// The file involved.
        file: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// An I/O error, with the path it concerns.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A regular expression in the config does not compile.
    #[error("invalid regular expression `{pattern}`: {source}")]
    Regex {
        /// The pattern as written.
        pattern: String,
        /// The compiler's complaint.
        source: regex::Error,
    },
}

/// Result type of peft-core.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

impl PeftError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Build an [`PeftError::UnsupportedField`].
    pub fn unsupported_field(
        field: &str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self::UnsupportedField {
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}
