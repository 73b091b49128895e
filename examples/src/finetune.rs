//! `finetune`: fine-tune a pretrained BERT (all-MiniLM-L6-v2) with a classification head on a
//! generated topic-classification task, with any burn-peft method.
//!
//! The task: sentences built from templates around one topic word (sports, food, weather,
//! computing). Training uses 6 templates and 8 words per topic; evaluation uses 3 other templates
//! and 4 other words per topic, so the head can only generalise through what the pretrained
//! encoder already knows about the words.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, ensure};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Int, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::{Method, ModuleSelector, PeftConfig, PeftLinear, PeftModel, SaveOptions, Tuned};
use peft_lora::LoraConfig;
use peft_models::LinearLayer;
use peft_models::bert::{Bert, BertConfig, mean_pool};

/// The fine-tuning methods the example runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// LoRA on every linear layer of the encoder (activation-space path), head trained in full.
    Lora,
    /// AdaLoRA on every linear layer with its rank allocator in the step.
    Adalora,
    /// RoSA: LoRA plus a sparse adapter on every linear layer; the masks come from a LoRA
    /// warm-up with gradient collection, then both train from the initial adapters (the
    /// paper's two-phase recipe, in one run).
    Rosa,
    /// RoSA's sparse adapter alone (`r = 0`, schedule `spa_only`).
    Spa,
    /// SFT (SpIEL): a sparse delta on every linear layer, reselected during training
    /// (`--selection rigl|sm3`), at the LoRA trainable count of `--rank` (or `--budget`).
    Sft,
    /// ID3: a budget of the model's own entries, unmasked step by step by |g|/|θ|.
    Id3,
    /// PaFI: the budget's smallest-magnitude entries.
    Pafi,
    /// BitFit: every 1-D parameter (biases and LayerNorm weights, the toolkit's set).
    Bitfit,
}

/// How SFT regrows its deltas.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelectionArg {
    /// Accumulated gradients (SpIEL-AG), trained with SftAdamW.
    Rigl,
    /// SM3 moment estimates (SpIEL-MA), trained with SftSM3.
    Sm3,
}

/// Command-line options of `finetune`.
#[derive(clap::Parser, Debug, Clone)]
#[command(about = "Fine-tune all-MiniLM-L6-v2 on a generated topic-classification task")]
pub struct Args {
    /// Model folder (default: all-MiniLM-L6-v2 in the cache, see scripts/fetch_minilm.py).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The method.
    #[arg(long, value_enum, default_value_t = MethodArg::Lora)]
    pub method: MethodArg,
    /// Passes over the training set.
    #[arg(long, default_value_t = 4)]
    pub epochs: usize,
    /// Sentences per step.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Learning rate (default: 2e-3 for LoRA/AdaLoRA, 1e-3 for ID3/PaFI/BitFit).
    #[arg(long)]
    pub lr: Option<f64>,
    /// LoRA rank (AdaLoRA: the initial rank; it keeps half on average).
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// RoSA / SpA density of the sparse adapter (entries per weight entry).
    #[arg(long, default_value_t = 0.01)]
    pub density: f64,
    /// RoSA warm-up steps (LoRA only) before the gradient-collection step.
    #[arg(long, default_value_t = 8)]
    pub rosa_warmup: usize,
    /// SFT growth criterion.
    #[arg(long, value_enum, default_value_t = SelectionArg::Rigl)]
    pub selection: SelectionArg,
    /// ID3 / PaFI / SFT budget in entries (default: the LoRA trainable count at `--rank`).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Seed of the data order and of the head.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Folder to save the adapter (LoRA, AdaLoRA: PEFT format) or summary (selective) in.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Hidden-state dropout while training (default: the model's `hidden_dropout_prob`).
    #[arg(long)]
    pub dropout: Option<f64>,
    /// No progress bar (for logs and tests).
    #[arg(long)]
    pub quiet: bool,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Held-out accuracy with the untrained head.
    pub before: f32,
    /// Held-out accuracy after fine-tuning.
    pub after: f32,
    /// Training accuracy after fine-tuning.
    pub train_after: f32,
    /// Mean loss of the first and of the last epoch.
    pub loss: (f32, f32),
    /// Trainable entries and all entries of the model.
    pub trainable: (usize, usize),
    /// Median training-step time in milliseconds.
    pub step_ms: f64,
}

