//! # burn-peft quickstart: LoRA fine-tuning of a burn model, saved in Hugging Face PEFT format
//!
//! ```sh
//! cargo run --release --example quickstart            # ~20 s on 2 CPU cores (after the build)
//! cargo run --release --example quickstart -- --help  # --steps, --seed, --lr, --out
//! cargo run --release --example quickstart --features wgpu   # on a GPU through wgpu
//! ```
//!
//! What it shows, end to end, with no download:
//!
//! 1. **A burn model with adapter-ready layers.** A tiny transformer-like classifier over token
//!    sequences whose linear layers are [`PeftLinear`]: it behaves and is stored exactly like
//!    `burn::nn::Linear`, and LoRA attached to it runs in activation space (`x·W + s·(x·A)·B`).
//! 2. **A "pre-trained" base model.** The model is fully trained on task A (which of 4 token
//!    groups is the most frequent in a sequence), then frozen. Task B uses the same tokens with
//!    a different grouping, so the base model is near chance on it.
//! 3. **LoRA fine-tuning.** [`LoraModel::new`] attaches rank-8 adapters to the layers named in the
//!    config and freezes everything else; `peft.stepper(steps)` (the method's controllers, none
//!    for LoRA) and AdamW train only the adapters.
//! 4. **PEFT files.** [`LoraModel::save_pretrained`] writes `adapter_config.json` and
//!    `adapter_model.safetensors`, the files Hugging Face PEFT reads and writes;
//!    [`LoraModel::from_pretrained`] loads them onto a freshly loaded copy of the base, and the
//!    outputs are checked to match. [`LoraModel::merge_and_unload`] folds the adapters into the
//!    base weights for deployment, giving the same outputs with no adapter overhead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, LinearConfig};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::step::Stepper;
use peft_core::{ModuleSelector, PeftLinear};
use peft_lora::{LoadOptions, LoraAdapter, LoraConfig, LoraModel, SaveOptions};

/// Command-line options.
#[derive(Parser, Debug)]
#[command(about = "LoRA fine-tuning of a small burn model, saved in Hugging Face PEFT format")]
struct Args {
    /// LoRA training steps on task B.
    #[arg(long, default_value_t = 500)]
    steps: usize,
    /// Seed of the data and of the model initialization.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Learning rate of the LoRA training.
    #[arg(long, default_value_t = 2e-3)]
    lr: f64,
    /// Directory to keep the base weights and the adapter in (default: a temporary directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// The model: an ordinary burn module. The only PEFT-specific choice is the layer type `Proj`.
// ---------------------------------------------------------------------------------------------

/// A linear layer that carries LoRA adapters in activation space. A plain `burn::nn::Linear`
/// works too: it gets weight-space adapters, which are slower and take no `lora_dropout`.
type Proj = PeftLinear<LoraAdapter>;

const VOCAB: usize = 32;
const SEQ_LEN: usize = 12;
const HIDDEN: usize = 64;
const MLP: usize = 128;
const CLASSES: usize = 4;

/// Single-head self-attention followed by an MLP, both residual.
#[derive(Module, Debug)]
struct Block {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

/// Token embedding, two blocks, mean pooling and a classification head.
#[derive(Module, Debug)]
struct Classifier {
    embed_tokens: Embedding,
    layers: Vec<Block>,
    head: Proj,
}

impl Block {
    fn new(device: &Device) -> Self {
        let proj = |d_in, d_out| Proj::from(LinearConfig::new(d_in, d_out).init(device));
        Self {
            q_proj: proj(HIDDEN, HIDDEN),
            k_proj: proj(HIDDEN, HIDDEN),
            v_proj: proj(HIDDEN, HIDDEN),
            o_proj: proj(HIDDEN, HIDDEN),
            up_proj: proj(HIDDEN, MLP),
            down_proj: proj(MLP, HIDDEN),
        }
    }

    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    fn forward(&self, h: Tensor<3>) -> Tensor<3> {
        let q = self.q_proj.forward(h.clone());
        let k = self.k_proj.forward(h.clone());
        let v = self.v_proj.forward(h.clone());
        let scores = q.matmul(k.swap_dims(1, 2)) / (HIDDEN as f64).sqrt();
        let attended = softmax(scores, 2).matmul(v);
        let h = h + self.o_proj.forward(attended);
        h.clone() + self.down_proj.forward(gelu(self.up_proj.forward(h)))
    }
}

impl Classifier {
    fn new(device: &Device) -> Self {
        Self {
            embed_tokens: EmbeddingConfig::new(VOCAB, HIDDEN).init(device),
            layers: vec![Block::new(device), Block::new(device)],
            head: Proj::from(LinearConfig::new(HIDDEN, CLASSES).init(device)),
        }
    }

