//! The SFT optimizers over one delta vector: [`SftAdamW`] and [`SftSm3`], with O(k) state
//! (plus SM3's `rows + cols` accumulators), on the host (spec §3.7).
//!
//! Neither holds a learning rate: the selector passes the step's (the one given to
//! [`Stepper::train`](peft_core::Stepper::train), so a burn LR scheduler drives the deltas too).
//!
//! They step the `k` values of one layer given their gradient. Entries are in the adapter's
//! CSR order (row-major flat index order); the selector permutes the state when a
//! reselection changes the structure.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Sparse AdamW with a per-entry step count (`age`), the reference's `SftAdamW`:
///
/// ```text
/// m = β1 m + (1 − β1) g;   v = β2 v + (1 − β2) g²
/// p -= lr · m / ((√v + ε) · (1 − β1^age) / √(1 − β2^age));   if wd: p -= lr · wd · p;   age += 1
/// ```
///
/// `age` starts at 1 and always advances (`f32`, whatever the delta dtype; the reference's stays
/// at 1 for bf16/fp16 deltas). RigL seeds the state of new slots (see
/// [`AdamState::seed`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftAdamW {
    /// β1 (0.9).
    pub beta1: f64,
    /// β2 (0.999).
    pub beta2: f64,
    /// ε (1e-8, the default the reference's trainer passes: `TrainingArguments.adam_epsilon`).
    pub eps: f64,
    /// Decoupled weight decay towards the pretrained weights (0).
    pub weight_decay: f64,
}

impl Default for SftAdamW {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// The state of [`SftAdamW`] for one delta vector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdamState {
    /// First moments, `[k]`.
    pub exp_avg: Vec<f32>,
    /// Second moments, `[k]`.
    pub exp_avg_sq: Vec<f32>,
    /// Per-entry step counts, `[k]` (1 for a fresh entry).
    pub age: Vec<f32>,
}

impl AdamState {
    /// Fresh state for `k` entries.
    pub fn new(k: usize) -> Self {
        Self {
            exp_avg: vec![0.0; k],
            exp_avg_sq: vec![0.0; k],
            age: vec![1.0; k],
        }
    }

    /// The reference's state for a slot grown by RigL from `count` accumulated gradients
    /// (one per backward pass) with sums `sum` and `sum_sq`, in a run of `grad_accum`
    /// micro-batches per optimizer step: with `a = c / grad_accum` (the candidate's age in
    /// optimizer steps), `m = (Σg/c)(1 − β1^a)`, `v = (Σg²/c)(1 − β2^a)`, `age = a`. With
    /// `count = 0`, fresh state.
    pub fn seed(
        optim: &SftAdamW,
        sum: f32,
        sum_sq: f32,
        count: usize,
        grad_accum: usize,
    ) -> (f32, f32, f32) {
        if count == 0 {
            return (0.0, 0.0, 1.0);
        }
        let c = count as f64;
        let a = c / grad_accum.max(1) as f64;
        (
            (f64::from(sum) / c * (1.0 - optim.beta1.powf(a))) as f32,
            (f64::from(sum_sq) / c * (1.0 - optim.beta2.powf(a))) as f32,
            a as f32,
        )
    }
}

impl SftAdamW {
    /// One update of `values` with `grads` at learning rate `lr`.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn step(&self, lr: f64, values: &mut [f32], grads: &[f32], state: &mut AdamState) {
        let k = values.len();
        assert!(
            grads.len() == k && state.exp_avg.len() == k && state.age.len() == k,
            "SftAdamW: {k} values, {} gradients, state of {}",
            grads.len(),
            state.exp_avg.len()
        );
        let (b1, b2) = (self.beta1, self.beta2);
        // Rayon over blocks of entries; the bias corrections depend on the age alone, which
        // most entries share (only regrown ones differ), so each block keeps the last age's
        // pair instead of two `powf` per entry.
        const BLOCK: usize = 16_384;
        (
            values.par_chunks_mut(BLOCK),
            grads.par_chunks(BLOCK),
            state.exp_avg.par_chunks_mut(BLOCK),
            state.exp_avg_sq.par_chunks_mut(BLOCK),
            state.age.par_chunks_mut(BLOCK),
        )
            .into_par_iter()
            .for_each(|(values, grads, exp_avg, exp_avg_sq, ages)| {
                let mut corrections = (f32::NAN, 0.0, 0.0);
                for i in 0..values.len() {
                    let g = f64::from(grads[i]);
                    let m = b1 * f64::from(exp_avg[i]) + (1.0 - b1) * g;
                    let v = b2 * f64::from(exp_avg_sq[i]) + (1.0 - b2) * g * g;
                    if ages[i] != corrections.0 {
                        let age = f64::from(ages[i]);
                        corrections = (ages[i], 1.0 - b1.powf(age), (1.0 - b2.powf(age)).sqrt());
                    }
                    let (_, c1, c2) = corrections;
                    let denom = (v.sqrt() + self.eps) * c1 / c2;
                    let mut p = f64::from(values[i]) - lr * m / denom;
                    if self.weight_decay != 0.0 {
                        p -= lr * self.weight_decay * p;
                    }
                    values[i] = p as f32;
                    exp_avg[i] = m as f32;
                    exp_avg_sq[i] = v as f32;
                    ages[i] += 1.0;
                }
            });
    }
}

