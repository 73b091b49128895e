//! `peft_kernels::linear` against `burn::tensor::module::linear` on the products of a
//! MiniLM training step (16 x 128 tokens, hidden 384, FFN 1536, LoRA rank 16): the forward
//! products with bias, the input gradient against a transposed weight view (`g·Wᵀ`), and the
//! LoRA products (`x·A`, `(x·A)ᵀ·g` with a transposed `lhs`); then one LoRA layer (r = 16, a
//! frozen base weight) as `kernels::lora_linear` against the same layer from separate ops (two
//! `kernels::linear` products, a scale and an add), forward alone and forward + backward.
//!
//! ```sh
//! cargo bench -p peft-kernels --bench linear --features x86-v4
//! ```
//!
//! Criterion reports each side; the ratios (burn's time over ours, medians of interleaved runs
//! so that both see the same machine load) are printed at the end and recorded in
//! `docs/benchmarks.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_main};

/// A product: name, `lhs` (`[m, k]`), `rhs` (`[k, n]`), bias.
struct Case {
    name: &'static str,
    lhs: Tensor<2>,
    rhs: Tensor<2>,
    bias: Option<Tensor<1>>,
}

fn cases(device: &Device) -> Vec<Case> {
    let random =
        |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), device);
    let bias = |n: usize| {
        Some(Tensor::<1>::random(
            [n],
            Distribution::Normal(0.0, 1.0),
            device,
        ))
    };
    let tokens = 2048;
    let case = |name, lhs, rhs, bias| Case {
        name,
        lhs,
        rhs,
        bias,
    };
    vec![
        case(
            "x·W+b 384->1536",
            random([tokens, 384]),
            random([384, 1536]),
            bias(1536),
        ),
        case(
            "x·W+b 1536->384",
            random([tokens, 1536]),
            random([1536, 384]),
            bias(384),
        ),
        case(
            "x·W+b 384->384",
            random([tokens, 384]),
            random([384, 384]),
            bias(384),
        ),
        // `g·Wᵀ` with W `[384, 1536]` as the layer stores it: a transposed view.
        case(
            "g·Wᵀ 1536->384",
            random([tokens, 1536]),
            random([384, 1536]).transpose(),
            None,
        ),
        case("x·A r16", random([tokens, 384]), random([384, 16]), None),
        // `lhs` a transposed view, as in the weight gradient.
        case(
            "(x·A)ᵀ·g r16",
            random([tokens, 16]).transpose(),
            random([tokens, 1536]),
            None,
        ),
    ]
}

/// The product of `case` by burn's `linear` or by ours; one element read back.
fn product(case: &Case, fast: bool) -> f32 {
    let f = if fast {
        peft_kernels::linear::<2>
    } else {
        burn::tensor::module::linear::<2>
    };
    let y = f(case.lhs.clone(), case.rhs.clone(), case.bias.clone());
    y.slice([0..1, 0..1]).into_scalar::<f32>()
}

fn median_ms(run: &mut impl FnMut() -> f32, reps: usize) -> f64 {
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(run());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

fn linear(c: &mut Criterion) {
    let device = Device::flex();
    device.seed(0);
    let cases = cases(&device);
    let mut group = c.benchmark_group("linear");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for case in &cases {
        group.bench_function(format!("{} burn", case.name), |b| {
            b.iter(|| product(case, false))
        });
        group.bench_function(format!("{} ours", case.name), |b| {
            b.iter(|| product(case, true))
        });
    }
    group.finish();

    println!("\nmedian ms, interleaved runs: burn's linear, ours, ratio (burn / ours)");
    for case in &cases {
        let (mut b, mut o) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            b.push(median_ms(&mut || product(case, false), 9));
            o.push(median_ms(&mut || product(case, true), 9));
        }
        b.sort_by(f64::total_cmp);
        o.sort_by(f64::total_cmp);
        let (b, o) = (b[2], o[2]);
        println!("  {:18} {b:8.3} {o:8.3}  {:.2}", case.name, b / o);
    }
}

/// A LoRA layer's operands (`x`, frozen `w`, `bias`, `a`, `b`) on an autodiff device.
struct LoraLayer {
    x: Tensor<2>,
    w: Tensor<2>,
    bias: Tensor<1>,
    a: Tensor<2>,
    b: Tensor<2>,
    upstream: Tensor<2>,
}

impl LoraLayer {
    fn new(d_in: usize, d_out: usize, device: &Device) -> Self {
        let random =
            |shape: [usize; 2]| Tensor::random(shape, Distribution::Normal(0.0, 1.0), device);
        Self {
            x: random([2048, d_in]),
            w: random([d_in, d_out]),
            bias: Tensor::random([d_out], Distribution::Normal(0.0, 1.0), device),
            a: random([d_in, 16]),
            b: random([16, d_out]),
            upstream: random([2048, d_out]),
        }
    }

    /// The layer's output, fused or from separate ops; with `train`, its backward pass too
    /// (gradients of `x`, `a`, `b`, the bias). One element read back.
    fn run(&self, fused: bool, train: bool) -> f32 {
        use peft_kernels::{linear, lora_linear};
        let (x, a, b, bias) = if train {
            (
                self.x.clone().require_grad(),
                self.a.clone().require_grad(),
                self.b.clone().require_grad(),
                self.bias.clone().require_grad(),
            )
        } else {
            (
                self.x.clone(),
                self.a.clone(),
                self.b.clone(),
                self.bias.clone(),
            )
        };
        let y = if fused {
            lora_linear(x.clone(), self.w.clone(), Some(bias), a, b, 2.0)
        } else {
            linear(x.clone(), self.w.clone(), Some(bias))
                + linear(linear(x.clone(), a, None) * 2.0, b, None)
        };
        if !train {
            return y.slice([0..1, 0..1]).into_scalar::<f32>();
        }
        let grads = (y * self.upstream.clone()).sum().backward();
        let dx = x.grad(&grads).expect("x is tracked");
        dx.slice([0..1, 0..1]).into_scalar::<f32>()
    }
}

fn lora_layer(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    device.seed(0);
    let layers = [
        ("384->1536", LoraLayer::new(384, 1536, &device)),
        ("1536->384", LoraLayer::new(1536, 384, &device)),
    ];
    let mut group = c.benchmark_group("lora_layer");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, layer) in &layers {
        for (mode, train) in [("forward", false), ("forward+backward", true)] {
            group.bench_function(format!("{name} {mode} separate"), |b| {
                b.iter(|| layer.run(false, train))
            });
            group.bench_function(format!("{name} {mode} fused"), |b| {
                b.iter(|| layer.run(true, train))
            });
        }
    }
    group.finish();

    println!("\nmedian ms, interleaved runs: LoRA layer from separate ops, fused, ratio");
    for (name, layer) in &layers {
        for (mode, train) in [("forward", false), ("forward+backward", true)] {
            let (mut s, mut f) = (Vec::new(), Vec::new());
            for _ in 0..5 {
                s.push(median_ms(&mut || layer.run(false, train), 9));
                f.push(median_ms(&mut || layer.run(true, train), 9));
            }
            s.sort_by(f64::total_cmp);
            f.sort_by(f64::total_cmp);
            let (s, f) = (s[2], f[2]);
            println!("  {name:10} {mode:17} {s:8.3} {f:8.3}  {:.2}", s / f);
        }
    }
}

// `criterion_group!` defines an undocumented public function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::linear, super::lora_layer);
}
criterion_main!(group::benches);
