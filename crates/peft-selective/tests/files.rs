//! Summaries (O(budget) files keyed by path), checkpoint state and resume, and the optimizer as
//! a peft-core `Controller`.

mod common;

use burn::optim::{AdamWConfig, SgdConfig};
use common::{bits, grads, mlp, values_of};
use peft_core::step::Stepper;
use peft_selective::{SelectiveConfig, SelectiveError, SelectiveOptimizer, Summary};

fn train(
    config: SelectiveConfig,
    steps: u64,
) -> (
    common::Mlp,
    common::Mlp,
    SelectiveOptimizer<burn::optim::AdamW>,
) {
    let base = mlp(11, 8, 16, 3);
    let mut model = base.clone();
    let mut optim = SelectiveOptimizer::new(
        &model,
        config,
        AdamWConfig::new().with_weight_decay(0.01).build(),
    )
    .unwrap();
    for step in 0..steps {
        let g = grads(&model, step);
        model = optim.step(0.02, model, g).unwrap();
    }
    (base, model, optim)
}

#[test]
fn summary_round_trip_reproduces_the_trained_model_exactly() {
    let configs = [
        SelectiveConfig::id3(40, 4)
            .with_choose_all_regex(r"^fc2\.bias$")
            .unwrap(),
        SelectiveConfig::pafi(25),
        SelectiveConfig::bitfit(),
    ];
    for config in configs {
        let method = config.method.name();
        let (base, trained, optim) = train(config, 6);
        let summary = optim.summary(&trained).unwrap();
        assert_eq!(summary.num_entries(), optim.budget_used());
        let dir = tempfile::tempdir().unwrap();
        summary.save(dir.path()).unwrap();
        let loaded = Summary::load(dir.path()).unwrap();
        assert_eq!(loaded, summary, "{method}");
        let restored = loaded.apply(base.clone()).unwrap();
        let (want, got, init) = (values_of(&trained), values_of(&restored), values_of(&base));
        for (path, w) in &want {
            assert_eq!(bits(w), bits(&got[path]), "{method}: {path}");
        }
        assert_ne!(want, init, "{method}: training changed nothing");
        // O(budget): values f32 + indices i64 (none for fully trained parameters).
        let bytes = std::fs::metadata(dir.path().join("adapter_model.safetensors"))
            .unwrap()
            .len();
        assert!(summary.tensor_bytes() <= 12 * optim.budget_used());
        assert!(
            bytes as usize <= summary.tensor_bytes() + 1024,
            "{method}: {bytes} bytes"
        );
        let json = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        assert!(
            json.contains("\"peft_type\": \"SELECTIVE\"") && json.contains(method),
            "{json}"
        );
    }
}

#[test]
fn summary_refuses_models_whose_paths_or_shapes_differ() {
    let (_, trained, optim) = train(SelectiveConfig::pafi(30), 2);
    let summary = optim.summary(&trained).unwrap();
    // Another hidden size: same paths, other shapes.
    let err = summary.apply(mlp(11, 8, 15, 3)).unwrap_err();
    assert!(
        matches!(&err, SelectiveError::ShapeMismatch { path, .. } if path.starts_with("fc")),
        "{err}"
    );
    // Another architecture: the paths do not exist.
    #[derive(burn::module::Module, Debug)]
    struct Other {
        encoder: common::Mlp,
    }
    let err = summary
        .apply(Other {
            encoder: mlp(11, 8, 16, 3),
        })
        .unwrap_err();
    assert!(
        matches!(err, SelectiveError::UnknownParameter { .. }),
        "{err}"
    );
}

#[test]
fn corrupt_summary_files_are_errors() {
    let (_, trained, optim) = train(SelectiveConfig::pafi(30), 1);
    let summary = optim.summary(&trained).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Out-of-range index.
    let mut broken = summary.clone();
    let entry = broken
        .params
        .values_mut()
        .find(|e| e.indices.is_some())
        .unwrap();
    entry.indices.as_mut().unwrap()[0] = 10_000;
    broken.save(dir.path()).unwrap();
    let err = Summary::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    // A JSON that is not a selective summary.
    summary.save(dir.path()).unwrap();
    let json = dir.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&json)
        .unwrap()
        .replace("SELECTIVE", "LORA");
    std::fs::write(&json, text).unwrap();
    match Summary::load(dir.path()).unwrap_err() {
        SelectiveError::InvalidFile { file, reason } => {
            assert!(file.ends_with("adapter_config.json"), "{file:?}");
            assert!(reason.contains("peft_type"), "{reason}");
        }
        other => panic!("expected InvalidFile naming peft_type, got {other:?}"),
    }
}

