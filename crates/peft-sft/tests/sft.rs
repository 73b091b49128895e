//! SFT: the adapter against dense formulas (output, delta gradient) on both attach paths,
//! budget allocation, RigL and SM3 reselections against the properties of spec §5 (S1–S14)
//! with expectations from dense gradients, files, and resume equivalence.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsAccumulator, GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use peft_core::hosts::{self, HostView};
use peft_core::step::Stepper;
use peft_core::{ModuleSelector, PeftLinear};
use peft_sft::{
    AdamState, InitDeltas, LoadOptions, RatePolicy, SaveOptions, SelectionAlgorithm, SftAdamW,
    SftAdapter, SftConfig, SftModel, SftOptimizer, SftSelector, SftSm3,
};

/// Two independent layers, so each one's weight gradient has a closed form under a linear
/// loss: `a` is 6 -> 4, `b` is 5 -> 7.
#[derive(Module, Debug)]
struct Net<L> {
    a: L,
    b: L,
}

trait Layer: Module + burn::module::ModuleDisplay + Clone + std::fmt::Debug {
    /// Whether the adapter works on activations (`PeftLinear`) or on the weight.
    const ACTIVATION: bool;
    fn from_linear(l: Linear) -> Self;
    fn apply(&self, x: Tensor<2>) -> Tensor<2>;
}

