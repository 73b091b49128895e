//! The library behind the `burn-peft` program: one module per subcommand ([`forward`],
//! [`generate`], [`tokenize`], [`train`], [`eval`], [`merge`]) and [`model`], which detects a
//! GGUF file or a Hugging Face folder and loads the model, its tokenizer and an adapter for all
//! of them; [`completion`] holds the prompt and stop handling that generation and evaluation
//! share, [`export`] writes a LLaMA model as a Hugging Face folder. The examples reuse
//! [`model::read_inputs`] (the `forward` input contract).

#![forbid(unsafe_code)]

pub mod completion;
pub mod eval;
pub mod export;
pub mod forward;
pub mod generate;
pub mod merge;
pub mod model;
pub mod tokenize;
pub mod train;
