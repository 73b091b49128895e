//! `packed_linear` against burn's own `linear` on the dequantized weight: forward (2-D, rank 3,
//! with and without bias, a decoding step) and the gradients of the input and bias on Autodiff,
//! for NF4 (with and without double quantization) and ggml blocks; `packed_lora_linear` against
//! the composed ops it replaces, forward and every gradient, with each operand tracked or not.

mod common;

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use peft_kernels::packed_linear::{packed_linear, packed_lora_linear};
use peft_kernels::quant::ggml::GgmlBlock;
use peft_kernels::quant::{PackedFormat, PackedMatrix};

use common::{random, random_values};

fn rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// A packed `[out, in]` weight and its dequantized `[in, out]` (burn orientation) copy.
fn weight(
    format: PackedFormat,
    out: usize,
    inp: usize,
    seed: u64,
    device: &Device,
) -> (Arc<PackedMatrix>, Tensor<2>) {
    let values: Vec<f32> = random_values(out * inp, seed)
        .iter()
        .map(|v| v * 0.1)
        .collect();
    let packed = match format {
        PackedFormat::Nf4 { double } => PackedMatrix::nf4(&values, out, inp, double).unwrap(),
        PackedFormat::Ggml(kind) => {
            // The NF4 values as ggml blocks: any valid block bytes serve; build them from the
            // f32 values through a Q8_0-style encoding with an f16 scale of 1/64.
            let d = burn::tensor::f16::from_f32(1.0 / 64.0);
            let mut bytes = Vec::new();
            for chunk in values.chunks(32) {
                bytes.extend_from_slice(&d.to_le_bytes());
                if kind == GgmlBlock::Q4_1 {
                    bytes.extend_from_slice(&burn::tensor::f16::from_f32(-0.05).to_le_bytes());
                }
                match kind {
                    GgmlBlock::Q8_0 => {
                        bytes.extend(chunk.iter().map(|v| ((v * 64.0).round() as i8) as u8))
                    }
                    _ => bytes.extend(chunk[..16].iter().zip(&chunk[16..]).map(|(a, b)| {
                        let q = |v: f32| ((v * 64.0).round() as i32 + 8).clamp(0, 15) as u8;
                        q(*a) | (q(*b) << 4)
                    })),
                }
            }
            PackedMatrix::ggml(kind, bytes.into(), out, inp).unwrap()
        }
    };
    let dense = Tensor::<2>::from_data(TensorData::new(packed.dequantize(), [out, inp]), device)
        .transpose();
    (Arc::new(packed), dense)
}

const FORMATS: [PackedFormat; 4] = [
    PackedFormat::Nf4 { double: false },
    PackedFormat::Nf4 { double: true },
    PackedFormat::Ggml(GgmlBlock::Q4_1),
    PackedFormat::Ggml(GgmlBlock::Q8_0),
];

#[test]
fn packed_linear_equals_linear_on_the_dequantized_weight() {
    let device = Device::flex();
    for (f, format) in FORMATS.into_iter().enumerate() {
        // (rows, in, out): a decoding step, a small batch, NF4 rows with a tail (padding).
        for (case, (m, inp, out)) in [(1, 96, 64), (37, 160, 72), (300, 128, 40), (5, 100, 33)]
            .into_iter()
            .enumerate()
        {
            if matches!(format, PackedFormat::Ggml(_)) && inp % 32 != 0 {
                continue;
            }
            let seed = 100 * f as u64 + 10 * case as u64;
            let (w, dense) = weight(format, out, inp, seed, &device);
            let x = random([m, inp], seed + 1, &device);
            let b = random([out], seed + 2, &device);
            let what = format!("{} {m}x{inp}->{out}", format.name());
            let y = packed_linear(x.clone(), &w, Some(b.clone()));
            let want = burn::tensor::module::linear(x.clone(), dense.clone(), Some(b));
            assert!(rel_diff(y, want) < 1e-5, "{what} with bias");
            let y = packed_linear(x.clone(), &w, None);
            let want = burn::tensor::module::linear(x.clone(), dense.clone(), None);
            assert!(rel_diff(y, want) < 1e-5, "{what}");
            // Rank three runs over its rows.
            let x3 = x.reshape([1, m, inp]);
            let y3 = packed_linear(x3.clone(), &w, None);
            assert_eq!(y3.dims(), [1, m, out]);
            let want = burn::tensor::module::linear(x3, dense, None);
            assert!(rel_diff(y3, want) < 1e-5, "{what} rank three");
        }
    }
}

