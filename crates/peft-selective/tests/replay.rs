//! Recorded runs replayed step by step: ID3, PaFI and BitFit of the real `selective-optimizers`
//! 0.4 package (`fixtures/replay_selective_optimizers.py`, its well-defined regime: ID3 budgets
//! divisible by `max_steps`, no ties; one ID3 tie case where 0.4 drops an entry above the cutoff
//! and our exact top-u keeps it), and ID3 of our numpy re-implementation of the intended algorithm
//! (`fixtures/make_id3_fixture.py`: ties, steps past `max_steps`, which the package gets wrong).
//! Every replay checks the chosen set after every step bit for bit, unchosen entries bit for bit,
//! and the chosen entries' update: bit for bit with SGD, to `1e-6 (1 + |θ|)` with AdamW.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use common::{Mlp, bits};
use peft_selective::{SelectiveConfig, SelectiveOptimizer};
use serde_json::Value;

/// `fixtures/<stem>.json` and `fixtures/<stem>.safetensors`.
fn fixture(stem: &str) -> (Value, BTreeMap<String, TensorData>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap())
            .unwrap();
    let tensors = peft_core::hf::read_tensors(&dir.join(format!("{stem}.safetensors"))).unwrap();
    (meta, tensors)
}

fn model_from(tensors: &BTreeMap<String, TensorData>, step: usize) -> Mlp {
    let t = |p: &str| tensors[&format!("step{step}.theta.{p}")].clone();
    let dev = common::device();
    let (w1, b1, w2, b2) = (
        t("fc1.weight"),
        t("fc1.bias"),
        t("fc2.weight"),
        t("fc2.bias"),
    );
    let (d_in, hidden) = (w1.shape()[0], w1.shape()[1]);
    let d_out = w2.shape()[1];
    Mlp {
        fc1: common::linear(
            w1.try_to_vec::<f32>().unwrap(),
            b1.try_to_vec::<f32>().unwrap(),
            d_in,
            hidden,
            &dev,
        ),
        fc2: common::linear(
            w2.try_to_vec::<f32>().unwrap(),
            b2.try_to_vec::<f32>().unwrap(),
            hidden,
            d_out,
            &dev,
        ),
    }
}

/// The selective config of a recorded run (`method` defaults to ID3: the numpy fixtures).
fn config_of(meta: &Value) -> SelectiveConfig {
    let budget = meta["budget"].as_u64().unwrap() as usize;
    let mut config = match meta["method"].as_str().unwrap_or("id3") {
        "id3" => SelectiveConfig::id3(budget, meta["max_steps"].as_u64().unwrap() as usize)
            .with_eps(meta["eps"].as_f64().unwrap())
            .with_exp(meta["exp"].as_f64().unwrap()),
        "pafi" => SelectiveConfig::pafi(budget),
        "bitfit" => SelectiveConfig::bitfit().with_budget(budget),
        other => panic!("unknown method {other}"),
    };
    for path in meta["choose_all"].as_array().into_iter().flatten() {
        let path = regex_escape(path.as_str().unwrap());
        config = config.with_choose_all_regex(&format!("^{path}$")).unwrap();
    }
    config
}

/// The model at the start of recorded step `step`, its recorded gradients, and one optimizer
/// step of `optim` on them.
fn replay_step<O: burn::optim::Optimizer>(
    optim: &mut SelectiveOptimizer<O>,
    tensors: &BTreeMap<String, TensorData>,
    step: usize,
    lr: f64,
) -> Mlp {
    let model = model_from(tensors, step);
    let mut grads = GradientsParams::new();
    let dev = common::device().without_autodiff();
    let g = |p: &str| tensors[&format!("step{step}.grad.{p}")].clone();
    grads.register::<2>(
        model.fc1.weight.id,
        Tensor::from_data(g("fc1.weight"), &dev),
    );
    grads.register::<1>(
        model.fc1.bias.as_ref().unwrap().id,
        Tensor::from_data(g("fc1.bias"), &dev),
    );
    grads.register::<2>(
        model.fc2.weight.id,
        Tensor::from_data(g("fc2.weight"), &dev),
    );
    grads.register::<1>(
        model.fc2.bias.as_ref().unwrap().id,
        Tensor::from_data(g("fc2.bias"), &dev),
    );
    optim.step(lr, model, grads).unwrap()
}

fn run(stem: &str) {
    let (meta, tensors) = fixture(stem);
    if meta["optimizer"].as_str() == Some("sgd") {
        // The decay passed to the package, which forces it to 0: ours removes it too.
        let decay = meta["weight_decay_given"].as_f64().unwrap() as f32;
        let sgd = burn::optim::SgdConfig::new()
            .with_weight_decay((decay > 0.0).then(|| WeightDecayConfig::new(decay)))
            .build();
        replay(stem, &meta, &tensors, sgd, true);
    } else {
        let adamw = &meta["adamw"];
        let decay = meta["weight_decay_given"].as_f64().unwrap_or(0.0) as f32;
        let inner = AdamWConfig::new()
            .with_beta_1(adamw["beta_1"].as_f64().unwrap() as f32)
            .with_beta_2(adamw["beta_2"].as_f64().unwrap() as f32)
            .with_epsilon(adamw["epsilon"].as_f64().unwrap() as f32)
            .with_weight_decay(decay)
            .build();
        replay(stem, &meta, &tensors, inner, false);
    }
}

