//! What the MiniLM benchmarks (`bench_minilm`, `bench_rosa`, `bench_sft`) share: the workload
//! (all-MiniLM-L6-v2, batch 16 x 128 deterministic ids, dropout off), AdamW, the timed step and
//! the memory and median readings.

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor};
use peft_core::step::Stepper;
use peft_core::{Adapter, ModuleSelector, PeftLinear};
use peft_models::bert::{Bert, BertConfig};

/// Sentences per step.
pub const BATCH: usize = 16;
/// Tokens per sentence.
pub const SEQ: usize = 128;

/// The model folder, its config (dropout off) and one batch on an autodiff device.
pub struct Workload {
    /// The model folder.
    pub dir: PathBuf,
    /// Its config, `hidden_dropout_prob = 0`.
    pub config: BertConfig,
    /// The default device with autodiff.
    pub device: Device,
    /// Deterministic ids in `1000..vocab` (no special tokens), `[BATCH, SEQ]`.
    pub ids: Tensor<2, Int>,
    /// All positions attended, `[BATCH, SEQ]`.
    pub mask: Tensor<2, Int>,
}

impl Workload {
    /// Load `model` (default: all-MiniLM-L6-v2 in the cache).
    ///
    /// # Errors
    /// A missing model or config.
    pub fn load(model: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = match model {
            Some(d) => d,
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
        Ok(Self {
            dir,
            config,
            device,
            ids,
            mask,
        })
    }
}

/// Every linear layer of BERT.
pub fn targets() -> ModuleSelector {
    ModuleSelector::names(["query", "key", "value", "dense"])
}

/// AdamW as the benchmarks use it (weight decay 0.01, eps 1e-8).
pub fn adamw() -> ModuleOptimizer {
    AdamWConfig::new()
        .with_weight_decay(0.01)
        .with_epsilon(1e-8)
        .init()
}

/// `VmHWM` / `VmRSS` of this process in MiB (Linux), or NaN.
pub fn memory_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The median (upper middle for even lengths).
///
/// # Panics
/// On an empty vector.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One training step (loss `mean(last_hidden_state²)`, lr 1e-4) through `stepper`, and its
/// time in milliseconds.
///
/// # Errors
/// A controller's error.
pub fn timed_step<A: Adapter>(
    model: Bert<PeftLinear<A>>,
    stepper: &mut Stepper<Bert<PeftLinear<A>>>,
    optim: &mut ModuleOptimizer,
    w: &Workload,
) -> anyhow::Result<(Bert<PeftLinear<A>>, f64)> {
    let start = Instant::now();
    let loss = model.forward(w.ids.clone(), w.mask.clone()).square().mean();
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
