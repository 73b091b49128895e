//! `supervised`: the `finetune` task and methods, trained by burn-train's own runner
//! (`SupervisedTraining`: data loaders, loss and accuracy metrics, burn-train's checkpoints,
//! its renderer) instead of the example's loop.
//!
//! The method's controllers run inside the optimizer step through peft-core's `Controlled`
//! model, and their state is part of burn-train's checkpoint of the model, so `--resume EPOCH`
//! continues a stopped run exactly where it stopped.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Int, Tensor};
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::renderer::CliMetricsRenderer;
use burn::train::{
    ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep,
};
use peft_core::Tuned;
use peft_core::learner::{controlled, set_controlled};
use peft_models::LinearLayer;

use crate::finetune::{self, Args, Classifier, Dataset, Report, Trainer, accuracy};

/// Command-line options of `supervised`: `finetune`'s, and where burn-train keeps its run.
#[derive(clap::Parser, Debug, Clone)]
#[command(about = "Fine-tune all-MiniLM-L6-v2 on the topic task with burn-train's runner")]
pub struct SupervisedArgs {
    /// The task, method and training options.
    #[command(flatten)]
    pub run: Args,
    /// burn-train's folder: metrics, logs and `checkpoint/` (default: a temporary folder).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue from burn-train's checkpoint of this epoch in `--run-dir`.
    #[arg(long)]
    pub resume: Option<usize>,
    /// End the run after this epoch, as if it had been interrupted there (the schedules still
    /// plan for `--epochs`; continue later with `--resume`).
    #[arg(long)]
    pub stop_after: Option<usize>,
}

/// A batch of sentences: input ids and attention mask `[batch, seq]`, topics `[batch]`.
#[derive(Clone, Debug)]
pub struct TopicBatch {
    ids: Tensor<2, Int>,
    mask: Tensor<2, Int>,
    labels: Tensor<1, Int>,
}

/// Batches sentence indices of a [`Dataset`].
#[derive(Clone)]
struct TopicBatcher(Dataset);

impl Batcher<usize, TopicBatch> for TopicBatcher {
    fn batch(&self, items: Vec<usize>, device: &Device) -> TopicBatch {
        let (ids, mask, labels) = self.0.batch(&items, device);
        TopicBatch { ids, mask, labels }
    }
}

impl<L: LinearLayer> Classifier<L> {
    fn classification(&self, batch: TopicBatch) -> ClassificationOutput {
        let output = self.forward(batch.ids, batch.mask);
        let loss = CrossEntropyLossConfig::new()
            .init(&output.device())
            .forward(output.clone(), batch.labels.clone());
        ClassificationOutput {
            loss,
            output,
            targets: batch.labels,
        }
    }
}

