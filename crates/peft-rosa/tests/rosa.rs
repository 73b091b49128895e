//! RoSA: the layer against dense formulas (outputs and all four gradients), mask generation
//! against a dense top-k of the accumulated statistic, the schedule's agenda and
//! trainability per step, files, resume equivalence and the two-phase recipe.

use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsAccumulator, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use peft_core::hosts::{self, HostView};
use peft_core::step::Stepper;
use peft_core::{BiasMode, ModuleSelector, PeftConfig, PeftLinear};
use peft_rosa::{
    GradAccMode, InitRosaWeights, InitialMasks, LoadOptions, MaskedAdapters, RosaAdapter,
    RosaConfig, RosaMasks, RosaModel, RosaScheduler, SaveOptions, generate_masks, install_masks,
    restart_with_masks, two_phase,
};

/// Two independent layers, so each one's weight gradient has a closed form under a linear
/// loss: `a` is 6 -> 4, `b` is 5 -> 7.
#[derive(Module, Debug)]
struct Net<L> {
    a: L,
    b: L,
}

trait Layer: Module + burn::module::ModuleDisplay + Clone + std::fmt::Debug {
    fn from_linear(l: Linear) -> Self;
    fn apply(&self, x: Tensor<2>) -> Tensor<2>;
}

impl Layer for Linear {
    fn from_linear(l: Linear) -> Self {
        l
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

impl Layer for PeftLinear<RosaAdapter> {
    fn from_linear(l: Linear) -> Self {
        l.into()
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

type Act = Net<PeftLinear<RosaAdapter>>;
type Weight = Net<Linear>;

const T: usize = 9;

/// Deterministic values in `[-0.5, 0.5) * scale` (burn's RNG is process-global).
fn values(n: usize, salt: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = ((i + 1) as f64 * 12.9898 + (salt + 1) as f64 * 78.233).sin() * 43_758.545_3;
            ((x - x.floor()) as f32 - 0.5) * scale
        })
        .collect()
}

fn tensor(shape: [usize; 2], salt: usize, scale: f32, device: &Device) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(values(shape[0] * shape[1], salt, scale), shape),
        device,
    )
}

fn linear(d_in: usize, d_out: usize, salt: usize, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out).init(device);
    l.weight = l
        .weight
        .map(|_| tensor([d_in, d_out], salt, 1.0, device).set_require_grad(false));
    l.bias = l.bias.map(|b| {
        b.map(|_| {
            Tensor::from_data(
                TensorData::new(values(d_out, salt + 50, 1.0), [d_out]),
                device,
            )
        })
    });
    l
}

impl<L: Layer> Net<L> {
    fn new(device: &Device) -> Self {
        Self {
            a: L::from_linear(linear(6, 4, 1, device)),
            b: L::from_linear(linear(5, 7, 2, device)),
        }
    }

    /// `Σ y_a ⊙ R_a + Σ y_b ⊙ R_b` for step `step`'s inputs: `dW = Xᵀ·R` per layer.
    fn loss(&self, step: usize, device: &Device) -> Tensor<1> {
        let (xa, xb, ra, rb) = batch(step, device);
        (self.a.apply(xa) * ra).sum() + (self.b.apply(xb) * rb).sum()
    }
}

fn batch(step: usize, device: &Device) -> (Tensor<2>, Tensor<2>, Tensor<2>, Tensor<2>) {
    (
        tensor([T, 6], 100 + step, 2.0, device),
        tensor([T, 5], 200 + step, 2.0, device),
        tensor([T, 4], 300 + step, 2.0, device),
        tensor([T, 7], 400 + step, 2.0, device),
    )
}

fn device() -> Device {
    Device::flex().autodiff()
}

fn vec1(t: Tensor<1>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn vec2(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec().unwrap()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1.0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff / scale <= tol,
        "{what}: max diff {diff} (scale {scale})"
    );
}

