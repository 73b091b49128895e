//! `burn-peft train` run as a user runs it, on the tiny random LLaMA of
//! `crates/peft-models/fixtures/llama/tied` with a word-level tokenizer and a small chat
//! template: every method trains a few steps (the loss falls, the outputs exist and reload),
//! a run stopped with `--stop-after` and resumed equals the uninterrupted run bit for bit for
//! the methods with a controller, and bad inputs are refused with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::Device;
use peft_cli::train::data::Encoder;
use peft_core::{LoadOptions, Method, PeftLinear, PeftModel};
use peft_models::llama::Llama;
use peft_models::loss::IGNORE_INDEX;
use peft_models::tokenizer::ModelTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft-models/fixtures")
}

/// The tied tiny LLaMA (vocab 96) copied into `dir` with a tokenizer whose token `t<i>` is id
/// `i`, `user` 90 and `assistant` 91, and a chat template `role content ` per turn.
fn tiny_model(dir: &Path) -> PathBuf {
    let src = fixtures().join("llama/tied");
    let model = dir.join("model");
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
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let template = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}\
                    {% if add_generation_prompt %}assistant {% endif %}";
    let config = serde_json::json!({"chat_template": template});
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    model
}

/// Four examples of each kind: the completion is the prompt reversed.
fn data(dir: &Path) -> PathBuf {
    let mut lines = Vec::new();
    for i in 0..4 {
        let (a, b, c) = (3 * i + 1, 3 * i + 2, 3 * i + 3);
        lines.push(serde_json::json!({"prompt": format!("t{a} t{b} t{c}"),
                                      "completion": format!("t{c} t{b} t{a}")}));
        lines.push(serde_json::json!({"messages": [
            {"role": "user", "content": format!("t{b} t{c}")},
            {"role": "assistant", "content": format!("t{c} t{b}")}]}));
    }
    lines.push(serde_json::json!({"text": "t40 t41 t42 t43 t44"}));
    lines.push(serde_json::json!({"text": "t50 t51 t52 t53 t54"}));
    let file = dir.join("train.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&file, text.join("\n")).unwrap();
    file
}

/// A run file in `dir` for `method` (its `[method]` lines), `steps` steps.
fn run_file(dir: &Path, name: &str, method: &str, steps: usize, train_extra: &str) -> PathBuf {
    let text = format!(
        r#"[model]
path = "model"

[data]
train = "train.jsonl"
eval = "train.jsonl"
chat_template = true
max_seq_len = 7

[method]
{method}

[train]
steps = {steps}
batch_size = 10
lr = 1e-2
lr_schedule = "cosine"
warmup_steps = 1
seed = 3
out_dir = "runs/{name}"
{train_extra}
"#
    );
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    file
}

/// A folder with the model, the data and nothing else.
fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path());
    data(dir.path());
    dir
}

fn burn_peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(args)
        .output()
        .expect("the burn-peft binary runs")
}

fn train(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    burn_peft(&args)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

fn assert_refused(out: &Output, what: &str, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(!err.contains("panicked"), "{what}: panicked: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{what}: `{needle}` not in: {err}");
    }
}

/// The lines of `metrics.jsonl`.
fn metrics(out_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The metrics without their timings.
fn losses(out_dir: &Path) -> Vec<serde_json::Value> {
    metrics(out_dir)
        .into_iter()
        .map(|mut m| {
            m.as_object_mut().unwrap().remove("tokens_per_s");
            m.as_object_mut().unwrap().remove("step_s");
            m
        })
        .collect()
}

fn method_line(name: &str) -> &'static str {
    match name {
        "lora" => "name = \"lora\"\nr = 4\nlora_alpha = 8",
        "dora" => "name = \"dora\"\nr = 4\nlora_alpha = 8",
        "adalora" => {
            "name = \"adalora\"\ninit_r = 4\ntarget_r = 2\ntinit = 1\ntfinal = 1\ndeltaT = 1"
        }
        "rosa" => "name = \"rosa\"\nr = 4\nd = 0.05\nlora_alpha = 8\nschedule = \"wl2\"",
        "spa" => "name = \"spa\"\nd = 0.05",
        "sft" => {
            "name = \"sft\"\ndensity = 0.05\nreselection_steps = 2\nselection_accumulation_steps = 1"
        }
        "id3" => "name = \"id3\"\nbudget = 600\nmax_steps = 3",
        "pafi" => "name = \"pafi\"\nbudget = 600",
        "bitfit" => "name = \"bitfit\"",
        "full" => "name = \"full\"",
        other => panic!("{other}"),
    }
}

