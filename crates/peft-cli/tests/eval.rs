//! Evaluation, in `burn-peft train`'s metrics and as `burn-peft eval`, on the tiny random
//! LLaMA: `eval_accuracy` is the exact match of greedy completions (checked against
//! `burn-peft generate` run on every prompt), `eval` reproduces the run's last evaluation from
//! its saved output for every kind of output, a text-only eval set has no accuracy, evaluating
//! does not change training, and bad inputs are refused with the reason.

mod common;

use std::path::Path;

use common::*;

/// The eval JSON object `burn-peft eval` prints.
fn eval_json(config: &Path, adapter: Option<&Path>) -> serde_json::Value {
    let mut args = vec!["eval".as_ref(), "--config".as_ref(), config.as_os_str()];
    if let Some(a) = adapter {
        args.extend(["--adapter".as_ref(), a.as_os_str()]);
    }
    let out = burn_peft(args);
    assert_ok(&out, "eval");
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "one JSON line: {text}");
    serde_json::from_str(&text).unwrap()
}

/// The last evaluation line of a run's metrics.
fn last_eval(out_dir: &Path) -> serde_json::Value {
    metrics(out_dir)
        .into_iter()
        .rev()
        .find(|m| m.get("eval_loss").is_some())
        .expect("an evaluation line")
}

fn close(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
    assert!(
        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
        "{what}: {a} vs {b}"
    );
}

#[test]
fn eval_accuracy_is_the_exact_match_of_greedy_completions() {
    let dir = workspace();
    let p = dir.path();
    // The training examples, and two of their prompts with another completion (the prompt
    // itself, not reversed): a model that learned the task misses those two.
    let mut lines: Vec<serde_json::Value> = std::fs::read_to_string(p.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.push(serde_json::json!({"prompt": "t1 t2 t3", "completion": "t1 t2 t3"}));
    lines.push(serde_json::json!({"messages": [
        {"role": "user", "content": "t5 t6"}, {"role": "assistant", "content": "t5 t6"}]}));
    write_lines(&p.join("eval.jsonl"), &lines);
    // Long enough for the full model to learn the reversals.
    let config = run_file(
        p,
        "full",
        "name = \"full\"",
        40,
        Some("eval.jsonl"),
        "eval_every = 20",
    );
    assert_ok(&train(&config), "train");
    let out_dir = p.join("runs/full");
    let evals: Vec<_> = metrics(&out_dir)
        .into_iter()
        .filter(|m| m.get("eval_loss").is_some())
        .collect();
    let steps: Vec<_> = evals.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [20, 40]);
    for m in &evals {
        let a = m["eval_accuracy"].as_f64().expect("eval_accuracy");
        assert!((0.0..=1.0).contains(&a), "{m}");
    }

    // The same prompts through `burn-peft generate --chat`, stopped as evaluation stops.
    let weights = out_dir.join("model.safetensors");
    let mut matched = 0;
    for record in &lines {
        let (prompt, completion) = match record.get("messages") {
            Some(m) => (m[0]["content"].clone(), m[1]["content"].clone()),
            None => (record["prompt"].clone(), record["completion"].clone()),
        };
        let (prompt, completion) = (prompt.as_str().unwrap(), completion.as_str().unwrap());
        let budget = (completion.split_whitespace().count() + 4).to_string();
        let out = burn_peft([
            "generate".as_ref(),
            "--model".as_ref(),
            p.join("model").as_os_str(),
            "--adapter".as_ref(),
            weights.as_os_str(),
            "--chat".as_ref(),
            "--prompt".as_ref(),
            prompt.as_ref(),
            "--max-new-tokens".as_ref(),
            budget.as_ref(),
        ]);
        assert_ok(&out, "generate");
        if stdout(&out).trim() == completion.trim() {
            matched += 1;
        }
    }
    assert!(
        (1..10).contains(&matched),
        "{matched} of 10 matched: some reversals are learned, the two others are missed"
    );
    let last = last_eval(&out_dir);
    assert_eq!(
        last["eval_accuracy"].as_f64().unwrap(),
        matched as f64 / 10.0
    );

    // `burn-peft eval` on the run's own output reproduces the last evaluation.
    let json = eval_json(&config, None);
    close(&json["eval_loss"], &last["eval_loss"], "eval_loss");
    assert_eq!(json["eval_accuracy"], last["eval_accuracy"]);
    assert_eq!(json["matched"], matched);
    assert_eq!(
        (json["targets"].as_u64(), json["examples"].as_u64()),
        (Some(10), Some(10))
    );
    assert!(
        json["adapter"]
            .as_str()
            .unwrap()
            .ends_with("model.safetensors")
    );

    // `--eval-file` and `--predictions`: the same scores, and every completion with its line.
    let preds = p.join("preds.jsonl");
    let out = burn_peft([
        "eval".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--eval-file".as_ref(),
        p.join("eval.jsonl").as_os_str(),
        "--predictions".as_ref(),
        preds.as_os_str(),
    ]);
    assert_ok(&out, "eval --eval-file --predictions");
    let again: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(again["matched"], matched);
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 10);
    for (i, (row, record)) in rows.iter().zip(&lines).enumerate() {
        assert_eq!(row["line"], i + 1);
        let reference = match record.get("messages") {
            Some(m) => m[1]["content"].as_str().unwrap(),
            None => record["completion"].as_str().unwrap(),
        };
        assert_eq!(row["reference"], reference);
        let generated = row["generated"].as_str().unwrap();
        assert_eq!(
            row["matched"],
            generated.trim() == reference.trim(),
            "{row}"
        );
    }
    let hits = rows.iter().filter(|r| r["matched"] == true).count();
    assert_eq!(hits, matched);
}

