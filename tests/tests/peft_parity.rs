//! Parity with Hugging Face PEFT 0.21.2: adapters saved by the real library (fixtures written by
//! `tests/fixtures/make_peft_fixtures.py`) load into the burn tiny model on both attach paths and
//! give PEFT's outputs, disabled outputs and merged outputs to 1e-5; and adapters saved by
//! burn-peft are the files the same script verified in PEFT (`tests/fixtures/burn_saved`).

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_conformance::{ActivationModel, TinyModel, WeightModel, fixture, max_diff};
use peft_core::hf;
use peft_lora::{LoadOptions, LoraModel, SaveOptions};
use serde_json::Value;

/// `allclose(atol=1e-5, rtol=1e-5)` on the largest element.
fn close(ours: &Tensor<3>, theirs: &Tensor<3>) -> Result<(), f32> {
    let d = max_diff(ours, theirs);
    let scale = theirs.clone().abs().max().into_scalar::<f32>();
    if d <= 1e-5 + 1e-5 * scale {
        Ok(())
    } else {
        Err(d)
    }
}

trait Run: Module {
    fn run(&self, ids: &Tensor<2, Int>) -> Tensor<3>;
}
impl Run for WeightModel {
    fn run(&self, ids: &Tensor<2, Int>) -> Tensor<3> {
        self.forward(ids.clone())
    }
}
impl Run for ActivationModel {
    fn run(&self, ids: &Tensor<2, Int>) -> Tensor<3> {
        self.forward(ids.clone())
    }
}

struct Expected {
    ids: Tensor<2, Int>,
    tensors: BTreeMap<String, TensorData>,
    meta: serde_json::Map<String, Value>,
}

impl Expected {
    fn load(case: &str, device: &Device) -> Self {
        let tensors =
            hf::read_tensors(&fixture(&format!("peft/{case}/expected.safetensors"))).unwrap();
        let ids = Tensor::from_data(tensors["input_ids"].clone(), device);
        let meta = hf::read_json(&fixture(&format!("peft/{case}/meta.json"))).unwrap();
        Self { ids, tensors, meta }
    }

    fn tensor(&self, key: &str, device: &Device) -> Tensor<3> {
        Tensor::from_data(self.tensors[key].clone(), device)
    }
}

trait Build: Sized {
    fn build(device: &Device) -> Self;
}
impl Build for WeightModel {
    fn build(device: &Device) -> Self {
        TinyModel::from_torch(&base_weights(), device)
    }
}
impl Build for ActivationModel {
    fn build(device: &Device) -> Self {
        TinyModel::from_torch(&base_weights(), device)
    }
}

fn base_weights() -> BTreeMap<String, TensorData> {
    hf::read_tensors(&fixture("peft/base_model.safetensors")).unwrap()
}

fn check_case<M: Run + Build>(case: &str, path_label: &str) {
    let device = Device::flex();
    let label = format!("{path_label}/{case}");
    let exp = Expected::load(case, &device);
    let dir = fixture(&format!("peft/{case}"));
    let mut peft =
        LoraModel::from_pretrained(M::build(&device), &dir, &LoadOptions::default()).unwrap();

    // Targeting and scaling exactly as PEFT.
    let mut targeted: Vec<String> = peft.adapters()["default"].layers.clone();
    targeted.sort();
    let expected_targets: Vec<String> = exp.meta["targeted_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(targeted, expected_targets, "{label}: targeted modules");
    let scaling = scalings(peft.model());
    for (module, s) in exp.meta["scaling"].as_object().unwrap() {
        let ours = scaling[module];
        assert!(
            (ours - s.as_f64().unwrap()).abs() < 1e-12,
            "{label}: scaling of {module}: {ours} vs {s}"
        );
    }

    let out = peft.model().run(&exp.ids);
    if let Err(d) = close(&out, &exp.tensor("output", &device)) {
        panic!("{label}: output differs by {d}");
    }

    peft.set_enabled(false);
    if let Err(d) = close(
        &peft.model().run(&exp.ids),
        &exp.tensor("base_output", &device),
    ) {
        panic!("{label}: disabled output differs by {d}");
    }
    peft.set_enabled(true);

    let merged = peft.clone().merge_and_unload(true).unwrap();
    if let Err(d) = close(&merged.run(&exp.ids), &exp.tensor("merged_output", &device)) {
        panic!("{label}: merged output differs by {d}");
    }
}

fn scalings<M: Module>(model: &M) -> BTreeMap<String, f64> {
    peft_core::hosts::collect(
        model,
        |h: &peft_core::HostView<'_, peft_lora::LoraAdapter>| {
            h.slot.get("default").map(|a| (h.path.clone(), a.scale))
        },
    )
    .into_iter()
    .collect()
}

const CASES: &[&str] = &[
    "lora_basic",
    "rslora_all_linear",
    "patterns",
    "regex_exclude",
    "dora",
    "bias_all_mts",
    "lora_only_bias",
    "embedding",
    "pissa",
];

#[test]
fn peft_adapters_match_on_the_weight_space_path() {
    for case in CASES {
        check_case::<WeightModel>(case, "weight");
    }
}

#[test]
fn peft_adapters_match_on_the_activation_space_path() {
    for case in CASES {
        check_case::<ActivationModel>(case, "activation");
    }
}
