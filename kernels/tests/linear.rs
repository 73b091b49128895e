//! `linear` and `lora_linear` against burn's own ops and autodiff, over plain, strided and
//! rank-three operands; the LoRA gradients on every CPU body this machine supports (the rank-16
//! AVX-512 row kernel and the three-product path). Every random operand has a fixed seed, shown
//! in the failure message.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_kernels::cpu_body::for_each_cpu_body;
use peft_kernels::{linear, lora_linear};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// `|a - b|` relative to `b`'s largest magnitude (at least 1).
fn rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// Standard normal values, the same for a given `seed` on every run and machine (burn's own
/// generator is process-global, shared by tests running in parallel).
fn random<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = TensorData::random::<f32, _, _>(shape, Distribution::Normal(0.0, 1.0), &mut rng);
    Tensor::from_data(data, device)
}

/// `(m, k, n)`: single elements, gemm tails, narrow outputs (LoRA's rank), wide ones,
/// products above the threading threshold (split into row blocks, or with too few rows to
/// split), and decoding-step products split by output columns (one row, and a few rows with
/// a width that leaves the last block short).
const SHAPES: [(usize, usize, usize); 11] = [
    (1, 1, 1),
    (5, 7, 3),
    (300, 40, 16),
    (16, 300, 200),
    (70, 33, 63),
    (40, 384, 64),
    (512, 384, 48),
    (300, 200, 150),
    (16, 2048, 256),
    (1, 576, 1536),
    (3, 400, 350),
];

#[test]
fn the_forward_equals_burns_linear_for_plain_and_strided_operands() {
    let device = Device::flex();
    for (case, (m, k, n)) in SHAPES.into_iter().enumerate() {
        let seed = 10 * case as u64;
        let x = random([m, k], seed, &device);
        let w = random([k, n], seed + 1, &device);
        let b = random([n], seed + 2, &device);
        for bias in [None, Some(b.clone())] {
            let expected = burn::tensor::module::linear(x.clone(), w.clone(), bias.clone());
            let plain = linear(x.clone(), w.clone(), bias.clone());
            assert_eq!(plain.dims(), [m, n]);
            assert!(
                rel_diff(plain, expected.clone()) < 1e-5,
                "{m}x{k}x{n} seed {seed}"
            );
            // Transposed views of both operands, as the backward pass passes them.
            let xt = x.clone().transpose().contiguous_copy().transpose();
            let wt = w.clone().transpose().contiguous_copy().transpose();
            let strided = linear(xt, wt, bias.clone());
            assert!(
                rel_diff(strided, expected) < 1e-5,
                "{m}x{k}x{n} seed {seed} strided"
            );
        }
    }
}

trait ContiguousCopy {
    fn contiguous_copy(self) -> Self;
}

impl ContiguousCopy for Tensor<2> {
    /// A new contiguous tensor with the same values (its transpose is then a strided view).
    fn contiguous_copy(self) -> Self {
        let device = self.device();
        Tensor::from_data(self.into_data(), &device)
    }
}

#[test]
fn rank_three_inputs_run_over_their_rows_and_an_empty_inner_dimension_gives_the_bias() {
    let device = Device::flex();
    let x = random([3, 5, 8], 1000, &device);
    let w = random([8, 20], 1001, &device);
    let b = random([20], 1002, &device);
    let expected = burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()));
    let y = linear(x, w, Some(b.clone()));
    assert_eq!(y.dims(), [3, 5, 20]);
    assert!(rel_diff(y, expected) < 1e-5);

    let empty = linear(
        Tensor::<2>::zeros([4, 0], &device),
        Tensor::zeros([0, 20], &device),
        Some(b.clone()),
    );
    let rows: Tensor<2> = b.reshape([1, 20]).repeat_dim(0, 4);
    assert_eq!(rel_diff(empty, rows), 0.0);
    let zeros = linear(
        Tensor::<2>::zeros([4, 0], &device),
        Tensor::zeros([0, 20], &device),
        None,
    );
    assert_eq!(zeros.abs().sum().into_scalar::<f32>(), 0.0);
}

