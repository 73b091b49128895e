//! The training loop of `burn-peft train`, one generic function for every method
//! ([`train_model`]), with its checkpoints.
//!
//! The model trains inside peft-core's [`Controlled`] wrapper: each optimizer step runs the
//! method's stepper (controllers before and after the module optimizer: AdamW, or SM3 for
//! SFT with SM3 selection, see [`RunModel::module_optimizer`]), and the wrapper's record holds the
//! parameters *and* every controller's state, so a checkpoint is that record, the optimizer
//! record, the method's outputs at that step and `checkpoint.json` (step, data position,
//! metrics offset). A checkpoint is written into a temporary folder and renamed into place, so
//! a folder `step-N` is always complete.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::Device;
use peft_core::learner::{Controlled, controlled, set_controlled};
use peft_core::step::{Controller, Stepper, Tuned};
use peft_core::{DataParallel, Method, PeftError, PeftModel, Reduction, SaveOptions};
use peft_models::LinearLayer;
use peft_models::llama::Llama;
use peft_models::loss::IGNORE_INDEX;
use peft_selective::SelectiveModel;
use serde_json::json;

use crate::train::config::RunConfig;
use crate::train::data::{self, Dataset};
use crate::train::evaluate::{Evaluation, evaluate};

/// The folder of checkpoints inside `out_dir`.
pub const CHECKPOINTS: &str = "checkpoints";
/// The file that describes a checkpoint (written last, inside the temporary folder).
const CHECKPOINT_JSON: &str = "checkpoint.json";
/// The metrics file inside `out_dir`.
pub const METRICS: &str = "metrics.jsonl";

/// A model `burn-peft train` can train: a [`Tuned`] model that counts its trainable
/// parameters and writes its final outputs.
pub trait RunModel<M: Module>: Tuned<M> + Clone {
    /// Trainable and total parameters, as PEFT's `print_trainable_parameters` counts them.
    fn counts(&self) -> (usize, usize);
    /// Write the final outputs into `out_dir`; returns what was written.
    ///
    /// # Errors
    /// I/O or format errors.
    fn save_outputs(&self, out_dir: &Path) -> anyhow::Result<PathBuf>;
    /// Whether checkpoints hold a copy of the outputs too (not when they are the whole model:
    /// the checkpoint's record has it already).
    fn outputs_in_checkpoints(&self) -> bool {
        true
    }
    /// The optimizer of the trainable tensors that no controller steps itself (biases,
    /// `modules_to_save`, a full fine-tune's weights), with `[train] weight_decay` as its
    /// decoupled decay: AdamW, unless the method's reference trains them otherwise.
    fn module_optimizer(&self, weight_decay: f64) -> ModuleOptimizer {
        AdamWConfig::new()
            .with_weight_decay(weight_decay as f32)
            .init()
    }
}

impl<M: Module, C: Method> RunModel<M> for PeftModel<M, C> {
    fn counts(&self) -> (usize, usize) {
        self.trainable_parameters()
    }

    fn save_outputs(&self, out_dir: &Path) -> anyhow::Result<PathBuf> {
        let dir = out_dir.join("adapter");
        self.save_pretrained(&dir, &SaveOptions::default())
            .with_context(|| format!("saving the adapter to {}", dir.display()))?;
        Ok(dir)
    }

    /// SFT with SM3 selection steps them with dense SM3, as the reference's trainer does (one
    /// `SftSM3` over every trainable parameter); every other method with AdamW.
    fn module_optimizer(&self, weight_decay: f64) -> ModuleOptimizer {
        let sm3 = self.adapters().values().any(|entry| {
            (&entry.config as &dyn std::any::Any)
                .downcast_ref::<peft_sft::SftConfig>()
                .is_some_and(|c| c.selection_algorithm == peft_sft::SelectionAlgorithm::Sm3)
        });
        if sm3 {
            peft_sft::Sm3Config::new()
                .with_weight_decay(weight_decay)
                .init()
        } else {
            AdamWConfig::new()
                .with_weight_decay(weight_decay as f32)
                .init()
        }
    }
}