/// Reload `adapter` on the fixture model as method `C`.
fn reload<C: Method>(adapter: &Path) {
    let device = Device::flex();
    let src = fixtures().join("llama/tied");
    let (model, _) = Llama::<PeftLinear<C::Adapter>>::from_pretrained(&src, &device).unwrap();
    PeftModel::<_, C>::from_pretrained(model, adapter, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", adapter.display()));
}

#[test]
fn every_method_trains_the_loss_falls_and_the_outputs_reload() {
    let dir = workspace();
    for name in [
        "lora", "dora", "adalora", "rosa", "spa", "sft", "id3", "pafi", "bitfit", "full",
    ] {
        let config = run_file(dir.path(), name, method_line(name), 5, "");
        let out = train(&config, &[]);
        assert_ok(&out, name);
        let err = stderr(&out);
        assert!(err.contains("trainable params: "), "{name}: {err}");
        if name == "spa" {
            // SpA has nothing to train until its masks exist; the count is printed again at
            // the end, with the sparse values.
            let counts: Vec<usize> = err
                .lines()
                .filter_map(|l| l.split("trainable params: ").nth(1)?.split(' ').next())
                .map(|c| c.parse().unwrap())
                .collect();
            assert!(
                counts.len() == 2 && counts[0] == 0 && counts[1] > 0,
                "spa: {counts:?}"
            );
        }
        assert!(err.contains("4 truncated to 7 tokens"), "{name}: {err}");
        let out_dir = dir.path().join("runs").join(name);
        let m = metrics(&out_dir);
        let first = m[0]["train_loss"].as_f64().unwrap();
        let last = m.last().unwrap()["eval_loss"].as_f64().unwrap();
        assert!(last < first, "{name}: the loss fell from {first} to {last}");
        assert_eq!(
            m.iter().filter(|l| l.get("train_loss").is_some()).count(),
            5
        );
        assert!(
            out_dir.join("run.toml").is_file(),
            "{name}: the config copy"
        );
        match name {
            "lora" | "dora" => reload::<peft_lora::LoraConfig>(&out_dir.join("adapter")),
            "adalora" => {
                reload::<peft_adalora::AdaLoraConfig>(&out_dir.join("adapter"));
                let text =
                    std::fs::read_to_string(out_dir.join("adapter/adapter_config.json")).unwrap();
                assert!(
                    text.contains("rank_pattern"),
                    "adalora writes its rank pattern"
                );
            }
            "rosa" | "spa" => {
                reload::<peft_rosa::RosaConfig>(&out_dir.join("adapter"));
                // The generated masks, saved in out_dir, cover every adapted layer.
                let masks = peft_rosa::RosaMasks::load(&out_dir.join("masks.safetensors"))
                    .unwrap_or_else(|e| panic!("{name}: the masks: {e}"));
                assert!(!masks.is_empty() && masks.nnz() > 0, "{name}: empty masks");
                assert!(
                    masks
                        .iter()
                        .all(|(p, _)| p.ends_with("q_proj") || p.ends_with("v_proj")),
                    "{name}: PEFT's default LLaMA targets"
                );
            }
            "sft" => reload::<peft_sft::SftConfig>(&out_dir.join("adapter")),
            "id3" | "pafi" | "bitfit" => {
                peft_selective::Summary::load(&out_dir.join("summary")).unwrap();
            }
            _ => {
                // Transformers' layout: the folder loads as a model with the trained weights.
                let folder = out_dir.join("hf");
                std::fs::create_dir(&folder).unwrap();
                let src = fixtures().join("llama/tied/config.json");
                std::fs::copy(src, folder.join("config.json")).unwrap();
                std::fs::copy(
                    out_dir.join("model.safetensors"),
                    folder.join("model.safetensors"),
                )
                .unwrap();
                let device = Device::flex();
                let (trained, _) =
                    Llama::<burn::nn::Linear>::from_pretrained(&folder, &device).unwrap();
                let src = fixtures().join("llama/tied");
                let (base, _) = Llama::<burn::nn::Linear>::from_pretrained(&src, &device).unwrap();
                let q = |m: &Llama<burn::nn::Linear>| {
                    peft_core::hosts::read_params(m, |k| k.ends_with("0.self_attn.q_proj.weight"))
                };
                let (a, b) = (q(&trained), q(&base));
                assert_eq!(a.len(), 1);
                assert_eq!(
                    a.values().next().unwrap().shape(),
                    b.values().next().unwrap().shape()
                );
                assert_ne!(a, b, "full: the weights trained");
            }
        }
    }
}

/// The bytes of every file of the final outputs of `out_dir`; RoSA's `mask_save_path` (this
/// run's own `out_dir/masks.safetensors`) is left out of the adapter's config.
fn outputs(out_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let own_masks = format!(
        "{:?}",
        out_dir.join("masks.safetensors").display().to_string()
    );
    for sub in ["adapter", "summary"] {
        let Ok(entries) = std::fs::read_dir(out_dir.join(sub)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            if path.ends_with("adapter_config.json") {
                let text = String::from_utf8(bytes).unwrap();
                bytes = text.replace(&own_masks, "\"<out_dir>/masks\"").into_bytes();
            }
            files.push((
                path.file_name().unwrap().to_string_lossy().into_owned(),
                bytes,
            ));
        }
    }
    files.sort();
    assert!(!files.is_empty(), "{}: no outputs", out_dir.display());
    files
}

#[test]
fn a_stopped_and_resumed_run_equals_the_uninterrupted_one() {
    let dir = workspace();
    for (name, stop) in [("adalora", 3), ("rosa", 2), ("sft", 3), ("id3", 2)] {
        let method = method_line(name);
        // Micro-batches of 3 of the 10 examples, two a step: the data position and the epoch
        // order matter; a checkpoint every 4 steps too.
        let extra = "save_every = 4\ngrad_accum = 2";
        let straight = run_file(dir.path(), &format!("{name}-straight"), method, 6, extra);
        let small = |file: &Path| {
            let text = std::fs::read_to_string(file).unwrap();
            std::fs::write(file, text.replace("batch_size = 10", "batch_size = 3")).unwrap();
        };
        small(&straight);
        assert_ok(&train(&straight, &[]), name);
        let stopped = run_file(dir.path(), &format!("{name}-stopped"), method, 6, extra);
        small(&stopped);
        assert_ok(&train(&stopped, &["--stop-after", &stop.to_string()]), name);
        let runs = dir.path().join("runs");
        let (a, b) = (
            runs.join(format!("{name}-straight")),
            runs.join(format!("{name}-stopped")),
        );
        let checkpoint = b.join(format!("checkpoints/step-{stop}"));
        let kept = if name == "id3" { "summary" } else { "adapter" };
        assert!(
            checkpoint.join(kept).is_dir(),
            "{name}: the checkpoint's {kept}"
        );
        assert!(!b.join("adapter").exists() && !b.join("summary").exists());
        // Running again without --resume is refused: the folder holds checkpoints.
        assert_refused(&train(&stopped, &[]), name, &["--resume", "checkpoints"]);
        // Two more legs: stopped again two steps later, then to the end.
        let again = (stop + 2).to_string();
        assert_ok(
            &train(&stopped, &["--resume", "--stop-after", &again]),
            name,
        );
        assert_ok(&train(&stopped, &["--resume"]), name);
        assert_eq!(losses(&a), losses(&b), "{name}: metrics");
        assert!(outputs(&a) == outputs(&b), "{name}: the outputs differ");
    }
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let dir = workspace();
    let p = dir.path();
    let lora = method_line("lora");

    let config = run_file(p, "unknown", lora, 2, "stepz = 3");
    assert_refused(
        &train(&config, &[]),
        "unknown key",
        &["unknown.toml", "stepz"],
    );

    let config = run_file(
        p,
        "ckpt-devices",
        lora,
        2,
        "gradient_checkpointing = true\ndevices = [\"flex\", \"flex\"]",
    );
    assert_refused(
        &train(&config, &[]),
        "gradient_checkpointing with devices",
        &["ckpt-devices.toml", "gradient_checkpointing", "one device"],
    );

    let config = run_file(p, "no-checkpoints", lora, 2, "save_total_limit = 0");
    assert_refused(
        &train(&config, &[]),
        "save_total_limit 0",
        &["no-checkpoints.toml", "save_total_limit must be at least 1"],
    );

    let config = run_file(p, "method-key", &format!("{lora}\nrank = 3"), 2, "");
    assert_refused(
        &train(&config, &[]),
        "method key",
        &["method-key.toml", "rank"],
    );

    for name in [
        "dora", "adalora", "rosa", "spa", "sft", "id3", "pafi", "bitfit", "full",
    ] {
        let method = format!("{}\nbogus_key = 1", method_line(name));
        let config = run_file(p, &format!("{name}-key"), &method, 2, "");
        assert_refused(
            &train(&config, &[]),
            name,
            &[&format!("{name}-key.toml"), "bogus_key"],
        );
    }

    let config = run_file(p, "type", lora, 2, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("batch_size = 10", "batch_size = \"ten\"");
    std::fs::write(&config, text).unwrap();
    assert_refused(
        &train(&config, &[]),
        "wrong type",
        &["type.toml", "batch_size"],
    );

    let config = run_file(p, "method-type", "name = \"lora\"\nr = \"four\"", 2, "");
    assert_refused(
        &train(&config, &[]),
        "method type",
        &["method-type.toml", "r"],
    );

    let good = std::fs::read_to_string(p.join("train.jsonl")).unwrap();
    std::fs::write(
        p.join("train.jsonl"),
        format!("{good}\n{{\"prompt\": 3}}\n"),
    )
    .unwrap();
    let config = run_file(p, "malformed", lora, 2, "");
    assert_refused(
        &train(&config, &[]),
        "wrong field type",
        &["train.jsonl:11", "`prompt` must be a string"],
    );
    std::fs::write(
        p.join("train.jsonl"),
        format!("{good}\n{{\"prompt\": \"t1\"}}\n"),
    )
    .unwrap();
    assert_refused(
        &train(&config, &[]),
        "missing field",
        &["train.jsonl:11", "missing field `completion`"],
    );
    let bad_chat = r#"{"messages": [{"role": "user", "content": 5}]}"#;
    std::fs::write(p.join("train.jsonl"), format!("{good}\n{bad_chat}\n")).unwrap();
    assert_refused(
        &train(&config, &[]),
        "bad message",
        &["train.jsonl:11", "`messages[0].content` must be a string"],
    );
    std::fs::write(p.join("train.jsonl"), format!("{good}\nnot json\n")).unwrap();
    assert_refused(
        &train(&config, &[]),
        "not JSON",
        &["train.jsonl:11", "not JSON"],
    );

    std::fs::write(p.join("train.jsonl"), "\n").unwrap();
    assert_refused(
        &train(&config, &[]),
        "empty",
        &["train.jsonl", "empty dataset"],
    );
    std::fs::write(p.join("train.jsonl"), good).unwrap();

    // An out_dir with another run's checkpoints.
    let first = run_file(p, "first", lora, 2, "");
    assert_ok(&train(&first, &["--stop-after", "1"]), "first");
    let other = run_file(p, "other", &format!("{lora}\nlora_dropout = 0.0"), 2, "");
    let text = std::fs::read_to_string(&other)
        .unwrap()
        .replace("runs/other", "runs/first");
    std::fs::write(&other, text).unwrap();
    assert_refused(
        &train(&other, &[]),
        "foreign out_dir",
        &["checkpoints", "--resume"],
    );
    assert_refused(
        &train(&other, &["--resume"]),
        "foreign resume",
        &["other settings"],
    );
}

#[test]
fn what_the_reference_accepts_trains_with_warnings_on_stderr() {
    let dir = workspace();
    let p = dir.path();
    // PEFT's AdaLoRA ignores `use_rslora` and reads any `init_lora_weights` string as `true`;
    // loralib's `target_total_rank` sets the final budget.
    let adalora = format!(
        "{}\nuse_rslora = true\ninit_lora_weights = \"gaussian\"\ntarget_total_rank = 3",
        method_line("adalora")
    );
    let config = run_file(p, "adalora-warn", &adalora, 3, "");
    let out = train(&config, &[]);
    assert_ok(&out, "adalora with PEFT's ignored values");
    let err = stderr(&out);
    for needle in ["warning:", "`use_rslora`", "`init_lora_weights`"] {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    // The toolkit's BitFit keys: the paper's biases only, and decay on the chosen entries.
    let bitfit = format!(
        "{}\nbias_only = true\ndecay_chosen = true",
        method_line("bitfit")
    );
    let config = run_file(p, "bitfit-bias", &bitfit, 2, "");
    let out = train(&config, &[]);
    assert_ok(&out, "bitfit bias_only");
    assert!(!stderr(&out).contains("warning:"), "{}", stderr(&out));
    // The earlier key still reads, and a contradiction is refused.
    let old = format!("{}\nall_1d = true", method_line("bitfit"));
    assert_ok(
        &train(&run_file(p, "bitfit-1d", &old, 1, ""), &[]),
        "all_1d",
    );
    let both = format!("{}\nall_1d = true\nbias_only = true", method_line("bitfit"));
    assert_refused(
        &train(&run_file(p, "bitfit-both", &both, 1, ""), &[]),
        "all_1d and bias_only",
        &["bias_only", "all_1d"],
    );
}

#[test]
fn labels_cover_only_completions_and_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let tokenizer = ModelTokenizer::from_hf_dir(&model).unwrap();
    let file = dir.path().join("d.jsonl");
    let lines = [
        r#"{"prompt": "t1 t2", "completion": "t3 t4"}"#,
        r#"{"messages": [{"role": "user", "content": "t5"}, {"role": "assistant", "content": "t6"}, {"role": "user", "content": "t7"}, {"role": "assistant", "content": "t8 t9"}]}"#,
        r#"{"text": "t10 t11 t12"}"#,
    ];
    std::fs::write(&file, lines.join("\n")).unwrap();
    let set = Encoder::new(&tokenizer, true, 64)
        .unwrap()
        .read(&file, 96)
        .unwrap();
    let (u, a, x) = (90, 91, IGNORE_INDEX);
    // `user t1 t2 assistant t3 t4`: only the completion counts.
    assert_eq!(set.examples[0].ids, vec![u, 1, 2, a, 3, 4]);
    assert_eq!(set.examples[0].labels, vec![x, x, x, x, 3, 4]);
    // Both assistant turns count, nothing else.
    assert_eq!(set.examples[1].ids, vec![u, 5, a, 6, u, 7, a, 8, 9]);
    assert_eq!(set.examples[1].labels, vec![x, x, x, 6, x, x, x, 8, 9]);
    // Text: every token.
    assert_eq!(set.examples[2].labels, vec![10, 11, 12]);
    assert_eq!((set.truncated, set.dropped), (0, 0));

    // Truncation is counted; an example left with nothing to learn is dropped.
    let set = Encoder::new(&tokenizer, true, 4)
        .unwrap()
        .read(&file, 96)
        .unwrap();
    assert_eq!((set.truncated, set.dropped), (2, 1));
    assert_eq!(set.examples.len(), 2);

    // Without the template a prompt and its completion are joined as they are.
    let raw = Encoder::new(&tokenizer, false, 64).unwrap();
    std::fs::write(&file, r#"{"prompt": "t1 t2", "completion": " t3 t4"}"#).unwrap();
    let set = raw.read(&file, 96).unwrap();
    assert_eq!(set.examples[0].ids, vec![1, 2, 3, 4]);
    assert_eq!(set.examples[0].labels, vec![x, x, 3, 4]);
    std::fs::write(&file, lines[1]).unwrap();
    let err = format!("{:#}", raw.read(&file, 96).unwrap_err());
    assert!(
        err.contains("d.jsonl:1") && err.contains("chat_template"),
        "{err}"
    );
}

#[test]
fn a_non_finite_loss_stops_the_run_naming_the_step() {
    let dir = workspace();
    let config = run_file(dir.path(), "nan", "name = \"full\"", 6, "save_every = 1");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("lr = 1e-2", "lr = 1e30");
    std::fs::write(&config, text).unwrap();
    let out = train(&config, &[]);
    assert_refused(&out, "non-finite", &["step ", "not finite"]);
    let out_dir = dir.path().join("runs/nan");
    assert!(!out_dir.join("model.safetensors").exists());
    // Every checkpoint left is complete and finite.
    if let Ok(entries) = std::fs::read_dir(out_dir.join("checkpoints")) {
        for e in entries {
            let path = e.unwrap().path();
            assert!(path.join("checkpoint.json").is_file(), "{}", path.display());
        }
    }
}

/// Start `burn-peft train` paused at `point` (see `peft_cli::train::run::PAUSE_ENV`), wait
/// until it says it is there, and kill it with SIGKILL.
fn kill_at(config: &Path, extra: &[&str], point: &str) {
    use std::io::{BufRead, BufReader};
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(&args)
        .env(peft_cli::train::run::PAUSE_ENV, point)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        said.push_str(&line);
        said.push('\n');
        if line == format!("paused at {point}") {
            // `Child::kill` is SIGKILL on Unix: no destructor, no cleanup runs.
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
    }
    let status = child.wait().unwrap();
    panic!("the run never reached {point} ({status}): {said}");
}

/// Start `burn-peft train` and SIGKILL it after `after`, wherever it is then (or let it end).
fn kill_after(config: &Path, extra: &[&str], after: std::time::Duration) {
    let mut args = vec!["train", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let _ = child.kill();
    child.wait().unwrap();
}

/// `gradient_checkpointing = true` trains as the plain run does (the same losses, evaluations
/// and outputs to rounding), for LoRA with dropout, RoSA through its mask collection and
/// restart, SFT with its gradient probe (RigL) and full fine-tuning (the tied table), with
/// gradient accumulation; and resumes exactly.
#[test]
fn gradient_checkpointing_trains_as_the_plain_run() {
    let dir = workspace();
    for name in ["lora", "rosa", "sft", "full"] {
        let mut method = method_line(name).to_string();
        if name == "lora" {
            // Dropout masks come from other seeds with checkpointing: compare without.
            method.push_str("\nlora_dropout = 0.0");
        }
        let extra = "grad_accum = 2\neval_every = 3\neval_generate = false";
        let plain = run_file(dir.path(), &format!("{name}-plain"), &method, 6, extra);
        assert_ok(&train(&plain, &[]), name);
        let ckpt = format!("{extra}\ngradient_checkpointing = true\nsave_every = 2");
        let file = run_file(dir.path(), &format!("{name}-ckpt"), &method, 6, &ckpt);
        assert_ok(&train(&file, &["--stop-after", "3"]), name);
        assert_ok(&train(&file, &["--resume"]), name);
        let runs = dir.path().join("runs");
        let (a, b) = (
            metrics(&runs.join(format!("{name}-plain"))),
            metrics(&runs.join(format!("{name}-ckpt"))),
        );
        assert_eq!(a.len(), b.len(), "{name}: metrics lines");
        let mut compared = [0, 0];
        for (x, y) in a.iter().zip(&b) {
            for (k, key) in ["train_loss", "eval_loss"].iter().enumerate() {
                assert_eq!(x[key].is_null(), y[key].is_null(), "{name}: {key} in both");
                if let (Some(x), Some(y)) = (x[key].as_f64(), y[key].as_f64()) {
                    assert!(
                        (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                        "{name}: {key} {x} vs {y}"
                    );
                    compared[k] += 1;
                }
            }
        }
        assert_eq!(compared, [6, 2], "{name}: 6 training losses, 2 evaluations");
        // And the loss fell: the gradients were applied.
        let first = a[0]["train_loss"].as_f64().unwrap();
        let last = a
            .iter()
            .rev()
            .find_map(|m| m["train_loss"].as_f64())
            .unwrap();
        assert!(last < first, "{name}: {first} -> {last}");
    }
}

/// `save_total_limit` keeps the newest checkpoints only, and a run resumed from what is left
/// still equals the uninterrupted one.
#[test]
fn save_total_limit_keeps_the_newest_checkpoints_and_resume_still_works() {
    let dir = workspace();
    let method = method_line("lora");
    let straight = run_file(dir.path(), "all", method, 7, "save_every = 2");
    assert_ok(&train(&straight, &[]), "straight");
    let limited = "save_every = 2\nsave_total_limit = 2";
    let stopped = run_file(dir.path(), "limited", method, 7, limited);
    assert_ok(&train(&stopped, &["--stop-after", "5"]), "stopped");
    let runs = dir.path().join("runs");
    let kept = |run: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(runs.join(run).join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(kept("all"), ["step-2", "step-4", "step-6"]);
    // Steps 2 and 4, then the stop's checkpoint at 5: the two newest stay.
    assert_eq!(kept("limited"), ["step-4", "step-5"]);
    assert_ok(&train(&stopped, &["--resume"]), "resumed");
    assert_eq!(kept("limited"), ["step-5", "step-6"]);
    let (a, b) = (runs.join("all"), runs.join("limited"));
    assert_eq!(losses(&a), losses(&b), "metrics");
    assert!(outputs(&a) == outputs(&b), "the outputs differ");
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_uninterrupted_result() {
    let dir = workspace();
    let method = method_line("sft");
    let extra = "save_every = 2\ngrad_accum = 2";
    let straight = run_file(dir.path(), "straight", method, 8, extra);
    assert_ok(&train(&straight, &[]), "straight");
    let killed = run_file(dir.path(), "killed", method, 8, extra);
    let runs = dir.path().join("runs");
    let (a, b) = (runs.join("straight"), runs.join("killed"));

    // Killed while writing checkpoint 4: step-2 stays the newest complete one, and the
    // half-written folder is never taken for a checkpoint.
    kill_at(&killed, &[], "step-4");
    let checkpoints = b.join("checkpoints");
    assert!(checkpoints.join("step-2/checkpoint.json").is_file());
    assert!(checkpoints.join(".tmp-step-4/model.bpk").is_file());
    assert!(!checkpoints.join("step-4").exists());
    let (step, _) = peft_cli::train::run::newest_checkpoint(&b)
        .unwrap()
        .unwrap();
    assert_eq!(step, 2);

    // Killed while the final adapter is being written: no `adapter/` appears half-made.
    kill_at(&killed, &["--resume"], "final");
    assert!(
        !b.join("adapter").exists(),
        "a final adapter before its rename"
    );
    assert!(b.join(".tmp-final/adapter").is_dir());
    assert!(checkpoints.join("step-8/checkpoint.json").is_file());
    // Resumed from step 8 (nothing left to train but the outputs), then killed again at
    // arbitrary moments of a fresh leg from a rewound copy: wherever the kill lands, the next
    // resume continues from a complete checkpoint.
    for ms in [40u64, 120, 250, 400] {
        std::fs::remove_dir_all(checkpoints.join("step-8")).ok();
        std::fs::remove_dir_all(checkpoints.join("step-6")).ok();
        kill_after(&killed, &["--resume"], std::time::Duration::from_millis(ms));
        assert!(!b.join("adapter").exists() || b.join("adapter/adapter_config.json").is_file());
    }
    assert_ok(&train(&killed, &["--resume"]), "resumed");
    assert_eq!(losses(&a), losses(&b), "metrics");
    assert!(outputs(&a) == outputs(&b), "the outputs differ");
    assert!(!b.join(".tmp-final").exists());
}

#[test]
fn a_bare_model_name_is_looked_up_beside_the_run_file_then_in_the_model_cache() {
    let dir = workspace();
    // The model moves into a cache folder, one folder down, as the fetch scripts lay it out.
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(cache.join("tiny")).unwrap();
    std::fs::rename(dir.path().join("model"), cache.join("tiny/model")).unwrap();
    let config = run_file(dir.path(), "cached", method_line("lora"), 1, "");
    let run = |cache: &Path| {
        Command::new(env!("CARGO_BIN_EXE_burn-peft"))
            .args(["train", "--config", config.to_str().unwrap()])
            .env("BURN_PEFT_CACHE", cache)
            .output()
            .unwrap()
    };
    assert_ok(&run(&cache), "found in the cache");
    assert!(dir.path().join("runs/cached/adapter").is_dir());
    // Neither beside the run file nor in the cache: the error names the path it looked for.
    std::fs::remove_dir_all(dir.path().join("runs")).unwrap();
    let empty = dir.path().join("empty-cache");
    std::fs::create_dir(&empty).unwrap();
    let missing = dir.path().join("model");
    assert_refused(
        &run(&empty),
        "missing",
        &["model not found", &missing.display().to_string()],
    );
}

/// Every ready run of `examples/runs/` is a valid run file of its method: each trains its
/// steps on the tiny model (its SmolLM2 path, budgets and out_dir swapped for the tiny ones)
/// and writes its outputs, so a key renamed or mistyped there fails here.
#[test]
fn every_ready_run_in_examples_runs_is_valid_and_trains() {
    let dir = workspace();
    let runs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/runs");
    let data = runs.join("data").canonicalize().unwrap();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&runs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("path = \"SmolLM2-135M-Instruct.Q4_1.gguf\"")
                && text.contains(&format!("out_dir = \"out/{name}\""))
                && text.contains(&format!("--config examples/runs/{name}.toml")),
            "{name}: model, out_dir and the command in its header"
        );
        let mut tiny = text
            .replace("SmolLM2-135M-Instruct.Q4_1.gguf", "model")
            .replace("\"data/", &format!("\"{}/", data.display()))
            .replace("batch_size = 4", "batch_size = 2")
            .replace(&format!("out/{name}"), &format!("runs/{name}"));
        for budget in ["budget = 2442240", "num_tunable_weights = 2442240"] {
            let key = budget.split(' ').next().unwrap();
            tiny = tiny.replace(budget, &format!("{key} = 300"));
        }
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, tiny).unwrap();
        assert_ok(&train(&file, &[]), &name);
        let out = dir.path().join("runs").join(&name);
        let output = ["adapter", "summary", "model.safetensors"]
            .iter()
            .any(|o| out.join(o).exists());
        assert!(output, "{name}: no outputs in {}", out.display());
        seen.push(name);
    }
    seen.sort();
    let mut methods: Vec<_> = peft_cli::train::config::METHODS.to_vec();
    methods.sort_unstable();
    assert_eq!(seen, methods, "one ready run per method");
}

/// RoSA's two-run recipe from the run files alone: the first run generates the masks, saves
/// them in its out_dir and ends (`terminate_after_mask_generation`); the second starts from them
/// (`mask_load_path`) and trains to the end.
#[test]
fn rosa_two_run_recipe_from_the_run_files_alone() {
    let dir = workspace();
    let first = "name = \"rosa\"\nr = 4\nd = 0.05\nlora_alpha = 8\nschedule = \"wl2\"\n\
                 terminate_after_mask_generation = true";
    let config = run_file(dir.path(), "masks", first, 6, "");
    let out = train(&config, &[]);
    assert_ok(&out, "the first run");
    assert!(
        stderr(&out).contains("the method ended the run after step"),
        "{}",
        stderr(&out)
    );
    let run1 = dir.path().join("runs/masks");
    let masks = peft_rosa::RosaMasks::load(&run1.join("masks.safetensors")).unwrap();
    assert!(!masks.is_empty() && masks.nnz() > 0);
    assert!(
        !run1.join("adapter").exists(),
        "no final adapter from the first run"
    );
    let steps = metrics(&run1)
        .iter()
        .filter(|m| m.get("train_loss").is_some())
        .count();
    assert!(steps < 6, "the first run ended early ({steps} steps)");

    let second = "name = \"rosa\"\nr = 4\nd = 0.05\nlora_alpha = 8\n\
                  schedule = \"default\"\nmask_load_path = \"runs/masks/masks.safetensors\"";
    let config = run_file(dir.path(), "restart", second, 4, "");
    assert_ok(&train(&config, &[]), "the second run");
    let run2 = dir.path().join("runs/restart");
    assert!(
        !run2.join("masks.safetensors").exists(),
        "masks loaded, not generated"
    );
    reload::<peft_rosa::RosaConfig>(&run2.join("adapter"));
    // The adapter's sparse structure is the first run's masks.
    let tensors = std::fs::read(run2.join("adapter/adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&tensors).unwrap();
    let values: usize = file
        .names()
        .iter()
        .filter(|n| n.ends_with("rosa_spa.values"))
        .map(|n| file.tensor(n).unwrap().shape().iter().product::<usize>())
        .sum();
    assert_eq!(
        values,
        masks.nnz(),
        "the saved sparse values follow the masks"
    );
}

/// The biases (`bias = "all"`) of the adapter in `dir`, by their base model name.
fn biases(file: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(file).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| name.ends_with(".bias"))
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let name = name.strip_prefix("base_model.model.").unwrap_or(&name);
            (name.replace(".base_layer.", "."), values)
        })
        .collect()
}

/// `|Δ| / lr` of every bias entry at the first and second step of the run in `out_dir`
/// (checkpoints at steps 1 and 2), for the entries whose first update is a full `lr` step.
fn bias_updates(dir: &Path, out_dir: &Path) -> (Vec<f64>, Vec<f64>) {
    let lrs: Vec<f64> = metrics(out_dir)
        .iter()
        .filter_map(|m| m.get("lr").and_then(|v| v.as_f64()))
        .collect();
    let b0 = biases(&dir.join("model/model.safetensors"));
    let at = |step: usize| {
        biases(&out_dir.join(format!(
            "checkpoints/step-{step}/adapter/adapter_model.safetensors"
        )))
    };
    let (b1, b2) = (at(1), at(2));
    assert!(!b1.is_empty(), "{}: no biases saved", out_dir.display());
    let (mut u1, mut u2) = (Vec::new(), Vec::new());
    for (name, v1) in &b1 {
        let v0 = b0
            .get(name)
            .unwrap_or_else(|| panic!("{name} not among {:?}", b0.keys()));
        let v2 = &b2[name];
        for i in 0..v1.len() {
            let first = f64::from(v1[i] - v0[i]).abs() / lrs[0];
            if first > 0.99 {
                u1.push(first);
                u2.push(f64::from(v2[i] - v1[i]).abs() / lrs[1]);
            }
        }
    }
    assert!(
        u1.len() > 100,
        "{}: {} bias entries moved",
        out_dir.display(),
        u1.len()
    );
    u2.sort_by(f64::total_cmp);
    (u1, u2)
}

#[test]
fn sft_with_sm3_steps_the_dense_tensors_with_sm3_and_resumes_bit_exact() {
    let dir = workspace();
    let method = |algorithm: &str| {
        format!(
            "name = \"sft\"\ndensity = 0.05\nselection_algorithm = \"{algorithm}\"\n\
             reselection_steps = 2\nselection_accumulation_steps = 1\nbias = \"all\""
        )
    };
    let sm3 = method("sm3");
    let straight = run_file(dir.path(), "sm3-straight", &sm3, 4, "save_every = 1");
    assert_ok(&train(&straight, &[]), "sm3 straight");
    let stopped = run_file(dir.path(), "sm3-stopped", &sm3, 4, "save_every = 1");
    assert_ok(&train(&stopped, &["--stop-after", "1"]), "sm3 to step 1");
    assert_ok(
        &train(&stopped, &["--resume", "--stop-after", "2"]),
        "sm3 to step 2",
    );
    assert_ok(&train(&stopped, &["--resume"]), "sm3 to the end");
    let runs = dir.path().join("runs");
    let (a, b) = (runs.join("sm3-straight"), runs.join("sm3-stopped"));
    assert_eq!(losses(&a), losses(&b), "metrics");
    assert!(outputs(&a) == outputs(&b), "the resumed outputs differ");

    // The same batch every step (10 examples, batch 10), so g2 ≈ g1 for each bias entry.
    // SM3 (a bias's accumulator is elementwise): u2 = g2 / √(g1² + g2²) ≈ 1/√2 and never above
    // 1. AdamW: m̂/√v̂ ≈ 1 for a steady gradient.
    let (u1, u2) = bias_updates(dir.path(), &b);
    let median = u2[u2.len() / 2];
    assert!(
        (0.55..0.85).contains(&median) && u2[u2.len() - 1] <= 1.0 + 1e-3,
        "SM3's second bias step: median |Δ|/lr {median}, max {}",
        u2[u2.len() - 1]
    );
    assert!(
        u1.iter().all(|u| *u <= 1.0 + 1e-3),
        "the first step is lr · g/√(g² + ε)"
    );
    // RigL's run steps them with AdamW: the same statistic is near 1.
    let rigl = run_file(dir.path(), "rigl", &method("rigl"), 3, "save_every = 1");
    assert_ok(&train(&rigl, &[]), "rigl");
    let (_, u2) = bias_updates(dir.path(), &runs.join("rigl"));
    let median = u2[u2.len() / 2];
    assert!(
        median > 0.9,
        "AdamW's second bias step: median |Δ|/lr {median}"
    );
}

/// Every tensor of the safetensors files among `files`, by file and key: integer tensors
/// (masks, indices) as they are, float tensors as `f32`.
fn tensors(files: &[(String, Vec<u8>)]) -> Vec<(String, String, Vec<f64>, bool)> {
    let mut out = Vec::new();
    for (name, bytes) in files {
        if !name.ends_with(".safetensors") {
            continue;
        }
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let mut keys: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        keys.sort();
        for key in keys {
            let view = st.tensor(&key).unwrap();
            let data = view.data();
            let (values, float): (Vec<f64>, bool) = match view.dtype() {
                safetensors::Dtype::F32 => (
                    data.chunks(4)
                        .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                        .collect(),
                    true,
                ),
                safetensors::Dtype::I64 => (
                    data.chunks(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                        .collect(),
                    false,
                ),
                safetensors::Dtype::I32 => (
                    data.chunks(4)
                        .map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap())))
                        .collect(),
                    false,
                ),
                other => panic!("{name}: {key}: unexpected dtype {other:?}"),
            };
            out.push((name.clone(), key, values, float));
        }
    }
    out
}

/// `[train] devices` and `--devices`: two replicas on the flex device, each on its share of
/// every micro-batch, train as one device does: the same configs (AdaLoRA's rank pattern), the
/// same integer tensors (RoSA's masks, SFT's indices) and the same text outputs (ID3's
/// summary), float tensors within f32 rounding. A two-replica run stopped and resumed equals
/// the uninterrupted two-replica run bit for bit.
#[test]
fn two_devices_train_as_one_and_resume_exactly() {
    let dir = workspace();
    let runs = dir.path().join("runs");
    for (name, stop) in [
        ("lora", 2),
        ("adalora", 3),
        ("rosa", 2),
        ("sft", 3),
        ("id3", 2),
    ] {
        let method = method_line(name);
        // Micro-batches of 5 of the 10 examples (shares of 3 and 2: unequal token counts), two
        // a step.
        let extra = "grad_accum = 2";
        let with = |file: &Path, devices: &str| {
            let text = std::fs::read_to_string(file).unwrap();
            let text = text.replace("batch_size = 10", "batch_size = 5");
            std::fs::write(file, format!("{text}{devices}")).unwrap();
        };
        let one = run_file(dir.path(), &format!("{name}-one"), method, 6, extra);
        with(&one, "");
        assert_ok(&train(&one, &[]), name);
        let two = run_file(dir.path(), &format!("{name}-two"), method, 6, extra);
        with(&two, "devices = [\"flex\", \"flex\"]\n");
        assert_ok(&train(&two, &[]), name);
        let stopped = run_file(dir.path(), &format!("{name}-stopped"), method, 6, extra);
        with(&stopped, "");
        let flag = ["--devices", "flex,flex"];
        let stop_at = stop.to_string();
        assert_ok(
            &train(&stopped, &[&flag[..], &["--stop-after", &stop_at]].concat()),
            name,
        );
        assert_ok(&train(&stopped, &[&flag[..], &["--resume"]].concat()), name);

        let (a, b, c) = (
            runs.join(format!("{name}-one")),
            runs.join(format!("{name}-two")),
            runs.join(format!("{name}-stopped")),
        );
        assert_eq!(losses(&b), losses(&c), "{name}: resumed metrics");
        assert!(outputs(&b) == outputs(&c), "{name}: resumed outputs differ");

        let (oa, ob) = (outputs(&a), outputs(&b));
        assert_eq!(
            oa.iter().map(|f| &f.0).collect::<Vec<_>>(),
            ob.iter().map(|f| &f.0).collect::<Vec<_>>(),
            "{name}"
        );
        for ((file, x), (_, y)) in oa.iter().zip(&ob) {
            if !file.ends_with(".safetensors") {
                assert!(x == y, "{name}: {file} differs between one and two devices");
            }
        }
        let (ta, tb) = (tensors(&oa), tensors(&ob));
        assert!(!ta.is_empty() || name == "id3", "{name}: no tensors");
        assert_eq!(ta.len(), tb.len(), "{name}");
        for ((file, key, x, float), (_, key_b, y, _)) in ta.iter().zip(&tb) {
            assert_eq!(key, key_b, "{name}: {file}");
            assert_eq!(x.len(), y.len(), "{name}: {file}: {key}");
            if *float {
                let diff = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f64::max);
                assert!(diff <= 1e-4, "{name}: {file}: {key} differs by {diff}");
            } else {
                assert_eq!(
                    x, y,
                    "{name}: {file}: {key}: one device and two decide alike"
                );
            }
        }
        // The losses agree within rounding too.
        for (p, q) in losses(&a).iter().zip(losses(&b)) {
            let (p, q) = (&p["train_loss"], &q["train_loss"]);
            if let (Some(p), Some(q)) = (p.as_f64(), q.as_f64()) {
                assert!((p - q).abs() <= 1e-4, "{name}: loss {p} against {q}");
            }
        }
    }

    // A device this build lacks, and fewer examples per micro-batch than devices: refused.
    let lora = run_file(dir.path(), "lora-bad", method_line("lora"), 2, "");
    assert_refused(
        &train(&lora, &["--devices", "tpu:0"]),
        "unknown device",
        &["unknown device `tpu:0`"],
    );
    let many = ["flex"; 11].join(",");
    assert_refused(
        &train(&lora, &["--devices", &many]),
        "too many devices",
        &["at least the number of devices"],
    );
}

