//! The `burn-peft` binary itself, run as a user runs it: `forward` against the Transformers /
//! PEFT outputs committed under `crates/peft-models/fixtures` (BERT and the tiny LLaMA models,
//! with and without adapters, merged and unmerged), `tokenize` and `generate` on SmolLM2, and a
//! clear error with a non-zero exit (never a panic) for each kind of bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::TensorData;

/// Transformers and PEFT computed the expected outputs in float32 with other kernels.
const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft-models/fixtures")
}

/// Run `burn-peft` with `args`.
fn burn_peft<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(args)
        .output()
        .expect("the burn-peft binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Assert that the run succeeded, showing its stderr otherwise.
fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}, stderr:\n{}",
        out.status,
        stderr(out)
    );
}

/// Assert that the run failed with a non-zero exit, without a panic, and that stderr names
/// every one of `needles`.
fn assert_refused(out: &Output, what: &str, needles: &[&str]) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "{what}: expected a failure, got success; stderr:\n{err}"
    );
    assert_eq!(out.status.code(), Some(1), "{what}: exit status; {err}");
    assert!(!err.contains("panicked"), "{what}: panicked:\n{err}");
    for needle in needles {
        assert!(err.contains(needle), "{what}: `{needle}` not in:\n{err}");
    }
}