#[test]
fn without_the_chat_template_the_raw_prompt_is_completed() {
    let dir = workspace();
    let p = dir.path();
    // Prompt/completion examples only; the last one's completion is not the reversal.
    let mut lines = Vec::new();
    for i in 0..4 {
        let (a, b, c) = (3 * i + 1, 3 * i + 2, 3 * i + 3);
        lines.push(serde_json::json!({"prompt": format!("t{a} t{b} t{c}"),
                                      "completion": format!(" t{c} t{b} t{a}")}));
    }
    write_lines(&p.join("raw.jsonl"), &lines);
    lines.push(serde_json::json!({"prompt": "t1 t2 t3", "completion": " t1 t2 t3"}));
    write_lines(&p.join("raw-eval.jsonl"), &lines);
    let config = run_file(p, "raw", "name = \"full\"", 40, Some("raw-eval.jsonl"), "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("train = \"train.jsonl\"", "train = \"raw.jsonl\"")
        .replace("chat_template = true", "chat_template = false");
    std::fs::write(&config, text).unwrap();
    assert_ok(&train(&config), "train");
    let weights = p.join("runs/raw/model.safetensors");
    let mut matched = 0;
    for record in &lines {
        let (prompt, completion) = (
            record["prompt"].as_str().unwrap(),
            record["completion"].as_str().unwrap(),
        );
        // Without --chat, generate encodes the prompt as training does (with the tokenizer's
        // special tokens) and stops at the end-of-sequence token.
        let out = burn_peft([
            "generate".as_ref(),
            "--model".as_ref(),
            p.join("model").as_os_str(),
            "--adapter".as_ref(),
            weights.as_os_str(),
            "--prompt".as_ref(),
            prompt.as_ref(),
            "--max-new-tokens".as_ref(),
            "7".as_ref(),
        ]);
        assert_ok(&out, "generate");
        if stdout(&out).trim() == completion.trim() {
            matched += 1;
        }
    }
    assert!((1..5).contains(&matched), "{matched} of 5 matched");
    let last = last_eval(&p.join("runs/raw"));
    assert_eq!(
        last["eval_accuracy"].as_f64().unwrap(),
        matched as f64 / 5.0
    );
}

#[test]
fn eval_reads_every_kind_of_run_output() {
    let dir = workspace();
    let p = dir.path();
    for name in ["lora", "adalora", "sft", "bitfit"] {
        let config = run_file(p, name, method_line(name), 3, Some("train.jsonl"), "");
        assert_ok(&train(&config), name);
        let last = last_eval(&p.join("runs").join(name));
        let json = eval_json(&config, None);
        close(&json["eval_loss"], &last["eval_loss"], name);
        assert_eq!(json["eval_accuracy"], last["eval_accuracy"], "{name}");
        let kept = if name == "bitfit" {
            "summary"
        } else {
            "adapter"
        };
        assert!(
            json["adapter"].as_str().unwrap().ends_with(kept),
            "{name}: {json}"
        );
    }
    // Another run's output given with --adapter: the base model's scores differ from the
    // trained ones.
    let lora = run_file(p, "lora", method_line("lora"), 3, Some("train.jsonl"), "");
    let bitfit = p.join("runs/bitfit/summary");
    let a = eval_json(&lora, None);
    let b = eval_json(&lora, Some(&bitfit));
    assert!(b["adapter"].as_str().unwrap().ends_with("summary"));
    assert_ne!(a["eval_loss"], b["eval_loss"]);
}