#[test]
fn resuming_from_saved_state_equals_not_stopping() {
    let config = || {
        SelectiveConfig::id3(60, 6)
            .with_choose_all_regex(r"^fc2\.bias$")
            .unwrap()
    };
    let (_, straight, optim_straight) = train(config(), 9);

    let (_, half, optim_half) = train(config(), 4);
    let dir = tempfile::tempdir().unwrap();
    optim_half.save_state(dir.path()).unwrap();
    // A fresh process: the model comes back from its own checkpoint (here, its values), the
    // optimizer from the config plus the saved state.
    let (model, _) = peft_core::hosts::write_params(
        mlp(11, 8, 16, 3),
        peft_core::hosts::read_params(&half, |_| true),
    );
    let mut optim = SelectiveOptimizer::new(
        &model,
        config(),
        AdamWConfig::new().with_weight_decay(0.01).build(),
    )
    .unwrap();
    optim.load_state(dir.path()).unwrap();
    assert_eq!(optim.step_index(), 4);
    let mut model = model;
    for step in 4..9 {
        let g = grads(&model, step);
        model = optim.step(0.02, model, g).unwrap();
    }
    for path in optim.paths() {
        assert_eq!(optim.chosen(&path), optim_straight.chosen(&path), "{path}");
    }
    let (a, b) = (values_of(&model), values_of(&straight));
    for (path, v) in &a {
        assert_eq!(bits(v), bits(&b[path]), "{path}");
    }
}

#[test]
fn load_state_rejects_other_configs_and_torn_saves() {
    let (_, trained, optim) = train(SelectiveConfig::id3(30, 3), 2);
    let dir = tempfile::tempdir().unwrap();
    optim.save_state(dir.path()).unwrap();
    let inner = || AdamWConfig::new().build();
    let mut other =
        SelectiveOptimizer::new(&trained, SelectiveConfig::id3(31, 3), inner()).unwrap();
    let err = other.load_state(dir.path()).unwrap_err();
    assert!(err.to_string().contains("budget"), "{err}");
    let mut other = SelectiveOptimizer::new(&trained, SelectiveConfig::pafi(30), inner()).unwrap();
    match other.load_state(dir.path()).unwrap_err() {
        SelectiveError::InvalidFile { file, reason } => {
            assert!(file.ends_with("selective_state.json"), "{file:?}");
            assert!(
                reason.contains("id3") && reason.contains("pafi"),
                "{reason}"
            );
        }
        other => panic!("expected InvalidFile naming both methods, got {other:?}"),
    }
    // An optimizer for another model (other shapes).
    let mut other =
        SelectiveOptimizer::new(&mlp(1, 8, 15, 3), SelectiveConfig::id3(30, 3), inner()).unwrap();
    assert!(matches!(
        other.load_state(dir.path()),
        Err(SelectiveError::ShapeMismatch { .. })
    ));
    // Metadata that does not match the tensors (a save interrupted between the two files).
    let json = dir.path().join("selective_state.json");
    let text = std::fs::read_to_string(&json).unwrap();
    let torn = text.replace("\"state_entries\": 40", "\"state_entries\": 30");
    assert_ne!(text, torn);
    std::fs::write(&json, torn).unwrap();
    let mut same = SelectiveOptimizer::new(&trained, SelectiveConfig::id3(30, 3), inner()).unwrap();
    let before = same.budget_used();
    assert!(same.load_state(dir.path()).is_err());
    assert_eq!(
        (same.budget_used(), same.step_index()),
        (before, 0),
        "a failed load changed state"
    );
}

#[test]
fn runs_inside_the_peft_core_stepper_like_a_direct_step() {
    let config = || SelectiveConfig::id3(30, 3);
    let (_, direct, _) = train(config(), 5);

    let mut model = mlp(11, 8, 16, 3);
    let selective = SelectiveOptimizer::new(
        &model,
        config(),
        AdamWConfig::new().with_weight_decay(0.01).build(),
    )
    .unwrap();
    let mut stepper = Stepper::new().with(selective);
    // The stepper's own optimizer sees no gradient and changes nothing.
    let mut module_optim = SgdConfig::new().init();
    for step in 0..5 {
        let g = grads(&model, step);
        // The step's learning rate reaches the selected entries.
        model = stepper.optimize(model, &mut module_optim, 0.02, g).unwrap();
    }
    let (a, b) = (values_of(&model), values_of(&direct));
    for (path, v) in &a {
        assert_eq!(bits(v), bits(&b[path]), "{path}");
    }
}

