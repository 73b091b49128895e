//! burn-train integration: a `Learner` over a [`Controlled`] LoRA model runs the controllers
//! around every optimizer step, in order, and trains only the adapters.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor, TensorData};
use burn::train::Learner;
use peft_adalora::{AdaLoraConfig, AdaLoraModel};
use peft_conformance::WeightModel;
use peft_conformance::{
    ActivationModel, Batch, CLASSES, TinyModel, random_torch_weights, token_ids,
};
use peft_core::learner::Controlled;
use peft_core::step::{Controller, StepInfo, Stepper};
use peft_core::{ModuleSelector, PeftError, hosts};
use peft_lora::{LoraConfig, LoraModel};
use peft_rosa::{RosaAdapter, RosaConfig, RosaMasks, RosaModel};

/// Records the order of calls and what it saw.
struct Recorder {
    log: Arc<Mutex<Vec<String>>>,
}

impl<M: Module> Controller<M> for Recorder {
    fn before_optimizer(
        &mut self,
        info: StepInfo,
        model: &M,
        grads: &mut GradientsParams,
    ) -> peft_core::Result<()> {
        let trainable = hosts::parameters(model).iter().filter(|p| p.1).count();
        self.log.lock().unwrap().push(format!(
            "before {} grads={} trainable={trainable}",
            info.step,
            grads.len()
        ));
        Ok(())
    }

    fn after_optimizer(&mut self, info: StepInfo, model: M) -> peft_core::Result<M> {
        self.log
            .lock()
            .unwrap()
            .push(format!("after {}", info.step));
        Ok(model)
    }
}

#[test]
fn learner_runs_controllers_around_each_optimizer_step() {
    let device = Device::flex().autodiff();
    let base: ActivationModel = TinyModel::from_torch(&random_torch_weights(2, &device), &device);
    let config = LoraConfig::new(4, 8.0, ModuleSelector::names(["q_proj", "v_proj"]));
    let peft = LoraModel::new(base, config).unwrap();
    let before = hosts::read_params(peft.model(), |_| true);
    let log = Arc::new(Mutex::new(Vec::new()));
    let stepper = Stepper::new().with(Recorder { log: log.clone() });
    let model = Controlled::new(peft.model().clone(), stepper);
    let optim = AdamWConfig::new().with_epsilon(1e-8).init();
    let mut learner = Learner::new(model, optim, 1e-2);
    learner.lr_step();
    let batch = batch(&device);
    for _ in 0..3 {
        let out = learner.train_step(batch.clone());
        learner.optimizer_step(out.grads);
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 6, "{log:?}");
    // 2 layers x (q, v) x (lora_a, lora_b) = 8 trainable tensors, all with gradients.
    for step in 0..3 {
        assert_eq!(log[2 * step], format!("before {step} grads=8 trainable=8"));
        assert_eq!(log[2 * step + 1], format!("after {step}"));
    }
    let trained = learner.model();
    assert_eq!(trained.step_index(), 3);
    let after = hosts::read_params(&trained.into_inner(), |_| true);
    let mut moved_adapters = 0;
    for (path, old) in &before {
        let new = &after[path];
        let moved = old
            .iter::<f32>()
            .zip(new.iter::<f32>())
            .any(|(x, y)| x != y);
        if path.contains(".peft.") {
            moved_adapters += moved as usize;
        } else {
            assert!(!moved, "base parameter {path} changed");
        }
    }
    assert_eq!(moved_adapters, 8);
}

/// Fails from step `from` on.
struct Failing {
    from: usize,
}

impl<M: Module> Controller<M> for Failing {
    fn after_optimizer(&mut self, info: StepInfo, model: M) -> peft_core::Result<M> {
        if info.step >= self.from {
            return Err(PeftError::Unsupported(format!(
                "failed at step {}",
                info.step
            )));
        }
        Ok(model)
    }
}

/// Targets from a fixed seed (burn's global RNG is shared by the tests running in parallel).
fn batch(device: &Device) -> Batch {
    let values = peft_conformance::spread(5, 0, 2 * 5 * CLASSES, 1.0);
    Batch {
        ids: token_ids(device),
        targets: Tensor::from_data(TensorData::new(values, [2, 5, CLASSES]), device),
    }
}

