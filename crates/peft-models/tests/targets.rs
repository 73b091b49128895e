//! Unset `target_modules` on peft-models' models: `PeftModel::new_typed` gives them PEFT's
//! default for their type (LLaMA: `q_proj`, `v_proj`; BERT: `query`, `value`), as PEFT's
//! `get_peft_model` does; the generic `PeftModel::new`, and a model of a type without a
//! default, fail naming every candidate module.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Device;
use peft_core::{ModelType, ModuleSelector, PeftError, PeftLinear};
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
use peft_models::bert::Bert;
use peft_models::llama::Llama;

fn fixtures(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(path)
}

/// A LoRA config with `target_modules` unset.
fn unset() -> LoraConfig {
    let config = LoraConfig::default();
    assert!(config.base.target_modules.is_none());
    config
}

fn adapted<M: Module>(peft: &LoraModel<M>) -> Vec<String> {
    peft.adapters()["default"].layers.clone()
}

/// The candidates a `TargetNotFound` error lists, and its message.
fn candidates<T: std::fmt::Debug>(result: Result<T, PeftError>) -> (Vec<String>, String) {
    match result {
        Err(e @ PeftError::TargetNotFound { .. }) => {
            let message = e.to_string();
            let PeftError::TargetNotFound { available, .. } = e else {
                unreachable!()
            };
            (available, message)
        }
        other => panic!("expected TargetNotFound, got {other:?}"),
    }
}

#[test]
fn llama_gets_q_proj_and_v_proj() {
    let dev = Device::flex();
    let (llama, config) =
        Llama::<PeftLinear<LoraAdapter>>::from_pretrained(&fixtures("llama/tied"), &dev).unwrap();
    assert_eq!(llama.model_type(), Some("llama"));
    let peft = LoraModel::new_typed(llama.clone(), unset()).unwrap();
    let expected: Vec<String> = (0..config.num_hidden_layers)
        .flat_map(|i| ["q_proj", "v_proj"].map(|p| format!("model.layers.{i}.self_attn.{p}")))
        .collect();
    assert_eq!(adapted(&peft), expected);
    assert_eq!(
        peft.adapters()["default"].config.base.target_modules,
        Some(ModuleSelector::names(["q_proj", "v_proj"]))
    );

    // Targets that are set stay as they are.
    let named = LoraConfig::new(2, 4.0, ModuleSelector::names(["o_proj"]));
    let peft = LoraModel::new_typed(llama.clone(), named).unwrap();
    assert!(adapted(&peft).iter().all(|p| p.ends_with(".o_proj")));
    assert_eq!(adapted(&peft).len(), config.num_hidden_layers);

    // The generic constructor cannot know the type: it names the candidates and the way out.
    let (available, message) = candidates(LoraModel::new(llama, unset()));
    assert!(available.contains(&"model.layers.0.self_attn.q_proj".to_string()));
    assert!(available.contains(&"model.layers.1.mlp.down_proj".to_string()));
    assert!(message.contains("new_typed"), "{message}");
}

#[test]
fn bert_gets_query_and_value() {
    let dev = Device::flex();
    let (bert, config) =
        Bert::<PeftLinear<LoraAdapter>>::from_pretrained(&fixtures("bert/model"), &dev).unwrap();
    assert_eq!(bert.model_type(), Some("bert"));
    let peft = LoraModel::new_typed(bert, unset()).unwrap();
    let expected: Vec<String> = (0..config.num_hidden_layers)
        .flat_map(|i| ["query", "value"].map(|p| format!("encoder.layer.{i}.attention.self.{p}")))
        .collect();
    assert_eq!(adapted(&peft), expected);
}

#[derive(Module, Debug)]
struct Custom {
    first: Linear,
    second: Linear,
}

impl ModelType for Custom {
    fn model_type(&self) -> Option<&str> {
        Some("my-own-model")
    }
}

#[test]
fn a_type_without_a_default_names_every_candidate() {
    let dev = Device::flex();
    let custom = Custom {
        first: LinearConfig::new(4, 4).init(&dev),
        second: LinearConfig::new(4, 2).init(&dev),
    };
    let (available, message) = candidates(LoraModel::new_typed(custom, unset()));
    assert_eq!(available, ["first", "second"]);
    assert!(message.contains("first, second"), "{message}");
}