fn adapter_of<L: Layer>(model: &Net<L>, layer: &str) -> RosaAdapter {
    let layer = layer.to_string();
    hosts::collect(model, move |h: &HostView<'_, RosaAdapter>| {
        (h.path == layer).then(|| h.slot.get("default").unwrap().clone())
    })
    .pop()
    .expect("the layer has an adapter")
}

fn config() -> RosaConfig {
    RosaConfig::new(2, 0.25, 5.0, ModuleSelector::names(["a", "b"]))
}

/// Dense `S` (`[out, in]`) of an adapter.
fn dense_s(adapter: &RosaAdapter) -> Tensor<2> {
    adapter.spa_csr().unwrap().to_dense()
}

#[test]
fn layer_output_and_all_four_gradients_match_the_dense_formulas() {
    let dev = device();
    let config = config().with_init(InitRosaWeights::Random);
    let random = || InitialMasks::Random(3);
    for weight_space in [false, true] {
        let (out, grads, x, adapter, w_read) = if weight_space {
            let model =
                RosaModel::new_with_masks(Weight::new(&dev), config.clone(), random()).unwrap();
            let net = model.model().clone();
            let x = tensor([T, 6], 7, 2.0, &dev).require_grad();
            let y = net.a.forward(x.clone());
            let r = tensor([T, 4], 8, 2.0, &dev);
            let grads = (y.clone() * r).sum().backward();
            let adapter = adapter_of(&net, "a");
            (y, grads, x, adapter, net.a.weight.val())
        } else {
            let model =
                RosaModel::new_with_masks(Act::new(&dev), config.clone(), random()).unwrap();
            let net = model.model().clone();
            let x = tensor([T, 6], 7, 2.0, &dev).require_grad();
            let y = net.a.forward(x.clone());
            let r = tensor([T, 4], 8, 2.0, &dev);
            let grads = (y.clone() * r).sum().backward();
            let adapter = adapter_of(&net, "a");
            (y, grads, x, adapter, net.a.weight.val())
        };
        let label = if weight_space { "weight" } else { "activation" };
        let inner = dev.clone().inner();
        // The base weight (in weight space `weight.val()` is the adapted one).
        let w = tensor([6, 4], 1, 1.0, &inner);
        let _ = w_read;
        let xd = x.clone().detach().to_device(&inner);
        let r = tensor([T, 4], 8, 2.0, &inner);
        let a = adapter
            .lora_a
            .as_ref()
            .unwrap()
            .val()
            .detach()
            .to_device(&inner);
        let b = adapter
            .lora_b
            .as_ref()
            .unwrap()
            .val()
            .detach()
            .to_device(&inner);
        let s = dense_s(&adapter).detach().to_device(&inner); // [out = 4, in = 6]
        let bias = Tensor::<2>::from_data(TensorData::new(values(4, 51, 1.0), [1, 4]), &inner);
        let scale = adapter.scale as f32;
        assert!((scale - 2.5).abs() < 1e-6, "alpha / r");
        assert_eq!(adapter.spa_csr().unwrap().layout.nnz(), 6, "int(0.25 · 24)");

        // R1: y = x·W + b + s·x·A·B + x·Sᵀ.
        let expected = xd.clone().matmul(w.clone())
            + bias
            + xd.clone().matmul(a.clone()).matmul(b.clone()) * scale
            + xd.clone().matmul(s.clone().transpose());
        close(
            &vec2(out.clone().detach().to_device(&inner)),
            &vec2(expected),
            1e-5,
            label,
        );

        // R2: dS = (dYᵀ·X)[mask], dA = s·Xᵀ·dY·Bᵀ, dB = s·(X·A)ᵀ·dY, dX = dY·(Wᵀ + S) + s·dY·Bᵀ·Aᵀ.
        let ds_dense = r.clone().transpose().matmul(xd.clone()); // [out, in]
        let layout = adapter.spa_csr().unwrap().layout;
        let ds_expected = sparse_kernels::csr_gather(&layout.to_device(&inner), ds_dense);
        let values_param = adapter.spa_values.as_ref().unwrap();
        close(
            &vec1(values_param.grad(&grads).unwrap()),
            &vec1(ds_expected),
            1e-5,
            &format!("{label}: dS"),
        );
        let da = xd
            .clone()
            .transpose()
            .matmul(r.clone())
            .matmul(b.clone().transpose())
            * scale;
        let db = xd.clone().matmul(a.clone()).transpose().matmul(r.clone()) * scale;
        close(
            &vec2(adapter.lora_a.as_ref().unwrap().grad(&grads).unwrap()),
            &vec2(da),
            1e-5,
            &format!("{label}: dA"),
        );
        close(
            &vec2(adapter.lora_b.as_ref().unwrap().grad(&grads).unwrap()),
            &vec2(db),
            1e-5,
            &format!("{label}: dB"),
        );
        let dx = r.clone().matmul(w.clone().transpose())
            + r.clone().matmul(s)
            + r.matmul(b.transpose()).matmul(a.transpose()) * scale;
        close(
            &vec2(x.grad(&grads).unwrap()),
            &vec2(dx),
            1e-5,
            &format!("{label}: dX"),
        );
    }
}

