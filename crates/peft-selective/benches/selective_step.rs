//! Step time and optimizer-state memory of the selective optimizers against plain AdamW.
//!
//! Model: 4 × `Linear(512, 512)` (1,050,624 trainable entries) on flex. Every case times the
//! optimizer step alone (the same recorded gradients each step; forward and backward are
//! identical for all methods and are timed once for scale):
//! * `adamw`: burn's `ModuleOptimizer` AdamW over every entry (the baseline);
//! * `pafi/<budget>`: the selective AdamW over a fixed selection (PaFI; BitFit and ID3 after
//!   `max_steps` cost the same);
//! * `id3/<budget>`: ID3 while it unmasks (`max_steps = 100`): the D3 metric, the global top-u
//!   and the state growth, plus the selective AdamW.
//!
//! Run: `cargo bench -p peft-selective --bench selective_step`. After criterion's report, a
//! summary prints the median ratios against AdamW measured in the same run and the exact state
//! sizes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::module::{Module, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamW, AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use criterion::Criterion;
use peft_selective::{SelectiveConfig, SelectiveOptimizer};

const WIDTH: usize = 512;
const LAYERS: usize = 4;
const BUDGETS: [(&str, f64); 3] = [("0.1%", 0.001), ("1%", 0.01), ("10%", 0.1)];
const ID3_STEPS: usize = 100;

#[derive(Module, Debug)]
struct Stack {
    layers: Vec<Linear>,
}

impl Stack {
    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        for l in &self.layers {
            x = l.forward(x).tanh();
        }
        x
    }
}

fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

fn model(device: &Device) -> Stack {
    let layers = (0..LAYERS)
        .map(|i| {
            let mut l = LinearConfig::new(WIDTH, WIDTH).init(device);
            let w = values(i as u64 + 1, WIDTH * WIDTH, 0.05);
            l.weight = l.weight.map(|t| {
                Tensor::from_data(TensorData::new(w, [WIDTH, WIDTH]), &t.device()).require_grad()
            });
            l
        })
        .collect();
    Stack { layers }
}

/// The gradients of one batch, kept so every step can get a fresh `GradientsParams`.
struct Recorded {
    weights: Vec<(ParamId, Tensor<2>)>,
    biases: Vec<(ParamId, Tensor<1>)>,
}

impl Recorded {
    fn new(model: &Stack, device: &Device) -> (Self, Duration) {
        let x = Tensor::<2>::from_data(
            TensorData::new(values(99, 64 * WIDTH, 1.0), [64, WIDTH]),
            device,
        );
        let start = Instant::now();
        let loss = model.forward(x).powi_scalar(2).mean();
        let mut grads = GradientsParams::from_grads(loss.backward(), model);
        let weights: Vec<(ParamId, Tensor<2>)> = model
            .layers
            .iter()
            .map(|l| (l.weight.id, grads.remove::<2>(l.weight.id).unwrap()))
            .collect();
        let _ = weights[0].1.clone().sum().into_scalar::<f32>();
        let elapsed = start.elapsed();
        let biases = model
            .layers
            .iter()
            .map(|l| {
                let id = l.bias.as_ref().unwrap().id;
                (id, grads.remove::<1>(id).unwrap())
            })
            .collect();
        (Self { weights, biases }, elapsed)
    }

    fn grads(&self) -> GradientsParams {
        let mut g = GradientsParams::new();
        for (id, t) in &self.weights {
            g.register(*id, t.clone());
        }
        for (id, t) in &self.biases {
            g.register(*id, t.clone());
        }
        g
    }
}

/// Wait for the backend (flex is synchronous, but keep the timing honest on lazy backends).
fn sync(model: &Stack) {
    let _ = model.layers[0]
        .weight
        .val()
        .slice([0..1, 0..1])
        .into_scalar::<f32>();
}

fn total(model: &Stack) -> usize {
    peft_core::hosts::parameters(model)
        .iter()
        .map(|p| p.2)
        .sum()
}

/// A runnable case: fresh state, then `step` as many times as asked.
trait Case {
    fn step(&mut self);
}

struct Dense {
    model: Option<Stack>,
    optim: ModuleOptimizer,
    grads: std::rc::Rc<Recorded>,
}

impl Case for Dense {
    fn step(&mut self) {
        let m = self.model.take().unwrap();
        let m = self.optim.step(1e-3, m, self.grads.grads());
        sync(&m);
        self.model = Some(m);
    }
}

struct Selective {
    model: Option<Stack>,
    optim: SelectiveOptimizer<AdamW>,
    grads: std::rc::Rc<Recorded>,
}

impl Case for Selective {
    fn step(&mut self) {
        let m = self.model.take().unwrap();
        let m = self.optim.step(1e-3, m, self.grads.grads()).unwrap();
        sync(&m);
        self.model = Some(m);
    }
}

