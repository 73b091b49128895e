//! ID3's unmasking schedule: how many entries step `t` unmasks.
//!
//! With an effective budget `B` (the budget minus the entries trained in full) spread over `T`
//! steps, step `t` (0-based) unmasks `u(t) = B / T + [t < B % T]`, so `Σ_{t<T} u(t) = B` and
//! `u(t) = 0` for `t ≥ T`. The toolkit (0.4) never advanced `t` and kept unmasking past `T`, so
//! it exceeded its budget; here the quota of a step is the schedule's running total minus what
//! is already chosen, which can never exceed `B`.

/// The increment schedule of ID3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmaskSchedule {
    /// Entries to unmask in total (`B`).
    pub budget: usize,
    /// Steps over which they are unmasked (`T`, at least 1).
    pub max_steps: usize,
}

impl UnmaskSchedule {
    /// A schedule unmasking `budget` entries over `max_steps` steps.
    ///
    /// # Panics
    /// If `max_steps` is 0 (configurations are validated before a schedule is built).
    pub fn new(budget: usize, max_steps: usize) -> Self {
        assert!(max_steps > 0, "max_steps must be at least 1");
        Self { budget, max_steps }
    }

    /// `u(t)`: entries step `t` unmasks (0 once `t ≥ max_steps`).
    pub fn count(&self, t: usize) -> usize {
        if t >= self.max_steps {
            return 0;
        }
        self.budget / self.max_steps + usize::from(t < self.budget % self.max_steps)
    }

    /// `Σ_{s<n} u(s)`: entries unmasked by the first `n` steps.
    pub fn cumulative(&self, n: usize) -> usize {
        let m = n.min(self.max_steps);
        m * (self.budget / self.max_steps) + m.min(self.budget % self.max_steps)
    }

    /// Entries step `t` may unmask when `used` are chosen already: the schedule's total after
    /// step `t` minus `used` (a step that found fewer candidates than its share is made up
    /// later, never beyond the budget).
    pub fn quota(&self, t: usize, used: usize) -> usize {
        self.cumulative(t + 1).saturating_sub(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolkit_example_stops_at_the_budget() {
        // The toolkit's B=50, T=8 chose 7 per step and 56 after 8 steps (84 after 12).
        let s = UnmaskSchedule::new(50, 8);
        let counts: Vec<usize> = (0..12).map(|t| s.count(t)).collect();
        assert_eq!(counts, [7, 7, 6, 6, 6, 6, 6, 6, 0, 0, 0, 0]);
        assert_eq!(s.cumulative(8), 50);
        assert_eq!(s.cumulative(12), 50);
        assert_eq!(s.quota(3, 20), 6);
        assert_eq!(s.quota(3, 26), 0);
        assert_eq!(s.quota(20, 49), 1);
    }
}