/// A dense top-k in PyTorch orientation: flat indices of the `k` largest, ties to the lower.
fn dense_topk(scores: &[f32], k: usize) -> Vec<u64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]).then(i.cmp(&j)));
    let mut top: Vec<u64> = idx[..k].iter().map(|&i| i as u64).collect();
    top.sort_unstable();
    top
}

/// The weight gradient of layer `a` (`[out, in]`) and `b` at step `step`: `Rᵀ·X`.
fn weight_grads(step: usize, device: &Device) -> (Vec<f32>, Vec<f32>) {
    let (xa, xb, ra, rb) = batch(step, device);
    (
        vec2(ra.transpose().matmul(xa)),
        vec2(rb.transpose().matmul(xb)),
    )
}

/// Replace the random LoRA `A` factors by deterministic values (burn's RNG is process-global
/// and shared by parallel tests).
fn deterministic(mut net: Act) -> Act {
    hosts::for_each(&mut net, |h: HostView<'_, RosaAdapter>| {
        let a = h.slot.get_mut("default").unwrap();
        if let Some(p) = &a.lora_a {
            let [rows, r] = p.shape().dims();
            let salt = rows * 31 + r;
            a.lora_a = Some(peft_core::method::set_param(
                p,
                tensor([rows, r], salt, 0.5, &p.device()),
            ));
        }
        Ok(())
    })
    .unwrap();
    net
}

fn new_model(config: &RosaConfig) -> RosaModel<Act> {
    let mut model = RosaModel::new(Act::new(&device()), config.clone()).unwrap();
    model.map_model(deterministic);
    model
}

fn run_schedule(config: &RosaConfig, steps: usize) -> (Act, Arc<Mutex<RosaScheduler>>) {
    let dev = device();
    let model = new_model(config);
    let mut scheduler = RosaScheduler::new(config, "default").unwrap();
    let mut net = scheduler.prepare(model.model().clone()).unwrap();
    let scheduler = Arc::new(Mutex::new(scheduler));
    let mut stepper = Stepper::new().with(scheduler.clone());
    let mut optim = SgdConfig::new().init();
    for step in 0..steps {
        let loss = net.loss(step, &dev);
        net = stepper.step(net, &mut optim, 0.01, loss).unwrap();
    }
    (net, scheduler)
}

