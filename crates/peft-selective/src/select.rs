//! Global top-`u` selection across parameters with deterministic tie-breaking.
//!
//! Every candidate parameter contributes a flat score tensor; entries that must not be chosen
//! (already chosen, or a NaN score) hold `-inf`. The `u` highest scores over all parameters are
//! chosen: every entry strictly above the cutoff (the `u`-th highest score), then entries equal to
//! the cutoff in parameter order, then row-major order, until `u` are chosen. Only `O(u)` values
//! per parameter are read back to the host, plus the positions of entries tied at the cutoff.

use burn::tensor::{Int, Tensor};

/// The `u` highest-scoring entries over `scores` (tracked index, flat scores), as sorted flat
/// indices per tracked index, in the order of `scores`. Fewer than `u` are returned only when
/// fewer entries have a finite or `+inf` score.
pub(crate) fn global_top(scores: Vec<(usize, Tensor<1>)>, u: usize) -> Vec<(usize, Vec<i64>)> {
    if u == 0 || scores.is_empty() {
        return Vec::new();
    }
    let scores: Vec<(usize, Tensor<1>)> = scores
        .into_iter()
        .map(|(i, s)| {
            let nan = s.clone().is_nan();
            (i, s.mask_fill(nan, f32::NEG_INFINITY))
        })
        .collect();
    let mut pool: Vec<f32> = Vec::new();
    for (_, s) in &scores {
        let k = u.min(s.dims()[0]);
        if k == 0 {
            continue;
        }
        let top = s.clone().topk(k, 0).into_data();
        pool.extend(
            top.iter::<f32>()
                .filter(|v| *v != f32::NEG_INFINITY && !v.is_nan()),
        );
    }
    if pool.is_empty() {
        return Vec::new();
    }
    pool.sort_unstable_by(|a, b| b.total_cmp(a));
    let take = u.min(pool.len());
    let cutoff = pool[take - 1];
    let mut chosen: Vec<Vec<i64>> = scores
        .iter()
        .map(|(_, s)| positions(s.clone().greater_elem(cutoff)))
        .collect();
    let mut remaining = take - chosen.iter().map(Vec::len).sum::<usize>();
    for ((_, s), set) in scores.iter().zip(&mut chosen) {
        if remaining == 0 {
            break;
        }
        let ties = positions(s.clone().equal_elem(cutoff));
        let n = ties.len().min(remaining);
        set.extend_from_slice(&ties[..n]);
        set.sort_unstable();
        remaining -= n;
    }
    scores
        .iter()
        .zip(chosen)
        .filter(|(_, set)| !set.is_empty())
        .map(|((i, _), set)| (*i, set))
        .collect()
}

/// Row-major positions of the `true` entries of a flat mask.
pub(crate) fn positions(mask: Tensor<1, burn::tensor::Bool>) -> Vec<i64> {
    let found: Tensor<2, Int> = mask.argwhere();
    found.into_data().iter::<i64>().collect()
}
