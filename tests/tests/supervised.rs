//! burn-train's real training runner (`SupervisedTraining`: data loaders, loss metrics, the
//! default checkpointers, the CLI renderer instead of the TUI) trains every method through
//! [`Controlled`], and resuming from its checkpoint equals not stopping, bit for bit on flex:
//! the controllers' state travels in the checkpoint's model record.

use std::path::Path;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::InMemDataset;
use burn::module::Module;
use burn::optim::AdamWConfig;
use burn::optim::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::metric::LossMetric;
use burn::train::renderer::CliMetricsRenderer;
use burn::train::{InferenceStep, Learner, SupervisedTraining, TrainStep};
use peft_adalora::{AdaLoraConfig, AdaLoraModel};
use peft_conformance::{
    Batch, CLASSES, TinyModel, VOCAB, WeightModel, random_torch_weights, spread,
};
use peft_core::learner::{Controlled, controlled, set_controlled};
use peft_core::{ModuleSelector, PeftEmbedding, PeftLinear, hosts};
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
use peft_rosa::{RosaAdapter, RosaConfig, RosaModel};
use peft_selective::{SelectiveConfig, SelectiveModel};
use peft_sft::{SftAdapter, SftConfig, SftModel};

/// Items per epoch (2 per batch: 4 optimizer steps an epoch).
const ITEMS: usize = 8;
const EPOCHS: usize = 4;
const STEPS: usize = EPOCHS * ITEMS / 2;

/// Item `i`: 5 token ids and `5 x CLASSES` regression targets, all a function of `i`.
#[derive(Clone)]
struct ItemBatcher;

impl Batcher<usize, Batch> for ItemBatcher {
    fn batch(&self, items: Vec<usize>, device: &Device) -> Batch {
        let b = items.len();
        let ids: Vec<i64> = items
            .iter()
            .flat_map(|&i| (0..5).map(move |t| ((7 * i + 3 * t + 1) % VOCAB) as i64))
            .collect();
        let targets: Vec<f32> = items
            .iter()
            .flat_map(|&i| spread(11, i, 5 * CLASSES, 1.0))
            .collect();
        Batch {
            ids: Tensor::<2, Int>::from_data(TensorData::new(ids, [b, 5]), device),
            targets: Tensor::from_data(TensorData::new(targets, [b, 5, CLASSES]), device),
        }
    }
}

/// Train `model` with `SupervisedTraining` in `dir` up to epoch `epochs`, from the checkpoint
/// of epoch `from` if given.
fn supervised<M>(
    model: Controlled<M>,
    dir: &Path,
    epochs: usize,
    from: Option<usize>,
) -> Controlled<M>
where
    M: Module
        + TrainStep<Input = Batch, Output = burn::train::RegressionOutput>
        + InferenceStep<Input = Batch, Output = burn::train::RegressionOutput>
        + burn::module::ModuleDisplay
        + 'static,
{
    let loader = || {
        DataLoaderBuilder::new(ItemBatcher)
            .batch_size(2)
            .build(InMemDataset::new((0..ITEMS).collect::<Vec<_>>()))
    };
    let mut training = SupervisedTraining::new(dir, loader(), loader())
        .metric_train_numeric(LossMetric::new())
        .metric_valid_numeric(LossMetric::new())
        .with_default_checkpointers()
        .renderer(Box::new(CliMetricsRenderer::new()))
        .with_application_logger(None)
        .num_epochs(epochs);
    if let Some(epoch) = from {
        training = training.checkpoint(epoch);
    }
    let model = model.with_interrupter(training.interrupter());
    let scheduler = LinearLrSchedulerConfig::new(1e-2, 1e-3, STEPS)
        .init()
        .unwrap();
    let optim = AdamWConfig::new().with_epsilon(1e-8).init();
    let result = training.launch(Learner::new(model, optim, scheduler));
    assert!(result.error.is_none(), "{:?}", result.error);
    result.model
}

/// Every parameter's bits.
fn bits<M: Module>(model: &M) -> Vec<(String, Vec<u32>)> {
    hosts::read_params(model, |_| true)
        .into_iter()
        .map(|(k, v)| (k, v.iter::<f32>().map(f32::to_bits).collect()))
        .collect()
}

