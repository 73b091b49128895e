//! BERT parity with `transformers` (fixtures written by `fixtures/make_bert_fixtures.py`).

use std::path::{Path, PathBuf};

use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::PeftLinear;
use peft_lora::LoraAdapter;
use peft_models::ModelError;
use peft_models::bert::{Bert, BertConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bert")
}

fn read(file: &Path, key: &str) -> TensorData {
    peft_core::hf::read_tensors(file)
        .unwrap()
        .remove(key)
        .unwrap()
}

fn inputs(device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let file = fixtures().join("input.safetensors");
    (
        Tensor::from_data(read(&file, "input_ids"), device),
        Tensor::from_data(read(&file, "attention_mask"), device),
    )
}

fn max_abs_diff(a: Tensor<3>, b: TensorData) -> f32 {
    let a = a.into_data().try_to_vec::<f32>().unwrap();
    let b = b.try_to_vec::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn expected() -> TensorData {
    read(
        &fixtures().join("expected.safetensors"),
        "last_hidden_state",
    )
}

#[test]
fn hidden_states_match_transformers_on_both_layer_types() {
    let device = Device::flex();
    let (ids, mask) = inputs(&device);
    let (fast, config) =
        Bert::<PeftLinear<LoraAdapter>>::from_pretrained(&fixtures().join("model"), &device)
            .unwrap();
    assert_eq!(config.num_hidden_layers, 2);
    assert!(fast.pooler.is_some());
    let diff = max_abs_diff(fast.forward(ids.clone(), mask.clone()), expected());
    assert!(diff <= 1e-5, "activation-space model differs by {diff}");

    let (plain, _) = Bert::<Linear>::from_pretrained(&fixtures().join("model"), &device).unwrap();
    let diff = max_abs_diff(plain.forward(ids, mask), expected());
    assert!(diff <= 1e-5, "plain model differs by {diff}");
}

#[test]
fn loads_checkpoints_with_the_bert_prefix() {
    let device = Device::flex();
    let (ids, mask) = inputs(&device);
    let (model, _) =
        Bert::<Linear>::from_pretrained(&fixtures().join("model_prefixed"), &device).unwrap();
    let diff = max_abs_diff(model.forward(ids, mask), expected());
    assert!(diff <= 1e-5, "prefixed checkpoint differs by {diff}");
}

#[test]
fn module_paths_are_hugging_face_paths() {
    let device = Device::flex();
    let (model, _) = Bert::<Linear>::from_pretrained(&fixtures().join("model"), &device).unwrap();
    let paths: Vec<String> = peft_core::hosts::parameters(&model)
        .into_iter()
        .map(|(path, _, _)| path)
        .collect();
    for expected in [
        "embeddings.word_embeddings.weight",
        "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight",
        "encoder.layer.1.attention.output.dense.bias",
        "encoder.layer.1.attention.output.LayerNorm.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.0.output.dense.weight",
        "pooler.dense.weight",
    ] {
        assert!(
            paths.iter().any(|p| p == expected),
            "{expected} not in {paths:?}"
        );
    }
}

#[test]
fn bad_checkpoints_and_configs_are_named() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    // A config the model does not support.
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("model/config.json")).unwrap(),
    )
    .unwrap();
    config["hidden_act"] = "swish".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = BertConfig::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
    assert!(err.to_string().contains("swish"), "{err}");

    // A checkpoint without one tensor.
    config["hidden_act"] = "gelu".into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut tensors =
        peft_core::hf::read_tensors(&fixtures().join("model/model.safetensors")).unwrap();
    tensors
        .remove("encoder.layer.1.attention.self.key.weight")
        .unwrap();
    peft_core::hf::write_tensors(&dir.path().join("model.safetensors"), &tensors).unwrap();
    let err = Bert::<Linear>::from_pretrained(dir.path(), &device).unwrap_err();
    assert!(
        err.to_string()
            .contains("encoder.layer.1.attention.self.key.weight"),
        "{err}"
    );

    // A missing folder says how to get a model.
    let err = Bert::<Linear>::from_pretrained(&dir.path().join("nope"), &device).unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
}

/// A token table held packed reads as its dequantized twin (only the looked-up rows are
/// decoded), moves the output by the format's rounding only, leaves an empty placeholder as the
/// table's parameter, and refuses a table its format cannot hold.
#[test]
fn a_packed_token_table_reads_as_its_dequantized_twin() {
    use burn::module::{Module, Param};
    use peft_kernels::quant::PackedFormat;
    use peft_kernels::quant::ggml::GgmlBlock;

    let device = Device::flex();
    let (ids, mask) = inputs(&device);
    let (original, _) =
        Bert::<PeftLinear<LoraAdapter>>::from_pretrained(&fixtures().join("model"), &device)
            .unwrap();
    let reference = original.forward(ids.clone(), mask.clone());
    let params = original.num_params();
    for format in [
        PackedFormat::Ggml(GgmlBlock::Q8_0),
        PackedFormat::Ggml(GgmlBlock::Bf16),
        PackedFormat::Nf4 { double: true },
    ] {
        let mut packed = original.clone();
        packed.embeddings.pack_words(format).unwrap();
        let table = packed.embeddings.packed_words.clone().expect("packed");
        assert_eq!(table.shape(), [100, 32]);
        assert_eq!(packed.embeddings.word_embeddings.weight.dims(), [0, 32]);
        assert_eq!(params - packed.num_params(), 100 * 32, "{}", format.name());
        // Packing twice keeps the first table.
        packed.embeddings.pack_words(format).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            &table,
            packed.embeddings.packed_words.as_ref().unwrap()
        ));

        let mut twin = original.clone();
        twin.embeddings.word_embeddings.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(table.dequantize(), [100, 32]),
            &device,
        ));
        let out = packed.forward(ids.clone(), mask.clone());
        let twin_out = twin.forward(ids.clone(), mask.clone());
        let diff = max_abs_diff(out.clone(), twin_out.into_data());
        assert!(
            diff <= 1e-6,
            "{}: packed vs dequantized {diff}",
            format.name()
        );
        let rounding = max_abs_diff(out, reference.clone().into_data());
        assert!(
            rounding > 0.0 && rounding < 0.5,
            "{}: rounding moved the output by {rounding}",
            format.name()
        );
    }

    let mut bad = original.clone();
    let mut values = vec![0.5f32; 100 * 32];
    values[70] = f32::NAN;
    bad.embeddings.word_embeddings.weight = Param::from_tensor(Tensor::from_data(
        TensorData::new(values, [100, 32]),
        &device,
    ));
    let err = bad
        .embeddings
        .pack_words(PackedFormat::Ggml(GgmlBlock::Q8_0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("word_embeddings") && err.contains("Q8_0"),
        "{err}"
    );
    assert!(bad.embeddings.packed_words.is_none(), "nothing half-done");
}