    /// Token ids `[batch, seq]` -> class logits `[batch, classes]`.
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<2> {
        let mut h = self.embed_tokens.forward(ids);
        for layer in &self.layers {
            h = layer.forward(h);
        }
        self.head.forward(h.mean_dim(1).squeeze_dim(1))
    }
}

// ---------------------------------------------------------------------------------------------
// The data: two related, generated classification tasks.
// ---------------------------------------------------------------------------------------------

/// Every token votes for one of `CLASSES` groups; the label is the group with the most votes.
/// Both tasks use the same tokens and differ only in the grouping, so a model that solved A has
/// the right machinery for B but gives the wrong answers.
#[derive(Clone, Copy, Debug)]
enum Task {
    /// Group = token mod 4 (tokens 0, 4, 8, … vote for class 0).
    A,
    /// Group = token / 8 (tokens 0..8 vote for class 0): each B group holds two tokens of every
    /// A group, so the base model is at chance level.
    B,
}

impl Task {
    fn group(self, token: usize) -> usize {
        match self {
            Task::A => token % CLASSES,
            Task::B => token / (VOCAB / CLASSES),
        }
    }
}

/// Token sequences and their labels.
#[derive(Clone)]
struct Dataset {
    ids: Tensor<2, Int>,
    labels: Tensor<1, Int>,
    len: usize,
}

impl Dataset {
    /// `len` random sequences labelled by `task`, reproducible from `seed`. Sequences whose top
    /// group is tied are redrawn, so every label is unambiguous.
    fn generate(task: Task, len: usize, seed: u64, device: &Device) -> Self {
        let mut rng = SplitMix64(seed);
        let (mut ids, mut labels) = (Vec::with_capacity(len * SEQ_LEN), Vec::with_capacity(len));
        while labels.len() < len {
            let seq: Vec<usize> = (0..SEQ_LEN).map(|_| rng.below(VOCAB)).collect();
            let mut votes = [0usize; CLASSES];
            for &t in &seq {
                votes[task.group(t)] += 1;
            }
            let top = *votes.iter().max().expect("CLASSES > 0");
            if votes.iter().filter(|&&v| v == top).count() > 1 {
                continue;
            }
            labels.push(votes.iter().position(|&v| v == top).expect("top exists") as i64);
            ids.extend(seq.iter().map(|&t| t as i64));
        }
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [len, SEQ_LEN]), device),
            labels: Tensor::from_data(TensorData::new(labels, [len]), device),
            len,
        }
    }

    /// Batch number `i`, cycling through the set (the examples are i.i.d., so no shuffling).
    fn batch(&self, i: usize, size: usize) -> (Tensor<2, Int>, Tensor<1, Int>) {
        let start = (i * size) % (self.len - size + 1);
        (
            self.ids.clone().narrow(0, start, size),
            self.labels.clone().narrow(0, start, size),
        )
    }
}

/// A tiny deterministic random number generator, so the example needs no extra crate.
struct SplitMix64(u64);

