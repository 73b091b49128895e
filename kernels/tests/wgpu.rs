//! The fused GELU, attention and layer norm, and the linear and LoRA products, on wgpu
//! (a software adapter such as Mesa's lavapipe is enough): there the extensions' default bodies
//! run, through `Fusion<CubeBackend>` and `Autodiff`; the results and gradients must equal
//! flex's kernels.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use peft_kernels::{attention, gelu, layer_norm};

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

/// `|a - b| ≤ tol · (1 + |b|)` everywhere (the GPU sums in another order).
fn close(what: &str, a: TensorData, b: TensorData, tol: f32) {
    let (a, b) = (
        a.try_to_vec::<f32>().unwrap(),
        b.try_to_vec::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    let largest = b.iter().fold(0.0f32, |m, y| m.max(y.abs()));
    assert!(
        worst < tol,
        "{what}: relative difference {worst} (largest value {largest})"
    );
}

/// The attention output and the gradients of q, k, v, gamma, beta, W and c of
/// `Σ attention(q, k, v, mask) · w + Σ gelu(q) · q + Σ layer_norm(k; gamma, beta) · v
///  + Σ linear(v; W, c) · u` on `device`.
fn run(device: &Device) -> Vec<TensorData> {
    let (b, h, s, d) = (2, 3, 5, 4);
    let leaf = |seed| on(device, &data(b * s * h * d, seed), [b, s, h, d]).require_grad();
    let (q, k, v) = (leaf(1), leaf(2), leaf(3));
    let heads = |t: &Tensor<4>| t.clone().swap_dims(1, 2);
    let mask =
        Tensor::<2, Int>::from_ints([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device).equal_elem(0);
    let out = attention(heads(&q), heads(&k), heads(&v), Some(mask));
    let w = on(device, &data(b * h * s * d, 4), [b, h, s, d]);
    let gamma = Tensor::<1>::from_floats(&data(d, 5)[..], device).require_grad();
    let beta = Tensor::<1>::from_floats(&data(d, 6)[..], device).require_grad();
    let normed = layer_norm(k.clone(), gamma.clone(), beta.clone(), 1e-5);
    let weight = Tensor::<1>::from_floats(&data(h * d * 6, 7)[..], device)
        .reshape([h * d, 6])
        .require_grad();
    let bias = Tensor::<1>::from_floats(&data(6, 8)[..], device).require_grad();
    let rows = v.clone().reshape([b * s, h * d]);
    let projected = peft_kernels::linear(rows, weight.clone(), Some(bias.clone()));
    let u = Tensor::<1>::from_floats(&data(b * s * 6, 9)[..], device).reshape([b * s, 6]);
    let loss = (out.clone() * w).sum()
        + (gelu(q.clone()) * q.clone()).sum()
        + (normed * v.clone()).sum()
        + (projected * u).sum();
    let grads = loss.backward();
    let mut results = vec![out.inner().into_data()];
    for t in [q, k, v] {
        results.push(t.grad(&grads).unwrap().into_data());
    }
    for t in [gamma, beta, bias] {
        results.push(t.grad(&grads).unwrap().into_data());
    }
    results.push(weight.grad(&grads).unwrap().into_data());
    results
}

#[test]
fn gelu_attention_layer_norm_and_linear_on_wgpu_match_flex() {
    let expected = run(&Device::flex().autodiff());
    let got = run(&wgpu().autodiff());
    let names = ["output", "dq", "dk", "dv", "dgamma", "dbeta", "dc", "dW"];
    assert_eq!((got.len(), expected.len()), (names.len(), names.len()));
    for ((g, e), name) in got.into_iter().zip(expected).zip(names) {
        close(name, g, e, 1e-4);
    }
}

/// `lora_linear`'s output (with and without a bias) and the gradients of `x`, `a`, `b` and the
/// bias under a frozen weight, at rank 16 (flex's fused gradient kernel where AVX-512 exists).
fn run_lora(device: &Device) -> Vec<TensorData> {
    let (m, k, n, r) = (10, 12, 6, 16);
    let matrix = |rows: usize, cols: usize, seed: usize| {
        Tensor::<1>::from_floats(&data(rows * cols, seed)[..], device).reshape([rows, cols])
    };
    let x = matrix(m, k, 11).require_grad();
    let w = matrix(k, n, 12);
    let a = matrix(k, r, 13).mul_scalar(0.1).require_grad();
    let b = matrix(r, n, 14).mul_scalar(0.1).require_grad();
    let bias = Tensor::<1>::from_floats(&data(n, 15)[..], device).require_grad();
    let u = matrix(m, n, 16);
    let with_bias = peft_kernels::lora_linear(
        x.clone(),
        w.clone(),
        Some(bias.clone()),
        a.clone(),
        b.clone(),
        1.5,
    );
    let without = peft_kernels::lora_linear(x.clone(), w, None, a.clone(), b.clone(), 0.5);
    let loss = (with_bias.clone() * u.clone()).sum() + (without.clone() * u).sum();
    let grads = loss.backward();
    let mut results = vec![with_bias.inner().into_data(), without.inner().into_data()];
    for t in [x, a, b] {
        results.push(t.grad(&grads).unwrap().into_data());
    }
    results.push(bias.grad(&grads).unwrap().into_data());
    results
}

#[test]
fn lora_linear_on_wgpu_matches_flex() {
    let expected = run_lora(&Device::flex().autodiff());
    let got = run_lora(&wgpu().autodiff());
    let names = ["output", "output without bias", "dx", "da", "db", "dbias"];
    assert_eq!((got.len(), expected.len()), (names.len(), names.len()));
    for ((g, e), name) in got.into_iter().zip(expected).zip(names) {
        close(name, g, e, 1e-4);
    }
}

/// `packed_linear` on wgpu (the default bodies: the weight dequantized for each product) equals
/// flex's packed kernels, output and the input and bias gradients, for NF4 and ggml blocks.
#[test]
fn packed_linear_on_wgpu_equals_flex() {
    use std::sync::Arc;

    use peft_kernels::packed_linear::packed_linear;
    use peft_kernels::quant::ggml::GgmlBlock;
    use peft_kernels::quant::{PackedFormat, PackedMatrix};

    let (m, inp, out) = (6, 96, 40);
    for format in [
        PackedFormat::Nf4 { double: true },
        PackedFormat::Ggml(GgmlBlock::Q4_1),
        PackedFormat::Ggml(GgmlBlock::Bf16),
    ] {
        let w = Arc::new(PackedMatrix::quantize(&data(out * inp, 11), out, inp, format).unwrap());
        let run = |device: &Device| {
            let device = device.clone().autodiff();
            let x = Tensor::<1>::from_floats(&data(m * inp, 12)[..], &device)
                .reshape([m, inp])
                .require_grad();
            let b = Tensor::<1>::from_floats(&data(out, 13)[..], &device).require_grad();
            let u = Tensor::<1>::from_floats(&data(m * out, 14)[..], &device).reshape([m, out]);
            let y = packed_linear(x.clone(), &w, Some(b.clone()));
            let grads = (y.clone() * u).sum().backward();
            [
                y.inner().into_data(),
                x.grad(&grads).unwrap().into_data(),
                b.grad(&grads).unwrap().into_data(),
            ]
        };
        let (gpu, cpu) = (run(&wgpu()), run(&Device::flex()));
        for (what, (a, b)) in ["output", "dx", "db"].iter().zip(gpu.into_iter().zip(cpu)) {
            close(&format!("{} {what}", format.name()), a, b, 1e-4);
        }
    }
}

/// `head_cross_entropy` on wgpu (the default bodies: the whole logits and the loss from the
/// backend's ops) equals flex's blocked kernel: the loss, the gradients of `h` and of a trained
/// table, and `h`'s gradient over a packed table.
#[test]
fn head_cross_entropy_on_wgpu_equals_flex() {
    use std::sync::Arc;

    use peft_kernels::cross_entropy::{HeadWeight, Targets, head_cross_entropy};
    use peft_kernels::quant::{PackedFormat, PackedMatrix};

    let (n, d, vocab) = (9, 32, 600);
    let ids: Vec<i64> = (0..n)
        .map(|r| {
            if r % 4 == 1 {
                -100
            } else {
                (r * 67 % vocab) as i64
            }
        })
        .collect();
    let packed = Arc::new(
        PackedMatrix::quantize(
            &data(vocab * d, 21),
            vocab,
            d,
            PackedFormat::Nf4 { double: true },
        )
        .unwrap(),
    );
    let run = |device: &Device| {
        let device = device.clone().autodiff();
        let h = Tensor::<1>::from_floats(&data(n * d, 22)[..], &device)
            .reshape([n, d])
            .require_grad();
        let w = Tensor::<1>::from_floats(&data(vocab * d, 23)[..], &device)
            .reshape([vocab, d])
            .mul_scalar(0.2)
            .require_grad();
        let dense = head_cross_entropy(
            h.clone(),
            HeadWeight::Dense(w.clone()),
            Targets::new(ids.clone()),
        );
        let grads = (dense.clone() * 0.7).backward();
        let (dh, dw) = (h.grad(&grads).unwrap(), w.grad(&grads).unwrap());
        let h2 = h.clone().detach().require_grad();
        let on_packed = head_cross_entropy(
            h2.clone(),
            HeadWeight::Packed(packed.clone()),
            Targets::new(ids.clone()),
        );
        let grads = on_packed.clone().backward();
        [
            dense.inner().into_data(),
            dh.into_data(),
            dw.into_data(),
            on_packed.inner().into_data(),
            h2.grad(&grads).unwrap().into_data(),
        ]
    };
    let (gpu, cpu) = (run(&wgpu()), run(&Device::flex()));
    let names = ["loss", "dh", "dW", "packed loss", "packed dh"];
    for (what, (a, b)) in names.iter().zip(gpu.into_iter().zip(cpu)) {
        close(what, a, b, 1e-4);
    }
}

/// `rms_norm` on wgpu (the default bodies) equals flex's fused kernel: output and the gradients
/// of x and gamma.
#[test]
fn rms_norm_on_wgpu_equals_flex() {
    use peft_kernels::rms_norm;

    let (rows, d) = (6, 40);
    let run = |device: &Device| {
        let device = device.clone().autodiff();
        let x = Tensor::<1>::from_floats(&data(rows * d, 31)[..], &device)
            .reshape([rows, d])
            .require_grad();
        let gamma = Tensor::<1>::from_floats(&data(d, 32)[..], &device).require_grad();
        let w = Tensor::<1>::from_floats(&data(rows * d, 33)[..], &device).reshape([rows, d]);
        let y = rms_norm(x.clone(), gamma.clone(), 1e-5);
        let grads = (y.clone() * w).sum().backward();
        [
            y.inner().into_data(),
            x.grad(&grads).unwrap().into_data(),
            gamma.grad(&grads).unwrap().into_data(),
        ]
    };
    let (gpu, cpu) = (run(&wgpu()), run(&Device::flex()));
    for (what, (a, b)) in ["output", "dx", "dgamma"]
        .iter()
        .zip(gpu.into_iter().zip(cpu))
    {
        close(what, a, b, 1e-4);
    }
}

/// `rotary` on wgpu (the default bodies) equals flex's kernel: output and the input gradient
/// of a strided `[batch, heads, seq, d]` input.
#[test]
fn rotary_on_wgpu_equals_flex() {
    use peft_kernels::rotary;

    let (b, h, s, d) = (2, 3, 5, 8);
    let run = |device: &Device| {
        let device = device.clone().autodiff();
        let x = on(&device, &data(b * s * h * d, 41), [b, s, h, d]).require_grad();
        let table =
            |seed| Tensor::<1>::from_floats(&data(s * d, seed)[..], &device).reshape([s, d]);
        let w = on(&device, &data(b * s * h * d, 44), [b, h, s, d]);
        let y = rotary(x.clone().swap_dims(1, 2), table(42), table(43));
        let grads = (y.clone() * w).sum().backward();
        [y.inner().into_data(), x.grad(&grads).unwrap().into_data()]
    };
    let (gpu, cpu) = (run(&wgpu()), run(&Device::flex()));
    for (what, (a, b)) in ["output", "dx"].iter().zip(gpu.into_iter().zip(cpu)) {
        close(what, a, b, 1e-4);
    }
}
