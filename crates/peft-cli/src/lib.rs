//! The library behind the `burn-peft` program: one module per subcommand ([`forward`],
//! [`generate`], [`tokenize`], [`train`]) and [`model`], which detects a GGUF file or a Hugging Face folder
//! and loads the model, its tokenizer and an adapter for all of them. The examples reuse
//! [`model::read_inputs`] (the `forward` input contract).

pub mod forward;
pub mod generate;
pub mod model;
pub mod tokenize;
pub mod train;
