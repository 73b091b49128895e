//! # peft-adalora
//!
//! AdaLoRA (Zhang et al., ICLR 2023) for burn models, file-compatible with Hugging Face PEFT:
//! every adapted linear layer gets an SVD-form update `P·Λ·Q`, and a [`RankAllocator`] run by
//! peft-core's training step moves the rank budget to the matrices that matter, by masking
//! singular values on PEFT's cubic schedule. The orthogonality regularizer is added by the same
//! controller, so it cannot be forgotten.
//!
//! A complete training loop: attach, train with the allocator in the step, write the final
//! rank pattern into the config, save in PEFT's format (truncated to the kept ranks).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//!
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::AdamWConfig;
//! use burn::tensor::{Device, Distribution, Tensor};
//! use peft_adalora::{AdaLoraConfig, AdaLoraModel, RankAllocator, SaveOptions};
//! use peft_core::ModuleSelector;
//! use peft_core::step::Stepper;
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
//! let mut peft = AdaLoraModel::new(model, config.clone())?;
//!
//! // The allocator (and the orthogonality regularizer) run inside every step.
//! let allocator = Arc::new(Mutex::new(RankAllocator::new(&config, "default")?));
//! let mut stepper = Stepper::new().with(allocator.clone());
//! let mut optim = AdamWConfig::new().init();
//! let x = Tensor::<2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device);
//! for _ in 0..total_steps {
//!     let model = peft.model().clone();
//!     let y = model.down.forward(model.up.forward(x.clone()));
//!     let loss = (y - 1.0).powi_scalar(2).mean();
//!     let next = stepper.step(model, &mut optim, 1e-2, loss)?;
//!     peft.map_model(|_| next);
//! }
//!
//! let allocator = allocator.lock().unwrap();
//! let kept: usize = allocator.rank_pattern().unwrap().values().flatten().filter(|k| **k).count();
//! assert!(kept <= 4); // target_r 2 x 2 matrices
//! allocator.write_rank_pattern(&mut peft)?;
//! let dir = tempfile::tempdir().unwrap();
//! peft.save_pretrained(dir.path(), &SaveOptions::default())?;
//! # Ok::<(), peft_core::PeftError>(())
//! ```
#![warn(missing_docs)]

pub mod adapter;
pub mod allocator;
pub mod config;
mod method;

pub use adapter::AdaLoraAdapter;
pub use allocator::{AllocatorState, RankAllocator, budget_schedule, orthogonality};
pub use config::AdaLoraConfig;
pub use peft_core::{LoadOptions, SaveOptions};

/// A burn model carrying AdaLoRA adapters: [`PeftModel`](peft_core::PeftModel) with
/// [`AdaLoraConfig`] as its method.
pub type AdaLoraModel<M> = peft_core::PeftModel<M, AdaLoraConfig>;
