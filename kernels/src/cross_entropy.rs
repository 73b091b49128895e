//! The causal-LM loss fused with the LM head, as a burn backend extension:
//! [`head_cross_entropy`].
//!
//! For hidden states `h` `[n, d]`, a head weight `W` `[vocab, d]` and one target per row, the
//! loss is the mean over the counted rows of `logsumexp(h_r·Wᵀ) - h_r·W_{t_r}`. The `[n, vocab]`
//! logits are never built whole: on flex each thread takes a slice of the vocabulary and walks it
//! in blocks of 512 columns. A block of logits is one GEMM into a buffer that stays in L2; it is
//! folded into each row's running maximum and sum of exponentials, then dropped. The backward
//! pass recomputes each block, turns it into `g/count · (softmax - onehot)` in place and
//! multiplies it back: `dh += P·W_block` and, when the weight is trained, `dW_block += Pᵀ·h`.
//! Rows whose target is negative (prompt or padding labels) take no part in either pass.
//!
//! Against the logits followed by a composed cross-entropy this saves the `[n, vocab]` tensor
//! (100 MB for 512 tokens of a 49,152-token vocabulary) and the five or six full passes over it
//! (each a fresh buffer), at the price of one more head GEMM in the backward pass. The weight
//! may be packed ([`PackedWeight`]): each block of its rows is decoded when it is used.
//!
//! Other backends (and flex's other dtypes) take the default bodies: the logits, then the loss
//! from the backend's own ops.

use std::sync::Arc;

use burn::backend::{
    Autodiff, Backend, Dispatch, TensorMetadata,
    autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::{Slice, Tensor};

use crate::packed_linear::{PackedWeight, dequantized};

/// The targets of a [`head_cross_entropy`]: one vocabulary index per row of `h`, negative for a
/// row that does not count (PyTorch's `ignore_index`, Transformers' -100).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Targets {
    ids: Vec<i64>,
    counted: usize,
}

impl Targets {
    /// Targets from one id per row; negative ids are ignored rows.
    pub fn new(ids: Vec<i64>) -> Self {
        let counted = ids.iter().filter(|&&t| t >= 0).count();
        Self { ids, counted }
    }

    /// One id per row.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    /// How many rows count (the loss is their mean).
    pub fn counted(&self) -> usize {
        self.counted
    }

    /// The rows that count, in order.
    fn kept(&self) -> Vec<usize> {
        (0..self.ids.len()).filter(|&r| self.ids[r] >= 0).collect()
    }
}

/// The LM head's weight as the loss reads it.
// A `Tensor` is larger than an `Arc`; one value is built per loss, so it is not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum HeadWeight {
    /// `[vocab, d]`, any strides (a tied embedding table, or the transposed `[d, vocab]` weight
    /// of a linear head): differentiable.
    Dense(Tensor<2>),
    /// A frozen packed `[vocab, d]` table.
    Packed(PackedWeight),
}

impl HeadWeight {
    /// `[vocab, d]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            HeadWeight::Dense(w) => w.dims(),
            HeadWeight::Packed(w) => w.shape(),
        }
    }
}

/// The extension behind [`head_cross_entropy`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait CrossEntropyBackend: Backend {
    /// `[n + 1]`: each row's log-sum-exp of `h·Wᵀ` (0 for a row that does not count), then the
    /// mean loss over the counted rows.
    ///
    /// # Shapes
    /// - `h`: `[n, d]`; `weight`: `[vocab, d]`; `targets`: `n` ids.
    #[fusion(default)]
    fn fast_head_cross_entropy(
        h: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Arc<Targets>,
    ) -> FloatTensor<Self> {
        composed::forward::<Self>(h, weight, &targets)
    }

    /// The gradients of [`fast_head_cross_entropy`](Self::fast_head_cross_entropy) for the
    /// gradient `grad` of its output (`[n + 1]`; only the loss's, the last entry, is read),
    /// given the rows' log-sum-exp `lse` (`[n]`), flattened and concatenated: `[dh…]`, then
    /// `[dW…]` when `weight_grad`.
    #[fusion(default)]
    fn fast_head_cross_entropy_backward(
        h: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Arc<Targets>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight_grad: bool,
    ) -> FloatTensor<Self> {
        composed::backward::<Self>(h, weight, &targets, lse, grad, weight_grad)
    }

    /// [`fast_head_cross_entropy`](Self::fast_head_cross_entropy) over a packed `[vocab, d]`
    /// weight.
    #[fusion(default)]
    fn fast_packed_head_cross_entropy(
        h: FloatTensor<Self>,
        weight: PackedWeight,
        targets: Arc<Targets>,
    ) -> FloatTensor<Self> {
        let w = dequantized::<Self>(&weight, &h.device());
        composed::forward::<Self>(h, w, &targets)
    }

    /// `dh` (flat) of [`fast_packed_head_cross_entropy`](Self::fast_packed_head_cross_entropy).
    #[fusion(default)]
    fn fast_packed_head_cross_entropy_backward(
        h: FloatTensor<Self>,
        weight: PackedWeight,
        targets: Arc<Targets>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let w = dequantized::<Self>(&weight, &h.device());
        composed::backward::<Self>(h, w, &targets, lse, grad, false)
    }
}

