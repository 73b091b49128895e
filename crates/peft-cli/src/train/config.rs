//! The run file of `burn-peft train`: a TOML file with `[model]`, `[data]`, `[method]` and
//! `[train]` tables.
//!
//! The fixed tables refuse keys they do not know; `[method]` holds `name` and the method's own
//! fields under their PEFT / reference names, checked when the method's config is built
//! ([`crate::train::method`]). Relative paths are resolved against the run file's folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

/// A whole run file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model to fine-tune.
    pub model: ModelSection,
    /// The training (and evaluation) data.
    pub data: DataSection,
    /// The method: `name` and its config fields.
    pub method: toml::Table,
    /// The optimisation settings.
    pub train: TrainSection,
}

/// `[model]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A GGUF file or a Hugging Face model folder, as `burn-peft generate` takes.
    pub path: PathBuf,
    /// How the frozen base weights are held (`f32`, `bf16`, `nf4`, `nf4-dq`, `gguf`): QLoRA
    /// is `nf4-dq`; `gguf` keeps a GGUF file's blocks as loaded. Adapter methods only.
    #[serde(default)]
    pub base: peft_models::BaseFormat,
}

/// `[data]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training examples, one JSON object a line.
    pub train: PathBuf,
    /// Evaluation examples, same format.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Whether prompt/completion and messages examples go through the model's chat template.
    #[serde(default = "yes")]
    pub chat_template: bool,
    /// Longer examples are truncated to this many tokens.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
}

/// The learning-rate schedule after the warm-up.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// The peak rate throughout.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// `[train]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed (averaged) into one optimizer step.
    #[serde(default = "one")]
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Schedule after the warm-up.
    #[serde(default = "default_schedule")]
    pub lr_schedule: LrSchedule,
    /// Steps of linear warm-up from `lr / (warmup_steps + 1)` to `lr`.
    #[serde(default)]
    pub warmup_steps: usize,
    /// The module optimizer's decoupled weight decay (AdamW's; SM3's for SFT with SM3 selection,
    /// see `RunModel::module_optimizer`).
    #[serde(default)]
    pub weight_decay: f64,
    /// Seed of the data order.
    #[serde(default)]
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Whether training's evaluations also generate greedy completions for exact match
    /// (`false`: the eval loss alone, much faster; `burn-peft eval` always generates).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub eval_generate: bool,
    /// Write a checkpoint every this many steps (0: none but `--stop-after`'s).
    #[serde(default)]
    pub save_every: usize,
    /// Recompute each decoder layer's activations in the backward pass instead of keeping them
    /// (Hugging Face's `gradient_checkpointing`): much less memory for one more forward pass of
    /// the layers. One device only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub gradient_checkpointing: bool,
    /// Keep at most this many checkpoints: after writing one, the oldest beyond the limit are
    /// deleted (Hugging Face's `save_total_limit`). Absent: keep every checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_total_limit: Option<usize>,
    /// Where the run writes its outputs.
    pub out_dir: PathBuf,
    /// Log a metrics line every this many steps.
    #[serde(default = "one")]
    pub log_every: usize,
    /// Devices of data-parallel training, one replica each (`"default"`, `"flex"`,
    /// `"cuda:N"`; a device may repeat). Empty: the one default device. Each micro-batch of
    /// `batch_size` examples is split across them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

fn yes() -> bool {
    true
}

// Left out of `run.toml` at its default, so runs started before the key existed resume.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_true(b: &bool) -> bool {
    *b
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_false(b: &bool) -> bool {
    !*b
}

fn one() -> usize {
    1
}

fn default_batch() -> usize {
    8
}

fn default_max_seq_len() -> usize {
    256
}

fn default_schedule() -> LrSchedule {
    LrSchedule::Constant
}