#[test]
fn masks_are_the_dense_top_k_of_the_accumulated_statistic() {
    let inner = device().inner();
    // wl1 with 3 collection steps (1, 2, 3); layer `b` at its own density (pattern).
    let base = config()
        .with_schedule("wl1")
        .with_num_grads(3)
        .with_density_pattern("b", 0.4);
    for mode in [GradAccMode::MeanSquared, GradAccMode::Mean] {
        let config = base.clone().with_grad_acc_mode(mode);
        // Mid-collection: the running mean equals the formula (R5).
        let (_, scheduler) = run_schedule(&config, 3);
        let s = scheduler.lock().unwrap();
        assert!(s.masks().is_none());
        assert_eq!(s.collected_counts()["a"], 2);
        let stat = |g: Vec<f32>| -> Vec<f32> {
            match mode {
                GradAccMode::MeanSquared => g.iter().map(|x| x * x).collect(),
                GradAccMode::Mean => g,
            }
        };
        let (g1, _) = weight_grads(1, &inner);
        let (g2, _) = weight_grads(2, &inner);
        let mean12: Vec<f32> = stat(g1)
            .iter()
            .zip(stat(g2))
            .map(|(x, y)| (x + y) / 2.0)
            .collect();
        // Stored in burn orientation [in, out].
        let got = vec2(s.collected("a").unwrap().transpose());
        close(&got, &mean12, 1e-5, "running mean");
        drop(s);

        // After the last collection step: masks = top-k of |mean| per layer (R3, R4).
        let (net, scheduler) = run_schedule(&config, 4);
        let s = scheduler.lock().unwrap();
        let masks = s.masks().expect("generated").clone();
        assert!(s.masks_generated() && s.collected_counts().is_empty());
        for (layer, k) in [("a", 6), ("b", 14)] {
            let mut mean = vec![];
            for step in 1..=3 {
                let (ga, gb) = weight_grads(step, &inner);
                let g = stat(if layer == "a" { ga } else { gb });
                if mean.is_empty() {
                    mean = vec![0.0; g.len()];
                }
                for (m, x) in mean.iter_mut().zip(g) {
                    *m += x / 3.0;
                }
            }
            let abs: Vec<f32> = mean.iter().map(|x| x.abs()).collect();
            let mask = masks.get(layer).unwrap();
            assert_eq!(mask.nnz(), k, "{layer}: int(d·n·m) with its own density");
            assert_eq!(mask.flat_indices(), dense_topk(&abs, k), "{mode:?} {layer}");
            // The model carries the same structure, zero values, trainable; no probe.
            let adapter = adapter_of(&net, layer);
            assert_eq!(adapter.spa_csr().unwrap().layout.structure(), mask);
            assert!(
                vec1(adapter.spa_values.as_ref().unwrap().val())
                    .iter()
                    .all(|&v| v == 0.0)
            );
            assert!(adapter.spa_values.as_ref().unwrap().is_require_grad());
            assert!(adapter.probe.is_none());
        }
    }
    // The two statistics pick different masks on this data (the test can tell them apart).
    let masks = |mode| {
        let (_, s) = run_schedule(&base.clone().with_grad_acc_mode(mode), 4);
        let s = s.lock().unwrap();
        s.masks().unwrap().clone()
    };
    assert_ne!(masks(GradAccMode::Mean), masks(GradAccMode::MeanSquared));
}

#[test]
fn micro_batches_average_their_squared_gradients() {
    let dev = device();
    let inner = dev.clone().inner();
    let config = config().with_schedule("default").with_num_grads(1);
    let model = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
    let mut scheduler = RosaScheduler::new(&config, "default").unwrap();
    let net = scheduler.prepare(model.model().clone()).unwrap();
    let shared = Arc::new(Mutex::new(scheduler));
    let mut stepper = Stepper::new().with(shared.clone());
    // Two micro-batches reported one by one through the step runner (as `burn-peft train` and
    // burn-train's runner do); the optimizer then gets their summed gradients.
    let mut accumulator = GradientsAccumulator::<Act>::new();
    for micro in [10, 11] {
        let grads = stepper.backward(&net, net.loss(micro, &dev)).unwrap();
        accumulator.accumulate(&net, grads);
    }
    assert_eq!(stepper.micro_batches(), 2);
    let expected: Vec<f32> = {
        let (g1, _) = weight_grads(10, &inner);
        let (g2, _) = weight_grads(11, &inner);
        g1.iter()
            .zip(g2)
            .map(|(x, y)| (x * x + y * y) / 2.0)
            .collect()
    };
    {
        let s = shared.lock().unwrap();
        assert_eq!(
            s.collected_counts().get("a"),
            Some(&2),
            "one sample per backward pass"
        );
        close(
            &vec2(s.collected("a").unwrap().transpose()),
            &expected,
            1e-5,
            "mean of the squares, not the square of the sum",
        );
    }
    let mut optim = SgdConfig::new().init();
    let net = stepper
        .optimize(net, &mut optim, 0.01, accumulator.grads())
        .unwrap();
    assert_eq!(stepper.micro_batches(), 0);
    let s = shared.lock().unwrap();
    // Not counted again at the step: the mask is the top-k of the per-micro-batch statistic,
    // which differs from the square of the summed gradient's.
    let abs: Vec<f32> = expected.iter().map(|x| x.abs()).collect();
    assert_eq!(
        s.masks().unwrap().get("a").unwrap().flat_indices(),
        dense_topk(&abs, 6)
    );
    let summed: Vec<f32> = {
        let (g1, _) = weight_grads(10, &inner);
        let (g2, _) = weight_grads(11, &inner);
        g1.iter().zip(g2).map(|(x, y)| (x + y) * (x + y)).collect()
    };
    assert_ne!(
        dense_topk(&summed, 6),
        dense_topk(&abs, 6),
        "the data tells them apart"
    );
    assert!(adapter_of(&net, "a").probe.is_none());
}