impl Layer for Linear {
    const ACTIVATION: bool = false;
    fn from_linear(l: Linear) -> Self {
        l
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

impl Layer for PeftLinear<SftAdapter> {
    const ACTIVATION: bool = true;
    fn from_linear(l: Linear) -> Self {
        l.into()
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

type Act = Net<PeftLinear<SftAdapter>>;
type Weight = Net<Linear>;

const T: usize = 9;
const LAYERS: [(&str, usize, usize); 2] = [("a", 6, 4), ("b", 5, 7)];

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

    /// `Σ y_a ⊙ R_a + Σ y_b ⊙ R_b`: `dW = Rᵀ·X` per layer (PyTorch orientation), whatever
    /// the parameters.
    fn loss(&self, step: usize, device: &Device) -> Tensor<1> {
        let [(xa, ra), (xb, rb)] = batch(step, device);
        (self.a.apply(xa) * ra).sum() + (self.b.apply(xb) * rb).sum()
    }
}

fn batch(step: usize, device: &Device) -> [(Tensor<2>, Tensor<2>); 2] {
    [
        (
            tensor([T, 6], 100 + step, 2.0, device),
            tensor([T, 4], 300 + step, 2.0, device),
        ),
        (
            tensor([T, 5], 200 + step, 2.0, device),
            tensor([T, 7], 400 + step, 2.0, device),
        ),
    ]
}

/// The dense weight gradient of layer `l` (0 = a, 1 = b) at `step`, `[out, in]` row-major.
fn dense_dw(l: usize, step: usize, device: &Device) -> Vec<f32> {
    let (x, r) = batch(step, device)[l].clone();
    vec2(r.transpose().matmul(x))
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

fn adapter_of<L: Layer>(model: &Net<L>, layer: &str) -> SftAdapter {
    let layer = layer.to_string();
    hosts::collect(model, move |h: &HostView<'_, SftAdapter>| {
        (h.path == layer).then(|| h.slot.get("default").unwrap().clone())
    })
    .pop()
    .unwrap()
}

/// Index -> value of a layer's delta.
fn delta_map<L: Layer>(model: &Net<L>, layer: &str) -> BTreeMap<u64, f32> {
    let a = adapter_of(model, layer);
    a.indices().into_iter().zip(a.values()).collect()
}

fn targets() -> ModuleSelector {
    ModuleSelector::names(["a", "b"])
}

#[test]
fn budget_follows_the_reference_split() {
    let dev = device();
    let net = Weight::new(&dev);
    // total = 6*4 + 4 + 5*7 + 7 = 70; density 0.3 -> N = 21; Σ numel = 59;
    // k_a = int(21*24/59) = 8, k_b = int(21*35/59) = 12.
    let c = SftConfig::new(0.3, targets()).allocate(&net).unwrap();
    let deltas = c.num_deltas.clone().unwrap();
    assert_eq!(deltas, BTreeMap::from([("a".into(), 8), ("b".into(), 12)]));
    let c = SftConfig::new(0.3, targets())
        .with_num_tunable_weights(59)
        .allocate(&net)
        .unwrap();
    assert_eq!(c.num_deltas.unwrap()["b"], 35);
    let err = SftConfig::new(0.3, targets())
        .with_num_tunable_weights(60)
        .allocate(&net)
        .unwrap_err();
    assert!(err.to_string().contains("exceed"), "{err}");
    let model = SftModel::new(net, c_with(&deltas)).unwrap();
    assert_eq!(model.trainable_parameters().0, 20);
}

/// Attaching without `allocate` splits the budget as the reference does at injection
/// (`model.py`): `density` is a share of the whole model (70 parameters) and
/// `num_tunable_weights` an absolute count, split over the targets by size; the split is
/// written into the saved config's `num_deltas`.
#[test]
fn attaching_splits_the_budget_over_the_whole_model() {
    let dev = device();
    // Only `a` targeted: N = int(70 · 0.3) = 21, all in `a` (not int(0.3 · 24) = 7).
    let only_a = SftConfig::new(0.3, ModuleSelector::names(["a"]));
    let model = SftModel::new(Weight::new(&dev), only_a).unwrap();
    assert_eq!(adapter_of(model.model(), "a").num_deltas(), 21);
    let saved = model.adapters()["default"].config.num_deltas.clone();
    assert_eq!(saved, Some(BTreeMap::from([("a".into(), 21)])));
    // An absolute budget of 30 over 24 + 35 entries: int(30·24/59) = 12, int(30·35/59) = 17.
    let absolute = SftConfig::new(0.3, targets()).with_num_tunable_weights(30);
    let model = SftModel::new(Weight::new(&dev), absolute).unwrap();
    assert_eq!(adapter_of(model.model(), "a").num_deltas(), 12);
    assert_eq!(adapter_of(model.model(), "b").num_deltas(), 17);
}

fn c_with(deltas: &BTreeMap<String, usize>) -> SftConfig {
    SftConfig::new(0.3, targets()).with_num_deltas(deltas.clone())
}

/// S2, S3 on both attach paths: output == `x(W + scatter(Δ))ᵀ + b`, `dv == (dYᵀX)[idx]`;
/// the activation path forms no dense weight-shaped gradient (the base has none, and no probe
/// exists outside a RigL window).
#[test]
fn forward_and_delta_gradient_match_the_dense_formulas() {
    fn check<L: Layer>(label: &str) {
        let dev = device();
        let config = SftConfig::new(0.3, targets()).with_init(InitDeltas::Random(2.0));
        let config = config.allocate(&Net::<L>::new(&dev)).unwrap();
        let model = SftModel::new(Net::<L>::new(&dev), config).unwrap();
        let net = model.model().clone();
        let grads = GradientsParams::from_grads(net.loss(0, &dev).backward(), &net);
        let [(xa, _), (xb, _)] = batch(0, &dev);
        for (l, (name, d_in, d_out)) in LAYERS.into_iter().enumerate() {
            let ad = adapter_of(&net, name);
            assert!(ad.probe.is_none() && ad.probe_anchor.is_none());
            assert!(ad.candidate_values.is_none());
            let base = linear(d_in, d_out, l + 1, &dev);
            let mut dense = vec![0f32; d_in * d_out];
            for (i, v) in ad.indices().into_iter().zip(ad.values()) {
                dense[i as usize] = v;
            }
            let delta = Tensor::<2>::from_data(TensorData::new(dense, [d_out, d_in]), &dev);
            let x = if l == 0 { xa.clone() } else { xb.clone() };
            let expect = x.clone().matmul(base.weight.val() + delta.transpose())
                + base.bias.as_ref().unwrap().val().reshape([1, d_out]);
            let got = if l == 0 {
                net.a.apply(x)
            } else {
                net.b.apply(x)
            };
            close(
                &vec2(got),
                &vec2(expect),
                1e-5,
                &format!("{label}/{name}: output"),
            );
            let dw = dense_dw(l, 0, &dev);
            let expect: Vec<f32> = ad.indices().iter().map(|&i| dw[i as usize]).collect();
            let got = vec1(grads.get::<1>(ad.delta_values.id).unwrap());
            close(
                &got,
                &expect,
                1e-5,
                &format!("{label}/{name}: delta gradient"),
            );
        }
    }
    check::<PeftLinear<SftAdapter>>("activation");
    check::<Linear>("weight");
}

#[test]
fn merge_then_unmerge_is_the_identity() {
    let dev = device();
    let config = SftConfig::new(0.3, targets()).with_init(InitDeltas::Random(1.0));
    let mut model = SftModel::new(Act::new(&dev), config.clone()).unwrap();
    let before = vec2(model.model().a.weight.val());
    let [(x, _), _] = batch(1, &dev);
    let out = vec2(model.model().a.forward(x.clone()));
    model.merge_adapter(None, true).unwrap();
    let merged = vec2(model.model().a.weight.val());
    assert!(merged.iter().zip(&before).any(|(a, b)| a != b));
    close(
        &vec2(model.model().a.forward(x)),
        &out,
        1e-6,
        "merged output",
    );
    model.unmerge_adapter();
    close(
        &vec2(model.model().a.weight.val()),
        &before,
        1e-6,
        "unmerged",
    );
}

struct Run<L> {
    net: Net<L>,
    selector: Arc<Mutex<SftSelector>>,
    stepper: Stepper<Net<L>>,
    lr: f64,
}

fn start<L: Layer>(config: &SftConfig, total: usize, lr: f64) -> Run<L> {
    start_with(config, total, lr, |s| s)
}

fn start_with<L: Layer>(
    config: &SftConfig,
    total: usize,
    lr: f64,
    setup: impl FnOnce(SftSelector) -> SftSelector,
) -> Run<L> {
    let dev = device();
    let config = config.allocate(&Net::<L>::new(&dev)).unwrap();
    let model = SftModel::new(Net::<L>::new(&dev), config.clone()).unwrap();
    let selector = setup(SftSelector::new(&config, "default", total).unwrap());
    let net = selector.prepare(model.model().clone()).unwrap();
    let selector = Arc::new(Mutex::new(selector));
    let stepper = Stepper::new().with(selector.clone());
    Run {
        net,
        selector,
        stepper,
        lr,
    }
}

impl<L: Layer> Run<L> {
    fn step(&mut self) {
        let dev = device();
        let i = self.stepper.step_index();
        let loss = self.net.loss(i, &dev);
        let mut optim = SgdConfig::new().init();
        self.net = self
            .stepper
            .step(self.net.clone(), &mut optim, self.lr, loss)
            .unwrap();
    }
}

/// S1 after every step: unique, in range, constant count, sorted (CSR order).
fn check_indices<L: Layer>(net: &Net<L>, k: &BTreeMap<String, usize>) {
    for (name, d_in, d_out) in LAYERS {
        let idx = adapter_of(net, name).indices();
        assert_eq!(idx.len(), k[name], "{name}: count");
        assert!(idx.windows(2).all(|w| w[0] < w[1]), "{name}: unique");
        assert!(
            idx.iter().all(|&i| i < (d_in * d_out) as u64),
            "{name}: range"
        );
    }
}

fn rigl_config() -> SftConfig {
    // R = 4, S = 2: windows 1-2, 5-6, 9-10, …; selections after 2 (p = 1), 6, 10, 14, 18.
    SftConfig::new(0.3, targets())
        .with_steps(4, 2)
        .with_rate(RatePolicy::Linear, 0.5)
}

/// S1, S5–S10 for RigL at the reselection after update step 6 (p = 0.5·(1 − 6/20) = 0.35),
/// with expectations computed from the dense gradients of the batches, on both attach paths.
#[test]
fn rigl_reselection_keeps_retained_state_and_seeds_new_slots() {
    check_rigl_reselection::<PeftLinear<SftAdapter>>();
    check_rigl_reselection::<Linear>();
}

fn check_rigl_reselection<L: Layer>() {
    let dev = device();
    let config = rigl_config();
    let mut run = start::<L>(&config, 20, 0.05);
    let k = config
        .allocate(&Net::<L>::new(&dev))
        .unwrap()
        .num_deltas
        .unwrap();
    let adamw = SftAdamW::default();
    let mut probes_seen = Vec::new();
    for step in 0..20 {
        let u = step + 1;
        let a = adapter_of(&run.net, "a");
        // The blockwise probe on the activation path, the dense one on the weight path.
        if L::ACTIVATION {
            assert!(a.probe.is_none(), "no dense probe on the activation path");
        } else {
            assert!(
                a.probe_anchor.is_none(),
                "no blockwise probe on the weight path"
            );
        }
        let probe = a.probe.is_some() || a.probe_anchor.is_some();
        probes_seen.push((probe, a.candidate_values.is_some()));
        if u != 6 {
            run.step();
            check_indices(&run.net, &k);
            continue;
        }
        // Snapshot before update step 6 (the last of the window 5-6).
        let before: Vec<(Vec<u64>, Vec<f32>, AdamState)> = ["a", "b"]
            .iter()
            .map(|n| {
                let ad = adapter_of(&run.net, n);
                let s = run.selector.lock().unwrap().adam_state(n).unwrap().clone();
                (ad.indices(), ad.values(), s)
            })
            .collect();
        run.step();
        check_indices(&run.net, &k);
        let p: f64 = 0.5 * (1.0 - 6.0 / 20.0);
        for (l, (name, _, _)) in LAYERS.into_iter().enumerate() {
            let (old_idx, old_val, old_state) = &before[l];
            // The update of step 6 (index 5), by the formula.
            let dw = dense_dw(l, 5, &dev);
            let g: Vec<f32> = old_idx.iter().map(|&i| dw[i as usize]).collect();
            let mut upd = old_val.clone();
            let mut st = old_state.clone();
            adamw.step(0.05, &mut upd, &g, &mut st);
            let after = adapter_of(&run.net, name);
            let (new_idx, new_val) = (after.indices(), after.values());
            let new_state = run
                .selector
                .lock()
                .unwrap()
                .adam_state(name)
                .unwrap()
                .clone();
            let old_set: HashSet<u64> = old_idx.iter().copied().collect();
            let new_set: HashSet<u64> = new_idx.iter().copied().collect();
            let incoming: Vec<u64> = new_idx
                .iter()
                .copied()
                .filter(|i| !old_set.contains(i))
                .collect();
            let dropped: Vec<usize> = (0..old_idx.len())
                .filter(|&s| !new_set.contains(&old_idx[s]))
                .collect();
            let n_out = (k[name] as f64 * p) as usize;
            assert!(!incoming.is_empty(), "{name}: something was regrown");
            assert!(
                incoming.len() <= n_out,
                "{name}: S5 {} > {n_out}",
                incoming.len()
            );
            assert_eq!(incoming.len(), dropped.len());
            // S8: every dropped slot is among the n_out smallest |updated value|.
            let mut mags: Vec<f32> = upd.iter().map(|v| v.abs()).collect();
            mags.sort_by(f32::total_cmp);
            for &s in &dropped {
                assert!(upd[s].abs() <= mags[n_out - 1], "{name}: S8");
            }
            // The pool: top-k of |dW| at the window's first step (index 4); Σg over steps 5, 6.
            let first = dense_dw(l, 4, &dev);
            let mut order: Vec<usize> = (0..first.len()).collect();
            order.sort_by(|&x, &y| first[y].abs().total_cmp(&first[x].abs()).then(x.cmp(&y)));
            let pool: HashSet<u64> = order[..k[name]].iter().map(|&i| i as u64).collect();
            for (pos, &i) in new_idx.iter().enumerate() {
                let (m, v, age) = (
                    new_state.exp_avg[pos],
                    new_state.exp_avg_sq[pos],
                    new_state.age[pos],
                );
                if old_set.contains(&i) {
                    // S7: value and state of a retained entry are the updated ones.
                    let s = old_idx.iter().position(|&o| o == i).unwrap();
                    close(
                        &[new_val[pos]],
                        &[upd[s]],
                        1e-5,
                        &format!("{name}: S7 value"),
                    );
                    close(
                        &[m, v],
                        &[st.exp_avg[s], st.exp_avg_sq[s]],
                        1e-5,
                        &format!("{name}: S7 state"),
                    );
                    assert_eq!(age, st.age[s], "{name}: S7 age");
                } else {
                    // S6, S9, S10.
                    assert_eq!(new_val[pos], 0.0, "{name}: S6");
                    assert!(pool.contains(&i), "{name}: incoming from the pool");
                    let (g1, g2) = (first[i as usize], dw[i as usize]);
                    let (sum, sum_sq) = (g1 + g2, g1 * g1 + g2 * g2);
                    let em = sum / 2.0 * (1.0 - 0.9f32.powi(2));
                    let ev = sum_sq / 2.0 * (1.0 - 0.999f32.powi(2));
                    assert!(
                        (m - em).abs() <= 1e-5 * em.abs().max(1.0),
                        "{name}: S10 m {m} vs {em}"
                    );
                    assert!(
                        (v - ev).abs() <= 1e-5 * ev.abs().max(1.0),
                        "{name}: S10 v {v} vs {ev}"
                    );
                    assert_eq!(age, 2.0, "{name}: S10 age");
                }
            }
            let report = run.selector.lock().unwrap().last_selection()[name].clone();
            assert_eq!(
                (report.step, report.max_replaced, report.replaced),
                (6, n_out, incoming.len())
            );
        }
    }
    // Probes on the first step of each window, candidate sampling on the second, nothing else.
    let expect: Vec<(bool, bool)> = (1..=20)
        .map(|u| match (u - 1) % 4 {
            0 if u <= 18 => (true, false),
            1 if u <= 18 => (false, true),
            _ => (false, false),
        })
        .collect();
    assert_eq!(probes_seen, expect);
    // S14: ages advance every step (entries never reselected have age = steps + 1).
    let sel = run.selector.lock().unwrap();
    let ages = &sel.adam_state("a").unwrap().age;
    assert!(ages.iter().all(|a| (2.0..=21.0).contains(a)));
    assert!(ages.iter().any(|&a| a > 3.0));
}

/// The first selection replaces everything: the active set becomes the candidates with the
/// largest |Σg| (all of the pool, since k candidates fill k slots).
#[test]
fn the_first_selection_takes_the_whole_pool() {
    check_first_selection::<PeftLinear<SftAdapter>>();
    check_first_selection::<Linear>();
}

fn check_first_selection<L: Layer>() {
    let dev = device();
    let config = rigl_config();
    let mut run = start::<L>(&config, 20, 0.0);
    let k = config
        .allocate(&Net::<L>::new(&dev))
        .unwrap()
        .num_deltas
        .unwrap();
    run.step();
    run.step();
    for (l, (name, _, _)) in LAYERS.into_iter().enumerate() {
        let first = dense_dw(l, 0, &dev);
        let mut order: Vec<usize> = (0..first.len()).collect();
        order.sort_by(|&x, &y| first[y].abs().total_cmp(&first[x].abs()).then(x.cmp(&y)));
        let mut pool: Vec<u64> = order[..k[name]].iter().map(|&i| i as u64).collect();
        pool.sort();
        assert_eq!(adapter_of(&run.net, name).indices(), pool, "{name}");
    }
}

/// The pool of the first step of a window is the top-`k` of `|dW|` (ties: lower index), with
/// `Σg = dW` and `Σg² = dW²` there and one sample, on both paths and for several probe block
/// sizes (1 row, a non-divisor of the layers' `out`, the default).
#[test]
fn the_rigl_pool_is_the_dense_top_k() {
    fn check<L: Layer>(block: Option<usize>) {
        let dev = device();
        let config = rigl_config();
        let k = config
            .allocate(&Net::<L>::new(&dev))
            .unwrap()
            .num_deltas
            .unwrap();
        let mut run = start_with::<L>(&config, 20, 0.05, |s| match block {
            Some(rows) => s.with_probe_block(rows),
            None => s,
        });
        run.step();
        let sel = run.selector.lock().unwrap();
        for (l, (name, _, _)) in LAYERS.into_iter().enumerate() {
            let dw = dense_dw(l, 0, &dev);
            let mut order: Vec<usize> = (0..dw.len()).collect();
            order.sort_by(|&x, &y| dw[y].abs().total_cmp(&dw[x].abs()).then(x.cmp(&y)));
            let mut top: Vec<usize> = order[..k[name]].to_vec();
            top.sort();
            let what = format!("{name}, activation {}, block {block:?}", L::ACTIVATION);
            let pool = sel
                .candidates(name)
                .expect("a pool after the window's first step");
            let want: Vec<u64> = top.iter().map(|&i| i as u64).collect();
            assert_eq!(pool.indices, want, "{what}: indices");
            let g: Vec<f32> = top.iter().map(|&i| dw[i]).collect();
            close(&pool.sum, &g, 1e-6, &format!("{what}: Σg"));
            let g2: Vec<f32> = g.iter().map(|g| g * g).collect();
            close(&pool.sum_sq, &g2, 1e-6, &format!("{what}: Σg²"));
            assert_eq!(pool.count, 1, "{what}: count");
        }
    }
    for block in [None, Some(1), Some(3)] {
        check::<PeftLinear<SftAdapter>>(block);
        check::<Linear>(block);
    }
}

/// Gradient accumulation, two micro-batches per step reported to the step runner: the pool is
/// the top-`k` of the first micro-batch's `|dW|`, every backward pass adds one sample of `g`
/// and `g²` (the reference's hooks, checked against the dense gradients), and a slot grown at
/// the selection gets the Adam age `samples / grad_accum`, on both attach paths.
#[test]
fn rigl_statistics_are_per_micro_batch() {
    fn check<L: Layer>() {
        let dev = device();
        let config = rigl_config();
        let k = config
            .allocate(&Net::<L>::new(&dev))
            .unwrap()
            .num_deltas
            .unwrap();
        let mut run = start::<L>(&config, 20, 0.05);
        let batch_of = |step: usize, m: usize| 1000 + 2 * step + m;
        let mut optim = SgdConfig::new().init();
        let mut pools = BTreeMap::new();
        for step in 0..2 {
            let mut acc = GradientsAccumulator::<Net<L>>::new();
            for m in 0..2 {
                let loss = run.net.loss(batch_of(step, m), &dev);
                let grads = run.stepper.backward(&run.net, loss).unwrap();
                acc.accumulate(&run.net, grads);
            }
            if step == 1 {
                let sel = run.selector.lock().unwrap();
                for (l, (name, _, _)) in LAYERS.into_iter().enumerate() {
                    let what = format!("{name}, activation {}", L::ACTIVATION);
                    let first = dense_dw(l, batch_of(0, 0), &dev);
                    let mut order: Vec<usize> = (0..first.len()).collect();
                    order.sort_by(|&x, &y| {
                        first[y].abs().total_cmp(&first[x].abs()).then(x.cmp(&y))
                    });
                    let mut top: Vec<usize> = order[..k[name]].to_vec();
                    top.sort();
                    let pool = sel.candidates(name).expect("a pool in the window");
                    let want: Vec<u64> = top.iter().map(|&i| i as u64).collect();
                    assert_eq!(pool.indices, want, "{what}: the first micro-batch's top-k");
                    assert_eq!(pool.count, 4, "{what}: one sample per backward pass");
                    let (mut sum, mut sum_sq) = (vec![0.0f32; top.len()], vec![0.0f32; top.len()]);
                    for b in [
                        batch_of(0, 0),
                        batch_of(0, 1),
                        batch_of(1, 0),
                        batch_of(1, 1),
                    ] {
                        let dw = dense_dw(l, b, &dev);
                        for (j, &i) in top.iter().enumerate() {
                            sum[j] += dw[i];
                            sum_sq[j] += dw[i] * dw[i];
                        }
                    }
                    close(&pool.sum, &sum, 1e-5, &format!("{what}: Σg"));
                    close(&pool.sum_sq, &sum_sq, 1e-4, &format!("{what}: Σg²"));
                    pools.insert(name, pool.clone());
                }
            }
            run.net = run
                .stepper
                .optimize(run.net.clone(), &mut optim, run.lr, acc.grads())
                .unwrap();
        }
        // The first selection (p = 1) grew slots: age 4 / 2 = 2 and the moments seeded from
        // the four samples.
        let sel = run.selector.lock().unwrap();
        let beta1 = SftAdamW::default().beta1;
        for (name, _, _) in LAYERS {
            let what = format!("{name}, activation {}", L::ACTIVATION);
            let state = sel.adam_state(name).expect("Adam state");
            let idx = adapter_of(&run.net, name).indices();
            let pool = &pools[name];
            let mut grown = 0;
            for (slot, &i) in idx.iter().enumerate() {
                if state.age[slot] != 2.0 {
                    continue;
                }
                grown += 1;
                let j = pool
                    .indices
                    .iter()
                    .position(|&c| c == i)
                    .expect("grown from the pool");
                let m = (f64::from(pool.sum[j]) / 4.0 * (1.0 - beta1.powi(2))) as f32;
                close(
                    &[state.exp_avg[slot]],
                    &[m],
                    1e-5,
                    &format!("{what}: seeded m"),
                );
            }
            assert!(grown > 0, "{what}: some slots grown with age 2");
        }
    }
    check::<PeftLinear<SftAdapter>>();
    check::<Linear>();
}

/// The gradients of a collection step: on the activation path every gradient is 1-D (delta
/// values, biases, the probes' zero anchors), i.e. no weight-shaped gradient exists; on the
/// weight path the dense probe has one (`[in, out]`), which shows the check can see them.
#[test]
fn the_activation_path_forms_no_weight_shaped_gradient() {
    struct Dims<'a>(&'a GradientsParams, Vec<Vec<usize>>);
    impl burn::module::ModuleVisitor for Dims<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(p.id) {
                self.1.push(g.dims().to_vec());
            }
        }
    }
    fn grads_dims<L: Layer>() -> Vec<Vec<usize>> {
        let dev = device();
        let run = start::<L>(&rigl_config(), 20, 0.05);
        // Step index 0 opens a RigL window: the probes are on.
        let a = adapter_of(&run.net, "a");
        assert!(a.probe.is_some() || a.probe_anchor.is_some(), "collecting");
        let grads = GradientsParams::from_grads(run.net.loss(0, &dev).backward(), &run.net);
        let mut dims = Dims(&grads, Vec::new());
        run.net.visit(&mut dims);
        assert_eq!(
            dims.1.len(),
            grads.len(),
            "every gradient belongs to a parameter"
        );
        dims.1
    }
    let activation = grads_dims::<PeftLinear<SftAdapter>>();
    assert!(!activation.is_empty());
    assert!(
        activation.iter().all(|d| d.len() == 1),
        "activation path: {activation:?}"
    );
    // Each layer's anchor has a (zero) gradient, of shape [1].
    assert_eq!(activation.iter().filter(|d| *d == &[1]).count(), 2);
    let weight = grads_dims::<Linear>();
    assert!(
        weight.contains(&vec![6, 4]) && weight.contains(&vec![5, 7]),
        "weight path: {weight:?}"
    );
}