const TOPICS: [&str; 4] = ["sports", "food", "weather", "computing"];
const TRAIN_WORDS: [[&str; 8]; 4] = [
    [
        "football",
        "tennis",
        "basketball",
        "marathon",
        "hockey",
        "baseball",
        "volleyball",
        "cricket",
    ],
    [
        "pizza", "pasta", "salad", "sandwich", "soup", "burger", "noodles", "pancakes",
    ],
    [
        "rain",
        "snow",
        "thunderstorm",
        "fog",
        "hail",
        "drizzle",
        "heatwave",
        "blizzard",
    ],
    [
        "laptop",
        "smartphone",
        "software",
        "keyboard",
        "router",
        "processor",
        "database",
        "compiler",
    ],
];
const TEST_WORDS: [[&str; 4]; 4] = [
    ["golf", "rugby", "swimming", "boxing"],
    ["sushi", "curry", "omelette", "dumplings"],
    ["sleet", "hurricane", "frost", "monsoon"],
    ["tablet", "server", "browser", "algorithm"],
];
const TRAIN_TEMPLATES: [&str; 6] = [
    "I was thinking about the {} all morning.",
    "She told me a long story about {}.",
    "There was a lot of talk about {} yesterday.",
    "My brother cannot stop mentioning {}.",
    "The article was mostly about {}.",
    "We spent the evening discussing {}.",
];
const TEST_TEMPLATES: [&str; 3] = [
    "Everyone at the meeting kept bringing up {}.",
    "He wrote a short note about {}.",
    "The podcast today focused on {}.",
];

/// Tokenised sentences with their topic.
#[derive(Clone, Debug)]
pub struct Dataset {
    ids: Vec<Vec<i64>>,
    labels: Vec<i64>,
}

impl Dataset {
    fn build<const W: usize>(
        templates: &[&str],
        words: &[[&str; W]; 4],
        tokenize: &dyn Fn(&str) -> anyhow::Result<Vec<i64>>,
    ) -> anyhow::Result<Self> {
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for (topic, words) in words.iter().enumerate() {
            for template in templates {
                for word in words {
                    ids.push(tokenize(&template.replace("{}", word))?);
                    labels.push(topic as i64);
                }
            }
        }
        Ok(Self { ids, labels })
    }

    /// The training set and the held-out set.
    ///
    /// # Errors
    /// The tokenizer's.
    pub fn topic_task(
        tokenize: &dyn Fn(&str) -> anyhow::Result<Vec<i64>>,
    ) -> anyhow::Result<(Self, Self)> {
        Ok((
            Self::build(&TRAIN_TEMPLATES, &TRAIN_WORDS, tokenize)?,
            Self::build(&TEST_TEMPLATES, &TEST_WORDS, tokenize)?,
        ))
    }

    /// Number of sentences.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The sentences `idx`, right-padded with 0: (input ids, attention mask, labels).
    pub fn batch(
        &self,
        idx: &[usize],
        device: &Device,
    ) -> (Tensor<2, Int>, Tensor<2, Int>, Tensor<1, Int>) {
        let seq = idx.iter().map(|&i| self.ids[i].len()).max().unwrap_or(1);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for &i in idx {
            let s = &self.ids[i];
            ids.extend(
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, seq - s.len())),
            );
            mask.extend((0..seq).map(|j| i64::from(j < s.len())));
        }
        let labels: Vec<i64> = idx.iter().map(|&i| self.labels[i]).collect();
        let n = idx.len();
        (
            Tensor::<1, Int>::from_ints(ids.as_slice(), device).reshape([n, seq]),
            Tensor::<1, Int>::from_ints(mask.as_slice(), device).reshape([n, seq]),
            Tensor::from_ints(labels.as_slice(), device),
        )
    }
}

/// BERT + mean pooling + a linear head (`classifier`).
#[derive(Module, Debug)]
pub struct Classifier<L: LinearLayer> {
    /// The encoder.
    pub bert: Bert<L>,
    /// The head.
    pub classifier: Linear,
}

