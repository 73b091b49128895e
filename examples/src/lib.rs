//! The logic of the runnable examples, as a library so that tests can call it directly.
//!
//! Each `examples/<name>.rs` is a thin `main` around one module here.

#![forbid(unsafe_code)]

pub mod bench;
pub mod bert_forward;
pub mod finetune;
pub mod quality;
pub mod supervised;

/// The Rust blocks of `README.md`, compiled and run as doctests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The Rust blocks of `docs/peft-for-python-users.md`, compiled and run as doctests.
#[doc = include_str!("../../docs/peft-for-python-users.md")]
#[cfg(doctest)]
pub struct PythonUsersDoctests;

/// `docs/architecture.md` (its blocks are `text`: nothing to run, but a Rust block added there
/// is compiled).
#[doc = include_str!("../../docs/architecture.md")]
#[cfg(doctest)]
pub struct ArchitectureDoctests;

/// `docs/benchmarks.md` (shell blocks only).
#[doc = include_str!("../../docs/benchmarks.md")]
#[cfg(doctest)]
pub struct BenchmarksDoctests;

/// `docs/quality.md` (shell blocks only).
#[doc = include_str!("../../docs/quality.md")]
#[cfg(doctest)]
pub struct QualityDoctests;
