//! One training step (forward, backward, AdamW) of a transformer-sized layer stack, three ways:
//! full fine-tuning, weight-space LoRA (plain `burn::nn::Linear` layers, adapters attached
//! through burn's reparameterization hook) and activation-space LoRA ([`PeftLinear`] layers).
//!
//! The workload is the one of `specs/perf-anchors.md`, so the numbers compare with PyTorch's
//! there: 6 blocks of `x = x + fc2(gelu(fc1(x)))` (384 -> 1536 -> 384) followed by
//! `x = x + o(v(k(q(x))))` (four 384 x 384 layers), all with bias; input `[2048, 384]`
//! (16 x 128 tokens); loss `mean(y^2)`; AdamW lr 1e-4, weight decay 0.01, eps 1e-8; LoRA r 16,
//! alpha 32 on all 36 linear layers.
//!
//! ```sh
//! cargo bench -p peft-lora --bench train_step
//! cargo bench -p peft-lora --bench train_step --features x86-v4   # AVX-512 gemm kernel
//! ```
//!
//! Criterion reports the time per step of each variant; the ratios against full fine-tuning
//! (measured in the same run) are printed at the end and recorded in `docs/benchmarks.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleDisplay};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_main};
use peft_core::step::Stepper;
use peft_core::{ModuleSelector, PeftLinear};
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};

const BLOCKS: usize = 6;
const D_MODEL: usize = 384;
const D_FF: usize = 1536;
const TOKENS: usize = 2048;

/// A linear layer the stack can be built from.
trait Layer: Module + ModuleDisplay + Clone + std::fmt::Debug {
    fn init(d_in: usize, d_out: usize, device: &Device) -> Self;
    fn apply(&self, x: Tensor<2>) -> Tensor<2>;
}

impl Layer for Linear {
    fn init(d_in: usize, d_out: usize, device: &Device) -> Self {
        LinearConfig::new(d_in, d_out).init(device)
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

impl Layer for PeftLinear<LoraAdapter> {
    fn init(d_in: usize, d_out: usize, device: &Device) -> Self {
        PeftLinear::from(LinearConfig::new(d_in, d_out).init(device))
    }
    fn apply(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x)
    }
}

#[derive(Module, Debug)]
struct Block<L> {
    fc1: L,
    fc2: L,
    q: L,
    k: L,
    v: L,
    o: L,
}

#[derive(Module, Debug)]
struct Stack<L> {
    blocks: Vec<Block<L>>,
}

impl<L: Layer> Stack<L> {
    fn new(device: &Device) -> Self {
        let blocks = (0..BLOCKS)
            .map(|_| Block {
                fc1: L::init(D_MODEL, D_FF, device),
                fc2: L::init(D_FF, D_MODEL, device),
                q: L::init(D_MODEL, D_MODEL, device),
                k: L::init(D_MODEL, D_MODEL, device),
                v: L::init(D_MODEL, D_MODEL, device),
                o: L::init(D_MODEL, D_MODEL, device),
            })
            .collect();
        Self { blocks }
    }

    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        for b in &self.blocks {
            x = x.clone() + b.fc2.apply(gelu(b.fc1.apply(x)));
            x = x.clone() + b.o.apply(b.v.apply(b.k.apply(b.q.apply(x))));
        }
        x
    }
}

/// A model, its optimizer and its step function, ready to run steps on a fixed input.
struct Run<L: Layer> {
    model: Option<Stack<L>>,
    optim: ModuleOptimizer,
    stepper: Stepper<Stack<L>>,
    input: Tensor<2>,
}

impl<L: Layer> Run<L> {
    fn new(model: Stack<L>, input: Tensor<2>) -> Self {
        let optim = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.01)
            .init();
        Self {
            model: Some(model),
            optim,
            stepper: Stepper::new(),
            input,
        }
    }

    fn step(&mut self) -> f32 {
        let model = self
            .model
            .take()
            .expect("the model is put back after each step");
        let loss = model.forward(self.input.clone()).powi_scalar(2).mean();
        let value: f32 = loss.clone().into_scalar();
        let model = self
            .stepper
            .step(model, &mut self.optim, 1e-4, loss)
            .expect("LoRA has no controller that can fail");
        self.model = Some(model);
        value
    }
}

fn lora_config() -> LoraConfig {
    LoraConfig::new(
        16,
        32.0,
        ModuleSelector::names(["fc1", "fc2", "q", "k", "v", "o"]),
    )
}

fn with_lora<L: Layer>(device: &Device) -> Stack<L> {
    let peft = LoraModel::new(Stack::<L>::new(device), lora_config())
        .expect("the config targets the stack's layers");
    let (trainable, _) = peft.trainable_parameters();
    assert_eq!(trainable, 663_552, "r 16 on 36 layers");
    peft.into_model()
}

fn median_ms(run: &mut impl FnMut() -> f32, steps: usize) -> f64 {
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            black_box(run());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[steps / 2]
}

fn train_step(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    device.seed(0);
    let input = Tensor::<2>::random([TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), &device);

    let mut full = Run::new(Stack::<Linear>::new(&device), input.clone());
    let mut weight = Run::new(with_lora::<Linear>(&device), input.clone());
    let mut activation = Run::new(with_lora::<PeftLinear<LoraAdapter>>(&device), input);

    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20));
    group.bench_function("full_finetuning", |b| b.iter(|| full.step()));
    group.bench_function("lora_weight_space", |b| b.iter(|| weight.step()));
    group.bench_function("lora_activation_space", |b| b.iter(|| activation.step()));
    group.finish();

    // Interleaved medians, so that the ratios see the same machine load.
    let (mut t_full, mut t_weight, mut t_act) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        t_full.push(median_ms(&mut || full.step(), 5));
        t_weight.push(median_ms(&mut || weight.step(), 5));
        t_act.push(median_ms(&mut || activation.step(), 5));
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (f, w, a) = (med(&mut t_full), med(&mut t_weight), med(&mut t_act));
    println!("\nmedian step, interleaved runs (ms) and ratio to full fine-tuning:");
    println!("  full fine-tuning        {f:8.1}  1.00");
    println!("  LoRA, weight space      {w:8.1}  {:.2}", w / f);
    println!("  LoRA, activation space  {a:8.1}  {:.2}", a / f);
}

// `criterion_group!` defines an undocumented public function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::train_step);
}
criterion_main!(group::benches);
