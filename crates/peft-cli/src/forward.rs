//! `burn-peft forward`: one forward pass over token ids read from a safetensors file.
//!
//! For a causal LM (LLaMA family) the output file holds `logits` (float32
//! `[batch, seq, vocab]`), for BERT `last_hidden_state` (float32 `[batch, seq, hidden]`), as
//! Transformers' `LlamaForCausalLM` and `BertModel` compute them with the same attention mask.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::tensor::{Device, Tensor};
use peft_models::bert::{Bert, BertConfig};
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::{BaseFormat, LinearLayer};

use crate::model::{self, BertJob, Inputs, LlamaJob, ModelSource};

/// Options of `burn-peft forward`.
#[derive(clap::Args, Debug, Clone)]
pub struct ForwardArgs {
    /// The model: a `.gguf` file or a Hugging Face model folder (`config.json` with
    /// `model_type` `llama` or `bert`, and `model.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// Safetensors file with `input_ids` and `attention_mask`, int64 `[batch, seq]`.
    #[arg(long)]
    pub input: PathBuf,
    /// Safetensors file to write: `logits` (causal LM) or `last_hidden_state` (BERT), float32.
    /// Written through a temporary file and a rename.
    #[arg(long)]
    pub output: PathBuf,
    /// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`): LoRA (with
    /// rsLoRA, DoRA, patterns), AdaLoRA, RoSA or SFT, as Python PEFT / `burn-peft train` save
    /// them; or a selective summary folder, or a `full` run's `model.safetensors` (LLaMA).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Merge the adapter into the base weights before running (checked for NaN/Inf).
    #[arg(long, requires = "adapter")]
    pub merge: bool,
    /// How the frozen base weights of a causal LM are held: `f32`, `bf16`, `nf4`, `nf4-dq` or
    /// `gguf` (see `burn-peft generate --help`).
    #[arg(long, default_value = "f32")]
    pub base: BaseFormat,
}

/// Run `burn-peft forward`.
///
/// # Errors
/// Bad model, adapter or input (named); an output that cannot be written.
pub fn run(args: &ForwardArgs) -> anyhow::Result<()> {
    let device = Device::default();
    let source = model::detect(&args.model)?;
    let adapter = args.adapter.as_deref();
    let (key, output) = match &source {
        ModelSource::HfBert(dir) => {
            anyhow::ensure!(
                !args.base.is_packed(),
                "--base {}: a packed base is available for causal LMs (LLaMA family); BERT \
                 loads in f32",
                args.base
            );
            let config = BertConfig::from_dir(dir)
                .with_context(|| format!("reading the model config in {}", dir.display()))?;
            let inputs = model::read_inputs(
                &args.input,
                config.vocab_size,
                config.max_position_embeddings,
                &device,
            )?;
            let hidden = model::with_bert(dir, &config, adapter, args.merge, &device, inputs)?;
            ("last_hidden_state", hidden)
        }
        _ => {
            let config = model::llama_config(&source)?;
            let inputs = model::read_inputs(
                &args.input,
                config.vocab_size,
                config.max_position_embeddings,
                &device,
            )?;
            let logits =
                model::with_llama(&source, adapter, args.merge, args.base, &device, inputs)?;
            ("logits", logits)
        }
    };
    write_output(&args.output, key, output)
}

impl LlamaJob for Inputs {
    type Output = Tensor<3>;

    fn run<L: LinearLayer>(self, model: Llama<L>, _: &LlamaConfig) -> anyhow::Result<Tensor<3>> {
        Ok(model.forward(self.ids, Some(self.mask)))
    }
}

impl BertJob for Inputs {
    type Output = Tensor<3>;

    fn run<L: LinearLayer>(self, model: Bert<L>, _: &BertConfig) -> anyhow::Result<Tensor<3>> {
        Ok(model.forward(self.ids, self.mask))
    }
}

/// Write `tensor` as `key` to `file` (float32), atomically.
fn write_output(file: &Path, key: &str, tensor: Tensor<3>) -> anyhow::Result<()> {
    let data = tensor.into_data().convert::<f32>();
    let mut out = BTreeMap::new();
    out.insert(key.to_string(), data);
    peft_core::hf::write_tensors(file, &out)
        .with_context(|| format!("writing the output file {}", file.display()))
}
