//! Parity with Hugging Face PEFT 0.21.2: adapters saved by the real library (fixtures written by
//! `tests/fixtures/make_peft_fixtures.py`) load into the burn tiny model on both attach paths and
//! give PEFT's outputs, disabled outputs and merged outputs to 1e-5; and adapters saved by
//! burn-peft are the files the same script verified in PEFT (`tests/fixtures/burn_saved`).

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_conformance::{ActivationModel, TinyModel, WeightModel, fixture, max_diff};
use peft_core::hf;
use peft_lora::{Combination, LoadOptions, LoraModel, SaveOptions, WeightedAdapters};
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

fn check_weighted<M: Run + Build>(label: &str) {
    let device = Device::flex();
    let exp = Expected::load("weighted", &device);
    let dir = fixture("peft/weighted");
    let opts = LoadOptions::default();
    let mut peft = LoraModel::from_pretrained(M::build(&device), &dir, &opts).unwrap();
    for sub in ["other", "cat_mix", "svd_mix"] {
        peft.load_adapter(&dir.join(sub), &format!("peft_{sub}"), &opts)
            .unwrap();
    }
    let expect = |key: &str| exp.tensor(key, &device);
    let mut run = |names: &[&str]| {
        peft.set_adapter(names).unwrap();
        peft.model().run(&exp.ids)
    };
    for (names, key) in [
        (&["default"][..], "output_default"),
        (&["peft_other"][..], "output_other"),
        (&["default", "peft_other"][..], "output_both"),
        (&["peft_cat_mix"][..], "output_cat_mix"),
        (&["peft_svd_mix"][..], "output_svd_mix"),
    ] {
        if let Err(d) = close(&run(names), &expect(key)) {
            panic!("{label}: {key} differs by {d}");
        }
    }
    // Our own combinations of the two sources give PEFT's results.
    peft.add_weighted_adapter(
        &["default", "peft_other"],
        &[0.7, -0.4],
        "cat",
        Combination::Cat,
    )
    .unwrap();
    peft.add_weighted_adapter(
        &["default", "peft_other"],
        &[0.7, -0.4],
        "svd",
        Combination::Svd { rank: Some(4) },
    )
    .unwrap();
    let mixes = exp.meta["mixes"].as_object().unwrap();
    for (ours, theirs) in [("cat", "cat_mix"), ("svd", "svd_mix")] {
        let cfg = &peft.adapters()[ours].config;
        assert_eq!(
            cfg.r as u64,
            mixes[theirs]["r"].as_u64().unwrap(),
            "{label}: {ours} r"
        );
        assert_eq!(
            cfg.lora_alpha,
            mixes[theirs]["lora_alpha"].as_f64().unwrap()
        );
        peft.set_adapter(&[ours]).unwrap();
        if let Err(d) = close(
            &peft.model().run(&exp.ids),
            &expect(&format!("output_{theirs}")),
        ) {
            panic!("{label}: our {ours} mix differs from PEFT's by {d}");
        }
    }
    // cat is exact: with weights 1 the concatenated adapter is both sources active together
    // (PEFT's `output_both`), up to rounding.
    peft.add_weighted_adapter(
        &["default", "peft_other"],
        &[1.0, 1.0],
        "cat_ones",
        Combination::Cat,
    )
    .unwrap();
    peft.set_adapter(&["cat_ones"]).unwrap();
    if let Err(d) = close(&peft.model().run(&exp.ids), &expect("output_both")) {
        panic!("{label}: cat with weights 1 differs from both adapters active by {d}");
    }
    // One weight per adapter: a mismatch is a config error naming `weights`.
    let err = peft
        .add_weighted_adapter(&["default"], &[1.0, 2.0], "bad", Combination::Cat)
        .unwrap_err();
    assert!(
        matches!(&err, peft_core::PeftError::InvalidConfig { field, .. } if field == "weights"),
        "{err:?}"
    );
}

#[test]
fn multiple_adapters_and_weighted_combinations_match_peft() {
    check_weighted::<WeightModel>("weight");
    check_weighted::<ActivationModel>("activation");
}