impl RunConfig {
    /// Read and check the run file `file`; relative paths become relative to its folder.
    ///
    /// # Errors
    /// An unreadable file, invalid TOML, an unknown key or a value of the wrong type (named
    /// with the file), or an invalid value.
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the run file {}", file.display()))?;
        let mut config = Self::parse(&text, file)?;
        let base = file.parent().unwrap_or(Path::new(""));
        config.model.path = model_path(base, &config.model.path);
        for path in [&mut config.data.train, &mut config.train.out_dir] {
            *path = base.join(&*path);
        }
        if let Some(eval) = &mut config.data.eval {
            *eval = base.join(&*eval);
        }
        if matches!(config.method_name(), "rosa" | "spa") {
            config.rosa_mask_paths(base);
        }
        Ok(config)
    }

    /// Parse and check run-file text (`file` names it in errors).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn parse(text: &str, file: &Path) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
        config.validate(file)?;
        Ok(config)
    }

    /// RoSA's masks file paths are relative to the run file's folder too; without either, the
    /// masks a run generates are saved as `out_dir/masks.safetensors` (the reference's
    /// `mask_save_path`), so a later run can start from them with `mask_load_path`.
    fn rosa_mask_paths(&mut self, base: &Path) {
        let mut named = false;
        for key in ["mask_load_path", "mask_save_path"] {
            if let Some(toml::Value::String(path)) = self.method.get_mut(key) {
                *path = base.join(&*path).to_string_lossy().into_owned();
                named = true;
            }
        }
        if !named {
            let file = self.train.out_dir.join(MASKS_FILE);
            self.method.insert(
                "mask_save_path".into(),
                toml::Value::String(file.to_string_lossy().into_owned()),
            );
        }
    }

    /// The method's name.
    pub fn method_name(&self) -> &str {
        self.method
            .get("name")
            .and_then(toml::Value::as_str)
            .unwrap_or("")
    }

    pub(crate) fn validate(&self, file: &Path) -> anyhow::Result<()> {
        let f = file.display();
        match self.method.get("name") {
            Some(toml::Value::String(_)) => {}
            Some(other) => bail!(
                "{f}: [method] name: expected a string, found {}",
                other.type_str()
            ),
            None => bail!("{f}: [method] has no `name` (one of {})", METHODS.join(" ")),
        }
        ensure!(
            METHODS.contains(&self.method_name()),
            "{f}: [method] name `{}` is not a method (one of {})",
            self.method_name(),
            METHODS.join(" ")
        );
        let t = &self.train;
        ensure!(t.steps > 0, "{f}: [train] steps must be at least 1");
        ensure!(
            t.batch_size > 0,
            "{f}: [train] batch_size must be at least 1"
        );
        ensure!(
            t.grad_accum > 0,
            "{f}: [train] grad_accum must be at least 1"
        );
        ensure!(t.log_every > 0, "{f}: [train] log_every must be at least 1");
        ensure!(
            !(t.gradient_checkpointing && t.devices.len() > 1),
            "{f}: [train] gradient_checkpointing runs on one device; it cannot be combined with \
             data-parallel `devices` yet"
        );
        ensure!(
            t.save_total_limit != Some(0),
            "{f}: [train] save_total_limit must be at least 1 (leave it out to keep every \
             checkpoint)"
        );
        for d in &t.devices {
            parse_device(d).with_context(|| format!("{f}: [train] devices"))?;
        }
        ensure!(
            t.batch_size >= t.devices.len(),
            "{f}: [train] batch_size ({}) must be at least the number of devices ({}): each \
             device takes a share of every micro-batch",
            t.batch_size,
            t.devices.len()
        );
        ensure!(
            t.lr.is_finite() && t.lr > 0.0,
            "{f}: [train] lr must be a positive number, found {}",
            t.lr
        );
        ensure!(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "{f}: [train] weight_decay must be a non-negative number"
        );
        ensure!(
            self.data.max_seq_len >= 2,
            "{f}: [data] max_seq_len must be at least 2 (a token and the next one to predict)"
        );
        Ok(())
    }

    /// The learning rate of optimizer step `step` (0-based): linear warm-up over
    /// `warmup_steps` (`lr · (step + 1) / (warmup_steps + 1)`), then the schedule from `lr` down
    /// to 0 at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        let t = &self.train;
        if step < t.warmup_steps {
            return t.lr * (step + 1) as f64 / (t.warmup_steps + 1) as f64;
        }
        let span = t.steps.saturating_sub(t.warmup_steps).max(1) as f64;
        let progress = ((step - t.warmup_steps) as f64 / span).min(1.0);
        match t.lr_schedule {
            LrSchedule::Constant => t.lr,
            LrSchedule::Linear => t.lr * (1.0 - progress),
            LrSchedule::Cosine => t.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

/// Where `[model] path` points: relative to the run file's folder; a bare file or folder name
/// that is not there is looked up in burn-peft's model cache (the folder the fetch scripts
/// fill, [`peft_models::cache_dir`]: directly in it or one folder down), so that a run file can
/// name `SmolLM2-135M-Instruct.Q4_1.gguf` on any machine. Not found anywhere: the path beside
/// the run file, which the model loader reports as missing.
pub fn model_path(base: &Path, path: &Path) -> PathBuf {
    let local = base.join(path);
    if local.exists() || path.components().count() != 1 {
        return local;
    }
    if path.file_name() == Some(std::ffi::OsStr::new(peft_models::SMOLLM2_FILE))
        && let Ok(file) = peft_models::smollm2_path()
    {
        return file;
    }
    let cache = peft_models::cache_dir();
    if cache.join(path).exists() {
        return cache.join(path);
    }
    let mut below: Vec<PathBuf> = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join(path))
        .filter(|p| p.exists())
        .collect();
    below.sort();
    below.into_iter().next().unwrap_or(local)
}