/// SftSM3 with momentum: a slot regrown at a reselection keeps the momentum of the entry it
/// replaces (the reference rewrites indices in place and keeps its momentum buffer), so the
/// momenta after the selection are those after the update, permuted. Run A reselects every slot
/// after step 2 (`S = 2`); run B, the same up to step 2 but reselecting after step 3, shows the
/// momenta after step 2's update.
#[test]
fn sm3_regrown_slots_keep_the_dropped_momentum() {
    fn run_with(s: usize) -> Run<PeftLinear<SftAdapter>> {
        let dev = device();
        let config = SftConfig::new(0.3, targets())
            .with_selection(SelectionAlgorithm::Sm3)
            .with_steps(4, s)
            .with_rate(RatePolicy::Linear, 0.5);
        let model = SftModel::new(Act::new(&dev), config.clone()).unwrap();
        let config = model.adapters()["default"].config.clone();
        let optimizer = SftOptimizer::Sm3(SftSm3 {
            momentum: 0.5,
            ..SftSm3::default()
        });
        let selector = SftSelector::with_optimizer(&config, "default", 20, optimizer).unwrap();
        let net = selector.prepare(model.model().clone()).unwrap();
        let selector = Arc::new(Mutex::new(selector));
        Run {
            net,
            stepper: Stepper::new().with(selector.clone()),
            selector,
            lr: 0.01,
        }
    }
    let (mut a, mut b) = (run_with(2), run_with(3));
    for _ in 0..2 {
        a.step();
        b.step();
    }
    let (sa, sb) = (a.selector.lock().unwrap(), b.selector.lock().unwrap());
    for (name, _, _) in LAYERS {
        let report = &sa.last_selection()[name];
        assert!(report.replaced > 0, "{name}: the selection regrew slots");
        assert!(sb.last_selection().is_empty());
        let sorted = |v: &[f32]| {
            let mut v = v.to_vec();
            v.sort_by(f32::total_cmp);
            v
        };
        let after = &sa.sm3_state(name).unwrap().momentum;
        let updated = &sb.sm3_state(name).unwrap().momentum;
        assert!(
            updated.iter().all(|m| *m != 0.0),
            "{name}: every momentum moved"
        );
        assert_eq!(sorted(after), sorted(updated), "{name}: no momentum reset");
        // Retained entries keep theirs at their index.
        let (ia, ib) = (
            adapter_of(&a.net, name).indices(),
            adapter_of(&b.net, name).indices(),
        );
        for (j, i) in ia.iter().enumerate() {
            if let Some(k) = ib.iter().position(|x| x == i) {
                assert_eq!(after[j], updated[k], "{name}: retained index {i}");
            }
        }
    }
}

