//! Selection and update properties: budget, bit-identical unchosen entries, monotone / fixed
//! masks, PaFI's smallest magnitudes, BitFit, choose_all, config errors, verify.

mod common;

use std::collections::BTreeSet;

use burn::module::Module;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, SgdConfig};
use burn::tensor::TensorData;
use common::{bits, grads, mlp, values_of};
use peft_selective::{SelectiveConfig, SelectiveError, SelectiveOptimizer, UnmaskSchedule};
use proptest::prelude::*;

/// Every path's chosen flat indices.
fn chosen_sets<O: burn::optim::Optimizer>(
    optim: &SelectiveOptimizer<O>,
) -> Vec<(String, BTreeSet<usize>)> {
    optim
        .paths()
        .into_iter()
        .map(|p| {
            let set = optim.chosen(&p).unwrap().into_iter().collect();
            (p, set)
        })
        .collect()
}

/// Check that every entry outside `optim`'s chosen sets has the bits it had in `before`.
fn assert_unchosen_unchanged<O: burn::optim::Optimizer>(
    optim: &SelectiveOptimizer<O>,
    before: &std::collections::BTreeMap<String, Vec<f32>>,
    model: &common::Mlp,
) -> usize {
    let now = values_of(model);
    let mut changed_chosen = 0;
    for (path, set) in chosen_sets(optim) {
        let (b, a) = (bits(&before[&path]), bits(&now[&path]));
        for j in 0..b.len() {
            if set.contains(&j) {
                changed_chosen += usize::from(a[j] != b[j]);
            } else {
                assert_eq!(a[j], b[j], "unchosen entry {j} of {path} changed");
            }
        }
    }
    changed_chosen
}

#[test]
fn unchosen_entries_stay_bit_identical_under_adamw_decay_and_sgd_momentum() {
    // Weight decay and momentum would move masked-gradient entries in a dense optimizer.
    let adamw = AdamWConfig::new().with_weight_decay(0.1).build();
    let sgd = SgdConfig::new()
        .with_weight_decay(Some(burn::optim::decay::WeightDecayConfig::new(0.1)))
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .build();
    fn run<O: burn::optim::Optimizer>(inner: O) {
        let mut model = mlp(1, 6, 8, 3);
        let before = values_of(&model);
        let config = SelectiveConfig::id3(20, 4).with_verify(true);
        let mut optim = SelectiveOptimizer::new(&model, config, inner).unwrap();
        for step in 0..6 {
            let g = grads(&model, step);
            model = optim.step(0.05, model, g).unwrap();
        }
        let changed = assert_unchosen_unchanged(&optim, &before, &model);
        assert_eq!(optim.budget_used(), 20);
        assert!(changed >= 18, "only {changed} chosen entries moved");
    }
    run(adamw);
    run(sgd);
}

#[test]
fn id3_masks_are_monotone_and_pafi_bitfit_masks_are_fixed() {
    let configs = [
        SelectiveConfig::id3(30, 5),
        SelectiveConfig::pafi(30),
        SelectiveConfig::bitfit(),
    ];
    for config in configs {
        let mut model = mlp(2, 6, 8, 3);
        let is_id3 = config.method.name() == "id3";
        let mut optim =
            SelectiveOptimizer::new(&model, config, AdamWConfig::new().build()).unwrap();
        let mut prev = chosen_sets(&optim);
        for step in 0..8 {
            let g = grads(&model, step);
            model = optim.step(0.01, model, g).unwrap();
            let now = chosen_sets(&optim);
            for ((p, a), (_, b)) in prev.iter().zip(&now) {
                if is_id3 {
                    assert!(a.is_subset(b), "{p}: ID3 un-chose an entry at step {step}");
                } else {
                    assert_eq!(a, b, "{p}: a fixed mask changed at step {step}");
                }
            }
            prev = now;
        }
    }
}

