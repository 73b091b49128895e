//! Drop-and-grow plans of one layer (spec §3.5, §3.6), on the host: which slots change and to
//! which flat indices. Ties are broken towards lower positions and lower flat indices, so a
//! plan is deterministic.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rayon::prelude::*;

/// RigL's candidate statistics of one layer over a collection window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Candidates {
    /// Candidate flat indices (PyTorch `[out, in]` row-major), sorted.
    pub indices: Vec<u64>,
    /// `Σ g` per candidate.
    pub sum: Vec<f32>,
    /// `Σ g²` per candidate.
    pub sum_sq: Vec<f32>,
    /// Gradients accumulated (one per optimizer step).
    pub count: usize,
}

impl Candidates {
    /// The pool of the first gradient of a window: the top-`k` of `|dW|` (flat, row-major,
    /// `[out, in]`), with its first sample.
    pub fn from_dense(grad: &[f32], k: usize) -> Self {
        let mut order: Vec<u64> = top_k(
            k,
            (0..grad.len() as u64).map(|i| {
                let g = grad[i as usize];
                (if g.is_nan() { 0.0 } else { g.abs() }, i)
            }),
        );
        order.sort_unstable();
        let sum: Vec<f32> = order.iter().map(|&i| grad[i as usize]).collect();
        let sum_sq = sum.iter().map(|g| g * g).collect();
        Self {
            indices: order,
            sum,
            sum_sq,
            count: 1,
        }
    }

    /// Add one gradient sampled at the candidates (in their order).
    ///
    /// # Panics
    /// If the length differs.
    pub fn add(&mut self, grad: &[f32]) {
        assert_eq!(grad.len(), self.indices.len(), "candidate gradient length");
        for (i, g) in grad.iter().enumerate() {
            self.sum[i] += g;
            self.sum_sq[i] += g * g;
        }
        self.count += 1;
    }
}

/// One slot that changes: position `slot` (in the current order) gets flat index `index`;
/// `candidate` is the position of `index` in the RigL pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// Position in the current index array.
    pub slot: usize,
    /// The incoming flat index.
    pub index: u64,
    /// Its position in [`Candidates`] (RigL only).
    pub candidate: Option<usize>,
}

#[derive(PartialEq)]
struct Scored(f32, u64);

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    /// Greater = better: higher score, then lower index.
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .total_cmp(&other.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}

/// The `k` best `(score, index)` pairs (higher score, then lower index), best first, with
/// O(k) memory whatever the length of `items`.
fn top_k(k: usize, items: impl Iterator<Item = (f32, u64)>) -> Vec<u64> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(k + 1);
    for (s, i) in items {
        let item = Scored(s, i);
        if heap.len() < k {
            heap.push(Reverse(item));
        } else if heap.peek().is_some_and(|Reverse(worst)| item > *worst) {
            heap.pop();
            heap.push(Reverse(item));
        }
    }
    let mut out: Vec<Scored> = heap.into_iter().map(|Reverse(s)| s).collect();
    out.sort_unstable_by(|a, b| b.cmp(a));
    out.into_iter().map(|s| s.1).collect()
}

/// Keeps the `n` best of `items` (in [`Scored`]'s order, a total one), in no particular order:
/// a selection, not a sort.
fn keep_best(items: &mut Vec<Scored>, n: usize) {
    if items.len() > n {
        if n == 0 {
            items.clear();
            return;
        }
        items.select_nth_unstable_by(n - 1, |a, b| b.cmp(a));
        items.truncate(n);
    }
}

/// The `n` positions of the smallest `|values|` (ties: lower position first), smallest first:
/// a selection of the `n`, then a sort of those only.
pub fn smallest(values: &[f32], n: usize) -> Vec<usize> {
    let n = n.min(values.len());
    let order_of =
        |&a: &usize, &b: &usize| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b));
    let mut order: Vec<usize> = (0..values.len()).collect();
    if n == 0 {
        return Vec::new();
    }
    if n < order.len() {
        order.select_nth_unstable_by(n - 1, order_of);
        order.truncate(n);
    }
    order.sort_unstable_by(order_of);
    order
}