/// Configs written by burn-peft and checked in PEFT by `make_peft_fixtures.py verify`.
fn burn_cases() -> Vec<(&'static str, peft_lora::LoraConfig)> {
    use peft_core::{LayerIndices, LayersPattern, ModuleSelector};
    use peft_lora::{BiasMode, LoraConfig, PeftConfig};
    vec![
        (
            "rslora_embedding",
            LoraConfig::new(
                4,
                6.0,
                ModuleSelector::names(["q_proj", "v_proj", "embed_tokens"]),
            )
            .with_rslora(true),
        ),
        (
            "dora",
            LoraConfig::new(
                4,
                8.0,
                ModuleSelector::names(["q_proj", "k_proj", "down_proj"]),
            )
            .with_dora(true),
        ),
        (
            "bias_all_mts",
            LoraConfig::new(4, 2.0, ModuleSelector::names(["k_proj", "up_proj"]))
                .with_bias(BiasMode::All)
                .with_modules_to_save(["classifier"]),
        ),
        (
            "lora_only_bias",
            LoraConfig::new(3, 7.0, ModuleSelector::names(["q_proj", "up_proj"]))
                .with_bias(BiasMode::LoraOnly),
        ),
        (
            "patterns_regex",
            LoraConfig::new(
                4,
                8.0,
                ModuleSelector::names(["q_proj", "v_proj", "up_proj"]),
            )
            .with_layers(
                LayerIndices::Many(vec![1]),
                Some(LayersPattern::One("layers".into())),
            )
            .with_rank_pattern("layers.1.self_attn.q_proj", 2)
            .with_alpha_pattern("v_proj", 3.0),
        ),
        (
            "regex_exclude",
            LoraConfig::new(
                2,
                5.0,
                ModuleSelector::regex(r".*\.(up_proj|down_proj|o_proj)"),
            )
            .with_exclude(ModuleSelector::names(["layers.0.mlp.down_proj"])),
        ),
    ]
}

/// Give every trainable tensor (adapters, trained biases, saved modules) deterministic values.
fn fill_trainable<M: Module>(peft: &mut LoraModel<M>) {
    let values: BTreeMap<String, TensorData> = peft_core::hosts::parameters(peft.model())
        .into_iter()
        .enumerate()
        .filter(|(_, (_, trainable, _))| *trainable)
        .map(|(i, (path, _, _))| (i, path))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|(i, path)| {
            let current = peft_core::hosts::read_params(peft.model(), |p| p == path);
            let shape = current[&path].shape().to_vec();
            let n = shape.iter().product();
            let mut v = peft_conformance::spread(7, i, n, 0.4);
            if path.ends_with("magnitude") {
                v.iter_mut().for_each(|x| *x += 1.5);
            }
            (path, TensorData::new(v, shape))
        })
        .collect();
    peft.map_model(|m| peft_core::hosts::write_params(m, values).0);
}

fn build_burn_case(case: &str, config: &peft_lora::LoraConfig) -> LoraModel<WeightModel> {
    let device = Device::flex().autodiff();
    let mut peft = LoraModel::new(WeightModel::build(&device), config.clone()).unwrap();
    fill_trainable(&mut peft);
    assert!(peft.trainable_parameters().0 > 0, "{case}");
    peft
}

/// What `make_peft_fixtures.py verify` recorded for one case: the SHA-256 of every adapter file
/// PEFT loaded and PEFT's own outputs on the case's input.
struct Verified {
    sha256: BTreeMap<String, String>,
    peft_outputs: BTreeMap<String, TensorData>,
}

impl Verified {
    fn load(case_dir: &std::path::Path) -> Self {
        let record = hf::read_json(&case_dir.join("verified.json")).unwrap_or_else(|e| {
            panic!(
                "{}: no verification record ({e}); run verify",
                case_dir.display()
            )
        });
        let sha256 = record["sha256"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(file, hash)| (file.clone(), hash.as_str().unwrap().to_string()))
            .collect();
        let outputs = case_dir.join(record["peft_outputs"].as_str().unwrap());
        let peft_outputs = hf::read_tensors(&outputs).unwrap();
        Self {
            sha256,
            peft_outputs,
        }
    }

