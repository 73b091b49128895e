//! Dense SM3 ([`Sm3Config`]) against a reference written with plain loops, over 1-, 2- and 3-D
//! parameters, and through an optimizer record.

use burn::module::{Module, Param};
use burn::optim::{GradientsParams, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor, TensorData};
use peft_sft::Sm3Config;

#[derive(Module, Debug)]
struct Net {
    a: Param<Tensor<1>>,
    b: Param<Tensor<2>>,
    c: Param<Tensor<3>>,
}

const DIMS: [&[usize]; 3] = [&[5], &[3, 4], &[2, 3, 4]];

/// The coefficients of step `t` for the parameter with `n` entries: magnitudes from 0.2 to 2,
/// both signs, changing with the step so that accumulators and momentum matter.
fn coef(t: usize, which: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|f| (((f * 7 + t * 13 + which * 5) % 11) as f32 - 5.0) / 2.5 + 0.1)
        .collect()
}

fn init(which: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|f| ((f * 3 + which) % 7) as f32 / 7.0 - 0.4)
        .collect()
}

/// `loss = Σ coef · w + ½ Σ w²`: the gradient is `coef + w`.
fn loss(net: &Net, t: usize, device: &Device) -> Tensor<1> {
    let term = |w: Tensor<1>, which: usize| {
        let n = w.dims()[0];
        let c = Tensor::<1>::from_data(TensorData::new(coef(t, which, n), [n]), device);
        (w.clone() * c).sum() + w.square().sum().mul_scalar(0.5)
    };
    term(net.a.val(), 0) + term(net.b.val().flatten(0, 1), 1) + term(net.c.val().flatten(0, 2), 2)
}

/// One parameter's reference state: an accumulator per dimension and the previous update.
struct Reference {
    dims: Vec<usize>,
    acc: Vec<Vec<f64>>,
    prev: Vec<f64>,
}

impl Reference {
    fn new(dims: &[usize]) -> Self {
        let n = dims.iter().product();
        Self {
            dims: dims.to_vec(),
            acc: dims.iter().map(|&d| vec![0.0; d]).collect(),
            prev: vec![0.0; n],
        }
    }

    fn index(&self, mut flat: usize) -> Vec<usize> {
        let mut idx = vec![0; self.dims.len()];
        for k in (0..self.dims.len()).rev() {
            idx[k] = flat % self.dims[k];
            flat /= self.dims[k];
        }
        idx
    }

    /// SM3 written out entry by entry.
    fn step(&mut self, cfg: &Sm3Config, lr: f64, w: &mut [f32], g: &[f32]) {
        let n = w.len();
        let nu: Vec<f64> = (0..n)
            .map(|f| {
                let idx = self.index(f);
                let min = (0..idx.len())
                    .map(|k| self.acc[k][idx[k]])
                    .fold(f64::INFINITY, f64::min);
                let g2 = f64::from(g[f]).powi(2);
                if cfg.beta > 0.0 {
                    cfg.beta * min + (1.0 - cfg.beta) * g2
                } else {
                    min + g2
                }
            })
            .collect();
        for (f, &v) in nu.iter().enumerate() {
            let idx = self.index(f);
            for (k, &i) in idx.iter().enumerate() {
                self.acc[k][i] = self.acc[k][i].max(v);
            }
        }
        for f in 0..n {
            let mut u = f64::from(g[f]) / (nu[f] + cfg.eps).sqrt();
            if cfg.momentum > 0.0 {
                u = (1.0 - cfg.momentum) * u + cfg.momentum * self.prev[f];
                self.prev[f] = u;
            }
            let mut p = f64::from(w[f]) - lr * u;
            if cfg.weight_decay != 0.0 {
                p -= lr * cfg.weight_decay * p;
            }
            w[f] = p as f32;
        }
    }
}

fn net(device: &Device) -> Net {
    let param = |which: usize, dims: &[usize]| {
        let n = dims.iter().product();
        TensorData::new(init(which, n), dims.to_vec())
    };
    Net {
        a: Param::from_data(param(0, DIMS[0]), device),
        b: Param::from_data(param(1, DIMS[1]), device),
        c: Param::from_data(param(2, DIMS[2]), device),
    }
}

fn values(net: &Net) -> [Vec<f32>; 3] {
    [
        net.a.val().into_data().try_to_vec::<f32>().unwrap(),
        net.b.val().into_data().try_to_vec::<f32>().unwrap(),
        net.c.val().into_data().try_to_vec::<f32>().unwrap(),
    ]
}