#[cfg(feature = "cube")]
impl CrossEntropyBackend for burn_cubecl::CubeBackend {}

impl<B: CrossEntropyBackend, C: CheckpointStrategy> CrossEntropyBackend for Autodiff<B, C> {
    fn fast_head_cross_entropy(
        h: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: Arc<Targets>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct HeadBackward;

        impl<B: CrossEntropyBackend> Backward<B, 2> for HeadBackward {
            /// `h`, the weight, the targets and the rows' log-sum-exp.
            type State = (FloatTensor<B>, FloatTensor<B>, Arc<Targets>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (h, weight, targets, lse) = ops.state;
                let [h_node, w_node] = ops.parents;
                let (h_shape, w_shape) = (h.shape(), weight.shape());
                let all = B::fast_head_cross_entropy_backward(
                    h,
                    weight,
                    targets,
                    lse,
                    grad,
                    w_node.is_some(),
                );
                let n = h_shape.num_elements();
                if let Some(node) = h_node {
                    let dh = B::float_slice(all.clone(), &[Slice::from(0..n)]);
                    grads.register::<B>(node.id, B::float_reshape(dh, h_shape));
                }
                if let Some(node) = w_node {
                    let end = n + w_shape.num_elements();
                    let dw = B::float_slice(all, &[Slice::from(n..end)]);
                    grads.register::<B>(node.id, B::float_reshape(dw, w_shape));
                }
            }
        }

        let n = h.shape()[0];
        match HeadBackward
            .prepare::<C>([h.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (hp, wp) = (h.primitive().clone(), weight.primitive().clone());
                let all = B::fast_head_cross_entropy(hp.clone(), wp.clone(), targets.clone());
                let lse = B::float_slice(all.clone(), &[Slice::from(0..n)]);
                prep.finish((hp, wp, targets, lse), all)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_head_cross_entropy(
                h.into_primitive(),
                weight.into_primitive(),
                targets,
            )),
        }
    }

    fn fast_packed_head_cross_entropy(
        h: FloatTensor<Self>,
        weight: PackedWeight,
        targets: Arc<Targets>,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct PackedHeadBackward;

        impl<B: CrossEntropyBackend> Backward<B, 1> for PackedHeadBackward {
            /// `h`, the weight, the targets and the rows' log-sum-exp.
            type State = (FloatTensor<B>, PackedWeight, Arc<Targets>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let grad = grads.consume::<B>(&ops.node);
                let (h, weight, targets, lse) = ops.state;
                if let [Some(node)] = ops.parents {
                    let shape = h.shape();
                    let dh =
                        B::fast_packed_head_cross_entropy_backward(h, weight, targets, lse, grad);
                    grads.register::<B>(node.id, B::float_reshape(dh, shape));
                }
            }
        }

        let n = h.shape()[0];
        match PackedHeadBackward
            .prepare::<C>([h.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let hp = h.primitive().clone();
                let all =
                    B::fast_packed_head_cross_entropy(hp.clone(), weight.clone(), targets.clone());
                let lse = B::float_slice(all.clone(), &[Slice::from(0..n)]);
                prep.finish((hp, weight, targets, lse), all)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_packed_head_cross_entropy(
                h.into_primitive(),
                weight,
                targets,
            )),
        }
    }
}