    /// Panics unless `dir` holds exactly the adapter files PEFT verified, byte for byte.
    fn assert_same_files(&self, case: &str, dir: &std::path::Path) {
        use sha2::Digest;
        for (file, hash) in &self.sha256 {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let ours = format!("{:x}", sha2::Sha256::digest(&bytes));
            assert_eq!(&ours, hash, "{case}: {file} is not the file PEFT verified");
        }
        assert!(
            self.sha256.contains_key(hf::WEIGHTS_FILE) && self.sha256.contains_key(hf::CONFIG_FILE),
            "{case}: the record names both files"
        );
    }
}

/// Adapters saved by burn-peft are the files PEFT loaded in `make_peft_fixtures.py verify`
/// (same SHA-256, so the same keys, shapes, values and config), and our outputs equal the
/// outputs PEFT recorded for them. With `BURN_PEFT_WRITE_FIXTURES` set, the test rewrites the
/// adapters and fails until verify has been run on them.
#[test]
fn burn_saved_adapters_are_the_files_peft_verified() {
    let write = std::env::var_os("BURN_PEFT_WRITE_FIXTURES").is_some();
    let device = Device::flex();
    let ids: Tensor<2, Int> = Tensor::from_data(
        hf::read_tensors(&fixture("peft/lora_basic/expected.safetensors")).unwrap()["input_ids"]
            .clone(),
        &device,
    );
    for (case, config) in burn_cases() {
        let peft = build_burn_case(case, &config);
        let committed = fixture(&format!("burn_saved/{case}"));
        let output = peft.model().valid().run(&ids.clone());
        if write {
            peft.save_pretrained(&committed, &SaveOptions::default())
                .unwrap();
            let mut t = BTreeMap::new();
            t.insert("input_ids".to_string(), ids.clone().into_data());
            t.insert("output".to_string(), output.clone().into_data());
            hf::write_tensors(&committed.join("expected.safetensors"), &t).unwrap();
            for stale in ["verified.json", "peft_outputs.safetensors"] {
                let _ = std::fs::remove_file(committed.join(stale));
            }
            continue;
        }
        let verified = Verified::load(&committed);
        // What we write today is, byte for byte, what PEFT loaded.
        let fresh = tempfile::tempdir().unwrap();
        peft.save_pretrained(fresh.path(), &SaveOptions::default())
            .unwrap();
        verified.assert_same_files(case, fresh.path());
        verified.assert_same_files(case, &committed);
        // Our outputs are PEFT's, before the save and after loading the file on both paths.
        let theirs_ids: Tensor<2, Int> =
            Tensor::from_data(verified.peft_outputs["input_ids"].clone(), &device);
        assert_eq!(
            theirs_ids.into_data(),
            ids.clone().into_data(),
            "{case}: input_ids"
        );
        let expected: Tensor<3> =
            Tensor::from_data(verified.peft_outputs["output"].clone(), &device);
        if let Err(d) = close(&output, &expected) {
            panic!("{case}: output differs from PEFT's by {d}");
        }
        let w = LoraModel::from_pretrained(
            WeightModel::build(&device),
            &committed,
            &LoadOptions::default(),
        )
        .unwrap();
        let a = LoraModel::from_pretrained(
            ActivationModel::build(&device),
            &committed,
            &LoadOptions::default(),
        )
        .unwrap();
        for (label, out) in [
            ("weight", w.model().run(&ids)),
            ("activation", a.model().run(&ids)),
        ] {
            if let Err(d) = close(&out, &expected) {
                panic!("{case}/{label}: reloaded output differs from PEFT's by {d}");
            }
        }
    }
    assert!(
        !write,
        "fixtures rewritten in tests/fixtures/burn_saved; run \
         `python tests/fixtures/make_peft_fixtures.py verify`, then this test without \
         BURN_PEFT_WRITE_FIXTURES"
    );
}
