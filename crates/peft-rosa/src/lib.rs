//! # peft-rosa
//!
//! RoSA (Nikdan et al., 2024): each targeted weight gets a low-rank adapter and a sparse
//! adapter whose mask comes from accumulated weight gradients (a diagonal Fisher),
//! `y = x·Wᵀ + b + s·drop(x)·Aᵀ·Bᵀ + x·Sᵀ`.
//!
//! - [`RosaConfig`] is peft-rosa's config (`peft_type: "ROSA"`) and a peft-core
//!   [`Method`](peft_core::Method): [`RosaModel`] gets adapter management, merge / unmerge,
//!   safe merge and the two-file save/load of every method.
//! - [`RosaAdapter`]: on the activation path ([`PeftLinear`](peft_core::PeftLinear)) the sparse
//!   term runs on the CSR kernels of `sparse-kernels` (SpMM forward, SDDMM gradient of the
//!   values): no dense weight-shaped tensor after mask generation. On the weight-space path it
//!   is one combined reparameterization `W + s·A·B + Sᵀ`.
//! - [`RosaScheduler`], a training-step controller: the schedule (`default`, `wl<N>`,
//!   `spa_only`, `lora_only`), gradient collection through zero probes (the frozen base never
//!   becomes trainable), per-layer top-k masks, state for resumes.
//! - `RosaModel::stepper(total_steps)` gives the scheduler; with a `wl<N>` schedule it runs the
//!   paper's recipe (warm-up, masks, restart of the factors) inside one run.
//!   [`generate_masks`], [`restart_with_masks`], [`two_phase`] keep the reference's two-run
//!   form. [`RosaMasks`] saves and loads masks by exact module path; masks known in-process
//!   are given when attaching ([`MaskedAdapters`], [`InitialMasks`]), never in the config.
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::SgdConfig;
//! use burn::tensor::{Device, Tensor};
//! use peft_core::{ModuleSelector, PeftLinear, step::Stepper};
//! use peft_rosa::{RosaConfig, RosaModel, RosaScheduler};
//!
//! #[derive(Module, Debug)]
//! struct Net {
//!     proj: PeftLinear<peft_rosa::RosaAdapter>,
//! }
//!
//! let device = Device::flex().autodiff();
//! let net = Net { proj: LinearConfig::new(8, 4).init(&device).into() };
//! // Rank 2, density 25 %: 8 sparse entries; one step of LoRA with gradient collection.
//! let config = RosaConfig::new(2, 0.25, 4.0, ModuleSelector::names(["proj"]));
//! let mut model = RosaModel::new(net, config.clone()).unwrap();
//! let mut scheduler = RosaScheduler::new(&config, "default").unwrap();
//! let mut net = scheduler.prepare(model.model().clone()).unwrap();
//! let mut stepper = Stepper::new().with(scheduler);
//! let mut optim = SgdConfig::new().init();
//! let x = Tensor::<2>::ones([3, 8], &device);
//! for _ in 0..3 {
//!     let loss = net.proj.forward(x.clone()).powi_scalar(2).mean().reshape([1]);
//!     net = stepper.step(net, &mut optim, 0.1, loss).unwrap();
//! }
//! let adapter = net.proj.adapters.get("default").unwrap();
//! assert_eq!(adapter.spa_csr().unwrap().layout.nnz(), 8);
//! model.map_model(|_| net);
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod adapter;
mod config;
mod initial;
mod masks;
mod method;
mod recipe;
mod scheduler;

pub use adapter::RosaAdapter;
pub use config::{Agenda, GradAccMode, InitRosaWeights, RosaConfig, Schedule, Segment};
pub use initial::{InitialMasks, MaskedAdapters};
pub use masks::RosaMasks;
/// What a user of this crate touches from peft-core, so that one dependency is enough.
pub use peft_core::{
    AdapterEntry, LayerIndices, LayersPattern, LoadOptions, ModelType, ModuleSelector, PeftConfig,
    PeftConfigBase, PeftEmbedding, PeftError, PeftLinear, PeftModel, SaveOptions, Stepper, Tuned,
    default_target_modules,
};
pub use peft_core::{BiasMode, Result};
pub use recipe::{generate_masks, restart_with_masks, two_phase};
pub use scheduler::{RosaScheduler, install_masks};

/// A model with RoSA adapters.
pub type RosaModel<M> = peft_core::PeftModel<M, RosaConfig>;