/// The mean cross-entropy of the logits `h·Wᵀ` against `targets`, over the rows whose target is
/// not negative: `mean_r (logsumexp(h_r·Wᵀ) - h_r·W_{t_r})`, `[1]`, differentiable in `h` and
/// (when dense) in the weight. With no counted row the mean is NaN, as PyTorch's.
///
/// # Shapes
/// - `h`: `[n, d]`; `weight`: `[vocab, d]`; `targets`: `n` ids, each below `vocab` or negative.
///
/// # Panics
/// If the shapes disagree or a target is `vocab` or more.
///
/// ```
/// use burn::tensor::{Device, Tensor, activation::log_softmax};
/// use peft_kernels::cross_entropy::{HeadWeight, Targets, head_cross_entropy};
///
/// let device = Device::flex();
/// let h = Tensor::<2>::from_floats([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]], &device);
/// let w = Tensor::<2>::from_floats([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], &device);
/// // The second row does not count.
/// let loss = head_cross_entropy(h.clone(), HeadWeight::Dense(w.clone()), Targets::new(vec![2, -100, 0]));
/// let logp = log_softmax(h.matmul(w.transpose()), 1).into_data().to_vec::<f32>().unwrap();
/// let expected = -(logp[2] + logp[6]) / 2.0;
/// assert!((loss.into_scalar::<f32>() - expected).abs() < 1e-5);
/// ```
pub fn head_cross_entropy(h: Tensor<2>, weight: HeadWeight, targets: Targets) -> Tensor<1> {
    let [n, d] = h.dims();
    let [vocab, wd] = weight.shape();
    assert!(
        targets.ids.len() == n && wd == d,
        "head cross-entropy: h [{n}, {d}], weight [{vocab}, {wd}], {} targets",
        targets.ids.len()
    );
    if let Some(t) = targets.ids.iter().find(|&&t| t >= vocab as i64) {
        panic!("head cross-entropy: target {t} outside a {vocab}-token vocabulary");
    }
    let targets = Arc::new(targets);
    let h = h.into_dispatch();
    // `[n + 1]`: the rows' log-sum-exp, then the loss.
    let loss = match weight {
        HeadWeight::Dense(w) => <Dispatch as CrossEntropyBackend>::fast_head_cross_entropy(
            h,
            w.into_dispatch(),
            targets,
        ),
        HeadWeight::Packed(w) => {
            <Dispatch as CrossEntropyBackend>::fast_packed_head_cross_entropy(h, w, targets)
        }
    };
    Tensor::<1>::from_dispatch(loss).narrow(0, n, 1)
}