/// Whether `x` is in the ascending slice `sorted`.
fn contains(sorted: &[u64], x: u64) -> bool {
    sorted.binary_search(&x).is_ok()
}

/// `v` sorted ascending (a copy).
fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

/// RigL with proportion `p`: drop the `int(k·p)` smallest `|values|`, regrow the candidates
/// with the largest `|Σg|` that are not among the remaining indices; an outgoing index that is
/// regrown keeps its slot (value and optimizer state), so at most `int(k·p)` slots change.
pub fn rigl_plan(indices: &[u64], values: &[f32], pool: &Candidates, p: f64) -> Vec<Replacement> {
    let k = indices.len();
    let n_out = ((k as f64) * p) as usize;
    let changing = smallest(values, n_out.min(k));
    let outgoing = sorted(changing.iter().map(|&s| indices[s]).collect());
    let current = sorted(indices.to_vec());
    let valid = pool
        .indices
        .iter()
        .enumerate()
        .filter(|&(_, &i)| !contains(&current, i) || contains(&outgoing, i))
        .map(|(j, &i)| (pool.sum[j].abs(), i));
    let incoming = top_k(changing.len(), valid);
    let incoming_set = sorted(incoming.clone());
    let fresh: Vec<u64> = incoming
        .into_iter()
        .filter(|&i| !contains(&outgoing, i))
        .collect();
    changing
        .into_iter()
        .filter(|&s| !contains(&incoming_set, indices[s]))
        .zip(fresh)
        .map(|(slot, index)| Replacement {
            slot,
            index,
            candidate: pool.indices.binary_search(&index).ok(),
        })
        .collect()
}