/// A selective method (ID3, PaFI, BitFit) on a plain model.
pub type Selective<M> = SelectiveModel<M>;

impl<M: Module> RunModel<M> for SelectiveModel<M> {
    fn counts(&self) -> (usize, usize) {
        let params = peft_core::hosts::parameters(self.model());
        let total = params.iter().map(|p| p.2).sum();
        // BitFit without a budget trains its whole candidate set: what its selection chooses.
        let trainable = self.config().budget.unwrap_or_else(|| {
            let sgd = burn::optim::SgdConfig::new().build();
            peft_selective::SelectiveOptimizer::new(self.model(), self.config().clone(), sgd)
                .map_or(0, |o| o.budget_used())
        });
        (trainable, total)
    }

    fn save_outputs(&self, out_dir: &Path) -> anyhow::Result<PathBuf> {
        let dir = out_dir.join("summary");
        self.summary()
            .and_then(|s| s.save(&dir))
            .with_context(|| format!("saving the summary to {}", dir.display()))?;
        Ok(dir)
    }
}

/// Full fine-tuning: every parameter trains, with no controller.
#[derive(Clone, Debug)]
pub struct Full<M>(pub M);

impl<M: Module> Tuned<M> for Full<M> {
    fn stepper(&mut self, _total_steps: usize) -> peft_core::Result<Stepper<M>> {
        Ok(Stepper::new())
    }

    fn tuned_model(&self) -> &M {
        &self.0
    }

    fn set_tuned_model(&mut self, model: M) {
        self.0 = model;
    }

    fn check_controllers(&self, _served: &[String]) -> peft_core::Result<()> {
        Ok(())
    }

    fn update_configs(&mut self, _controllers: &[Box<dyn Controller<M>>]) {}
}

impl<M: Module> RunModel<M> for Full<M> {
    fn counts(&self) -> (usize, usize) {
        let total = peft_core::hosts::parameters(&self.0)
            .iter()
            .map(|p| p.2)
            .sum();
        (total, total)
    }

    fn outputs_in_checkpoints(&self) -> bool {
        false
    }

    /// `model.safetensors` with Transformers' names and orientation (linear weights
    /// `[out, in]`), float32.
    fn save_outputs(&self, out_dir: &Path) -> anyhow::Result<PathBuf> {
        crate::export::write_weights(&self.0, out_dir)?;
        Ok(out_dir.join(crate::export::WEIGHTS))
    }
}

/// Something to do with the model a `[method]` builds, whatever its type.
pub trait Job {
    /// What the job returns.
    type Output;
    /// Run the job on `tuned`.
    ///
    /// # Errors
    /// Whatever the job finds wrong.
    fn run<L: LinearLayer + 'static, T: RunModel<Llama<L>>>(
        self,
        tuned: T,
    ) -> anyhow::Result<Self::Output>;
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Optimizer steps done in all (including those before a resume).
    pub steps_done: usize,
    /// Where the run continued from (`None`: from the start).
    pub resumed_from: Option<usize>,
    /// The final outputs (`None` when stopped by `--stop-after`).
    pub output: Option<PathBuf>,
    /// Trainable and total parameters.
    pub counts: (usize, usize),
    /// The method ended the run before its last step (RoSA's
    /// `terminate_after_mask_generation`); no final outputs are written.
    pub ended_by_method: bool,
}

/// Everything a run needs besides the model.
pub struct Run<'a> {
    /// The run file's settings.
    pub config: &'a RunConfig,
    /// Training examples.
    pub train: &'a Dataset,
    /// Evaluation examples and how to score them.
    pub eval: Option<&'a Evaluation<'a>>,
    /// The training device (with autodiff): the first of `devices`.
    pub device: &'a Device,
    /// The data-parallel devices (with autodiff), one replica each; one device: no replicas.
    pub devices: &'a [Device],
    /// How the replicas reduce their gradients.
    pub reduction: Reduction,
    /// Continue from the newest complete checkpoint.
    pub resume: bool,
    /// End after this step, with a checkpoint.
    pub stop_after: Option<usize>,
    /// Draw a progress bar (on a terminal only).
    pub progress: bool,
}