#[test]
fn a_controller_error_in_a_learner_is_an_error_not_a_panic() {
    let device = Device::flex().autodiff();
    let base: ActivationModel = TinyModel::from_torch(&random_torch_weights(2, &device), &device);
    let config = LoraConfig::new(4, 8.0, ModuleSelector::names(["q_proj", "v_proj"]));
    let peft = LoraModel::new(base, config).unwrap();
    let interrupter = burn::train::Interrupter::new();
    let model = Controlled::new(
        peft.model().clone(),
        Stepper::new().with(Failing { from: 1 }),
    )
    .with_interrupter(interrupter.clone());
    let mut learner = Learner::new(model, AdamWConfig::new().init(), 1e-2);
    learner.lr_step();
    let batch = batch(&device);
    let mut after_first = None;
    for step in 0..3 {
        let out = learner.train_step(batch.clone());
        learner.optimizer_step(out.grads);
        let params = hosts::read_params(&learner.model().into_inner(), |p| p.contains(".peft."));
        match step {
            0 => after_first = Some(params),
            // The failed step and the ones after it change nothing.
            _ => assert_eq!(Some(params), after_first, "step {step}"),
        }
    }
    assert!(interrupter.should_stop(), "the run is stopped");
    let trained = learner.model();
    assert_eq!(trained.step_index(), 1);
    let err = trained.error().expect("the error is kept");
    assert!(err.to_string().contains("failed at step 1"), "{err}");
}

#[test]
fn adalora_in_a_learner_allocates_and_writes_its_rank_pattern() {
    let device = Device::flex().autodiff();
    let base: WeightModel = TinyModel::from_torch(&random_torch_weights(2, &device), &device);
    let config = AdaLoraConfig::new(ModuleSelector::names(["q_proj", "v_proj"]), 6)
        .with_ranks(4, 2)
        .with_schedule(1, 2, 1);
    let mut peft = AdaLoraModel::new(base, config).unwrap();
    let model = peft.controlled(6).unwrap();
    let mut learner = Learner::new(model, AdamWConfig::new().init(), 1e-2);
    learner.lr_step();
    let batch = batch(&device);
    for _ in 0..6 {
        let out = learner.train_step(batch.clone());
        learner.optimizer_step(out.grads);
    }
    let trained = learner.model();
    assert!(trained.error().is_none());
    peft.set_controlled(trained);
    let pattern = peft.adapters()["default"]
        .config
        .rank_pattern
        .clone()
        .unwrap();
    let kept: usize = pattern.values().flatten().filter(|k| **k).count();
    // 4 matrices, target_r 2: at most 8 of 16 triplets.
    assert!(kept <= 8, "{kept}");
}

/// Records the micro-batches reported to it.
struct MicroBatches {
    log: Arc<Mutex<Vec<String>>>,
}

impl<M: Module> Controller<M> for MicroBatches {
    fn after_backward(
        &mut self,
        step: usize,
        micro_batch: usize,
        _model: &M,
        grads: &GradientsParams,
    ) -> peft_core::Result<()> {
        self.log.lock().unwrap().push(format!(
            "backward {step}.{micro_batch} grads={}",
            grads.len()
        ));
        Ok(())
    }

    fn before_optimizer(
        &mut self,
        info: StepInfo,
        _model: &M,
        _grads: &mut GradientsParams,
    ) -> peft_core::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(format!("before {}", info.step));
        Ok(())
    }
}

