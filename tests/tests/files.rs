//! File handling a PEFT user relies on: key remapping, clear errors for bad files, and nothing
//! half-written or half-loaded on failure.

use std::fs;

use burn::tensor::{Device, TensorData};
use peft_conformance::{
    ActivationModel, TinyModel, WeightModel, max_diff, random_torch_weights, token_ids,
};
use peft_core::hf::{self, KeyMap};
use peft_core::{ModuleSelector, PeftError};
use peft_lora::{InitLoraWeights, LoadOptions, LoraConfig, LoraModel, SaveOptions};

fn trained(device: &Device) -> LoraModel<WeightModel> {
    let base: WeightModel = TinyModel::from_torch(&random_torch_weights(4, device), device);
    let config = LoraConfig::new(4, 8.0, ModuleSelector::names(["q_proj", "v_proj"]))
        .with_init(InitLoraWeights::Random);
    LoraModel::new(base, config).unwrap()
}

fn fresh(device: &Device) -> ActivationModel {
    TinyModel::from_torch(&random_torch_weights(4, device), device)
}

#[test]
fn key_map_renames_modules_both_ways() {
    let device = Device::flex().autodiff();
    let peft = trained(&device);
    let map = KeyMap::new()
        .rule(
            r"^model\.decoder\.(\d+)\.",
            "layers.$1.",
            r"^layers\.(\d+)\.",
            "model.decoder.$1.",
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(
        dir.path(),
        &SaveOptions {
            key_map: map.clone(),
        },
    )
    .unwrap();
    let keys: Vec<String> = hf::read_tensors(&dir.path().join(hf::WEIGHTS_FILE))
        .unwrap()
        .into_keys()
        .collect();
    assert!(
        keys.contains(
            &"base_model.model.model.decoder.1.self_attn.q_proj.lora_A.weight".to_string()
        ),
        "{keys:?}"
    );
    assert!(keys.iter().all(|k| !k.contains(".default.")));
    let options = LoadOptions {
        key_map: map,
        ..Default::default()
    };
    let loaded = LoraModel::from_pretrained(fresh(&device), dir.path(), &options).unwrap();
    let ids = token_ids(&device);
    assert!(
        max_diff(
            &loaded.model().forward(ids.clone()),
            &peft.model().forward(ids)
        ) < 1e-5
    );
    // Without the map the file matches nothing the model has.
    let err = LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, PeftError::MissingTensor { .. }), "{err}");
}

#[test]
fn bad_files_give_errors_that_name_the_problem() {
    let device = Device::flex().autodiff();
    let peft = trained(&device);
    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let weights = dir.path().join(hf::WEIGHTS_FILE);
    let original = hf::read_tensors(&weights).unwrap();
    let key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight";

    // Wrong shape.
    let mut t = original.clone();
    t.insert(key.into(), TensorData::new(vec![0f32; 3 * 16], [3, 16]));
    hf::write_tensors(&weights, &t).unwrap();
    let err = LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, PeftError::ShapeMismatch { key: k, expected, found } if k == key && expected == &vec![4, 16] && found == &vec![3, 16]),
        "{err}"
    );

    // Missing tensor.
    let mut t = original.clone();
    t.remove(key);
    hf::write_tensors(&weights, &t).unwrap();
    let err = LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, PeftError::MissingTensor { key: k, .. } if k == key),
        "{err}"
    );

    // A tensor for a module the config does not target.
    let mut t = original.clone();
    t.insert(
        "base_model.model.layers.0.self_attn.k_proj.lora_A.weight".into(),
        TensorData::new(vec![0f32; 64], [4, 16]),
    );
    hf::write_tensors(&weights, &t).unwrap();
    let err = LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("k_proj.lora_A.weight"), "{err}");

    // Accepts PEFT-internal `.default.` infixes on read.
    let t: std::collections::BTreeMap<String, TensorData> = original
        .iter()
        .map(|(k, v)| {
            (
                k.replace(".lora_A.weight", ".lora_A.default.weight"),
                v.clone(),
            )
        })
        .collect();
    hf::write_tensors(&weights, &t).unwrap();
    LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default()).unwrap();

    // A config field set to something unsupported.
    let config_path = dir.path().join(hf::CONFIG_FILE);
    let mut cfg = hf::read_json(&config_path).unwrap();
    cfg.insert("use_qalora".into(), true.into());
    hf::write_json(&config_path, &cfg).unwrap();
    let err = LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, PeftError::UnsupportedField { field, .. } if field == "use_qalora"),
        "{err}"
    );

    // Garbage instead of safetensors.
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    fs::write(&weights, b"not a safetensors file").unwrap();
    let err = LoraModel::from_pretrained(fresh(&device), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, PeftError::Safetensors { .. }), "{err}");
}

#[test]
fn a_failed_load_leaves_the_model_unchanged() {
    let device = Device::flex().autodiff();
    let peft = trained(&device);
    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let weights = dir.path().join(hf::WEIGHTS_FILE);
    let mut t = hf::read_tensors(&weights).unwrap();
    t.remove("base_model.model.layers.1.self_attn.v_proj.lora_B.weight");
    hf::write_tensors(&weights, &t).unwrap();

    let mut target = LoraModel::new(
        fresh(&device),
        LoraConfig::new(2, 4.0, ModuleSelector::names(["o_proj"]))
            .with_init(InitLoraWeights::Random),
    )
    .unwrap();
    let ids = token_ids(&device);
    let before = target.model().forward(ids.clone());
    assert!(
        target
            .load_adapter(dir.path(), "other", &LoadOptions::default())
            .is_err()
    );
    assert_eq!(target.adapters().len(), 1);
    assert!(max_diff(&target.model().forward(ids.clone()), &before) == 0.0);
    // The same name can be loaded once the file is fixed.
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    target
        .load_adapter(dir.path(), "other", &LoadOptions::default())
        .unwrap();
    target.set_adapter(&["other"]).unwrap();
    assert!(
        max_diff(
            &target.model().forward(ids.clone()),
            &peft.model().forward(ids)
        ) < 1e-5
    );
}
