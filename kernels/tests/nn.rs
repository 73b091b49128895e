//! The fused GELU, attention and layer norm against burn's own ops (forward) and their autodiff
//! gradients (backward), over in-place, shared, non-contiguous and multi-chunk inputs; every
//! test on every CPU body this machine supports (`for_each_cpu_body` prints which).

use burn::tensor::activation::gelu as reference_gelu;
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use peft_kernels::cpu_body::for_each_cpu_body;
use peft_kernels::gelu;
use rand::SeedableRng;
use rand::rngs::StdRng;

/// Values from `distribution`, the same for a given `seed` on every run and machine (burn's own
/// generator is process-global, shared by tests running in parallel). Tests name the seed in
/// their failure messages.
fn random<const D: usize>(
    shape: [usize; D],
    distribution: Distribution,
    seed: u64,
    device: &Device,
) -> Tensor<D> {
    let mut rng = StdRng::seed_from_u64(seed);
    Tensor::from_data(
        TensorData::random::<f32, _, _>(shape, distribution, &mut rng),
        device,
    )
}

fn max_abs(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// Values over the whole interesting range: normal(0, 3), plus exact zeros, large magnitudes and
/// the points where the erf approximation switches regime.
fn inputs(rows: usize, cols: usize, seed: u64, device: &Device) -> Tensor<2> {
    let x = random([rows, cols], Distribution::Normal(0.0, 3.0), seed, device);
    let special = [0.0f32, -0.0, 1e-8, -1e-8, 10.0, -10.0, 40.0, -40.0];
    let k = cols.min(special.len());
    let special = Tensor::<1>::from_floats(&special[..k], device).reshape([1, k]);
    x.slice_assign([0..1, 0..k], special)
}

#[test]
fn the_forward_equals_burns_gelu_in_place_shared_and_strided() {
    for_each_cpu_body(|_| {
        let device = Device::flex();
        // 3 x 40000 elements: several rayon chunks and a ragged last one.
        for (rows, cols) in [(1, 1), (3, 7), (300, 401), (3, 40_000)] {
            let seed = (rows * 100_000 + cols) as u64;
            let x = inputs(rows, cols, seed, &device);
            let expected = reference_gelu(x.clone());
            let before = inputs_copy(&x);
            // Shared buffer (x is still alive): the kernel writes a new tensor.
            let shared = gelu(x.clone());
            assert!(
                max_abs(shared.clone(), expected.clone()) < 1e-5,
                "seed {seed}"
            );
            // The input is unchanged.
            assert_eq!(inputs_copy(&x), before);
            // Unique buffer: computed in place.
            let unique = gelu(x.clone().add_scalar(0.0));
            assert!(max_abs(unique, expected.clone()) < 1e-5, "seed {seed}");
            // A transposed view.
            let strided = gelu(x.clone().transpose());
            assert!(max_abs(strided, expected.transpose()) < 1e-5, "seed {seed}");
        }
    });
}

fn inputs_copy(x: &Tensor<2>) -> Vec<f32> {
    x.clone().into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn the_error_is_relative_to_the_input_size() {
    for_each_cpu_body(|_| {
        // |gelu - burn's gelu| ≤ 1e-6 · max(1, |x|): the erf approximation's 1.5e-7 times |x|/2.
        let device = Device::flex();
        let n = 100_001;
        let values: Vec<f32> = (0..n)
            .map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32)
            .collect();
        let x = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([1, n]);
        let diff = (gelu(x.clone()) - reference_gelu(x.clone())).abs();
        let bound = x.abs().clamp_min(1.0).mul_scalar(1e-6);
        let over = diff.greater(bound).int().sum().into_scalar::<i64>();
        assert_eq!(over, 0);
    });
}

#[test]
fn the_gradient_equals_burns_autodiff_gradient() {
    for_each_cpu_body(|_| {
        let device = Device::flex().autodiff();
        for (rows, cols) in [(2, 5), (64, 1536), (3, 40_000)] {
            let seed = (rows * 100_000 + cols) as u64;
            let x = inputs(rows, cols, seed, &device.clone().inner());
            let normal = Distribution::Normal(0.0, 1.0);
            let weights = random(x.dims(), normal, seed + 1, &device.clone().inner());
            let grad_of = |fused: bool, strided: bool| {
                let xv = Tensor::<2>::from_inner(x.clone()).require_grad();
                let input = if strided {
                    xv.clone().transpose()
                } else {
                    xv.clone()
                };
                let y = if fused {
                    gelu(input)
                } else {
                    reference_gelu(input)
                };
                let y = if strided { y.transpose() } else { y };
                let loss = (y * Tensor::from_inner(weights.clone())).sum();
                let g = loss.backward();
                xv.grad(&g).expect("x gets a gradient")
            };
            let expected = grad_of(false, false);
            assert!(
                max_abs(grad_of(true, false), expected.clone()) < 2e-5,
                "seed {seed}"
            );
            assert!(max_abs(grad_of(true, true), expected) < 2e-5, "seed {seed}");
        }
    });
}

#[test]
fn the_gradient_matches_finite_differences() {
    for_each_cpu_body(|_| {
        let device = Device::flex().autodiff();
        let values = [-6.0f32, -2.5, -1.0, -0.3, 0.0, 0.4, 1.3, 3.0, 7.0];
        let x = Tensor::<1>::from_floats(values, &device).require_grad();
        let g = gelu(x.clone()).sum().backward();
        let grad = x.grad(&g).unwrap().into_data().try_to_vec::<f32>().unwrap();
        for (v, g) in values.iter().zip(grad) {
            let v = *v as f64;
            let f = |x: f64| {
                let inner = Tensor::<1>::from_floats([x as f32], &Device::flex());
                gelu(inner).into_scalar::<f32>() as f64
            };
            let h = 1e-2;
            let fd = (f(v + h) - f(v - h)) / (2.0 * h);
            assert!((fd - g as f64).abs() < 2e-3, "x = {v}: {fd} vs {g}");
        }
    });
}

#[test]
fn a_second_use_of_the_input_is_unaffected_by_the_in_place_path() {
    for_each_cpu_body(|_| {
        // The autodiff graph keeps x for the backward pass: the forward must not overwrite it.
        let device = Device::flex().autodiff();
        // Seed 7.
        let x = random([16, 300], Distribution::Normal(0.0, 2.0), 7, &device).require_grad();
        let y = gelu(x.clone()) + x.clone();
        let g = y.sum().backward();
        let expected = {
            let inner = x.clone().inner();
            let xv = Tensor::<2>::from_inner(inner).require_grad();
            let g = (reference_gelu(xv.clone()) + xv.clone()).sum().backward();
            xv.grad(&g).unwrap()
        };
        assert!(max_abs(x.grad(&g).unwrap(), expected) < 2e-5);
    });
}

mod attention {
    use burn::tensor::module::attention as reference_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, DType, Device, Distribution, Int, Tensor};
    use peft_kernels::cpu_body::for_each_cpu_body;
    use peft_kernels::{attention, causal_attention};

    use super::random;

    fn max_abs4(a: Tensor<4>, b: Tensor<4>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// `[b, sk]`, true at padding: sentence `i` keeps its first `sk - i` keys (at least one).
    fn padding(b: usize, sk: usize, device: &Device) -> Tensor<2, Bool> {
        let lens: Vec<i64> = (0..b).map(|i| (sk - (i % sk)) as i64).collect();
        let lens = Tensor::<1, Int>::from_ints(lens.as_slice(), device).reshape([b, 1]);
        let pos = Tensor::<1, Int>::arange(0..sk as i64, device).reshape([1, sk]);
        pos.expand([b, sk]).greater_equal(lens.expand([b, sk]))
    }

    fn reference(
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Option<Tensor<2, Bool>>,
    ) -> Tensor<4> {
        let [b, h, sq, _] = q.dims();
        let sk = k.dims()[2];
        let mask = mask.map(|m| m.reshape([b, 1, 1, sk]).expand([b, h, sq, sk]));
        reference_attention(q, k, v, mask, None, AttentionModuleOptions::default())
    }

    /// `[b, s, h, d]` activations viewed as `[b, h, s, d]`, as a model's heads are.
    fn heads(b: usize, h: usize, s: usize, d: usize, seed: u64, device: &Device) -> Tensor<4> {
        random([b, s, h, d], Distribution::Normal(0.0, 1.0), seed, device).swap_dims(1, 2)
    }

    /// Random q `[b, h, sq, d]`, k `[b, h, sk, d]`, v `[b, h, sk, dv]`, as head views.
    fn qkv(
        (b, h, sq, sk, d, dv): (usize, usize, usize, usize, usize, usize),
        seed: u64,
        device: &Device,
    ) -> (Tensor<4>, Tensor<4>, Tensor<4>) {
        (
            heads(b, h, sq, d, seed, device),
            heads(b, h, sk, d, seed + 1, device),
            heads(b, h, sk, dv, seed + 2, device),
        )
    }

    #[test]
    fn the_forward_equals_burns_attention_with_padding() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            for (seed, (b, h, sq, sk, d, dv)) in [
                (0, (2, 3, 5, 5, 4, 4)),
                (10, (3, 2, 7, 9, 8, 3)),
                (20, (4, 12, 33, 33, 32, 32)),
            ] {
                let (q, k, v) = qkv((b, h, sq, sk, d, dv), seed, &device);
                let mask = padding(b, sk, &device);
                let out = attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()));
                assert_eq!(out.dims(), [b, h, sq, dv]);
                let expected = reference(q.clone(), k.clone(), v.clone(), Some(mask));
                assert!(max_abs4(out, expected) < 1e-5, "seed {seed}");
                // Contiguous inputs and no mask.
                let (qc, kc, vc) = (
                    q.clone().add_scalar(0.0),
                    k.clone().add_scalar(0.0),
                    v.clone().add_scalar(0.0),
                );
                let out = attention(qc, kc, vc, None);
                assert!(
                    max_abs4(out, reference(q, k, v, None)) < 1e-5,
                    "seed {seed}"
                );
            }
        });
    }

    #[test]
    fn a_fully_masked_row_attends_uniformly() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            let (q, k, v) = qkv((2, 2, 3, 5, 4, 4), 30, &device);
            let mask = Tensor::<2, Int>::from_ints([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], &device)
                .equal_elem(1);
            let out = attention(q, k, v.clone(), Some(mask));
            // Sentence 0: every key masked → the mean of the values, as Hugging Face gives.
            let mean = v.clone().narrow(0, 0, 1).mean_dim(2).expand([1, 2, 3, 4]);
            assert!(max_abs4(out.clone().narrow(0, 0, 1), mean) < 1e-5);
            assert!(!out.is_nan().any().into_scalar::<bool>());
        });
    }

    /// `Σ out · w` for fixed random `w`, and the gradients of q, k, v.
    fn grads(fused: bool, f64_inputs: bool) -> Vec<Tensor<4>> {
        let device = Device::flex().autodiff();
        let inner = device.clone().inner();
        let (b, h, sq, sk, d, dv) = (3, 2, 6, 7, 5, 4);
        let seed = |dims: [usize; 4]| {
            let data: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
                .collect();
            Tensor::<1>::from_floats(data.as_slice(), &inner).reshape(dims)
        };
        let leaves: Vec<Tensor<4>> = [[b, sq, h, d], [b, sk, h, d], [b, sk, h, dv]]
            .into_iter()
            .map(|dims| {
                let t = Tensor::<4>::from_inner(seed(dims));
                let t = if f64_inputs { t.cast(DType::F64) } else { t };
                t.require_grad()
            })
            .collect();
        let views: Vec<Tensor<4>> = leaves.iter().map(|t| t.clone().swap_dims(1, 2)).collect();
        let mask = padding(b, sk, &device);
        let (q, k, v) = (views[0].clone(), views[1].clone(), views[2].clone());
        let out = if fused {
            attention(q, k, v, Some(mask))
        } else {
            reference(q, k, v, Some(mask))
        };
        let w = Tensor::<4>::from_inner(seed([b, h, sq, dv]).sin());
        let w = if f64_inputs { w.cast(DType::F64) } else { w };
        let g = (out * w).sum().backward();
        leaves
            .iter()
            .map(|t| t.grad(&g).expect("a gradient").cast(DType::F32))
            .collect()
    }

    #[test]
    fn the_gradients_equal_burns_autodiff_gradients() {
        for_each_cpu_body(|_| {
            let expected = grads(false, false);
            for (name, got) in [
                ("flex f32 kernel", grads(true, false)),
                ("composed f64", grads(true, true)),
            ] {
                for (g, e) in got.into_iter().zip(expected.iter()) {
                    let diff = max_abs4(g, e.clone());
                    assert!(diff < 2e-5, "{name}: {diff}");
                }
            }
        });
    }

    #[test]
    fn the_gradient_of_q_matches_finite_differences() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            let (q, k, v) = qkv((1, 1, 3, 4, 2, 2), 40, &device);
            let mask = padding(1, 4, &device);
            let loss = |q: Tensor<4>| {
                let o = attention(q, k.clone(), v.clone(), Some(mask.clone()));
                (o.clone() * o).sum().into_scalar::<f32>() as f64
            };
            let ad = Device::flex().autodiff();
            let qa = Tensor::<4>::from_inner(q.clone()).require_grad();
            let o = attention(
                qa.clone(),
                Tensor::from_inner(k.clone()),
                Tensor::from_inner(v.clone()),
                Some(padding(1, 4, &ad)),
            );
            let g = (o.clone() * o).sum().backward();
            let grad = qa
                .grad(&g)
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let base = q.clone().into_data().try_to_vec::<f32>().unwrap();
            for (i, gi) in grad.iter().enumerate() {
                let h = 1e-2f32;
                let shifted = |delta: f32| {
                    let mut x = base.clone();
                    x[i] += delta;
                    loss(Tensor::<1>::from_floats(x.as_slice(), &device).reshape([1, 1, 3, 2]))
                };
                let fd = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
                assert!(
                    (fd - *gi as f64).abs() < 2e-3,
                    "seed 40, entry {i}: {fd} vs {gi}"
                );
            }
        });
    }

    /// `[b, h, sq, sk]`, true where burn's attention must hide a key: padding, or (causal, the
    /// queries being the last `sq` positions) a key after the query.
    fn causal_mask(padding: &Tensor<2, Bool>, h: usize, sq: usize) -> Tensor<4, Bool> {
        let [b, sk] = padding.dims();
        let hidden: Vec<bool> = (0..sq * sk).map(|n| n % sk + sq > n / sk + sk).collect();
        let hidden = Tensor::<2, Bool>::from_data(
            burn::tensor::TensorData::new(hidden, [sq, sk]),
            &padding.device(),
        )
        .reshape([1, 1, sq, sk])
        .expand([b, h, sq, sk]);
        let pad = padding
            .clone()
            .reshape([b, 1, 1, sk])
            .expand([b, h, sq, sk]);
        hidden.bool_or(pad)
    }

    #[test]
    fn causal_attention_equals_burns_attention_with_the_causal_mask() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            // Square (a training forward), several query blocks of one sequence (40 rows, 2
            // threads: blocks of 16), queries that are the last positions (sq < sk).
            for (seed, (b, h, sq, sk, d, dv)) in [
                (50, (2, 3, 5, 5, 4, 4)),
                (60, (1, 2, 40, 40, 8, 8)),
                (70, (3, 2, 7, 9, 8, 3)),
                (80, (2, 9, 33, 33, 16, 16)),
            ] {
                let (q, k, v) = qkv((b, h, sq, sk, d, dv), seed, &device);
                let pad = padding(b, sk, &device);
                let out = causal_attention(q.clone(), k.clone(), v.clone(), Some(pad.clone()));
                assert_eq!(out.dims(), [b, h, sq, dv]);
                let mask = causal_mask(&pad, h, sq);
                let expected = reference_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    Some(mask),
                    None,
                    AttentionModuleOptions::default(),
                );
                assert!(max_abs4(out, expected) < 1e-5, "seed {seed}");
                // No padding: burn's own `is_causal` (square shapes only: its diagonal is the
                // top-left one).
                if sq == sk {
                    let out = causal_attention(q.clone(), k.clone(), v.clone(), None);
                    let options = AttentionModuleOptions {
                        is_causal: true,
                        ..Default::default()
                    };
                    let expected = reference_attention(q, k, v, None, None, options);
                    assert!(max_abs4(out, expected) < 1e-5, "seed {seed}, no padding");
                }
            }
        });
    }

    #[test]
    fn a_query_that_sees_no_key_gets_zero() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            // sq > sk: the first sq - sk queries come before every key.
            let (q, k, v) = qkv((1, 2, 5, 3, 4, 4), 90, &device);
            let out = causal_attention(q, k, v, None);
            let first = out.clone().narrow(2, 0, 2).abs().max().into_scalar::<f32>();
            assert_eq!(first, 0.0);
            assert!(out.narrow(2, 2, 3).abs().max().into_scalar::<f32>() > 0.0);
        });
    }

    /// As [`grads`] for causal attention, against burn's attention with the explicit mask.
    fn causal_grads(fused: bool, f64_inputs: bool) -> Vec<Tensor<4>> {
        let device = Device::flex().autodiff();
        let (b, h, sq, sk, d, dv) = (2, 3, 20, 23, 5, 4);
        let leaves: Vec<Tensor<4>> = [[b, sq, h, d], [b, sk, h, d], [b, sk, h, dv]]
            .into_iter()
            .enumerate()
            .map(|(i, dims)| {
                let t = random(
                    dims,
                    Distribution::Normal(0.0, 1.0),
                    100 + i as u64,
                    &device,
                );
                let t = if f64_inputs { t.cast(DType::F64) } else { t };
                t.require_grad()
            })
            .collect();
        let views: Vec<Tensor<4>> = leaves.iter().map(|t| t.clone().swap_dims(1, 2)).collect();
        let pad = padding(b, sk, &device);
        let (q, k, v) = (views[0].clone(), views[1].clone(), views[2].clone());
        let out = if fused {
            causal_attention(q, k, v, Some(pad))
        } else {
            let mask = causal_mask(&pad, h, sq);
            reference_attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
        };
        let w = random([b, h, sq, dv], Distribution::Normal(0.0, 1.0), 110, &device);
        let w = if f64_inputs { w.cast(DType::F64) } else { w };
        let g = (out * w).sum().backward();
        leaves
            .iter()
            .map(|t| t.grad(&g).expect("a gradient").cast(DType::F32))
            .collect()
    }

    #[test]
    fn causal_gradients_equal_burns_autodiff_gradients() {
        for_each_cpu_body(|_| {
            let expected = causal_grads(false, false);
            for (name, got) in [
                ("flex f32 kernel", causal_grads(true, false)),
                ("composed f64", causal_grads(true, true)),
            ] {
                for (g, e) in got.into_iter().zip(expected.iter()) {
                    let diff = max_abs4(g, e.clone());
                    assert!(diff < 2e-5, "{name}: {diff}");
                }
            }
        });
    }
}

