//! # peft-selective
//!
//! Selective PEFT for burn models: train a budgeted subset of the model's own entries instead of
//! adding adapters. Three ways to choose the entries, after the `selective-optimizers` toolkit
//! ("Step-by-Step Unmasking for Parameter-Efficient Fine-tuning of Large Language Models"):
//! * **ID3**: unmask `u(t) = B / T + [t < B % T]` entries per step for `T` steps, the unchosen
//!   entries of highest `D3 = |g| / (eps + |θ|)^exp`, globally across parameters;
//! * **PaFI**: the budget's smallest-magnitude entries, chosen once;
//! * **BitFit**: every 1-D parameter, as the toolkit (or only the biases, the paper's set), cut at
//!   the budget.
//!
//! [`SelectiveOptimizer`] wraps any burn [`Optimizer`](burn::optim::Optimizer) (AdamW, SGD, ...)
//! and runs it on the chosen entries only: unchosen entries stay bit-identical, the optimizer
//! state is `O(budget)`, the budget is never exceeded, and the optimizer's weight decay is off as
//! the toolkit forces it (`decay_chosen` keeps it on the chosen entries). The result is a [`Summary`] of the
//! chosen entries' values keyed by parameter path, `O(budget)` on disk.
//!
//! ```
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::{AdamWConfig, GradientsParams};
//! use burn::tensor::{Device, Tensor};
//! use peft_selective::{SelectiveConfig, SelectiveOptimizer, Summary};
//!
//! #[derive(burn::module::Module, Debug)]
//! struct Mlp {
//!     up: Linear,
//!     head: Linear,
//! }
//!
//! let device = Device::flex().autodiff();
//! let model = Mlp {
//!     up: LinearConfig::new(8, 16).init(&device),
//!     head: LinearConfig::new(16, 2).init(&device),
//! };
//! let base = model.clone();
//! // 40 entries: the head's 34 in full plus 6 more found by ID3 over 3 steps.
//! let config = SelectiveConfig::id3(40, 3).with_choose_all_regex(r"^head\.")?;
//! let mut optim = SelectiveOptimizer::new(&model, config, AdamWConfig::new().build())?;
//! let mut model = model;
//! for _ in 0..5 {
//!     let x = Tensor::<2>::ones([4, 8], &device);
//!     let loss = model.head.forward(model.up.forward(x)).powi_scalar(2).mean();
//!     let grads = GradientsParams::from_grads(loss.backward(), &model);
//!     model = optim.step(1e-2, model, grads)?;
//! }
//! assert_eq!(optim.budget_used(), 40);
//!
//! let dir = tempfile::tempdir().unwrap();
//! optim.summary(&model)?.save(dir.path())?;
//! let restored = Summary::load(dir.path())?.apply(base)?;
//! let (a, b) = (restored.up.weight.val(), model.up.weight.val());
//! assert_eq!(a.into_data(), b.into_data());
//! # Ok::<(), peft_selective::SelectiveError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
mod controller;
pub mod error;
mod flat_state;
mod format;
pub mod optimizer;
mod params;
pub mod schedule;
mod select;
pub mod state;
pub mod summary;

pub use config::{Id3Config, Selection, SelectiveConfig};
pub use controller::{SELECTIVE_ADAPTER, SelectiveModel};
pub use error::{Result, SelectiveError};
pub use optimizer::{MemoryReport, SelectiveOptimizer};
pub use schedule::UnmaskSchedule;
pub use summary::{Summary, SummaryEntry};

/// What a user of this crate touches from peft-core, so that one dependency is enough.
pub use peft_core::{
    LoadOptions, ModuleSelector, PeftError, PeftLinear, SaveOptions, Stepper, Tuned,
};