/// `checkpoint.json`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointInfo {
    /// Optimizer steps done.
    step: usize,
    /// Micro-batches consumed (the data order position).
    micro_batches: usize,
    /// Bytes of `metrics.jsonl` written up to this step.
    metrics_bytes: u64,
}

/// The newest complete checkpoint folder in `out_dir`, with its step.
///
/// # Errors
/// An unreadable checkpoints folder.
pub fn newest_checkpoint(out_dir: &Path) -> anyhow::Result<Option<(usize, PathBuf)>> {
    Ok(checkpoint_folders(out_dir)?
        .into_iter()
        .rfind(|(_, path)| path.join(CHECKPOINT_JSON).is_file()))
}

/// The `step-N` folders of `out_dir`'s checkpoints (complete or not), by step.
fn checkpoint_folders(out_dir: &Path) -> anyhow::Result<Vec<(usize, PathBuf)>> {
    let dir = out_dir.join(CHECKPOINTS);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(step) = step {
            steps.push((step, path));
        }
    }
    steps.sort();
    Ok(steps)
}

/// Append one JSON line to the metrics file.
fn log(metrics: &mut std::fs::File, value: serde_json::Value) -> anyhow::Result<()> {
    writeln!(metrics, "{value}").context("writing metrics.jsonl")?;
    Ok(())
}