fn trainable(net: &Act) -> Vec<(String, bool)> {
    hosts::parameters(net)
        .into_iter()
        .map(|(p, t, _)| (p, t))
        .collect()
}

fn is_trainable(net: &Act, suffix: &str) -> Option<bool> {
    trainable(net)
        .into_iter()
        .find(|(p, _)| p.ends_with(suffix))
        .map(|(_, t)| t)
}

#[test]
fn the_agenda_sets_what_trains_at_every_step() {
    let dev = device();
    // wl2, 1 collection step, bias = all: steps 0-1 LoRA only, step 2 LoRA + collection, then
    // both. Biases keep training throughout (the reference freezes them every step).
    let config = config().with_schedule("wl2").with_bias(BiasMode::All);
    let model = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
    let mut scheduler = RosaScheduler::new(&config, "default").unwrap();
    let agenda: Vec<_> = (0..5).map(|t| scheduler.agenda(t)).collect();
    assert_eq!(
        agenda
            .iter()
            .map(|a| (a.lora, a.grad_collection, a.spa))
            .collect::<Vec<_>>(),
        vec![
            (true, false, false),
            (true, false, false),
            (true, true, false),
            (true, false, true),
            (true, false, true)
        ]
    );
    let mut net = scheduler.prepare(model.model().clone()).unwrap();
    let scheduler = Arc::new(Mutex::new(scheduler));
    let mut stepper = Stepper::new().with(scheduler.clone());
    let mut optim = SgdConfig::new().init();
    for step in 0..5 {
        let probe = adapter_of(&net, "a").probe.is_some();
        let mask = adapter_of(&net, "a").has_mask();
        assert_eq!(probe, step == 2, "step {step}: probe only while collecting");
        assert_eq!(mask, step >= 3, "step {step}: mask after collection");
        assert_eq!(is_trainable(&net, "a.peft.default.lora_a"), Some(true));
        assert_eq!(is_trainable(&net, "a.bias"), Some(true), "bias = all");
        assert_eq!(is_trainable(&net, "a.weight"), Some(false), "base frozen");
        if step >= 3 {
            assert_eq!(is_trainable(&net, "a.peft.default.spa_values"), Some(true));
        }
        let before = net.clone();
        let loss = net.loss(step, &dev);
        net = stepper.step(net, &mut optim, 0.01, loss).unwrap();
        if step == 2 {
            // R6: setting the masks (zero values) leaves the function unchanged; the step
            // changed LoRA, so compare against the stepped model with its masks removed.
            let mut without = net.clone();
            hosts::for_each(&mut without, |h: HostView<'_, RosaAdapter>| {
                let a = h.slot.get_mut("default").unwrap();
                a.spa = None;
                a.spa_values = None;
                Ok(())
            })
            .unwrap();
            let x = tensor([3, 6], 77, 1.0, &dev);
            close(
                &vec2(net.a.forward(x.clone())),
                &vec2(without.a.forward(x)),
                0.0,
                "activation leaves outputs unchanged",
            );
        }
        if step >= 4 {
            let old = vec1(adapter_of(&before, "a").spa_values.unwrap().val());
            let new = vec1(adapter_of(&net, "a").spa_values.unwrap().val());
            assert_ne!(old, new, "the sparse values train");
        }
    }

    // spa_only with r = 0: collection at step 0, then only the sparse values.
    let config =
        RosaConfig::new(0, 0.25, 1.0, ModuleSelector::names(["a", "b"])).with_schedule("spa_only");
    let (net, scheduler) = run_schedule(&config, 2);
    assert!(scheduler.lock().unwrap().masks_generated());
    assert!(adapter_of(&net, "b").lora_a.is_none());
    assert_eq!(is_trainable(&net, "b.peft.default.spa_values"), Some(true));

    // lora_only: never a probe, never a mask.
    let config =
        RosaConfig::new(2, 0.0, 1.0, ModuleSelector::names(["a", "b"])).with_schedule("lora_only");
    let (net, scheduler) = run_schedule(&config, 3);
    assert!(scheduler.lock().unwrap().masks().is_none());
    assert!(!adapter_of(&net, "a").has_mask() && adapter_of(&net, "a").probe.is_none());
}

