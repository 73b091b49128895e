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
use std::time::Instant;

use anyhow::{Context, bail};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use clap::Parser;
use peft_core::step::Stepper;
use peft_core::{Adapter, ModuleSelector, PeftLinear};
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
use peft_models::bert::{Bert, BertConfig};
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

const BATCH: usize = 16;
const SEQ: usize = 128;
const TRAINABLE: usize = 663_552;

fn targets() -> ModuleSelector {
    ModuleSelector::names(["query", "key", "value", "dense"])
}

fn adamw() -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init()
}

/// `VmHWM` / `VmRSS` of this process in MiB (Linux), or NaN.
fn memory_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn step<A: Adapter>(
    model: Bert<PeftLinear<A>>,
    stepper: &mut Stepper<Bert<PeftLinear<A>>>,
    optim: &mut ModuleOptimizer,
    ids: &Tensor<2, Int>,
    mask: &Tensor<2, Int>,
) -> anyhow::Result<(Bert<PeftLinear<A>>, f64)> {
    let start = Instant::now();
    let loss = model.forward(ids.clone(), mask.clone()).square().mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = stepper.optimize(model, optim, 1e-4, grads)?;
    // Wait for the step's work (backends may be lazy): read one updated value.
    let _ = model
        .embeddings
        .word_embeddings
        .weight
        .val()
        .slice([0..1, 0..1])
        .into_scalar::<f32>();
    Ok((model, start.elapsed().as_secs_f64() * 1e3))
}

/// The burn AdamW state of the trainable entries: two moments per entry.
fn lora_state_floats(trainable: usize) -> usize {
    2 * trainable
}

fn run_variant(args: &Args, variant: &str) -> anyhow::Result<serde_json::Value> {
    let dir = match &args.model {
        Some(d) => d.clone(),
        None => peft_models::minilm_dir()?,
    };
    let device = Device::default().autodiff();
    let mut config = BertConfig::from_dir(&dir)?;
    config.hidden_dropout_prob = 0.0;
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| 1000 + ((i as i64 * 7919 + 13) % (config.vocab_size as i64 - 1000)))
        .collect();
    let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), &device).reshape([BATCH, SEQ]);
    let mask = Tensor::<2, Int>::ones([BATCH, SEQ], &device);
    let loaded_mib = memory_mib("VmRSS:");
    let result = match variant {
        "lora" => {
            let model = LoraModel::new(
                Bert::<PeftLinear<LoraAdapter>>::from_dir_with(&dir, &config, &device)?,
                LoraConfig::new(16, 32.0, targets()),
            )?;
            let trainable = model.trainable_parameters().0;
            let mut model = model.into_model();
            let mut stepper = Stepper::new();
            let mut optim = adamw();
            (model, _) = step(model, &mut stepper, &mut optim, &ids, &mask)?; // warm-up
            let mut per_round = Vec::new();
            for _ in 0..args.rounds {
                let mut times = Vec::new();
                for _ in 0..args.steps {
                    let t;
                    (model, t) = step(model, &mut stepper, &mut optim, &ids, &mask)?;
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
            let bert = Bert::<PeftLinear<SftAdapter>>::from_dir_with(&dir, &config, &device)?;
            let sft = SftConfig::new(0.01, targets())
                .with_num_tunable_weights(TRAINABLE)
                .with_selection(algorithm)
                .allocate(&bert)?;
            let model = SftModel::new(bert, sft.clone())?;
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
                    (net, t) = step(net, &mut stepper, &mut optim, &ids, &mask)?;
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
