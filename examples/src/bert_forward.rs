//! `bert_forward`: run a Hugging Face BERT checkpoint, optionally with a Python-PEFT adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::{Device, Int, Tensor};
use peft_core::{LoadOptions, Method, PeftLinear, PeftModel};
use peft_models::bert::{Bert, BertConfig};

/// Command-line options of `bert_forward`.
#[derive(clap::Parser, Debug, Clone)]
#[command(about = "Run a Hugging Face BERT model (optionally with a PEFT adapter) on token ids")]
pub struct Args {
    /// Model folder: `config.json` + `model.safetensors` (with or without the `bert.` prefix).
    #[arg(long)]
    pub model: PathBuf,
    /// Safetensors file with `input_ids` and `attention_mask`, integer `[batch, seq]`.
    #[arg(long)]
    pub input: PathBuf,
    /// Safetensors file to write `last_hidden_state` (float32 `[batch, seq, hidden]`) to.
    #[arg(long)]
    pub output: PathBuf,
    /// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), LoRA
    /// (incl. rsLoRA, DoRA, patterns) or AdaLoRA, as Python PEFT 0.21 saves it for `BertModel`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Merge the adapter into the base weights before running (checked for NaN/Inf).
    #[arg(long, requires = "adapter")]
    pub merge: bool,
}

/// Run the model as `args` say and write the output file (atomically).
///
/// # Errors
/// Unreadable or invalid model, input or adapter, with the offending file, tensor or module
/// named.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let device = Device::default();
    let config = BertConfig::from_dir(&args.model)?;
    let inputs = peft_cli::model::read_inputs(
        &args.input,
        config.vocab_size,
        config.max_position_embeddings,
        &device,
    )?;
    let (ids, mask) = (inputs.ids, inputs.mask);
    let hidden = match &args.adapter {
        None => {
            let bert = Bert::<burn::nn::Linear>::from_dir_with(&args.model, &config, &device)?;
            bert.forward(ids, mask)
        }
        Some(adapter) => match peft_type(adapter)?.as_str() {
            "LORA" => {
                forward_with::<peft_lora::LoraConfig>(args, &config, adapter, ids, mask, &device)?
            }
            "ADALORA" => forward_with::<peft_adalora::AdaLoraConfig>(
                args, &config, adapter, ids, mask, &device,
            )?,
            "ROSA" => {
                forward_with::<peft_rosa::RosaConfig>(args, &config, adapter, ids, mask, &device)?
            }
            other => bail!(
                "{}: peft_type `{other}` is not supported by bert_forward (LORA, ADALORA, ROSA)",
                adapter.join("adapter_config.json").display()
            ),
        },
    };
    let mut out = BTreeMap::new();
    out.insert("last_hidden_state".to_string(), hidden.into_data());
    peft_core::hf::write_tensors(&args.output, &out)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}

fn forward_with<C: Method>(
    args: &Args,
    config: &BertConfig,
    adapter: &Path,
    ids: Tensor<2, Int>,
    mask: Tensor<2, Int>,
    device: &Device,
) -> anyhow::Result<Tensor<3>> {
    let bert = Bert::<PeftLinear<C::Adapter>>::from_dir_with(&args.model, config, device)?;
    let peft = PeftModel::<_, C>::from_pretrained(bert, adapter, &LoadOptions::default())
        .with_context(|| format!("loading the adapter in {}", adapter.display()))?;
    let model = if args.merge {
        peft.merge_and_unload(true)?
    } else {
        peft.into_model()
    };
    Ok(model.forward(ids, mask))
}

fn peft_type(adapter: &Path) -> anyhow::Result<String> {
    let file = adapter.join("adapter_config.json");
    let config = peft_core::hf::read_json(&file)?;
    config
        .get("peft_type")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .with_context(|| format!("{}: no `peft_type`", file.display()))
}