mod layer_norm {
    use burn::tensor::module::layer_norm as reference_layer_norm;
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use peft_kernels::cpu_body::for_each_cpu_body;
    use peft_kernels::layer_norm;

    use super::random;

    fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn the_forward_equals_burns_layer_norm() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            // d = 384 (BERT), 7 and 1 (remainders of the 16-lane loops), 40 rows (a ragged task).
            for (rows, d) in [(40, 384), (3, 7), (5, 1), (0, 4)] {
                let seed = (rows * 1000 + d) as u64;
                let x = random([rows, 2, d], Distribution::Normal(1.0, 3.0), seed, &device);
                let gamma = random([d], Distribution::Normal(1.0, 0.5), seed + 1, &device);
                let beta = random([d], Distribution::Normal(0.0, 0.5), seed + 2, &device);
                let y = layer_norm(x.clone(), gamma.clone(), beta.clone(), 1e-12);
                assert_eq!(y.dims(), [rows, 2, d]);
                if rows > 0 {
                    let expected = reference_layer_norm(x.clone(), gamma, Some(beta), 1e-12);
                    assert!(max_abs(y, expected) < 2e-5, "seed {seed}");
                }
            }
        });
    }

    /// Gradients of `Σ layer_norm(x) · w` for x (through a transposed view), gamma and beta.
    fn grads(fused: bool, f64_inputs: bool) -> Vec<Tensor<2>> {
        let device = Device::flex().autodiff();
        let (rows, d) = (70, 24);
        let seed = |n: usize, k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + k * 31) % 1000) as f32 / 250.0 - 2.0)
                .collect()
        };
        let cast = |t: Tensor<1>| if f64_inputs { t.cast(DType::F64) } else { t };
        let x = cast(Tensor::<1>::from_floats(
            seed(rows * d, 1).as_slice(),
            &device,
        ))
        .reshape([d, rows])
        .require_grad();
        let gamma = cast(Tensor::<1>::from_floats(seed(d, 2).as_slice(), &device)).require_grad();
        let beta = cast(Tensor::<1>::from_floats(seed(d, 3).as_slice(), &device)).require_grad();
        let w = cast(Tensor::<1>::from_floats(
            seed(rows * d, 4).as_slice(),
            &device,
        ))
        .reshape([rows, d]);
        let input = x.clone().transpose();
        let y = if fused {
            layer_norm(input, gamma.clone(), beta.clone(), 1e-5)
        } else {
            reference_layer_norm(input, gamma.clone(), Some(beta.clone()), 1e-5)
        };
        let g = (y * w).sum().backward();
        vec![
            x.grad(&g).unwrap().cast(DType::F32),
            gamma.grad(&g).unwrap().cast(DType::F32).reshape([1, d]),
            beta.grad(&g).unwrap().cast(DType::F32).reshape([1, d]),
        ]
    }

    #[test]
    fn the_gradients_equal_burns_autodiff_gradients() {
        for_each_cpu_body(|_| {
            let expected = grads(false, false);
            for (name, got) in [
                ("flex f32 kernel", grads(true, false)),
                ("composed f64", grads(true, true)),
            ] {
                for (i, (g, e)) in got.into_iter().zip(expected.iter()).enumerate() {
                    let diff = max_abs(g, e.clone());
                    assert!(diff < 1e-4, "{name}, gradient {i}: {diff}");
                }
            }
        });
    }
}

