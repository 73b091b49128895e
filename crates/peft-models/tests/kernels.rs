//! The fused GELU against burn's own `gelu` (forward) and its autodiff gradient (backward),
//! over in-place, shared, non-contiguous and multi-chunk inputs.

use burn::tensor::activation::gelu as reference_gelu;
use burn::tensor::{Device, Distribution, Tensor};
use peft_models::kernels::gelu;

fn max_abs(a: Tensor<2>, b: Tensor<2>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

/// Values over the whole interesting range: normal(0, 3), plus exact zeros, large magnitudes and
/// the points where the erf approximation switches regime.
fn inputs(rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    let x = Tensor::<2>::random([rows, cols], Distribution::Normal(0.0, 3.0), device);
    let special = [0.0f32, -0.0, 1e-8, -1e-8, 10.0, -10.0, 40.0, -40.0];
    let k = cols.min(special.len());
    let special = Tensor::<1>::from_floats(&special[..k], device).reshape([1, k]);
    x.slice_assign([0..1, 0..k], special)
}

#[test]
fn the_forward_equals_burns_gelu_in_place_shared_and_strided() {
    let device = Device::flex();
    // 3 x 40000 elements: several rayon chunks and a ragged last one.
    for (rows, cols) in [(1, 1), (3, 7), (300, 401), (3, 40_000)] {
        let x = inputs(rows, cols, &device);
        let expected = reference_gelu(x.clone());
        let before = inputs_copy(&x);
        // Shared buffer (x is still alive): the kernel writes a new tensor.
        let shared = gelu(x.clone());
        assert!(max_abs(shared.clone(), expected.clone()) < 1e-5);
        // The input is unchanged.
        assert_eq!(inputs_copy(&x), before);
        // Unique buffer: computed in place.
        let unique = gelu(x.clone().add_scalar(0.0));
        assert!(max_abs(unique, expected.clone()) < 1e-5);
        // A transposed view.
        let strided = gelu(x.clone().transpose());
        assert!(max_abs(strided, expected.transpose()) < 1e-5);
    }
}

fn inputs_copy(x: &Tensor<2>) -> Vec<f32> {
    x.clone().into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn the_error_is_relative_to_the_input_size() {
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
}

#[test]
fn the_gradient_equals_burns_autodiff_gradient() {
    let device = Device::flex().autodiff();
    for (rows, cols) in [(2, 5), (64, 1536), (3, 40_000)] {
        let x = inputs(rows, cols, &device.clone().inner());
        let weights = Tensor::<2>::random(
            x.dims(),
            Distribution::Normal(0.0, 1.0),
            &device.clone().inner(),
        );
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
        assert!(max_abs(grad_of(true, false), expected.clone()) < 2e-5);
        assert!(max_abs(grad_of(true, true), expected) < 2e-5);
    }
}

#[test]
fn the_gradient_matches_finite_differences() {
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
}

#[test]
fn a_second_use_of_the_input_is_unaffected_by_the_in_place_path() {
    // The autodiff graph keeps x for the backward pass: the forward must not overwrite it.
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::random([16, 300], Distribution::Normal(0.0, 2.0), &device).require_grad();
    let y = gelu(x.clone()) + x.clone();
    let g = y.sum().backward();
    let expected = {
        let inner = x.clone().inner();
        let xv = Tensor::<2>::from_inner(inner).require_grad();
        let g = (reference_gelu(xv.clone()) + xv.clone()).sum().backward();
        xv.grad(&g).unwrap()
    };
    assert!(max_abs(x.grad(&g).unwrap(), expected) < 2e-5);
}