/// The file in `out_dir` where a RoSA run saves the masks it generates (unless the run file
/// names `mask_save_path` or `mask_load_path`).
pub const MASKS_FILE: &str = "masks.safetensors";

/// The method names `[method] name` takes.
pub const METHODS: [&str; 10] = [
    "lora", "dora", "adalora", "rosa", "spa", "sft", "id3", "pafi", "bitfit", "full",
];

/// A device of `[train] devices` (without autodiff): `default` (the build's default device),
/// `flex`, or `cuda:N` (with the `cuda` feature).
///
/// # Errors
/// Another name, or a backend this build lacks.
pub fn parse_device(name: &str) -> anyhow::Result<burn::tensor::Device> {
    use burn::tensor::Device;
    match name {
        "default" => return Ok(Device::default()),
        #[cfg(feature = "flex")]
        "flex" => return Ok(Device::flex()),
        _ => {}
    }
    if let Some(index) = name.strip_prefix("cuda:") {
        let index: usize = index
            .parse()
            .with_context(|| format!("`{name}`: the CUDA device index is not a number"))?;
        #[cfg(feature = "cuda")]
        return Ok(Device::cuda(index));
        #[cfg(not(feature = "cuda"))]
        bail!(
            "`{name}`: this build has no CUDA backend (build with the `cuda` feature); device {index}"
        );
    }
    bail!("unknown device `{name}` (`default`, `flex` or `cuda:N`)")
}

/// How the replicas on `names` reduce their gradients: burn's collective all-reduce when every
/// device is a distinct CUDA device (the only devices burn 0.22.1 implements it for), the gather
/// onto the first device otherwise.
pub fn reduction(names: &[String]) -> peft_core::Reduction {
    let distinct = names
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        == names.len();
    if distinct && names.iter().all(|n| n.starts_with("cuda:")) {
        peft_core::Reduction::Collective
    } else {
        peft_core::Reduction::Gather
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
path = "m"
[data]
train = "t.jsonl"
[method]
name = "lora"
[train]
steps = 10
lr = 1e-3
out_dir = "out"
"#;

    #[test]
    fn a_minimal_file_parses_with_defaults() {
        let c = RunConfig::parse(BASE, Path::new("run.toml")).unwrap();
        assert_eq!(c.train.batch_size, 8);
        assert!(c.data.chat_template);
        assert_eq!(c.method_name(), "lora");
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_the_file_and_key() {
        let bad = BASE.replace("steps = 10", "steps = 10\nstepz = 3");
        let e = RunConfig::parse(&bad, Path::new("run.toml")).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("run.toml") && e.contains("stepz"), "{e}");
        let bad = BASE.replace("steps = 10", "steps = \"ten\"");
        let e = format!(
            "{:#}",
            RunConfig::parse(&bad, Path::new("run.toml")).unwrap_err()
        );
        assert!(e.contains("run.toml") && e.contains("steps"), "{e}");
    }

    #[test]
    fn eval_generate_defaults_to_true_and_is_written_only_when_false() {
        let c = RunConfig::parse(BASE, Path::new("run.toml")).unwrap();
        assert!(c.train.eval_generate);
        assert!(!toml::to_string(&c).unwrap().contains("eval_generate"));
        let text = BASE.replace("steps = 10", "steps = 10\neval_generate = false");
        let c = RunConfig::parse(&text, Path::new("run.toml")).unwrap();
        assert!(!c.train.eval_generate);
        assert!(
            toml::to_string(&c)
                .unwrap()
                .contains("eval_generate = false")
        );
    }

    #[test]
    fn the_schedule_warms_up_then_decays_to_zero() {
        let text = BASE.replace(
            "lr = 1e-3",
            "lr = 1.0\nwarmup_steps = 1\nlr_schedule = \"linear\"",
        );
        let c = RunConfig::parse(&text, Path::new("run.toml")).unwrap();
        assert_eq!(c.lr_at(0), 0.5);
        assert_eq!(c.lr_at(1), 1.0);
        assert!(c.lr_at(9) > 0.0 && c.lr_at(9) < 0.2);
    }
}