/// `merge_and_unload` restricted by a module regex (the reference's `module_regex`): the
/// matching layer's weight gets its deltas, the other keeps the base weight, and no adapter is
/// left.
#[test]
fn merge_and_unload_with_a_module_regex() {
    let dev = device();
    let config = SftConfig::new(0.3, targets()).with_init(InitDeltas::Random(1.0));
    let model = SftModel::new(Weight::new(&dev), config).unwrap();
    let base = Weight::new(&dev);
    let deltas = delta_map(model.model(), "a");
    assert!(!deltas.is_empty());
    let net = model.merge_and_unload_matching("a", true).unwrap();
    // `[in, out]` (burn) -> `[out, in]` row-major, the indices' orientation.
    let torch = |l: &Linear| vec2(l.weight.val().transpose());
    let mut want = torch(&base.a);
    for (i, v) in &deltas {
        want[*i as usize] += v;
    }
    close(&torch(&net.a), &want, 1e-6, "a: merged");
    assert_eq!(torch(&net.b), torch(&base.b), "b: not merged");
    let err = SftModel::new(Weight::new(&dev), SftConfig::new(0.3, targets()))
        .unwrap()
        .merge_and_unload_matching("(", false)
        .unwrap_err();
    assert!(err.to_string().contains('('), "{err}");
}