/// Sparse SM3 (the reference's `SftSM3`) for a 2-D delta with entries at `(r, c)`:
///
/// ```text
/// ν = min(row_acc[r], col_acc[c]) + g²
/// row_acc[r] = max(row_acc[r], max ν over row r);   col_acc[c] likewise
/// u = g · (ν + ε)^(-1/2);   if μ > 0: u = (1 − μ) u + μ u_prev;   p -= lr · u;   if wd: p -= lr · wd · p
/// ```
///
/// The accumulators (`rows` and `cols` values) are monotone non-decreasing; the momentum
/// buffer (only with `μ > 0`) is `[k]`. With `row_cover_only`, as the reference, only the row
/// accumulators are kept: `ν = row_acc[r] + g²`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SftSm3 {
    /// μ (0).
    pub momentum: f64,
    /// ε (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0).
    pub weight_decay: f64,
    /// Row accumulators only (the reference's `row_cover_only`, false).
    #[serde(default)]
    pub row_cover_only: bool,
}

impl Default for SftSm3 {
    fn default() -> Self {
        Self {
            momentum: 0.0,
            eps: 1e-8,
            weight_decay: 0.0,
            row_cover_only: false,
        }
    }
}

/// The state of [`SftSm3`] for one delta.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sm3State {
    /// Row accumulators, `[rows]` (PyTorch orientation: output features).
    pub row_acc: Vec<f32>,
    /// Column accumulators, `[cols]` (input features).
    pub col_acc: Vec<f32>,
    /// The previous update, `[k]` (empty without momentum).
    pub momentum: Vec<f32>,
}

impl Sm3State {
    /// Fresh state for a `[rows, cols]` weight with `k` deltas.
    pub fn new(rows: usize, cols: usize, k: usize, with_momentum: bool) -> Self {
        Self {
            row_acc: vec![0.0; rows],
            col_acc: vec![0.0; cols],
            momentum: if with_momentum {
                vec![0.0; k]
            } else {
                Vec::new()
            },
        }
    }
}

impl SftSm3 {
    /// One update of `values` (entries at `(rows[i], cols[i])`) with `grads` at `lr`.
    ///
    /// # Panics
    /// If the lengths differ or an entry is outside the accumulators.
    pub fn step(
        &self,
        lr: f64,
        values: &mut [f32],
        grads: &[f32],
        rows: &[u32],
        cols: &[u32],
        state: &mut Sm3State,
    ) {
        let k = values.len();
        assert!(
            grads.len() == k && rows.len() == k && cols.len() == k,
            "SftSm3: {k} values, {} gradients, {} positions",
            grads.len(),
            rows.len()
        );
        let nu: Vec<f32> = (0..k)
            .map(|i| {
                let (r, c) = (rows[i] as usize, cols[i] as usize);
                let acc = if self.row_cover_only {
                    state.row_acc[r]
                } else {
                    state.row_acc[r].min(state.col_acc[c])
                };
                acc + grads[i] * grads[i]
            })
            .collect();
        for i in 0..k {
            let (r, c) = (rows[i] as usize, cols[i] as usize);
            state.row_acc[r] = state.row_acc[r].max(nu[i]);
            if !self.row_cover_only {
                state.col_acc[c] = state.col_acc[c].max(nu[i]);
            }
        }
        let momentum = self.momentum > 0.0;
        if momentum && state.momentum.len() != k {
            state.momentum = vec![0.0; k];
        }
        for i in 0..k {
            let mut u = f64::from(grads[i]) / (f64::from(nu[i]) + self.eps).sqrt();
            if momentum {
                u = (1.0 - self.momentum) * u + self.momentum * f64::from(state.momentum[i]);
                state.momentum[i] = u as f32;
            }
            let mut p = f64::from(values[i]) - lr * u;
            if self.weight_decay != 0.0 {
                p -= lr * self.weight_decay * p;
            }
            values[i] = p as f32;
        }
    }
}