mod rms_norm {
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use peft_kernels::cpu_body::for_each_cpu_body;
    use peft_kernels::rms_norm;

    use super::random;

    fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// LLaMA's RMSNorm from burn's ops: `x / sqrt(mean(x²) + eps) · gamma`.
    fn reference<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, eps: f64) -> Tensor<D> {
        let d = gamma.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = d;
        let rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt();
        x.div(rms).mul(gamma.reshape(shape))
    }

    #[test]
    fn the_forward_equals_the_composed_norm() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            // d = 576 (SmolLM2), 7 and 1 (remainders of the 16-lane loops), a ragged task.
            for (rows, d) in [(40, 576), (3, 7), (5, 1), (0, 4)] {
                let seed = (rows * 1000 + d) as u64;
                let x = random([rows, 2, d], Distribution::Normal(1.0, 3.0), seed, &device);
                let gamma = random([d], Distribution::Normal(1.0, 0.5), seed + 1, &device);
                let y = rms_norm(x.clone(), gamma.clone(), 1e-5);
                assert_eq!(y.dims(), [rows, 2, d]);
                if rows > 0 {
                    let expected = reference(x, gamma, 1e-5);
                    assert!(max_abs(y, expected) < 2e-5, "seed {seed}");
                }
            }
        });
    }

    /// Gradients of `Σ rms_norm(x) · w` for x (through a transposed view) and gamma.
    fn grads(fused: bool, f64_inputs: bool) -> Vec<Tensor<2>> {
        let device = Device::flex().autodiff();
        let (rows, d) = (70, 24);
        let cast = |t: Tensor<2>| if f64_inputs { t.cast(DType::F64) } else { t };
        let normal = Distribution::Normal(0.5, 2.0);
        let x = cast(random([d, rows], normal, 1, &device)).require_grad();
        let gamma = cast(random([1, d], normal, 2, &device))
            .reshape([d])
            .require_grad();
        let w = cast(random([rows, d], normal, 3, &device));
        let input = x.clone().transpose();
        let y = if fused {
            rms_norm(input, gamma.clone(), 1e-5)
        } else {
            reference(input, gamma.clone(), 1e-5)
        };
        let g = (y * w).sum().backward();
        vec![
            x.grad(&g).unwrap().cast(DType::F32),
            gamma.grad(&g).unwrap().cast(DType::F32).reshape([1, d]),
        ]
    }

    #[test]
    fn the_gradients_equal_burns_autodiff_gradients() {
        for_each_cpu_body(|_| {
            let expected = grads(false, false);
            for (name, got) in [
                ("flex f32 kernel", grads(true, false)),
                ("composed f64", grads(true, true)),
            ] {
                for (i, (g, e)) in got.into_iter().zip(expected.iter()).enumerate() {
                    let scale = e.clone().abs().max().into_scalar::<f32>().max(1.0);
                    let diff = max_abs(g, e.clone());
                    assert!(diff < 1e-4 * scale, "{name}, gradient {i}: {diff}");
                }
            }
        });
    }
}

