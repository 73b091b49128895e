//! The causal language-modelling loss, as Transformers' `ForCausalLMLoss` computes it.
//!
//! ```
//! use burn::tensor::{Device, Int, Tensor};
//! use peft_models::loss::{IGNORE_INDEX, causal_lm_loss};
//!
//! # fn main() -> Result<(), peft_models::ModelError> {
//! let device = Device::flex();
//! // Uniform logits over 4 tokens: every predicted label costs ln 4.
//! let logits = Tensor::<3>::zeros([1, 3, 4], &device);
//! // The label at position 0 is never predicted (shift); position 1 is masked (a prompt token).
//! let labels = Tensor::<2, Int>::from_ints([[0, IGNORE_INDEX, 2]], &device);
//! let loss = causal_lm_loss(logits, labels)?.into_scalar::<f32>();
//! assert!((loss - 4f32.ln()).abs() < 1e-6);
//! # Ok(()) }
//! ```

use burn::tensor::{Int, Tensor};
use peft_kernels::cross_entropy::{HeadWeight, Targets, head_cross_entropy};

use crate::error::{ModelError, Result};

/// The label of a position that does not count in the loss (prompt or padding tokens), as in
/// PyTorch's `cross_entropy` and Transformers.
pub const IGNORE_INDEX: i64 = -100;

/// The shifted next-token cross-entropy: position `t` of `logits` predicts `labels[t + 1]`
/// (`logits[:, :-1]` against `labels[:, 1:]`), averaged over the labels that are not
/// [`IGNORE_INDEX`]. The log-softmax is computed stably (log-sum-exp after subtracting each
/// row's maximum), and the result is differentiable with respect to `logits`.
///
/// # Shapes
/// * `logits`: `[batch, seq, vocab]`
/// * `labels`: `[batch, seq]` (usually the input ids with prompt and padding set to
///   [`IGNORE_INDEX`])
///
/// # Returns
/// The mean loss, `[1]`.
///
/// # Errors
/// [`ModelError::InvalidInput`] for mismatched shapes or when no label is counted (every
/// shifted label ignored: PyTorch returns NaN there); [`ModelError::TokenOutOfVocab`] for a
/// label outside `0..vocab` other than [`IGNORE_INDEX`].
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Result<Tensor<1>> {
    let [batch, seq, vocab] = logits.dims();
    let counted = shifted_targets(&labels, [batch, seq], vocab)?.counted();
    let n = batch * (seq - 1);
    let shifted = labels.narrow(1, 1, seq - 1);
    let x = logits.narrow(1, 0, seq - 1).reshape([n, vocab]);
    let targets = shifted.reshape([n, 1]);
    let ignored = targets.clone().equal_elem(IGNORE_INDEX);
    let targets = targets.mask_fill(ignored.clone(), 0);
    // log p(target) = x[target] - (m + log Σ exp(x - m)), m the row maximum (a constant).
    let m = x.clone().max_dim(1).detach();
    let lse = (x.clone() - m.clone()).exp().sum_dim(1).log() + m;
    let nll = lse - x.gather(1, targets);
    let kept = ignored.bool_not().float();
    Ok((nll * kept).sum().div_scalar(counted as f64))
}

/// [`causal_lm_loss`] from the last hidden states `hidden` `[batch, seq, d]` and the LM head's
/// weight `head` (`[vocab, d]`, dense or packed), without building the logits: the head and the
/// loss run as one op ([`peft_kernels::cross_entropy::head_cross_entropy`], on flex in blocks of
/// the vocabulary; positions whose label is ignored are skipped). Equal to `causal_lm_loss` of
/// `hidden · headᵀ` up to the order of the sums.
///
/// # Errors
/// As [`causal_lm_loss`].
pub fn causal_lm_loss_from_hidden(
    hidden: Tensor<3>,
    head: HeadWeight,
    labels: Tensor<2, Int>,
) -> Result<Tensor<1>> {
    let [batch, seq, d] = hidden.dims();
    let [vocab, _] = head.shape();
    let targets = shifted_targets(&labels, [batch, seq], vocab)?;
    Ok(head_cross_entropy(
        hidden.reshape([batch * seq, d]),
        head,
        targets,
    ))
}

/// The target of every position of `labels` `[batch, seq]`: the next position's label, and
/// [`IGNORE_INDEX`] for each row's last position and for ignored labels.
fn shifted_targets(
    labels: &Tensor<2, Int>,
    [batch, seq]: [usize; 2],
    vocab: usize,
) -> Result<Targets> {
    if labels.dims() != [batch, seq] {
        return Err(ModelError::InvalidInput {
            field: "labels".into(),
            reason: format!(
                "shape {:?} does not match the logits' [batch, seq] = {:?}",
                labels.dims(),
                [batch, seq]
            ),
        });
    }
    let labels: Vec<i64> = labels.to_data().iter::<i64>().collect();
    let mut ids = Vec::with_capacity(batch * seq);
    for row in labels.chunks_exact(seq.max(1)) {
        for t in 0..seq {
            let label = row.get(t + 1).copied().unwrap_or(IGNORE_INDEX);
            if label != IGNORE_INDEX && (label < 0 || label as usize >= vocab) {
                return Err(ModelError::TokenOutOfVocab {
                    id: label,
                    vocab_size: vocab,
                });
            }
            ids.push(label);
        }
    }
    let targets = Targets::new(ids);
    if targets.counted() == 0 {
        return Err(ModelError::InvalidInput {
            field: "labels".into(),
            reason: "every shifted label is the ignore index; there is nothing to predict".into(),
        });
    }
    Ok(targets)
}