/// Train `tuned` as `run` says, the same code for every method: checkpoints, resume, the
/// loss, metrics and final outputs.
///
/// # Errors
/// A non-finite loss (naming the step), a checkpoint that does not load, I/O errors, the
/// method's errors.
pub fn train_model<L: LinearLayer + 'static, T: RunModel<Llama<L>>>(
    run: &Run<'_>,
    mut tuned: T,
) -> anyhow::Result<Outcome> {
    let cfg = &run.config.train;
    let out = &cfg.out_dir;
    let total = cfg.steps;
    let counts = tuned.counts();
    let (trainable, all) = counts;
    eprintln!(
        "trainable params: {trainable} || all params: {all} || trainable%: {:.4}",
        100.0 * trainable as f64 / all.max(1) as f64
    );

    let mut ctl: Controlled<Llama<L>> = controlled(&mut tuned, total)?;
    let mut optim = tuned.module_optimizer(cfg.weight_decay);
    let metrics_file = out.join(METRICS);
    let mut start = 0;
    let mut resumed_from = None;
    let mut metrics_bytes = 0;
    if run.resume
        && let Some((step, dir)) = newest_checkpoint(out)?
    {
        let info: CheckpointInfo =
            serde_json::from_value(peft_core::hf::read_json(&dir.join(CHECKPOINT_JSON))?.into())
                .with_context(|| format!("reading the checkpoint in {}", dir.display()))?;
        let record = ModuleRecord::load(dir.join("model.bpk"))
            .map_err(|e| anyhow::anyhow!("{}: model.bpk: {e:?}", dir.display()))?;
        ctl = ctl
            .try_load_record(record)
            .map_err(|e| anyhow::anyhow!("{}: loading the checkpoint: {e:?}", dir.display()))?;
        let record = burn::optim::OptimizerRecord::load(dir.join("optimizer.bpk"))
            .map_err(|e| anyhow::anyhow!("{}: optimizer.bpk: {e:?}", dir.display()))?;
        optim = optim.load_record(record);
        ensure!(
            info.step == step && ctl.step_index() == step,
            "{}: the checkpoint is inconsistent (step {} in checkpoint.json, {} in the state)",
            dir.display(),
            info.step,
            ctl.step_index()
        );
        start = step;
        metrics_bytes = info.metrics_bytes;
        resumed_from = Some(step);
        eprintln!("resuming from {}", dir.display());
    } else if run.resume {
        eprintln!("no checkpoint in {}: starting from step 0", out.display());
    }
    let mut replicas = if run.devices.len() > 1 {
        Some(replicate(
            run,
            &tuned,
            &ctl,
            &optim,
            resumed_from.is_some(),
        )?)
    } else {
        None
    };
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_file)
        .with_context(|| format!("opening {}", metrics_file.display()))?;
    // Lines after the checkpoint belong to the steps about to be redone.
    metrics
        .set_len(metrics_bytes)
        .with_context(|| format!("truncating {}", metrics_file.display()))?;

    let bar = if run.progress && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed}<{eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);

    let end = run.stop_after.map_or(total, |s| s.min(total));
    let n = run.train.examples.len();
    for step in start..end {
        let lr = run.config.lr_at(step);
        let began = Instant::now();
        let mut accumulator = GradientsAccumulator::<Llama<L>>::new();
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        if let Some(dp) = &mut replicas {
            for k in 0..cfg.grad_accum {
                let index = step * cfg.grad_accum + k;
                let (value, t) = replicated_micro_batch(run, dp, index)
                    .with_context(|| format!("step {}", step + 1))?;
                loss_sum += finite_loss(value, step)?;
                tokens += t;
            }
            dp.step(lr).with_context(|| format!("step {}", step + 1))?;
            // The first replica is the run's model (all are equal): evaluation, checks and
            // checkpoints read it through `ctl`.
            ctl.model = dp.tuned().tuned_model().clone();
        }
        for k in 0..cfg.grad_accum * usize::from(replicas.is_none()) {
            let index = step * cfg.grad_accum + k;
            let picked = data::micro_batch(n, cfg.batch_size, cfg.seed, index);
            let refs: Vec<_> = picked.iter().map(|&i| &run.train.examples[i]).collect();
            let b = data::batch(&refs, run.device);
            tokens += b.tokens;
            let scale = 1.0 / cfg.grad_accum as f64;
            let (value, grads) = if cfg.gradient_checkpointing {
                // Dropout masks of the recomputed layers: a seed per micro-batch, so a resumed
                // run draws the same ones.
                let seed = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64;
                let (value, grads) = ctl.model.causal_lm_loss_checkpointed(
                    b.ids,
                    Some(b.mask),
                    b.labels,
                    scale,
                    seed,
                )?;
                (finite_loss(value, step)?, grads)
            } else {
                let loss = ctl.model.causal_lm_loss(b.ids, Some(b.mask), b.labels)?;
                let value = finite_loss(loss.clone().into_scalar::<f64>(), step)?;
                let grads = GradientsParams::from_grads((loss * scale).backward(), &ctl.model);
                (value, grads)
            };
            loss_sum += value;
            ctl.with_stepper(|s| s.after_backward(&ctl.model, &grads))
                .with_context(|| format!("step {}", step + 1))?;
            accumulator.accumulate(&ctl.model, grads);
        }
        if replicas.is_none() {
            let grads = accumulator.grads();
            let model = ctl.model.clone();
            let stepped = ctl.with_stepper(|s| s.optimize(model, &mut optim, lr, grads));
            ctl.model = stepped.with_context(|| format!("step {}", step + 1))?;
        }

        let done = step + 1;
        let train_loss = loss_sum / cfg.grad_accum as f64;
        let step_s = began.elapsed().as_secs_f64();
        let tokens_per_s = tokens as f64 / step_s.max(1e-9);
        bar.set_position(done as u64);
        bar.set_message(format!(
            "loss {train_loss:.4} lr {lr:.2e} {tokens_per_s:.0} tok/s"
        ));
        if done % cfg.log_every == 0 || done == total {
            log(
                &mut metrics,
                json!({"step": done, "train_loss": train_loss, "lr": lr, "tokens_per_s": tokens_per_s, "step_s": step_s}),
            )?;
        }
        if let Some(eval) = run.eval
            && ((cfg.eval_every > 0 && done % cfg.eval_every == 0) || done == total)
        {
            let mut line = serde_json::Map::new();
            line.insert("step".into(), done.into());
            line.extend(evaluate(&ctl.model, eval, run.device)?.to_json());
            log(&mut metrics, line.into())?;
        }
        let stopping = run.stop_after == Some(done) && done < total;
        if (cfg.save_every > 0 && done % cfg.save_every == 0) || stopping {
            metrics.flush()?;
            let info = CheckpointInfo {
                step: done,
                micro_batches: done * cfg.grad_accum,
                metrics_bytes: metrics.metadata()?.len(),
            };
            ensure_finite(&ctl.model, done)?;
            match &replicas {
                Some(dp) => {
                    sync_controlled(&mut ctl, dp, out)?;
                    write_checkpoint(
                        out,
                        &ctl,
                        &dp.replicas()[0].optim,
                        &info,
                        &mut tuned,
                        cfg.save_total_limit,
                    )?;
                }
                None => {
                    write_checkpoint(out, &ctl, &optim, &info, &mut tuned, cfg.save_total_limit)?
                }
            }
        }
        // A method that ends the run itself (RoSA's `terminate_after_mask_generation`, once
        // its masks are saved): the reference's first run of its two-run recipe.
        let stop = match &replicas {
            Some(dp) => dp.should_stop(),
            None => ctl.with_stepper(|s| s.should_stop()),
        };
        if done < total && stop {
            bar.finish_and_clear();
            return Ok(Outcome {
                steps_done: done,
                resumed_from,
                output: None,
                counts,
                ended_by_method: true,
            });
        }
    }
    bar.finish_and_clear();
    let steps_done = end.max(start);
    if steps_done < total {
        return Ok(Outcome {
            steps_done,
            resumed_from,
            output: None,
            counts,
            ended_by_method: false,
        });
    }
    ensure_finite(&ctl.model, total)?;
    match replicas {
        Some(dp) => tuned = dp.into_tuned(),
        None => set_controlled(&mut tuned, ctl),
    }
    let output = save_final(out, &tuned)?;
    let end_counts = tuned.counts();
    if end_counts != counts {
        // RoSA's and SpA's sparse values exist only once their masks do.
        let (trainable, all) = end_counts;
        eprintln!(
            "trainable params: {trainable} || all params: {all} || trainable%: {:.4} (at the \
             end of the run)",
            100.0 * trainable as f64 / all.max(1) as f64
        );
    }
    Ok(Outcome {
        steps_done,
        resumed_from,
        output: Some(output),
        counts: end_counts,
        ended_by_method: false,
    })
}

