//! # bench_smollm2_train: tokens/s of a LoRA training step on SmolLM2-135M-Instruct, against
//! PyTorch + PEFT
//!
//! ```sh
//! python3 scripts/fetch_smollm2.py                     # once: the model
//! bash benchmarks/smollm2_train.sh                     # both sides in one run, ratios printed
//! # or the Rust side alone:
//! cargo run --release --example bench_smollm2_train --features x86-v4 -- \
//!     [--shapes 4x128,1x512] [--rounds 3] [--warmup 2] [--steps 5] [--threads 2]
//! ```
//!
//! Every round runs `burn-peft train` as a library call ([`peft_cli::train::train`], the code
//! users run: the GGUF file dequantized to f32, `PeftModel` with LoRA in activation space,
//! peft-core's stepper, burn's AdamW) on a run file written here: LoRA r 16, lora_alpha 32,
//! dropout 0 on `q/k/v/o/gate/up/down_proj`; `{"text"}` examples (every token counts in the
//! causal-LM loss) that are all longer than the sequence length, so every micro-batch is
//! exactly `batch x seq` tokens without padding; constant lr 1e-4, weight decay 0.01; one metrics
//! line per step. The step's tokens/s is the one `burn-peft train` logs (`metrics.jsonl`,
//! `tokens_per_s`: the micro-batch's tokens over the time from batching to the end of the
//! optimizer step). The first `--warmup` steps of a round are left out; a round reports the
//! median of the rest, and the run the median over rounds. `benchmarks/smollm2_train.py` does
//! the same steps with transformers + PEFT.

use std::path::PathBuf;

use anyhow::Context;
use burn_peft_examples::bench::median;
use clap::Parser;

/// The text every example is cut from (the same in `benchmarks/smollm2_train.py`): example `i`
/// is `"{i} "` followed by it 64 times (over 2,000 tokens).
const TEXT: &str = "The history of the printing press begins with movable type in East Asia and \
                    continues through Gutenberg's workshop in Mainz, where metal type, oil-based \
                    ink and a screw press came together. ";

#[derive(Parser, Debug)]
#[command(about = "SmolLM2 LoRA training-step benchmark (burn-peft side)")]
struct Args {
    /// The GGUF file (default: SmolLM2-135M-Instruct in the cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch x sequence length of the micro-batches, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4x128,1x512")]
    shapes: Vec<String>,
    /// Rounds per shape (one `train` call each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Steps at the start of each round that are not timed.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Threads of the rayon pool every kernel runs on.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `"4x128"` as `(4, 128)`.
fn parse_shape(s: &str) -> anyhow::Result<(usize, usize)> {
    let (b, t) = s
        .split_once('x')
        .with_context(|| format!("shape `{s}`: expected BATCHxSEQ, e.g. 4x128"))?;
    let (b, t) = (b.trim().parse()?, t.trim().parse()?);
    anyhow::ensure!(b > 0 && t > 1, "shape `{s}`: batch > 0 and seq > 1");
    Ok((b, t))
}

/// One `burn-peft train` run of `warmup + steps` steps at `batch x seq`; the tokens/s of each
/// step after the warm-up, as `metrics.jsonl` has them.
fn round(
    model: &std::path::Path,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = (0..batch)
        .map(|i| serde_json::json!({ "text": format!("{i} {}", TEXT.repeat(64)) }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n")?;
    let run = dir.path().join("run.toml");
    std::fs::write(
        &run,
        format!(
            r#"[model]
path = {model:?}

[data]
train = "train.jsonl"
chat_template = false
max_seq_len = {seq}

[method]
name = "lora"
r = 16
lora_alpha = 32
lora_dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

[train]
steps = {total}
batch_size = {batch}
lr = 1e-4
weight_decay = 0.01
out_dir = "out"
log_every = 1
"#,
            model = model.display().to_string(),
            total = warmup + steps,
        ),
    )?;
    let outcome = peft_cli::train::train(&run, false, None, false)?;
    anyhow::ensure!(
        outcome.steps_done == warmup + steps,
        "the run did {} steps",
        outcome.steps_done
    );
    let metrics = std::fs::read_to_string(dir.path().join("out").join("metrics.jsonl"))?;
    let mut rates = Vec::new();
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if let (Some(step), Some(rate)) = (v["step"].as_u64(), v["tokens_per_s"].as_f64())
            && step as usize > warmup
        {
            rates.push(rate);
        }
    }
    anyhow::ensure!(
        rates.len() == steps,
        "metrics.jsonl has {} timed steps, expected {steps}",
        rates.len()
    );
    Ok(rates)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rounds > 0 && args.steps > 0 && args.threads > 0,
        "--rounds, --steps and --threads must be positive"
    );
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .context("setting up the thread pool")?;
    let model = match args.model {
        Some(m) => m,
        None => peft_models::smollm2_path()?,
    };
    let shapes = args
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut result = serde_json::Map::new();
    for &(batch, seq) in &shapes {
        let mut per_round = Vec::new();
        for r in 0..args.rounds {
            let rates = round(&model, batch, seq, args.warmup, args.steps)?;
            let m = median(rates.clone());
            println!(
                "{batch}x{seq} round {}: {m:.0} tokens/s (steps: {})",
                r + 1,
                rates
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            per_round.push(m);
        }
        let m = median(per_round.clone());
        println!(
            "{batch}x{seq}: {m:.0} tokens/s, {:.0} ms per step ({} threads)",
            (batch * seq) as f64 / m * 1e3,
            args.threads
        );
        result.insert(
            format!("{batch}x{seq}"),
            serde_json::json!({ "tokens_per_s": m, "rounds": per_round }),
        );
    }
    let result = serde_json::Value::Object(result);
    println!("{result}");
    if let Some(path) = args.json {
        std::fs::write(&path, result.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
