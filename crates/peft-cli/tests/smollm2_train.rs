//! The ready LoRA run of `examples/runs/lora.toml` on SmolLM2-135M-Instruct (fetched by
//! `scripts/fetch_smollm2.py`), as a user runs it: 20 steps of `burn-peft train` on the committed
//! JSON-extraction task, then `burn-peft generate --adapter` on held-out prompts. Before training
//! the model answers with pretty-printed JSON or prose; after, with the one-line JSON of the
//! task, names and cities it never saw in training copied correctly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn burn_peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(args)
        .output()
        .expect("the burn-peft binary runs")
}

fn assert_ok(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what}: {err}");
}

/// The first `n` held-out examples: (prompt, completion).
fn held_out(n: usize) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join("examples/runs/data/eval.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["prompt"].as_str().unwrap().to_owned(),
                v["completion"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// How many of `examples` `burn-peft generate --chat` answers exactly (greedy).
fn exact_matches(model: &Path, adapter: Option<&Path>, examples: &[(String, String)]) -> usize {
    let mut hits = 0;
    for (prompt, completion) in examples {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "--prompt",
            prompt,
            "--max-new-tokens",
            "32",
        ];
        if let Some(adapter) = adapter {
            args.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        let out = burn_peft(&args);
        assert_ok(&out, "generate");
        let text = String::from_utf8(out.stdout).unwrap();
        hits += usize::from(text.trim() == completion.trim());
    }
    hits
}

#[test]
fn twenty_lora_steps_on_smollm2_teach_the_task() {
    let model = peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let data = root().join("examples/runs/data").canonicalize().unwrap();
    let text = std::fs::read_to_string(root().join("examples/runs/lora.toml")).unwrap();
    let config = dir.path().join("lora.toml");
    // One evaluation, at the end (CI time).
    let text = text
        .replace("\"data/", &format!("\"{}/", data.display()))
        .replace("eval_every = 10", "eval_every = 0");
    std::fs::write(&config, text).unwrap();
    let out = burn_peft(&["train", "--config", config.to_str().unwrap()]);
    assert_ok(&out, "train");

    let run = dir.path().join("out/lora");
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<f64> = metrics
        .iter()
        .filter_map(|m| m["train_loss"].as_f64())
        .collect();
    assert_eq!(train.len(), 20);
    let last: f64 = train[15..].iter().sum::<f64>() / 5.0;
    assert!(last < train[0] / 4.0, "the loss fell too little: {train:?}");
    let evals: Vec<&serde_json::Value> = metrics
        .iter()
        .filter(|m| m.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 1, "one evaluation, at the end");
    let eval_loss = evals[0]["eval_loss"].as_f64().unwrap();
    assert!(
        eval_loss < train[0] / 4.0,
        "eval loss {eval_loss}, first train loss {}",
        train[0]
    );
    // Exact match of the greedy answers over the whole held-out set.
    let accuracy = evals[0]["eval_accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.75, "eval_accuracy {accuracy}");

    // A PEFT LoRA adapter with the run's settings.
    let adapter = run.join("adapter");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);

    // The learned behaviour: held-out names and cities in the task's one-line JSON.
    let examples = held_out(4);
    let before = exact_matches(&model, None, &examples[..2]);
    let after = exact_matches(&model, Some(&adapter), &examples);
    assert_eq!(
        before, 0,
        "the base model already answers in the task's format"
    );
    assert!(
        after >= 3,
        "{after} of 4 held-out answers exact after training"
    );
}
