//! AdaLoRA: schedule, config validation, both attach paths, merge, save/load with truncation,
//! the allocator inside the training step, the regularizer's gradient, resume equivalence.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use peft_adalora::{
    AdaLoraAdapter, AdaLoraConfig, AdaLoraModel, LoadOptions, RankAllocator, SaveOptions,
    budget_schedule, orthogonality,
};
use peft_core::step::Stepper;
use peft_core::{ModuleSelector, PeftError, PeftLinear, hosts};

/// Two layers as in the spec's worked example: `lin0` 10 -> 20, `lin1` 20 -> 2.
#[derive(Module, Debug)]
struct Net<L> {
    lin0: L,
    lin1: L,
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

impl Layer for PeftLinear<AdaLoraAdapter> {
    fn from_linear(l: Linear) -> Self {
        PeftLinear::from(l)
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

type Weight = Net<Linear>;
type Activation = Net<PeftLinear<AdaLoraAdapter>>;

/// Deterministic values (burn's seed is process-global, so tests do not rely on it).
fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.6)
        .collect()
}

fn linear(d_in: usize, d_out: usize, salt: usize, device: &Device) -> Linear {
    let mut l = LinearConfig::new(d_in, d_out).init(device);
    l.weight = l.weight.map(|_| {
        Tensor::from_data(
            TensorData::new(values(d_in * d_out, salt), [d_in, d_out]),
            device,
        )
    });
    l.bias = l.bias.map(|b| {
        b.map(|_| Tensor::from_data(TensorData::new(values(d_out, salt + 10), [d_out]), device))
    });
    l
}

impl<L: Layer> Net<L> {
    fn new(device: &Device) -> Self {
        Self {
            lin0: L::from_linear(linear(10, 20, 1, device)),
            lin1: L::from_linear(linear(20, 2, 2, device)),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.lin1
            .apply(burn::tensor::activation::relu(self.lin0.apply(x)))
    }
}

fn input(device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values(8 * 10, 3), [8, 10]), device)
}

fn device() -> Device {
    Device::flex().autodiff()
}

fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// The spec's worked example: init_r 6, target_r 2, tinit 2, tfinal 3, deltaT 2, T 12.
fn example_config() -> AdaLoraConfig {
    AdaLoraConfig::new(ModuleSelector::names(["lin0", "lin1"]), 12)
        .with_ranks(6, 2)
        .with_schedule(2, 3, 2)
        .with_alpha(4.0)
}

#[test]
fn budget_schedule_matches_peft_worked_example() {
    let config = example_config();
    let got: Vec<(usize, bool)> = (0..=12).map(|t| budget_schedule(&config, 2, t)).collect();
    let expected = vec![
        (12, false),
        (12, false),
        (12, false),
        (9, false),
        (6, true),
        (5, false),
        (4, true),
        (4, false),
        (4, true),
        (4, false),
        (4, true),
        (4, true),
        (4, true),
    ];
    assert_eq!(got, expected);
}

#[test]
fn invalid_configs_name_the_field() {
    let base = example_config();
    let cases: Vec<(&str, AdaLoraConfig)> = vec![
        (
            "total_step",
            AdaLoraConfig {
                total_step: None,
                ..base.clone()
            },
        ),
        ("tinit", base.clone().with_schedule(9, 3, 1)),
        ("init_r", base.clone().with_ranks(0, 0)),
        ("deltaT", base.clone().with_schedule(2, 3, 0)),
        (
            "beta1",
            AdaLoraConfig {
                beta1: 1.0,
                ..base.clone()
            },
        ),
        (
            "beta2",
            AdaLoraConfig {
                beta2: 0.0,
                ..base.clone()
            },
        ),
        ("orth_reg_weight", base.clone().with_orth_reg_weight(-0.1)),
        ("use_dora", {
            let mut c = base.clone();
            c.lora.use_dora = true;
            c
        }),
    ];
    for (field, config) in cases {
        let err = config.validate().unwrap_err();
        let text = err.to_string();
        assert!(text.contains(field), "{field}: {text}");
    }
    assert!(base.validate().is_ok());
}

/// `adapter_config.json` fields of `example_config()` plus `extra`, parsed as a file is.
fn parse(extra: serde_json::Value) -> AdaLoraConfig {
    use peft_core::Method;
    let mut map = example_config().to_json(&peft_core::hf::KeyMap::default());
    map.insert("inference_mode".into(), false.into());
    for (k, v) in extra.as_object().unwrap() {
        map.insert(k.clone(), v.clone());
    }
    AdaLoraConfig::from_json(
        map,
        std::path::Path::new("adapter_config.json"),
        &Default::default(),
    )
    .unwrap()
}

fn warned_fields(config: &AdaLoraConfig) -> Vec<String> {
    use peft_core::PeftConfig;
    config.warnings().into_iter().map(|w| w.field).collect()
}

