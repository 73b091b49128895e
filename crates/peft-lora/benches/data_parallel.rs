//! One LoRA training step on one device against two data-parallel replicas
//! ([`peft_core::DataParallel`]), each on half of the batch.
//!
//! ```sh
//! cargo bench -p peft-lora --bench data_parallel
//! ```
//!
//! The workload is a smaller `train_step` stack (2 blocks of `x = x + fc2(gelu(fc1(x)))`,
//! 384 -> 1536 -> 384, and `x = x + o(v(k(q(x))))`), input `[512, 384]`, loss `mean(y^2)`,
//! AdamW, LoRA r 16 on all 12 linear layers. Three ways, interleaved (3 rounds x 5 steps each,
//! medians), ratios against the first measured in the same run:
//! - `Stepper::train` on one device, the full batch;
//! - `DataParallel` with one replica, the full batch (the reduction's own cost);
//! - `DataParallel` with two replicas, 256 rows each. Here both replicas share the machine's one
//!   flex device (burn's flex device is a single device without collectives), so this measures
//!   the overhead of replication and of the gather reduction, not a speed-up: two devices would
//!   run the replicas at the same time.

use std::hint::black_box;
use std::time::Instant;

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::{AdamWConfig, ModuleOptimizer};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Tensor};
use peft_core::step::{Stepper, Tuned};
use peft_core::{DataParallel, ModuleSelector, PeftLinear, Reduction};
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};

const BLOCKS: usize = 2;
const D_MODEL: usize = 384;
const D_FF: usize = 1536;
const TOKENS: usize = 512;

type L = PeftLinear<LoraAdapter>;

#[derive(Module, Debug)]
struct Block {
    fc1: L,
    fc2: L,
    q: L,
    k: L,
    v: L,
    o: L,
}

#[derive(Module, Debug)]
struct Stack {
    blocks: Vec<Block>,
}

impl Stack {
    fn new(device: &Device) -> Self {
        let l = |i, o| PeftLinear::from(LinearConfig::new(i, o).init(device));
        let blocks = (0..BLOCKS)
            .map(|_| Block {
                fc1: l(D_MODEL, D_FF),
                fc2: l(D_FF, D_MODEL),
                q: l(D_MODEL, D_MODEL),
                k: l(D_MODEL, D_MODEL),
                v: l(D_MODEL, D_MODEL),
                o: l(D_MODEL, D_MODEL),
            })
            .collect();
        Self { blocks }
    }

    fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        for b in &self.blocks {
            x = x.clone() + b.fc2.forward(gelu(b.fc1.forward(x)));
            x = x.clone() + b.o.forward(b.v.forward(b.k.forward(b.q.forward(x))));
        }
        x
    }

    /// Mean squared output over `rows` of `input`, and the number of values it is over.
    fn loss(&self, input: &Tensor<2>, rows: std::ops::Range<usize>) -> (Tensor<1>, f64) {
        let y = self.forward(input.clone().slice([rows, 0..D_MODEL]));
        let n = y.shape().num_elements() as f64;
        (y.powi_scalar(2).mean().reshape([1]), n)
    }
}

fn adamw() -> ModuleOptimizer {
    AdamWConfig::new().with_weight_decay(0.01).init()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_ms(steps: usize, mut step: impl FnMut()) -> f64 {
    median(
        (0..steps)
            .map(|_| {
                let t = Instant::now();
                step();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() {
    let device = Device::flex().autodiff();
    device.seed(0);
    let input = Tensor::<2>::random([TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
    let config = LoraConfig::new(
        16,
        32.0,
        ModuleSelector::names(["fc1", "fc2", "q", "k", "v", "o"]),
    );
    let peft = LoraModel::new(Stack::new(&device), config).expect("the stack's layers");

    let mut single = peft.clone();
    let mut stepper: Stepper<Stack> = single.stepper(usize::MAX).expect("LoRA");
    let mut optim = adamw();
    let mut one = DataParallel::new(
        peft.clone(),
        std::slice::from_ref(&device),
        usize::MAX,
        adamw,
        Reduction::Gather,
    )
    .expect("one replica");
    let mut two = DataParallel::new(
        peft,
        &[device.clone(), device],
        usize::MAX,
        adamw,
        Reduction::Gather,
    )
    .expect("two replicas");
    let half = TOKENS / 2;

    let (mut t_single, mut t_one, mut t_two) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        t_single.push(time_ms(5, || {
            let (loss, _) = single.tuned_model().loss(&input, 0..TOKENS);
            stepper
                .train(&mut single, &mut optim, 1e-4, loss)
                .expect("LoRA has no controller that can fail");
        }));
        t_one.push(time_ms(5, || {
            black_box(
                one.backward(|_, m| Ok(m.loss(&input, 0..TOKENS)))
                    .expect("step"),
            );
            one.step(1e-4).expect("step");
        }));
        t_two.push(time_ms(5, || {
            black_box(
                two.backward(|i, m| Ok(m.loss(&input, i * half..(i + 1) * half)))
                    .expect("step"),
            );
            two.step(1e-4).expect("step");
        }));
    }
    let (s, o, t) = (median(t_single), median(t_one), median(t_two));
    println!("median step, interleaved runs (ms) and ratio to Stepper::train on one device:");
    println!("  Stepper::train, 1 device, {TOKENS} rows        {s:8.1}  1.00");
    println!(
        "  DataParallel, 1 replica, {TOKENS} rows         {o:8.1}  {:.2}",
        o / s
    );
    println!(
        "  DataParallel, 2 replicas (one flex device), {half} rows each  {t:8.1}  {:.2}",
        t / s
    );
}
