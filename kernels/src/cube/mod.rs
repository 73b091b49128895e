//! The `#[cube]` sources of sparse-kernels' CubeCL bodies (its `cube.rs` launches them),
//! compiled by CubeCL for every runtime: wgpu (Vulkan, Metal, DX12, WebGPU, GL), CUDA and ROCm.
//! One source per op; semantics in `shared/specs/rosa-sft-selective.md` §2.3.
//!
//! | module | kernel | one thread per |
//! |---|---|---|
//! | [`spmm`] | `C = S·B` | output element |
//! | [`sddmm`] | `out[k] = dot(A[row k], Bᵀ[col k])` | stored entry (row found by binary search) |
//! | [`csr_add`] | `D[row k, col k] += v[k]`, gather `v[k] = D[row k, col k]`, strided copy | stored entry / element |

pub mod csr_add;
pub mod sddmm;
pub mod spmm;