#[test]
fn configs_peft_accepts_load_with_a_warning_and_peft_behaviour() {
    use peft_lora::InitLoraWeights;
    // What PEFT 0.21 accepts: `use_rslora` (ignored by AdaLoRA), any truthy
    // `init_lora_weights` string (its default init), `target_r > init_r`.
    let plain = parse(serde_json::json!({}));
    assert!(warned_fields(&plain).is_empty());
    let moved = parse(serde_json::json!({
        "use_rslora": true,
        "init_lora_weights": "eva",
        "target_r": 8,
    }));
    assert_eq!(
        warned_fields(&moved),
        ["use_rslora", "init_lora_weights", "target_r"]
    );
    assert_eq!(moved.lora.init_lora_weights, InitLoraWeights::Default);
    assert_eq!(
        moved.scale(),
        plain.scale(),
        "rsLoRA does not change AdaLoRA's scale"
    );
    // An empty string is falsy in PEFT: the random init.
    let empty = parse(serde_json::json!({ "init_lora_weights": "" }));
    assert_eq!(empty.lora.init_lora_weights, InitLoraWeights::Random);
    assert_eq!(warned_fields(&empty), ["init_lora_weights"]);
    // Built in Rust, "gaussian" is PEFT's truthy string too.
    let mut gaussian = example_config();
    gaussian.lora.init_lora_weights = InitLoraWeights::Gaussian;
    assert!(gaussian.validate().is_ok());
    assert_eq!(warned_fields(&gaussian), ["init_lora_weights"]);

    // The model builds and trains: an identity at start (E zero), and with target_r > init_r
    // the budget never shrinks (PEFT fails at its first masking step), so nothing is masked.
    let dev = device();
    let mut peft = AdaLoraModel::new(Activation::new(&dev), moved.clone()).unwrap();
    let x = input(&dev);
    assert!(
        max_diff(
            peft.model().forward(x.clone()),
            Activation::new(&dev).forward(x)
        ) < 1e-6
    );
    deterministic(&mut peft);
    let allocator = shared(&moved);
    let mut stepper = Stepper::new().with(allocator.clone());
    train(0..12, &mut peft, &mut stepper);
    let pattern = allocator.lock().unwrap().rank_pattern().cloned().unwrap();
    assert!(pattern.values().flatten().all(|k| *k), "{pattern:?}");
}

#[test]
fn target_total_rank_replaces_target_r_times_matrices_as_in_loralib() {
    let config = example_config().with_target_total_rank(3);
    let got: Vec<(usize, bool)> = (0..=12).map(|t| budget_schedule(&config, 2, t)).collect();
    // init 12, target 3: b(t) = floor(9 (1 - (t - 2) / 7)³ + 3) while decaying.
    let expected = vec![
        (12, false),
        (12, false),
        (12, false),
        (8, false),
        (6, true),
        (4, false),
        (3, true),
        (3, false),
        (3, true),
        (3, false),
        (3, true),
        (3, true),
        (3, true),
    ];
    assert_eq!(got, expected);

    // Written to and read from adapter_config.json only when set.
    use peft_core::Method;
    let key_map = peft_core::hf::KeyMap::default();
    assert!(
        !example_config()
            .to_json(&key_map)
            .contains_key("target_total_rank")
    );
    assert_eq!(
        parse(serde_json::json!({ "target_total_rank": 3 })).target_total_rank,
        Some(3)
    );

    // Trained to the end: 3 triplets kept in total, where target_r alone keeps 2 x 2.
    let dev = device();
    let kept = |config: AdaLoraConfig| {
        let config = random(&config);
        let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
        deterministic(&mut peft);
        let allocator = shared(&config);
        let mut stepper = Stepper::new().with(allocator.clone());
        train(0..12, &mut peft, &mut stepper);
        let p = allocator.lock().unwrap().rank_pattern().cloned().unwrap();
        p.values().flatten().filter(|k| **k).count()
    };
    assert_eq!(kept(example_config().with_target_total_rank(3)), 3);
    assert_eq!(kept(example_config()), 4);
}

#[test]
fn scale_is_alpha_over_init_r_and_identity_at_init() {
    let dev = device();
    let config = example_config();
    assert!((config.scale() - 4.0 / (6.0 + 1e-5)).abs() < 1e-12);
    let base = Activation::new(&dev);
    let out = base.forward(input(&dev));
    let peft = AdaLoraModel::new(base, config).unwrap();
    assert!(max_diff(peft.model().forward(input(&dev)), out) == 0.0);
    // A (6x10 + 6 + 6x20) + B (6x20 + 6 + 6x2) trainable.
    assert_eq!(
        peft.trainable_parameters().0,
        6 * 10 + 6 + 6 * 20 + 6 * 20 + 6 + 6 * 2
    );
}

