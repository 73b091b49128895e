//! Real model families for burn-peft: a BERT encoder and a LLaMA-architecture decoder that load
//! Hugging Face checkpoints (`config.json` + `model.safetensors`) and keep Hugging Face's module
//! paths, so PEFT `target_modules` such as `["query", "value"]` or `["q_proj", "v_proj"]` and
//! adapters saved by Python PEFT apply unchanged.
//!
//! Both models are generic over their linear layer type ([`LinearLayer`]):
//! `burn::nn::Linear` gives a plain model (adapters then attach in weight space, with no model
//! change), `peft_core::PeftLinear<A>` gives the fast activation-space path for adapter `A`.
//!
//! The models hold no kernels: the fused exact GELU, padded attention and layer norm BERT runs
//! with, the causal attention and SwiGLU of LLaMA and every linear layer's product are the
//! peft-kernels crate's (vectorised and multithreaded on flex, differentiable, default bodies on
//! the other backends), which a user's own model can call too.
//!
//! ```no_run
//! use peft_core::{ModuleSelector, PeftLinear};
//! use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
//! use peft_models::bert::Bert;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = burn::tensor::Device::flex();
//! let dir = peft_models::minilm_dir()?; // all-MiniLM-L6-v2, fetched by scripts/fetch_minilm.py
//! let (bert, _config) = Bert::<PeftLinear<LoraAdapter>>::from_pretrained(&dir, &device)?;
//! let lora = LoraModel::new(bert, LoraConfig::new(16, 32.0, ModuleSelector::names(["query", "value"])))?;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]

pub mod bert;
mod cache;
pub mod chat;
mod checkpoint;
mod error;
pub mod generate;
pub mod gguf;
mod layers;
pub mod llama;
pub mod loss;
pub mod tokenizer;

pub use cache::{MINILM_DIR_ENV, SMOLLM2_ENV, SMOLLM2_FILE, cache_dir, minilm_dir, smollm2_path};
pub use checkpoint::{
    Checkpoint, InMemory, SAFETENSORS_FILE, SAFETENSORS_INDEX, Safetensors, TensorSource,
};
pub use error::{ModelError, Result};
pub use layers::{BaseFormat, LayerNorm, LinearLayer, RmsNorm};