fn adamw() -> AdamW {
    AdamWConfig::new().build()
}

/// Make a case with its state warmed (one step for dense/PaFI, so state exists; none for ID3,
/// which must stay within its unmasking phase).
fn make(kind: &str, budget: usize, base: &Stack, grads: &std::rc::Rc<Recorded>) -> Box<dyn Case> {
    let model = base.clone();
    let mut case: Box<dyn Case> = match kind {
        "adamw" => Box::new(Dense {
            model: Some(model),
            optim: AdamWConfig::new().init(),
            grads: grads.clone(),
        }),
        "pafi" => Box::new(Selective {
            optim: SelectiveOptimizer::new(&model, SelectiveConfig::pafi(budget), adamw()).unwrap(),
            model: Some(model),
            grads: grads.clone(),
        }),
        _ => Box::new(Selective {
            optim: SelectiveOptimizer::new(
                &model,
                SelectiveConfig::id3(budget, ID3_STEPS),
                adamw(),
            )
            .unwrap(),
            model: Some(model),
            grads: grads.clone(),
        }),
    };
    if kind != "id3" {
        case.step();
    }
    case
}

/// Time `iters` steps, starting a fresh ID3 run whenever one would leave its unmasking phase.
fn timed(
    kind: &str,
    budget: usize,
    base: &Stack,
    grads: &std::rc::Rc<Recorded>,
    iters: u64,
) -> Duration {
    let mut elapsed = Duration::ZERO;
    let mut case = make(kind, budget, base, grads);
    let mut age = 0;
    for _ in 0..iters {
        if kind == "id3" && age == ID3_STEPS {
            case = make(kind, budget, base, grads);
            age = 0;
        }
        let start = Instant::now();
        case.step();
        elapsed += start.elapsed();
        age += 1;
    }
    elapsed
}

/// Median step times of AdamW, PaFI and ID3 at `budget`, sampled in interleaved rounds so that
/// a change of machine load hits all three alike.
fn medians(budget: usize, n: usize, base: &Stack, grads: &std::rc::Rc<Recorded>) -> [f64; 3] {
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..15 {
        for (k, kind) in ["adamw", "pafi", "id3"].into_iter().enumerate() {
            let b = if kind == "adamw" { n } else { budget };
            samples[k].push(timed(kind, b, base, grads, 2).as_secs_f64() / 2.0);
        }
    }
    samples.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    })
}

fn main() {
    let device = Device::flex().autodiff();
    let base = model(&device);
    let n = total(&base);
    let (recorded, fwd_bwd) = Recorded::new(&base, &device);
    let grads = std::rc::Rc::new(recorded);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    {
        let mut group = c.benchmark_group("optimizer_step");
        group.bench_function("adamw", |b| {
            b.iter_custom(|iters| timed("adamw", n, &base, &grads, iters))
        });
        for (label, frac) in BUDGETS {
            let budget = (n as f64 * frac).round() as usize;
            for kind in ["pafi", "id3"] {
                group.bench_function(format!("{kind}/{label}"), |b| {
                    b.iter_custom(|iters| timed(kind, budget, &base, &grads, black_box(iters)))
                });
            }
        }
        group.finish();
    }
    c.final_summary();

    // Summary: medians measured here, ratios against AdamW of this same run, exact state sizes.
    println!();
    println!("model: {LAYERS} x Linear({WIDTH}, {WIDTH}), {n} trainable entries, flex");
    println!(
        "forward + backward (batch 64), once: {:.2} ms",
        fwd_bwd.as_secs_f64() * 1e3
    );
    println!(
        "plain AdamW state: {} f32 = {} bytes (m and v per entry)",
        2 * n,
        8 * n
    );
    println!();
    println!(
        "| budget | entries | AdamW step | PaFI step | vs AdamW | ID3 step (unmasking) | vs AdamW | state f32 | state bytes | vs AdamW | indices |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, frac) in BUDGETS {
        let budget = (n as f64 * frac).round() as usize;
        let [dense, pafi, id3] = medians(budget, n, &base, &grads);
        let optim = SelectiveOptimizer::new(&base, SelectiveConfig::pafi(budget), adamw()).unwrap();
        let mut case = Selective {
            model: Some(base.clone()),
            optim,
            grads: grads.clone(),
        };
        case.step();
        let mem = case.optim.memory();
        println!(
            "| {label} | {budget} | {:.2} ms | {:.2} ms | {:.2}x | {:.2} ms | {:.2}x | {} | {} | {:.4}x | {} |",
            dense * 1e3,
            pafi * 1e3,
            pafi / dense,
            id3 * 1e3,
            id3 / dense,
            mem.state_entries,
            mem.state_bytes,
            mem.state_bytes as f64 / (8 * n) as f64,
            mem.index_entries,
        );
    }
}