#[test]
fn pafi_picks_exactly_the_smallest_magnitudes_with_ties_by_order() {
    // Magnitudes with exact ties across and within parameters.
    let dev = common::device();
    let w1: Vec<f32> = (0..24)
        .map(|i| [0.5, -0.25, 0.75, 0.25, -1.0, 0.125][i % 6] * (1.0 + (i / 6) as f32))
        .collect();
    let b1 = vec![0.125, -0.5, 2.0, 0.25, -0.125, 3.0];
    let w2: Vec<f32> = (0..18).map(|i| -0.125 * (i as f32 - 9.0)).collect();
    let b2 = vec![0.0, -0.0, 4.0];
    let model = common::Mlp {
        fc1: common::linear(w1.clone(), b1.clone(), 4, 6, &dev),
        fc2: common::linear(w2.clone(), b2.clone(), 6, 3, &dev),
    };
    for budget in [1, 4, 7, 13, 20, 51] {
        let optim = SelectiveOptimizer::new(
            &model,
            SelectiveConfig::pafi(budget),
            AdamWConfig::new().build(),
        )
        .unwrap();
        // Brute force in model order: (|θ|, parameter order, flat index).
        let mut all = Vec::new();
        for (order, v) in [&w1, &b1, &w2, &b2].iter().enumerate() {
            for (j, x) in v.iter().enumerate() {
                all.push((x.abs(), order, j));
            }
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let paths = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];
        let mut expected: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); 4];
        for &(_, order, j) in &all[..budget] {
            expected[order].insert(j);
        }
        for (order, path) in paths.iter().enumerate() {
            let got: BTreeSet<usize> = optim.chosen(path).unwrap().into_iter().collect();
            assert_eq!(got, expected[order], "budget {budget}, {path}");
        }
        assert_eq!(optim.budget_used(), budget);
    }
}

#[test]
fn bitfit_trains_the_1d_parameters_never_changes_trainability_and_cuts_at_the_budget() {
    let mut model = mlp(3, 4, 5, 2);
    let before = values_of(&model);
    let mut optim = SelectiveOptimizer::new(
        &model,
        SelectiveConfig::bitfit(),
        AdamWConfig::new().build(),
    )
    .unwrap();
    assert_eq!(optim.budget(), 5 + 2);
    for step in 0..3 {
        let g = grads(&model, step);
        model = optim.step(0.05, model, g).unwrap();
    }
    let now = values_of(&model);
    for path in ["fc1.weight", "fc2.weight"] {
        assert_eq!(bits(&now[path]), bits(&before[path]), "{path} changed");
    }
    for path in ["fc1.bias", "fc2.bias"] {
        assert!(
            now[path].iter().zip(&before[path]).all(|(a, b)| a != b),
            "{path}"
        );
    }
    // The model's trainability is untouched; freezing is opt-in and reversible.
    let flags = |m: &common::Mlp| -> Vec<bool> {
        peft_core::hosts::parameters(m)
            .into_iter()
            .map(|p| p.1)
            .collect()
    };
    assert_eq!(flags(&model), [true; 4]);
    let frozen = optim.freeze_unselected(model);
    assert_eq!(flags(&frozen), [false, true, false, true]);
    let restored = optim.restore_trainability(frozen);
    assert_eq!(flags(&restored), [true; 4]);

    // A budget smaller than the candidates cuts them at the boundary, as the toolkit does:
    // fc1.bias (5) whole, the first entry of fc2.bias, nothing else.
    let mut model = restored;
    let before = values_of(&model);
    let mut optim = SelectiveOptimizer::new(
        &model,
        SelectiveConfig::bitfit().with_budget(6),
        AdamWConfig::new().build(),
    )
    .unwrap();
    assert!(optim.is_full("fc1.bias") && !optim.is_full("fc2.bias"));
    assert_eq!(optim.chosen("fc2.bias").unwrap(), [0]);
    assert_eq!(optim.budget_used(), 6);
    for step in 0..2 {
        let g = grads(&model, step);
        model = optim.step(0.05, model, g).unwrap();
    }
    assert_eq!(assert_unchosen_unchanged(&optim, &before, &model), 6);
    // A budget at the first candidate's size leaves the later ones out entirely.
    let optim = SelectiveOptimizer::new(
        &model,
        SelectiveConfig::bitfit().with_budget(5),
        AdamWConfig::new().build(),
    )
    .unwrap();
    assert_eq!(optim.chosen("fc2.bias").unwrap(), Vec::<usize>::new());
}