mod rotary {
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use peft_kernels::cpu_body::for_each_cpu_body;
    use peft_kernels::rotary;

    use super::random;

    fn max_abs<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// `x·cos + rotate_half(x)·sin` from burn's ops.
    fn reference(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
        let [s, d] = cos.dims();
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos.reshape([1, 1, s, d]) + rotated * sin.reshape([1, 1, s, d])
    }

    /// Tables whose halves differ (so that the transposed map is not the forward one with
    /// `-sin`), a `[batch, seq, heads, d]` input with its heads swapped forward (strided rows).
    fn inputs(device: &Device) -> (Tensor<4>, Tensor<2>, Tensor<2>) {
        let (b, h, s, d) = (2, 3, 70, 8);
        let normal = Distribution::Normal(0.0, 1.0);
        let x = random([b, s, h, d], normal, 1, device).swap_dims(1, 2);
        (
            x,
            random([s, d], normal, 2, device),
            random([s, d], normal, 3, device),
        )
    }

    #[test]
    fn the_forward_and_the_gradient_equal_burns_ops() {
        for_each_cpu_body(|_| {
            for f64_inputs in [false, true] {
                let device = Device::flex().autodiff();
                let (x, cos, sin) = inputs(&device);
                let cast4 = |t: Tensor<4>| if f64_inputs { t.cast(DType::F64) } else { t };
                let cast2 = |t: Tensor<2>| if f64_inputs { t.cast(DType::F64) } else { t };
                let x = cast4(x).require_grad();
                let (cos, sin) = (cast2(cos), cast2(sin));
                let w = cast4(random(x.dims(), Distribution::Normal(0.0, 1.0), 4, &device));
                let y = rotary(x.clone(), cos.clone(), sin.clone());
                let expected = reference(x.clone(), cos, sin);
                let f = max_abs(
                    y.clone().cast(DType::F32),
                    expected.clone().cast(DType::F32),
                );
                assert!(f < 1e-5, "forward (f64 {f64_inputs}): {f}");
                let g1 = (y * w.clone()).sum().backward();
                let g2 = (expected * w).sum().backward();
                let (a, b) = (x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
                let g = max_abs(a.cast(DType::F32), b.cast(DType::F32));
                assert!(g < 1e-5, "gradient (f64 {f64_inputs}): {g}");
            }
        });
    }
}

mod swiglu {
    use burn::tensor::activation::silu;
    use burn::tensor::{DType, Device, Distribution, Tensor};
    use peft_kernels::cpu_body::for_each_cpu_body;
    use peft_kernels::swiglu;

