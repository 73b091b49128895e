//! CSR sparse kernels for burn: the Rust counterpart of IST-DASLab's `spops`.
//!
//! - [`CsrStructure`]: a validated CSR pattern with `u32` indices (no int16 cap), explicit zeros
//!   kept, an optional load-balancing row order; built from a mask, flat indices or a top-k.
//! - [`CsrLayout`]: the structure on a device (with its transpose, for backward passes);
//!   [`Csr`]: a layout plus a values tensor that can be a `Param`.
//! - Ops on burn tensors, on every device, differentiable: [`spmm`], [`sddmm`], [`csr_add`],
//!   [`csr_gather`], [`to_dense`], [`csr_transpose`], and the adapter terms [`sparse_linear`]
//!   (`y = x·Sᵀ`) and [`sparse_linear_fused`] (`y = x·(W + S)ᵀ + b`, frozen `W`).
//! - [`sparse_lora_linear`] ([`SparseLinearBackend`]): a whole RoSA or SFT layer, `x·W + b
//!   (+ s·x·A·B) + x·Sᵀ`, as one op whose SpMM accumulates into the dense product's output and
//!   whose backward pass accumulates `g·S` into `g·Wᵀ (+ (s·g·Bᵀ)·Aᵀ)` (peft-core's LoRA op).
//! - Backends through burn's `#[backend_extension]` ([`SparseBackend`]): multithreaded CPU
//!   kernels for `Flex`, CubeCL kernels (sources in peft-kernels' `cube` module) for every CubeCL
//!   runtime (features `wgpu`, `cuda`), and hand-written backward passes for `Autodiff`.
//! - [`grad_topk_probe`] ([`ProbeBackend`]): candidate scores for sparse reselection, the
//!   top-`k` of `|dYᵀ·x|` computed block by block in a backward pass and sent to a
//!   [`ProbeSink`], without a dense weight gradient.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use sparse_kernels::{CsrLayout, CsrStructure, sparse_linear};
//!
//! let device = Device::flex().autodiff();
//! // S is [out = 2, in = 3] with entries (0, 1) and (1, 0), (1, 2).
//! let mask = [false, true, false, true, false, true];
//! let layout = CsrLayout::new(CsrStructure::from_mask(2, 3, &mask).unwrap(), &device);
//! let values = Tensor::<1>::from_floats([2.0, 1.0, -1.0], &device).require_grad();
//! let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
//! let y = sparse_linear(x, &layout, values.clone());
//! assert_eq!(y.to_data().to_vec::<f32>().unwrap(), vec![4.0, -2.0]);
//! let grads = y.sum().backward();
//! // dS[o, i] = Σ_t dY[t, o] · x[t, i] on the entries only.
//! let dv = values.grad(&grads).unwrap();
//! assert_eq!(dv.to_data().to_vec::<f32>().unwrap(), vec![2.0, 1.0, 3.0]);
//! ```

mod backend;
#[cfg(feature = "flex")]
mod cpu;
#[cfg(feature = "cube")]
mod cube;
mod error;
mod fused;
mod layout;
mod ops;
mod probe;
#[cfg(feature = "flex")]
mod simd;
mod structure;

/// Which compiled body the CPU kernels run (peft-kernels' `cpu_body`, shared with the dense
/// kernels), for tests that cover every body.
pub use peft_kernels::cpu_body;

pub use backend::{CsrIndices, SparseBackend};
pub use error::SparseError;
pub use fused::{
    MERGE_RATIO, SparseLinearBackend, merge_pays, packed_sparse_lora_linear, sparse_grad_sample,
    sparse_lora_linear,
};
pub use layout::{Csr, CsrLayout};
pub use ops::{
    csr_add, csr_gather, csr_transpose, sddmm, sparse_linear, sparse_linear_fused, spmm, to_dense,
};
pub use probe::{ProbeBackend, ProbeResult, ProbeSink, default_probe_block, grad_topk_probe};
pub use structure::{CsrStructure, MAX_INDEX};