/// The replicas of a data-parallel run: `tuned` with `ctl`'s parameters and configs on every
/// device of `run`, each stepper with `ctl`'s controller state and, when resuming, each
/// optimizer with `optim`'s state.
fn replicate<M: Module + 'static, T: RunModel<M>>(
    run: &Run<'_>,
    tuned: &T,
    ctl: &Controlled<M>,
    optim: &ModuleOptimizer,
    resumed: bool,
) -> anyhow::Result<DataParallel<M, T>> {
    let weight_decay = run.config.train.weight_decay;
    let mut start = tuned.clone();
    ctl.with_stepper(|s| start.update_configs(s.controllers()));
    start.set_tuned_model(ctl.model.clone());
    let make_optim = || start.module_optimizer(weight_decay);
    let mut dp = DataParallel::new(
        start.clone(),
        run.devices,
        run.config.train.steps,
        make_optim,
        run.reduction,
    )?;
    let scratch = run.config.train.out_dir.join(".tmp-replica-state");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    ctl.with_stepper(|s| s.save_state(&scratch))?;
    dp.resume(&scratch)?;
    std::fs::remove_dir_all(&scratch)?;
    if resumed {
        for r in dp.replicas_mut() {
            let fresh = std::mem::replace(&mut r.optim, make_optim());
            r.optim = fresh.load_record(optim.to_record());
        }
    }
    Ok(dp)
}

