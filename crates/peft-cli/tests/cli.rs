//! The `burn-peft` binary itself, run as a user runs it: `forward` against the Transformers /
//! PEFT outputs committed under `crates/peft-models/fixtures` (BERT and the tiny LLaMA models,
//! with and without adapters, merged and unmerged), `tokenize` and `generate` on SmolLM2, and a
//! clear error with a non-zero exit (never a panic) for each kind of bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::TensorData;

/// Largest difference from Transformers + PEFT (float32, other kernels) for BERT's hidden
/// states.
const BERT_TOL: f32 = 1e-5;
/// Largest difference for the LLaMA logits (a merged all-linear adapter rounds differently by
/// about 1.3e-5), as in peft-models' own LLaMA tests.
const LLAMA_TOL: f32 = 1e-4;

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
/// compared to `expected`'s `expected_key` to `tol`. Returns the output values.
/// The arguments of `burn-peft forward` on `model` and `input`, writing `output`.
fn forward_args(
    model: &Path,
    input: &Path,
    output: &Path,
    adapter: Option<&Path>,
    merge: bool,
) -> Vec<std::ffi::OsString> {
    let mut args = vec![
        "forward".into(),
        "--model".into(),
        model.as_os_str().to_owned(),
        "--input".into(),
        input.as_os_str().to_owned(),
        "--output".into(),
        output.as_os_str().to_owned(),
    ];
    if let Some(a) = adapter {
        args.push("--adapter".into());
        args.push(a.as_os_str().to_owned());
    }
    if merge {
        args.push("--merge".into());
    }
    args
}

