//! The fused GELU and attention on wgpu (a software adapter such as Mesa's lavapipe is enough):
//! there the extension's default bodies run, through `Fusion<CubeBackend>` and `Autodiff`; the
//! results and gradients must equal flex's fused kernels.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use peft_models::kernels::{attention, gelu};

fn wgpu() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

fn data(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0) * 2.5)
        .collect()
}

fn on(device: &Device, values: &[f32], dims: [usize; 4]) -> Tensor<4> {
    Tensor::<1>::from_floats(values, device).reshape(dims)
}

fn close(a: TensorData, b: TensorData, tol: f32) {
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < tol, "max difference {worst}");
}

/// Output, and the gradients of q, k, v of `Σ attention(q, k, v, mask) · w + Σ gelu(q) · q` on `device`.
fn run(device: &Device) -> Vec<TensorData> {
    let (b, h, s, d) = (2, 3, 5, 4);
    let leaf = |seed| on(device, &data(b * s * h * d, seed), [b, s, h, d]).require_grad();
    let (q, k, v) = (leaf(1), leaf(2), leaf(3));
    let heads = |t: &Tensor<4>| t.clone().swap_dims(1, 2);
    let mask =
        Tensor::<2, Int>::from_ints([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device).equal_elem(0);
    let out = attention(heads(&q), heads(&k), heads(&v), Some(mask));
    let w = on(device, &data(b * h * s * d, 4), [b, h, s, d]);
    let loss = (out.clone() * w).sum() + (gelu(q.clone()) * q.clone()).sum();
    let grads = loss.backward();
    let mut results = vec![out.inner().into_data()];
    results.extend(
        [q, k, v]
            .iter()
            .map(|t| t.grad(&grads).unwrap().into_data()),
    );
    results
}

#[test]
fn gelu_and_attention_on_wgpu_match_flex() {
    let expected = run(&Device::flex().autodiff());
    let got = run(&wgpu().autodiff());
    for (g, e) in got.into_iter().zip(expected) {
        close(g, e, 1e-4);
    }
}