/// The loss from the backend's own ops: the whole logits (every backend but flex's f32 path).
mod composed {
    use burn::backend::{Backend, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::{IndexingUpdateOp, Shape, Slice, TensorData};

    use super::Targets;

    /// The logits `[n, vocab]`, the gather indices (`[n, 1]`, ignored rows at 0) and the
    /// counted-row mask (`[n, 1]`, 1 or 0).
    fn parts<B: Backend>(
        h: FloatTensor<B>,
        weight: FloatTensor<B>,
        targets: &Targets,
    ) -> (FloatTensor<B>, B::IntTensorPrimitive, FloatTensor<B>) {
        let device = h.device();
        let n = targets.ids.len();
        let logits = B::float_matmul(h, B::float_transpose(weight));
        let index: Vec<i64> = targets.ids.iter().map(|&t| t.max(0)).collect();
        let kept: Vec<f32> = targets.ids.iter().map(|&t| f32::from(t >= 0)).collect();
        let index = B::int_from_data(TensorData::new(index, Shape::new([n, 1])), &device);
        let kept = B::float_from_data(TensorData::new(kept, Shape::new([n, 1])), &device);
        (logits, index, kept)
    }

    /// `[n, 1]`: each row's log-sum-exp (stable: the row maximum taken out first).
    fn log_sum_exp<B: Backend>(logits: FloatTensor<B>) -> FloatTensor<B> {
        let max = B::float_max_dim(logits.clone(), 1);
        let e = B::float_exp(B::float_sub(logits, max.clone()));
        B::float_add(B::float_log(B::float_sum_dim(e, 1)), max)
    }

    pub(super) fn forward<B: Backend>(
        h: FloatTensor<B>,
        weight: FloatTensor<B>,
        targets: &Targets,
    ) -> FloatTensor<B> {
        let n = targets.ids.len();
        let (logits, index, kept) = parts::<B>(h, weight, targets);
        let lse = log_sum_exp::<B>(logits.clone());
        let picked = B::float_gather(1, logits, index);
        let nll = B::float_mul(B::float_sub(lse.clone(), picked), kept.clone());
        let loss = B::float_div_scalar(B::float_sum(nll), (targets.counted as f64).into());
        let lse = B::float_reshape(B::float_mul(lse, kept), Shape::new([n]));
        B::float_cat(vec![lse, B::float_reshape(loss, Shape::new([1]))], 0)
    }

    pub(super) fn backward<B: Backend>(
        h: FloatTensor<B>,
        weight: FloatTensor<B>,
        targets: &Targets,
        lse: FloatTensor<B>,
        grad: FloatTensor<B>,
        weight_grad: bool,
    ) -> FloatTensor<B> {
        let n = targets.ids.len();
        let vocab = weight.shape()[0];
        let device = h.device();
        let (logits, index, kept) = parts::<B>(h.clone(), weight.clone(), targets);
        let lse = B::float_reshape(lse, Shape::new([n, 1]));
        // d loss / d logits = g/count · kept · (softmax - onehot).
        let coef = B::float_mul(
            kept,
            B::float_div_scalar(
                B::float_reshape(
                    B::float_slice(grad, &[Slice::from(n..n + 1)]),
                    Shape::new([1, 1]),
                ),
                (targets.counted as f64).into(),
            ),
        );
        let softmax = B::float_exp(B::float_sub(logits, lse));
        let zeros = B::float_zeros(Shape::new([n, vocab]), &device, softmax.dtype().into());
        let ones = B::float_from_data(TensorData::new(vec![1f32; n], Shape::new([n, 1])), &device);
        let onehot = B::float_scatter(1, zeros, index, ones, IndexingUpdateOp::Add);
        let p = B::float_mul(B::float_sub(softmax, onehot), coef);
        let dh = B::float_matmul(p.clone(), weight);
        let flat = |t: FloatTensor<B>| {
            let len = t.shape().num_elements();
            B::float_reshape(t, Shape::new([len]))
        };
        if weight_grad {
            let dw = B::float_matmul(B::float_transpose(p), h);
            B::float_cat(vec![flat(dh), flat(dw)], 0)
        } else {
            flat(dh)
        }
    }
}

#[cfg(feature = "flex")]
mod flex {
    use std::borrow::Cow;
    use std::ops::Range;
    use std::sync::Arc;

    use burn::backend::{Flex, TensorMetadata, tensor::FloatTensor};
    use burn::tensor::{DType, Shape, TensorData};
    use rayon::prelude::*;

    use super::{CrossEntropyBackend, Targets, composed};
    use crate::linear::flex::{Matrix, gemm_into, operand};
    use crate::nn::flex::kernels::{lse_fold_rows, softmax_scaled_rows};
    use crate::packed_linear::{PackedWeight, dequantized};
    use crate::quant::PackedMatrix;

    /// Vocabulary columns per block: a `ROWS x COLS` block of logits (1 MB) stays in L2.
    const COLS: usize = 512;
    /// Rows of `h` per block.
    const ROWS: usize = 512;

    /// The head's weight rows: a strided `[vocab, d]` view, or a packed table decoded block by
    /// block.
    #[derive(Clone, Copy)]
    enum Weight<'a> {
        Dense(Matrix<'a>),
        Packed(&'a PackedMatrix),
    }

    impl<'a> Weight<'a> {
        /// Rows `rows` as a `[rows.len(), d]` view (packed rows decoded into `buf`).
        fn block<'b>(self, rows: Range<usize>, d: usize, buf: &'b mut Vec<f32>) -> Matrix<'b>
        where
            'a: 'b,
        {
            match self {
                Weight::Dense(w) => w.rows(rows.start),
                Weight::Packed(p) => {
                    buf.resize(rows.len() * d, 0.0);
                    p.decode_rows(rows, buf);
                    Matrix {
                        data: buf,
                        strides: [d, 1],
                    }
                }
            }
        }
    }

    /// The transposed view of `m`.
    fn t(m: Matrix<'_>) -> Matrix<'_> {
        Matrix {
            data: m.data,
            strides: [m.strides[1], m.strides[0]],
        }
    }

    /// The rows of a loss that count: their indices in `h`, their rows of `h` as one contiguous
    /// `[kept, d]` block (`h` itself when every row counts) and their targets.
    struct Kept<'a> {
        rows: Vec<usize>,
        h: Cow<'a, [f32]>,
        ids: Vec<i64>,
    }