/// burn-train's gradient accumulation (several `train_step`s, one `optimizer_step`): every
/// backward pass reaches the controllers as a micro-batch, before the step's optimizer.
#[test]
fn a_learner_reports_every_micro_batch() {
    let device = Device::flex().autodiff();
    let base: ActivationModel = TinyModel::from_torch(&random_torch_weights(2, &device), &device);
    let config = LoraConfig::new(4, 8.0, ModuleSelector::names(["q_proj", "v_proj"]));
    let peft = LoraModel::new(base, config).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stepper = Stepper::new().with(MicroBatches { log: log.clone() });
    let mut learner = Learner::new(
        Controlled::new(peft.model().clone(), stepper),
        AdamWConfig::new().init(),
        1e-2,
    );
    learner.lr_step();
    let batch = batch(&device);
    for _ in 0..2 {
        let mut acc = burn::optim::GradientsAccumulator::new();
        for _ in 0..3 {
            let out = learner.train_step(batch.clone());
            acc.accumulate(&learner.model(), out.grads);
        }
        learner.optimizer_step(acc.grads());
    }
    let log = log.lock().unwrap().clone();
    let want: Vec<String> = [0, 1]
        .iter()
        .flat_map(|s| {
            (0..3)
                .map(move |m| format!("backward {s}.{m} grads=8"))
                .chain([format!("before {s}")])
        })
        .collect();
    assert_eq!(log, want);
}

/// RoSA's two-run recipe from the config alone (the reference's README): run 1 (`wl1`,
/// `mask_save_path`, `terminate_after_mask_generation`) stops the `Learner` once the masks are
/// saved, after the warm-up and collection steps; run 2 (`default`, `mask_load_path`) starts
/// with those masks in every layer and trains both parts from its first step.
#[test]
fn rosa_two_run_recipe_from_the_config_alone() {
    type Rosa =
        TinyModel<peft_core::PeftLinear<RosaAdapter>, peft_core::PeftEmbedding<RosaAdapter>>;
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("masks.safetensors");
    let targets = ModuleSelector::names(["q_proj", "v_proj"]);
    let base = || -> Rosa { TinyModel::from_torch(&random_torch_weights(2, &device), &device) };
    let batch = batch(&device);

    let first = RosaConfig::new(4, 0.1, 8.0, targets.clone())
        .with_schedule("wl1")
        .with_mask_save_path(&file)
        .with_terminate_after_mask_generation(true);
    let mut peft = RosaModel::new(base(), first).unwrap();
    let interrupter = burn::train::Interrupter::new();
    let model = peft
        .controlled(10)
        .unwrap()
        .with_interrupter(interrupter.clone());
    let mut learner = Learner::new(model, AdamWConfig::new().init(), 1e-2);
    learner.lr_step();
    let mut steps = 0;
    while !interrupter.should_stop() && steps < 10 {
        let out = learner.train_step(batch.clone());
        learner.optimizer_step(out.grads);
        steps += 1;
    }
    assert_eq!(
        steps, 2,
        "one warm-up step, one collection step, then the run ends"
    );
    assert!(learner.model().error().is_none());
    let saved = RosaMasks::load(&file).expect("the masks are saved");
    assert_eq!(saved.iter().count(), 4, "two layers x (q, v)");

    let second = RosaConfig::new(4, 0.1, 8.0, targets)
        .with_schedule("default")
        .with_mask_load_path(&file);
    let mut peft = RosaModel::new(base(), second).unwrap();
    let mut stepper = peft.stepper(3).unwrap();
    let mut optim = AdamWConfig::new().init();
    for _ in 0..2 {
        let grads = burn::train::TrainStep::step(peft.model(), batch.clone()).grads;
        stepper
            .train_grads(&mut peft, &mut optim, 1e-2, grads)
            .unwrap();
    }
    assert!(!stepper.should_stop());
    let adapters =
        peft_core::hosts::collect(peft.model(), |h: &peft_core::HostView<'_, RosaAdapter>| {
            h.slot.get("default").map(|a| (h.path.clone(), a.clone()))
        });
    assert_eq!(adapters.len(), 4);
    for (path, a) in adapters {
        assert_eq!(
            a.spa_csr().unwrap().layout.structure(),
            saved.get(&path).unwrap(),
            "{path}"
        );
        assert!(a.probe.is_none(), "{path}: no collection");
        let values = a
            .spa_values
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert!(
            values.iter().any(|v| *v != 0.0),
            "{path}: the sparse part trains from step 0"
        );
    }
}