impl<L: LinearLayer> TrainStep for Classifier<L> {
    type Input = TopicBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TopicBatch) -> TrainOutput<ClassificationOutput> {
        let out = self.classification(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl<L: LinearLayer> InferenceStep for Classifier<L> {
    type Input = TopicBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: TopicBatch) -> ClassificationOutput {
        self.classification(batch)
    }
}

/// Trains with burn-train's `SupervisedTraining` in `dir`, from the checkpoint of epoch
/// `resume` if given.
pub struct BurnTrain {
    /// burn-train's folder.
    pub dir: PathBuf,
    /// The epoch to resume from.
    pub resume: Option<usize>,
    /// The epoch to stop after (default: the last).
    pub stop_after: Option<usize>,
}

/// Mean training loss of `model` over `data` (no gradients).
fn mean_loss<L: LinearLayer>(model: &Classifier<L>, data: &Dataset, device: &Device) -> f32 {
    let model = model.valid();
    let inference = device.clone().inner();
    let all: Vec<usize> = (0..data.len()).collect();
    let mut total = 0.0;
    for chunk in all.chunks(64) {
        let (ids, mask, labels) = data.batch(chunk, &inference);
        let out = model.classification(TopicBatch { ids, mask, labels });
        total += out.loss.into_scalar::<f32>() * chunk.len() as f32;
    }
    total / data.len() as f32
}

impl Trainer for BurnTrain {
    fn train<L: LinearLayer + 'static, T: Tuned<Classifier<L>>>(
        &self,
        tuned: &mut T,
        steps: usize,
        lr: f64,
        (train_set, test_set): (&Dataset, &Dataset),
        args: &Args,
        device: &Device,
    ) -> anyhow::Result<Report> {
        let before = accuracy(tuned.tuned_model(), test_set, device);
        let loss_before = mean_loss(tuned.tuned_model(), train_set, device);
        // One fixed shuffled order, the same every epoch: a resumed run sees the batches the
        // stopped one would have.
        let order = peft_core::rng::shuffled(train_set.len(), args.seed);
        let train_loader = DataLoaderBuilder::new(TopicBatcher(train_set.clone()))
            .batch_size(args.batch)
            .build(InMemDataset::new(order));
        let valid_loader = DataLoaderBuilder::new(TopicBatcher(test_set.clone()))
            .batch_size(64)
            .build(InMemDataset::new((0..test_set.len()).collect::<Vec<_>>()));
        // The last epoch of this launch (`--stop-after` ends it early; the plan stays `--epochs`).
        let last = self.stop_after.unwrap_or(args.epochs).min(args.epochs);
        let mut training = SupervisedTraining::new(&self.dir, train_loader, valid_loader)
            .metric_train_numeric(LossMetric::new())
            .metric_valid_numeric(LossMetric::new())
            .metric_train_numeric(AccuracyMetric::new())
            .metric_valid_numeric(AccuracyMetric::new())
            .with_default_checkpointers()
            .with_application_logger(None)
            .num_epochs(last);
        if args.quiet {
            training = training.renderer(Box::new(CliMetricsRenderer::new()));
        }
        if let Some(epoch) = self.resume {
            training = training.checkpoint(epoch);
        }
        // The method's controllers, checked once here, run in every optimizer step.
        let model = controlled(tuned, steps)?.with_interrupter(training.interrupter());
        let optim = AdamWConfig::new().with_weight_decay(0.01).init();
        let ran =
            last.saturating_sub(self.resume.unwrap_or(0)) * train_set.len().div_ceil(args.batch);
        let start = std::time::Instant::now();
        let result = training.launch(Learner::new(model, optim, lr));
        // burn-train times no single step: the mean over the launch, validation included.
        let step_ms = start.elapsed().as_secs_f64() * 1e3 / ran.max(1) as f64;
        if let Some(e) = result.model.error() {
            bail!("training stopped: {e}");
        }
        if let Some(e) = result.error {
            bail!("training failed: {e:?}");
        }
        // burn-train returns the model in validation mode: back to training mode, so that it
        // counts (and can go on training) as the model it was.
        set_controlled(tuned, result.model.train());
        let model = tuned.tuned_model();
        Ok(Report {
            before,
            after: accuracy(model, test_set, device),
            train_after: accuracy(model, train_set, device),
            loss: (loss_before, mean_loss(model, train_set, device)),
            trainable: (0, 0),
            step_ms,
        })
    }
}

/// Run `args` with burn-train.
///
/// # Errors
/// As [`finetune::run`], or a missing checkpoint to resume from.
pub fn run(args: &SupervisedArgs) -> anyhow::Result<Report> {
    let dir = match &args.run.model {
        Some(dir) => dir.clone(),
        None => peft_models::minilm_dir()?,
    };
    let tokenize = finetune::folder_tokenizer(&dir)?;
    run_with(args, &dir, &tokenize)
}

/// [`run`] with a given tokenizer (tests use a tiny model without one).
///
/// # Errors
/// As [`run`].
pub fn run_with(
    args: &SupervisedArgs,
    dir: &Path,
    tokenize: &dyn Fn(&str) -> anyhow::Result<Vec<i64>>,
) -> anyhow::Result<Report> {
    let temp;
    let run_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => {
            ensure!(args.resume.is_none(), "--resume needs --run-dir");
            temp = tempfile::tempdir().context("a temporary run folder")?;
            temp.path().to_path_buf()
        }
    };
    if let Some(epoch) = args.resume {
        ensure!(
            run_dir
                .join(format!("checkpoint/model-{epoch}.bpk"))
                .exists(),
            "no checkpoint of epoch {epoch} in {}",
            run_dir.display()
        );
    }
    let trainer = BurnTrain {
        dir: run_dir,
        resume: args.resume,
        stop_after: args.stop_after,
    };
    finetune::run_with_trainer(&args.run, dir, tokenize, &trainer)
}