    impl<'a> Kept<'a> {
        fn new(h: &'a [f32], d: usize, targets: &Targets) -> Self {
            let rows = targets.kept();
            let h = if rows.len() * d == h.len() {
                Cow::Borrowed(h)
            } else {
                Cow::Owned(
                    rows.iter()
                        .flat_map(|&r| &h[r * d..(r + 1) * d])
                        .copied()
                        .collect(),
                )
            };
            let ids = rows.iter().map(|&r| targets.ids[r]).collect();
            Self { rows, h, ids }
        }
    }

    /// The problem of one loss: `h` (`[n, d]`, contiguous) against a `[vocab, d]` weight.
    #[derive(Clone, Copy)]
    struct Head<'a> {
        h: &'a [f32],
        d: usize,
        weight: Weight<'a>,
        vocab: usize,
    }

    /// One slice's part of the forward pass: each kept row's running maximum and sum of
    /// exponentials, and its target's logit where the target falls in the slice.
    struct SliceStats {
        max: Vec<f32>,
        sum: Vec<f32>,
        picked: Vec<Option<f32>>,
    }

    /// One vocabulary slice per thread, in blocks of [`COLS`].
    fn slices(vocab: usize) -> Vec<Range<usize>> {
        let per = vocab
            .div_ceil(rayon::current_num_threads().max(1))
            .next_multiple_of(COLS);
        (0..vocab)
            .step_by(per.max(1))
            .map(|s| s..(s + per).min(vocab))
            .collect()
    }

    /// The logits of `rows` rows of `h` from row `r0` on against a transposed weight block
    /// `wt` (`[d, cols]`), into `out` (`[rows, cols]`, `cols = out.len() / rows`).
    fn logits(h: &[f32], d: usize, (r0, rows): (usize, usize), wt: Matrix<'_>, out: &mut [f32]) {
        let cols = out.len() / rows;
        let lhs = Matrix {
            data: &h[r0 * d..],
            strides: [d, 1],
        };
        assert!(lhs.fits(rows, d) && wt.fits(d, cols));
        // SAFETY: `out` holds `rows·cols` elements and aliases neither operand; both views fit.
        #[allow(unsafe_code)]
        unsafe {
            gemm_into(
                out.as_mut_ptr(),
                (rows, cols, d),
                (lhs, wt),
                false,
                gemm::Parallelism::None,
            );
        }
    }

    /// `dst += lhs · rhs` for a row-major `[m, n]` `dst`.
    fn accumulate(dst: &mut [f32], (m, n, k): (usize, usize, usize), lhs: Matrix, rhs: Matrix) {
        assert!(dst.len() >= m * n && lhs.fits(m, k) && rhs.fits(k, n));
        // SAFETY: `dst` holds `m·n` initialised elements and aliases neither operand.
        #[allow(unsafe_code)]
        unsafe {
            gemm_into(
                dst.as_mut_ptr(),
                (m, n, k),
                (lhs, rhs),
                true,
                gemm::Parallelism::None,
            );
        }
    }

    /// `[n + 1]`: each row's log-sum-exp (0 where ignored), then the mean loss.
    fn forward(head: Head<'_>, targets: &Targets) -> Vec<f32> {
        let Head {
            h,
            d,
            weight,
            vocab,
        } = head;
        let n = targets.ids.len();
        let Kept { rows: kept, h, ids } = Kept::new(h, d, targets);
        let (hk, k) = (&*h, kept.len());
        let parts: Vec<SliceStats> = slices(vocab)
            .into_par_iter()
            .map(|slice| {
                let (mut max, mut sum) = (vec![f32::MIN; k], vec![0f32; k]);
                let mut picked = vec![None; k];
                let (mut wbuf, mut block) = (Vec::new(), vec![0f32; ROWS * COLS]);
                for c0 in slice.clone().step_by(COLS) {
                    let cols = c0..(c0 + COLS).min(slice.end);
                    let w = weight.block(cols.clone(), d, &mut wbuf);
                    for r0 in (0..k).step_by(ROWS) {
                        let rows = ROWS.min(k - r0);
                        let out = &mut block[..rows * cols.len()];
                        logits(hk, d, (r0, rows), t(w), out);
                        lse_fold_rows(
                            out,
                            cols.len(),
                            &mut max[r0..r0 + rows],
                            &mut sum[r0..r0 + rows],
                        );
                        for i in 0..rows {
                            let id = ids[r0 + i] as usize;
                            if cols.contains(&id) {
                                picked[r0 + i] = Some(out[i * cols.len() + id - cols.start]);
                            }
                        }
                    }
                }
                SliceStats { max, sum, picked }
            })
            .collect();
        let mut out = vec![0f32; n + 1];
        let mut total = 0f64;
        for (i, &r) in kept.iter().enumerate() {
            let max = parts.iter().map(|p| p.max[i]).fold(f32::MIN, f32::max);
            let sum: f64 = parts
                .iter()
                .map(|p| f64::from(p.sum[i]) * f64::from(p.max[i] - max).exp())
                .sum();
            let lse = f64::from(max) + sum.ln();
            let picked = parts.iter().find_map(|p| p.picked[i]).unwrap_or(f32::NAN);
            out[r] = lse as f32;
            total += lse - f64::from(picked);
        }
        out[n] = (total / targets.counted as f64) as f32;
        out
    }

