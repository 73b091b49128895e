//! [`SelectionSchedule`]: when statistics are collected and when reselections happen, and at
//! which rate (spec §3.4, with its off-by-one windows fixed).

use crate::config::{RatePolicy, SftConfig};

/// The selector's timing over update steps `u = 1, 2, …` (the `u`-th optimizer step; the
/// peft-core step index is `u − 1`).
///
/// With `R = reselection_steps`, `S = selection_accumulation_steps`, `T = total_steps`:
/// - RigL statistics are collected during the steps `jR + 1 ..= jR + S` (`j ≥ 0`), and a
///   reselection follows step `jR + S` if it is `≤ T`. Selections therefore happen at the
///   reference's steps (`S, R + S, 2R + S, …`).
/// - The reference collects `S` steps in the first window but `S + 1` in later ones (it opens
///   a window when `(t + 1) % R == 0`); here every window has exactly `S` steps.
/// - The reference leaves its gradient hooks on when a window ends after `T`; here such a
///   window is never opened.
/// - As the reference: under the linear policy the first selection changes every slot
///   (`p = 1`) and later ones `r0 · (1 − u/T)`; under the cosine policy every selection,
///   the first included, uses `r0 · (1 + cos(π u/T)) / 2`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelectionSchedule {
    /// `R`.
    pub reselection_steps: usize,
    /// `S`, `1 ≤ S < R`.
    pub accumulation_steps: usize,
    /// `T`, the number of update steps of the run.
    pub total_steps: usize,
    /// The decay of the rate.
    pub policy: RatePolicy,
    /// `r0`.
    pub initial_rate: f64,
}

impl SelectionSchedule {
    /// The schedule of `config` for a run of `total_steps` update steps.
    pub fn new(config: &SftConfig, total_steps: usize) -> Self {
        Self {
            reselection_steps: config.reselection_steps,
            accumulation_steps: config.selection_accumulation_steps,
            total_steps,
            policy: config.reselection_rate_policy,
            initial_rate: config.initial_reselection_rate,
        }
    }

    /// Whether the gradients of update step `u` feed the RigL statistics.
    pub fn collects(&self, u: usize) -> bool {
        if u == 0 {
            return false;
        }
        let (r, s) = (self.reselection_steps, self.accumulation_steps);
        let window = (u - 1) / r;
        (u - 1) % r < s && window * r + s <= self.total_steps
    }

    /// Whether update step `u` opens a collection window.
    pub fn opens_window(&self, u: usize) -> bool {
        self.collects(u) && (u - 1).is_multiple_of(self.reselection_steps)
    }

    /// The proportion of slots to change after update step `u`, if a reselection follows it.
    pub fn selection(&self, u: usize) -> Option<f64> {
        let (r, s) = (self.reselection_steps, self.accumulation_steps);
        if u < s || u % r != s || u > self.total_steps {
            return None;
        }
        Some(if u == s && self.policy == RatePolicy::Linear {
            1.0
        } else {
            self.rate(u)
        })
    }

    /// The decayed rate at update step `u`.
    pub fn rate(&self, u: usize) -> f64 {
        let frac = u as f64 / self.total_steps.max(1) as f64;
        match self.policy {
            RatePolicy::Linear => self.initial_rate * (1.0 - frac),
            RatePolicy::Cosine => {
                self.initial_rate * (1.0 + (std::f64::consts::PI * frac).cos()) / 2.0
            }
        }
    }

    /// Every reselection of the run: `(u, proportion)`.
    pub fn selections(&self) -> Vec<(usize, f64)> {
        (1..=self.total_steps)
            .filter_map(|u| self.selection(u).map(|p| (u, p)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(policy: RatePolicy) -> SelectionSchedule {
        SelectionSchedule {
            reselection_steps: 20,
            accumulation_steps: 5,
            total_steps: 100,
            policy,
            initial_rate: 0.2,
        }
    }

    #[test]
    fn selections_follow_the_reference_steps_and_rates() {
        let s = schedule(RatePolicy::Linear);
        let got = s.selections();
        let steps: Vec<usize> = got.iter().map(|(u, _)| *u).collect();
        assert_eq!(steps, vec![5, 25, 45, 65, 85]);
        let rates: Vec<f64> = got.iter().map(|(_, p)| *p).collect();
        for (a, b) in rates.iter().zip([1.0, 0.15, 0.11, 0.07, 0.03]) {
            assert!((a - b).abs() < 1e-12, "{rates:?}");
        }
        // Cosine: the first selection too follows the curve (reference commit f561024).
        let c = schedule(RatePolicy::Cosine).selections();
        let first = 0.2 * (1.0 + (std::f64::consts::PI * 0.05).cos()) / 2.0;
        assert_eq!(c[0].0, 5);
        assert!((c[0].1 - first).abs() < 1e-12, "{c:?}");
        let expect = 0.2 * (1.0 + (std::f64::consts::PI * 0.25).cos()) / 2.0;
        assert!((c[1].1 - expect).abs() < 1e-12);
    }

    #[test]
    fn every_window_has_exactly_s_steps_and_none_ends_after_t() {
        let s = schedule(RatePolicy::Linear);
        let collected: Vec<usize> = (1..=120).filter(|&u| s.collects(u)).collect();
        let expect: Vec<usize> = [1, 21, 41, 61, 81].iter().flat_map(|&a| a..a + 5).collect();
        assert_eq!(collected, expect);
        let opens: Vec<usize> = (1..=120).filter(|&u| s.opens_window(u)).collect();
        assert_eq!(opens, vec![1, 21, 41, 61, 81]);
        // T = 43: the window 41..45 would end after T, so it is not opened.
        let short = SelectionSchedule {
            total_steps: 43,
            ..s
        };
        assert!(!short.collects(41));
        assert_eq!(
            short.selections().iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![5, 25]
        );
    }
}