/// The optimizer of the deltas (chosen by the selection algorithm, as the reference's
/// `SftTrainer` does).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SftOptimizer {
    /// For RigL selection.
    AdamW(SftAdamW),
    /// For SM3 selection.
    Sm3(SftSm3),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm3_row_cover_only_keeps_row_accumulators_alone() {
        // idx {0, 1, 5} in a 3x4 weight, g = (1, 2, 3): rows 0, 0, 1.
        let o = SftSm3 {
            row_cover_only: true,
            ..SftSm3::default()
        };
        let mut state = Sm3State::new(3, 4, 3, false);
        let mut values = vec![0.0; 3];
        o.step(
            1.0,
            &mut values,
            &[1.0, 2.0, 3.0],
            &[0, 0, 1],
            &[0, 1, 1],
            &mut state,
        );
        assert_eq!(state.row_acc, vec![4.0, 9.0, 0.0]);
        assert_eq!(state.col_acc, vec![0.0; 4], "no column accumulators");
        // ν = row_acc (0 before the step) + g²: u = g / |g| = 1 for every entry.
        for v in &values {
            assert!((v + 1.0).abs() < 1e-6, "{values:?}");
        }
        // The second step reads the row accumulator alone (min with a column would give 0 + g²).
        o.step(
            1.0,
            &mut values,
            &[1.0, 1.0, 1.0],
            &[0, 0, 1],
            &[0, 1, 1],
            &mut state,
        );
        let want = -1.0 - 1.0 / 5.0f32.sqrt();
        assert!((values[0] - want).abs() < 1e-6, "{values:?}");
    }

    #[test]
    fn sm3_accumulators_match_the_verified_example() {
        // idx {0, 5, 7} in a 3x4 weight, g = (1, 2, 3): row = [1, 9, 0], col = [1, 4, 0, 9].
        let mut state = Sm3State::new(3, 4, 3, false);
        let mut values = vec![0.0; 3];
        SftSm3::default().step(
            0.1,
            &mut values,
            &[1.0, 2.0, 3.0],
            &[0, 1, 1],
            &[0, 1, 3],
            &mut state,
        );
        assert_eq!(state.row_acc, vec![1.0, 9.0, 0.0]);
        assert_eq!(state.col_acc, vec![1.0, 4.0, 0.0, 9.0]);
        // u = g / sqrt(g² + ε) ≈ sign(g): each value moves by about -lr.
        for v in values {
            assert!((v + 0.1).abs() < 1e-6, "{v}");
        }
    }

    #[test]
    fn adamw_age_advances_and_the_first_step_is_lr_sign_g() {
        let o = SftAdamW::default();
        let mut state = AdamState::new(2);
        let mut values = vec![0.5, -0.5];
        o.step(0.01, &mut values, &[2.0, -3.0], &mut state);
        assert_eq!(state.age, vec![2.0, 2.0]);
        // Bias-corrected first step: m̂/√v̂ = sign(g) (up to ε).
        assert!((values[0] - 0.49).abs() < 1e-5 && (values[1] + 0.49).abs() < 1e-5);
        let (m, v, a) = AdamState::seed(&o, 4.0, 10.0, 2, 1);
        assert!((m - 2.0 * (1.0 - 0.81)).abs() < 1e-6);
        assert!((v - 5.0 * (1.0 - 0.999f32 * 0.999)).abs() < 1e-6);
        assert_eq!(a, 2.0);
        // Four samples over two micro-batches per step: age 2, means over the four samples.
        let (m, v, a) = AdamState::seed(&o, 8.0, 20.0, 4, 2);
        assert!((m - 2.0 * (1.0 - 0.81)).abs() < 1e-6);
        assert!((v - 5.0 * (1.0 - 0.999f32 * 0.999)).abs() < 1e-6);
        assert_eq!(a, 2.0);
    }
}
