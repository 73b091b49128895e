//! `head_cross_entropy` against the loss built from burn's own ops on the whole logits
//! (`log_softmax(h·Wᵀ)` gathered at the targets): the loss and the gradients of `h` and of the
//! weight, with ignored rows, more rows than one block (512) and a vocabulary that is not a
//! multiple of the 512-column block; and over packed tables, against the dequantized table.

mod common;

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData, activation::log_softmax};
use peft_kernels::cross_entropy::{HeadWeight, Targets, head_cross_entropy};
use peft_kernels::quant::ggml::GgmlBlock;
use peft_kernels::quant::{PackedFormat, PackedMatrix};

use common::{random, random_values};

fn max_rel(a: Tensor<2>, b: Tensor<2>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// Targets in `0..vocab` with every `skip`-th row ignored (-100).
fn targets(n: usize, vocab: usize, skip: usize) -> Vec<i64> {
    (0..n)
        .map(|r| {
            if r % skip == 1 {
                -100
            } else {
                ((r * 7919 + 13) % vocab) as i64
            }
        })
        .collect()
}

/// The reference loss: the whole logits, `log_softmax`, the targets' entries, the mean over the
/// counted rows.
fn reference(h: Tensor<2>, w: Tensor<2>, ids: &[i64]) -> Tensor<1> {
    let n = ids.len();
    let device = h.device();
    let logp = log_softmax(h.matmul(w.transpose()), 1);
    let index: Vec<i64> = ids.iter().map(|&t| t.max(0)).collect();
    let kept: Vec<f32> = ids.iter().map(|&t| f32::from(t >= 0)).collect();
    let counted = kept.iter().sum::<f32>();
    let index = Tensor::<2, Int>::from_data(TensorData::new(index, [n, 1]), &device);
    let kept = Tensor::<2>::from_data(TensorData::new(kept, [n, 1]), &device);
    (logp.gather(1, index) * kept).sum().neg() / counted
}

#[test]
fn fused_loss_and_gradients_equal_the_whole_logits() {
    let device = Device::flex().autodiff();
    // 600 rows (two row blocks), a 1100-token vocabulary (slices of 1024 and 76 on two threads,
    // blocks of 512, 512 and 76), every fifth row ignored.
    let (n, d, vocab) = (600, 24, 1100);
    let ids = targets(n, vocab, 5);
    for transposed in [false, true] {
        let h = random([n, d], 1, &device).require_grad();
        // The weight either as a `[vocab, d]` table or as the transposed view of a linear
        // head's `[d, vocab]` weight (a view built for each loss: a backward pass consumes it).
        let w_leaf = if transposed {
            random([d, vocab], 2, &device).require_grad()
        } else {
            random([vocab, d], 2, &device).require_grad()
        };
        let w = || {
            if transposed {
                w_leaf.clone().transpose()
            } else {
                w_leaf.clone()
            }
        };
        let fused =
            head_cross_entropy(h.clone(), HeadWeight::Dense(w()), Targets::new(ids.clone()));
        let expected = reference(h.clone(), w(), &ids);
        let (a, b) = (
            fused.clone().into_scalar::<f32>(),
            expected.clone().into_scalar::<f32>(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} against {b}");
        // A loss gradient other than 1 reaches both gradients.
        let g1 = (fused * 0.5).backward();
        let g2 = (expected * 0.5).backward();
        let dh = max_rel(h.grad(&g1).unwrap(), h.grad(&g2).unwrap());
        let dw = max_rel(w_leaf.grad(&g1).unwrap(), w_leaf.grad(&g2).unwrap());
        assert!(dh < 1e-4, "dh differs by {dh} (transposed {transposed})");
        assert!(dw < 1e-4, "dW differs by {dw} (transposed {transposed})");
        // Ignored rows get no gradient.
        let dh = h.grad(&g1).unwrap();
        let row1 = dh.slice([1..2, 0..d]).abs().max().into_scalar::<f32>();
        assert_eq!(row1, 0.0, "an ignored row has a gradient");
    }
}

#[test]
fn a_frozen_table_with_every_row_counted() {
    let device = Device::flex().autodiff();
    let (n, d, vocab) = (40, 16, 700);
    let ids: Vec<i64> = (0..n).map(|r| (r * 31 % vocab) as i64).collect();
    let h = random([n, d], 3, &device).require_grad();
    let w = random([vocab, d], 4, &device);
    let fused = head_cross_entropy(
        h.clone(),
        HeadWeight::Dense(w.clone()),
        Targets::new(ids.clone()),
    );
    let expected = reference(h.clone(), w, &ids);
    let (a, b) = (
        fused.clone().into_scalar::<f32>(),
        expected.clone().into_scalar::<f32>(),
    );
    assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} against {b}");
    let (g1, g2) = (fused.backward(), expected.backward());
    let dh = max_rel(h.grad(&g1).unwrap(), h.grad(&g2).unwrap());
    assert!(dh < 1e-4, "dh differs by {dh}");
}

#[test]
fn no_counted_row_gives_nan_as_pytorch() {
    let device = Device::flex();
    let h = random([3, 8], 5, &device);
    let w = random([20, 8], 6, &device);
    let loss = head_cross_entropy(h, HeadWeight::Dense(w), Targets::new(vec![-100; 3]));
    assert!(loss.into_scalar::<f32>().is_nan());
}

#[test]
#[should_panic(expected = "outside a 20-token vocabulary")]
fn a_target_outside_the_vocabulary_is_refused() {
    let device = Device::flex();
    let h = random([2, 8], 5, &device);
    let w = random([20, 8], 6, &device);
    head_cross_entropy(h, HeadWeight::Dense(w), Targets::new(vec![3, 20]));
}

#[test]
fn packed_tables_equal_their_dequantized_copy() {
    let device = Device::flex().autodiff();
    let (n, d, vocab) = (70, 64, 600);
    let ids = targets(n, vocab, 3);
    for format in [
        PackedFormat::Nf4 { double: true },
        PackedFormat::Ggml(GgmlBlock::Q8_0),
    ] {
        let values: Vec<f32> = random_values(vocab * d, 7)
            .iter()
            .map(|v| v * 0.5)
            .collect();
        let packed = Arc::new(PackedMatrix::quantize(&values, vocab, d, format).unwrap());
        let dense =
            Tensor::<2>::from_data(TensorData::new(packed.dequantize(), [vocab, d]), &device);
        let h = random([n, d], 8, &device).require_grad();
        let fused = head_cross_entropy(
            h.clone(),
            HeadWeight::Packed(packed.clone()),
            Targets::new(ids.clone()),
        );
        let expected = head_cross_entropy(
            h.clone(),
            HeadWeight::Dense(dense.clone()),
            Targets::new(ids.clone()),
        );
        let reference = reference(h.clone(), dense, &ids);
        let (a, b, c) = (
            fused.clone().into_scalar::<f32>(),
            expected.clone().into_scalar::<f32>(),
            reference.into_scalar::<f32>(),
        );
        assert_eq!(a, b, "{}: packed and dense tables differ", format.name());
        assert!(
            (a - c).abs() < 1e-5 * c.abs(),
            "{}: {a} against {c}",
            format.name()
        );
        let (g1, g2) = (fused.backward(), expected.backward());
        let dh = max_rel(h.grad(&g1).unwrap(), h.grad(&g2).unwrap());
        assert!(dh < 1e-6, "{}: dh differs by {dh}", format.name());
    }
}
