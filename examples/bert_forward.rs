//! # bert_forward: a Hugging Face BERT checkpoint, optionally with a Python-PEFT adapter
//!
//! ```sh
//! cargo run --release --example bert_forward -- --model DIR --input IN.safetensors \
//!     --output OUT.safetensors [--adapter ADAPTER_DIR] [--merge]
//! ```
//!
//! Reads `input_ids` and `attention_mask` (int64, `[batch, seq]`) from IN, runs the model (with
//! the LoRA / rsLoRA / DoRA / AdaLoRA adapter that Python PEFT saved in ADAPTER_DIR, merged into
//! the weights first with `--merge`), and writes `last_hidden_state` (float32,
//! `[batch, seq, hidden]`) to OUT. Bad input exits non-zero with the file and tensor named.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    burn_peft_examples::bert_forward::run(&burn_peft_examples::bert_forward::Args::parse())
}