    use super::{inputs, max_abs, random};

    #[test]
    fn the_forward_equals_silu_times_up() {
        for_each_cpu_body(|_| {
            let device = Device::flex();
            // One chunk, several chunks with a ragged end, a strided (transposed) gate.
            for (rows, cols) in [(3, 7), (37, 1536)] {
                let seed = (rows * 10 + cols) as u64;
                let gate = inputs(rows, cols, seed, &device);
                let up = random(
                    [rows, cols],
                    Distribution::Normal(0.0, 2.0),
                    seed + 1,
                    &device,
                );
                let expected = silu(gate.clone()) * up.clone();
                let got = swiglu(gate.clone(), up.clone());
                let scale = expected.clone().abs().max().into_scalar::<f32>().max(1.0);
                assert!(max_abs(got, expected) < 2e-6 * scale, "seed {seed}");
                let gate_t = gate.transpose();
                let up_t = up.transpose();
                let expected = silu(gate_t.clone()) * up_t.clone();
                assert!(max_abs(swiglu(gate_t, up_t), expected) < 2e-6 * scale);
            }
        });
    }

    /// The gradients of `Σ swiglu(gate, up) · w` (or of the composed ops) for gate and up.
    fn grads(fused: bool, f64_inputs: bool) -> Vec<Tensor<2>> {
        let device = Device::flex().autodiff();
        let (rows, cols) = (19, 1100);
        let leaves: Vec<Tensor<2>> = (0..2)
            .map(|i| {
                let t = random(
                    [rows, cols],
                    Distribution::Normal(0.0, 3.0),
                    200 + i,
                    &device,
                );
                let t = if f64_inputs { t.cast(DType::F64) } else { t };
                t.require_grad()
            })
            .collect();
        let (gate, up) = (leaves[0].clone(), leaves[1].clone());
        let out = if fused {
            swiglu(gate, up)
        } else {
            silu(gate) * up
        };
        let w = random([rows, cols], Distribution::Normal(0.0, 1.0), 210, &device);
        let w = if f64_inputs { w.cast(DType::F64) } else { w };
        let g = (out * w).sum().backward();
        leaves
            .iter()
            .map(|t| t.grad(&g).expect("a gradient").cast(DType::F32))
            .collect()
    }

    #[test]
    fn the_gradients_equal_burns_autodiff_gradients() {
        for_each_cpu_body(|_| {
            let expected = grads(false, false);
            for (name, got) in [
                ("flex f32 kernel", grads(true, false)),
                ("composed f64", grads(true, true)),
            ] {
                for (g, e) in got.into_iter().zip(expected.iter()) {
                    let diff = max_abs(g, e.clone());
                    assert!(diff < 1e-4, "{name}: {diff}");
                }
            }
        });
    }
}