/// Train `STEPS` steps straight, and in two launches (stopped after epoch 2, resumed from
/// burn-train's checkpoint of epoch 2 onto a fresh copy of the model as built); check that both
/// end with the same bits and return the straight run's trained model, in and out of its
/// wrapper.
fn straight_and_resumed<M, T>(label: &str, built: T) -> (Controlled<M>, T)
where
    M: Module
        + TrainStep<Input = Batch, Output = burn::train::RegressionOutput>
        + InferenceStep<Input = Batch, Output = burn::train::RegressionOutput>
        + burn::module::ModuleDisplay
        + 'static,
    T: peft_core::Tuned<M> + Clone,
{
    // The adapters' initial values are random: every run starts from a copy.
    let build = || built.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut tuned = build();
    let straight = supervised(
        controlled(&mut tuned, STEPS).unwrap(),
        &dir.path().join("straight"),
        EPOCHS,
        None,
    );
    assert!(straight.error().is_none(), "{label}");
    assert_eq!(straight.step_index(), STEPS, "{label}");

    let stopped = dir.path().join("stopped");
    let mut first = build();
    let half = supervised(controlled(&mut first, STEPS).unwrap(), &stopped, 2, None);
    assert_eq!(half.step_index(), STEPS / 2, "{label}");
    assert!(
        stopped.join("checkpoint/model-2.bpk").exists(),
        "{label}: burn-train wrote its checkpoint"
    );
    drop((first, half));

    let mut fresh = build();
    let resumed = supervised(
        controlled(&mut fresh, STEPS).unwrap(),
        &stopped,
        EPOCHS,
        Some(2),
    );
    assert!(resumed.error().is_none(), "{label}");
    assert_eq!(
        resumed.step_index(),
        STEPS,
        "{label}: the step index came back"
    );

    let (a, b) = (bits(&straight.model), bits(&resumed.model));
    assert_eq!(a.len(), b.len(), "{label}");
    for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb, "{label}");
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs())
            .fold(0.0f32, f32::max);
        assert!(va == vb, "{label}: {ka} differs after the resume by {d}");
    }
    set_controlled(&mut tuned, straight.clone());
    (straight, tuned)
}

fn targets() -> ModuleSelector {
    ModuleSelector::names(["q_proj", "v_proj", "up_proj"])
}

/// The tiny model with [`PeftLinear`]s of adapter `A` (activation space). Its linear weights
/// are transposed views of the torch layout, as a model loaded from a file keeps them; a
/// resume leaves frozen base weights as they are.
fn activation_base<A: peft_core::Adapter>() -> TinyModel<PeftLinear<A>, PeftEmbedding<A>> {
    let device = Device::flex().autodiff();
    TinyModel::from_torch(&random_torch_weights(2, &device), &device)
}

fn weight_base() -> WeightModel {
    let device = Device::flex().autodiff();
    TinyModel::from_torch(&random_torch_weights(2, &device), &device)
}

/// The model with its parameters stored contiguously. A resumed model gets its trained
/// parameters contiguous from the record; a base weight trained in place (the selective
/// methods) that was a transposed view would be read in another summation order by the
/// products after the resume: the same values to about 1e-9, not to the bit.
fn contiguous<M: Module>(model: M) -> M {
    model.clone().load_record(model.into_record())
}

/// Values of the adapters' parameters whose path ends with `suffix`.
fn adapter_values<M: Module>(model: &M, suffix: &str) -> Vec<f32> {
    hosts::read_params(model, |k| k.ends_with(suffix))
        .into_values()
        .flat_map(|v| v.iter::<f32>().collect::<Vec<_>>())
        .collect()
}

#[test]
fn lora_resumes_from_a_burn_train_checkpoint_bit_for_bit() {
    let (trained, _) = straight_and_resumed(
        "lora",
        LoraModel::new(
            activation_base::<LoraAdapter>(),
            LoraConfig::new(4, 8.0, targets()),
        )
        .unwrap(),
    );
    // The adapters trained: lora_B left zero.
    assert!(
        adapter_values(&trained.model, "lora_b")
            .iter()
            .any(|v| *v != 0.0)
    );
}

