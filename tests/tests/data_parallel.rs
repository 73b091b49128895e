//! Data-parallel training ([`DataParallel`]) equals one device on the full batch.
//!
//! Every method trains with two replicas, each on half of every batch, and with one device on
//! the whole batch through its own stepper (`Stepper::train`, the single-device path). The two
//! replicas must agree bit for bit (parameters, controller decisions, saved adapter files), and
//! agree with the single device on every decision (LoRA's nothing, AdaLoRA's rank pattern,
//! RoSA's masks, SFT's selected indices, ID3's unmasked entries) after every step, with the
//! parameters equal within f32 tolerance (the reduction sums two half-batch gradients where the
//! single device's autodiff sums over the whole batch: another order of the same additions).
//!
//! Both replicas run on the one flex device (burn's flex device is a single device and has no
//! collective), so the gradients are summed with [`Reduction::Gather`]; the replicas still own
//! their models, steppers and optimizers, as on separate devices.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::Module;
use burn::optim::{AdamConfig, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_adalora::AdaLoraConfig;
use peft_conformance::{Emb, Proj, TinyModel, random_torch_weights};
use peft_core::model::adapters_of;
use peft_core::step::Tuned;
use peft_core::{
    Adapter, DataParallel, LoadOptions, Method, ModuleSelector, PeftEmbedding, PeftLinear,
    PeftModel, Reduction, SaveOptions, hosts,
};
use peft_lora::LoraConfig;
use peft_rosa::{RosaAdapter, RosaConfig};
use peft_selective::{SelectiveConfig, SelectiveModel};
use peft_sft::{SftAdapter, SftConfig};

type Activation<A> = TinyModel<PeftLinear<A>, PeftEmbedding<A>>;
type Plain = TinyModel<burn::nn::Linear, burn::nn::Embedding>;

fn device() -> Device {
    Device::flex().autodiff()
}

/// Four sequences of five tokens: the full batch.
fn batch(dev: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = vec![
        3, 17, 42, 0, 9, 11, 49, 25, 3, 8, 7, 30, 1, 44, 21, 5, 5, 38, 12, 27,
    ];
    Tensor::from_data(TensorData::new(ids, [4, 5]), dev)
}

/// A model's mean squared loss on the rows `rows` of the batch, and the number of values the
/// mean is over.
trait Forward {
    fn loss_on(&self, rows: Range<usize>) -> (Tensor<1>, f64);
}

impl<P: Proj, E: Emb> Forward for TinyModel<P, E> {
    fn loss_on(&self, rows: Range<usize>) -> (Tensor<1>, f64) {
        let dev = self.devices()[0].clone();
        let ids = batch(&dev).slice([rows, 0..5]);
        let out = self.forward(ids);
        let n = out.shape().num_elements() as f64;
        ((out - 0.5).powi_scalar(2).mean().reshape([1]), n)
    }
}

fn targets() -> ModuleSelector {
    ModuleSelector::names(["q_proj", "v_proj", "down_proj"])
}

fn peft<A: Adapter, C: Method<Adapter = A>>(config: C) -> PeftModel<Activation<A>, C> {
    let dev = device();
    PeftModel::new(
        TinyModel::from_torch(&random_torch_weights(3, &dev), &dev),
        config,
    )
    .unwrap()
}

fn id3() -> SelectiveModel<Plain> {
    let dev = device();
    let model: Plain = TinyModel::from_torch(&random_torch_weights(3, &dev), &dev);
    let model = hosts::set_trainable(model, |_| Some(true));
    SelectiveModel::new(model, SelectiveConfig::id3(12, 3))
}

/// Every parameter, by path.
fn params<M: Module>(model: &M) -> BTreeMap<String, Vec<f32>> {
    hosts::read_params(model, |_| true)
        .into_iter()
        .map(|(k, v)| (k, v.iter::<f32>().collect()))
        .collect()
}

/// What a case's controller decided, as text (compared for equality).
type Decisions<T> = fn(&T) -> String;

struct Case<T> {
    label: &'static str,
    make: Box<dyn Fn() -> T>,
    steps: usize,
    optim: fn() -> ModuleOptimizer,
    decisions: Decisions<T>,
    /// The decisions after the last step (checked to differ from those at the start, so the
    /// comparison is not between two empty sets).
    decided: fn(&str) -> bool,
}

/// Train `case` on one device (full batch) and on two replicas (rows `split[i]` each); compare.
fn compare<M, T>(case: &Case<T>, split: [Range<usize>; 2], tol: f32)
where
    M: Module + Forward + 'static,
    T: Tuned<M> + Clone,
{
    let label = case.label;
    let dev = device();
    let lr = 1e-2;

    // One device, the full batch, the single-device step.
    // Both start from the same adapters (their initial values are random).
    let initial = (case.make)();
    let mut single = initial.clone();
    let start = params(single.tuned_model());
    let mut stepper = single.stepper(case.steps).unwrap();
    let mut optim = (case.optim)();
    let mut single_decisions = vec![(case.decisions)(&single)];
    for _ in 0..case.steps {
        let (loss, _) = single.tuned_model().loss_on(0..4);
        stepper.train(&mut single, &mut optim, lr, loss).unwrap();
        single_decisions.push((case.decisions)(&single));
    }

    // Two replicas, half of the batch each.
    let mut dp = DataParallel::new(
        initial,
        &[dev.clone(), dev],
        case.steps,
        case.optim,
        Reduction::Gather,
    )
    .unwrap();
    assert_eq!(dp.len(), 2);
    for (step, expected) in single_decisions.iter().enumerate() {
        if step > 0 {
            let loss = dp.backward(|i, m| Ok(m.loss_on(split[i].clone()))).unwrap();
            assert!(loss.is_finite(), "{label}");
            dp.step(lr).unwrap();
        }
        let [a, b] = dp.replicas() else {
            unreachable!("two replicas")
        };
        let (da, db) = ((case.decisions)(&a.tuned), (case.decisions)(&b.tuned));
        assert_eq!(da, db, "{label}: the replicas decide alike at step {step}");
        assert_eq!(
            &da, expected,
            "{label}: two replicas decide as one device at step {step}"
        );
    }
    assert_eq!(dp.step_index(), case.steps, "{label}");
    let last = single_decisions.last().unwrap();
    assert!(
        (case.decided)(last) && (last.is_empty() || *last != single_decisions[0]),
        "{label}: the controller decided nothing: {last}"
    );

    let [a, b] = dp.replicas() else {
        unreachable!("two replicas")
    };
    let (pa, pb) = (params(a.tuned.tuned_model()), params(b.tuned.tuned_model()));
    assert_eq!(
        pa, pb,
        "{label}: the replicas hold the same parameters, bit for bit"
    );
    let ps = params(single.tuned_model());
    assert_eq!(pa.keys().collect::<Vec<_>>(), ps.keys().collect::<Vec<_>>());
    let mut trained = 0;
    for (k, x) in &pa {
        let diff = x
            .iter()
            .zip(&ps[k])
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= tol,
            "{label}: {k} differs from one device by {diff}"
        );
        trained += start
            .get(k)
            .map_or(x.len(), |s| x.iter().zip(s).filter(|(p, q)| p != q).count());
    }
    assert!(trained > 0, "{label}: nothing trained");
}

