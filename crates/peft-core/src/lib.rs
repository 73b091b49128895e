//! # peft-core
//!
//! The method-independent core of burn-peft: which layers get adapters (Hugging Face PEFT's
//! matching rules over burn module paths), the two ways of attaching an adapter to a burn model,
//! per-layer adapter management (several named adapters, activation, merge/unmerge), the
//! Hugging Face PEFT file format, and the training step that runs method controllers.
//!
//! Methods (LoRA in `peft-lora`, …) implement [`Adapter`] for their per-layer adapter and
//! [`Method`] for their config; [`PeftModel`] then manages and saves them. The same adapter
//! value works in both attach paths:
//! * **activation space**: put [`PeftLinear`] / [`PeftEmbedding`] in your model where you want
//!   speed; the adapter works on activations and no dense weight gradient is formed;
//! * **weight space**: any plain `burn::nn::Linear` / `Embedding` of any model gets a
//!   [`WeightSlot`] through burn's reparameterization hook, with no change to the model.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod adapter;
pub mod config;
pub mod data_parallel;
pub mod error;
pub mod hf;
mod hook;
pub mod hosts;
pub mod io;
pub mod layer;
#[cfg(feature = "learner")]
pub mod learner;
pub mod method;
pub mod model;
mod modules_to_save;
pub mod reparam;
pub mod rng;
pub mod slot;
pub mod step;
pub mod target;

/// Which compiled body the CPU kernels run (peft-kernels' `cpu_body`), for tests that cover
/// every body.
pub use peft_kernels::cpu_body;
/// The fused linear and LoRA products ([`kernels::linear`], [`kernels::lora_linear`]): the
/// peft-kernels crate's `linear` module, which the layers and method crates call.
pub use peft_kernels::linear as kernels;
/// The products over a frozen base kept packed ([`packed_linear::packed_linear`],
/// [`packed_linear::packed_lora_linear`]): the peft-kernels crate's `packed_linear` module.
pub use peft_kernels::packed_linear;

pub use adapter::{Adapter, LinearBase};
pub use config::{ConfigWarning, PeftConfig, PeftConfigBase};
pub use data_parallel::{DataParallel, Reduction};
pub use error::{PeftError, Result};
pub use hf::KeyMap;
pub use hosts::{Created, HostView, Layer, LayerInfo, Placement};
pub use io::{LoadOptions, SaveOptions};
pub use layer::{PeftEmbedding, PeftLinear};
pub use method::{AdapterFactory, BiasMode, Method, TakeTensor};
pub use model::{AdapterEntry, PeftModel};
pub use reparam::WeightSlot;
pub use slot::AdapterSlot;
pub use step::{Controller, StepInfo, Stepper, Tuned};
pub use target::{
    Candidate, LayerIndices, LayerKind, LayersPattern, ModelType, ModuleSelector, TargetSpec,
    default_target_modules,
};
