//! The common PEFT fields are declared once (`PeftConfigBase`), parsed into it on every method
//! config, and have the same builders everywhere (`PeftConfig`); unset targets take PEFT's
//! per-architecture defaults.

use std::path::Path;

use peft_adalora::AdaLoraConfig;
use peft_conformance::{TinyModel, WeightModel, random_torch_weights};
use peft_core::{
    BiasMode, KeyMap, LayerIndices, LayersPattern, Method, ModuleSelector, PeftConfig,
    PeftConfigBase, PeftError, PeftModel,
};
use peft_lora::LoraConfig;
use peft_rosa::RosaConfig;
use peft_sft::SftConfig;
use serde_json::{Map, Value, json};

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
    unset.base_mut().target_modules = None;
    unset.base_mut().exclude_modules = None;
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

/// Parse `common` plus `own` (a method's own fields) as `adapter_config.json`, check that the
/// common fields are in the base, and return the config and what it writes back.
fn parse<C: Method>(common: &Value, own: Value) -> (C, Map<String, Value>) {
    let mut map = common.as_object().unwrap().clone();
    map.extend(own.as_object().unwrap().clone());
    let config = C::from_json(map, Path::new("adapter_config.json"), &KeyMap::default()).unwrap();
    let expected = PeftConfigBase {
        target_modules: Some(ModuleSelector::names(["q_proj", "v_proj"])),
        exclude_modules: Some(ModuleSelector::names(["layers.0.self_attn.v_proj"])),
        modules_to_save: Some(vec!["classifier".into()]),
        layers_to_transform: Some(LayerIndices::Many(vec![0, 1])),
        layers_pattern: Some(LayersPattern::One("layers".into())),
        bias: BiasMode::All,
        inference_mode: true,
        task_type: Some("CAUSAL_LM".into()),
        base_model_name_or_path: Some("tiny".into()),
        revision: Some("main".into()),
    };
    assert_eq!(config.base(), &expected, "{}", C::PEFT_TYPE);
    let out = config.to_json(&KeyMap::default());
    for (k, v) in common.as_object().unwrap() {
        assert_eq!(&out[k], v, "{}: `{k}` written back", C::PEFT_TYPE);
    }
    (config, out)
}

/// The key count of `text`'s occurrences of `"brand_new_field"`.
fn occurrences(text: &str) -> usize {
    text.matches("\"brand_new_field\"").count()
}

#[test]
fn common_fields_are_parsed_into_the_base_and_unknown_keys_into_extra_once() {
    let common = json!({
        "target_modules": ["q_proj", "v_proj"],
        "exclude_modules": ["layers.0.self_attn.v_proj"],
        "modules_to_save": ["classifier"],
        "layers_to_transform": [0, 1],
        "layers_pattern": "layers",
        "bias": "all",
        "inference_mode": true,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny",
        "revision": "main",
        "brand_new_field": {"kept": [1, 2]},
    });
    let unknown = || Some(&common["brand_new_field"]);
    let base_keys: Vec<&String> = common
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "brand_new_field")
        .collect();
    let no_base_key_in = |extra: &Map<String, Value>, label: &str| {
        for k in &base_keys {
            assert!(!extra.contains_key(*k), "{label}: `{k}` also in extra");
        }
    };

    let (lora, out) = parse::<LoraConfig>(&common, json!({"peft_type": "LORA"}));
    assert_eq!(lora.extra.get("brand_new_field"), unknown());
    assert_eq!(lora.unknown_fields(), ["brand_new_field"]);
    no_base_key_in(&lora.extra, "lora");
    assert_eq!(occurrences(&serde_json::to_string(&lora).unwrap()), 1);
    assert_eq!(occurrences(&serde_json::to_string(&out).unwrap()), 1);

    let (rosa, _) = parse::<RosaConfig>(&common, json!({"peft_type": "ROSA"}));
    assert_eq!(rosa.extra.get("brand_new_field"), unknown());
    assert_eq!(rosa.unknown_fields(), ["brand_new_field"]);
    no_base_key_in(&rosa.extra, "rosa");
    assert_eq!(occurrences(&serde_json::to_string(&rosa).unwrap()), 1);

    let (sft, _) = parse::<SftConfig>(&common, json!({"peft_type": "SFT"}));
    assert_eq!(sft.extra.get("brand_new_field"), unknown());
    assert_eq!(sft.unknown_fields(), ["brand_new_field"]);
    no_base_key_in(&sft.extra, "sft");
    assert_eq!(occurrences(&serde_json::to_string(&sft).unwrap()), 1);

    // AdaLoRA flattens LoRA's config, which holds the base and the one `extra`.
    let (ada, out) = parse::<AdaLoraConfig>(
        &common,
        json!({"peft_type": "ADALORA", "total_step": 10, "init_r": 6, "target_r": 2}),
    );
    assert_eq!(ada.lora.extra.get("brand_new_field"), unknown());
    assert_eq!(ada.lora.unknown_fields(), ["brand_new_field"]);
    no_base_key_in(&ada.lora.extra, "adalora");
    assert_eq!((ada.init_r, ada.target_r), (6, 2));
    assert_eq!(occurrences(&serde_json::to_string(&out).unwrap()), 1);
}

