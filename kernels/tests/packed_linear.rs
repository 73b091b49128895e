//! `packed_linear` against burn's own `linear` on the dequantized weight: forward (2-D, rank 3,
//! with and without bias, a decoding step) and the gradients of the input and bias on Autodiff,
//! for NF4 (with and without double quantization) and ggml blocks.

mod common;

use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use peft_kernels::packed_linear::packed_linear;
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