fn step(net: Net, optim: &mut ModuleOptimizer, lr: f64, t: usize, device: &Device) -> Net {
    let grads = GradientsParams::from_grads(loss(&net, t, device).backward(), &net);
    optim.step(lr, net, grads)
}

#[test]
fn dense_sm3_matches_the_loop_reference_for_ranks_1_2_3() {
    let device = Device::flex().autodiff();
    let configs = [
        Sm3Config::new(),
        Sm3Config::new().with_momentum(0.9),
        Sm3Config::new()
            .with_momentum(0.5)
            .with_beta(0.9)
            .with_weight_decay(0.1),
    ];
    for cfg in configs {
        let mut model = net(&device);
        let mut optim = cfg.init();
        let mut want = values(&model);
        let mut refs: Vec<Reference> = DIMS.iter().map(|d| Reference::new(d)).collect();
        for t in 0..5 {
            let lr = 0.05 * (t + 1) as f64;
            for (which, r) in refs.iter_mut().enumerate() {
                let n = want[which].len();
                let g: Vec<f32> = coef(t, which, n)
                    .iter()
                    .zip(&want[which])
                    .map(|(c, w)| c + w)
                    .collect();
                r.step(&cfg, lr, &mut want[which], &g);
            }
            model = step(model, &mut optim, lr, t, &device);
            let got = values(&model);
            for which in 0..3 {
                for (f, (x, y)) in got[which].iter().zip(&want[which]).enumerate() {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "{cfg:?}, step {t}, parameter {which}, entry {f}: {x} vs reference {y}"
                    );
                }
            }
        }
        // The accumulators matter: after the first step the update is no longer lr · sign(g).
        let first = values(&net(&device));
        assert!(
            want[1]
                .iter()
                .zip(&first[1])
                .any(|(w, f)| ((w - f).abs() - 0.75).abs() > 1e-3),
            "{cfg:?}"
        );
    }
}

#[test]
fn dense_sm3_accumulators_match_the_verified_example() {
    // The spec's example as a dense gradient: g = (1, 2, 3) at flat {0, 5, 7} of a 3x4 weight,
    // zeros elsewhere, gives row = [1, 9, 0] and col = [1, 4, 0, 9].
    let device = Device::flex();
    let mut g = vec![0.0f32; 12];
    g[0] = 1.0;
    g[5] = 2.0;
    g[7] = 3.0;
    let grad = Tensor::<2>::from_data(TensorData::new(g.clone(), [3, 4]), &device);
    let weight = Tensor::<2>::zeros([3, 4], &device);
    let (weight, state) = Sm3Config::new().build().step(0.1, weight, grad, None);
    let state = state.unwrap();
    let acc = |i: usize| -> Vec<f32> {
        state.accumulators[i]
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(acc(0), vec![1.0, 9.0, 0.0]);
    assert_eq!(acc(1), vec![1.0, 4.0, 0.0, 9.0]);
    assert!(state.momentum.is_none());
    // u = g / sqrt(g² + ε): each entry with a gradient moves by about -lr, the others stay.
    let w: Vec<f32> = weight.into_data().try_to_vec::<f32>().unwrap();
    for (x, g) in w.iter().zip(&g) {
        let want = if *g == 0.0 { 0.0 } else { -0.1 };
        assert!((x - want).abs() < 1e-6, "{w:?}");
    }
}

#[test]
fn dense_sm3_resumes_from_its_record() {
    let device = Device::flex().autodiff();
    let cfg = Sm3Config::new().with_momentum(0.9);
    let mut model = net(&device);
    let mut optim = cfg.init();
    for t in 0..3 {
        model = step(model, &mut optim, 0.1, t, &device);
    }
    let record = optim.to_record();
    assert!(!record.is_empty());
    let bytes = optim.into_bytes().unwrap();
    let mut restored = cfg.init().from_bytes(bytes).unwrap();
    let mut fresh = cfg.init();

    let expected = values(&step(model.clone(), &mut optim, 0.1, 3, &device));
    let resumed = values(&step(model.clone(), &mut restored, 0.1, 3, &device));
    let from_scratch = values(&step(model, &mut fresh, 0.1, 3, &device));
    assert_eq!(
        resumed, expected,
        "the next step after a reload is the same"
    );
    assert_ne!(
        from_scratch, expected,
        "the state carries something (accumulators and momentum)"
    );
}