#[test]
fn summary_keeps_batch_norm_running_statistics() {
    use burn::module::Module;
    use burn::nn::{BatchNorm, BatchNormConfig, Linear};
    use burn::optim::GradientsParams;
    use burn::tensor::{Tensor, TensorData};

    #[derive(Module, Debug)]
    struct Net {
        lin: Linear,
        bn: BatchNorm,
    }
    let dev = common::device();
    // Built twice: a clone shares burn's running statistics (`RunningState` is shared state).
    let net = || Net {
        lin: common::linear(common::values(3, 4 * 5), common::values(4, 5), 4, 5, &dev),
        bn: BatchNormConfig::new(5).init(&dev),
    };
    let (base, mut model) = (net(), net());
    let mut optim =
        SelectiveOptimizer::new(&model, SelectiveConfig::bitfit(), SgdConfig::new().build())
            .unwrap();
    for step in 0..3 {
        let x = TensorData::new(common::values(100 + step, 8 * 4), [8, 4]);
        let x = Tensor::<2>::from_data(x, &dev);
        let loss = model.bn.forward(model.lin.forward(x)).powi_scalar(2).mean();
        let g = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.1, model, g).unwrap();
    }
    let summary = optim.summary(&model).unwrap();
    let stats: Vec<&str> = summary.batch_norm.keys().map(String::as_str).collect();
    assert_eq!(stats, ["bn.running_mean", "bn.running_var"]);
    assert_eq!(
        summary.num_entries(),
        5 + 5 + 5,
        "lin.bias, bn.gamma, bn.beta"
    );

    let dir = tempfile::tempdir().unwrap();
    summary.save(dir.path()).unwrap();
    let loaded = Summary::load(dir.path()).unwrap();
    assert_eq!(loaded, summary);
    let init = values_of(&base);
    let restored = loaded.apply(base).unwrap();
    let (want, got) = (values_of(&model), values_of(&restored));
    for (path, w) in &want {
        assert_eq!(bits(w), bits(&got[path]), "{path}");
    }
    for stat in stats {
        assert_ne!(want[stat], init[stat], "{stat}: training left it unchanged");
    }
}

#[test]
fn a_toolkit_summary_converted_by_the_script_rebuilds_the_toolkit_trained_model() {
    use burn::module::Module;
    use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};

    // fixtures/make_toolkit_summary.py: the package's PaFI on fc1 -> bn -> fc2, its
    // `torch.save`d summary converted by scripts/selective_summary.py.
    #[derive(Module, Debug)]
    struct Net {
        fc1: Linear,
        bn: BatchNorm,
        fc2: Linear,
    }
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let models =
        peft_core::hf::read_tensors(&fixtures.join("toolkit_summary_models.safetensors")).unwrap();
    let state = |prefix: &str| {
        models
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let dev = common::device();
    let net = Net {
        fc1: LinearConfig::new(4, 6).init(&dev),
        bn: BatchNormConfig::new(6).init(&dev),
        fc2: LinearConfig::new(6, 3).init(&dev),
    };
    let (base, missing) = peft_core::hosts::write_params(net, state("base."));
    assert!(missing.is_empty(), "{missing:?}");

    let summary = Summary::load(&fixtures.join("toolkit_summary")).unwrap();
    assert_eq!((summary.method.as_str(), summary.budget), ("pafi", 20));
    assert_eq!(summary.num_entries(), 20);
    let stats: Vec<&str> = summary.batch_norm.keys().map(String::as_str).collect();
    assert_eq!(stats, ["bn.running_mean", "bn.running_var"]);

    let restored = summary.apply(base).unwrap();
    let got = values_of(&restored);
    let trained = state("trained.");
    assert_eq!(got.len(), trained.len());
    for (path, want) in &trained {
        let want: Vec<f32> = want.iter::<f32>().collect();
        assert_eq!(bits(&got[path]), bits(&want), "{path}");
    }
    let base_mean: Vec<f32> = state("base.")["bn.running_mean"].iter::<f32>().collect();
    assert_ne!(
        got["bn.running_mean"], base_mean,
        "the statistics moved in training"
    );
}