/// Overwrite every adapter parameter with deterministic values (burn's random init draws from a
/// process-global generator that parallel tests share, so it is not reproducible).
fn deterministic<M: Module>(peft: &mut AdaLoraModel<M>) {
    peft.map_model(|mut m| {
        hosts::for_each(&mut m, |h: hosts::HostView<'_, AdaLoraAdapter>| {
            let salt = h.path.len();
            if let Some(a) = h.slot.get_mut("default") {
                let [rows, r] = a.lora_a.shape().dims();
                let [_, cols] = a.lora_b.shape().dims();
                let d = a.lora_a.device();
                let t = |n: usize, salt: usize, shape: Vec<usize>| {
                    TensorData::new(values(n, salt), shape)
                };
                let sa = Tensor::<2>::from_data(t(rows * r, salt + 5, vec![rows, r]), &d);
                let se = Tensor::<1>::from_data(t(r, salt + 6, vec![r]), &d);
                let sb = Tensor::<2>::from_data(t(r * cols, salt + 7, vec![r, cols]), &d);
                let (ga, ge, gb) = (
                    a.lora_a.is_require_grad(),
                    a.lora_e.is_require_grad(),
                    a.lora_b.is_require_grad(),
                );
                a.lora_a = a.lora_a.clone().map(|_| sa.set_require_grad(ga));
                a.lora_e = a.lora_e.clone().map(|_| se.set_require_grad(ge));
                a.lora_b = a.lora_b.clone().map(|_| sb.set_require_grad(gb));
            }
            Ok(())
        })
        .unwrap();
        m
    });
}

fn random(config: &AdaLoraConfig) -> AdaLoraConfig {
    config.clone().with_identity_init(false)
}

/// Copy the adapters of one model onto the other through files (the two paths differ in type).
fn same_adapters<A: Module, B: Module>(from: &AdaLoraModel<A>, onto: B) -> AdaLoraModel<B> {
    let dir = tempfile::tempdir().unwrap();
    from.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let options = LoadOptions {
        is_trainable: true,
        ..LoadOptions::default()
    };
    AdaLoraModel::from_pretrained(onto, dir.path(), &options).unwrap()
}

#[test]
fn both_paths_agree_and_merge_equals_unmerged() {
    let dev = device();
    let mut weight = AdaLoraModel::new(Weight::new(&dev), random(&example_config())).unwrap();
    deterministic(&mut weight);
    let activation = same_adapters(&weight, Activation::new(&dev));
    let x = input(&dev);
    let yw = weight.model().forward(x.clone());
    let ya = activation.model().forward(x.clone());
    assert!(max_diff(yw.clone(), ya.clone()) < 1e-5);
    assert!(max_diff(yw.clone(), Weight::new(&dev).forward(x.clone())) > 1e-3);

    // Gradients of the adapter parameters agree.
    let gw = weight
        .model()
        .forward(x.clone())
        .powi_scalar(2)
        .sum()
        .backward();
    let ga = activation
        .model()
        .forward(x.clone())
        .powi_scalar(2)
        .sum()
        .backward();
    let grads = |model: &dyn Fn() -> Vec<(String, AdaLoraAdapter)>, g: &burn::tensor::Gradients| {
        model()
            .into_iter()
            .map(|(_, a)| {
                (
                    a.lora_a.grad(g).unwrap().into_data(),
                    a.lora_e.grad(g).unwrap().into_data(),
                )
            })
            .collect::<Vec<_>>()
    };
    let wl = || adapters(weight.model());
    let al = || adapters(activation.model());
    for ((wa, we), (aa, ae)) in grads(&wl, &gw).into_iter().zip(grads(&al, &ga)) {
        wa.assert_approx_eq::<f32>(&aa, burn::tensor::Tolerance::rel_abs(1e-5, 1e-5));
        we.assert_approx_eq::<f32>(&ae, burn::tensor::Tolerance::rel_abs(1e-5, 1e-5));
    }

    let mut peft = activation;
    peft.merge_adapter(None, true).unwrap();
    assert!(max_diff(peft.model().forward(x.clone()), ya.clone()) < 1e-5);
    peft.unmerge_adapter();
    assert!(max_diff(peft.model().forward(x.clone()), ya.clone()) < 1e-5);
    let plain = peft.merge_and_unload(true).unwrap();
    assert!(max_diff(plain.forward(x.clone()), ya.clone()) < 1e-5);
}

fn adapters<M: Module>(model: &M) -> Vec<(String, AdaLoraAdapter)> {
    hosts::collect(model, |h: &hosts::HostView<'_, AdaLoraAdapter>| {
        h.slot.get("default").map(|a| (h.path.clone(), a.clone()))
    })
}

