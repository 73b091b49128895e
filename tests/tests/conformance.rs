//! The method-generic conformance suite, run over a table of (config, attach path) cases.
//!
//! Every case checks: identity at default init, merged == unmerged output, unmerge restores
//! the weights, save -> load round trip into a model built under another seed, only adapter
//! parameters change in training, disable gives the base output, safe merge refuses NaN and
//! leaves the weights untouched, two active adapters add up, and both attach paths agree on
//! outputs and gradients.

use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use peft_adalora::AdaLoraConfig;
use peft_conformance::{TinyModel, max_diff, random_torch_weights, token_ids};
use peft_core::{
    Adapter, Method, ModuleSelector, PeftEmbedding, PeftError, PeftLinear, PeftModel, hosts,
};
use peft_lora::{InitLoraWeights, LoadOptions, LoraConfig, SaveOptions};
use peft_rosa::{InitRosaWeights, InitialMasks, MaskedAdapters, RosaConfig};
use peft_sft::{InitDeltas, SftConfig};

type Weight = TinyModel<Linear, Embedding>;
type Activation<A> = TinyModel<PeftLinear<A>, PeftEmbedding<A>>;

/// What the suite needs to know of a method beyond [`Method`].
trait Conformance: Method {
    /// The same config with a non-trivial initial adapter (not an identity).
    fn perturbed(&self) -> Self;
    /// Add adapter `name` with the [`perturbed`](Self::perturbed) config.
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>, name: &str) {
        peft.add_adapter(name, self.perturbed()).unwrap();
    }
    /// Whether merged deltas add up exactly (DoRA's do not).
    fn merges_add(&self) -> bool {
        true
    }
}

impl Conformance for LoraConfig {
    fn perturbed(&self) -> Self {
        self.clone().with_init(InitLoraWeights::Random)
    }
    fn merges_add(&self) -> bool {
        !self.use_dora
    }
}

impl Conformance for AdaLoraConfig {
    fn perturbed(&self) -> Self {
        self.clone().with_identity_init(false)
    }
}

impl Conformance for RosaConfig {
    /// Random factors and sparse values.
    fn perturbed(&self) -> Self {
        self.clone().with_init(InitRosaWeights::Random)
    }
    /// Random masks (seeded by module path) as well, given in-process.
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>, name: &str) {
        peft.add_adapter_with_masks(name, self.perturbed(), InitialMasks::Random(7))
            .unwrap();
    }
}

/// `base` with the perturbed adapter `"default"`, active.
fn perturbed<M: Module, C: Conformance>(base: M, config: &C) -> PeftModel<M, C> {
    let mut peft = PeftModel::empty(base);
    config.add_perturbed(&mut peft, "default");
    peft.set_adapter(&["default"]).unwrap();
    peft
}

fn rosa_cases() -> Vec<(&'static str, RosaConfig)> {
    let targets = ModuleSelector::names(["q_proj", "v_proj", "down_proj", "embed_tokens"]);
    vec![
        ("rosa", RosaConfig::new(4, 0.1, 8.0, targets.clone())),
        (
            "rosa_sparse_only",
            RosaConfig::new(0, 0.2, 8.0, targets.clone()).with_schedule("spa_only"),
        ),
        (
            "rosa_lora_only",
            RosaConfig::new(3, 0.0, 6.0, targets).with_schedule("lora_only"),
        ),
        (
            "rosa_patterns",
            RosaConfig::new(4, 0.05, 8.0, ModuleSelector::regex(r".*\.(up|down|o)_proj"))
                .with_rank_pattern("up_proj", 2)
                .with_density_pattern("o_proj", 0.3)
                .with_alpha_pattern("down_proj", 3.0)
                .with_rslora(true),
        ),
    ]
}

impl Conformance for SftConfig {
    /// Non-zero initial deltas (deterministic, seeded by module path).
    fn perturbed(&self) -> Self {
        self.clone().with_init(InitDeltas::Random(0.5))
    }
}