fn sgd() -> ModuleOptimizer {
    SgdConfig::new().init()
}

fn adam() -> ModuleOptimizer {
    AdamConfig::new().init()
}

fn rosa_masks<C: Method>(t: &PeftModel<Activation<RosaAdapter>, C>) -> String {
    let masks: Vec<Option<(Vec<i64>, Vec<i64>)>> =
        adapters_of::<_, RosaAdapter>(t.model(), "default")
            .iter()
            .map(|(_, _, a)| {
                a.spa_csr().map(|csr| {
                    let v = |t: &Tensor<1, Int>| t.clone().into_data().iter::<i64>().collect();
                    (v(csr.layout.row_offsets()), v(csr.layout.col_indices()))
                })
            })
            .collect();
    format!("{masks:?}")
}

fn sft_indices<C: Method>(t: &PeftModel<Activation<SftAdapter>, C>) -> String {
    let indices: Vec<Vec<u64>> = adapters_of::<_, SftAdapter>(t.model(), "default")
        .into_iter()
        .map(|(_, _, a)| a.indices())
        .collect();
    format!("{indices:?}")
}

/// The entries ID3 has unmasked: those that moved from their initial values.
fn id3_entries(t: &SelectiveModel<Plain>) -> String {
    let dev = device();
    let start = params(
        &TinyModel::<burn::nn::Linear, burn::nn::Embedding>::from_torch(
            &random_torch_weights(3, &dev),
            &dev,
        ),
    );
    let moved: Vec<(String, usize)> = params(t.model())
        .into_iter()
        .flat_map(|(k, v)| {
            let s = start[&k].clone();
            v.into_iter()
                .zip(s)
                .enumerate()
                .filter(|(_, (p, q))| p != q)
                .map(|(i, _)| (k.clone(), i))
                .collect::<Vec<_>>()
        })
        .collect();
    format!("{moved:?}")
}

