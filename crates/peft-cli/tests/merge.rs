//! `burn-peft merge` on the tiny random LLaMA (every kind of run output) and on SmolLM2's GGUF
//! file: the merged Hugging Face folder reloads through our own folder loader with the logits
//! of the base model and the adapter unmerged, carries the config and tokenizer files with the
//! right fields, and bad inputs are refused without leaving anything behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use common::*;

/// A `forward` input file: two rows of token ids, the second padded.
fn input(dir: &Path) -> PathBuf {
    let ids: Vec<i64> = vec![90, 1, 2, 3, 91, 3, 2, 90, 5, 6, 91, 0];
    let mask: Vec<i64> = vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0];
    let mut tensors = BTreeMap::new();
    tensors.insert("input_ids".to_string(), TensorData::new(ids, [2, 6]));
    tensors.insert("attention_mask".to_string(), TensorData::new(mask, [2, 6]));
    let file = dir.join("input.safetensors");
    peft_core::hf::write_tensors(&file, &tensors).unwrap();
    file
}

/// The logits of `burn-peft forward` on `model` (with `adapter`, unmerged), written through a
/// temporary file.
fn logits(model: &Path, adapter: Option<&Path>, input: &Path) -> Vec<f32> {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("logits.safetensors");
    let mut args = vec![
        "forward".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--input".as_ref(),
        input.as_os_str(),
        "--output".as_ref(),
        out_file.as_os_str(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter".as_ref(), a.as_os_str()]);
    }
    assert_ok(&burn_peft(args), "forward");
    let mut tensors = peft_core::hf::read_tensors(&out_file).unwrap();
    tensors
        .remove("logits")
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn merge(model: &Path, adapter: &Path, output: &Path) -> std::process::Output {
    burn_peft([
        "merge".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--adapter".as_ref(),
        adapter.as_os_str(),
        "--output".as_ref(),
        output.as_os_str(),
    ])
}

fn json(file: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

#[test]
fn merged_folders_reload_with_the_unmerged_logits() {
    let dir = workspace();
    let p = dir.path();
    let model = p.join("model");
    let input = input(p);
    let base = logits(&model, None, &input);
    for name in ["lora", "dora", "adalora", "rosa", "sft", "bitfit", "full"] {
        // RoSA's `wl2` restarts from the initial adapters after two steps: train past that.
        let config = run_file(p, name, method_line(name), 5, None, "");
        assert_ok(&train(&config), name);
        let run = p.join("runs").join(name);
        let adapter = match name {
            "bitfit" => run.join("summary"),
            "full" => run.join("model.safetensors"),
            _ => run.join("adapter"),
        };
        let merged = p.join("merged").join(name);
        let out = merge(&model, &adapter, &merged);
        assert_ok(&out, name);
        assert!(stderr(&out).contains("wrote"), "{name}: {}", stderr(&out));

        let unmerged = logits(&model, Some(&adapter), &input);
        let reloaded = logits(&merged, None, &input);
        let trained = max_abs_diff(&unmerged, &base);
        assert!(
            trained > 1e-3,
            "{name}: the adapter changes the logits ({trained})"
        );
        let diff = max_abs_diff(&reloaded, &unmerged);
        assert!(diff <= 1e-4, "{name}: merged logits differ by {diff}");

        // The folder: Transformers' names and layout, the source's config and tokenizer.
        let config = json(&merged.join("config.json"));
        assert_eq!(config["model_type"], "llama", "{name}");
        assert_eq!(config["tie_word_embeddings"], true, "{name}");
        assert_eq!(config["dtype"], "float32", "{name}");
        assert_eq!(config["vocab_size"], 96, "{name}");
        let tensors = peft_core::hf::read_tensors(&merged.join("model.safetensors")).unwrap();
        assert!(
            !tensors.contains_key("lm_head.weight"),
            "{name}: a tied head"
        );
        assert_eq!(
            tensors["model.layers.0.self_attn.q_proj.weight"]
                .shape()
                .to_vec(),
            [64, 32],
            "{name}: [out, in]"
        );
        assert_eq!(
            tensors["model.layers.0.self_attn.k_proj.weight"]
                .shape()
                .to_vec(),
            [16, 32]
        );
        assert!(
            tensors
                .keys()
                .all(|k| !k.contains("lora") && !k.contains("peft"))
        );
        assert_eq!(
            std::fs::read(merged.join("tokenizer.json")).unwrap(),
            std::fs::read(model.join("tokenizer.json")).unwrap(),
            "{name}"
        );
        let tokenizer_config = json(&merged.join("tokenizer_config.json"));
        assert!(tokenizer_config["chat_template"].is_string(), "{name}");
        assert!(merged.join("generation_config.json").is_file(), "{name}");
    }
    // Nothing but the outputs in the parent folder (no temporary folder left).
    let mut names: Vec<String> = std::fs::read_dir(p.join("merged"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["adalora", "bitfit", "dora", "full", "lora", "rosa", "sft"]
    );
}

#[test]
fn an_untied_model_keeps_its_head_and_matches_python_peft() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let model = with_tokenizer(p, "untied", "untied");
    let untied = fixtures().join("llama/untied");
    let adapter = untied.join("lora_qv");
    let merged = p.join("merged");
    assert_ok(&merge(&model, &adapter, &merged), "merge");
    let config = json(&merged.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], false);
    let tensors = peft_core::hf::read_tensors(&merged.join("model.safetensors")).unwrap();
    assert_eq!(tensors["lm_head.weight"].shape().to_vec(), [128, 32]);

    // The expected files hold the inputs (row 1 padded) and Transformers + PEFT's logits.
    let input = untied.join("expected.safetensors");
    let ours = logits(&merged, None, &input);
    let unmerged = logits(&model, Some(&adapter), &input);
    let diff = max_abs_diff(&ours, &unmerged);
    assert!(
        diff <= 1e-4,
        "merged logits differ from the unmerged ones by {diff}"
    );
    let mut expected = peft_core::hf::read_tensors(&adapter.join("expected.safetensors")).unwrap();
    let peft = expected
        .remove("logits")
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap();
    let mask = peft_core::hf::read_tensors(&input).unwrap()["attention_mask"]
        .try_to_vec::<i64>()
        .unwrap();
    let vocab = 128;
    let mut worst = 0.0f32;
    for (row, _) in mask.iter().enumerate().filter(|(_, m)| **m == 1) {
        let r = row * vocab..(row + 1) * vocab;
        worst = worst.max(max_abs_diff(&ours[r.clone()], &peft[r]));
    }
    assert!(worst <= 1e-4, "merged logits differ from PEFT's by {worst}");
}

#[test]
fn bad_merge_inputs_are_refused_and_leave_nothing_behind() {
    let dir = workspace();
    let p = dir.path();
    let model = p.join("model");
    let config = run_file(p, "lora", method_line("lora"), 2, None, "");
    assert_ok(&train(&config), "train");
    let adapter = p.join("runs/lora/adapter");
    let out_root = p.join("out");
    std::fs::create_dir(&out_root).unwrap();

    // An output folder that holds something is left alone.
    let taken = out_root.join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("keep.txt"), "mine").unwrap();
    assert_refused(
        &merge(&model, &adapter, &taken),
        "output exists",
        &["taken", "not empty"],
    );
    assert_eq!(
        std::fs::read_to_string(taken.join("keep.txt")).unwrap(),
        "mine"
    );
    let file = out_root.join("file");
    std::fs::write(&file, "x").unwrap();
    assert_refused(
        &merge(&model, &adapter, &file),
        "output is a file",
        &["not a folder"],
    );

    // An empty output folder is filled.
    let empty = out_root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_ok(&merge(&model, &adapter, &empty), "empty output");
    assert!(empty.join("model.safetensors").is_file());

    // An adapter for another model shape: one LoRA matrix with a column too many.
    let bad = p.join("bad-adapter");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(
        adapter.join("adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        peft_core::hf::read_tensors(&adapter.join("adapter_model.safetensors")).unwrap();
    let key = tensors
        .keys()
        .find(|k| k.contains("layers.1.self_attn.v_proj.lora_B"))
        .unwrap()
        .clone();
    let shape = tensors[&key].shape().to_vec();
    let wider = TensorData::new(
        vec![0.5f32; (shape[0] + 1) * shape[1]],
        [shape[0] + 1, shape[1]],
    );
    tensors.insert(key, wider);
    peft_core::hf::write_tensors(&bad.join("adapter_model.safetensors"), &tensors).unwrap();
    let target = out_root.join("merged");
    assert_refused(
        &merge(&model, &bad, &target),
        "mismatched adapter",
        &["bad-adapter", "v_proj"],
    );
    assert!(!target.exists(), "nothing written for a failed merge");

    // Missing files.
    std::fs::remove_file(bad.join("adapter_model.safetensors")).unwrap();
    assert_refused(
        &merge(&model, &bad, &target),
        "adapter without weights",
        &["bad-adapter", "adapter_model.safetensors"],
    );
    assert_refused(
        &merge(&model, &p.join("nowhere"), &target),
        "missing adapter",
        &["adapter not found", "nowhere"],
    );
    assert_refused(
        &merge(&p.join("no-model"), &adapter, &target),
        "missing model",
        &["model not found", "no-model"],
    );
    let no_tokenizer = p.join("no-tokenizer");
    std::fs::create_dir(&no_tokenizer).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(model.join(name), no_tokenizer.join(name)).unwrap();
    }
    assert_refused(
        &merge(&no_tokenizer, &adapter, &target),
        "missing tokenizer",
        &["tokenizer.json"],
    );
    assert!(!target.exists());
    let mut left: Vec<String> = std::fs::read_dir(&out_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["empty", "file", "taken"], "no temporary folder left");
}

#[test]
fn merge_smollm2_gguf_writes_a_folder_with_peft_logits_and_the_same_tokenizer() {
    let model = peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"));
    let smol = fixtures().join("smollm2");
    let dir = tempfile::tempdir().unwrap();
    let merged = dir.path().join("merged");
    assert_ok(&merge(&model, &smol.join("lora_qv"), &merged), "merge");

    // `input_ids` / `attention_mask` [2, 12] (row 1 padded) and PEFT's logits at 512 columns
    // (Transformers + PEFT, unmerged, on the same dequantized weights).
    let expected_file = smol.join("expected.safetensors");
    let expected = peft_core::hf::read_tensors(&expected_file).unwrap();
    let ours = logits(&merged, None, &expected_file);
    let ints = |key: &str| expected[key].try_to_vec::<i64>().unwrap();
    let (mask, columns) = (ints("attention_mask"), ints("columns"));
    let theirs = expected["adapter_logits_subset"]
        .try_to_vec::<f32>()
        .unwrap();
    let vocab = 49152;
    let mut worst = 0.0f32;
    for row in (0..24).filter(|&r| mask[r] == 1) {
        for (j, &c) in columns.iter().enumerate() {
            let v = ours[row * vocab + c as usize];
            worst = worst.max((v - theirs[row * columns.len() + j]).abs());
        }
    }
    // peft-models' own bound for the GGUF model against Transformers.
    assert!(worst <= 2e-3, "merged logits differ from PEFT's by {worst}");

    let config = json(&merged.join("config.json"));
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["num_key_value_heads"], 3);
    let tokenizer_config = json(&merged.join("tokenizer_config.json"));
    assert!(
        tokenizer_config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    assert_eq!(tokenizer_config["eos_token"], "<|im_end|>");
    // The written tokenizer.json tokenizes as the GGUF tokenizer does.
    let text = "<|im_start|>user\nHello, 1234 wörld!<|im_end|>\n<|im_start|>assistant\n";
    let ids = |m: &Path| {
        let out = burn_peft([
            "tokenize".as_ref(),
            "--model".as_ref(),
            m.as_os_str(),
            "--text".as_ref(),
            text.as_ref(),
        ]);
        assert_ok(&out, "tokenize");
        stdout(&out)
    };
    assert_eq!(ids(&merged), ids(&model));
}
