//! Errors of model loading.

use std::path::PathBuf;

/// Result of model loading.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// What can go wrong when loading a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model folder or file that is not there.
    #[error("{what} not found at {path}: {hint}")]
    NotFound {
        /// What was looked for.
        what: String,
        /// Where.
        path: PathBuf,
        /// How to get it.
        hint: String,
    },
    /// A `config.json` that cannot be used.
    #[error("{file}: {message}")]
    Config {
        /// The configuration file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is missing from the checkpoint.
    #[error("{file}: tensor `{key}` is missing")]
    MissingTensor {
        /// The checkpoint.
        file: PathBuf,
        /// The key looked for (after the optional prefix).
        key: String,
    },
    /// A checkpoint tensor with the wrong shape or dtype.
    #[error("{file}: tensor `{key}` has shape {found:?} ({dtype}), expected {expected:?}")]
    BadTensor {
        /// The checkpoint.
        file: PathBuf,
        /// The key.
        key: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
        /// The dtype found.
        dtype: String,
    },
    /// A GGUF file that cannot be read (see [`crate::gguf::GgufError`]).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A tokenizer or chat template that cannot be built, loaded or applied.
    #[error("{source_name}: {message}")]
    Tokenizer {
        /// Where the tokenizer came from (a file, or a GGUF file's metadata).
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary (ids 0..{vocab_size})")]
    TokenOutOfVocab {
        /// The id.
        id: i64,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A prompt that does not fit the context of generation.
    #[error(
        "the prompt has {prompt_len} tokens but the context holds {context}; shorten the \
         prompt or raise the context limit"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_len: usize,
        /// The context limit.
        context: usize,
    },
    /// A key/value cache too small for the positions given.
    #[error("the key/value cache holds {capacity} positions but {needed} are needed")]
    CacheFull {
        /// Positions that would be held.
        needed: usize,
        /// The cache's capacity.
        capacity: usize,
    },
    /// A key/value cache used with another batch size than it was made for.
    #[error("the key/value cache was made for batch size {expected}, not {found}")]
    CacheBatch {
        /// The cache's batch size.
        expected: usize,
        /// The batch size given.
        found: usize,
    },
    /// A generation or loss setting or input that cannot be used.
    #[error("invalid `{field}`: {reason}")]
    InvalidInput {
        /// The option or argument.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor that cannot be held in the base format asked for (`[model] base`, `--base`).
    #[error("{file}: tensor `{key}` cannot be held as a `{base}` base: {reason}")]
    Packing {
        /// The checkpoint.
        file: PathBuf,
        /// The tensor.
        key: String,
        /// The base format ([`BaseFormat::name`](crate::BaseFormat::name)).
        base: &'static str,
        /// Why.
        reason: String,
    },
    /// Reading a file failed (I/O, safetensors or JSON format).
    #[error(transparent)]
    Peft(#[from] peft_core::PeftError),
}
