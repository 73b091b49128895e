//! `bert_forward` against `transformers` + Python PEFT 0.21.2 outputs (fixtures written by
//! `crates/peft-models/fixtures/make_bert_fixtures.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

use burn_peft_examples::bert_forward::{Args, run};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/peft-models/fixtures/bert")
}

fn hidden(file: &Path) -> Vec<f32> {
    let mut t = peft_core::hf::read_tensors(file).unwrap();
    t.remove("last_hidden_state")
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap()
}

fn args(adapter: Option<&str>, merge: bool, out: &Path) -> Args {
    Args {
        model: fixtures().join("model"),
        input: fixtures().join("input.safetensors"),
        output: out.to_path_buf(),
        adapter: adapter.map(|a| fixtures().join(a)),
        merge,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const CASES: [&str; 7] = [
    "lora_rslora",
    "lora_patterns",
    "lora_layers",
    "lora_regex",
    "dora",
    "bias_all",
    "adalora",
];

#[test]
fn peft_saved_adapters_match_python_unmerged_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    run(&args(None, false, &out)).unwrap();
    let base = hidden(&out);
    let diff = max_abs_diff(&base, &hidden(&fixtures().join("expected.safetensors")));
    assert!(
        diff <= 1e-4,
        "base model differs from transformers by {diff}"
    );
    for case in CASES {
        let expected = hidden(&fixtures().join(case).join("expected.safetensors"));
        assert!(
            max_abs_diff(&base, &expected) > 1e-2,
            "{case}: the fixture adapter does not change the output"
        );
        for merge in [false, true] {
            run(&args(Some(case), merge, &out)).unwrap_or_else(|e| panic!("{case}: {e:#}"));
            let diff = max_abs_diff(&hidden(&out), &expected);
            assert!(
                diff <= 1e-4,
                "{case} (merge {merge}): differs from PEFT by {diff}"
            );
        }
    }
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let mut tensors = peft_core::hf::read_tensors(&fixtures().join("input.safetensors")).unwrap();
    let ids = tensors.remove("input_ids").unwrap();
    let write = |name: &str, t: Vec<(&str, burn::tensor::TensorData)>| {
        let file = dir.path().join(name);
        let map = t.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        peft_core::hf::write_tensors(&file, &map).unwrap();
        file
    };
    let check = |input: PathBuf, adapter: Option<&str>, needle: &str| {
        let mut a = args(adapter, false, &out);
        a.input = input;
        let err = format!("{:#}", run(&a).unwrap_err());
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        assert!(!out.exists(), "an output was written for bad input");
    };
    // Missing tensor.
    check(
        write("no_mask.safetensors", vec![("input_ids", ids.clone())]),
        None,
        "attention_mask",
    );
    // Wrong dtype.
    let shape = ids.shape().to_vec();
    let floats = burn::tensor::TensorData::new(vec![1.0f32; shape.iter().product()], shape.clone());
    check(
        write(
            "float_ids.safetensors",
            vec![
                ("input_ids", floats),
                ("attention_mask", tensors["attention_mask"].clone()),
            ],
        ),
        None,
        "int64",
    );
    // Wrong shape.
    let flat =
        burn::tensor::TensorData::new(ids.try_to_vec::<i64>().unwrap(), [shape[0] * shape[1]]);
    check(
        write(
            "flat.safetensors",
            vec![("input_ids", flat.clone()), ("attention_mask", flat)],
        ),
        None,
        "[batch, seq]",
    );
    // An adapter for modules this model does not have.
    let other = dir.path().join("other_adapter");
    std::fs::create_dir(&other).unwrap();
    let config = std::fs::read_to_string(fixtures().join("lora_rslora/adapter_config.json"))
        .unwrap()
        .replace("\"query\"", "\"q_proj\"")
        .replace("\"value\"", "\"v_proj\"");
    std::fs::write(other.join("adapter_config.json"), config).unwrap();
    std::fs::copy(
        fixtures().join("lora_rslora/adapter_model.safetensors"),
        other.join("adapter_model.safetensors"),
    )
    .unwrap();
    check(
        fixtures().join("input.safetensors"),
        Some(other.to_str().unwrap()),
        "q_proj",
    );
}

/// The example binary itself (built by `cargo test`): non-zero exit and the reason on stderr.
#[test]
fn the_binary_exits_non_zero_on_bad_input() {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/bert_forward");
    assert!(
        bin.exists(),
        "{} was not built (run `cargo test --workspace`)",
        bin.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(&bin)
        .arg("--model")
        .arg(fixtures().join("model"))
        .arg("--input")
        .arg(dir.path().join("missing.safetensors"))
        .arg("--output")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing.safetensors"), "{stderr}");

    let out = dir.path().join("ok.safetensors");
    let status = Command::new(&bin)
        .arg("--model")
        .arg(fixtures().join("model"))
        .arg("--input")
        .arg(fixtures().join("input.safetensors"))
        .arg("--output")
        .arg(&out)
        .args(["--adapter"])
        .arg(fixtures().join("dora"))
        .arg("--merge")
        .status()
        .unwrap();
    assert!(status.success());
    let diff = max_abs_diff(
        &hidden(&out),
        &hidden(&fixtures().join("dora/expected.safetensors")),
    );
    assert!(diff <= 1e-4, "binary output differs from PEFT by {diff}");
}

#[test]
fn rosa_adapters_run_unmerged_and_merged_like_the_library() {
    use peft_core::{ModuleSelector, PeftLinear, SaveOptions};
    use peft_models::bert::Bert;
    use peft_rosa::{
        InitRosaWeights, InitialMasks, MaskedAdapters, RosaAdapter, RosaConfig, RosaModel,
    };

    let dir = tempfile::tempdir().unwrap();
    let device = burn::tensor::Device::flex();
    let (bert, _) =
        Bert::<PeftLinear<RosaAdapter>>::from_pretrained(&fixtures().join("model"), &device)
            .unwrap();
    // Random factors, random masks and sparse values on every attention and FFN linear.
    let config = RosaConfig::new(
        4,
        0.05,
        8.0,
        ModuleSelector::names(["query", "value", "dense"]),
    )
    .with_init(InitRosaWeights::Random);
    let model = RosaModel::new_with_masks(bert, config, InitialMasks::Random(5)).unwrap();
    let adapter_dir = dir.path().join("rosa");
    model
        .save_pretrained(&adapter_dir, &SaveOptions::default())
        .unwrap();
    let mut inputs = peft_core::hf::read_tensors(&fixtures().join("input.safetensors")).unwrap();
    let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        inputs.remove("input_ids").unwrap(),
        &device,
    );
    let mask = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
        inputs.remove("attention_mask").unwrap(),
        &device,
    );
    let expected = model
        .model()
        .forward(ids, mask)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();

    let out = dir.path().join("out.safetensors");
    run(&args(None, false, &out)).unwrap();
    let base = hidden(&out);
    assert!(
        max_abs_diff(&base, &expected) > 1e-2,
        "the adapter changes the output"
    );
    for merge in [false, true] {
        let mut a = args(None, merge, &out);
        a.adapter = Some(adapter_dir.clone());
        run(&a).unwrap();
        let diff = max_abs_diff(&hidden(&out), &expected);
        assert!(diff <= 1e-4, "merge {merge}: differs by {diff}");
    }
}