#[test]
fn a_missing_prepare_is_a_named_error() {
    let dev = device();
    let config = config();
    let model = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
    let mut stepper = Stepper::new().with(RosaScheduler::new(&config, "default").unwrap());
    let net = model.model().clone();
    let loss = net.loss(0, &dev);
    let err = stepper
        .step(net, &mut SgdConfig::new().init(), 0.01, loss)
        .unwrap_err()
        .to_string();
    assert!(err.contains("RosaScheduler::prepare"), "{err}");
    // No schedule: refused at construction.
    let mut no_schedule = config;
    no_schedule.schedule = None;
    let err = RosaScheduler::new(&no_schedule, "default")
        .unwrap_err()
        .to_string();
    assert!(err.contains("schedule"), "{err}");
}

#[test]
fn files_use_integer_indices_and_round_trip_before_and_after_masks() {
    let dev = device();
    let dir = tempfile::tempdir().unwrap();
    // Trained past mask generation: non-zero LoRA and sparse values.
    let config = config().with_schedule("default");
    let (net, _) = run_schedule(&config, 3);
    let mut model = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
    model.map_model(|_| net);
    model
        .save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let tensors =
        peft_core::hf::read_tensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    let key = |k: &str| format!("base_model.model.a.{k}");
    assert_eq!(tensors[&key("rosa_A.weight")].shape().to_vec(), vec![2, 6]);
    assert_eq!(tensors[&key("rosa_B.weight")].shape().to_vec(), vec![4, 2]);
    assert_eq!(tensors[&key("rosa_spa.values")].shape().to_vec(), vec![6]);
    assert_eq!(tensors[&key("rosa_spa.row_offs")].shape().to_vec(), vec![5]);
    assert_eq!(tensors[&key("rosa_spa.row_idx")].shape().to_vec(), vec![4]);
    assert_eq!(
        tensors[&key("rosa_spa.col_idx")].dtype(),
        burn::tensor::DType::I64
    );
    let json = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    assert!(json.contains(r#""peft_type": "ROSA""#), "{json}");

    let x = tensor([3, 6], 5, 1.0, &dev);
    let out = model.model().a.forward(x.clone());
    let loaded =
        RosaModel::from_pretrained(Act::new(&dev), dir.path(), &LoadOptions::default()).unwrap();
    close(
        &vec2(loaded.model().a.forward(x.clone())),
        &vec2(out.clone()),
        1e-6,
        "reload",
    );
    assert_eq!(
        adapter_of(loaded.model(), "a")
            .spa_csr()
            .unwrap()
            .layout
            .structure(),
        adapter_of(model.model(), "a")
            .spa_csr()
            .unwrap()
            .layout
            .structure()
    );
    // Into the weight-space model as well.
    let loaded =
        RosaModel::from_pretrained(Weight::new(&dev), dir.path(), &LoadOptions::default()).unwrap();
    close(
        &vec2(loaded.model().a.forward(x.clone())),
        &vec2(out),
        1e-5,
        "weight space",
    );

    // Saved before the masks: zero offsets, loads as "no mask yet".
    let fresh = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
    let early = tempfile::tempdir().unwrap();
    fresh
        .save_pretrained(early.path(), &SaveOptions::default())
        .unwrap();
    let loaded =
        RosaModel::from_pretrained(Act::new(&dev), early.path(), &LoadOptions::default()).unwrap();
    assert!(!adapter_of(loaded.model(), "a").has_mask());

    // A broken CSR is refused with the layer named, and nothing is half-loaded.
    let mut tensors = tensors;
    tensors.insert(key("rosa_spa.col_idx"), TensorData::new(vec![9i64; 6], [6]));
    peft_core::hf::write_tensors(&dir.path().join("adapter_model.safetensors"), &tensors).unwrap();
    let err = RosaModel::from_pretrained(Act::new(&dev), dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("a.rosa_spa"), "{err}");
}

#[test]
fn masks_files_match_modules_exactly() {
    let dev = device();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("masks.safetensors");
    let config = config().with_mask_save_path(&file);
    let (net, scheduler) = run_schedule(&config, 1);
    let masks = scheduler.lock().unwrap().masks().unwrap().clone();
    assert_eq!(
        RosaMasks::load(&file).unwrap(),
        masks,
        "saved when generated (R12)"
    );
    // A new run loads them: no collection, masks in place from step 0.
    let config =
        RosaConfig::new(2, 0.25, 5.0, ModuleSelector::names(["a", "b"])).with_mask_load_path(&file);
    let scheduler = RosaScheduler::new(&config, "default").unwrap();
    assert!(!scheduler.collects());
    let model = RosaModel::new(Act::new(&dev), config).unwrap();
    assert_eq!(
        adapter_of(model.model(), "b")
            .spa_csr()
            .unwrap()
            .layout
            .structure(),
        adapter_of(&net, "b").spa_csr().unwrap().layout.structure()
    );
    // Masks keyed by another path are not matched by substring.
    let mut other = RosaMasks::new();
    for (path, s) in masks.iter() {
        other.insert(format!("encoder.{path}"), s.clone());
    }
    let err =
        RosaModel::new_with_masks(Act::new(&dev), crate::config(), InitialMasks::Given(other))
            .unwrap_err()
            .to_string();
    assert!(err.contains("no mask for `a`"), "{err}");
    let err = install_masks(Act::new(&dev), "default", &RosaMasks::new(), true);
    assert!(
        err.is_ok(),
        "a model without RoSA adapters has nothing to install"
    );
}

fn params(net: &Act) -> Vec<Vec<f32>> {
    struct V(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0
                .push(p.val().into_data().convert::<f32>().try_into_vec().unwrap());
        }
    }
    let mut v = V(Vec::new());
    net.visit(&mut v);
    v.0
}

#[test]
fn a_resumed_run_ends_like_an_uninterrupted_one() {
    let dev = device();
    // 2 warm-up steps, 3 collection steps (1 done at the stop), then both adapters.
    let config = config().with_schedule("wl2").with_num_grads(3);
    let (straight, _) = run_schedule(&config, 8);

    for stop in [3, 6] {
        let (first, scheduler) = run_schedule(&config, stop);
        let state = tempfile::tempdir().unwrap();
        scheduler.lock().unwrap().save_state(state.path()).unwrap();
        let mut model = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
        model.map_model(|_| first);
        let adapter_dir = tempfile::tempdir().unwrap();
        model
            .save_pretrained(adapter_dir.path(), &SaveOptions::default())
            .unwrap();

        // A new process: the model from its files, the scheduler from its state (SGD has no
        // state of its own).
        let trainable = LoadOptions {
            is_trainable: true,
            ..Default::default()
        };
        let loaded =
            RosaModel::from_pretrained(Act::new(&dev), adapter_dir.path(), &trainable).unwrap();
        let mut scheduler = RosaScheduler::new(&config, "default").unwrap();
        scheduler
            .load_state(state.path(), &dev.clone().inner())
            .unwrap();
        assert_eq!(scheduler.step_index(), stop);
        let mut net = scheduler.prepare(loaded.model().clone()).unwrap();
        let mut stepper = Stepper::new().with(scheduler);
        stepper.set_step_index(stop);
        let mut optim = SgdConfig::new().init();
        for step in stop..8 {
            let loss = net.loss(step, &dev);
            net = stepper.step(net, &mut optim, 0.01, loss).unwrap();
        }
        for (x, y) in params(&net).iter().zip(params(&straight)) {
            close(x, &y, 1e-6, &format!("resumed at {stop}"));
        }
        assert_eq!(
            adapter_of(&net, "b").spa_csr().unwrap().layout.structure(),
            adapter_of(&straight, "b")
                .spa_csr()
                .unwrap()
                .layout
                .structure(),
            "resumed at {stop}: same masks"
        );
    }

    // Without the state the masks come out different: the test can tell.
    let (first, _) = run_schedule(&config, 3);
    let mut net = first;
    let scheduler = RosaScheduler::new(&config, "default").unwrap();
    let mut stepper = Stepper::new().with(scheduler);
    stepper.set_step_index(3);
    let mut optim = SgdConfig::new().init();
    for step in 3..8 {
        let loss = net.loss(step, &dev);
        net = stepper.step(net, &mut optim, 0.01, loss).unwrap();
    }
    assert_ne!(
        adapter_of(&net, "a").spa_csr().unwrap().layout.structure(),
        adapter_of(&straight, "a")
            .spa_csr()
            .unwrap()
            .layout
            .structure()
    );
}

#[test]
fn the_two_phase_recipe_runs_in_one_process() {
    let dev = device();
    let config = config().with_schedule("wl3");
    let mut model = RosaModel::new(Act::new(&dev), config.clone()).unwrap();
    let initial = params(model.model());
    let mut optim = SgdConfig::new().init();
    let masks = generate_masks(&model, "default", &mut optim, 0.01, |m, step| {
        m.loss(step, &dev)
    })
    .unwrap();
    // The masks are those of a plain run of the schedule, and the model is untouched.
    let (_, reference) = run_schedule(&config, 4);
    assert_eq!(&masks, reference.lock().unwrap().masks().unwrap());
    assert_eq!(params(model.model()), initial, "phase 1 trains a copy");

    // Restart: the same initial adapters plus the masks; the function is unchanged.
    let x = tensor([3, 5], 9, 1.0, &dev);
    let before = model.model().b.forward(x.clone());
    let scheduler = restart_with_masks(&mut model, "default", masks.clone()).unwrap();
    assert!(!scheduler.collects());
    close(
        &vec2(model.model().b.forward(x)),
        &vec2(before),
        0.0,
        "restart",
    );
    assert_eq!(
        model.adapters()["default"].config.schedule.as_deref(),
        Some("default")
    );

    // Both phases in one call: both adapters train from step 0 of phase 2.
    let mut model = RosaModel::new(Act::new(&dev), config).unwrap();
    let first_loss = model.model().loss(0, &dev).into_scalar::<f32>();
    let masks2 = two_phase(
        &mut model,
        "default",
        || SgdConfig::new().init(),
        0.01,
        6,
        |m, s| m.loss(s % 2, &dev),
    )
    .unwrap();
    assert_eq!(masks2.nnz(), 6 + 8);
    let adapter = adapter_of(model.model(), "a");
    assert!(
        vec1(adapter.spa_values.unwrap().val())
            .iter()
            .any(|&v| v != 0.0)
    );
    let last_loss = model.model().loss(0, &dev).into_scalar::<f32>();
    assert!(last_loss < first_loss, "{first_loss} -> {last_loss}");
}
