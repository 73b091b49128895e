//! What the `eval` and `merge` tests share: the tiny random LLaMA of
//! `crates/peft-models/fixtures/llama/tied` with a word-level tokenizer whose chat turns end
//! with an end-of-sequence token (so greedy completions can stop and match), a small task, run
//! files, and the `burn-peft` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft-models/fixtures")
}

/// The tied tiny LLaMA (vocab 96) copied into `dir/model` with a tokenizer whose token `t<i>`
/// is id `i`, `user` 90, `assistant` 91, `<unk>` 92 and the special end-of-sequence token
/// `eot` 93, and a chat template `role content eot ` per turn.
pub fn tiny_model(dir: &Path) -> PathBuf {
    with_tokenizer(dir, "tied", "model")
}

/// The fixture model `crates/peft-models/fixtures/llama/<fixture>` copied into `dir/<name>`
/// with the tokenizer of [`tiny_model`].
pub fn with_tokenizer(dir: &Path, fixture: &str, name: &str) -> PathBuf {
    let src = fixtures().join("llama").join(fixture);
    let model = dir.join(name);
    std::fs::create_dir(&model).unwrap();
    for name in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(name), model.join(name)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for i in 0..90u32 {
        vocab.insert(format!("t{i}"), i.into());
    }
    vocab.insert("user".into(), 90.into());
    vocab.insert("assistant".into(), 91.into());
    vocab.insert("<unk>".into(), 92.into());
    vocab.insert("eot".into(), 93.into());
    let eot = serde_json::json!({"id": 93, "content": "eot", "single_word": false,
        "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [eot],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for m in messages %}{{ m.role }} {{ m.content }} eot {% endfor %}\
                    {% if add_generation_prompt %}assistant {% endif %}";
    let config = serde_json::json!({"chat_template": template, "eos_token": "eot"});
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    model
}

/// A task in `dir/name`: `prompt/completion` examples whose completion is the prompt reversed,
/// and as many `messages` ones.
pub fn task(dir: &Path, name: &str) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..4 {
        let (a, b, c) = (3 * i + 1, 3 * i + 2, 3 * i + 3);
        lines.push(serde_json::json!({"prompt": format!("t{a} t{b} t{c}"),
                                      "completion": format!("t{c} t{b} t{a}")}));
        lines.push(serde_json::json!({"messages": [
            {"role": "user", "content": format!("t{b} t{c}")},
            {"role": "assistant", "content": format!("t{c} t{b}")}]}));
    }
    write_lines(&dir.join(name), &lines)
}

/// Write JSON lines to `file`.
pub fn write_lines(file: &Path, lines: &[serde_json::Value]) -> PathBuf {
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(file, text.join("\n")).unwrap();
    file.to_path_buf()
}

/// A run file `dir/name.toml` training `method` (its `[method]` lines) for `steps` steps on
/// `train.jsonl`, evaluating on `eval` (none when `None`), with `extra` lines in `[train]`.
pub fn run_file(
    dir: &Path,
    name: &str,
    method: &str,
    steps: usize,
    eval: Option<&str>,
    extra: &str,
) -> PathBuf {
    let eval = eval.map_or(String::new(), |e| format!("eval = \"{e}\""));
    let text = format!(
        r#"[model]
path = "model"

[data]
train = "train.jsonl"
{eval}
chat_template = true
max_seq_len = 16

[method]
{method}

[train]
steps = {steps}
batch_size = 8
lr = 1e-2
seed = 3
out_dir = "runs/{name}"
{extra}
"#
    );
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    file
}

/// A folder with the model and the task (`train.jsonl`).
pub fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    task(dir.path(), "train.jsonl");
    dir
}

/// The `[method]` lines of `name` for the tiny model.
pub fn method_line(name: &str) -> &'static str {
    match name {
        "lora" => "name = \"lora\"\nr = 4\nlora_alpha = 8",
        "dora" => "name = \"dora\"\nr = 4\nlora_alpha = 8",
        "adalora" => {
            "name = \"adalora\"\ninit_r = 4\ntarget_r = 2\ntinit = 1\ntfinal = 1\ndeltaT = 1"
        }
        "rosa" => "name = \"rosa\"\nr = 4\nd = 0.05\nlora_alpha = 8\nschedule = \"wl2\"",
        "sft" => {
            "name = \"sft\"\ndensity = 0.05\nreselection_steps = 2\nselection_accumulation_steps = 1"
        }
        "bitfit" => "name = \"bitfit\"",
        "full" => "name = \"full\"",
        other => panic!("{other}"),
    }
}

pub fn burn_peft<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(args)
        .output()
        .expect("the burn-peft binary runs")
}

pub fn train(config: &Path) -> Output {
    burn_peft(["train".as_ref(), "--config".as_ref(), config.as_os_str()])
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

pub fn assert_refused(out: &Output, what: &str, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
    }
}

/// The lines of `out_dir/metrics.jsonl`.
pub fn metrics(out_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
