//! One training API for every method: `stepper(total_steps)` on the model gives the step runner
//! with the method's controllers, `Stepper::train` runs it, and the same loop with a bare
//! `Stepper::new()` is refused for every method that needs a controller.
//!
//! The test is generic over the cases ([`drive`]); each case says how to see that its controller
//! really acted: AdaLoRA's ranks shrink to the budget (and the pattern is in the config), RoSA's
//! masks appear after the warm-up and the LoRA factors restart, SFT reselects its indices, ID3
//! unmasks `u(t)` entries per step.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::lr_scheduler::exponential::ExponentialLrSchedulerConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use peft_adalora::{AdaLoraAdapter, AdaLoraConfig};
use peft_conformance::{TinyModel, random_torch_weights, token_ids};
use peft_core::model::adapters_of;
use peft_core::step::{Stepper, Tuned};
use peft_core::{
    Adapter, Method, ModuleSelector, PeftEmbedding, PeftError, PeftLinear, PeftModel, hosts,
};
use peft_lora::LoraConfig;
use peft_rosa::{InitialMasks, MaskedAdapters, RosaAdapter, RosaConfig};
use peft_selective::{SelectiveConfig, SelectiveModel};
use peft_sft::{SftAdapter, SftConfig};

type Activation<A> = TinyModel<PeftLinear<A>, PeftEmbedding<A>>;
type Plain = TinyModel<burn::nn::Linear, burn::nn::Embedding>;

fn device() -> Device {
    Device::flex().autodiff()
}

fn loss<P: peft_conformance::Proj, E: peft_conformance::Emb>(m: &TinyModel<P, E>) -> Tensor<1> {
    let dev = device();
    (m.forward(token_ids(&dev)) - 0.5)
        .powi_scalar(2)
        .mean()
        .reshape([1])
}

fn base<A: Adapter>() -> Activation<A> {
    let dev = device();
    TinyModel::from_torch(&random_torch_weights(3, &dev), &dev)
}

fn peft<A: Adapter, C: Method<Adapter = A>>(config: C) -> PeftModel<Activation<A>, C> {
    PeftModel::new(base(), config).unwrap()
}

/// Train `make()` for `steps` steps through its own stepper, calling `check(step, model)` before
/// the first (step 0) and after each; then check that a bare stepper is refused (or not, when
/// no controller is needed).
fn drive<M: Module, T: Tuned<M> + HasLoss>(
    label: &str,
    make: impl Fn() -> T,
    steps: usize,
    needs_controller: bool,
    mut check: impl FnMut(usize, &T),
) {
    let mut tuned = make();
    let mut stepper = tuned.stepper(steps).unwrap();
    check(0, &tuned);
    let mut optim = SgdConfig::new().init();
    for step in 0..steps {
        let l = tuned.loss();
        stepper.train(&mut tuned, &mut optim, 1e-2, l).unwrap();
        check(step + 1, &tuned);
    }
    assert_eq!(stepper.step_index(), steps, "{label}");

    let mut tuned = make();
    let mut bare = Stepper::new();
    let l = tuned.loss();
    let result = bare.train(&mut tuned, &mut optim, 1e-2, l);
    if needs_controller {
        assert!(
            matches!(result, Err(PeftError::MissingController { .. })),
            "{label}: a stepper without the controller must be refused, got {result:?}"
        );
    } else {
        result.unwrap();
    }
}

/// The loss of a case's model.
trait HasLoss {
    fn loss(&self) -> Tensor<1>;
}

impl<A: Adapter, C: Method<Adapter = A>> HasLoss for PeftModel<Activation<A>, C> {
    fn loss(&self) -> Tensor<1> {
        loss(self.model())
    }
}

impl HasLoss for SelectiveModel<Plain> {
    fn loss(&self) -> Tensor<1> {
        loss(self.model())
    }
}

fn targets() -> ModuleSelector {
    ModuleSelector::names(["q_proj", "v_proj", "down_proj"])
}

fn changed(a: &BTreeMap<String, TensorData>, b: &BTreeMap<String, TensorData>) -> usize {
    a.iter()
        .map(|(k, x)| {
            x.iter::<f32>()
                .zip(b[k].iter::<f32>())
                .filter(|(p, q)| p != q)
                .count()
        })
        .sum()
}

