//! # peft-lora
//!
//! LoRA, rsLoRA and DoRA for burn models, file-compatible with Hugging Face PEFT.
//!
//! ```
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Device, Tensor};
//! use peft_core::ModuleSelector;
//! use peft_lora::{LoraConfig, LoraModel};
//!
//! #[derive(burn::module::Module, Debug)]
//! struct Mlp {
//!     up: burn::nn::Linear,
//!     down: burn::nn::Linear,
//! }
//!
//! let device = Device::flex().autodiff();
//! let model = Mlp {
//!     up: LinearConfig::new(8, 16).init(&device),
//!     down: LinearConfig::new(16, 8).init(&device),
//! };
//! let config = LoraConfig::new(4, 8.0, ModuleSelector::names(["up", "down"]));
//! let peft = LoraModel::new(model, config)?;
//! let (trainable, total) = peft.trainable_parameters();
//! assert_eq!(trainable, 4 * (8 + 16) * 2);
//! assert!(total > trainable);
//! # Ok::<(), peft_core::PeftError>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod adapter;
pub mod config;
mod method;
pub mod weighted;

pub use adapter::{LoraAdapter, init_factors, lora_scaling};
pub use config::{BiasMode, InitLoraWeights, LoraConfig};
/// What a user of this crate touches from peft-core, so that one dependency is enough.
pub use peft_core::{
    AdapterEntry, LayerIndices, LayersPattern, LoadOptions, ModelType, ModuleSelector, PeftConfig,
    PeftConfigBase, PeftEmbedding, PeftError, PeftLinear, PeftModel, SaveOptions, Stepper, Tuned,
    default_target_modules,
};
pub use weighted::{Combination, WeightedAdapters};

/// A burn model carrying LoRA adapters: [`PeftModel`](peft_core::PeftModel) with
/// [`LoraConfig`] as its method. Management (`set_adapter`, `merge_adapter`, …) and PEFT
/// files (`save_pretrained`, `from_pretrained`) come from `PeftModel`;
/// [`WeightedAdapters::add_weighted_adapter`] is LoRA's own.
pub type LoraModel<M> = peft_core::PeftModel<M, LoraConfig>;
