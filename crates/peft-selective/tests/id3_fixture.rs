//! ID3 against recorded runs: of the real `selective-optimizers` 0.4 package
//! (`fixtures/replay_selective_optimizers.py`, its well-defined regime: budget divisible by
//! `max_steps`, no ties), and of our numpy re-implementation of the intended algorithm
//! (`fixtures/make_id3_fixture.py`: ties, steps past `max_steps`, which the package gets wrong).
//! Both check the chosen set after every step, bit for bit, and the masked AdamW update.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Tensor, TensorData};
use common::{Mlp, bits};
use peft_selective::{SelectiveConfig, SelectiveOptimizer};
use serde_json::Value;

fn fixture(name: &str) -> (Value, BTreeMap<String, TensorData>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("id3_{name}.json"))).unwrap(),
    )
    .unwrap();
    let tensors =
        peft_core::hf::read_tensors(&dir.join(format!("id3_{name}.safetensors"))).unwrap();
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

fn run(name: &str) {
    let (meta, tensors) = fixture(name);
    let budget = meta["budget"].as_u64().unwrap() as usize;
    let max_steps = meta["max_steps"].as_u64().unwrap() as usize;
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let lr = meta["lr"].as_f64().unwrap();
    let adamw = &meta["adamw"];
    let mut config = SelectiveConfig::id3(budget, max_steps)
        .with_eps(meta["eps"].as_f64().unwrap())
        .with_exp(meta["exp"].as_f64().unwrap());
    for path in meta["choose_all"].as_array().into_iter().flatten() {
        let path = regex_escape(path.as_str().unwrap());
        config = config.with_choose_all_regex(&format!("^{path}$")).unwrap();
    }
    let inner = AdamWConfig::new()
        .with_beta_1(adamw["beta_1"].as_f64().unwrap() as f32)
        .with_beta_2(adamw["beta_2"].as_f64().unwrap() as f32)
        .with_epsilon(adamw["epsilon"].as_f64().unwrap() as f32)
        .with_weight_decay(0.0)
        .build();
    let paths: Vec<String> = meta["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let mut optim = SelectiveOptimizer::new(&model_from(&tensors, 0), config, inner).unwrap();
    for step in 0..steps {
        // The recorded parameters and gradients of this step, so the selection is compared on
        // exactly the reference's inputs.
        let model = model_from(&tensors, step);
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
        let model = optim.step(lr, model, grads).unwrap();

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
                if want.contains(&j) {
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
    run("package_plain");
}

#[test]
fn id3_replays_the_selective_optimizers_package_with_a_choose_all_group() {
    run("package_choose_all");
}

#[test]
fn id3_matches_the_numpy_reimplementation_on_real_gradients() {
    run("real");
}

#[test]
fn id3_breaks_ties_by_parameter_order_then_row_major_as_the_numpy_reimplementation_does() {
    run("ties");
}

#[test]
fn id3_matches_the_numpy_reimplementation_with_a_fractional_exponent() {
    run("pow");
}