/// SFT adapts linear layers only (the reference's rule), so no embedding targets.
fn sft_cases() -> Vec<(&'static str, SftConfig)> {
    vec![
        (
            "sft",
            SftConfig::new(
                0.1,
                ModuleSelector::names(["q_proj", "v_proj", "down_proj"]),
            ),
        ),
        (
            "sft_sm3_regex",
            // 5% of the whole model (the reference's budget), in `up` and `o` alone.
            SftConfig::new(0.05, ModuleSelector::regex(r".*\.(up|o)_proj"))
                .with_selection(peft_sft::SelectionAlgorithm::Sm3)
                .with_seed(5),
        ),
    ]
}

fn adalora_cases() -> Vec<(&'static str, AdaLoraConfig)> {
    let targets = ModuleSelector::names(["q_proj", "v_proj", "down_proj"]);
    vec![
        (
            "adalora",
            AdaLoraConfig::new(targets.clone(), 10)
                .with_ranks(4, 2)
                .with_alpha(1.0),
        ),
        (
            "adalora_regex",
            AdaLoraConfig::new(ModuleSelector::regex(r".*\.(up|o)_proj"), 10)
                .with_ranks(3, 1)
                .with_alpha(0.5),
        ),
    ]
}

fn cases() -> Vec<(&'static str, LoraConfig)> {
    let targets = ModuleSelector::names(["q_proj", "v_proj", "down_proj", "embed_tokens"]);
    vec![
        ("lora", LoraConfig::new(4, 8.0, targets.clone())),
        (
            "rslora",
            LoraConfig::new(4, 6.0, targets.clone()).with_rslora(true),
        ),
        (
            "dora",
            LoraConfig::new(
                4,
                8.0,
                ModuleSelector::names(["q_proj", "k_proj", "down_proj"]),
            )
            .with_dora(true),
        ),
        (
            "pissa",
            LoraConfig::new(4, 8.0, ModuleSelector::names(["q_proj", "down_proj"]))
                .with_init(InitLoraWeights::Pissa),
        ),
        (
            "patterns",
            LoraConfig::new(4, 8.0, ModuleSelector::regex(r".*\.(up|down|o)_proj"))
                .with_rank_pattern("up_proj", 2)
                .with_alpha_pattern("o_proj", 3.0),
        ),
    ]
}

fn device() -> Device {
    Device::flex().autodiff()
}

/// The suite, generic over the model type (and so over the attach path).
trait Case: Module + Sized {
    fn build(seed: u64, device: &Device) -> Self;
    fn run(&self, device: &Device) -> Tensor<3>;
}

impl Case for Weight {
    fn build(seed: u64, device: &Device) -> Self {
        TinyModel::from_torch(&random_torch_weights(seed, device), device)
    }
    fn run(&self, device: &Device) -> Tensor<3> {
        self.forward(token_ids(device))
    }
}

impl<A: Adapter> Case for Activation<A> {
    fn build(seed: u64, device: &Device) -> Self {
        TinyModel::from_torch(&random_torch_weights(seed, device), device)
    }
    fn run(&self, device: &Device) -> Tensor<3> {
        self.forward(token_ids(device))
    }
}