fn train(
    steps: std::ops::Range<usize>,
    peft: &mut AdaLoraModel<Activation>,
    stepper: &mut Stepper<Activation>,
) {
    let dev = device();
    let mut optim = SgdConfig::new().init();
    for _ in steps {
        let model = peft.model().clone();
        let loss = model.forward(input(&dev)).powi_scalar(2).mean();
        let next = stepper.step(model, &mut optim, 0.05, loss).unwrap();
        peft.map_model(|_| next);
    }
}

#[test]
fn allocator_masks_to_the_budget_and_fixes_the_pattern() {
    let config = random(&example_config());
    let dev = device();
    let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
    deterministic(&mut peft);
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator.clone());
    let e_values = |peft: &AdaLoraModel<Activation>| -> Vec<Vec<f32>> {
        adapters(peft.model())
            .iter()
            .map(|(_, a)| a.lora_e.val().into_data().try_to_vec::<f32>().unwrap())
            .collect()
    };
    let pattern = || {
        let p = allocator.lock().unwrap().rank_pattern().cloned().unwrap();
        vec![p["lin0"].clone(), p["lin1"].clone()]
    };
    let zero_exactly_where_dropped = |e: &[Vec<f32>], p: &[Vec<bool>]| {
        e.iter()
            .flatten()
            .zip(p.iter().flatten())
            .all(|(v, keep)| (*v == 0.0) != *keep)
    };
    train(0..4, &mut peft, &mut stepper);
    assert!(
        allocator.lock().unwrap().rank_pattern().is_none(),
        "no mask before step 4"
    );

    // Step 4 masks to budget 6 of 12: at most 6 kept (ties at the threshold drop more).
    train(4..5, &mut peft, &mut stepper);
    let p4 = pattern();
    let kept4 = p4.iter().flatten().filter(|k| **k).count();
    assert!((1..=6).contains(&kept4), "{p4:?}");
    assert!(zero_exactly_where_dropped(&e_values(&peft), &p4));

    // Step 5 does not mask: the dropped values revive (soft masking, as in PEFT).
    train(5..6, &mut peft, &mut stepper);
    assert!(e_values(&peft).iter().flatten().all(|v| *v != 0.0));

    // Step 9 = T - tfinal forces the final mask at the target budget; it stays fixed after.
    train(6..10, &mut peft, &mut stepper);
    let p9 = pattern();
    let kept9 = p9.iter().flatten().filter(|k| **k).count();
    assert!((1..=4).contains(&kept9), "target_r 2 x 2 matrices: {p9:?}");
    train(10..12, &mut peft, &mut stepper);
    assert_eq!(pattern(), p9);
    assert!(zero_exactly_where_dropped(&e_values(&peft), &p9));
}

fn shared(config: &AdaLoraConfig) -> Arc<Mutex<RankAllocator>> {
    Arc::new(Mutex::new(RankAllocator::new(config, "default").unwrap()))
}

#[test]
fn truncated_save_loads_with_the_same_outputs() {
    let config = random(&example_config());
    let dev = device();
    let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
    deterministic(&mut peft);
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator.clone());
    train(0..12, &mut peft, &mut stepper);
    allocator
        .lock()
        .unwrap()
        .write_rank_pattern(&mut peft)
        .unwrap();
    let pattern = peft.adapters()["default"]
        .config
        .rank_pattern
        .clone()
        .unwrap();
    assert_eq!(pattern.values().flatten().filter(|k| **k).count(), 4);
    let out = peft.model().forward(input(&dev));

    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let tensors =
        peft_core::hf::read_tensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    let kept0 = pattern["lin0"].iter().filter(|k| **k).count();
    assert_eq!(
        tensors["base_model.model.lin0.lora_A"].shape().to_vec(),
        vec![kept0, 10]
    );
    assert_eq!(
        tensors["base_model.model.lin0.lora_E"].shape().to_vec(),
        vec![kept0, 1]
    );
    assert_eq!(
        tensors["base_model.model.lin0.lora_B"].shape().to_vec(),
        vec![20, kept0]
    );
    let json = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["peft_type"], "ADALORA");
    assert_eq!(
        json["rank_pattern"]["lin0.lora_E"],
        serde_json::Value::from(pattern["lin0"].clone())
    );
    assert_eq!(json["deltaT"], 2);

    let loaded =
        AdaLoraModel::from_pretrained(Activation::new(&dev), dir.path(), &LoadOptions::default())
            .unwrap();
    assert!(max_diff(loaded.model().forward(input(&dev)), out) < 1e-6);
    // A second save of the loaded (already truncated) adapter keeps the same tensors: keys,
    // shapes and values (TensorData's equality compares all three), and the same config.
    let dir2 = tempfile::tempdir().unwrap();
    loaded
        .save_pretrained(dir2.path(), &SaveOptions::default())
        .unwrap();
    let again =
        peft_core::hf::read_tensors(&dir2.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(again, tensors);
    let json2 = std::fs::read_to_string(dir2.path().join("adapter_config.json")).unwrap();
    let json2: serde_json::Value = serde_json::from_str(&json2).unwrap();
    assert_eq!(json2, json);
}

