//! `burn-peft eval`: score a trained run on its eval set, as training does at its evaluations
//! ([`crate::train::evaluate`]): the loss with the training masks and the exact match of
//! greedy completions.
//!
//! The run file gives the model, the data settings (`[data] eval`, the chat template, the
//! truncation length) and the batch size; the adapter is `--adapter`, or what `burn-peft train`
//! wrote in `out_dir` for the run's method: `adapter/` (adapter methods), `summary/` (ID3, PaFI,
//! BitFit) or `model.safetensors` (`full`). One JSON object goes to stdout, a readable line to
//! stderr.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::tensor::Device;
use peft_models::LinearLayer;
use peft_models::llama::{Llama, LlamaConfig};
use serde_json::Value;

use crate::model::{self, LlamaJob};
use crate::train::config::RunConfig;
use crate::train::data::Encoder;
use crate::train::evaluate::{Evaluation, Scores, evaluate};

/// Options of `burn-peft eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// The run file (TOML), as given to `burn-peft train`.
    #[arg(long)]
    pub config: PathBuf,
    /// What to evaluate: an adapter or summary folder, or a `full` run's `model.safetensors`
    /// (default: the run's final output in `out_dir`).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Score this JSONL file instead of the run file's `[data] eval` (a held-out test split).
    #[arg(long)]
    pub eval_file: Option<PathBuf>,
    /// Also write each target's greedy completion to this JSONL file: `line` (in the eval
    /// file, 1-based), `generated`, `reference`, `matched`.
    #[arg(long)]
    pub predictions: Option<PathBuf>,
}

/// Run `burn-peft eval`.
///
/// # Errors
/// As [`eval`].
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let (adapter, examples, scores) = eval_on(
        &args.config,
        args.adapter.as_deref(),
        args.eval_file.as_deref(),
    )?;
    if let Some(file) = &args.predictions {
        write_predictions(file, &scores, &args.config, args.eval_file.as_deref())?;
    }
    let mut json = scores.to_json();
    json.insert("examples".into(), examples.into());
    json.insert("targets".into(), scores.targets.into());
    json.insert("matched".into(), scores.matched.into());
    json.insert("adapter".into(), adapter.display().to_string().into());
    println!("{}", Value::Object(json));
    let accuracy = match scores.accuracy() {
        Some(a) => format!(
            ", exact match {}/{} ({:.1} %)",
            scores.matched,
            scores.targets,
            100.0 * a
        ),
        None => ", no completions to match".into(),
    };
    eprintln!(
        "{}: eval loss {:.4} on {examples} examples{accuracy}",
        adapter.display(),
        scores.loss
    );
    Ok(())
}

/// Evaluate the run of `config_file` with `adapter` (default: the run's final output); returns
/// the adapter used, the number of eval examples and the scores.
///
/// # Errors
/// A bad run file or model, no `[data] eval`, a missing adapter or run output (named), an
/// adapter that does not fit the model (the loader names the module or tensor).
pub fn eval(
    config_file: &Path,
    adapter: Option<&Path>,
) -> anyhow::Result<(PathBuf, usize, Scores)> {
    eval_on(config_file, adapter, None)
}

/// [`eval`] on `eval_file` instead of the run file's `[data] eval` when given.
///
/// # Errors
/// As [`eval`]; with `eval_file`, an unreadable or malformed file.
pub fn eval_on(
    config_file: &Path,
    adapter: Option<&Path>,
    eval_file: Option<&Path>,
) -> anyhow::Result<(PathBuf, usize, Scores)> {
    let config = RunConfig::load(config_file)?;
    let Some(eval_file) = eval_file.or(config.data.eval.as_deref()) else {
        bail!(
            "{}: no eval set ([data] eval is not given, nor --eval-file), nothing to evaluate",
            config_file.display()
        );
    };
    let adapter = match adapter {
        Some(a) => {
            ensure!(
                a.exists(),
                "adapter not found: {} does not exist",
                a.display()
            );
            a.to_path_buf()
        }
        None => {
            let output = run_output(&config);
            ensure!(
                output.exists(),
                "{}: the run has no final output ({} does not exist): train it first, or give \
                 --adapter",
                config_file.display(),
                output.display()
            );
            output
        }
    };
    let (source, llama, tokenizer) =
        crate::train::causal_lm(&config, "`burn-peft eval` evaluates")?;
    let encoder = Encoder::new(
        &tokenizer,
        config.data.chat_template,
        config.data.max_seq_len,
    )?;
    let set = encoder.read(eval_file, llama.vocab_size)?;
    let evaluation = Evaluation {
        set: &set,
        tokenizer: &tokenizer,
        chat: config.data.chat_template,
        batch_size: config.train.batch_size,
        generate: true,
    };
    let device = Device::default();
    let job = Score {
        evaluation: &evaluation,
        device: &device,
    };
    let scores = model::with_llama(
        &source,
        Some(&adapter),
        false,
        config.model.base,
        &device,
        job,
    )
    .with_context(|| format!("evaluating {}", adapter.display()))?;
    Ok((adapter, set.examples.len(), scores))
}

/// Write `scores`' completions as JSONL (`line`, `generated`, `reference`, `matched`), the
/// references read back from the eval file; written through a temporary file and renamed, so
/// the file is whole or absent.
fn write_predictions(
    file: &Path,
    scores: &Scores,
    config_file: &Path,
    eval_file: Option<&Path>,
) -> anyhow::Result<()> {
    let config = RunConfig::load(config_file)?;
    let source = match eval_file {
        Some(f) => f.to_path_buf(),
        None => config.data.eval.clone().unwrap_or_default(),
    };
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for c in &scores.completions {
        let reference = lines
            .get(c.line.wrapping_sub(1))
            .and_then(|l| serde_json::from_str::<Value>(l).ok())
            .and_then(|v| reference_of(&v))
            .unwrap_or_default();
        let row = serde_json::json!({
            "line": c.line,
            "generated": c.generated,
            "reference": reference,
            "matched": c.matched,
        });
        out.push_str(&row.to_string());
        out.push('\n');
    }
    let tmp = file.with_extension("jsonl.tmp");
    std::fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// The reference completion of one data line: `completion`, or the last message's content.
fn reference_of(v: &Value) -> Option<String> {
    if let Some(c) = v.get("completion").and_then(Value::as_str) {
        return Some(c.to_owned());
    }
    v.get("messages")?
        .as_array()?
        .last()?
        .get("content")?
        .as_str()
        .map(str::to_owned)
}

/// What `burn-peft train` writes at the end of the run: `adapter/`, `summary/` or
/// `model.safetensors`, by the run's method.
pub fn run_output(config: &RunConfig) -> PathBuf {
    let out = &config.train.out_dir;
    match config.method_name() {
        "id3" | "pafi" | "bitfit" => out.join("summary"),
        "full" => out.join(crate::export::WEIGHTS),
        _ => out.join("adapter"),
    }
}

/// The job that scores the loaded model.
struct Score<'a> {
    evaluation: &'a Evaluation<'a>,
    device: &'a Device,
}

impl LlamaJob for Score<'_> {
    type Output = Scores;

    fn run<L: LinearLayer>(self, model: Llama<L>, _: &LlamaConfig) -> anyhow::Result<Scores> {
        evaluate(&model, self.evaluation, self.device)
    }
}
