//! `burn-peft tokenize`: the token ids of a text, space-separated on one line, with no special
//! tokens added (special tokens written in the text, such as `<|im_start|>`, are matched whole).

use std::path::PathBuf;

use anyhow::Context;

use crate::model;

/// Options of `burn-peft tokenize`.
#[derive(clap::Args, Debug, Clone)]
pub struct TokenizeArgs {
    /// The model whose tokenizer to use: a `.gguf` file (tokenizer in its metadata) or a
    /// Hugging Face model folder with `tokenizer.json`.
    #[arg(long)]
    pub model: PathBuf,
    /// The text to tokenize.
    #[arg(long)]
    pub text: String,
}

/// Run `burn-peft tokenize`.
///
/// # Errors
/// A missing or unreadable model or tokenizer.
pub fn run(args: &TokenizeArgs) -> anyhow::Result<()> {
    let source = model::detect(&args.model)?;
    let tokenizer = model::load_tokenizer(&source)?;
    let ids = tokenizer
        .encode(&args.text, false)
        .context("tokenizing the text")?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}