    /// `[dh…]` (and `[dW…]` with `weight_grad`) for the loss gradient `grad`.
    fn backward(
        head: Head<'_>,
        targets: &Targets,
        lse: &[f32],
        grad: f32,
        weight_grad: bool,
    ) -> Vec<f32> {
        let Head {
            h,
            d,
            weight,
            vocab,
        } = head;
        let n = targets.ids.len();
        let Kept { rows: kept, h, ids } = Kept::new(h, d, targets);
        let (hk, k) = (&*h, kept.len());
        let lse: Vec<f32> = kept.iter().map(|&r| lse[r]).collect();
        let coef = grad / targets.counted as f32;
        let slices = slices(vocab);
        let mut dw = if weight_grad {
            vec![0f32; vocab * d]
        } else {
            Vec::new()
        };
        let mut dw_parts: Vec<&mut [f32]> = if weight_grad {
            let mut parts = Vec::new();
            let mut rest = dw.as_mut_slice();
            for s in &slices {
                let (part, tail) = rest.split_at_mut(s.len() * d);
                parts.push(part);
                rest = tail;
            }
            parts
        } else {
            slices.iter().map(|_| <&mut [f32]>::default()).collect()
        };
        let partial: Vec<Vec<f32>> = slices
            .par_iter()
            .zip(dw_parts.par_iter_mut())
            .map(|(slice, dw)| {
                let mut dh = vec![0f32; k * d];
                let (mut wbuf, mut block) = (Vec::new(), vec![0f32; ROWS * COLS]);
                for c0 in slice.clone().step_by(COLS) {
                    let cols = c0..(c0 + COLS).min(slice.end);
                    let c = cols.len();
                    let w = weight.block(cols.clone(), d, &mut wbuf);
                    for r0 in (0..k).step_by(ROWS) {
                        let rows = ROWS.min(k - r0);
                        let p = &mut block[..rows * c];
                        logits(hk, d, (r0, rows), t(w), p);
                        softmax_scaled_rows(p, c, &lse[r0..r0 + rows], coef);
                        for i in 0..rows {
                            let id = ids[r0 + i] as usize;
                            if cols.contains(&id) {
                                p[i * c + id - cols.start] -= coef;
                            }
                        }
                        let pm = Matrix {
                            data: p,
                            strides: [c, 1],
                        };
                        accumulate(&mut dh[r0 * d..(r0 + rows) * d], (rows, d, c), pm, w);
                        if weight_grad {
                            let hm = Matrix {
                                data: &hk[r0 * d..],
                                strides: [d, 1],
                            };
                            let at = (c0 - slice.start) * d;
                            accumulate(&mut dw[at..at + c * d], (c, d, rows), t(pm), hm);
                        }
                    }
                }
                dh
            })
            .collect();
        let mut out = vec![0f32; n * d];
        for (i, &r) in kept.iter().enumerate() {
            let dst = &mut out[r * d..(r + 1) * d];
            for part in &partial {
                for (o, v) in dst.iter_mut().zip(&part[i * d..(i + 1) * d]) {
                    *o += v;
                }
            }
        }
        drop(dw_parts);
        out.extend_from_slice(&dw);
        out
    }

    /// A contiguous f32 `[n, d]` copy (or the tensor itself).
    fn contiguous(t: FloatTensor<Flex>) -> FloatTensor<Flex> {
        if t.is_contiguous() {
            t
        } else {
            t.to_contiguous()
        }
    }

    fn f32_2d(ts: &[&FloatTensor<Flex>]) -> bool {
        ts.iter()
            .all(|t| t.dtype() == DType::F32 && t.layout().shape().num_dims() == 2)
    }