#[test]
fn orthogonality_gradient_is_added_to_the_adapter_gradients() {
    let config = random(&example_config()).with_orth_reg_weight(0.5);
    let dev = device();
    let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
    deterministic(&mut peft);
    let model = peft.model().clone();

    // R by hand, in PyTorch layout: A (r, in) -> A·Aᵀ, B (out, r) -> Bᵀ·B.
    let mut manual = 0.0f64;
    let layers = adapters(&model);
    for (_, a) in &layers {
        let pa = a.lora_a.val().transpose();
        let pb = a.lora_b.val().transpose();
        for c in [
            pa.clone().matmul(pa.transpose()),
            pb.clone().transpose().matmul(pb),
        ] {
            let r = c.dims()[0];
            let d = c - Tensor::<2>::eye(r, &dev);
            manual += f64::from(d.powi_scalar(2).sum().sqrt().into_scalar::<f32>());
        }
    }
    manual /= (2 * layers.len()) as f64;
    let reg = orthogonality(&model, "default")
        .unwrap()
        .into_scalar::<f32>();
    assert!(
        (f64::from(reg) - manual).abs() < 1e-4 * manual,
        "{reg} vs {manual}"
    );

    // The controller adds d(0.5·R)/dA to the loss gradient.
    let loss = || model.forward(input(&dev)).powi_scalar(2).mean();
    let plain = GradientsParams::from_grads(loss().backward(), &model);
    let mut with_reg = GradientsParams::from_grads(loss().backward(), &model);
    let mut allocator = RankAllocator::new(&config, "default").unwrap();
    peft_core::step::Controller::before_optimizer(
        &mut allocator,
        peft_core::step::StepInfo { step: 0, lr: 0.0 },
        &model,
        &mut with_reg,
    )
    .unwrap();
    let reg_only = GradientsParams::from_grads(
        (orthogonality(&model, "default").unwrap() * 0.5).backward(),
        &model,
    );
    let id = layers[0].1.lora_a.id;
    let expected = plain.get::<2>(id).unwrap() + reg_only.get::<2>(id).unwrap();
    with_reg
        .get::<2>(id)
        .unwrap()
        .into_data()
        .assert_approx_eq::<f32>(
            &expected.into_data(),
            burn::tensor::Tolerance::absolute(1e-6),
        );
}

#[test]
fn resumed_allocator_ends_like_an_uninterrupted_run() {
    let config = random(&example_config());
    let dev = device();
    let fresh = || {
        let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
        deterministic(&mut peft);
        peft
    };
    let finish = |peft: &AdaLoraModel<Activation>, allocator: &Arc<Mutex<RankAllocator>>| {
        let e: Vec<Vec<f32>> = adapters(peft.model())
            .into_iter()
            .map(|(_, a)| a.lora_e.val().into_data().try_to_vec::<f32>().unwrap())
            .collect();
        let allocator = allocator.lock().unwrap();
        (
            e,
            allocator.rank_pattern().cloned(),
            allocator.state().threshold,
        )
    };

    let mut straight = fresh();
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator.clone());
    train(0..12, &mut straight, &mut stepper);
    let expected = finish(&straight, &allocator);
    assert!(expected.1.is_some());

    // Stop after step 7 (mid-decay, EMAs and a pattern in flight), keep the model and the
    // allocator state as JSON, resume in a new allocator (SGD has no state of its own).
    let mut first = fresh();
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator.clone());
    train(0..8, &mut first, &mut stepper);
    let json = allocator.lock().unwrap().state_json();
    assert!(json.contains("ipt"), "the EMAs are part of the state");
    let resumed_allocator = shared(&config);
    resumed_allocator
        .lock()
        .unwrap()
        .load_state_json(&json)
        .unwrap();
    let mut resumed = Stepper::new().with(resumed_allocator.clone());
    resumed.set_step_index(8);
    train(8..12, &mut first, &mut resumed);
    assert_eq!(finish(&first, &resumed_allocator), expected);

    // Without the state, the run ends elsewhere (here: another final threshold, because the
    // final mask ranks EMAs of 2 steps instead of 9): the test can tell.
    let mut lost = fresh();
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator);
    train(0..8, &mut lost, &mut stepper);
    let blank = shared(&config);
    let mut restarted = Stepper::new().with(blank.clone());
    restarted.set_step_index(8);
    train(8..12, &mut lost, &mut restarted);
    assert_ne!(finish(&lost, &blank), expected);
}