/// A run file with `[model] base = "<base>"` after the model path.
fn with_base(config: &Path, base: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = text.replacen(
        "path = \"model\"",
        &format!("path = \"model\"\nbase = \"{base}\""),
        1,
    );
    std::fs::write(config, text).unwrap();
}

/// `[model] base = "nf4-dq"` (QLoRA's base): the adapter methods train over the packed base
/// (QLoRA, QRoSA, QSFT, AdaLoRA), the loss falls and the adapters load onto the f32 model; a
/// selective method and an unknown format are refused with the reason.
#[test]
fn adapter_methods_train_over_a_packed_base_from_the_run_file() {
    let dir = workspace();
    for name in ["lora", "adalora", "rosa", "sft"] {
        let run = format!("q{name}");
        let config = run_file(dir.path(), &run, method_line(name), 5, "");
        with_base(&config, "nf4-dq");
        let out = train(&config, &[]);
        assert_ok(&out, &run);
        let out_dir = dir.path().join("runs").join(&run);
        let m = metrics(&out_dir);
        let first = m[0]["train_loss"].as_f64().unwrap();
        let last = m.last().unwrap()["eval_loss"].as_f64().unwrap();
        assert!(last < first, "{run}: the loss fell from {first} to {last}");
        let copy = std::fs::read_to_string(out_dir.join("run.toml")).unwrap();
        assert!(copy.contains("base = \"nf4-dq\""), "{run}: {copy}");
        let adapter = out_dir.join("adapter");
        match name {
            "lora" => reload::<peft_lora::LoraConfig>(&adapter),
            "adalora" => reload::<peft_adalora::AdaLoraConfig>(&adapter),
            "rosa" => reload::<peft_rosa::RosaConfig>(&adapter),
            _ => reload::<peft_sft::SftConfig>(&adapter),
        }
    }
    let config = run_file(dir.path(), "qbitfit", method_line("bitfit"), 2, "");
    with_base(&config, "nf4");
    let out = train(&config, &[]);
    assert_refused(
        &out,
        "bitfit over nf4",
        &["bitfit", "base = \"f32\"", "adapter method"],
    );
    let config = run_file(dir.path(), "int4", method_line("lora"), 2, "");
    with_base(&config, "int4");
    let out = train(&config, &[]);
    assert_refused(&out, "base int4", &["int4", "nf4-dq"]);
}
