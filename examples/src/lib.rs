//! The logic of the runnable examples, as a library so that tests can call it directly.
//!
//! Each `examples/<name>.rs` is a thin `main` around one module here.

pub mod bench;
pub mod bert_forward;
pub mod finetune;
