//! The common PEFT fields have the same builders on every method config (`PeftConfig`), and
//! unset targets take PEFT's per-architecture defaults.

use peft_adalora::AdaLoraConfig;
use peft_conformance::{TinyModel, WeightModel, random_torch_weights};
use peft_core::{Method, ModuleSelector, PeftConfig, PeftError, PeftModel};
use peft_lora::LoraConfig;
use peft_rosa::RosaConfig;
use peft_sft::SftConfig;

fn base() -> WeightModel {
    let dev = burn::tensor::Device::flex();
    TinyModel::from_torch(&random_torch_weights(1, &dev), &dev)
}

/// The same builder calls on any method: excluded layers get no adapter, saved modules none
/// either, unset targets take the default of the model type or fail listing the candidates.
fn check<C: Method + PeftConfig>(label: &str, config: C) {
    let config = config
        .with_targets(ModuleSelector::names(["q_proj", "v_proj"]))
        .with_exclude(ModuleSelector::names(["layers.0.self_attn.v_proj"]))
        .with_modules_to_save(["classifier"])
        .with_task_type("SEQ_CLS")
        .with_base_model("tiny");
    let peft = PeftModel::new(base(), config.clone()).unwrap();
    assert_eq!(
        peft.adapters()["default"].layers,
        [
            "layers.0.self_attn.q_proj",
            "layers.1.self_attn.q_proj",
            "layers.1.self_attn.v_proj"
        ],
        "{label}"
    );

    let mut unset = config;
    *unset.common_mut().target_modules = None;
    *unset.common_mut().exclude_modules = None;
    match PeftModel::new(base(), unset.clone()) {
        Err(PeftError::TargetNotFound { available, .. }) => {
            assert!(
                available.iter().any(|a| a == "layers.1.mlp.up_proj"),
                "{label}"
            )
        }
        other => panic!("{label}: {other:?}"),
    }
    // The tiny model names its projections as LLaMA does.
    let peft = PeftModel::new(base(), unset.with_default_targets("llama")).unwrap();
    assert_eq!(peft.adapters()["default"].layers.len(), 4, "{label}");
}

#[test]
fn every_method_config_has_the_same_common_builders() {
    let any = || ModuleSelector::names(["q_proj"]);
    check("lora", LoraConfig::new(4, 8.0, any()));
    check("adalora", AdaLoraConfig::new(any(), 10));
    check("rosa", RosaConfig::new(4, 0.1, 8.0, any()));
    check("sft", SftConfig::new(0.1, any()));
}
