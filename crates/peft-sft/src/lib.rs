//! # peft-sft
//!
//! SFT / SpIEL (Ansell et al., 2024): each targeted weight gets a sparse delta, `k` values at
//! unique flat indices, `W' = W + Δ`; during training the weakest entries are dropped and new
//! ones grown, by accumulated gradient (RigL, "SpIEL-AG") or by SM3 moment estimates
//! ("SpIEL-MA").
//!
//! - [`SftConfig`] is the reference's config (`peft_type: "SFT"`) and a peft-core
//!   [`Method`](peft_core::Method): [`SftModel`] gets adapter management, merge / unmerge and
//!   the two-file save/load (`sft_delta.values`, `sft_delta.indices` as integers);
//!   attaching splits the budget across the targets as the reference does
//!   ([`SftConfig::allocate`]).
//! - [`SftAdapter`]: on the activation path the delta runs on the CSR kernels of
//!   `sparse-kernels` (SpMM forward, SDDMM gradient at the `k` indices): no `W + Δ` and no
//!   dense weight gradient, also when RigL needs candidate scores (the top-`k` of `|dW|` is
//!   computed block by block in the backward pass by
//!   [`grad_topk_probe`](sparse_kernels::grad_topk_probe)). On the weight-space path it is a
//!   dense scatter, and RigL reads the dense weight gradient that autodiff forms there anyway.
//! - [`SftSelector`], a training-step controller: the deltas' optimizer ([`SftAdamW`] with
//!   per-entry step counts, or [`SftSm3`]; O(k) state), the [`SelectionSchedule`], RigL and SM3
//!   drop-and-grow with state kept for retained entries, and state files for resumes.
//! - [`Sm3Config`]: dense SM3 as a burn optimizer (an accumulator per dimension), the module
//!   optimizer that steps the other trainable tensors (biases, `modules_to_save`) as the
//!   reference's `SftSM3` does in an SM3 run.
//!
//! ```
//! use burn::nn::LinearConfig;
//! use burn::optim::SgdConfig;
//! use burn::tensor::{Device, Tensor};
//! use peft_sft::{ModuleSelector, PeftLinear, SftAdapter, SftConfig, SftModel};
//!
//! #[derive(burn::module::Module, Debug)]
//! struct Net {
//!     proj: PeftLinear<SftAdapter>,
//! }
//!
//! let device = Device::flex().autodiff();
//! let net = Net { proj: LinearConfig::new(8, 4).init(&device).into() };
//! // A quarter of all 36 parameters (weight and bias): 9 deltas in the weight (attaching
//! // splits the budget as the reference does); reselect every 4 steps after 2 steps of RigL
//! // statistics.
//! let config = SftConfig::new(0.25, ModuleSelector::names(["proj"])).with_steps(4, 2);
//! let mut model = SftModel::new(net, config)?;
//! // The selector (the deltas' optimizer and the reselection) comes with the stepper; the
//! // deltas train at the step's learning rate.
//! let mut stepper = model.stepper(10)?;
//! let mut optim = SgdConfig::new().init();
//! let x = Tensor::<2>::ones([3, 8], &device);
//! for _ in 0..6 {
//!     let loss = model.model().proj.forward(x.clone()).powi_scalar(2).mean();
//!     stepper.train(&mut model, &mut optim, 0.1, loss)?;
//! }
//! let adapter = model.model().proj.adapters.get("default").unwrap();
//! assert_eq!(adapter.num_deltas(), 9);
//! # Ok::<(), peft_sft::PeftError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod adapter;
mod config;
mod method;
mod optimizer;
mod schedule;
mod selection;
mod selector;
mod sm3;

pub use adapter::{SftAdapter, random_indices};
pub use config::{InitDeltas, RatePolicy, SelectionAlgorithm, SftConfig};
pub use method::{INDICES_KEY, VALUES_KEY};
pub use optimizer::{AdamState, SftAdamW, SftOptimizer, SftSm3, Sm3State};
/// What a user of this crate touches from peft-core, so that one dependency is enough.
pub use peft_core::{
    AdapterEntry, LayerIndices, LayersPattern, LoadOptions, ModelType, ModuleSelector, PeftConfig,
    PeftConfigBase, PeftEmbedding, PeftError, PeftLinear, PeftModel, SaveOptions, Stepper, Tuned,
    default_target_modules,
};
pub use peft_core::{BiasMode, Result};
pub use schedule::SelectionSchedule;
pub use selection::{Candidates, Replacement, rigl_plan, sm3_plan, smallest};
pub use selector::{SelectionReport, SftSelector};
pub use sm3::{Sm3, Sm3Config, Sm3TensorState};

/// A model with SFT adapters.
pub type SftModel<M> = peft_core::PeftModel<M, SftConfig>;