/// S12: SM3 accumulators are the row/column maxima of ν, monotone; SM3 growth takes the
/// largest `row·col` among inactive positions; S1, S5, S6 and retained values kept.
#[test]
fn sm3_accumulators_and_growth() {
    check_sm3::<PeftLinear<SftAdapter>>();
    check_sm3::<Linear>();
}

fn check_sm3<L: Layer>() {
    let dev = device();
    let config = SftConfig::new(0.3, targets())
        .with_selection(SelectionAlgorithm::Sm3)
        .with_steps(4, 2)
        .with_rate(RatePolicy::Cosine, 0.5);
    let mut run = start::<L>(&config, 12, 0.01);
    let k = config
        .allocate(&Net::<L>::new(&dev))
        .unwrap()
        .num_deltas
        .unwrap();
    let mut actual: Vec<(Vec<f32>, Vec<f32>)> = LAYERS
        .iter()
        .map(|(_, i, o)| (vec![0.0; *o], vec![0.0; *i]))
        .collect();
    let mut acc: Vec<(Vec<f32>, Vec<f32>)> = LAYERS
        .iter()
        .map(|(_, i, o)| (vec![0.0; *o], vec![0.0; *i]))
        .collect();
    for step in 0..12 {
        let u = step + 1;
        let before: Vec<(Vec<u64>, Vec<f32>)> = ["a", "b"]
            .iter()
            .map(|n| {
                let ad = adapter_of(&run.net, n);
                (ad.indices(), ad.values())
            })
            .collect();
        let a = adapter_of(&run.net, "a");
        assert!(
            a.probe.is_none() && a.probe_anchor.is_none(),
            "SM3 never probes"
        );
        run.step();
        check_indices(&run.net, &k);
        for (l, (name, d_in, _)) in LAYERS.into_iter().enumerate() {
            let dw = dense_dw(l, step, &dev);
            let (old_idx, old_val) = &before[l];
            let (row, col) = &mut acc[l];
            let nu: Vec<f32> = old_idx
                .iter()
                .map(|&i| {
                    let (r, c) = (i as usize / d_in, i as usize % d_in);
                    row[r].min(col[c]) + dw[i as usize] * dw[i as usize]
                })
                .collect();
            for (e, &i) in old_idx.iter().enumerate() {
                let (r, c) = (i as usize / d_in, i as usize % d_in);
                row[r] = row[r].max(nu[e]);
                col[c] = col[c].max(nu[e]);
            }
            let sel = run.selector.lock().unwrap();
            let s = sel.sm3_state(name).unwrap();
            close(
                &s.row_acc,
                row,
                1e-6,
                &format!("{name}: row accumulators at {u}"),
            );
            close(
                &s.col_acc,
                col,
                1e-6,
                &format!("{name}: col accumulators at {u}"),
            );
            let (prev_row, prev_col) = &actual[l];
            assert!(
                s.row_acc.iter().zip(prev_row).all(|(a, b)| a >= b),
                "monotone rows"
            );
            assert!(
                s.col_acc.iter().zip(prev_col).all(|(a, b)| a >= b),
                "monotone cols"
            );
            actual[l] = (s.row_acc.clone(), s.col_acc.clone());
            let Some(p) = sel.schedule().selection(u) else {
                continue;
            };
            let after = adapter_of(&run.net, name);
            let (new_idx, new_val) = (after.indices(), after.values());
            let old_set: HashSet<u64> = old_idx.iter().copied().collect();
            let new_set: HashSet<u64> = new_idx.iter().copied().collect();
            let incoming: Vec<u64> = new_idx
                .iter()
                .copied()
                .filter(|i| !old_set.contains(i))
                .collect();
            let n_out = (k[name] as f64 * p) as usize;
            assert!(incoming.len() <= n_out, "{name}: S5 at {u}");
            assert_eq!(incoming.is_empty(), n_out == 0, "{name}: growth at {u}");
            let score = |i: u64| row[i as usize / d_in] * col[i as usize % d_in];
            let worst_in = incoming
                .iter()
                .map(|&i| score(i))
                .fold(f32::INFINITY, f32::min);
            let numel = row.len() * col.len();
            for i in 0..numel as u64 {
                if !old_set.contains(&i) && !new_set.contains(&i) {
                    assert!(score(i) <= worst_in, "{name}: growth is the top of row·col");
                }
            }
            for (pos, &i) in new_idx.iter().enumerate() {
                if !old_set.contains(&i) {
                    assert_eq!(new_val[pos], 0.0, "{name}: S6");
                } else {
                    let s = old_idx.iter().position(|&o| o == i).unwrap();
                    assert_ne!(
                        new_val[pos], old_val[s],
                        "{name}: retained entries were updated"
                    );
                }
            }
        }
    }
}