impl<L: LinearLayer> Classifier<L> {
    /// Class logits `[batch, classes]`.
    pub fn forward(&self, ids: Tensor<2, Int>, mask: Tensor<2, Int>) -> Tensor<2> {
        let hidden = self.bert.forward(ids, mask.clone());
        self.classifier.forward(mean_pool(hidden, mask))
    }
}

/// Accuracy of `model` on `data` (no gradients).
pub fn accuracy<L: LinearLayer>(model: &Classifier<L>, data: &Dataset, device: &Device) -> f32 {
    let model = model.valid();
    let inference = device.clone().inner();
    let mut correct = 0;
    let all: Vec<usize> = (0..data.len()).collect();
    for chunk in all.chunks(64) {
        let (ids, mask, labels) = data.batch(chunk, &inference);
        let pred = model.forward(ids, mask).argmax(1).reshape([chunk.len()]);
        correct += pred.equal(labels).int().sum().into_scalar::<i64>();
    }
    correct as f32 / data.len() as f32
}

/// The classification head, initialised from the seed (not from burn's process-global RNG).
pub fn head(hidden: usize, seed: u64, device: &Device) -> Linear {
    let mut linear = LinearConfig::new(hidden, TOPICS.len()).init(device);
    let order = peft_core::rng::shuffled(hidden * TOPICS.len(), seed);
    let bound = 1.0 / (hidden as f32).sqrt();
    let values: Vec<f32> = order
        .iter()
        .map(|&k| (k as f32 / order.len() as f32 * 2.0 - 1.0) * bound)
        .collect();
    linear.weight = linear.weight.map(|w| {
        Tensor::<1>::from_floats(values.as_slice(), &w.device())
            .reshape([hidden, TOPICS.len()])
            .require_grad()
    });
    linear.bias = linear
        .bias
        .map(|b| b.map(|t| t.zeros_like().require_grad()));
    linear
}

/// The batch of global step `step`: epoch `step / steps_per_epoch` in its shuffled order.
fn step_batch(train: &Dataset, args: &Args, step: usize) -> Vec<usize> {
    let steps_per_epoch = train.len().div_ceil(args.batch);
    let order = peft_core::rng::shuffled(
        train.len(),
        args.seed ^ ((step / steps_per_epoch) as u64 + 1),
    );
    order
        .chunks(args.batch)
        .nth(step % steps_per_epoch)
        .expect("a step within the epoch")
        .to_vec()
}

/// The training loss of `model` on the batch of global step `step`.
fn step_loss<L: LinearLayer>(
    model: &Classifier<L>,
    train: &Dataset,
    args: &Args,
    step: usize,
    device: &Device,
) -> Tensor<1> {
    let (ids, mask, labels) = train.batch(&step_batch(train, args, step), device);
    CrossEntropyLossConfig::new()
        .init(device)
        .forward(model.forward(ids, mask), labels)
}