fn check_case<M: Case, C: Conformance>(label: &str, config: &C) {
    let dev = device();
    let base = M::build(1, &dev);
    let base_out = base.run(&dev);

    // Identity at default init.
    let peft = PeftModel::new(base.clone(), config.clone()).unwrap();
    assert!(
        rel_diff(&peft.model().run(&dev), &base_out) < 1e-6,
        "{label}: identity at init"
    );

    // Non-trivial adapter from here on.
    let mut peft = perturbed(base.clone(), config);
    let out = peft.model().run(&dev);
    assert!(
        max_diff(&out, &base_out) > 1e-3,
        "{label}: adapter changes the output"
    );

    // Disable gives the base output; enable restores the adapted one.
    peft.set_enabled(false);
    assert!(
        rel_diff(&peft.model().run(&dev), &base_out) < 1e-6,
        "{label}: disabled"
    );
    peft.set_enabled(true);
    assert!(
        rel_diff(&peft.model().run(&dev), &out) < 1e-6,
        "{label}: re-enabled"
    );

    // Merge == unmerged; unmerge restores the base weights.
    let weights_before = base_weights(peft.model());
    peft.merge_adapter(None, true).unwrap();
    assert!(
        rel_diff(&peft.model().run(&dev), &out) < 1e-5,
        "{label}: merged output"
    );
    assert!(
        weights_differ(&weights_before, &base_weights(peft.model())),
        "{label}: merge changes base weights"
    );
    peft.unmerge_adapter();
    assert!(
        !weights_differ_by(&weights_before, &base_weights(peft.model()), 1e-5),
        "{label}: unmerge restores base weights"
    );
    assert!(
        rel_diff(&peft.model().run(&dev), &out) < 1e-5,
        "{label}: unmerged output"
    );

    // merge_and_unload gives a model without adapters and the same output.
    let plain = peft.clone().merge_and_unload(true).unwrap();
    assert!(
        rel_diff(&plain.run(&dev), &out) < 1e-5,
        "{label}: merge_and_unload"
    );
    assert_eq!(
        hosts::parameters(&plain)
            .iter()
            .filter(|(p, _, _)| p.contains("peft"))
            .count(),
        0,
        "{label}: no adapter parameters left"
    );

    // Save -> load into a model whose adapter would be initialised differently.
    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let fresh = M::build(1, &dev);
    dev.seed(999);
    let loaded =
        PeftModel::<M, C>::from_pretrained(fresh, dir.path(), &LoadOptions::default()).unwrap();
    let d = rel_diff(&loaded.model().run(&dev), &out);
    assert!(d < 1e-5, "{label}: save/load round trip {d}");
    assert_eq!(
        loaded.trainable_parameters().0,
        0,
        "{label}: loaded for inference is frozen"
    );

    // Safe merge refuses NaN and changes nothing.
    let mut broken = perturbed(base.clone(), config);
    config.add_perturbed(&mut broken, "nan");
    let good_out = broken.model().run(&dev);
    poison(&mut broken, "nan");
    broken.set_adapter(&["default", "nan"]).unwrap();
    let before = base_weights(broken.model());
    let err = broken.merge_adapter(None, true).unwrap_err();
    assert!(
        matches!(err, PeftError::NonFiniteMerge { ref name, .. } if name == "nan"),
        "{label}: {err}"
    );
    assert!(
        !weights_differ_by(&before, &base_weights(broken.model()), 0.0),
        "{label}: untouched"
    );
    broken.set_adapter(&["default"]).unwrap();
    assert!(
        rel_diff(&broken.model().run(&dev), &good_out) < 1e-6,
        "{label}: still usable"
    );

    // Two adapters active == the sum of their deltas.
    let mut two = perturbed(base.clone(), config);
    config.add_perturbed(&mut two, "other");
    let out_a = two.model().run(&dev);
    two.set_adapter(&["other"]).unwrap();
    let out_b = two.model().run(&dev);
    two.set_adapter(&["default", "other"]).unwrap();
    let out_ab = two.model().run(&dev);
    if config.merges_add() {
        // LoRA deltas add exactly on a linear map; the model's nonlinearity breaks additivity of
        // outputs, so compare through a merge: merging both equals both active.
        let mut merged = two.clone();
        let weights_before = base_weights(merged.model());
        // Sequential merges, then one unmerge undoes both (last in, first out).
        merged.merge_adapter(Some(&["other"]), false).unwrap();
        merged.merge_adapter(Some(&["default"]), false).unwrap();
        assert!(
            rel_diff(&merged.model().run(&dev), &out_ab) < 1e-4,
            "{label}: sequential merge"
        );
        merged.unmerge_adapter();
        assert!(
            !weights_differ_by(&weights_before, &base_weights(merged.model()), 1e-5),
            "{label}: LIFO unmerge restores base weights"
        );
        merged.merge_adapter(None, false).unwrap();
        assert!(
            rel_diff(&merged.model().run(&dev), &out_ab) < 1e-4,
            "{label}: both merged"
        );
    }
    assert!(
        max_diff(&out_ab, &out_a) > 1e-4 && max_diff(&out_ab, &out_b) > 1e-4,
        "{label}: both differ"
    );
    two.delete_adapter("other").unwrap();
    assert!(
        rel_diff(&two.model().run(&dev), &out_a) < 1e-6,
        "{label}: delete"
    );

    // Training changes only adapter parameters (and changes them).
    let mut train = perturbed(base.clone(), config);
    let mut optim = SgdConfig::new().init();
    // The method's own stepper (its controllers prepared on the model: probes included).
    let mut stepper = train.stepper(3).unwrap();
    let params = hosts::parameters(train.model());
    let before = param_values(train.model());
    for _ in 0..3 {
        let loss = train.model().run(&dev).powi_scalar(2).mean().reshape([1]);
        stepper.train(&mut train, &mut optim, 1e-4, loss).unwrap();
    }
    assert_eq!(stepper.step_index(), 3);
    let after = param_values(train.model());
    let mut changed_adapter = 0;
    for ((path, trainable, _), (old, new)) in params.iter().zip(before.iter().zip(after.iter())) {
        assert!(
            new.iter().all(|x| x.is_finite()),
            "{label}: {path} finite after training"
        );
        let moved = old.iter().zip(new).any(|(x, y)| x != y);
        if path.contains(".peft.") {
            assert!(*trainable, "{label}: {path} trainable");
            changed_adapter += moved as usize;
        } else {
            assert!(!trainable, "{label}: base parameter {path} frozen");
            assert!(!moved, "{label}: base parameter {path} changed");
        }
    }
    assert!(changed_adapter > 0, "{label}: adapters trained");
}