/// One micro-batch of a data-parallel run: its `batch_size` examples split into one contiguous
/// share per replica, each share's mean token loss weighted by its token count, so the
/// gradient is that of the micro-batch's mean over all its tokens (as on one device). Returns
/// that mean and the tokens.
fn replicated_micro_batch<L: LinearLayer + 'static, T: RunModel<Llama<L>>>(
    run: &Run<'_>,
    dp: &mut DataParallel<Llama<L>, T>,
    index: usize,
) -> anyhow::Result<(f64, usize)> {
    let cfg = &run.config.train;
    let picked = data::micro_batch(run.train.examples.len(), cfg.batch_size, cfg.seed, index);
    let n = dp.len();
    let share = |i: usize| &picked[i * picked.len() / n..(i + 1) * picked.len() / n];
    let mut tokens = 0;
    let accum = cfg.grad_accum as f64;
    let mean = dp.backward(|i, model| {
        let refs: Vec<_> = share(i).iter().map(|&j| &run.train.examples[j]).collect();
        let b = data::batch(&refs, &run.devices[i]);
        tokens += b.tokens;
        let [_, seq] = b.labels.dims();
        let counted = b
            .labels
            .clone()
            .narrow(1, 1, seq.saturating_sub(1))
            .into_data()
            .iter::<i64>()
            .filter(|&l| l != IGNORE_INDEX)
            .count();
        if counted == 0 {
            // Nothing to learn in this share: no gradient, no weight.
            return Ok((model.forward(b.ids, Some(b.mask)).sum() * 0.0, 0.0));
        }
        let loss = model
            .causal_lm_loss(b.ids, Some(b.mask), b.labels)
            .map_err(|e| PeftError::Unsupported(e.to_string()))?;
        Ok((loss / accum, counted as f64))
    })?;
    Ok((mean * accum, tokens))
}

/// Make `ctl` the first replica of `dp` (parameters and controller state), for a checkpoint.
fn sync_controlled<M: Module + 'static, T: RunModel<M>>(
    ctl: &mut Controlled<M>,
    dp: &DataParallel<M, T>,
    out: &Path,
) -> anyhow::Result<()> {
    let scratch = out.join(".tmp-replica-state");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }
    dp.save_state(&scratch)?;
    let device = dp.replicas()[0].device.clone();
    ctl.with_stepper(|s| s.load_state(&scratch, &device))?;
    std::fs::remove_dir_all(&scratch)?;
    ctl.model = dp.tuned().tuned_model().clone();
    Ok(())
}

/// Refuse to save a model with a non-finite trainable parameter (named, with the step); the
/// frozen ones are never written by training, and reading them would copy the whole base.
fn ensure_finite<M: Module>(model: &M, step: usize) -> anyhow::Result<()> {
    let trainable: std::collections::HashSet<String> = peft_core::hosts::parameters(model)
        .into_iter()
        .filter_map(|(path, trainable, _)| trainable.then_some(path))
        .collect();
    let params = peft_core::hosts::read_params(model, |path| trainable.contains(path));
    if let Some((path, _)) = params
        .iter()
        .find(|(_, data)| data.iter::<f32>().any(|v| !v.is_finite()))
    {
        bail!(
            "step {step}: parameter `{path}` is not finite; the run stopped and nothing from \
             this step was saved"
        );
    }
    Ok(())
}

/// `value`, the loss of a micro-batch of 0-based step `step`, or the error that stops the run
/// when it is not finite.
fn finite_loss(value: f64, step: usize) -> anyhow::Result<f64> {
    if !value.is_finite() {
        bail!(
            "step {}: the training loss is not finite ({value}); the run stopped and nothing \
             from this step was saved",
            step + 1
        );
    }
    Ok(value)
}