/// One training run: the loop shared by every method. `step` takes the model and the loss
/// and returns the updated model.
#[allow(clippy::too_many_arguments)]
fn train<L: LinearLayer>(
    mut model: Classifier<L>,
    train: &Dataset,
    test: &Dataset,
    args: &Args,
    device: &Device,
    mut step: impl FnMut(Classifier<L>, Tensor<1>) -> anyhow::Result<Classifier<L>>,
) -> anyhow::Result<(Classifier<L>, Report)> {
    let before = accuracy(&model, test, device);
    let steps_per_epoch = train.len().div_ceil(args.batch);
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((steps_per_epoch * args.epochs) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    let (mut first_loss, mut last_loss) = (0.0, 0.0);
    let mut times = Vec::new();
    for epoch in 0..args.epochs {
        let mut total = 0.0;
        for i in 0..steps_per_epoch {
            let start = Instant::now();
            let loss = step_loss(&model, train, args, epoch * steps_per_epoch + i, device);
            let value = loss.clone().into_scalar::<f32>();
            model = step(model, loss)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
            total += value;
            bar.set_message(format!("epoch {} loss {value:.3}", epoch + 1));
            bar.inc(1);
        }
        let mean = total / steps_per_epoch as f32;
        if epoch == 0 {
            first_loss = mean;
        }
        last_loss = mean;
        let acc = accuracy(&model, test, device);
        bar.suspend(|| {
            if !args.quiet {
                println!(
                    "epoch {}: mean loss {mean:.4}, held-out accuracy {:.1}%",
                    epoch + 1,
                    acc * 100.0
                );
            }
        });
    }
    bar.finish_and_clear();
    times.sort_by(f64::total_cmp);
    let report = Report {
        before,
        after: accuracy(&model, test, device),
        train_after: accuracy(&model, train, device),
        loss: (first_loss, last_loss),
        trainable: (0, 0),
        step_ms: times.get(times.len() / 2).copied().unwrap_or(0.0),
    };
    Ok((model, report))
}

/// The encoder of `dir` and its config, with `--dropout` applied.
fn encoder<L: LinearLayer>(
    args: &Args,
    dir: &Path,
    device: &Device,
) -> anyhow::Result<(Bert<L>, BertConfig)> {
    let mut config = BertConfig::from_dir(dir)?;
    if let Some(p) = args.dropout {
        ensure!((0.0..1.0).contains(&p), "--dropout must be in [0, 1)");
        config.hidden_dropout_prob = p;
    }
    Ok((Bert::from_dir_with(dir, &config, device)?, config))
}

/// The tokenizer of a model folder (`tokenizer.json`), without padding or truncation.
///
/// # Errors
/// A missing or invalid `tokenizer.json`.
pub fn folder_tokenizer(dir: &Path) -> anyhow::Result<impl Fn(&str) -> anyhow::Result<Vec<i64>>> {
    let file = dir.join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(move |text: &str| {
        let enc = tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    })
}

/// Run the example: load the model and its tokenizer, fine-tune, report, save.
///
/// # Errors
/// Missing model, bad options, or a failure of the method.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => peft_models::minilm_dir()?,
    };
    let tokenize = folder_tokenizer(&dir)?;
    run_with(args, &dir, &tokenize)
}

/// [`run`] with a given tokenizer (tests use a tiny model without one).
///
/// # Errors
/// As [`run`].
pub fn run_with(
    args: &Args,
    dir: &Path,
    tokenize: &dyn Fn(&str) -> anyhow::Result<Vec<i64>>,
) -> anyhow::Result<Report> {
    run_with_trainer(args, dir, tokenize, &Loop)
}

/// [`run_with`], trained by `trainer`.
///
/// # Errors
/// As [`run`].
pub fn run_with_trainer(
    args: &Args,
    dir: &Path,
    tokenize: &dyn Fn(&str) -> anyhow::Result<Vec<i64>>,
    trainer: &impl Trainer,
) -> anyhow::Result<Report> {
    ensure!(
        args.batch > 0 && args.epochs > 0,
        "--batch and --epochs must be positive"
    );
    let device = Device::default().autodiff();
    // The adapters' random initial values follow the seed too.
    device.seed(args.seed);
    let (train_set, test_set) = Dataset::topic_task(tokenize)?;
    let mut report = match args.method {
        MethodArg::Lora
        | MethodArg::Adalora
        | MethodArg::Rosa
        | MethodArg::Spa
        | MethodArg::Sft => adapters(args, dir, &train_set, &test_set, &device, trainer)?,
        MethodArg::Id3 | MethodArg::Pafi | MethodArg::Bitfit => {
            selective(args, dir, &train_set, &test_set, &device, trainer)?
        }
    };
    report.step_ms = (report.step_ms * 10.0).round() / 10.0;
    if !args.quiet {
        println!(
            "{:?}: {} trainable of {} parameters; held-out accuracy {:.1}% (untrained head) -> {:.1}%; \
             training accuracy {:.1}%; median step {:.1} ms",
            args.method,
            report.trainable.0,
            report.trainable.1,
            report.before * 100.0,
            report.after * 100.0,
            report.train_after * 100.0,
            report.step_ms
        );
    }
    Ok(report)
}

fn all_linear() -> ModuleSelector {
    ModuleSelector::names(["query", "key", "value", "dense"])
}

fn lora_config(args: &Args) -> LoraConfig {
    LoraConfig::new(args.rank, args.alpha, all_linear())
        .with_modules_to_save(["classifier"])
        .with_exclude(ModuleSelector::regex(r"^bert\.pooler\..*"))
}