/// S13: SftAdamW against the formula, with weight decay and mixed ages.
#[test]
fn adamw_update_equals_the_formula() {
    let o = SftAdamW {
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-3,
        weight_decay: 0.1,
    };
    let mut state = AdamState {
        exp_avg: vec![0.1, -0.2],
        exp_avg_sq: vec![0.01, 0.3],
        age: vec![1.0, 4.0],
    };
    let mut p = vec![1.0f32, -2.0];
    let g = [0.5f32, 0.25];
    let lr = 0.01f64;
    let expect: Vec<f64> = (0..2)
        .map(|i| {
            let m = 0.8 * f64::from([0.1f32, -0.2][i]) + 0.2 * f64::from(g[i]);
            let v = 0.99 * f64::from([0.01f32, 0.3][i]) + 0.01 * f64::from(g[i]).powi(2);
            let age = [1.0, 4.0][i];
            let denom =
                (v.sqrt() + 1e-3) * (1.0 - 0.8f64.powf(age)) / (1.0 - 0.99f64.powf(age)).sqrt();
            let q = f64::from([1.0f32, -2.0][i]) - lr * m / denom;
            q - lr * 0.1 * q
        })
        .collect();
    o.step(lr, &mut p, &g, &mut state);
    for i in 0..2 {
        assert!(
            (f64::from(p[i]) - expect[i]).abs() < 1e-6,
            "{i}: {} vs {}",
            p[i],
            expect[i]
        );
    }
    assert_eq!(state.age, vec![2.0, 5.0]);
}