#[test]
fn every_method_trains_through_its_own_stepper_and_refuses_a_bare_one() {
    // LoRA: no controller; the bare stepper is fine.
    let make = || peft(LoraConfig::new(4, 8.0, targets()));
    let mut start = BTreeMap::new();
    drive("lora", make, 3, false, |step, t| {
        let now = hosts::read_params(t.model(), |p| p.contains(".peft."));
        if step == 0 {
            start = now;
        } else {
            assert!(changed(&start, &now) > 0, "lora trains");
        }
    });

    // AdaLoRA: 6 matrices, init_r 4, target_r 2: at most 12 triplets kept at the end, and the
    // pattern is in the config without any call.
    let config = AdaLoraConfig::new(targets(), 10)
        .with_ranks(4, 2)
        .with_schedule(2, 3, 1);
    drive(
        "adalora",
        || peft(config.clone()),
        10,
        true,
        |step, t| {
            let pattern = t.adapters()["default"].config.rank_pattern.clone();
            if step <= 2 {
                assert!(pattern.is_none(), "adalora: no masking before tinit");
            }
            if step == 10 {
                let pattern = pattern.expect("adalora: the rank pattern is in the config");
                let kept: usize = pattern.values().flatten().filter(|k| **k).count();
                assert_eq!(pattern.len(), 6);
                assert!(kept <= 12 && kept > 0, "adalora: {kept} triplets kept");
                // The dropped triplets' singular values are zero in the model (the budget is
                // global: a matrix may keep all four).
                let zeros: usize = adapters_of::<_, AdaLoraAdapter>(t.model(), "default")
                    .iter()
                    .map(|(_, _, a)| {
                        let e = a.lora_e.val().into_data().try_to_vec::<f32>().unwrap();
                        e.iter().filter(|v| **v == 0.0).count()
                    })
                    .sum();
                assert!(zeros >= 24 - kept, "adalora: {zeros} zeroed, {kept} kept");
            }
        },
    );

    // RoSA wl2: two LoRA steps, one collection step, then masks and the restart of the
    // factors from their initial values; then both parts train.
    let config = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    let mut initial = Vec::new();
    let factors = |a: &RosaAdapter| {
        let v = |p: &Option<burn::module::Param<Tensor<2>>>| -> Vec<f32> {
            p.as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        (v(&a.lora_a), v(&a.lora_b))
    };
    drive(
        "rosa",
        || peft(config.clone()),
        5,
        true,
        |step, t| {
            let now = adapters_of::<_, RosaAdapter>(t.model(), "default");
            if step == 0 {
                initial = now;
                return;
            }
            for ((path, _, a0), (_, _, a)) in initial.iter().zip(&now) {
                assert_eq!(
                    a.has_mask(),
                    step >= 3,
                    "rosa: {path} mask after step {step}"
                );
                match step {
                    1 | 2 => assert_ne!(factors(a0), factors(a), "rosa: warm-up trains LoRA"),
                    3 => {
                        assert_eq!(factors(a0), factors(a), "rosa: {path} restarts");
                        assert!(a.spa_csr().unwrap().layout.nnz() > 0);
                    }
                    _ => {
                        let spa: Vec<f32> = a
                            .spa_values
                            .as_ref()
                            .unwrap()
                            .val()
                            .into_data()
                            .try_to_vec::<f32>()
                            .unwrap();
                        assert!(spa.iter().any(|v| *v != 0.0), "rosa: sparse values train");
                    }
                }
            }
        },
    );

    // SFT: R = 4, S = 2: reselections after update steps 2 (all slots) and 6 (a decayed
    // share); the indices change exactly then.
    let config = SftConfig::new(0.1, targets()).with_steps(4, 2);
    let mut prev = Vec::new();
    drive(
        "sft",
        || peft(config.clone()),
        8,
        true,
        |step, t| {
            let now: Vec<Vec<u64>> = adapters_of::<_, SftAdapter>(t.model(), "default")
                .into_iter()
                .map(|(_, _, a)| a.indices())
                .collect();
            if step > 0 {
                let moved = prev.iter().zip(&now).filter(|(a, b)| a != b).count();
                if step == 2 || step == 6 {
                    assert!(moved > 0, "sft: reselected after step {step}");
                } else {
                    assert_eq!(moved, 0, "sft: no reselection after step {step}");
                }
            }
            prev = now;
        },
    );

    // ID3: budget 12 over 3 steps: 4 new entries per step, then no more.
    let make = || {
        let dev = device();
        let model: Plain = TinyModel::from_torch(&random_torch_weights(3, &dev), &dev);
        let model = hosts::set_trainable(model, |_| Some(true));
        SelectiveModel::new(model, SelectiveConfig::id3(12, 3))
    };
    let mut start = BTreeMap::new();
    drive("id3", make, 5, true, |step, t| {
        let now = hosts::read_params(t.model(), |_| true);
        if step == 0 {
            start = now;
            return;
        }
        assert_eq!(
            changed(&start, &now),
            4 * step.min(3),
            "id3: entries trained after step {step}"
        );
    });
}

/// One SFT step (or selective step) from the same start at `lrs`; returns the trained values.
fn sft_run(lrs: &[burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate]) -> Vec<f32> {
    let config = SftConfig::new(0.1, targets());
    let mut t = peft(config);
    let mut stepper = t.stepper(lrs.len()).unwrap();
    let mut optim = SgdConfig::new().init();
    for lr in lrs {
        let l = t.loss();
        stepper.train(&mut t, &mut optim, lr.clone(), l).unwrap();
    }
    adapters_of::<_, SftAdapter>(t.model(), "default")
        .into_iter()
        .flat_map(|(_, _, a)| a.values())
        .collect()
}

fn id3_run(lrs: &[burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate]) -> Vec<f32> {
    let dev = device();
    let model: Plain = TinyModel::from_torch(&random_torch_weights(3, &dev), &dev);
    let model = hosts::set_trainable(model, |_| Some(true));
    let start = hosts::read_params(&model, |_| true);
    let mut t = SelectiveModel::new(model, SelectiveConfig::id3(12, 3));
    let mut stepper = t.stepper(lrs.len()).unwrap();
    let mut optim = SgdConfig::new().init();
    for lr in lrs {
        let l = t.loss();
        stepper.train(&mut t, &mut optim, lr.clone(), l).unwrap();
    }
    let now = hosts::read_params(t.model(), |_| true);
    start
        .iter()
        .flat_map(|(k, x)| {
            x.iter::<f32>()
                .zip(now[k].iter::<f32>())
                .map(|(a, b)| b - a)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_step_learning_rate_reaches_sft_deltas_and_selective_entries() {
    let lr = |v: f64| v.into();
    for (label, run) in [
        ("sft", sft_run as fn(&[_]) -> Vec<f32>),
        ("id3", id3_run as fn(&[_]) -> Vec<f32>),
    ] {
        // First Adam step: |Δ| = lr (bias-corrected m/√v = sign g), so it follows the lr.
        let small = run(&[lr(1e-3)]);
        let large = run(&[lr(4e-3)]);
        let moved: Vec<(f32, f32)> = small
            .iter()
            .zip(&large)
            .filter(|(a, _)| **a != 0.0)
            .map(|(a, b)| (*a, *b))
            .collect();
        assert!(!moved.is_empty(), "{label}: something trained");
        for (a, b) in &moved {
            assert!((a.abs() - 1e-3).abs() < 1e-4, "{label}: |Δ| {a} at lr 1e-3");
            assert!(
                (b / a - 4.0).abs() < 1e-2,
                "{label}: {b} / {a} at 4x the lr"
            );
        }

        // A burn scheduler's output goes in unchanged: the same as its rates given by hand.
        let mut sched = ExponentialLrSchedulerConfig::new(1e-2, 0.5).init().unwrap();
        let scheduled: Vec<_> = (0..3).map(|_| sched.step()).collect();
        let by_hand = run(&[lr(1e-2), lr(5e-3), lr(2.5e-3)]);
        assert_eq!(run(&scheduled), by_hand, "{label}: scheduler");
        assert_ne!(
            run(&[lr(1e-2), lr(1e-2), lr(1e-2)]),
            by_hand,
            "{label}: the lr matters"
        );
    }
}

/// A step's gradients can also be given directly (gradient accumulation), with the same checks.
#[test]
fn train_grads_is_refused_without_the_controller_too() {
    let config = SftConfig::new(0.1, targets());
    let mut t = peft(config);
    let grads = GradientsParams::from_grads(t.loss().backward(), t.model());
    let mut optim = SgdConfig::new().init();
    let result = Stepper::new().train_grads(&mut t, &mut optim, 1e-2, grads);
    assert!(
        matches!(result, Err(PeftError::MissingController { ref adapter, .. }) if adapter == "default")
    );
}

/// Train `peft` with `stepper` for the steps `from..to` (plain SGD: no optimizer state).
fn steps<A: Adapter, C: Method<Adapter = A>>(
    peft: &mut PeftModel<Activation<A>, C>,
    stepper: &mut Stepper<Activation<A>>,
    n: usize,
) {
    let mut optim = SgdConfig::new().init();
    for _ in 0..n {
        let l = peft.loss();
        stepper.train(peft, &mut optim, 1e-2, l).unwrap();
    }
}

/// Stop after `stop` of `total` steps (adapter files + the stepper's controller state), resume
/// on a fresh base, finish: the adapters equal those of a run that did not stop, bit for bit
/// (`tol = 0`) or within `tol`.
fn resume_equals_not_stopping<A: Adapter, C: Method<Adapter = A>>(
    label: &str,
    config: C,
    total: usize,
    stop: usize,
    tol: f32,
) {
    let dev = device();
    let adapters =
        |p: &PeftModel<Activation<A>, C>| hosts::read_params(p.model(), |k| k.contains(".peft."));

    // Both runs start from the same adapters (their initial values are random).
    let mut straight = peft(config);
    let mut first = straight.clone();
    let mut stepper = straight.stepper(total).unwrap();
    steps(&mut straight, &mut stepper, total);

    let mut stepper = first.stepper(total).unwrap();
    steps(&mut first, &mut stepper, stop);
    let dir = tempfile::tempdir().unwrap();
    first
        .save_pretrained(dir.path(), &peft_core::SaveOptions::default())
        .unwrap();
    stepper.save_state(&dir.path().join("state")).unwrap();
    drop((first, stepper));

    let options = peft_core::LoadOptions {
        is_trainable: true,
        ..Default::default()
    };
    let base = base();
    let mut resumed =
        PeftModel::<Activation<A>, C>::from_pretrained(base, dir.path(), &options).unwrap();
    let mut stepper = resumed.stepper(total).unwrap();
    stepper
        .resume(&mut resumed, &dir.path().join("state"), &dev)
        .unwrap();
    assert_eq!(stepper.step_index(), stop, "{label}");
    steps(&mut resumed, &mut stepper, total - stop);

    let (a, b) = (adapters(&straight), adapters(&resumed));
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{label}"
    );
    for (k, v) in &a {
        let (x, y): (Vec<f32>, Vec<f32>) = (v.iter().collect(), b[k].iter().collect());
        let diff = x
            .iter()
            .zip(&y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(
            same || diff <= tol,
            "{label}: {k} differs after the resume by {diff}"
        );
    }
}

#[test]
fn resuming_from_adapter_files_and_stepper_state_equals_not_stopping() {
    // RoSA: stopped in the warm-up (the restart values come from the state) and after the masks.
    let rosa = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    resume_equals_not_stopping("rosa warm-up", rosa.clone(), 6, 1, 0.0);
    // After the masks: the resumed adapter's sparse layout is the one read from the file.
    resume_equals_not_stopping("rosa masks", rosa, 6, 4, 0.0);
    // SFT: stopped inside a RigL window (candidate pool in the state) and between windows.
    let sft = SftConfig::new(0.1, targets()).with_steps(4, 2);
    resume_equals_not_stopping("sft window", sft.clone(), 8, 1, 0.0);
    resume_equals_not_stopping("sft", sft, 8, 3, 0.0);
    // AdaLoRA: stopped before the first masking (a saved adapter is truncated to the rank
    // pattern, as PEFT's, so later stops do not resume the untruncated matrices).
    let ada = AdaLoraConfig::new(targets(), 8)
        .with_ranks(4, 2)
        .with_schedule(2, 2, 1);
    resume_equals_not_stopping("adalora", ada, 8, 2, 0.0);
}

/// RoSA masks given when attaching (runtime state, not in the config) are known to the stepper
/// the model gives: a `wl2` run then trains LoRA alone for two steps and both parts from step
/// 2, with no collection step, no new masks and no restart of the factors.
#[test]
fn rosa_masks_given_when_attaching_skip_collection_and_restart() {
    let dev = device();
    let config = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    let base = TinyModel::from_torch(&random_torch_weights(3, &dev), &dev);
    let mut peft: PeftModel<Activation<RosaAdapter>, _> =
        PeftModel::new_with_masks(base, config, InitialMasks::Random(11)).unwrap();
    let spa = |a: &RosaAdapter| -> Vec<f32> {
        let values = a.spa_values.as_ref().unwrap().val();
        values.into_data().try_to_vec::<f32>().unwrap()
    };
    let start = adapters_of::<_, RosaAdapter>(peft.model(), "default");
    assert!(!start.is_empty());
    let mut stepper = peft.stepper(3).unwrap();
    let mut optim = SgdConfig::new().init();
    for step in 0..3 {
        let l = peft.loss();
        stepper.train(&mut peft, &mut optim, 1e-2, l).unwrap();
        let now = adapters_of::<_, RosaAdapter>(peft.model(), "default");
        for ((path, _, a0), (_, _, a)) in start.iter().zip(&now) {
            assert!(a.probe.is_none(), "{path}: no gradient collection");
            assert_eq!(
                a.spa_csr().unwrap().layout.structure(),
                a0.spa_csr().unwrap().layout.structure(),
                "{path}: the given masks stay"
            );
            assert_ne!(
                a.lora_b.as_ref().unwrap().val().into_data(),
                a0.lora_b.as_ref().unwrap().val().into_data(),
                "{path}: no restart after step {step}"
            );
            let trained = spa(a).iter().any(|v| *v != 0.0);
            assert_eq!(
                trained,
                step == 2,
                "{path}: sparse values train from step 2"
            );
        }
    }
}
