//! # peft-adalora
//!
//! AdaLoRA (Zhang et al., ICLR 2023) for burn models, file-compatible with Hugging Face PEFT:
//! every adapted linear layer gets an SVD-form update `P·Λ·Q`, and a [`RankAllocator`] run by
//! peft-core's training step moves the rank budget to the matrices that matter, by masking
//! singular values on PEFT's cubic schedule. The orthogonality regularizer is added by the same
//! controller, so it cannot be forgotten.
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