#[test]
fn two_replicas_on_half_batches_train_as_one_device_on_the_full_batch() {
    let halves = || [0..2, 2..4];

    // LoRA (no controller), with Adam: each replica's optimizer state stays equal too.
    compare(
        &Case {
            label: "lora",
            make: Box::new(|| peft(LoraConfig::new(4, 8.0, targets()))),
            steps: 3,
            optim: adam,
            decisions: |_| String::new(),
            decided: |_| true,
        },
        halves(),
        1e-5,
    );
    // Unequal shards (3 + 1 sequences): the gradients are weighted by the items each mean is
    // over, so the result is still the full batch's.
    compare(
        &Case {
            label: "lora 3+1",
            make: Box::new(|| peft(LoraConfig::new(4, 8.0, targets()))),
            steps: 2,
            optim: sgd,
            decisions: |_| String::new(),
            decided: |_| true,
        },
        [0..3, 3..4],
        1e-5,
    );

    // AdaLoRA: the rank pattern (from the all-reduced importance) after every step.
    let ada = AdaLoraConfig::new(targets(), 8)
        .with_ranks(4, 2)
        .with_schedule(2, 3, 1);
    compare(
        &Case {
            label: "adalora",
            make: Box::new(move || peft(ada.clone())),
            steps: 8,
            optim: sgd,
            decisions: |t| format!("{:?}", t.adapters()["default"].config.rank_pattern),
            decided: |d| d != "None",
        },
        halves(),
        1e-5,
    );

    // RoSA wl2: two LoRA steps, a collection step, the masks, then both parts train.
    let rosa = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    compare(
        &Case {
            label: "rosa",
            make: Box::new(move || peft(rosa.clone())),
            steps: 5,
            optim: sgd,
            decisions: rosa_masks,
            decided: |d| d.contains("Some"),
        },
        halves(),
        1e-5,
    );

    // SFT: reselections after update steps 2 and 6 from the reduced RigL statistics.
    let sft = SftConfig::new(0.1, targets()).with_steps(4, 2);
    compare(
        &Case {
            label: "sft",
            make: Box::new(move || peft(sft.clone())),
            steps: 8,
            optim: sgd,
            decisions: sft_indices,
            decided: |d| !d.is_empty(),
        },
        halves(),
        1e-5,
    );

    // ID3: budget 12 over 3 steps, unmasked from the reduced gradients.
    compare(
        &Case {
            label: "id3",
            make: Box::new(id3),
            steps: 4,
            optim: sgd,
            decisions: id3_entries,
            decided: |d| d != "[]",
        },
        halves(),
        1e-5,
    );
}

/// The adapter files either replica writes are the same bytes.
#[test]
fn the_saved_adapter_does_not_depend_on_the_replica() {
    let config = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    let dev = device();
    let mut dp =
        DataParallel::new(peft(config), &[dev.clone(), dev], 4, sgd, Reduction::Gather).unwrap();
    for _ in 0..4 {
        dp.backward(|i, m| Ok(m.loss_on(2 * i..2 * i + 2))).unwrap();
        dp.step(1e-2).unwrap();
    }
    let files = |i: usize| {
        let dir = tempfile::tempdir().unwrap();
        dp.replicas()[i]
            .tuned
            .save_pretrained(dir.path(), &SaveOptions::default())
            .unwrap();
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir.path()).unwrap() {
            let e = e.unwrap();
            out.insert(e.file_name(), std::fs::read(e.path()).unwrap());
        }
        out
    };
    let (a, b) = (files(0), files(1));
    assert!(!a.is_empty());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, bytes) in &a {
        assert!(*bytes == b[name], "{name:?} differs between the replicas");
    }
}