fn check_forward(
    model: &Path,
    input: &Path,
    adapter: Option<&Path>,
    merge: bool,
    (key, tol): (&str, f32),
    expected: (&Path, &str),
) -> Vec<f32> {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.safetensors");
    let args = forward_args(model, input, &out_file, adapter, merge);
    let what = format!("forward {} {adapter:?} merge={merge}", model.display());
    let out = burn_peft(&args);
    assert_ok(&out, &what);
    assert!(out.stdout.is_empty(), "{what}: forward prints nothing");
    let (shape, ours) = floats(&out_file, key);
    let (want_shape, want) = floats(expected.0, expected.1);
    assert_eq!(shape, want_shape, "{what}: shape of `{key}`");
    let diff = max_abs_diff(&ours, &want);
    assert!(diff <= tol, "{what}: `{key}` differs by {diff} (> {tol})");
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
        (key, BERT_TOL),
        (&bert.join("expected.safetensors"), key),
    );
    for (adapter, merge) in [("lora_rslora", false), ("dora", true), ("adalora", false)] {
        let expected = bert.join(adapter).join("expected.safetensors");
        let ours = check_forward(
            &bert.join("model"),
            &input,
            Some(&bert.join(adapter)),
            merge,
            (key, BERT_TOL),
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
    let base = check_forward(
        &untied,
        &input,
        None,
        false,
        ("logits", LLAMA_TOL),
        (&input, "logits"),
    );
    for (adapter, merge) in [("lora_qv", false), ("lora_qv", true)] {
        let expected = untied.join(adapter).join("expected.safetensors");
        let ours = check_forward(
            &untied,
            &input,
            Some(&untied.join(adapter)),
            merge,
            ("logits", LLAMA_TOL),
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
        ("logits", LLAMA_TOL),
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
        let out = burn_peft(forward_args(model, input, &out_file, adapter, false));
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

/// The tiny sharded bf16 LLaMA of `fixtures/llama/sharded_bf16` (vocab 128, 128 positions)
/// copied into `dir` with a word-level `tokenizer.json` whose token `t<i>` is id `i` (plus
/// `big`, id 128, beyond the model's vocabulary, and `<unk>`), so that text maps to known ids.
fn tiny_llama_with_tokenizer(dir: &Path) -> PathBuf {
    let src = fixtures().join("llama/sharded_bf16");
    let model = dir.join("tiny-llama");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
        }
    }
    let mut vocab = serde_json::Map::new();
    for i in 0..128u32 {
        vocab.insert(format!("t{i}"), i.into());
    }
    vocab.insert("big".into(), 128.into());
    vocab.insert("<unk>".into(), 129.into());
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    model
}

/// The ids of `key` in the sharded model's expected file, as the tiny tokenizer's text.
fn tiny_text(key: &str) -> String {
    let file = fixtures().join("llama/sharded_bf16/expected.safetensors");
    let ids = read(&file)
        .remove(key)
        .unwrap()
        .try_to_vec::<i64>()
        .unwrap();
    ids.iter()
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

#[test]
fn generate_on_a_tiny_llama_matches_transformers_greedy_ids() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(dir.path());
    let prompt = tiny_text("prompt");
    let tokenize = burn_peft(["tokenize", "--model"].map(Into::into).into_iter().chain([
        model.as_os_str().to_owned(),
        "--text".into(),
        prompt.clone().into(),
    ]));
    assert_ok(&tokenize, "tokenize");
    let want_ids = tiny_text("prompt").replace('t', "");
    assert_eq!(stdout(&tokenize), format!("{want_ids}\n"));

    let generate = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "generate".into(),
            "--model".into(),
            model.as_os_str().to_owned(),
            "--prompt".into(),
            prompt.clone().into(),
            "--max-new-tokens".into(),
            "20".into(),
        ];
        args.extend(extra.iter().map(Into::into));
        burn_peft(args)
    };
    // Greedy: stdout holds exactly the 20 generated tokens' text (transformers' ids), the counts
    // and speeds are on stderr.
    let out = generate(&[]);
    assert_ok(&out, "generate");
    assert_eq!(stdout(&out), tiny_text("greedy"));
    let err = stderr(&out);
    for needle in [
        "prompt tokens: 5",
        "generated tokens: 20",
        "prefill",
        "decode",
        "tokens/s",
    ] {
        assert!(err.contains(needle), "`{needle}` not in stderr:\n{err}");
    }
    // With PEFT's LoRA adapter, unmerged and merged.
    let lora = fixtures().join("llama/sharded_bf16/lora");
    let lora = lora.to_str().unwrap();
    for extra in [&["--adapter", lora][..], &["--adapter", lora, "--merge"]] {
        let out = generate(extra);
        assert_ok(&out, &format!("generate {extra:?}"));
        assert_eq!(stdout(&out), tiny_text("greedy_lora"), "{extra:?}");
    }
    // Seeded sampling repeats itself.
    let sampling = [
        "--temperature",
        "1.5",
        "--top-k",
        "50",
        "--top-p",
        "0.95",
        "--seed",
        "7",
    ];
    let first = generate(&sampling);
    assert_ok(&first, "sampling");
    assert_eq!(stdout(&first), stdout(&generate(&sampling)), "same seed");
    assert_eq!(stdout(&first).split(' ').count(), 20);
}