impl SplitMix64 {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Training and evaluation: the same loop serves the full pre-training and the LoRA fine-tuning,
// because the optimizer only updates parameters that require gradients.
// ---------------------------------------------------------------------------------------------

const BATCH: usize = 64;

/// AdamW with PyTorch's defaults (burn's own defaults are eps 1e-5, weight decay 1e-4).
fn adamw() -> ModuleOptimizer {
    AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init()
}

/// Train `model` for `steps` steps on `data` with `step(model, loss)` (one optimizer step),
/// showing the running loss; returns the trained model and its final running loss.
fn train(
    model: Classifier,
    data: &Dataset,
    steps: usize,
    what: &str,
    mut step: impl FnMut(Classifier, Tensor<1>) -> anyhow::Result<Classifier>,
) -> anyhow::Result<(Classifier, f64)> {
    let loss_fn = CrossEntropyLossConfig::new().init(&data.ids.device());
    let progress = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos:>4}/{len} {msg} ({elapsed})")?
            .progress_chars("=> "),
    );
    progress.set_prefix(what.to_string());
    let mut model = model;
    let mut running_loss = f64::NAN;
    for i in 0..steps {
        let (ids, labels) = data.batch(i, BATCH);
        let loss = loss_fn.forward(model.forward(ids), labels);
        let value: f64 = loss.clone().into_scalar();
        running_loss = if i == 0 {
            value
        } else {
            0.95 * running_loss + 0.05 * value
        };
        model = step(model, loss)?;
        progress.set_message(format!("loss {running_loss:.4}"));
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok((model, running_loss))
}

/// Logits of `model` in evaluation mode (no dropout, no autodiff graph).
fn logits(model: &Classifier, data: &Dataset) -> Tensor<2> {
    model.valid().forward(data.ids.clone())
}

/// Fraction of `data` that `model` classifies correctly.
fn accuracy(model: &Classifier, data: &Dataset) -> f64 {
    let predicted = logits(model, data).argmax(1).squeeze_dim::<1>(1);
    let correct: i64 = predicted
        .equal(data.labels.clone())
        .int()
        .sum()
        .into_scalar();
    correct as f64 / data.len as f64
}

/// Largest absolute difference between two tensors.
fn max_abs_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar()
}