/// SM3 growth with proportion `p`: drop the `int(k·p)` smallest `|values|`, grow the inactive
/// positions (outgoing ones excluded) with the largest `row_acc[r] · col_acc[c]`. The scores
/// are made a block of rows at a time (rayon over blocks), each block keeping its best
/// `int(k·p)` by selection; the blocks' survivors are merged the same way. The order is total
/// (ties: lower flat index), so the plan does not depend on the thread count.
pub fn sm3_plan(
    indices: &[u64],
    values: &[f32],
    row_acc: &[f32],
    col_acc: &[f32],
    p: f64,
) -> Vec<Replacement> {
    let k = indices.len();
    let n_out = ((k as f64) * p) as usize;
    let changing = smallest(values, n_out.min(k));
    let n = changing.len();
    let active = sorted(indices.to_vec());
    let cols = col_acc.len();
    // Rows per block: about 64 Ki positions.
    let rows = (65_536 / cols.max(1)).max(1);
    let mut best = row_acc
        .par_chunks(rows)
        .enumerate()
        .map(|(b, block)| {
            let first = (b * rows * cols) as u64;
            // The active indices inside the block, walked in step with the positions.
            let from = active.partition_point(|&i| i < first);
            let mut next = active[from..].iter().copied().peekable();
            let mut items = Vec::with_capacity(block.len() * cols);
            for (r, &ra) in block.iter().enumerate() {
                for (c, &ca) in col_acc.iter().enumerate() {
                    let i = first + (r * cols + c) as u64;
                    if next.next_if_eq(&i).is_none() {
                        items.push(Scored(ra * ca, i));
                    }
                }
            }
            keep_best(&mut items, n);
            items
        })
        .reduce(Vec::new, |mut a, b| {
            a.extend(b);
            keep_best(&mut a, n);
            a
        });
    best.sort_unstable_by(|a, b| b.cmp(a));
    let incoming = best.into_iter().map(|s| s.1);
    changing
        .into_iter()
        .zip(incoming)
        .map(|(slot, index)| Replacement {
            slot,
            index,
            candidate: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_prefers_high_scores_then_low_indices() {
        let got = top_k(
            3,
            [(1.0, 5), (3.0, 2), (1.0, 1), (3.0, 9), (0.5, 0)].into_iter(),
        );
        assert_eq!(got, vec![2, 9, 1]);
    }

    #[test]
    fn rigl_keeps_regrown_outgoing_slots_and_skips_remaining_indices() {
        // k = 4, p = 0.5: slots 1 and 3 (|v| 0.1, 0.2) go out: indices 11 and 13.
        let indices = [10, 11, 12, 13];
        let values = [0.9, 0.1, -0.8, 0.2];
        let pool = Candidates {
            indices: vec![10, 11, 20, 21],
            sum: vec![9.0, 5.0, 4.0, 1.0],
            sum_sq: vec![0.0; 4],
            count: 1,
        };
        // valid = {11, 20, 21} (10 remains); top-2 by |Σg| = {11, 20}; 11 was outgoing, so its
        // slot (1) stays; slot 3 gets 20.
        let plan = rigl_plan(&indices, &values, &pool, 0.5);
        assert_eq!(
            plan,
            vec![Replacement {
                slot: 3,
                index: 20,
                candidate: Some(2)
            }]
        );
    }

    /// A tiny deterministic generator for the tests below.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// `smallest` and `sm3_plan` (selection by blocks, in parallel) against full sorts of
    /// everything, with many ties (values and accumulators from a few levels), at sizes that
    /// make one block and many (the last partial).
    #[test]
    fn selections_equal_full_sorts() {
        let mut seed = 7;
        for (rows, cols, k, p) in [(3, 5, 4, 0.5), (40, 33, 200, 0.3), (300, 700, 9000, 0.25)] {
            let values: Vec<f32> = (0..k).map(|_| (lcg(&mut seed) % 7) as f32 - 3.0).collect();
            let mut all: Vec<usize> = (0..k).collect();
            all.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b)));
            let n_out = ((k as f64) * p) as usize;
            assert_eq!(smallest(&values, n_out), all[..n_out].to_vec());
            assert_eq!(smallest(&values, k + 3), all);
            assert!(smallest(&values, 0).is_empty());

            let mut indices: Vec<u64> = Vec::new();
            while indices.len() < k {
                let i = lcg(&mut seed) % (rows * cols) as u64;
                if !indices.contains(&i) {
                    indices.push(i);
                }
            }
            let row_acc: Vec<f32> = (0..rows).map(|_| (lcg(&mut seed) % 5) as f32).collect();
            let col_acc: Vec<f32> = (0..cols).map(|_| (lcg(&mut seed) % 4) as f32).collect();
            let plan = sm3_plan(&indices, &values, &row_acc, &col_acc, p);
            let mut free: Vec<(f32, u64)> = (0..(rows * cols) as u64)
                .filter(|i| !indices.contains(i))
                .map(|i| {
                    let (r, c) = (i as usize / cols, i as usize % cols);
                    (row_acc[r] * col_acc[c], i)
                })
                .collect();
            free.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let want: Vec<(usize, u64)> = all[..n_out]
                .iter()
                .zip(&free)
                .map(|(&slot, &(_, i))| (slot, i))
                .collect();
            let got: Vec<(usize, u64)> = plan.iter().map(|r| (r.slot, r.index)).collect();
            assert_eq!(got, want, "{rows} x {cols}, k {k}");
        }
    }

    #[test]
    fn sm3_grows_the_largest_outer_products_among_inactive_positions() {
        // 2x3, active {0, 4}; row = [1, 2], col = [3, 1, 2]: scores of inactive
        // 1:1, 2:2, 3:6, 5:4.
        let plan = sm3_plan(&[0, 4], &[0.5, 0.1], &[1.0, 2.0], &[3.0, 1.0, 2.0], 1.0);
        assert_eq!(
            plan.iter().map(|r| (r.slot, r.index)).collect::<Vec<_>>(),
            vec![(1, 3), (0, 5)]
        );
    }
}