#[test]
fn bitfit_takes_every_1d_tensor_by_default_and_bias_only_takes_biases() {
    #[derive(Module, Debug)]
    struct Norm {
        gamma: burn::module::Param<burn::tensor::Tensor<1>>,
        proj: burn::module::Param<burn::tensor::Tensor<2>>,
        bias: burn::module::Param<burn::tensor::Tensor<1>>,
    }
    let dev = common::device();
    use burn::module::Param;
    let norm = Norm {
        gamma: Param::from_tensor(burn::tensor::Tensor::ones([3], &dev)),
        proj: Param::from_tensor(burn::tensor::Tensor::ones([3, 3], &dev)),
        bias: Param::from_tensor(burn::tensor::Tensor::zeros([3], &dev)),
    };
    // The toolkit's set: every 1-D tensor (a LayerNorm's gamma too), in model order.
    let optim =
        SelectiveOptimizer::new(&norm, SelectiveConfig::bitfit(), AdamWConfig::new().build())
            .unwrap();
    assert!(optim.is_full("gamma") && optim.is_full("bias") && !optim.is_full("proj"));
    assert_eq!(optim.budget_used(), 6);
    // A budget is a cap: one beyond the model's size takes every candidate.
    let optim = SelectiveOptimizer::new(
        &norm,
        SelectiveConfig::bitfit().with_budget(1000),
        AdamWConfig::new().build(),
    )
    .unwrap();
    assert_eq!(optim.budget_used(), 6);
    // Cut at the boundary in model order: gamma whole, the first entry of bias.
    let optim = SelectiveOptimizer::new(
        &norm,
        SelectiveConfig::bitfit().with_budget(4),
        AdamWConfig::new().build(),
    )
    .unwrap();
    assert!(optim.is_full("gamma"));
    assert_eq!(optim.chosen("bias").unwrap(), [0]);
    // The BitFit paper's set: biases only.
    let optim = SelectiveOptimizer::new(
        &norm,
        SelectiveConfig::bitfit().with_bias_only(true),
        AdamWConfig::new().build(),
    )
    .unwrap();
    assert!(optim.is_full("bias") && !optim.is_full("gamma"));
    assert_eq!(optim.chosen("gamma").unwrap(), Vec::<usize>::new());
    assert_eq!(optim.budget_used(), 3);

    // Nothing to take is an error naming the parameters.
    #[derive(Module, Debug)]
    struct Gain {
        gamma: burn::module::Param<burn::tensor::Tensor<1>>,
        proj: burn::module::Param<burn::tensor::Tensor<2>>,
    }
    let gain = Gain {
        gamma: Param::from_tensor(burn::tensor::Tensor::ones([3], &dev)),
        proj: Param::from_tensor(burn::tensor::Tensor::ones([3, 3], &dev)),
    };
    let err = SelectiveOptimizer::new(
        &gain,
        SelectiveConfig::bitfit().with_bias_only(true),
        AdamWConfig::new().build(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            SelectiveError::NothingSelected {
                bias_only: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("gamma"), "{err}");
}

#[test]
fn weight_decay_is_forced_to_zero_as_in_the_toolkit_unless_decay_chosen() {
    use burn::optim::decay::WeightDecayConfig;
    // PaFI (a fixed set) so that every run trains the same entries.
    fn run<O: burn::optim::Optimizer>(inner: O, decay_chosen: bool) -> Vec<(String, Vec<u32>)> {
        let mut model = mlp(5, 6, 8, 3);
        let config = SelectiveConfig::pafi(30).with_decay_chosen(decay_chosen);
        let mut optim = SelectiveOptimizer::new(&model, config, inner).unwrap();
        for step in 0..4 {
            let g = grads(&model, step);
            model = optim.step(0.05, model, g).unwrap();
        }
        values_of(&model)
            .into_iter()
            .map(|(k, v)| (k, bits(&v)))
            .collect()
    }
    let adamw = |wd: f32| AdamWConfig::new().with_weight_decay(wd).build();
    let sgd = |wd: Option<f32>| {
        SgdConfig::new()
            .with_weight_decay(wd.map(WeightDecayConfig::new))
            .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
            .build()
    };
    // Decoupled (AdamW) and coupled (SGD's L2 on the gradient) decay are both removed: the
    // chosen entries follow the optimizer without decay, bit for bit.
    let plain_adamw = run(adamw(0.0), true);
    assert_eq!(run(adamw(0.1), false), plain_adamw);
    assert_eq!(run(adamw(0.0), false), plain_adamw);
    let plain_sgd = run(sgd(None), true);
    assert_eq!(run(sgd(Some(0.1)), false), plain_sgd);
    // Asked for, the decay applies to the chosen entries.
    assert_ne!(run(adamw(0.1), true), plain_adamw);
    assert_ne!(run(sgd(Some(0.1)), true), plain_sgd);
}

#[test]
fn choose_all_groups_are_trained_fully_and_counted_against_the_budget() {
    let mut model = mlp(4, 6, 8, 3);
    let head = 8 * 3 + 3;
    let config = SelectiveConfig::id3(head + 10, 3)
        .with_choose_all_regex(r"^fc2\.")
        .unwrap()
        .with_verify(true);
    let mut optim = SelectiveOptimizer::new(&model, config, AdamWConfig::new().build()).unwrap();
    assert_eq!(optim.budget_used(), head);
    for step in 0..5 {
        let g = grads(&model, step);
        model = optim.step(0.01, model, g).unwrap();
    }
    assert_eq!(optim.budget_used(), head + 10);
    assert!(optim.is_full("fc2.weight") && optim.is_full("fc2.bias"));
    let fc1 = optim.chosen("fc1.weight").unwrap().len() + optim.chosen("fc1.bias").unwrap().len();
    assert_eq!(fc1, 10);
    // The same group with a budget below the head's size is an error naming the head.
    let err = SelectiveOptimizer::new(
        &model,
        SelectiveConfig::pafi(head - 1)
            .with_choose_all_regex(r"^fc2\.")
            .unwrap(),
        AdamWConfig::new().build(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("fc2.weight"), "{err}");
}

#[test]
fn bad_configs_are_clear_errors() {
    let model = mlp(5, 4, 5, 2);
    let total = 4 * 5 + 5 + 5 * 2 + 2;
    let new = |c: SelectiveConfig| {
        SelectiveOptimizer::new(&model, c, AdamWConfig::new().build()).unwrap_err()
    };
    let e = new(SelectiveConfig::id3(0, 3));
    assert!(
        matches!(
            e,
            SelectiveError::InvalidConfig {
                field: "budget",
                ..
            }
        ),
        "{e}"
    );
    let e = new(SelectiveConfig::id3(5, 0));
    assert!(
        matches!(
            e,
            SelectiveError::InvalidConfig {
                field: "max_steps",
                ..
            }
        ),
        "{e}"
    );
    let e = new(SelectiveConfig::id3(5, 3).with_eps(-1.0));
    assert!(
        matches!(e, SelectiveError::InvalidConfig { field: "eps", .. }),
        "{e}"
    );
    let e = new(SelectiveConfig::pafi(total + 1));
    assert!(
        matches!(e, SelectiveError::BudgetTooLarge { budget, available } if budget == total + 1 && available == total),
        "{e}"
    );
    let e = new(SelectiveConfig::new(peft_selective::Selection::Pafi, None));
    assert!(
        matches!(
            e,
            SelectiveError::InvalidConfig {
                field: "budget",
                ..
            }
        ),
        "{e}"
    );
    let e = new(SelectiveConfig::pafi(5)
        .with_choose_all_regex(r"^classifier\.")
        .unwrap());
    assert!(
        matches!(e, SelectiveError::GroupMatchesNothing { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("fc1.weight"), "{e}");
    assert!(SelectiveConfig::pafi(5).with_choose_all_regex("(").is_err());
    // Frozen parameters are not candidates.
    let frozen = peft_core::hosts::set_trainable(model.clone(), |p| Some(p.starts_with("fc2")));
    let e = SelectiveOptimizer::new(
        &frozen,
        SelectiveConfig::pafi(13),
        AdamWConfig::new().build(),
    )
    .unwrap_err();
    assert!(
        matches!(e, SelectiveError::BudgetTooLarge { available: 12, .. }),
        "{e}"
    );
    // The full budget is allowed.
    assert!(
        SelectiveOptimizer::new(
            &model,
            SelectiveConfig::pafi(total),
            AdamWConfig::new().build()
        )
        .is_ok()
    );
}

#[test]
fn verify_reports_an_unchosen_entry_that_changed() {
    let mut model = mlp(6, 4, 5, 2);
    let config = SelectiveConfig::pafi(6).with_verify(true);
    let mut optim = SelectiveOptimizer::new(&model, config, AdamWConfig::new().build()).unwrap();
    let g = grads(&model, 0);
    model = optim.step(0.01, model, g).unwrap();
    // Something outside the optimizer touches an unchosen entry.
    let chosen = optim.chosen("fc1.weight").unwrap();
    let victim = (0..20).find(|j| !chosen.contains(j)).unwrap();
    let mut w = values_of(&model)["fc1.weight"].clone();
    let old = w[victim];
    w[victim] += 1.0;
    let (model, _) = peft_core::hosts::write_params(
        model,
        [("fc1.weight".to_string(), TensorData::new(w, [4, 5]))].into(),
    );
    let g = grads(&model, 1);
    let err = optim.step(0.01, model, g).unwrap_err();
    match err {
        SelectiveError::UnchosenEntryChanged {
            path,
            index,
            before,
            after,
            step,
        } => {
            assert_eq!((path.as_str(), index, step), ("fc1.weight", victim, 1));
            assert_eq!((before, after), (old, old + 1.0));
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn state_memory_is_o_budget() {
    let mut model = mlp(7, 16, 32, 4);
    let mut optim = SelectiveOptimizer::new(
        &model,
        SelectiveConfig::id3(50, 5)
            .with_choose_all_regex(r"fc2\.bias")
            .unwrap(),
        AdamWConfig::new().build(),
    )
    .unwrap();
    for step in 0..7 {
        let g = grads(&model, step);
        model = optim.step(0.01, model, g).unwrap();
        let m = optim.memory();
        assert_eq!(
            m.state_entries,
            2 * optim.budget_used(),
            "AdamW keeps m and v per entry"
        );
        assert_eq!(m.state_bytes, 4 * m.state_entries);
        assert_eq!(m.index_entries, optim.budget_used() - 4);
    }
    assert_eq!(optim.budget_used(), 50);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn schedule_sums_to_the_budget_and_never_exceeds_it(budget in 0usize..5000, max_steps in 1usize..300) {
        let s = UnmaskSchedule::new(budget, max_steps);
        let counts: Vec<usize> = (0..max_steps + 10).map(|t| s.count(t)).collect();
        prop_assert_eq!(counts.iter().sum::<usize>(), budget);
        prop_assert_eq!(counts[..max_steps].iter().sum::<usize>(), budget);
        prop_assert!(counts[max_steps..].iter().all(|&u| u == 0));
        prop_assert!(counts.windows(2).take(max_steps - 1).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1));
        let mut used = 0;
        for t in 0..max_steps + 10 {
            used += s.quota(t, used);
            prop_assert!(used <= budget);
            prop_assert_eq!(used, s.cumulative(t + 1));
        }
        prop_assert_eq!(used, budget);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn id3_never_exceeds_its_budget_and_reaches_it_at_max_steps(
        budget in 1usize..=37,
        max_steps in 1usize..=9,
        extra in 0usize..4,
        seed in 0u64..1000,
    ) {
        let mut model = mlp(seed, 4, 5, 2);
        let mut optim = SelectiveOptimizer::new(
            &model,
            SelectiveConfig::id3(budget, max_steps).with_verify(true),
            AdamWConfig::new().build(),
        ).unwrap();
        let schedule = UnmaskSchedule::new(budget, max_steps);
        for step in 0..max_steps + extra {
            let g = grads(&model, seed + step as u64);
            model = optim.step(0.01, model, g).unwrap();
            prop_assert!(optim.budget_used() <= budget);
            prop_assert_eq!(optim.budget_used(), schedule.cumulative(step + 1));
        }
        prop_assert_eq!(optim.budget_used(), budget);
    }
}

#[test]
fn chosen_parameters_without_a_gradient_do_not_crash_the_step() {
    // The toolkit dereferences `grad` of every masked parameter and crashes on unused ones.
    #[derive(Module, Debug)]
    struct WithUnused {
        mlp: common::Mlp,
        unused: burn::module::Param<burn::tensor::Tensor<1>>,
    }
    let dev = common::device();
    let mut model = WithUnused {
        mlp: mlp(8, 4, 5, 2),
        unused: burn::module::Param::from_tensor(burn::tensor::Tensor::from_data(
            TensorData::new(vec![1e-7f32, -1e-7, 2e-7], [3]),
            &dev,
        )),
    };
    let before = values_of(&model);
    let adamw = AdamWConfig::new().with_weight_decay(0.0).build();
    let mut optim = SelectiveOptimizer::new(&model, SelectiveConfig::pafi(8), adamw).unwrap();
    assert_eq!(
        optim.chosen("unused").unwrap(),
        [0, 1, 2],
        "smallest magnitudes"
    );
    for step in 0..3 {
        let g = grads(&model.mlp, step);
        model = optim.step(0.01, model, g).unwrap();
    }
    // A zero gradient with zero moments moves nothing.
    assert_eq!(bits(&values_of(&model)["unused"]), bits(&before["unused"]));
    let now = values_of(&model);
    let moved = now
        .iter()
        .filter(|(p, _)| p.starts_with("mlp."))
        .map(|(p, v)| v.iter().zip(&before[p]).filter(|(a, b)| a != b).count())
        .sum::<usize>();
    assert_eq!(moved, 5, "the 5 chosen mlp entries train");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn pafi_equals_a_brute_force_sort_on_tie_heavy_weights(
        w in proptest::collection::vec(-3i8..=3, 3 * 4 + 4 + 4 * 2 + 2),
        budget in 1usize..=26,
    ) {
        let v: Vec<f32> = w.iter().map(|&x| f32::from(x) * 0.5).collect();
        let dev = common::device();
        let parts = [v[..12].to_vec(), v[12..16].to_vec(), v[16..24].to_vec(), v[24..].to_vec()];
        let model = common::Mlp {
            fc1: common::linear(parts[0].clone(), parts[1].clone(), 3, 4, &dev),
            fc2: common::linear(parts[2].clone(), parts[3].clone(), 4, 2, &dev),
        };
        let optim = SelectiveOptimizer::new(&model, SelectiveConfig::pafi(budget), AdamWConfig::new().build()).unwrap();
        let mut all: Vec<(f32, usize, usize)> = Vec::new();
        for (order, p) in parts.iter().enumerate() {
            all.extend(p.iter().enumerate().map(|(j, x)| (x.abs(), order, j)));
        }
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        for (order, path) in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"].iter().enumerate() {
            let want: Vec<usize> = {
                let mut s: Vec<usize> = all[..budget].iter().filter(|e| e.1 == order).map(|e| e.2).collect();
                s.sort_unstable();
                s
            };
            prop_assert_eq!(optim.chosen(path).unwrap(), want, "{}", path);
        }
    }
}