    /// The loss's gradient: the last entry of the output's gradient.
    fn loss_grad(t: FloatTensor<Flex>) -> f32 {
        *contiguous(t)
            .as_slice::<f32>()
            .expect("an f32 gradient")
            .last()
            .expect("a gradient of n + 1 entries")
    }

    fn tensor(values: Vec<f32>) -> FloatTensor<Flex> {
        let len = values.len();
        FloatTensor::<Flex>::from_data(TensorData::new(values, Shape::new([len])))
    }

    impl CrossEntropyBackend for Flex {
        fn fast_head_cross_entropy(
            h: FloatTensor<Flex>,
            weight: FloatTensor<Flex>,
            targets: Arc<Targets>,
        ) -> FloatTensor<Flex> {
            if !f32_2d(&[&h, &weight]) {
                return composed::forward::<Flex>(h, weight, &targets);
            }
            let [_, d] = h.layout().shape().dims::<2>();
            let vocab = weight.layout().shape().dims::<2>()[0];
            let h = contiguous(h);
            let (w, off, strides) = operand(weight);
            let w = Weight::Dense(Matrix {
                data: &w.storage::<f32>()[off..],
                strides,
            });
            let hs = h.as_slice::<f32>().expect("contiguous f32");
            let head = Head {
                h: hs,
                d,
                weight: w,
                vocab,
            };
            tensor(forward(head, &targets))
        }

        fn fast_head_cross_entropy_backward(
            h: FloatTensor<Flex>,
            weight: FloatTensor<Flex>,
            targets: Arc<Targets>,
            lse: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
            weight_grad: bool,
        ) -> FloatTensor<Flex> {
            if !f32_2d(&[&h, &weight]) || lse.dtype() != DType::F32 {
                return composed::backward::<Flex>(h, weight, &targets, lse, grad, weight_grad);
            }
            let [_, d] = h.layout().shape().dims::<2>();
            let vocab = weight.layout().shape().dims::<2>()[0];
            let (h, lse, grad) = (contiguous(h), contiguous(lse), loss_grad(grad));
            let (w, off, strides) = operand(weight);
            let w = Weight::Dense(Matrix {
                data: &w.storage::<f32>()[off..],
                strides,
            });
            let hs = h.as_slice::<f32>().expect("contiguous f32");
            let ls = lse.as_slice::<f32>().expect("contiguous f32");
            let head = Head {
                h: hs,
                d,
                weight: w,
                vocab,
            };
            tensor(backward(head, &targets, ls, grad, weight_grad))
        }

        fn fast_packed_head_cross_entropy(
            h: FloatTensor<Flex>,
            weight: PackedWeight,
            targets: Arc<Targets>,
        ) -> FloatTensor<Flex> {
            if !f32_2d(&[&h]) {
                let w = dequantized::<Flex>(&weight, &h.device());
                return composed::forward::<Flex>(h, w, &targets);
            }
            let [_, d] = h.layout().shape().dims::<2>();
            let h = contiguous(h);
            let hs = h.as_slice::<f32>().expect("contiguous f32");
            let vocab = weight.shape()[0];
            let head = Head {
                h: hs,
                d,
                weight: Weight::Packed(&weight),
                vocab,
            };
            tensor(forward(head, &targets))
        }

        fn fast_packed_head_cross_entropy_backward(
            h: FloatTensor<Flex>,
            weight: PackedWeight,
            targets: Arc<Targets>,
            lse: FloatTensor<Flex>,
            grad: FloatTensor<Flex>,
        ) -> FloatTensor<Flex> {
            if !f32_2d(&[&h]) || lse.dtype() != DType::F32 {
                let w = dequantized::<Flex>(&weight, &h.device());
                return composed::backward::<Flex>(h, w, &targets, lse, grad, false);
            }
            let [_, d] = h.layout().shape().dims::<2>();
            let (h, lse, grad) = (contiguous(h), contiguous(lse), loss_grad(grad));
            let hs = h.as_slice::<f32>().expect("contiguous f32");
            let ls = lse.as_slice::<f32>().expect("contiguous f32");
            let vocab = weight.shape()[0];
            let head = Head {
                h: hs,
                d,
                weight: Weight::Packed(&weight),
                vocab,
            };
            tensor(backward(head, &targets, ls, grad, false))
        }
    }
}