/// Write `checkpoints/step-N` through a temporary folder and a rename: `model.bpk` (the
/// parameters and every controller's state), `optimizer.bpk`, the method's outputs of this
/// step (`adapter/` or `summary/`, usable as the final ones are) and `checkpoint.json`, last.
/// A failed write removes its temporary folder (the earlier checkpoints stay); a successful
/// one then deletes the oldest checkpoints beyond `limit`.
fn write_checkpoint<M: Module, T: RunModel<M>>(
    out: &Path,
    ctl: &Controlled<M>,
    optim: &ModuleOptimizer,
    info: &CheckpointInfo,
    tuned: &mut T,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let root = out.join(CHECKPOINTS);
    let tmp = root.join(format!(".tmp-step-{}", info.step));
    if let Err(e) = write_checkpoint_in(&tmp, ctl, optim, info, tuned) {
        // Best effort: the error that stopped the write is the one to report.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dir = root.join(format!("step-{}", info.step));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if let Some(limit) = limit {
        prune_checkpoints(out, limit)?;
    }
    Ok(())
}

/// Delete the oldest complete checkpoints of `out_dir` until at most `keep` remain.
///
/// # Errors
/// An unreadable checkpoints folder or a failed delete.
pub fn prune_checkpoints(out_dir: &Path, keep: usize) -> anyhow::Result<()> {
    let steps = checkpoint_folders(out_dir)?;
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in &steps[..excess] {
        std::fs::remove_dir_all(path).with_context(|| format!("deleting {}", path.display()))?;
    }
    Ok(())
}

/// The files of a checkpoint, written into `tmp`.
fn write_checkpoint_in<M: Module, T: RunModel<M>>(
    tmp: &Path,
    ctl: &Controlled<M>,
    optim: &ModuleOptimizer,
    info: &CheckpointInfo,
    tuned: &mut T,
) -> anyhow::Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp)?;
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    ctl.clone()
        .into_record()
        .save(tmp.join("model.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: writing model.bpk: {e:?}", tmp.display()))?;
    if let Some(e) = ctl.error() {
        bail!("saving the controllers' state: {e}");
    }
    optim
        .to_record()
        .save(tmp.join("optimizer.bpk"))
        .map_err(|e| anyhow::anyhow!("{}: writing optimizer.bpk: {e:?}", tmp.display()))?;
    if tuned.outputs_in_checkpoints() {
        ctl.with_stepper(|s| tuned.update_configs(s.controllers()));
        tuned.set_tuned_model(ctl.model.clone());
        tuned.save_outputs(tmp)?;
    }
    let serde_json::Value::Object(map) = serde_json::to_value(info)? else {
        unreachable!("a struct is an object")
    };
    pause_for_crash_tests(&format!("step-{}", info.step));
    peft_core::hf::write_json(&tmp.join(CHECKPOINT_JSON), &map)?;
    Ok(())
}

/// Write the final outputs through a temporary folder in `out` and rename them into place, so
/// that a run killed while saving leaves the previous outputs (or none), never a mix.
fn save_final<M: Module, T: RunModel<M>>(out: &Path, tuned: &T) -> anyhow::Result<PathBuf> {
    let tmp = out.join(".tmp-final");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = tuned.save_outputs(&tmp)?;
    pause_for_crash_tests("final");
    let name = written
        .file_name()
        .context("the method's outputs have no file name")?;
    let target = out.join(name);
    if target.is_dir() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&written, &target)
        .with_context(|| format!("renaming {} to {}", written.display(), target.display()))?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(target)
}

/// The environment variable that makes a run stop dead at a named point of a write
/// (`step-N`: checkpoint N with its files written but not yet `checkpoint.json` nor renamed;
/// `final`: the final outputs written but not yet renamed), for the tests that kill it there
/// with SIGKILL. Not a user setting.
pub const PAUSE_ENV: &str = "BURN_PEFT_TEST_PAUSE_AT";

/// Announce on stderr and sleep until killed when [`PAUSE_ENV`] names `point`.
fn pause_for_crash_tests(point: &str) {
    if std::env::var(PAUSE_ENV).is_ok_and(|p| p == point) {
        eprintln!("paused at {point}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