/// RoSA writes `lora_only` as its own name, `rosa_only`, and reads both.
#[test]
fn rosa_names_its_bias_rosa_only() {
    let common = json!({"target_modules": ["q_proj"], "bias": "rosa_only"});
    let mut map = common.as_object().unwrap().clone();
    map.insert("peft_type".into(), "ROSA".into());
    let rosa = RosaConfig::from_json(map.clone(), Path::new("a"), &KeyMap::default()).unwrap();
    assert_eq!(rosa.base.bias, BiasMode::LoraOnly);
    assert_eq!(rosa.to_json(&KeyMap::default())["bias"], "rosa_only");
    map.insert("bias".into(), "lora_only".into());
    let rosa = RosaConfig::from_json(map, Path::new("a"), &KeyMap::default()).unwrap();
    assert_eq!(rosa.to_json(&KeyMap::default())["bias"], "rosa_only");
    let lora = LoraConfig::new(4, 8.0, ModuleSelector::names(["q"])).with_bias(BiasMode::LoraOnly);
    assert_eq!(lora.to_json(&KeyMap::default())["bias"], "lora_only");
}

/// Every `adapter_config.json` Python PEFT wrote for the fixtures parses into the base plus
/// LoRA's own fields and `extra`, and is written back JSON-equal.
#[test]
fn python_peft_configs_round_trip() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let file = entry.unwrap().path().join("adapter_config.json");
        if !file.exists() {
            continue;
        }
        let map = peft_core::hf::read_json(&file).unwrap();
        let config =
            <LoraConfig as Method>::from_json(map.clone(), &file, &KeyMap::default()).unwrap();
        assert!(config.base.inference_mode, "{}", file.display());
        assert_eq!(
            Value::Object(config.to_json(&KeyMap::default())),
            Value::Object(map),
            "{}",
            file.display()
        );
        seen += 1;
    }
    assert!(seen >= 10, "{seen} fixture configs");
}

/// Attaching a method to a model whose `PeftLinear`s host another adapter type is an error
/// naming the layer, not a model with no adapter that trains nothing.
#[test]
fn layers_of_another_adapter_type_are_refused() {
    let dev = burn::tensor::Device::flex();
    let lora_typed: peft_conformance::ActivationModel =
        TinyModel::from_torch(&random_torch_weights(1, &dev), &dev);
    let err = PeftModel::new(
        lora_typed,
        // 1% of the whole model fits in `q_proj` (the reference's budget rule).
        SftConfig::new(0.01, ModuleSelector::names(["q_proj"])),
    )
    .unwrap_err();
    assert!(
        matches!(&err, PeftError::Unsupported(m)
            if m.contains("layers.0.self_attn.q_proj") && m.contains("another adapter type")),
        "{err}"
    );
}