#[test]
fn adalora_resumes_from_a_burn_train_checkpoint_bit_for_bit() {
    // Masking from step 3 to step 12, stopped at 8: inside the allocation schedule.
    let config = AdaLoraConfig::new(targets(), STEPS)
        .with_ranks(4, 2)
        .with_schedule(3, 4, 1);
    let (_, peft) =
        straight_and_resumed("adalora", AdaLoraModel::new(weight_base(), config).unwrap());
    let pattern = peft.adapters()["default"]
        .config
        .rank_pattern
        .clone()
        .unwrap();
    let kept: usize = pattern.values().flatten().filter(|k| **k).count();
    // 6 matrices (2 layers x 3 targets) at target_r 2: the budget is 12 of 24 triplets.
    assert_eq!(kept, 12, "{pattern:?}");
}

#[test]
fn rosa_resumes_from_a_burn_train_checkpoint_bit_for_bit() {
    // LoRA warm-up for 6 steps, masks, restart: the stop at step 8 is after the masks, so the
    // resumed model gets its sparse structure from the checkpoint.
    let config = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl6");
    let (trained, _) = straight_and_resumed(
        "rosa",
        RosaModel::new(activation_base::<RosaAdapter>(), config).unwrap(),
    );
    let spa = adapter_values(&trained.model, "spa_values");
    assert!(!spa.is_empty(), "masks were generated");
    assert!(spa.iter().any(|v| *v != 0.0), "the sparse values trained");
}

#[test]
fn sft_resumes_from_a_burn_train_checkpoint_bit_for_bit() {
    // Reselection every 3 steps (RigL windows of 2): the stop at step 8 is inside a window,
    // after two reselections changed the delta positions.
    let config = SftConfig::new(0.1, targets()).with_steps(3, 2);
    let (trained, _) = straight_and_resumed(
        "sft",
        SftModel::new(activation_base::<SftAdapter>(), config).unwrap(),
    );
    assert!(
        adapter_values(&trained.model, "delta_values")
            .iter()
            .any(|v| *v != 0.0)
    );
}

#[test]
fn id3_resumes_from_a_burn_train_checkpoint_bit_for_bit() {
    let (_, selective) = straight_and_resumed(
        "id3",
        SelectiveModel::new(contiguous(weight_base()), SelectiveConfig::id3(64, STEPS)),
    );
    assert_eq!(selective.budget_used(), 64);
}

#[test]
fn a_checkpoint_of_another_method_stops_the_resume_with_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut lora = LoraModel::new(
        activation_base::<LoraAdapter>(),
        LoraConfig::new(4, 8.0, targets()),
    )
    .unwrap();
    supervised(lora.controlled(STEPS).unwrap(), dir.path(), 1, None);

    // The record's stepper state has no controller; SFT's stepper has one.
    let mut sft = SftModel::new(
        activation_base::<SftAdapter>(),
        SftConfig::new(0.1, targets()),
    )
    .unwrap();
    let model = sft.controlled(STEPS).unwrap();
    let before = bits(&model.model);
    let resumed = supervised(model, dir.path(), EPOCHS, Some(1));
    let err = resumed.error().expect("the error is kept");
    assert!(err.to_string().contains("controllers"), "{err}");
    assert_eq!(resumed.step_index(), 0, "no step ran");
    assert_eq!(
        bits(&resumed.model),
        before,
        "nothing was loaded or trained"
    );
}

/// The record of a `Controlled` model (what burn-train's checkpointer writes) holds the
/// trained parameters and the controllers' state, not the frozen base.
#[test]
fn a_checkpoint_holds_the_adapters_and_the_state_not_the_frozen_base() {
    let mut lora = LoraModel::new(
        activation_base::<LoraAdapter>(),
        LoraConfig::new(4, 8.0, targets()),
    )
    .unwrap();
    let model = lora.controlled(STEPS).unwrap();
    let params = hosts::parameters(&model.model);
    let trainable = params.iter().filter(|p| p.1).count();
    // q, v, up in 2 layers, lora_a and lora_b each; the base has 2 x 6 linears + embedding + head.
    assert_eq!(trainable, 12);
    assert!(params.len() > 3 * trainable);
    // The trained tensors and `peft_state.len` / `peft_state.bytes`.
    assert_eq!(model.clone().into_record().len(), trainable + 2);
}