#[test]
fn identity_init_trains_to_the_target_budget_and_bad_targets_error() {
    // From PEFT's default init (E = 0: A and B get no gradient at first, so their scores are
    // zero), the run stays finite and ends at the target budget.
    let config = example_config();
    let dev = device();
    let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator.clone());
    train(0..12, &mut peft, &mut stepper);
    for (_, a) in adapters(peft.model()) {
        let e: Vec<f32> = a.lora_e.val().into_data().try_to_vec::<f32>().unwrap();
        assert!(e.iter().all(|v| v.is_finite()));
    }
    let kept = allocator
        .lock()
        .unwrap()
        .rank_pattern()
        .unwrap()
        .values()
        .flatten()
        .filter(|k| **k)
        .count();
    // target_r 2 on each of the two matrices: exactly the budget, not fewer (a run that masks
    // everything must fail here).
    assert_eq!(kept, 4, "final rank pattern");
    let err = AdaLoraModel::new(
        Activation::new(&dev),
        AdaLoraConfig::new(ModuleSelector::names(["nothing"]), 10),
    )
    .unwrap_err();
    assert!(matches!(err, PeftError::TargetNotFound { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Parity with PEFT 0.21.2 (fixtures written by fixtures/make_adalora_fixtures.py).
// ---------------------------------------------------------------------------------------------

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn tensor2(data: &TensorData, dev: &Device) -> Tensor<2> {
    Tensor::from_data(data.clone(), dev)
}

/// The fixture's base model (PyTorch `[out, in]` weights transposed to burn's `[in, out]`).
fn fixture_base(dev: &Device) -> Activation {
    let base = peft_core::hf::read_tensors(&fixtures().join("peft/base.safetensors")).unwrap();
    let layer = |name: &str| {
        let w = tensor2(&base[&format!("{name}.weight")], dev).transpose();
        let [d_in, d_out] = w.dims();
        let mut l = LinearConfig::new(d_in, d_out).init(dev);
        l.weight = l.weight.map(|_| w);
        let b = Tensor::<1>::from_data(base[&format!("{name}.bias")].clone(), dev);
        l.bias = l.bias.map(|p| p.map(|_| b));
        PeftLinear::from(l)
    };
    Net {
        lin0: layer("lin0"),
        lin1: layer("lin1"),
    }
}

fn fixture_config() -> AdaLoraConfig {
    example_config().with_orth_reg_weight(0.0)
}

fn patterns(run: &str) -> Vec<Option<std::collections::BTreeMap<String, Vec<bool>>>> {
    let text = std::fs::read_to_string(fixtures().join(run).join("patterns.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Set adapter parameters from PEFT-layout tensors, keeping the parameter ids.
fn set_from_peft(model: Activation, values: &dyn Fn(&str, &str) -> TensorData) -> Activation {
    let mut model = model;
    let values = |layer: &str, which: &str| values(layer, which);
    let fetched: Vec<(String, [TensorData; 3])> = ["lin0", "lin1"]
        .iter()
        .map(|l| {
            (
                l.to_string(),
                [values(l, "A"), values(l, "E"), values(l, "B")],
            )
        })
        .collect();
    hosts::for_each(&mut model, move |h: hosts::HostView<'_, AdaLoraAdapter>| {
        let Some(a) = h.slot.get_mut("default") else {
            return Ok(());
        };
        let [pa, pe, pb] = &fetched.iter().find(|(l, _)| *l == h.path).unwrap().1;
        let d = a.lora_a.device();
        let r = a.rank();
        let (ga, ge, gb) = (
            a.lora_a.is_require_grad(),
            a.lora_e.is_require_grad(),
            a.lora_b.is_require_grad(),
        );
        let ta = tensor2(pa, &d).transpose();
        let te = tensor2(pe, &d).reshape([r]);
        let tb = tensor2(pb, &d).transpose();
        a.lora_a = a.lora_a.clone().map(|_| ta.set_require_grad(ga));
        a.lora_e = a.lora_e.clone().map(|_| te.set_require_grad(ge));
        a.lora_b = a.lora_b.clone().map(|_| tb.set_require_grad(gb));
        Ok(())
    })
    .unwrap();
    model
}

/// `max |ours - theirs| <= 1e-5 · max |theirs| + 1e-12`, PEFT's gradient in PyTorch layout.
fn assert_gradient_close(ours: Tensor<2>, theirs: &TensorData, what: &str) {
    let theirs: Vec<f32> = theirs.to_owned().try_to_vec::<f32>().unwrap();
    let ours: Vec<f32> = ours.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = ours
        .iter()
        .zip(&theirs)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 1e-5 * scale + 1e-12,
        "{what}: our gradient differs from PEFT's by {diff} (PEFT's largest entry {scale})"
    );
}

/// Replays a PEFT AdaLoRA run step by step: from PEFT's parameters at the start of each step our
/// loss gives PEFT's gradients (with PEFT's orthogonal regularizer added when the run has one);
/// the allocator, fed our gradients and PEFT's parameters after its optimizer step, masks to
/// PEFT's `rank_pattern` and leaves PEFT's `lora_E`, bit for bit.
fn replay_peft_run(run: &str, config: &AdaLoraConfig) {
    use peft_core::step::{Controller, StepInfo};
    let dev = device();
    let steps =
        peft_core::hf::read_tensors(&fixtures().join(run).join("steps.safetensors")).unwrap();
    let expected = patterns(run);
    let x = tensor2(&steps["input"], &dev);
    let y = tensor2(&steps["target"], &dev);
    let peft = AdaLoraModel::new(fixture_base(&dev), config.clone()).unwrap();
    let mut model = set_from_peft(peft.model().clone(), &|l, w| {
        steps[&format!("init.{l}.{w}")].clone()
    });
    let mut allocator = RankAllocator::new(config, "default").unwrap();
    let mut masked_somewhere = false;
    for (t, expected_pattern) in expected.iter().enumerate() {
        let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let info = StepInfo { step: t, lr: 0.0 };
        allocator
            .before_optimizer(info, &model, &mut grads)
            .unwrap();
        for (path, a) in adapters(&model) {
            let theirs = |w: &str| &steps[&format!("step{t}.{path}.{w}")];
            let what = |w: &str| format!("{run} step {t}, {path}: {w}");
            let ga = grads.get::<2>(a.lora_a.id).unwrap().transpose();
            assert_gradient_close(ga, theirs("gA"), &what("gA"));
            let ge = grads.get::<1>(a.lora_e.id).unwrap().reshape([a.rank(), 1]);
            assert_gradient_close(ge, theirs("gE"), &what("gE"));
            let gb = grads.get::<2>(a.lora_b.id).unwrap().transpose();
            assert_gradient_close(gb, theirs("gB"), &what("gB"));
        }
        // The parameters after PEFT's optimizer step.
        model = set_from_peft(model, &|l, w| steps[&format!("step{t}.{l}.{w}")].clone());
        model = allocator.after_optimizer(info, model).unwrap();

        assert_eq!(
            allocator.rank_pattern(),
            expected_pattern.as_ref(),
            "{run} step {t}"
        );
        for (path, a) in adapters(&model) {
            let ours: Vec<f32> = a.lora_e.val().into_data().try_to_vec::<f32>().unwrap();
            let theirs: Vec<f32> = steps[&format!("step{t}.{path}.E_after")]
                .to_owned()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(
                ours, theirs,
                "{run} step {t}, {path}: lora_E after the allocator"
            );
            masked_somewhere |= ours.contains(&0.0);
        }
    }
    assert!(masked_somewhere, "{run}: the fixture exercises masking");
}

#[test]
fn allocator_replays_peft_gradients_rank_patterns_and_masked_values() {
    replay_peft_run("peft", &fixture_config());
    let last = patterns("peft").last().unwrap().clone().unwrap();
    assert!(
        last["lin1"].iter().all(|k| !k),
        "lin1 ends at rank 0 in the fixture"
    );
}

#[test]
fn allocator_sees_the_clipped_gradients_when_the_optimizer_clips() {
    use burn::optim::grad_clipping::GradientClippingConfig;
    // PEFT's run with `clip_grad_value_(5e-5)` before `optimizer.step()` and
    // `update_and_allocate`: told the optimizer's clipping, the allocator keeps PEFT's triplets.
    let clip = GradientClippingConfig::Value(5e-5);
    replay_peft_run("peft/clip", &fixture_config().with_grad_clipping(clip));
    // Fed the unclipped gradients (the behaviour before), it keeps others: the fixture script
    // asserts that for PEFT's own allocator, and here the replay must fail.
    let unclipped = std::panic::catch_unwind(|| replay_peft_run("peft/clip", &fixture_config()));
    assert!(
        unclipped.is_err(),
        "the clip fixture does not tell clipped from unclipped"
    );
}

#[test]
fn orthogonal_regularizer_replays_peft_gradients_and_rank_patterns() {
    replay_peft_run("peft/orth", &fixture_config().with_orth_reg_weight(0.5));
}

#[test]
fn peft_saved_adapter_loads_with_peft_outputs_including_a_rank_zero_module() {
    let dev = device();
    let io = peft_core::hf::read_tensors(&fixtures().join("peft/io.safetensors")).unwrap();
    let peft = AdaLoraModel::from_pretrained(
        fixture_base(&dev),
        &fixtures().join("peft/adapter"),
        &LoadOptions::default(),
    )
    .unwrap();
    let ranks: Vec<usize> = adapters(peft.model())
        .iter()
        .map(|(_, a)| a.rank())
        .collect();
    assert_eq!(ranks, vec![4, 0]);
    let out = peft.model().forward(tensor2(&io["input"], &dev));
    let expected = tensor2(&io["output"], &dev);
    assert!(max_diff(out.clone(), expected.clone()) < 1e-5);
    assert!(
        max_diff(
            fixture_base(&dev).forward(tensor2(&io["input"], &dev)),
            expected
        ) > 1e-4
    );

    // What we save from it is what PEFT loads: `make_adalora_fixtures.py verify` recorded the
    // SHA-256 of the files it loaded and its outputs with them; the writer is byte-deterministic
    // (sorted tensors, fixed metadata and field order), so today's bytes must hash the same.
    let burn_dir = fixtures().join("burn_saved");
    let written = tempfile::tempdir().unwrap();
    peft.save_pretrained(written.path(), &SaveOptions::default())
        .unwrap();
    if std::env::var_os("BURN_PEFT_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(&burn_dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(written.path().join(f), burn_dir.join(f)).unwrap();
        }
        let mut expected = std::collections::BTreeMap::new();
        expected.insert("input".to_string(), io["input"].clone());
        expected.insert("output".to_string(), out.into_data());
        peft_core::hf::write_tensors(&burn_dir.join("expected.safetensors"), &expected).unwrap();
        for stale in ["verified.json", "peft_outputs.safetensors"] {
            let _ = std::fs::remove_file(burn_dir.join(stale));
        }
        panic!(
            "fixtures rewritten in {}; run `python \
             crates/peft-adalora/fixtures/make_adalora_fixtures.py verify`, then this test \
             without BURN_PEFT_WRITE_FIXTURES",
            burn_dir.display()
        );
    }
    let record = peft_core::hf::read_json(&burn_dir.join("verified.json"))
        .expect("burn_saved/verified.json: run make_adalora_fixtures.py verify");
    for dir in [written.path(), burn_dir.as_path()] {
        for (file, hash) in record["sha256"].as_object().unwrap() {
            use sha2::Digest;
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let ours = format!("{:x}", sha2::Sha256::digest(&bytes));
            assert_eq!(
                Some(ours.as_str()),
                hash.as_str(),
                "{file} in {} is not the file PEFT verified",
                dir.display()
            );
        }
    }
    // PEFT's output with our file is our output, before saving and after loading it back.
    let theirs =
        peft_core::hf::read_tensors(&burn_dir.join(record["peft_outputs"].as_str().unwrap()))
            .unwrap();
    assert_eq!(theirs["input"], io["input"]);
    let peft_output = tensor2(&theirs["output"], &dev);
    assert!(max_diff(out, peft_output.clone()) < 1e-5);
    let reloaded =
        AdaLoraModel::from_pretrained(fixture_base(&dev), &burn_dir, &LoadOptions::default())
            .unwrap();
    let again = reloaded.model().forward(tensor2(&io["input"], &dev));
    assert!(max_diff(again, peft_output) < 1e-5);
}

#[test]
fn budget_that_does_not_shrink_and_all_zero_scores_are_defined() {
    use peft_core::step::{Controller, StepInfo};
    let dev = device();
    // init_r == target_r: the budget never shrinks, nothing is masked, no crash (PEFT's
    // kthvalue fails here).
    let config = random(&example_config()).with_ranks(3, 3);
    let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
    deterministic(&mut peft);
    let allocator = shared(&config);
    let mut stepper = Stepper::new().with(allocator.clone());
    train(0..12, &mut peft, &mut stepper);
    let pattern = allocator.lock().unwrap().rank_pattern().cloned().unwrap();
    assert!(pattern.values().flatten().all(|k| *k), "{pattern:?}");

    // Every score zero (no gradient ever reached the adapter): the first mask drops all.
    let config = random(&example_config());
    let mut peft = AdaLoraModel::new(Activation::new(&dev), config.clone()).unwrap();
    deterministic(&mut peft);
    let mut allocator = RankAllocator::new(&config, "default").unwrap();
    let mut model = peft.model().clone();
    for t in 0..5 {
        let info = StepInfo { step: t, lr: 0.0 };
        allocator
            .before_optimizer(info, &model, &mut GradientsParams::new())
            .unwrap();
        model = allocator.after_optimizer(info, model).unwrap();
    }
    let pattern = allocator.rank_pattern().unwrap();
    assert!(pattern.values().flatten().all(|k| !k), "{pattern:?}");
    for (_, a) in adapters(&model) {
        let e: Vec<f32> = a.lora_e.val().into_data().try_to_vec::<f32>().unwrap();
        assert!(e.iter().all(|v| *v == 0.0));
    }

    // A broken checkpoint file is an error that names it, and changes nothing.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("allocator.json");
    std::fs::write(&file, "{not json").unwrap();
    let before = allocator.state().clone();
    let err = allocator.load_state(&file).unwrap_err();
    assert!(err.to_string().contains("allocator.json"), "{err}");
    assert_eq!(allocator.state(), &before);
}
