//! # peft-adalora
//!
//! AdaLoRA (Zhang et al., ICLR 2023) for burn models, file-compatible with Hugging Face PEFT:
//! every adapted linear layer gets an SVD-form update `P·Λ·Q`, and a [`RankAllocator`] run by
//! peft-core's training step moves the rank budget to the matrices that matter, by masking
//! singular values on PEFT's cubic schedule. The orthogonality regularizer is added by the same
//! controller, so it cannot be forgotten.
//!
//! A complete training loop: attach, take the model's stepper (it holds the allocator), train,
//! save in PEFT's format (truncated to the kept ranks: the rank pattern is written into the
//! config after every step, as PEFT's `update_and_allocate` does).
//!
//! ```
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::AdamWConfig;
//! use burn::tensor::{Device, Distribution, Tensor};
//! use peft_adalora::{AdaLoraConfig, AdaLoraModel, ModuleSelector, SaveOptions, Stepper};
//!
//! #[derive(burn::module::Module, Debug)]
//! struct Mlp {
//!     up: Linear,
//!     down: Linear,
//! }
//!
//! let device = Device::flex().autodiff();
//! let model = Mlp {
//!     up: LinearConfig::new(16, 32).init(&device),
//!     down: LinearConfig::new(32, 4).init(&device),
//! };
//! let total_steps = 20;
//! let config = AdaLoraConfig::new(ModuleSelector::names(["up", "down"]), total_steps)
//!     .with_ranks(6, 2) // init_r 6, on average 2 kept at the end
//!     .with_schedule(2, 5, 2); // tinit, tfinal, deltaT
//! let mut peft = AdaLoraModel::new(model, config)?;
//!
//! // The allocator (and the orthogonality regularizer) run inside every step.
//! let mut stepper = peft.stepper(total_steps)?;
//! let mut optim = AdamWConfig::new().init();
//! let x = Tensor::<2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device);
//! for _ in 0..total_steps {
//!     let m = peft.model();
//!     let loss = (m.down.forward(m.up.forward(x.clone())) - 1.0).powi_scalar(2).mean();
//!     stepper.train(&mut peft, &mut optim, 1e-2, loss)?;
//! }
//! let pattern = peft.adapters()["default"].config.rank_pattern.clone().unwrap();
//! assert!(pattern.values().flatten().filter(|k| **k).count() <= 4); // target_r 2 x 2 matrices
//! let dir = tempfile::tempdir().unwrap();
//! peft.save_pretrained(dir.path(), &SaveOptions::default())?;
//!
//! // Without the allocator, training is refused.
//! let m = peft.model();
//! let loss = (m.down.forward(m.up.forward(x)) - 1.0).powi_scalar(2).mean();
//! let refused = Stepper::new().train(&mut peft, &mut optim, 1e-2, loss);
//! assert!(matches!(refused, Err(peft_adalora::PeftError::MissingController { .. })));
//! # Ok::<(), peft_adalora::PeftError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod adapter;
pub mod allocator;
pub mod config;
mod method;

pub use adapter::AdaLoraAdapter;
pub use allocator::{AllocatorState, RankAllocator, budget_schedule, orthogonality};
pub use config::AdaLoraConfig;
/// What a user of this crate touches from peft-core, so that one dependency is enough.
pub use peft_core::{
    AdapterEntry, LayerIndices, LayersPattern, LoadOptions, ModelType, ModuleSelector, PeftConfig,
    PeftConfigBase, PeftEmbedding, PeftError, PeftLinear, PeftModel, SaveOptions, Stepper, Tuned,
    default_target_modules,
};
pub use peft_core::{BiasMode, Result};

/// A burn model carrying AdaLoRA adapters: [`PeftModel`](peft_core::PeftModel) with
/// [`AdaLoraConfig`] as its method.
pub type AdaLoraModel<M> = peft_core::PeftModel<M, AdaLoraConfig>;
