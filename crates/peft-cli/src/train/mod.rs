//! `burn-peft train`: fine-tune a causal LM (GGUF file or Hugging Face folder) with any method
//! from one TOML run file.
//!
//! [`config`] reads the run file, [`data`] the JSONL examples, [`method`] turns `[method]` into
//! a model (the only per-method code) and [`mod@run`] trains it, the same loop for every method,
//! with checkpoints and exact resume; [`evaluate`] scores the model on the eval set (loss and
//! exact match), for training and for `burn-peft eval`. [`train`] is the whole command as a
//! library call.

pub mod config;
pub mod data;
pub mod evaluate;
pub mod method;
pub mod run;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use burn::tensor::Device;
use peft_models::LinearLayer;
use peft_models::llama::Llama;
use peft_models::tokenizer::ModelTokenizer;

use crate::model::{self, ModelSource};
use config::RunConfig;
use data::Encoder;
use evaluate::Evaluation;
use run::{Job, Outcome, Run, RunModel};

/// Options of `burn-peft train`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The run file (TOML: `[model]`, `[data]`, `[method]`, `[train]`).
    #[arg(long)]
    pub config: PathBuf,
    /// Continue from the newest complete checkpoint in `out_dir`.
    #[arg(long)]
    pub resume: bool,
    /// End the run after this optimizer step, as if interrupted there (a checkpoint is written).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Data-parallel devices, comma-separated (`flex,flex`, `cuda:0,cuda:1`): replaces
    /// `[train] devices` of the run file.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
}

/// Run `burn-peft train`.
///
/// # Errors
/// As [`train`].
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let outcome = train_on(
        &args.config,
        args.resume,
        args.stop_after,
        true,
        args.devices.as_deref(),
    )?;
    match &outcome.output {
        None if outcome.ended_by_method => eprintln!(
            "the method ended the run after step {} (terminate_after_mask_generation: the \
             masks are saved; train again with mask_load_path)",
            outcome.steps_done
        ),
        Some(output) => eprintln!(
            "trained {} steps; saved {}",
            outcome.steps_done,
            output.display()
        ),
        None => eprintln!(
            "stopped after step {} (continue with --resume)",
            outcome.steps_done
        ),
    }
    Ok(())
}

/// The run's model (a causal LM: a BERT encoder is refused, `what` saying what the command
/// does), its config and tokenizer.
///
/// # Errors
/// A missing or unreadable model or tokenizer, a BERT encoder.
pub fn causal_lm(
    config: &RunConfig,
    what: &str,
) -> anyhow::Result<(ModelSource, peft_models::llama::LlamaConfig, ModelTokenizer)> {
    let source = model::detect(&config.model.path)?;
    if let ModelSource::HfBert(dir) = &source {
        bail!(
            "{}: a BERT encoder; {what} causal LMs (LLaMA family)",
            dir.display()
        );
    }
    let llama = model::llama_config(&source)?;
    let tokenizer = model::load_tokenizer(&source)?;
    Ok((source, llama, tokenizer))
}

/// The name of the run file's copy in `out_dir`.
pub const CONFIG_COPY: &str = "run.toml";

/// Train as the run file `config_file` says.
///
/// # Errors
/// A bad run file, model, tokenizer or data file (named), an `out_dir` holding another run's
/// checkpoints without `resume`, a non-finite loss, I/O errors.
pub fn train(
    config_file: &Path,
    resume: bool,
    stop_after: Option<usize>,
    progress: bool,
) -> anyhow::Result<Outcome> {
    train_on(config_file, resume, stop_after, progress, None)
}

/// As [`train`], on `devices` instead of the run file's `[train] devices` when given.
///
/// # Errors
/// As [`train`], and an unknown device.
pub fn train_on(
    config_file: &Path,
    resume: bool,
    stop_after: Option<usize>,
    progress: bool,
    devices: Option<&[String]>,
) -> anyhow::Result<Outcome> {
    let mut config = RunConfig::load(config_file)?;
    if let Some(devices) = devices {
        config.train.devices = devices.to_vec();
        config.validate(config_file)?;
    }
    if let Some(n) = stop_after {
        anyhow::ensure!(n > 0, "--stop-after must be at least 1");
    }
    let (source, llama, tokenizer) = causal_lm(&config, "`burn-peft train` trains")?;
    let encoder = Encoder::new(
        &tokenizer,
        config.data.chat_template,
        config.data.max_seq_len,
    )?;
    let train_set = encoder.read(&config.data.train, llama.vocab_size)?;
    let eval_set = match &config.data.eval {
        Some(file) => Some(encoder.read(file, llama.vocab_size)?),
        None => None,
    };
    for (name, set) in [("train", Some(&train_set)), ("eval", eval_set.as_ref())] {
        if let Some(set) = set {
            eprintln!(
                "{name}: {} examples, {} truncated to {} tokens, {} dropped (nothing to learn \
                 left)",
                set.examples.len(),
                set.truncated,
                config.data.max_seq_len,
                set.dropped
            );
        }
    }
    prepare_out_dir(&config, config_file, resume)?;

    let evaluation = eval_set.as_ref().map(|set| Evaluation {
        set,
        tokenizer: &tokenizer,
        chat: config.data.chat_template,
        batch_size: config.train.batch_size,
        generate: config.train.eval_generate,
    });
    let devices: Vec<Device> = if config.train.devices.is_empty() {
        vec![Device::default().autodiff()]
    } else {
        config
            .train
            .devices
            .iter()
            .map(|d| config::parse_device(d).map(Device::autodiff))
            .collect::<anyhow::Result<_>>()?
    };
    let device = devices[0].clone();
    // The adapters' random initial values follow the run's seed.
    device.seed(config.train.seed);
    let job = Trainer(Run {
        config: &config,
        train: &train_set,
        eval: evaluation.as_ref(),
        device: &device,
        devices: &devices,
        reduction: config::reduction(&config.train.devices),
        resume,
        stop_after,
        progress,
    });
    method::dispatch(
        &config.method,
        config_file,
        config.train.steps,
        (&source, config.model.base),
        &device,
        job,
    )
}

/// Check `out_dir` and write the run file's copy: checkpoints of a run there are refused unless
/// resuming, and a resumed run must have the same settings.
fn prepare_out_dir(config: &RunConfig, file: &Path, resume: bool) -> anyhow::Result<()> {
    let out = &config.train.out_dir;
    let copy = out.join(CONFIG_COPY);
    let text = toml::to_string(config).context("writing the run file's copy")?;
    let has_checkpoints = run::newest_checkpoint(out)?.is_some();
    if has_checkpoints && !resume {
        bail!(
            "{}: out_dir holds another run's checkpoints; continue it with --resume, or choose \
             another out_dir",
            out.display()
        );
    }
    if resume && copy.is_file() {
        let old = std::fs::read_to_string(&copy)?;
        if old != text {
            bail!(
                "{}: out_dir holds a run with other settings than {} ({} differs); refusing to \
                 resume it",
                out.display(),
                file.display(),
                copy.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let tmp = out.join(format!(".{CONFIG_COPY}.tmp"));
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, &copy)?;
    Ok(())
}

/// The job `burn-peft train` runs on the model its `[method]` builds.
struct Trainer<'a>(Run<'a>);

impl Job for Trainer<'_> {
    type Output = Outcome;

    fn run<L: LinearLayer + 'static, T: RunModel<Llama<L>>>(
        self,
        tuned: T,
    ) -> anyhow::Result<Outcome> {
        run::train_model(&self.0, tuned)
    }
}