/// Stop a two-replica run (adapter files from the first replica + the controllers' state),
/// resume it on two fresh replicas, finish: the adapters equal those of a run that did not
/// stop, bit for bit.
fn resume_under_data_parallel<A: Adapter, C: Method<Adapter = A>>(
    label: &str,
    config: C,
    total: usize,
    stop: usize,
) {
    let dev = device();
    let devices = [dev.clone(), dev.clone()];
    let run = |dp: &mut DataParallel<Activation<A>, PeftModel<Activation<A>, C>>, n: usize| {
        for _ in 0..n {
            dp.backward(|i, m| Ok(m.loss_on(2 * i..2 * i + 2))).unwrap();
            dp.step(1e-2).unwrap();
        }
    };
    let start = peft(config);
    let mut straight =
        DataParallel::new(start.clone(), &devices, total, sgd, Reduction::Gather).unwrap();
    run(&mut straight, total);

    let mut first = DataParallel::new(start, &devices, total, sgd, Reduction::Gather).unwrap();
    run(&mut first, stop);
    let dir = tempfile::tempdir().unwrap();
    first
        .tuned()
        .save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    first.save_state(&dir.path().join("state")).unwrap();
    drop(first);

    let options = LoadOptions {
        is_trainable: true,
        ..Default::default()
    };
    let base = TinyModel::from_torch(&random_torch_weights(3, &dev), &dev);
    let resumed =
        PeftModel::<Activation<A>, C>::from_pretrained(base, dir.path(), &options).unwrap();
    let mut resumed = DataParallel::new(resumed, &devices, total, sgd, Reduction::Gather).unwrap();
    resumed.resume(&dir.path().join("state")).unwrap();
    assert_eq!(resumed.step_index(), stop, "{label}");
    run(&mut resumed, total - stop);

    let adapters = |p: &PeftModel<Activation<A>, C>| {
        hosts::read_params(p.model(), |k| k.contains(".peft."))
            .into_iter()
            .map(|(k, v)| (k, v.iter::<f32>().map(f32::to_bits).collect::<Vec<_>>()))
            .collect::<BTreeMap<_, _>>()
    };
    for r in resumed.replicas() {
        assert_eq!(
            adapters(straight.tuned()),
            adapters(&r.tuned),
            "{label}: resumed replica differs from the run that did not stop"
        );
    }
}

#[test]
fn checkpoints_and_resume_work_under_data_parallel() {
    // RoSA after its masks (the sparse layout comes back from the files and the state).
    let rosa = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    resume_under_data_parallel("rosa", rosa, 6, 4);
    // SFT inside a RigL window (the candidate pool is in the state).
    let sft = SftConfig::new(0.1, targets()).with_steps(4, 2);
    resume_under_data_parallel("sft", sft, 8, 1);
}

#[test]
fn data_parallel_refuses_no_device_and_a_step_without_a_micro_batch() {
    let lora = || peft(LoraConfig::new(4, 8.0, targets()));
    let err = DataParallel::new(lora(), &[], 1, sgd, Reduction::Gather).unwrap_err();
    assert!(err.to_string().contains("at least one device"), "{err}");
    let dev = device();
    let err = DataParallel::new(
        lora(),
        &[dev.clone(), dev.clone()],
        1,
        sgd,
        Reduction::Collective,
    )
    .unwrap_err();
    assert!(err.to_string().contains("distinct devices"), "{err}");
    let mut dp = DataParallel::new(lora(), &[dev], 1, sgd, Reduction::Gather).unwrap();
    assert!(dp.step(1e-2).is_err());
    let err = dp
        .backward(|_, m| Ok((m.loss_on(0..4).0, 0.0)))
        .unwrap_err();
    assert!(err.to_string().contains("positive sum"), "{err}");
}