/// Files: indices as int64, values f32; a round trip into a model whose adapter would be
/// initialised differently; unsorted indices (the reference's order after reselection) and
/// `int32` indices (the reference writes them) load.
#[test]
fn files_use_integer_indices_and_round_trip() {
    let dev = device();
    let config = SftConfig::new(0.3, targets())
        .with_init(InitDeltas::Random(1.0))
        .allocate(&Act::new(&dev))
        .unwrap();
    let model = SftModel::new(Act::new(&dev), config.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model
        .save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let tensors =
        peft_core::hf::read_tensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    let key = "base_model.model.a.sft_delta.indices";
    let idx = tensors
        .get(key)
        .unwrap_or_else(|| panic!("{:?}", tensors.keys()));
    assert_eq!(idx.dtype(), burn::tensor::DType::I64);
    let json = peft_core::hf::read_json(&dir.path().join("adapter_config.json")).unwrap();
    assert_eq!(json["peft_type"], "SFT");
    assert_eq!(json["num_deltas"]["a"], 8);
    let loaded =
        SftModel::<Act>::from_pretrained(Act::new(&dev), dir.path(), &LoadOptions::default())
            .unwrap();
    for (name, _, _) in LAYERS {
        assert_eq!(
            delta_map(loaded.model(), name),
            delta_map(model.model(), name),
            "{name}"
        );
    }
    // Reverse the order of one layer's entries in the file: the same delta loads.
    let mut t = tensors.clone();
    for suffix in ["indices", "values"] {
        let k = format!("base_model.model.b.sft_delta.{suffix}");
        let d = t.remove(&k).unwrap();
        let d = if suffix == "indices" {
            let mut v: Vec<i64> = d.try_to_vec().unwrap();
            v.reverse();
            TensorData::new(v, [12])
        } else {
            let mut v: Vec<f32> = d.try_to_vec().unwrap();
            v.reverse();
            TensorData::new(v, [12])
        };
        t.insert(k, d);
    }
    peft_core::hf::write_tensors(&dir.path().join("adapter_model.safetensors"), &t).unwrap();
    let loaded =
        SftModel::<Act>::from_pretrained(Act::new(&dev), dir.path(), &LoadOptions::default())
            .unwrap();
    assert_eq!(
        delta_map(loaded.model(), "b"),
        delta_map(model.model(), "b")
    );
    // The reference's own layout: int32 indices in slot order (unsorted here), f32 values.
    let views: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(k, d)| {
            let shape = d.shape().to_vec();
            if k.ends_with("indices") {
                let v: Vec<i64> = d.clone().try_to_vec().unwrap();
                let bytes = v.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect();
                (k.clone(), safetensors::Dtype::I32, shape, bytes)
            } else {
                let v: Vec<f32> = d.clone().try_to_vec().unwrap();
                let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                (k.clone(), safetensors::Dtype::F32, shape, bytes)
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(k, dt, shape, b)| {
            let view = safetensors::tensor::TensorView::new(*dt, shape.clone(), b).unwrap();
            (k.clone(), view)
        })
        .collect();
    let file = dir.path().join("adapter_model.safetensors");
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let loaded =
        SftModel::<Act>::from_pretrained(Act::new(&dev), dir.path(), &LoadOptions::default())
            .unwrap();
    for (name, _, _) in LAYERS {
        assert_eq!(
            delta_map(loaded.model(), name),
            delta_map(model.model(), name),
            "int32 indices: {name}"
        );
    }
    // A repeated index is refused, naming the key.
    let mut bad = t.clone();
    bad.insert(
        "base_model.model.b.sft_delta.indices".into(),
        TensorData::new(vec![3i64; 12], [12]),
    );
    peft_core::hf::write_tensors(&dir.path().join("adapter_model.safetensors"), &bad).unwrap();
    let err = SftModel::<Act>::from_pretrained(Act::new(&dev), dir.path(), &LoadOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("sft_delta.indices"), "{err}");
}

fn params<L: Layer>(net: &Net<L>) -> Vec<Vec<f32>> {
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

/// Stopping after step 5 (inside a window, with a candidate pool) and resuming from files
/// ends exactly like the uninterrupted run, for both algorithms, on both attach paths.
#[test]
fn a_resumed_run_ends_like_an_uninterrupted_one() {
    check_resume::<PeftLinear<SftAdapter>>();
    check_resume::<Linear>();
}

fn check_resume<L: Layer>() {
    for algorithm in [SelectionAlgorithm::Rigl, SelectionAlgorithm::Sm3] {
        let dev = device();
        let config = rigl_config().with_selection(algorithm);
        let mut full = start::<L>(&config, 20, 0.05);
        for _ in 0..12 {
            full.step();
        }
        let mut first = start::<L>(&config, 20, 0.05);
        for _ in 0..5 {
            first.step();
        }
        let dir = tempfile::tempdir().unwrap();
        let allocated = config.allocate(&Net::<L>::new(&dev)).unwrap();
        let mut peft = SftModel::new(Net::<L>::new(&dev), allocated.clone()).unwrap();
        peft.map_model(|_| first.net.clone());
        peft.save_pretrained(dir.path(), &SaveOptions::default())
            .unwrap();
        first
            .selector
            .lock()
            .unwrap()
            .save_state(&dir.path().join("state"))
            .unwrap();
        let first_lr = first.lr;
        drop(first);

        let trainable = LoadOptions {
            is_trainable: true,
            ..Default::default()
        };
        let loaded =
            SftModel::<Net<L>>::from_pretrained(Net::<L>::new(&dev), dir.path(), &trainable)
                .unwrap();
        let mut selector = SftSelector::new(&allocated, "default", 20).unwrap();
        selector
            .load_state(&dir.path().join("state"), &dev)
            .unwrap();
        assert_eq!(selector.step_index(), 5);
        let net = selector.prepare(loaded.model().clone()).unwrap();
        let selector = Arc::new(Mutex::new(selector));
        let mut stepper = Stepper::new().with(selector.clone());
        stepper.set_step_index(5);
        let mut resumed = Run {
            net,
            selector,
            stepper,
            lr: first_lr,
        };
        for _ in 5..12 {
            resumed.step();
        }
        for (name, _, _) in LAYERS {
            assert_eq!(
                delta_map(&resumed.net, name),
                delta_map(&full.net, name),
                "{algorithm:?}/{name}"
            );
        }
        assert_eq!(params(&resumed.net), params(&full.net), "{algorithm:?}");
        let (a, b) = (
            full.selector.lock().unwrap(),
            resumed.selector.lock().unwrap(),
        );
        assert_eq!(a.adam_state("a"), b.adam_state("a"));
        assert_eq!(a.sm3_state("b"), b.sm3_state("b"));
        assert!(a.state_len() > 0);
    }
}
