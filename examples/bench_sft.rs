//! # bench_sft: the SFT training step (with and without a reselection) against the LoRA step
//! at equal trainable count, and the optimizer state of both
//!
//! ```sh
//! python3 scripts/fetch_minilm.py          # once: the model
//! cargo run --release --example bench_sft --features x86-v4 -- [--rounds 3] [--steps 5]
//! ```
//!
//! Workload: all-MiniLM-L6-v2, batch 16 x 128 tokens (random ids, no padding), loss
//! `mean(last_hidden_state²)`, dropout off, adapters in activation space on every linear layer
//! (`query`, `key`, `value`, `dense`):
//! - LoRA r = 16, alpha 32 (663,552 trainable entries), burn's AdamW;
//! - SFT (RigL, SftAdamW) and SFT (SM3, SftSM3) with `num_deltas` = int(N·numel/Σ numel),
//!   N = 663,552, reselection every R = 20 steps after S = 5 steps of statistics.
//!
//! Step kinds timed for SFT: a plain step (no statistics), a window step with candidate
//! sampling (RigL, by SDDMM), the window's first step (RigL, dense gradient probe), and the
//! step that ends with a reselection. Each variant runs in its own process (this binary with
//! `--variant`), so the peak resident memory (`VmHWM`) is the variant's own.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use burn_peft_examples::bench::{Workload, adamw, median, memory_mib, targets, timed_step};
use clap::Parser;
use peft_core::PeftLinear;
use peft_core::step::Stepper;
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
use peft_models::bert::Bert;
use peft_sft::{SelectionAlgorithm, SftAdapter, SftConfig, SftModel, SftSelector};

#[derive(Parser, Debug)]
#[command(about = "SFT vs LoRA training step on all-MiniLM-L6-v2 at equal trainable count")]
struct Args {
    /// Model folder (default: all-MiniLM-L6-v2 in the cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rounds (the reported figure is the median over rounds of per-round medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Timed steps per round (plain steps).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one variant (`lora`, `sft-rigl` or `sft-sm3`) and print its JSON.
    #[arg(long)]
    variant: Option<String>,
}

const TRAINABLE: usize = 663_552;

/// The burn AdamW state of the trainable entries: two moments per entry.
fn lora_state_floats(trainable: usize) -> usize {
    2 * trainable
}