#[test]
fn gradients_equal_burns_autodiff_for_every_tracked_operand() {
    let device = Device::flex().autodiff();
    for (case, (m, k, n)) in SHAPES.into_iter().enumerate() {
        let seed = 10 * case as u64;
        let inner = device.clone().inner();
        let (x, w, b) = (
            random([m, k], seed, &inner),
            random([k, n], seed + 1, &inner),
            random([n], seed + 2, &inner),
        );
        let upstream = Tensor::<2>::from_inner(random([m, n], seed + 3, &inner));
        // (x tracked, weight tracked, with bias): a frozen base weight, LoRA factors, full
        // fine-tuning.
        for (x_tracked, w_tracked, with_bias) in [
            (true, false, true),
            (true, true, false),
            (false, true, true),
            (true, true, true),
        ] {
            let run = |fast: bool| {
                let track = |t: Tensor<2>, on: bool| {
                    let t = Tensor::<2>::from_inner(t);
                    if on { t.require_grad() } else { t }
                };
                let (xv, wv) = (track(x.clone(), x_tracked), track(w.clone(), w_tracked));
                let bv = with_bias.then(|| Tensor::<1>::from_inner(b.clone()).require_grad());
                let y = if fast {
                    linear(xv.clone(), wv.clone(), bv.clone())
                } else {
                    burn::tensor::module::linear(xv.clone(), wv.clone(), bv.clone())
                };
                let grads = (y * upstream.clone()).sum().backward();
                (
                    xv.grad(&grads),
                    wv.grad(&grads),
                    bv.and_then(|b| b.grad(&grads)),
                )
            };
            let (fast, reference) = (run(true), run(false));
            let case =
                format!("{m}x{k}x{n} seed {seed} x:{x_tracked} w:{w_tracked} bias:{with_bias}");
            assert_eq!(fast.0.is_some(), x_tracked, "{case}");
            assert_eq!(fast.1.is_some(), w_tracked, "{case}");
            assert_eq!(fast.2.is_some(), with_bias, "{case}");
            if let (Some(a), Some(b)) = (fast.0, reference.0) {
                assert!(rel_diff(a, b) < 1e-5, "dx {case}");
            }
            if let (Some(a), Some(b)) = (fast.1, reference.1) {
                assert!(rel_diff(a, b) < 1e-5, "dW {case}");
            }
            if let (Some(a), Some(b)) = (fast.2, reference.2) {
                assert!(rel_diff(a, b) < 1e-5, "db {case}");
            }
        }
    }
}

/// `linear(x, w, bias) + linear(linear(x, a) * scale, b)` from burn's own ops.
fn composed_lora<const D: usize>(
    x: Tensor<D>,
    w: Tensor<2>,
    bias: Option<Tensor<1>>,
    (a, b, scale): (Tensor<2>, Tensor<2>, f64),
) -> Tensor<D> {
    use burn::tensor::module::linear;
    linear(x.clone(), w, bias) + linear(linear(x, a, None) * scale, b, None)
}

/// `(m, k, n, r)`: the linear shapes above with a few ranks, a split product with its
/// rank-16 term, and the fused gradient kernel's ranks (8, 16, 32, 64) with row counts
/// that leave a thread fewer than four rows, and a two-row decoding step split by columns.
const LORA_SHAPES: [(usize, usize, usize, usize); 10] = [
    (1, 1, 1, 1),
    (5, 7, 3, 2),
    (70, 33, 63, 4),
    (300, 200, 150, 16),
    (512, 384, 48, 8),
    (16, 2048, 256, 16),
    (7, 33, 20, 16),
    (45, 70, 90, 32),
    (9, 10, 11, 64),
    (2, 576, 1000, 8),
];

#[test]
fn lora_linear_equals_the_composed_ops_for_plain_strided_and_rank_three_inputs() {
    let device = Device::flex();
    for (case, (m, k, n, r)) in LORA_SHAPES.into_iter().enumerate() {
        let seed = 10 * case as u64;
        let (x, w, bias) = (
            random([m, k], seed, &device),
            random([k, n], seed + 1, &device),
            random([n], seed + 2, &device),
        );
        let (a, b) = (
            random([k, r], seed + 3, &device),
            random([r, n], seed + 4, &device),
        );
        for bias in [None, Some(bias)] {
            let expected = composed_lora(
                x.clone(),
                w.clone(),
                bias.clone(),
                (a.clone(), b.clone(), 0.7),
            );
            let y = lora_linear(
                x.clone(),
                w.clone(),
                bias.clone(),
                a.clone(),
                b.clone(),
                0.7,
            );
            assert_eq!(y.dims(), [m, n]);
            assert!(
                rel_diff(y, expected.clone()) < 1e-5,
                "{m}x{k}x{n} r{r} seed {seed}"
            );
            let t = |t: &Tensor<2>| t.clone().transpose().contiguous_copy().transpose();
            let y = lora_linear(t(&x), t(&w), bias.clone(), t(&a), t(&b), 0.7);
            assert!(
                rel_diff(y, expected) < 1e-5,
                "{m}x{k}x{n} r{r} seed {seed} strided"
            );
        }
    }
    let x = random([3, 5, 8], 1000, &device);
    let (w, bias) = (random([8, 20], 1001, &device), random([20], 1002, &device));
    let (a, b) = (
        random([8, 4], 1003, &device),
        random([4, 20], 1004, &device),
    );
    let expected = composed_lora(
        x.clone(),
        w.clone(),
        Some(bias.clone()),
        (a.clone(), b.clone(), 2.0),
    );
    let y = lora_linear(x, w, Some(bias), a, b, 2.0);
    assert_eq!(y.dims(), [3, 5, 20]);
    assert!(rel_diff(y, expected) < 1e-5);
    // An empty inner dimension leaves the bias (the LoRA term is empty too).
    let (x, w) = (
        Tensor::<2>::zeros([4, 0], &device),
        Tensor::zeros([0, 6], &device),
    );
    let (a, b) = (
        Tensor::zeros([0, 2], &device),
        random([2, 6], 1005, &device),
    );
    let bias = random([6], 1006, &device);
    let y = lora_linear(x, w, Some(bias.clone()), a, b, 1.0);
    assert_eq!(rel_diff(y, bias.reshape([1, 6]).repeat_dim(0, 4)), 0.0);
}