#[test]
fn a_text_only_eval_set_has_no_accuracy() {
    let dir = workspace();
    let p = dir.path();
    write_lines(
        &p.join("text.jsonl"),
        &[
            serde_json::json!({"text": "t40 t41 t42 t43"}),
            serde_json::json!({"text": "t50 t51 t52"}),
        ],
    );
    let config = run_file(
        p,
        "text",
        method_line("lora"),
        4,
        Some("text.jsonl"),
        "eval_every = 2",
    );
    assert_ok(&train(&config), "train");
    let evals: Vec<_> = metrics(&p.join("runs/text"))
        .into_iter()
        .filter(|m| m.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(
        evals.iter().all(|m| m.get("eval_accuracy").is_none()),
        "{evals:?}"
    );
    let out = burn_peft(["eval".as_ref(), "--config".as_ref(), config.as_os_str()]);
    assert_ok(&out, "eval");
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(json.get("eval_accuracy").is_none(), "{json}");
    assert_eq!(json["targets"], 0);
    assert!(stderr(&out).contains("no completions"), "{}", stderr(&out));
}

#[test]
fn evaluating_does_not_change_training() {
    let dir = workspace();
    let p = dir.path();
    // With dropout: evaluation must draw nothing from the training's random stream.
    let lora = format!("{}\nlora_dropout = 0.1", method_line("lora"));
    let with = run_file(p, "with", &lora, 4, Some("train.jsonl"), "eval_every = 1");
    let without = run_file(p, "without", &lora, 4, None, "");
    // `eval_generate = false`: the loss alone at each evaluation.
    let loss_only = run_file(
        p,
        "loss_only",
        &lora,
        4,
        Some("train.jsonl"),
        "eval_every = 1\neval_generate = false",
    );
    assert_ok(&train(&with), "with eval");
    assert_ok(&train(&without), "without eval");
    assert_ok(&train(&loss_only), "loss-only eval");
    for file in ["adapter_model.safetensors", "adapter_config.json"] {
        let a = std::fs::read(p.join("runs/with/adapter").join(file)).unwrap();
        let b = std::fs::read(p.join("runs/without/adapter").join(file)).unwrap();
        let c = std::fs::read(p.join("runs/loss_only/adapter").join(file)).unwrap();
        assert!(a == b && a == c, "{file} differs with evaluation");
    }
    let evals = |name: &str| -> Vec<serde_json::Value> {
        metrics(&p.join("runs").join(name))
            .into_iter()
            .filter(|m| m.get("eval_loss").is_some())
            .collect()
    };
    let (full, loss_only) = (evals("with"), evals("loss_only"));
    assert_eq!(full.len(), 4);
    assert_eq!(loss_only.len(), 4);
    for (a, b) in full.iter().zip(&loss_only) {
        assert!(a.get("eval_accuracy").is_some(), "{a}");
        assert!(b.get("eval_accuracy").is_none(), "{b}");
        assert_eq!(a["eval_loss"], b["eval_loss"]);
    }
    let losses = |name: &str| -> Vec<f64> {
        metrics(&p.join("runs").join(name))
            .iter()
            .filter_map(|m| m.get("train_loss").and_then(|l| l.as_f64()))
            .collect()
    };
    assert_eq!(losses("with"), losses("without"));
}

#[test]
fn bad_eval_inputs_are_refused_with_the_reason() {
    let dir = workspace();
    let p = dir.path();
    let eval = |config: &Path, adapter: Option<&Path>| {
        let mut args = vec!["eval".as_ref(), "--config".as_ref(), config.as_os_str()];
        if let Some(a) = adapter {
            args.extend(["--adapter".as_ref(), a.as_os_str()]);
        }
        burn_peft(args)
    };

    let no_set = run_file(p, "no-set", method_line("lora"), 2, None, "");
    assert_refused(
        &eval(&no_set, None),
        "no eval set",
        &["no-set.toml", "no eval set"],
    );

    let untrained = run_file(
        p,
        "untrained",
        method_line("lora"),
        2,
        Some("train.jsonl"),
        "",
    );
    assert_refused(
        &eval(&untrained, None),
        "no output",
        &["untrained.toml", "runs/untrained/adapter", "--adapter"],
    );
    let missing = p.join("nowhere");
    assert_refused(
        &eval(&untrained, Some(&missing)),
        "missing adapter",
        &["adapter not found", "nowhere"],
    );

    // An adapter for another model shape: one LoRA matrix with a column too many.
    assert_ok(&train(&untrained), "train");
    let adapter = p.join("runs/untrained/adapter");
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
        .find(|k| k.contains("layers.0.self_attn.q_proj.lora_A"))
        .unwrap()
        .clone();
    let shape = tensors[&key].shape().to_vec();
    let wider = burn::tensor::TensorData::new(
        vec![0.5f32; shape[0] * (shape[1] + 1)],
        [shape[0], shape[1] + 1],
    );
    tensors.insert(key, wider);
    peft_core::hf::write_tensors(&bad.join("adapter_model.safetensors"), &tensors).unwrap();
    assert_refused(
        &eval(&untrained, Some(&bad)),
        "mismatched adapter",
        &["bad-adapter", "q_proj"],
    );

    // An adapter folder without its weights.
    std::fs::remove_file(bad.join("adapter_model.safetensors")).unwrap();
    assert_refused(
        &eval(&untrained, Some(&bad)),
        "adapter without weights",
        &["bad-adapter", "adapter_model.safetensors"],
    );
}