/// `max |a - b| / max(1, max |b|)`: equality up to float rounding at the output's scale.
fn rel_diff(a: &Tensor<3>, b: &Tensor<3>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    max_diff(a, b) / scale
}

fn base_weights<M: Module>(model: &M) -> Vec<Vec<f32>> {
    param_values(model)
        .into_iter()
        .zip(hosts::parameters(model))
        .filter(|(_, (p, _, _))| !p.contains("peft"))
        .map(|(v, _)| v)
        .collect()
}

fn param_values<M: Module>(model: &M) -> Vec<Vec<f32>> {
    struct V(Vec<Vec<f32>>);
    impl burn::module::ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            self.0
                .push(p.val().into_data().try_to_vec::<f32>().unwrap());
        }
    }
    let mut v = V(Vec::new());
    model.visit(&mut v);
    v.0
}

fn max_diff_data(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn weights_differ(a: &[Vec<f32>], b: &[Vec<f32>]) -> bool {
    weights_differ_by(a, b, 1e-6)
}

fn weights_differ_by(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) -> bool {
    a.iter().zip(b).any(|(x, y)| max_diff_data(x, y) > tol)
}

/// Set every parameter of adapter `name` to NaN.
fn poison<M: Module, C: Method>(peft: &mut PeftModel<M, C>, name: &str) {
    let marker = format!(".peft.{name}.");
    peft.map_model(|m| {
        let values = hosts::read_params(&m, |p| p.contains(&marker))
            .into_iter()
            .map(|(p, d)| {
                let shape = d.shape().to_vec();
                (p, TensorData::new(vec![f32::NAN; d.num_elements()], shape))
            })
            .collect();
        hosts::write_params(m, values).0
    });
}

#[test]
fn conformance_weight_space() {
    for (label, config) in cases() {
        check_case::<Weight, _>(&format!("weight/{label}"), &config);
    }
    for (label, config) in adalora_cases() {
        check_case::<Weight, _>(&format!("weight/{label}"), &config);
    }
    for (label, config) in rosa_cases() {
        check_case::<Weight, _>(&format!("weight/{label}"), &config);
    }
    for (label, config) in sft_cases() {
        check_case::<Weight, _>(&format!("weight/{label}"), &config);
    }
}

#[test]
fn conformance_activation_space() {
    for (label, config) in cases() {
        check_case::<Activation<peft_lora::LoraAdapter>, _>(
            &format!("activation/{label}"),
            &config,
        );
    }
    for (label, config) in adalora_cases() {
        check_case::<Activation<peft_adalora::AdaLoraAdapter>, _>(
            &format!("activation/{label}"),
            &config,
        );
    }
    for (label, config) in rosa_cases() {
        check_case::<Activation<peft_rosa::RosaAdapter>, _>(
            &format!("activation/{label}"),
            &config,
        );
    }
    for (label, config) in sft_cases() {
        check_case::<Activation<peft_sft::SftAdapter>, _>(&format!("activation/{label}"), &config);
    }
}

#[test]
fn both_attach_paths_agree_on_outputs_and_gradients() {
    for (label, config) in cases() {
        check_paths::<peft_lora::LoraAdapter, _>(label, &config);
    }
    for (label, config) in adalora_cases() {
        check_paths::<peft_adalora::AdaLoraAdapter, _>(label, &config);
    }
    for (label, config) in rosa_cases() {
        check_paths::<peft_rosa::RosaAdapter, _>(label, &config);
    }
    for (label, config) in sft_cases() {
        check_paths::<peft_sft::SftAdapter, _>(label, &config);
    }
}

fn check_paths<A: Adapter, C: Conformance<Adapter = A>>(label: &str, config: &C) {
    let dev = device();
    {
        // The same adapter values on both paths: saved from one, loaded into the other.
        let w = perturbed(Weight::build(3, &dev), config);
        let dir = tempfile::tempdir().unwrap();
        w.save_pretrained(dir.path(), &SaveOptions::default())
            .unwrap();
        let trainable = LoadOptions {
            is_trainable: true,
            ..Default::default()
        };
        let a = PeftModel::<Activation<A>, C>::from_pretrained(
            Activation::build(3, &dev),
            dir.path(),
            &trainable,
        )
        .unwrap();
        let (yw, ya) = (w.model().run(&dev), a.model().run(&dev));
        assert!(rel_diff(&yw, &ya) < 1e-5, "{label}: outputs");
        let gw = GradientsParams::from_grads(yw.powi_scalar(2).sum().backward(), w.model());
        let ga = GradientsParams::from_grads(ya.powi_scalar(2).sum().backward(), a.model());
        let collect = |model_params: Vec<(String, bool, usize)>,
                       ids: Vec<burn::module::ParamId>,
                       gp: &GradientsParams| {
            model_params
                .into_iter()
                .zip(ids)
                .filter(|((p, _, _), _)| p.contains(".peft."))
                .map(|((p, _, _), id)| {
                    let g = if p.ends_with("magnitude")
                        || p.ends_with("lora_e")
                        || p.ends_with("spa_values")
                        || p.ends_with("delta_values")
                    {
                        gp.get::<1>(id)
                            .map(|t| t.into_data().try_to_vec::<f32>().unwrap())
                    } else {
                        gp.get::<2>(id)
                            .map(|t| t.into_data().try_to_vec::<f32>().unwrap())
                    }
                    .unwrap_or_else(|| panic!("{label}: no gradient for {p}"));
                    (p.replace(".weight.peft.", ".peft."), g)
                })
                .collect::<Vec<_>>()
        };
        let mut gw = collect(hosts::parameters(w.model()), ids(w.model()), &gw);
        let mut ga = collect(hosts::parameters(a.model()), ids(a.model()), &ga);
        gw.sort_by(|x, y| x.0.cmp(&y.0));
        ga.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(gw.len(), ga.len(), "{label}");
        assert!(!gw.is_empty());
        for ((pw, vw), (pa, va)) in gw.iter().zip(&ga) {
            assert_eq!(pw, pa);
            let scale = vw.iter().map(|x| x.abs()).fold(1e-3, f32::max);
            assert!(
                max_diff_data(vw, va) / scale < 1e-4,
                "{label}: gradient of {pw}"
            );
        }
    }
}

fn ids<M: Module>(model: &M) -> Vec<burn::module::ParamId> {
    struct V(Vec<burn::module::ParamId>);
    impl burn::module::ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            self.0.push(p.id);
        }
    }
    let mut v = V(Vec::new());
    model.visit(&mut v);
    v.0
}
