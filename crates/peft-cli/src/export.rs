//! A LLaMA-family model written as a Hugging Face folder that Transformers'
//! `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load:
//! `model.safetensors` (float32, `LlamaForCausalLM` names, linear weights `[out, in]`),
//! `config.json`, `generation_config.json` when the ids it needs are known, and the tokenizer
//! (`tokenizer.json`, `tokenizer_config.json` with the chat template).
//!
//! From a Hugging Face folder, the source's `config.json` is kept (its dtype set to float32)
//! and its generation and tokenizer files are copied; from a GGUF file they are written from
//! the GGUF metadata (the configuration [`peft_models::gguf::llama_config`] reads, the
//! tokenizer [`ModelTokenizer::from_gguf`] builds). Weights come from the loaded model, which
//! holds them in Transformers' layout whatever the source: the GGUF loader already un-permutes
//! llama.cpp's interleaved Q/K rows.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::TensorData;
use peft_models::llama::{LlamaConfig, RopeScaling};
use peft_models::tokenizer::ModelTokenizer;
use serde_json::{Map, Value, json};

use crate::model::ModelSource;

/// The tokenizer and generation files copied from a Hugging Face source folder, when present.
const HF_FILES: [&str; 6] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// The parameters of `model` (a [`Llama`](peft_models::llama::Llama) with any linear layers) under Transformers' `LlamaForCausalLM` names, float32, linear
/// weights transposed to PyTorch's `[out, in]` (burn keeps `[in, out]`); a tied head has no
/// `lm_head.weight`, as Transformers saves it.
///
/// # Errors
/// A parameter that `LlamaForCausalLM` does not have (an adapter left in the model).
pub fn hf_tensors<M: Module>(model: &M) -> anyhow::Result<BTreeMap<String, TensorData>> {
    let mut out = BTreeMap::new();
    for (key, data) in peft_core::hosts::read_params(model, |_| true) {
        if !is_llama_key(&key) {
            bail!(
                "parameter `{key}` is not one of Transformers' LlamaForCausalLM (an adapter \
                 that was not merged?)"
            );
        }
        let data = data.convert::<f32>();
        let linear = data.shape().len() == 2 && key != "model.embed_tokens.weight";
        out.insert(key, if linear { transposed(&data) } else { data });
    }
    Ok(out)
}

/// Whether `key` names a parameter of Transformers' `LlamaForCausalLM`.
fn is_llama_key(key: &str) -> bool {
    if matches!(
        key,
        "model.embed_tokens.weight" | "model.norm.weight" | "lm_head.weight"
    ) {
        return true;
    }
    let Some(rest) = key.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    matches!(
        rest,
        "input_layernorm.weight" | "post_attention_layernorm.weight"
    ) || rest.rsplit_once('.').is_some_and(|(module, param)| {
        matches!(param, "weight" | "bias")
            && matches!(
                module,
                "self_attn.q_proj"
                    | "self_attn.k_proj"
                    | "self_attn.v_proj"
                    | "self_attn.o_proj"
                    | "mlp.gate_proj"
                    | "mlp.up_proj"
                    | "mlp.down_proj"
            )
    })
}

/// A float32 matrix transposed (burn's `[in, out]` linear weight to PyTorch's `[out, in]`).
fn transposed(data: &TensorData) -> TensorData {
    let (rows, cols) = (data.shape()[0], data.shape()[1]);
    let v: Vec<f32> = data.iter::<f32>().collect();
    let mut out = vec![0f32; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = v[i * cols + j];
        }
    }
    TensorData::new(out, [cols, rows])
}

/// The weights file of a Hugging Face folder.
pub const WEIGHTS: &str = "model.safetensors";

/// Write [`WEIGHTS`] of `model` (a [`Llama`](peft_models::llama::Llama) with any linear layers) into `dir` (see
/// [`hf_tensors`]).
///
/// # Errors
/// As [`hf_tensors`]; I/O errors.
pub fn write_weights<M: Module>(model: &M, dir: &Path) -> anyhow::Result<()> {
    let file = dir.join(WEIGHTS);
    peft_core::hf::write_tensors(&file, &hf_tensors(model)?)
        .with_context(|| format!("writing {}", file.display()))
}