fn adapters(
    args: &Args,
    dir: &Path,
    train_set: &Dataset,
    test_set: &Dataset,
    device: &Device,
    trainer: &impl Trainer,
) -> anyhow::Result<Report> {
    let steps = train_set.len().div_ceil(args.batch) * args.epochs;
    let sets = (train_set, test_set);
    let pooler = || ModuleSelector::regex(r"^bert\.pooler\..*");
    // Only the configs differ: every method trains through `peft.stepper(steps)`, which holds
    // its controllers (AdaLoRA's allocator, RoSA's scheduler with the warm-up / masks / restart
    // recipe, SFT's selector).
    match args.method {
        MethodArg::Lora => train_peft(lora_config(args), args, dir, sets, device, trainer),
        MethodArg::Rosa | MethodArg::Spa => {
            use peft_rosa::RosaConfig;
            let (rank, schedule) = match args.method {
                MethodArg::Rosa => (args.rank, format!("wl{}", args.rosa_warmup)),
                _ => (0, "spa_only".to_string()),
            };
            let config = RosaConfig::new(rank, args.density, args.alpha, all_linear())
                .with_schedule(&schedule)
                .with_modules_to_save(["classifier"])
                .with_exclude(pooler());
            train_peft(config, args, dir, sets, device, trainer)
        }
        MethodArg::Sft => {
            use peft_sft::{SelectionAlgorithm, SftConfig};
            let bert = BertConfig::from_dir(dir)?;
            let (h, i) = (bert.hidden_size, bert.intermediate_size);
            // Every encoder linear layer (the pooler excluded), as LoRA's targets.
            let target_numel = (4 * h * h + 2 * h * i) * bert.num_hidden_layers;
            let budget = args.budget.unwrap_or(
                (4 * args.rank * (h + h) + 2 * args.rank * (h + i)) * bert.num_hidden_layers,
            );
            ensure!(
                budget > 0 && budget <= target_numel,
                "--budget must be in [1, {target_numel}]"
            );
            // An absolute budget (the reference's `num_tunable_weights`), split over the
            // targets by size when attaching: `int(N · numel / Σ numel)` per layer.
            let density = budget as f64 / target_numel as f64;
            let (r, s) = if steps >= 40 {
                (20, 5)
            } else {
                let r = (steps / 4).max(2);
                (r, (r / 4).max(1))
            };
            let algorithm = match args.selection {
                SelectionArg::Rigl => SelectionAlgorithm::Rigl,
                SelectionArg::Sm3 => SelectionAlgorithm::Sm3,
            };
            let config = SftConfig::new(density, all_linear())
                .with_num_tunable_weights(budget)
                .with_selection(algorithm)
                .with_steps(r, s)
                .with_seed(args.seed)
                .with_modules_to_save(["classifier"])
                .with_exclude(pooler());
            train_peft(config, args, dir, sets, device, trainer)
        }
        _ => {
            use peft_adalora::AdaLoraConfig;
            let ada = AdaLoraConfig::new(all_linear(), steps)
                .with_ranks(args.rank, (args.rank / 2).max(1))
                .with_schedule(steps / 10, steps / 5, 2)
                .with_alpha(args.alpha)
                .with_modules_to_save(["classifier"])
                .with_exclude(pooler());
            train_peft(ada, args, dir, sets, device, trainer)
        }
    }
}

/// The activation-space classifier of adapter type `A`.
type PeftClassifier<A> = Classifier<PeftLinear<A>>;

/// What trains a model once its method is configured, the same for every method: the loop of
/// this example ([`Loop`]) or burn-train's runner ([`crate::supervised`]).
pub trait Trainer {
    /// Train `tuned` (a `PeftModel` or a `SelectiveModel`) for `steps` optimizer steps at `lr`
    /// on the training set; the report's `trainable` is left to the caller.
    ///
    /// # Errors
    /// The method's or the runner's.
    fn train<L: LinearLayer + 'static, T: Tuned<Classifier<L>>>(
        &self,
        tuned: &mut T,
        steps: usize,
        lr: f64,
        sets: (&Dataset, &Dataset),
        args: &Args,
        device: &Device,
    ) -> anyhow::Result<Report>;
}