fn read(file: &Path) -> BTreeMap<String, TensorData> {
    peft_core::hf::read_tensors(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn floats(file: &Path, key: &str) -> (Vec<usize>, Vec<f32>) {
    let data = read(file)
        .remove(key)
        .unwrap_or_else(|| panic!("{}: no `{key}`", file.display()));
    (data.shape().to_vec(), data.try_to_vec::<f32>().unwrap())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `burn-peft forward` on `model` (+ `adapter`, `--merge`) with `input`; the output's `key`
/// compared to `expected`'s `expected_key`. Returns the output values.
fn check_forward(
    model: &Path,
    input: &Path,
    adapter: Option<&Path>,
    merge: bool,
    key: &str,
    expected: (&Path, &str),
) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.safetensors");
    let mut args = vec![
        "forward".into(),
        "--model".into(),
        model.as_os_str().to_owned(),
        "--input".into(),
        input.as_os_str().to_owned(),
        "--output".into(),
        out_file.as_os_str().to_owned(),
    ];
    if let Some(a) = adapter {
        args.push("--adapter".into());
        args.push(a.as_os_str().to_owned());
    }
    if merge {
        args.push("--merge".into());
    }
    let what = format!("forward {} {adapter:?} merge={merge}", model.display());
    let out = burn_peft(&args);
    assert_ok(&out, &what);
    assert!(out.stdout.is_empty(), "{what}: forward prints nothing");
    let (shape, ours) = floats(&out_file, key);
    let (want_shape, want) = floats(expected.0, expected.1);
    assert_eq!(shape, want_shape, "{what}: shape of `{key}`");
    let diff = max_abs_diff(&ours, &want);
    assert!(diff <= TOL, "{what}: `{key}` differs by {diff} (> {TOL})");
    // Nothing but the output file is left behind (no temporary file).
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "{what}: files left: {names:?}");
    ours
}

#[test]
fn forward_bert_matches_transformers_and_peft() {
    let bert = fixtures().join("bert");
    let input = bert.join("input.safetensors");
    let key = "last_hidden_state";
    let base = check_forward(
        &bert.join("model"),
        &input,
        None,
        false,
        key,
        (&bert.join("expected.safetensors"), key),
    );
    for (adapter, merge) in [("lora_rslora", false), ("dora", true), ("adalora", false)] {
        let expected = bert.join(adapter).join("expected.safetensors");
        let ours = check_forward(
            &bert.join("model"),
            &input,
            Some(&bert.join(adapter)),
            merge,
            key,
            (&expected, key),
        );
        assert!(
            max_abs_diff(&ours, &base) > 1e-2,
            "{adapter}: the adapter changes the output"
        );
    }
}

#[test]
fn forward_llama_matches_transformers_and_peft() {
    let llama = fixtures().join("llama");
    let untied = llama.join("untied");
    // The expected files hold the inputs too (`input_ids`, `attention_mask`, row 1 padded).
    let input = untied.join("expected.safetensors");
    let base = check_forward(&untied, &input, None, false, "logits", (&input, "logits"));
    for (adapter, merge) in [("lora_qv", false), ("lora_qv", true)] {
        let expected = untied.join(adapter).join("expected.safetensors");
        let ours = check_forward(
            &untied,
            &input,
            Some(&untied.join(adapter)),
            merge,
            "logits",
            (&expected, "logits"),
        );
        assert!(
            max_abs_diff(&ours, &base) > 0.1,
            "{adapter}: the adapter changes the logits"
        );
    }
    // Tied head, biases, one KV head; an all-linear rsLoRA adapter merged.
    let tied = llama.join("tied");
    let input = tied.join("expected.safetensors");
    check_forward(
        &tied,
        &input,
        Some(&tied.join("rslora_all_linear")),
        true,
        "logits",
        (
            &tied.join("rslora_all_linear/expected.safetensors"),
            "logits",
        ),
    );
}

/// Write `tensors` to `dir/name` and return the path.
fn write_input(dir: &Path, name: &str, tensors: Vec<(&str, TensorData)>) -> PathBuf {
    let file = dir.join(name);
    let map = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    peft_core::hf::write_tensors(&file, &map).unwrap();
    file
}

#[test]
fn bad_forward_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path();
    let untied = fixtures().join("llama/untied");
    let good_input = untied.join("expected.safetensors");
    let out_file = tmp.join("out.safetensors");
    let forward = |model: &Path, input: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "forward".into(),
            "--model".into(),
            model.as_os_str().to_owned(),
            "--input".into(),
            input.as_os_str().to_owned(),
            "--output".into(),
            out_file.as_os_str().to_owned(),
        ];
        if let Some(a) = adapter {
            args.push("--adapter".into());
            args.push(a.as_os_str().to_owned());
        }
        let out = burn_peft(&args);
        assert!(!out_file.exists(), "an output was written for bad input");
        out
    };

    // Models: missing, a corrupt GGUF file, a folder without config.json, an unknown
    // architecture.
    let missing = tmp.join("no-such-model");
    assert_refused(
        &forward(&missing, &good_input, None),
        "missing model",
        &["no-such-model", "does not exist"],
    );
    let corrupt = tmp.join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    assert_refused(
        &forward(&corrupt, &good_input, None),
        "corrupt gguf",
        &["corrupt.gguf"],
    );
    let not_gguf = tmp.join("weights.gguf");
    std::fs::write(&not_gguf, b"definitely not a model").unwrap();
    assert_refused(
        &forward(&not_gguf, &good_input, None),
        "not gguf",
        &["weights.gguf", "GGUF"],
    );
    let empty = tmp.join("empty-folder");
    std::fs::create_dir(&empty).unwrap();
    assert_refused(
        &forward(&empty, &good_input, None),
        "no config",
        &["empty-folder", "config.json"],
    );
    let mistral = tmp.join("mistral");
    std::fs::create_dir(&mistral).unwrap();
    let config = std::fs::read_to_string(untied.join("config.json"))
        .unwrap()
        .replace("\"llama\"", "\"mistral\"");
    std::fs::write(mistral.join("config.json"), config).unwrap();
    assert_refused(
        &forward(&mistral, &good_input, None),
        "unknown architecture",
        &["mistral", "llama", "bert"],
    );
    let no_weights = tmp.join("no-weights");
    std::fs::create_dir(&no_weights).unwrap();
    std::fs::copy(untied.join("config.json"), no_weights.join("config.json")).unwrap();
    assert_refused(
        &forward(&no_weights, &good_input, None),
        "no weights",
        &["no-weights"],
    );

    // Inputs: unreadable, a missing tensor, ids outside the vocabulary, longer than the context.
    assert_refused(
        &forward(&untied, &tmp.join("missing.safetensors"), None),
        "missing input",
        &["missing.safetensors"],
    );
    let garbage = tmp.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x05\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    assert_refused(
        &forward(&untied, &garbage, None),
        "corrupt input",
        &["garbage.safetensors"],
    );
    let tensors = read(&good_input);
    let ids = tensors["input_ids"].clone();
    let mask = tensors["attention_mask"].clone();
    let no_mask = write_input(tmp, "no_mask.safetensors", vec![("input_ids", ids.clone())]);
    assert_refused(
        &forward(&untied, &no_mask, None),
        "missing tensor",
        &["no_mask.safetensors", "attention_mask"],
    );
    let shape = ids.shape().to_vec();
    let mut big = ids.try_to_vec::<i64>().unwrap();
    big[3] = 128; // vocab_size of the untied model
    let oov = write_input(
        tmp,
        "oov.safetensors",
        vec![
            ("input_ids", TensorData::new(big, shape.clone())),
            ("attention_mask", mask.clone()),
        ],
    );
    assert_refused(
        &forward(&untied, &oov, None),
        "id outside the vocabulary",
        &["token id 128", "vocabulary"],
    );
    let long = 65; // max_position_embeddings is 64
    let too_long = write_input(
        tmp,
        "long.safetensors",
        vec![
            ("input_ids", TensorData::new(vec![1i64; long], [1, long])),
            (
                "attention_mask",
                TensorData::new(vec![1i64; long], [1, long]),
            ),
        ],
    );
    assert_refused(
        &forward(&untied, &too_long, None),
        "longer than the context",
        &["65", "64", "context"],
    );

    // Adapters: missing, and one whose target modules match nothing in the model.
    assert_refused(
        &forward(&untied, &good_input, Some(&tmp.join("no-adapter"))),
        "missing adapter",
        &["no-adapter"],
    );
    let other = tmp.join("bert_adapter_on_llama");
    std::fs::create_dir(&other).unwrap();
    let lora_qv = untied.join("lora_qv");
    let config = std::fs::read_to_string(lora_qv.join("adapter_config.json"))
        .unwrap()
        .replace("\"q_proj\"", "\"query\"")
        .replace("\"v_proj\"", "\"value\"");
    std::fs::write(other.join("adapter_config.json"), config).unwrap();
    std::fs::copy(
        lora_qv.join("adapter_model.safetensors"),
        other.join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_refused(
        &forward(&untied, &good_input, Some(&other)),
        "adapter matching nothing",
        &["query", "matched no module"],
    );
}