/// Replay the recorded steps; `exact`: chosen entries equal the reference bit for bit.
fn replay<O: burn::optim::Optimizer>(
    name: &str,
    meta: &Value,
    tensors: &BTreeMap<String, TensorData>,
    inner: O,
    exact: bool,
) {
    let budget = meta["budget"].as_u64().unwrap() as usize;
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let lr = meta["lr"].as_f64().unwrap();
    let paths: Vec<String> = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let mut optim =
        SelectiveOptimizer::new(&model_from(tensors, 0), config_of(meta), inner).unwrap();
    for step in 0..steps {
        // The recorded parameters and gradients of this step, so the selection is compared on
        // exactly the reference's inputs.
        let model = replay_step(&mut optim, tensors, step, lr);

        let expected = &meta["chosen_after_step"][step];
        let now = common::values_of(&model);
        for path in &paths {
            let want: Vec<usize> = expected[path]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                optim.chosen(path).unwrap(),
                want,
                "{name}: step {step}, {path}"
            );

            // The update: unchosen entries exact, chosen ones equal to the dense masked AdamW.
            let before: Vec<f32> = tensors[&format!("step{step}.theta.{path}")]
                .try_to_vec::<f32>()
                .unwrap();
            let after: Vec<f32> = tensors[&format!("step{step}.after.{path}")]
                .try_to_vec::<f32>()
                .unwrap();
            let got = &now[path];
            for j in 0..got.len() {
                if want.contains(&j) && exact {
                    assert_eq!(
                        bits(&got[j..=j]),
                        bits(&after[j..=j]),
                        "{name}: step {step}, {path}[{j}]: {} vs reference {}",
                        got[j],
                        after[j]
                    );
                    assert_ne!(got[j], before[j], "{name}: step {step}, {path}[{j}]");
                } else if want.contains(&j) {
                    let tol = 1e-6 * (1.0 + after[j].abs());
                    assert!(
                        (got[j] - after[j]).abs() <= tol,
                        "{name}: step {step}, {path}[{j}]: {} vs reference {}",
                        got[j],
                        after[j]
                    );
                    assert_ne!(
                        got[j], before[j],
                        "{name}: step {step}, {path}[{j}] did not move"
                    );
                } else {
                    assert_eq!(bits(&got[j..=j]), bits(&before[j..=j]), "{path}[{j}]");
                }
            }
        }
    }
    assert_eq!(optim.budget_used(), budget);
}

/// `.` is the only regex metacharacter in these parameter paths.
fn regex_escape(path: &str) -> String {
    path.replace('.', r"\.")
}

#[test]
fn id3_replays_the_selective_optimizers_package() {
    run("id3_package_plain");
}

#[test]
fn id3_replays_the_selective_optimizers_package_with_a_choose_all_group() {
    run("id3_package_choose_all");
}

#[test]
fn id3_replays_the_package_bit_for_bit_with_sgd_and_its_weight_decay_forced_off() {
    run("package_id3_sgd");
}

#[test]
fn pafi_replays_the_package_bit_for_bit_with_sgd_and_its_weight_decay_forced_off() {
    run("package_pafi_sgd");
}

#[test]
fn pafi_replays_the_package_with_adamw_decay_forced_off_and_a_choose_all_group() {
    run("package_pafi_adamw");
}

#[test]
fn bitfit_replays_the_package_with_the_budget_cut_at_the_boundary_parameter() {
    run("package_bitfit_sgd");
}

#[test]
fn id3_keeps_the_exact_top_u_at_a_tie_where_the_package_drops_an_entry_above_the_cutoff() {
    let (meta, tensors) = fixture("package_id3_ties");
    let sgd = burn::optim::SgdConfig::new().build();
    let mut optim =
        SelectiveOptimizer::new(&model_from(&tensors, 0), config_of(&meta), sgd).unwrap();
    replay_step(&mut optim, &tensors, 0, meta["lr"].as_f64().unwrap());
    // D3 = |g| (exp 0): 0.5, 0.25, 0.25 at fc1.weight[0..3], 0 elsewhere; u = 2.
    let grad: Vec<f32> = tensors["step0.grad.fc1.weight"]
        .try_to_vec::<f32>()
        .unwrap();
    let mut order: Vec<usize> = (0..grad.len()).collect();
    order.sort_by(|&a, &b| grad[b].abs().total_cmp(&grad[a].abs()).then(a.cmp(&b)));
    let mut top: Vec<usize> = order[..2].to_vec();
    top.sort_unstable();
    assert_eq!(optim.chosen("fc1.weight").unwrap(), top);
    assert_eq!(top, [0, 1], "the largest D3 and the first of the tie");
    let package: Vec<u64> = meta["chosen_after_step"][0]["fc1.weight"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(package, [1, 2], "0.4 dropped the entry above the cutoff");
}

#[test]
fn id3_matches_the_numpy_reimplementation_on_real_gradients() {
    run("id3_real");
}

#[test]
fn id3_breaks_ties_by_parameter_order_then_row_major_as_the_numpy_reimplementation_does() {
    run("id3_ties");
}

#[test]
fn id3_matches_the_numpy_reimplementation_with_a_fractional_exponent() {
    run("id3_pow");
}