/// The example's own loop: the method's stepper (`tuned.stepper(steps)`) after each backward.
pub struct Loop;

impl Trainer for Loop {
    fn train<L: LinearLayer + 'static, T: Tuned<Classifier<L>>>(
        &self,
        tuned: &mut T,
        steps: usize,
        lr: f64,
        (train_set, test_set): (&Dataset, &Dataset),
        args: &Args,
        device: &Device,
    ) -> anyhow::Result<Report> {
        let mut stepper = tuned.stepper(steps)?;
        let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
        let model = tuned.tuned_model().clone();
        let (model, report) = train(model, train_set, test_set, args, device, |m, loss| {
            tuned.set_tuned_model(m);
            stepper.train(tuned, &mut optim, lr, loss)?;
            Ok(tuned.tuned_model().clone())
        })?;
        tuned.set_tuned_model(model);
        Ok(report)
    }
}

/// Train an adapter method `C` on the activation-space BERT, the same code for every method:
/// attach, take the method's stepper, train, save in PEFT format when asked (AdaLoRA's rank
/// pattern is already in the config).
fn train_peft<C: Method>(
    config: C,
    args: &Args,
    dir: &Path,
    sets: (&Dataset, &Dataset),
    device: &Device,
    trainer: &impl Trainer,
) -> anyhow::Result<Report> {
    let lr = args.lr.unwrap_or(2e-3);
    let steps = sets.0.len().div_ceil(args.batch) * args.epochs;
    let (bert, bert_config) = encoder::<PeftLinear<C::Adapter>>(args, dir, device)?;
    let model: PeftClassifier<C::Adapter> = Classifier {
        classifier: head(bert_config.hidden_size, args.seed, device),
        bert,
    };
    let mut peft = PeftModel::new(model, config)?;
    let mut report = trainer.train(&mut peft, steps, lr, sets, args, device)?;
    // Counted after training: RoSA's sparse part exists once its masks are generated, and no
    // gradient probe of SFT's is left then.
    report.trainable = peft.trainable_parameters();
    if let Some(out) = &args.out {
        peft.save_pretrained(out, &SaveOptions::default())?;
    }
    Ok(report)
}

fn selective(
    args: &Args,
    dir: &Path,
    train_set: &Dataset,
    test_set: &Dataset,
    device: &Device,
    trainer: &impl Trainer,
) -> anyhow::Result<Report> {
    use peft_selective::{SelectiveConfig, SelectiveModel};
    let lr = args.lr.unwrap_or(1e-3);
    let (bert, config) = encoder::<Linear>(args, dir, device)?;
    let model = Classifier {
        classifier: head(config.hidden_size, args.seed, device),
        bert,
    };
    let steps = train_set.len().div_ceil(args.batch) * args.epochs;
    // The LoRA trainable count at this rank, so the methods compare at equal budget.
    let budget = match args.budget {
        Some(b) => b,
        None => {
            let h = config.hidden_size;
            let per_layer =
                4 * args.rank * (h + h) + 2 * args.rank * (h + config.intermediate_size);
            per_layer * config.num_hidden_layers
        }
    };
    let head_size = config.hidden_size * TOPICS.len() + TOPICS.len();
    let selective = match args.method {
        MethodArg::Id3 => SelectiveConfig::id3(budget + head_size, (steps / 2).max(1)),
        MethodArg::Pafi => SelectiveConfig::pafi(budget + head_size),
        _ => SelectiveConfig::bitfit(),
    }
    .with_choose_all_regex(r"^classifier\.")?;
    let total = peft_core::hosts::parameters(&model)
        .iter()
        .map(|(_, _, n)| n)
        .sum();
    // The selection trains its entries with AdamW without weight decay (as the toolkit); the
    // module optimizer sees no gradient.
    let mut tuned = SelectiveModel::new(model, selective);
    let mut report = trainer.train(&mut tuned, steps, lr, (train_set, test_set), args, device)?;
    report.trainable = (tuned.budget_used(), total);
    if let Some(out) = &args.out {
        tuned
            .summary()?
            .save(out)
            .with_context(|| format!("saving the summary to {}", out.display()))?;
    }
    Ok(report)
}
