//! # peft-kernels
//!
//! The compute kernels of burn-peft, in one crate: every op that needs more than burn's own ops
//! (its own CPU loops, `unsafe`, or a CubeCL source) lives here, so that the crates above it
//! (peft-core, peft-models, the method crates) are plain safe Rust (`#![forbid(unsafe_code)]`).
//!
//! - [`linear`] / [`lora_linear`] ([`LinearBackend`], module [`mod@linear`]): the linear-layer
//!   product and the LoRA layer as one differentiable op (peft-core re-exports the module as
//!   `peft_core::kernels`).
//! - [`gelu`], [`swiglu`], [`attention`], [`causal_attention`], [`layer_norm`], [`rms_norm`],
//!   [`rotary`] (module [`nn`]): the models' non-GEMM hot spots.
//! - [`cross_entropy`]: the LM head and the causal-LM loss as one op, without the logits.
//! - `cube` (features `wgpu`, `cuda`): the `#[cube]` sources of sparse-kernels' CubeCL bodies.
//! - The CPU helpers the kernels here and in sparse-kernels share: [`cpu_body`] (which compiled
//!   body runs, and [`multiversion!`] to compile a loop for each), [`cpu`] (outputs written
//!   uninitialised, in parallel blocks), and [`mmap::map_file`] (read-only file maps for the
//!   checkpoint readers).
//! - [`quant`] and [`packed_linear`]: frozen base weights kept packed at 4 or 8 bits (NF4 with
//!   optional double quantization, GGUF's `Q4_0` / `Q4_1` / `Q8_0` blocks) and the linear product
//!   that reads them without building the f32 weight.
//!
//! Each op is a burn backend extension: a fast body on `Flex` (f32), default bodies from the
//! backend's own ops on the CubeCL backends (and flex's other dtypes), and a hand-written
//! backward pass on `Autodiff`.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! let device = Device::flex();
//! let x = Tensor::<2>::from_floats([[-1.0, 0.0, 2.0]], &device);
//! let w = Tensor::<2>::from_floats([[1.0], [2.0], [3.0]], &device);
//! let y = peft_kernels::linear(peft_kernels::gelu(x.clone()), w.clone(), None);
//! let reference = burn::tensor::activation::gelu(x).matmul(w);
//! assert!((y - reference).abs().max().into_scalar::<f32>() < 1e-5);
//! ```

pub mod cpu;
pub mod cpu_body;
pub mod cross_entropy;
#[cfg(feature = "cube")]
#[allow(missing_docs)] // `#[cube(launch)]` generates undocumented launch functions.
pub mod cube;
pub mod linear;
pub mod mmap;
pub mod nn;
pub mod packed_linear;
pub mod quant;

pub use linear::{LinearBackend, linear, lora_linear};
pub use nn::{
    AttentionBackend, GeluBackend, LayerNormBackend, RmsNormBackend, RotaryBackend, SwiGluBackend,
    attention, causal_attention, gelu, layer_norm, rms_norm, rotary, swiglu,
};