#[test]
fn packed_linear_gradients_equal_burns_autodiff_for_input_and_bias() {
    let device = Device::flex().autodiff();
    let inner = device.clone().inner();
    for (f, format) in FORMATS.into_iter().enumerate() {
        let (m, inp, out) = (24, 128, 48);
        let seed = 1000 + 10 * f as u64;
        let (w, dense) = weight(format, out, inp, seed, &inner);
        let x = random([m, inp], seed + 1, &inner);
        let b = random([out], seed + 2, &inner);
        let upstream = Tensor::<2>::from_inner(random([m, out], seed + 3, &inner));
        for with_bias in [false, true] {
            let run = |packed: bool| {
                let xv = Tensor::<2>::from_inner(x.clone()).require_grad();
                let bv = with_bias.then(|| Tensor::<1>::from_inner(b.clone()).require_grad());
                let y = if packed {
                    packed_linear(xv.clone(), &w, bv.clone())
                } else {
                    let dense = Tensor::<2>::from_inner(dense.clone());
                    burn::tensor::module::linear(xv.clone(), dense, bv.clone())
                };
                let grads = (y * upstream.clone()).sum().backward();
                (xv.grad(&grads), bv.and_then(|b| b.grad(&grads)))
            };
            let (got, want) = (run(true), run(false));
            let what = format!("{} bias {with_bias}", format.name());
            assert!(
                rel_diff(got.0.expect("dx"), want.0.unwrap()) < 1e-5,
                "dx {what}"
            );
            assert_eq!(got.1.is_some(), with_bias, "{what}");
            if let (Some(a), Some(b)) = (got.1, want.1) {
                assert!(rel_diff(a, b) < 1e-5, "db {what}");
            }
        }
    }
}

#[test]
fn packed_lora_linear_equals_the_composed_ops_with_every_operand_tracked_or_not() {
    let device = Device::flex().autodiff();
    let inner = device.clone().inner();
    let scale = 2.5;
    for (f, format) in FORMATS.into_iter().enumerate() {
        // A decoding step (the few-rows path) and a batch spanning several tiles.
        for (m, inp, out, r) in [(3, 128, 72, 4), (70, 256, 200, 16)] {
            let seed = 2000 + 10 * f as u64 + m as u64;
            let (w, _) = weight(format, out, inp, seed, &inner);
            let x = random([m, inp], seed + 1, &inner);
            let bias = random([out], seed + 2, &inner);
            let a = random([inp, r], seed + 3, &inner);
            let b = random([r, out], seed + 4, &inner);
            let upstream = Tensor::<2>::from_inner(random([m, out], seed + 5, &inner));
            // Tracked: x, a, b, bias (a frozen adapter, a frozen input, no bias).
            for tracked in [
                [true, true, true, true],
                [true, true, true, false],
                [false, true, true, true],
                [true, false, false, true],
                [true, true, false, false],
                [false, false, true, false],
            ] {
                let run = |fused: bool| {
                    let leaf = |t: Tensor<2>, on: bool| {
                        let t = Tensor::<2>::from_inner(t);
                        if on { t.require_grad() } else { t }
                    };
                    let xv = leaf(x.clone(), tracked[0]);
                    let (av, bv) = (leaf(a.clone(), tracked[1]), leaf(b.clone(), tracked[2]));
                    let biasv =
                        tracked[3].then(|| Tensor::<1>::from_inner(bias.clone()).require_grad());
                    let y = if fused {
                        packed_lora_linear(
                            xv.clone(),
                            &w,
                            biasv.clone(),
                            av.clone(),
                            bv.clone(),
                            scale,
                        )
                    } else {
                        let base = packed_linear(xv.clone(), &w, biasv.clone());
                        let h = xv.clone().matmul(av.clone()) * scale;
                        base + h.matmul(bv.clone())
                    };
                    let value = y.clone().inner();
                    let grads = (y * upstream.clone()).sum().backward();
                    let grad = |t: &Tensor<2>| t.grad(&grads);
                    (
                        value,
                        [grad(&xv), grad(&av), grad(&bv)],
                        biasv.and_then(|b| b.grad(&grads)),
                    )
                };
                let (got, want) = (run(true), run(false));
                let what = format!(
                    "{} {m}x{inp}->{out} r {r} tracked {tracked:?}",
                    format.name()
                );
                assert!(rel_diff(got.0, want.0) < 1e-5, "forward {what}");
                for (i, (g, w)) in got.1.into_iter().zip(want.1).enumerate() {
                    assert_eq!(g.is_some(), tracked[i], "gradient {i} {what}");
                    if let (Some(g), Some(w)) = (g, w) {
                        assert!(rel_diff(g, w) < 1e-5, "gradient {i} {what}");
                    }
                }
                assert_eq!(got.2.is_some(), tracked[3], "bias gradient {what}");
                if let (Some(g), Some(w)) = (got.2, want.2) {
                    assert!(rel_diff(g, w) < 1e-5, "bias gradient {what}");
                }
            }
        }
    }
}
