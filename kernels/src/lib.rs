//! Compute kernels of burn-peft (partial: the packed 4-bit base).
#![allow(unsafe_code)]

pub mod packed_linear;
pub mod quant;
