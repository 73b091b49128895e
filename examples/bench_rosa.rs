//! # bench_rosa: the RoSA training step against the LoRA step at equal trainable count
//!
//! ```sh
//! python3 scripts/fetch_minilm.py          # once: the model
//! cargo run --release --example bench_rosa --features x86-v4 -- [--rounds 3] [--steps 5]
//! ```
//!
//! Workload: all-MiniLM-L6-v2, batch 16 x 128 tokens (random ids, no padding), loss
//! `mean(last_hidden_state²)`, AdamW (lr 1e-4), dropout off, adapters in activation space on
//! every linear layer (`query`, `key`, `value`, `dense`):
//! - LoRA r = 16, alpha 32: 663,552 trainable entries;
//! - RoSA r = 8, alpha 16, d = 1/32 (`--rosa-rank 8`, the default): LoRA r = 8 plus
//!   `int(d·rows·cols)` sparse entries per layer, the same count as LoRA r = 16 (the pooler's
//!   `dense` differs by rounding); `--rosa-rank 12` gives the paper's split (r = 12 plus a
//!   sparse part the size of LoRA r = 4, d = 1/64). The masks come from one collection step
//!   (schedule `default`), timed separately; then both parts train.
//!
//! Each variant runs in its own process (this binary with `--variant`), so the peak resident
//! memory (`VmHWM`) is the variant's own; the driver prints both and the ratios.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use burn_peft_examples::bench::{Workload, adamw, median, memory_mib, targets, timed_step};
use clap::Parser;
use peft_core::step::Stepper;
use peft_core::{Adapter, PeftLinear};
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
use peft_models::bert::Bert;
use peft_rosa::{RosaAdapter, RosaConfig, RosaModel, RosaScheduler};

#[derive(Parser, Debug)]
#[command(about = "RoSA vs LoRA training step on all-MiniLM-L6-v2 at equal trainable count")]
struct Args {
    /// Model folder (default: all-MiniLM-L6-v2 in the cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rounds (the reported figure is the median over rounds of per-round medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// RoSA's LoRA rank (0..16); the density is chosen so that RoSA has LoRA r=16's trainable
    /// count: `d = (16 - r) / 256` on MiniLM (every linear has `16·(in + out) / (in·out)`
    /// summing to 1/16 of the weights per layer).
    #[arg(long, default_value_t = 8)]
    rosa_rank: usize,
    /// Internal: run one variant (`lora` or `rosa`) and print its JSON.
    #[arg(long)]
    variant: Option<String>,
}

/// Timed rounds of one prepared model: per-round medians, then their median.
fn rounds<A: Adapter>(
    mut model: Bert<PeftLinear<A>>,
    mut stepper: Stepper<Bert<PeftLinear<A>>>,
    args: &Args,
    w: &Workload,
) -> anyhow::Result<f64> {
    let mut optim = adamw();
    (model, _) = timed_step(model, &mut stepper, &mut optim, w)?; // warm-up
    let mut per_round = Vec::new();
    for _ in 0..args.rounds {
        let mut times = Vec::new();
        for _ in 0..args.steps {
            let t;
            (model, t) = timed_step(model, &mut stepper, &mut optim, w)?;
            times.push(t);
        }
        per_round.push(median(times));
    }
    Ok(median(per_round))
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
    let (trainable, step_ms, extra) = match variant {
        "lora" => {
            let model = LoraModel::new(
                Bert::<PeftLinear<LoraAdapter>>::from_dir_with(dir, config, device)?,
                LoraConfig::new(16, 32.0, targets()),
            )?;
            loaded_mib = memory_mib("VmRSS:");
            let trainable = model.trainable_parameters().0;
            let ms = rounds(model.into_model(), Stepper::new(), args, &w)?;
            (trainable, ms, serde_json::Value::Null)
        }
        "rosa" => {
            anyhow::ensure!(args.rosa_rank < 16, "--rosa-rank must be below 16");
            let r = args.rosa_rank;
            let density = (16 - r) as f64 / 256.0;
            let rosa = RosaConfig::new(r, density, 2.0 * r.max(1) as f64, targets());
            let model = RosaModel::new(
                Bert::<PeftLinear<RosaAdapter>>::from_dir_with(dir, config, device)?,
                rosa.clone(),
            )?;
            loaded_mib = memory_mib("VmRSS:");
            let mut scheduler = RosaScheduler::new(&rosa, "default")?;
            let net = scheduler.prepare(model.model().clone())?;
            let mut stepper = Stepper::new().with(scheduler);
            let mut optim = adamw();
            // Step 0 collects the gradients (dense probes) and sets the masks.
            let (net, collect_ms) = timed_step(net, &mut stepper, &mut optim, &w)?;
            let model = model.with_model(net);
            let trainable = model.trainable_parameters().0;
            let ms = rounds(model.into_model(), stepper, args, &w)?;
            (trainable, ms, serde_json::json!(collect_ms))
        }
        other => bail!("unknown variant {other:?} (lora, rosa)"),
    };
    Ok(serde_json::json!({
        "variant": variant,
        "trainable": trainable,
        "step_ms": step_ms,
        "collection_step_ms": extra,
        "rss_after_load_mib": loaded_mib,
        "peak_rss_mib": memory_mib("VmHWM:"),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rounds > 0 && args.steps > 0,
        "--rounds and --steps must be positive"
    );
    if let Some(variant) = &args.variant {
        println!("{}", run_variant(&args, variant)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut results = Vec::new();
    for variant in ["lora", "rosa"] {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "--variant",
            variant,
            "--rounds",
            &args.rounds.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--rosa-rank",
            &args.rosa_rank.to_string(),
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
    let (lora, rosa) = (&results[0], &results[1]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n{:32} {:>12} {:>12} {:>7}",
        "",
        "LoRA r=16",
        format!("RoSA r={}", args.rosa_rank),
        "ratio"
    );
    println!(
        "{:32} {:>12} {:>12}",
        "trainable entries", lora["trainable"], rosa["trainable"]
    );
    for (name, key) in [
        ("training step (ms)", "step_ms"),
        ("peak RSS (MiB)", "peak_rss_mib"),
        ("RSS with the model loaded (MiB)", "rss_after_load_mib"),
    ] {
        let (a, b) = (f(lora, key), f(rosa, key));
        println!("{name:32} {a:12.0} {b:12.0} {:7.2}", b / a);
    }
    println!(
        "{:32} {:>12} {:12.0}",
        "RoSA mask-collection step (ms)",
        "-",
        f(rosa, "collection_step_ms")
    );
    let summary = serde_json::json!({
        "lora": lora,
        "rosa": rosa,
        "step_ratio": f(rosa, "step_ms") / f(lora, "step_ms"),
        "peak_ratio": f(rosa, "peak_rss_mib") / f(lora, "peak_rss_mib"),
    });
    if let Some(path) = &args.json {
        std::fs::write(path, summary.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