/// Write everything but the weights into `dir`: `config.json`, `generation_config.json` and
/// the tokenizer files of `source` (`config` is its configuration, `tokenizer` its tokenizer).
///
/// # Errors
/// An unreadable source file, a tokenizer that cannot be serialised, I/O errors.
pub fn write_metadata(
    source: &ModelSource,
    config: &LlamaConfig,
    tokenizer: &ModelTokenizer,
    dir: &Path,
) -> anyhow::Result<()> {
    match source {
        ModelSource::HfLlama(src) => {
            let file = src.join("config.json");
            let mut json = peft_core::hf::read_json(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            // The weights are written in float32.
            json.remove("torch_dtype");
            json.insert("dtype".into(), "float32".into());
            write_json(&dir.join("config.json"), &json)?;
            for name in HF_FILES {
                let from = src.join(name);
                if from.is_file() {
                    std::fs::copy(&from, dir.join(name))
                        .with_context(|| format!("copying {}", from.display()))?;
                }
            }
            Ok(())
        }
        ModelSource::Gguf(_) => {
            write_json(&dir.join("config.json"), &config_json(config, tokenizer)?)?;
            let generation = generation_json(tokenizer);
            if !generation.is_empty() {
                write_json(&dir.join("generation_config.json"), &generation)?;
            }
            let text = tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
            std::fs::write(dir.join("tokenizer.json"), text).context("writing tokenizer.json")?;
            let tokenizer_config = tokenizer_config_json(config, tokenizer);
            write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)
        }
        ModelSource::HfBert(src) => bail!(
            "{}: a BERT encoder, not a causal language model",
            src.display()
        ),
    }
}

fn write_json(file: &Path, json: &Map<String, Value>) -> anyhow::Result<()> {
    peft_core::hf::write_json(file, json).with_context(|| format!("writing {}", file.display()))
}

/// `config.json` of `LlamaForCausalLM` for `config`, with the tokenizer's special ids.
fn config_json(
    config: &LlamaConfig,
    tokenizer: &ModelTokenizer,
) -> anyhow::Result<Map<String, Value>> {
    if config.rope_scaling != RopeScaling::None {
        bail!("writing a rotary scaling into config.json is not supported");
    }
    let Value::Object(mut json) = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "attention_dropout": 0.0,
        "use_cache": true,
        "dtype": "float32",
    }) else {
        unreachable!("an object literal")
    };
    json.extend(special_ids(tokenizer));
    Ok(json)
}

/// `bos_token_id`, `eos_token_id` and `pad_token_id`, those the tokenizer has.
fn special_ids(tokenizer: &ModelTokenizer) -> Map<String, Value> {
    let mut ids = Map::new();
    for (key, id) in [
        ("bos_token_id", tokenizer.bos_token_id()),
        ("eos_token_id", tokenizer.eos_token_id()),
        ("pad_token_id", tokenizer.pad_token_id()),
    ] {
        if let Some(id) = id {
            ids.insert(key.into(), id.into());
        }
    }
    ids
}

/// `generation_config.json`: the special ids the tokenizer knows (empty when none).
fn generation_json(tokenizer: &ModelTokenizer) -> Map<String, Value> {
    special_ids(tokenizer)
}

/// `tokenizer_config.json` of a fast tokenizer: the special tokens, whether BOS/EOS are added,
/// the chat template and the context length.
fn tokenizer_config_json(config: &LlamaConfig, tokenizer: &ModelTokenizer) -> Map<String, Value> {
    let mut json = Map::new();
    json.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    let token = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
    for (key, value) in [
        ("bos_token", token(tokenizer.bos_token_id())),
        ("eos_token", token(tokenizer.eos_token_id())),
        ("pad_token", token(tokenizer.pad_token_id())),
        ("unk_token", token(tokenizer.unk_token_id())),
    ] {
        if let Some(value) = value {
            json.insert(key.into(), value.into());
        }
    }
    json.insert("add_bos_token".into(), tokenizer.add_bos_token().into());
    json.insert("add_eos_token".into(), tokenizer.add_eos_token().into());
    json.insert("clean_up_tokenization_spaces".into(), false.into());
    json.insert(
        "model_max_length".into(),
        config.max_position_embeddings.into(),
    );
    if let Some(template) = tokenizer.chat_template_source() {
        json.insert("chat_template".into(), template.into());
    }
    json
}