fn run_variant(args: &Args, variant: &str) -> anyhow::Result<serde_json::Value> {
    let w = Workload::load(args.model.clone())?;
    let Workload {
        dir,
        config,
        device,
        ..
    } = &w;
    let loaded_mib;
    let result = match variant {
        "lora" => {
            let model = LoraModel::new(
                Bert::<PeftLinear<LoraAdapter>>::from_dir_with(dir, config, device)?,
                LoraConfig::new(16, 32.0, targets()),
            )?;
            loaded_mib = memory_mib("VmRSS:");
            let trainable = model.trainable_parameters().0;
            let mut model = model.into_model();
            let mut stepper = Stepper::new();
            let mut optim = adamw();
            (model, _) = timed_step(model, &mut stepper, &mut optim, &w)?; // warm-up
            let mut per_round = Vec::new();
            for _ in 0..args.rounds {
                let mut times = Vec::new();
                for _ in 0..args.steps {
                    let t;
                    (model, t) = timed_step(model, &mut stepper, &mut optim, &w)?;
                    times.push(t);
                }
                per_round.push(median(times));
            }
            serde_json::json!({
                "trainable": trainable,
                "step_ms": median(per_round),
                "optimizer_state_floats": lora_state_floats(trainable),
            })
        }
        "sft-rigl" | "sft-sm3" => {
            let algorithm = if variant == "sft-rigl" {
                SelectionAlgorithm::Rigl
            } else {
                SelectionAlgorithm::Sm3
            };
            let bert = Bert::<PeftLinear<SftAdapter>>::from_dir_with(dir, config, device)?;
            let sft = SftConfig::new(0.01, targets())
                .with_num_tunable_weights(TRAINABLE)
                .with_selection(algorithm)
                .allocate(&bert)?;
            let model = SftModel::new(bert, sft.clone())?;
            loaded_mib = memory_mib("VmRSS:");
            let trainable = model.trainable_parameters().0;
            // R = 20, S = 5: u = 1 probes, 2..5 sample candidates, 5 reselects, 6..20 plain.
            let total = 20 * (args.rounds + 2);
            let selector = SftSelector::new(&sft, "default", total)?;
            let mut net = selector.prepare(model.into_model())?;
            let selector = Arc::new(Mutex::new(selector));
            let mut stepper = Stepper::new().with(selector.clone());
            let mut optim = adamw();
            let (mut plain, mut probe, mut sample, mut reselect) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for round in 0..args.rounds + 1 {
                let mut times = Vec::new();
                for r in 0..20 {
                    let t;
                    (net, t) = timed_step(net, &mut stepper, &mut optim, &w)?;
                    if round == 0 {
                        continue; // warm-up window
                    }
                    match r + 1 {
                        1 if algorithm == SelectionAlgorithm::Rigl => probe.push(t),
                        2..=4 if algorithm == SelectionAlgorithm::Rigl => sample.push(t),
                        5 => reselect.push(t),
                        x if x > 5 && x <= 5 + args.steps => times.push(t),
                        _ => {}
                    }
                }
                if round > 0 {
                    plain.push(median(times));
                }
            }
            let state = selector.lock().expect("selector").state_len();
            let med = |v: Vec<f64>| if v.is_empty() { f64::NAN } else { median(v) };
            serde_json::json!({
                "trainable": trainable,
                "step_ms": median(plain),
                "window_first_step_ms": med(probe),
                "window_sampling_step_ms": med(sample),
                "reselection_step_ms": med(reselect),
                "optimizer_state_floats": state,
            })
        }
        other => bail!("unknown variant {other:?} (lora, sft-rigl, sft-sm3)"),
    };
    let mut result = result;
    result["variant"] = serde_json::json!(variant);
    result["rss_after_load_mib"] = serde_json::json!(loaded_mib);
    result["peak_rss_mib"] = serde_json::json!(memory_mib("VmHWM:"));
    Ok(result)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rounds > 0 && args.steps > 0 && args.steps <= 15,
        "--rounds must be positive and --steps in [1, 15]"
    );
    if let Some(variant) = &args.variant {
        println!("{}", run_variant(&args, variant)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut results = Vec::new();
    for variant in ["lora", "sft-rigl", "sft-sm3"] {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--variant",
            variant,
            "--rounds",
            &args.rounds.to_string(),
            "--steps",
            &args.steps.to_string(),
        ]);
        if let Some(m) = &args.model {
            cmd.arg("--model").arg(m);
        }
        println!("running {variant} ...");
        let out = cmd
            .output()
            .with_context(|| format!("running the {variant} variant"))?;
        if !out.status.success() {
            bail!(
                "the {variant} variant failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(last).with_context(|| format!("parsing {last:?}"))?;
        results.push(value);
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let lora = &results[0];
    println!(
        "\n{:34} {:>12} {:>12} {:>12}",
        "", "LoRA r=16", "SFT rigl", "SFT sm3"
    );
    for (name, key) in [
        ("trainable entries", "trainable"),
        ("plain step (ms)", "step_ms"),
        ("RigL window, first step (ms)", "window_first_step_ms"),
        ("RigL window, sampling step (ms)", "window_sampling_step_ms"),
        ("step with reselection (ms)", "reselection_step_ms"),
        ("optimizer state (floats)", "optimizer_state_floats"),
        ("peak RSS (MiB)", "peak_rss_mib"),
    ] {
        print!("{name:34}");
        for r in &results {
            print!(" {:12.0}", f(r, key));
        }
        println!();
    }
    for r in &results[1..] {
        println!(
            "{}: plain step / LoRA step = {:.2}, reselection step / LoRA step = {:.2}",
            r["variant"],
            f(r, "step_ms") / f(lora, "step_ms"),
            f(r, "reselection_step_ms") / f(lora, "step_ms")
        );
    }
    let summary = serde_json::json!({ "results": results });
    if let Some(path) = &args.json {
        std::fs::write(path, summary.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