#[test]
fn bad_generate_and_tokenize_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama_with_tokenizer(dir.path());
    let run = |args: &[&str]| {
        let out = burn_peft(
            [args[0], "--model", model.to_str().unwrap()]
                .iter()
                .chain(&args[1..]),
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
        out
    };
    assert_refused(
        &run(&["generate", "--prompt", "t1 big t2"]),
        "prompt id outside the model's vocabulary",
        &["token id 128", "vocabulary"],
    );
    let long = vec!["t1"; 128].join(" ");
    assert_refused(
        &run(&["generate", "--prompt", &long]),
        "prompt longer than the context",
        &["too long", "128"],
    );
    assert_refused(
        &run(&["generate", "--prompt", "t1", "--chat"]),
        "no chat template",
        &["chat template"],
    );
    assert_refused(
        &run(&["generate", "--prompt", "t1", "--top-p", "1.5"]),
        "bad option",
        &["top_p"],
    );
    assert_refused(
        &run(&["generate", "--prompt", ""]),
        "empty prompt",
        &["empty"],
    );
    let no_tokenizer = fixtures().join("llama/untied");
    for command in ["tokenize", "generate"] {
        let out = burn_peft([
            command,
            "--model",
            no_tokenizer.to_str().unwrap(),
            if command == "tokenize" {
                "--text"
            } else {
                "--prompt"
            },
            "hello",
        ]);
        assert_refused(&out, "missing tokenizer", &["tokenizer.json", "untied"]);
    }
    let bert = fixtures().join("bert/model");
    let out = burn_peft([
        "generate",
        "--model",
        bert.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_refused(&out, "generate with BERT", &["BERT", "causal"]);
}

/// The SmolLM2-135M-Instruct GGUF file (fetched by `python3 scripts/fetch_smollm2.py`); the
/// test fails with that hint when it is missing.
fn smollm2() -> PathBuf {
    peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"))
}

/// Transformers' greedy chat generations (`fixtures/smollm2/generation.json`).
fn smollm2_chats() -> Vec<serde_json::Value> {
    let file = fixtures().join("smollm2/generation.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["chats"].as_array().unwrap().clone()
}

fn ids_line(ids: &serde_json::Value) -> String {
    let ids: Vec<String> = ids
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap().to_string())
        .collect();
    ids.join(" ")
}

#[test]
fn tokenize_smollm2_matches_transformers_ids() {
    let model = smollm2();
    // The second committed chat as SmolLM2's template renders it (ChatML); special tokens
    // written in the text are matched whole.
    let chat = &smollm2_chats()[1];
    let messages = chat["messages"].as_array().unwrap();
    let mut text = String::new();
    for m in messages {
        let (role, content) = (m["role"].as_str().unwrap(), m["content"].as_str().unwrap());
        text.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    text.push_str("<|im_start|>assistant\n");
    let out = burn_peft([
        "tokenize".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        text.as_ref(),
    ]);
    assert_ok(&out, "tokenize");
    assert_eq!(stdout(&out), format!("{}\n", ids_line(&chat["prompt_ids"])));

    // Lines of the tokenizer corpus (`fixtures/tokenizer/smollm2.json`, transformers' ids):
    // emoji with joiners and flags, numbers, special tokens in the text.
    let file = fixtures().join("tokenizer/smollm2.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let corpus = json["encode"].as_array().unwrap();
    for needle in ["emoji:", "numbers 1234567", "<|im_start|>user"] {
        let line = corpus
            .iter()
            .find(|l| l["text"].as_str().unwrap().starts_with(needle))
            .unwrap_or_else(|| panic!("no corpus line starting with {needle}"));
        let text = line["text"].as_str().unwrap();
        let out = burn_peft([
            "tokenize".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--text".as_ref(),
            text.as_ref(),
        ]);
        assert_ok(&out, text);
        assert_eq!(
            stdout(&out),
            format!("{}\n", ids_line(&line["ids"])),
            "{text:?}"
        );
    }
}

#[test]
fn generate_smollm2_chat_streams_only_the_answer() {
    let model = smollm2();
    let chat = &smollm2_chats()[1];
    let messages = chat["messages"].as_array().unwrap();
    let (system, user) = (&messages[0], &messages[1]);
    assert_eq!(
        (system["role"].as_str(), user["role"].as_str()),
        (Some("system"), Some("user"))
    );
    // The f32 model; the GGUF blocks kept packed, decoding steps on 8-bit activations
    // (llama.cpp's arithmetic, the default) and on f32 ones.
    for base in [
        &[][..],
        &["--base", "gguf"],
        &["--base", "gguf", "--f32-activations"],
    ] {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "generate".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--chat".as_ref(),
            "--system".as_ref(),
            system["content"].as_str().unwrap().as_ref(),
            "--prompt".as_ref(),
            user["content"].as_str().unwrap().as_ref(),
            "--max-new-tokens".as_ref(),
            "16".as_ref(),
        ];
        args.extend(base.iter().map(std::ffi::OsStr::new));
        let out = burn_peft(args);
        assert_ok(&out, &format!("generate {base:?}"));
        // Transformers' greedy answer ends with the end-of-sequence token (not printed).
        assert_eq!(
            stdout(&out),
            chat["base_text"].as_str().unwrap(),
            "{base:?}"
        );
        let err = stderr(&out);
        let prompt_len = chat["prompt_ids"].as_array().unwrap().len();
        let generated = chat["base_ids"].as_array().unwrap().len();
        for needle in [
            format!("prompt tokens: {prompt_len}"),
            format!("generated tokens: {generated}"),
            "end of sequence".into(),
        ] {
            assert!(
                err.contains(&needle),
                "{base:?}: `{needle}` not in stderr:\n{err}"
            );
        }
    }
}

/// With `--base f32` and with `--base gguf` (the file's Q4_1 / Q8_0 blocks kept packed, never
/// dequantized): PEFT's logits on the dequantized float32 model, to the same bound.
#[test]
fn forward_smollm2_gguf_with_a_peft_adapter_matches_peft() {
    let model = smollm2();
    let smol = fixtures().join("smollm2");
    // `input_ids` / `attention_mask` [2, 12] (row 1 padded) and PEFT's logits at 512 columns.
    let expected = read(&smol.join("expected.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("logits.safetensors");
    for base in ["f32", "gguf"] {
        let out = burn_peft([
            "forward".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--input".as_ref(),
            smol.join("expected.safetensors").as_os_str(),
            "--output".as_ref(),
            out_file.as_os_str(),
            "--adapter".as_ref(),
            smol.join("lora_qv").as_os_str(),
            "--base".as_ref(),
            base.as_ref(),
        ]);
        assert_ok(&out, &format!("forward smollm2 + lora_qv, base {base}"));
        let (shape, logits) = floats(&out_file, "logits");
        let [batch, seq] = [2, 12];
        assert_eq!(shape, [batch, seq, 49152]);
        let vocab = shape[2];
        let ints = |key: &str| expected[key].try_to_vec::<i64>().unwrap();
        let (mask, columns) = (ints("attention_mask"), ints("columns"));
        let theirs = expected["adapter_logits_subset"]
            .try_to_vec::<f32>()
            .unwrap();
        let mut worst = 0.0f32;
        for row in (0..batch * seq).filter(|&r| mask[r] == 1) {
            for (j, &c) in columns.iter().enumerate() {
                let ours = logits[row * vocab + c as usize];
                worst = worst.max((ours - theirs[row * columns.len() + j]).abs());
            }
        }
        // Transformers ran the same dequantized weights in float32 (peft-models' own bound).
        assert!(
            worst <= 2e-3,
            "base {base}: logits differ from PEFT's by {worst}"
        );
    }
}

/// `--base nf4-dq` quantizes a safetensors model at load (the logits move by NF4's rounding,
/// not more); bad formats are refused with the reason.
#[test]
fn base_formats_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.safetensors");
    let llama = fixtures().join("llama");
    let bert = fixtures().join("bert");
    let run = |model: &Path, input: &Path, base: &str, adapter: Option<&Path>| {
        let mut args = forward_args(model, input, &out_file, adapter, false);
        args.extend(["--base".into(), base.into()]);
        burn_peft(&args)
    };
    let llama_input = llama.join("untied/expected.safetensors");
    let (_, f32_logits) = floats(&llama_input, "logits");
    let out = run(&llama.join("untied"), &llama_input, "nf4-dq", None);
    assert_ok(&out, "forward --base nf4-dq");
    let (_, nf4_logits) = floats(&out_file, "logits");
    let scale = f32_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&nf4_logits, &f32_logits);
    assert!(
        diff > 1e-4 && diff < 0.2 * scale,
        "NF4 moved the logits by {diff} (scale {scale})"
    );
    std::fs::remove_file(&out_file).unwrap();
    // A GGUF base needs a GGUF file.
    let out = run(&llama.join("untied"), &llama_input, "gguf", None);
    assert_refused(
        &out,
        "gguf base on safetensors",
        &["gguf", "needs a GGUF model", "nf4"],
    );
    // BERT loads in f32 only.
    let out = run(
        &bert.join("model"),
        &bert.join("input.safetensors"),
        "nf4",
        None,
    );
    assert_refused(&out, "nf4 BERT", &["--base nf4", "causal LMs"]);
    // An unknown format: clap's usage error, naming the formats.
    let out = run(&llama.join("untied"), &llama_input, "int4", None);
    assert_eq!(out.status.code(), Some(2), "usage error");
    let err = stderr(&out);
    assert!(err.contains("int4") && err.contains("nf4-dq"), "{err}");
    assert!(!out_file.exists(), "nothing written");
}