fn print_files(dir: &Path) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let size = entry.metadata()?.len();
        println!(
            "    {:<28} {size:>8} bytes",
            entry.file_name().to_string_lossy()
        );
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// burn picks the backend at run time from the device: the pure-Rust CPU backend by default,
/// the GPU with `--features wgpu`. Training needs autodiff, a property of the device.
fn training_device() -> Device {
    #[cfg(feature = "wgpu")]
    let device = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
    #[cfg(not(feature = "wgpu"))]
    let device = Device::flex();
    device.autodiff()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    // Training runs with autodiff; evaluation drops it.
    let device = training_device();
    device.seed(args.seed);
    let eval_device = device.clone().without_autodiff();

    // Training and held-out sets of both tasks (held-out sets without autodiff: evaluation only).
    let task_a = Dataset::generate(Task::A, 4096, args.seed, &device);
    let task_a_eval = Dataset::generate(Task::A, 1024, args.seed + 1, &eval_device);
    let task_b = Dataset::generate(Task::B, 4096, args.seed + 2, &device);
    let task_b_eval = Dataset::generate(Task::B, 1024, args.seed + 3, &eval_device);

    // 1. Pre-train the base model on task A (full fine-tuning), then freeze it.
    println!("1. Pre-training the base model on task A (all parameters train)");
    let t = Instant::now();
    // Full training of a plain model: the low-level step, no PEFT method involved.
    let (mut stepper, mut optim) = (Stepper::new(), adamw());
    let (base, loss) = train(
        Classifier::new(&device),
        &task_a,
        400,
        "pre-train",
        |m, loss| Ok(stepper.step(m, &mut optim, 3e-3, loss)?),
    )?;
    // Freezing is optional here: `LoraModel` freezes every non-adapter parameter itself.
    let base = base.no_grad();
    println!(
        "   done in {}, loss {loss:.4}: task A accuracy {:.1}%, task B accuracy {:.1}% (chance: 25%)",
        secs(t.elapsed()),
        100.0 * accuracy(&base, &task_a_eval),
        100.0 * accuracy(&base, &task_b_eval),
    );

    // Keep the base weights on disk: the adapter is saved separately and later loaded onto a
    // fresh copy of this base, as one would with a Hugging Face model.
    let tmp = tempfile::tempdir()?;
    let out = args.out.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let base_file = out.join("base.bpk");
    base.clone()
        .save_file(&base_file)
        .context("saving the base model")?;

    // 2. Wrap it with LoRA: rank 8, alpha 16, on the attention, MLP and head projections.
    println!("\n2. LoRA fine-tuning on task B (only the adapters train)");
    let config = LoraConfig::new(
        8,
        16.0,
        ModuleSelector::names(["q_proj", "v_proj", "up_proj", "down_proj", "head"]),
    )
    .with_dropout(0.05);
    let mut peft = LoraModel::new(base, config)?;
    let (trainable, total) = peft.trainable_parameters();
    println!(
        "   trainable params: {trainable} || all params: {total} || trainable%: {:.2}",
        100.0 * trainable as f64 / total as f64
    );
    let before = accuracy(peft.model(), &task_b_eval);
    println!(
        "   task B accuracy before: {:.1}% (LoRA starts as a no-op: B = 0)",
        100.0 * before
    );

    let t = Instant::now();
    // The method's stepper: with any other method (AdaLoRA, RoSA, SFT) only the config above
    // changes; `stepper` brings its controllers and `train` passes the one learning rate.
    let mut stepper = peft.stepper(args.steps)?;
    let mut optim = adamw();
    let (trained, loss) = train(
        peft.model().clone(),
        &task_b,
        args.steps,
        "LoRA",
        |m, loss| {
            peft.map_model(|_| m);
            stepper.train(&mut peft, &mut optim, args.lr, loss)?;
            Ok(peft.model().clone())
        },
    )?;
    let peft = peft.with_model(trained);
    let after = accuracy(peft.model(), &task_b_eval);
    println!(
        "   done in {}, loss {loss:.4}: task B accuracy {:.1}% -> {:.1}%",
        secs(t.elapsed()),
        100.0 * before,
        100.0 * after
    );

    // 3. Save the adapter in Hugging Face PEFT's format.
    let adapter_dir = out.join("adapter");
    peft.save_pretrained(&adapter_dir, &SaveOptions::default())?;
    println!("\n3. Saved the adapter to {}:", adapter_dir.display());
    print_files(&adapter_dir)?;
    println!("   (next to the base weights, {})", base_file.display());
    if args.out.is_none() {
        println!("   (a temporary directory, deleted at exit: use --out DIR to keep the files)");
    }

    // 4. Reload it onto a freshly built base and check that the outputs are identical.
    let fresh_base = Classifier::new(&device)
        .try_load_file(&base_file)
        .context("loading the base model")?;
    let reloaded = LoraModel::from_pretrained(fresh_base, &adapter_dir, &LoadOptions::default())?;
    let expected = logits(peft.model(), &task_b_eval);
    let diff = max_abs_diff(expected.clone(), logits(reloaded.model(), &task_b_eval));
    println!("\n4. Reloaded base + adapter: max |logit difference| = {diff:.2e}");
    ensure!(
        diff <= 1e-5,
        "the reloaded adapter gives different logits (max abs diff {diff:e})"
    );

    // 5. Merge the adapters into the base weights for deployment: a plain model again, with the
    //    same outputs up to float rounding (the merged weights sum in a different order).
    let merged = peft.merge_and_unload(true)?;
    let diff = max_abs_diff(expected, logits(&merged, &task_b_eval));
    println!(
        "5. merge_and_unload: max |logit difference| = {diff:.2e}, {} params (no adapters left)",
        merged.num_params()
    );
    ensure!(
        diff <= 1e-4,
        "the merged model gives different logits (max abs diff {diff:e})"
    );
    println!(
        "   merged model accuracy on task B: {:.1}%",
        100.0 * accuracy(&merged, &task_b_eval)
    );

    ensure!(
        after >= before + 0.2,
        "LoRA barely improved task B ({:.1}% -> {:.1}%): try more --steps or another --lr",
        100.0 * before,
        100.0 * after
    );
    println!("\nAll checks passed in {}.", secs(start.elapsed()));
    Ok(())
}