/// On every CPU body: rank 16 takes the AVX-512 row kernel only with that body.
#[test]
fn lora_linear_gradients_equal_burns_autodiff_for_every_tracked_operand() {
    for_each_cpu_body(|body| lora_gradients_on_the_current_body(&format!("{body:?}")));
}

fn lora_gradients_on_the_current_body(body: &str) {
    let device = Device::flex().autodiff();
    let inner = device.clone().inner();
    for (case, (m, k, n, r)) in LORA_SHAPES.into_iter().enumerate() {
        let seed = 10 * case as u64;
        let (x, w, bias) = (
            random([m, k], seed, &inner),
            random([k, n], seed + 1, &inner),
            random([n], seed + 2, &inner),
        );
        let (a, b) = (
            random([k, r], seed + 3, &inner),
            random([r, n], seed + 4, &inner),
        );
        let upstream = Tensor::<2>::from_inner(random([m, n], seed + 5, &inner));
        // (x, weight, a, b, bias) tracked: a LoRA layer (the first one with a frozen input),
        // full fine-tuning on top of LoRA, a frozen `a`, and no bias.
        for tracked in [
            [true, false, true, true, true],
            [false, false, true, true, true],
            [true, true, true, true, true],
            [true, false, false, true, false],
            [true, false, true, false, false],
        ] {
            let run = |fast: bool| {
                let track = |t: &Tensor<2>, on: bool| {
                    let t = Tensor::<2>::from_inner(t.clone());
                    if on { t.require_grad() } else { t }
                };
                let (xv, wv) = (track(&x, tracked[0]), track(&w, tracked[1]));
                let (av, bv) = (track(&a, tracked[2]), track(&b, tracked[3]));
                let biasv =
                    tracked[4].then(|| Tensor::<1>::from_inner(bias.clone()).require_grad());
                let y = if fast {
                    lora_linear(
                        xv.clone(),
                        wv.clone(),
                        biasv.clone(),
                        av.clone(),
                        bv.clone(),
                        1.5,
                    )
                } else {
                    composed_lora(
                        xv.clone(),
                        wv.clone(),
                        biasv.clone(),
                        (av.clone(), bv.clone(), 1.5),
                    )
                };
                let grads = (y * upstream.clone()).sum().backward();
                let g2 = |t: &Tensor<2>| t.grad(&grads);
                (
                    [g2(&xv), g2(&wv), g2(&av), g2(&bv)],
                    biasv.and_then(|t| t.grad(&grads)),
                )
            };
            let ((fast, fast_bias), (reference, reference_bias)) = (run(true), run(false));
            let case = format!("{body} body, {m}x{k}x{n} r{r} seed {seed} tracked {tracked:?}");
            for (i, (f, e)) in fast.into_iter().zip(reference).enumerate() {
                assert_eq!(f.is_some(), tracked[i], "operand {i}: {case}");
                if let (Some(f), Some(e)) = (f, e) {
                    assert!(rel_diff(f, e) < 1e-4, "operand {i}: {case}");
                }
            }
            assert_eq!(fast_bias.is_some(), tracked[4], "{case}");
            if let (Some(f), Some(e)) = (fast_bias, reference_bias) {
                assert!(rel_diff(f, e) < 1e-5, "bias: {case}");
            }
        }
    }
}
