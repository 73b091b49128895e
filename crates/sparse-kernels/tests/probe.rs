//! `grad_topk_probe`: zero forward, a top-`k` of `|dYᵀ·x|` equal to a dense reference for every
//! block size, the accumulation rule of a sink, and no effect on the other gradients.

mod common;

use burn::tensor::{Device, Tensor};
use common::*;
use sparse_kernels::{ProbeResult, ProbeSink, default_probe_block, grad_topk_probe};

fn device() -> Device {
    Device::flex().autodiff()
}

/// Small integers in `[-3, 3]`: every product sum is exact in f32 and ties are frequent.
fn ints(rng: &mut Lcg, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.next_u32() % 7) as f32 - 3.0).collect()
}

/// `dW = dYᵀ · x`, `[out, in]` row-major.
fn dense_dw(x: &[f32], dy: &[f32], tokens: usize, inp: usize, out: usize) -> Vec<f32> {
    matmul(&transpose(dy, tokens, out), x, out, tokens, inp).f32()
}

/// The reference pool: sort by `|g|` descending then index ascending, keep `k`, sort by index.
fn reference(dw: &[f32], k: usize) -> (Vec<u64>, Vec<f32>) {
    let mut order: Vec<usize> = (0..dw.len()).collect();
    order.sort_by(|&a, &b| dw[b].abs().total_cmp(&dw[a].abs()).then(a.cmp(&b)));
    order.truncate(k);
    order.sort_unstable();
    (
        order.iter().map(|&i| i as u64).collect(),
        order.iter().map(|&i| dw[i]).collect(),
    )
}

/// Run the probe on `x` (any layout) with upstream gradient `dy` and return its result; checks
/// on the way that the forward is zeros and the anchor's gradient is zero.
fn run(x: Tensor<2>, dy: &[f32], out: usize, k: usize, block: usize) -> ProbeResult {
    let sink = ProbeSink::new();
    fire(&sink, x, dy, out, k, block);
    sink.take().expect("the backward pass reached the sink")
}

fn fire(sink: &ProbeSink, x: Tensor<2>, dy: &[f32], out: usize, k: usize, block: usize) {
    let d = x.device();
    let tokens = x.dims()[0];
    let anchor = Tensor::<1>::zeros([1], &d).require_grad();
    let y = grad_topk_probe(x, anchor.clone(), out, k, block, sink);
    assert_eq!(y.dims(), [tokens, out]);
    assert!(read(y.clone()).iter().all(|&v| v == 0.0), "forward is zero");
    let grads = (y * t2(dy, [tokens, out], &d)).sum().backward();
    assert_eq!(
        read(anchor.grad(&grads).unwrap()),
        vec![0.0],
        "anchor gradient"
    );
}

#[test]
fn forward_is_zeros_and_sends_nothing_without_autodiff() {
    let mut rng = Lcg::new(1);
    let x_data = rng.vec(4 * 3);
    for d in [Device::flex(), device()] {
        let sink = ProbeSink::new();
        let x = t2(&x_data, [4, 3], &d);
        // An anchor that does not require a gradient: the op is not tracked.
        let y = grad_topk_probe(x, Tensor::<1>::zeros([1], &d), 5, 2, 1, &sink);
        assert_eq!(y.dims(), [4, 5]);
        assert_eq!(read(y), vec![0.0; 20]);
        assert_eq!(sink.take(), None);
    }
}

#[test]
fn top_k_matches_the_dense_reference() {
    let shapes = [
        (1, 1, 1),
        (5, 3, 4),
        (7, 6, 9),
        (3, 17, 5),
        (16, 8, 33),
        (0, 4, 3),
        (4, 64, 64),
    ];
    for (seed, (tokens, inp, out)) in shapes.into_iter().enumerate() {
        let mut rng = Lcg::new(seed as u64);
        let (x, dy) = (ints(&mut rng, tokens * inp), ints(&mut rng, tokens * out));
        let dw = dense_dw(&x, &dy, tokens, inp, out);
        let n = inp * out;
        for k in [0, 1, 3, inp + 1, n / 2, n.saturating_sub(1), n, n + 5] {
            let (want_idx, want_val) = reference(&dw, k.min(n));
            for block in [1, 2, 3, out, out + 4, default_probe_block(inp)] {
                let got = run(t2(&x, [tokens, inp], &device()), &dy, out, k, block);
                let what = format!("[{tokens}, {inp}] -> {out}, k = {k}, block = {block}");
                assert_eq!(got.indices, want_idx, "{what}: indices");
                assert_eq!(got.sum, want_val, "{what}: values");
                let sq: Vec<f32> = want_val.iter().map(|g| g * g).collect();
                assert_eq!(got.sum_sq, sq, "{what}: squares");
                assert_eq!(got.count, 1, "{what}: count");
            }
        }
    }
}

#[test]
fn ties_go_to_the_lower_index() {
    // |dW| = 1 everywhere with alternating signs: the pool is the first k indices.
    let (tokens, inp, out) = (1, 5, 4);
    let x: Vec<f32> = (0..inp)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let dy: Vec<f32> = (0..out)
        .map(|o| if o % 3 == 0 { -1.0 } else { 1.0 })
        .collect();
    let dw = dense_dw(&x, &dy, tokens, inp, out);
    for block in [1, 3, 10] {
        let got = run(t2(&x, [tokens, inp], &device()), &dy, out, 7, block);
        assert_eq!(got.indices, (0..7).collect::<Vec<u64>>(), "block {block}");
        assert_eq!(got.sum, dw[..7].to_vec(), "block {block}");
    }
}

#[test]
fn float_data_matches_the_dense_reference() {
    let (tokens, inp, out) = (11, 23, 19);
    let mut rng = Lcg::new(42);
    let (x, dy) = (rng.vec(tokens * inp), rng.vec(tokens * out));
    let dw = dense_dw(&x, &dy, tokens, inp, out);
    for k in [1, 40, 200] {
        let (want_idx, want_val) = reference(&dw, k);
        for block in [1, 4, 19] {
            let got = run(t2(&x, [tokens, inp], &device()), &dy, out, k, block);
            assert_eq!(got.indices, want_idx, "k = {k}, block = {block}");
            assert_close(&got.sum, &Reference::exact(&want_val), "values");
        }
    }
}

#[test]
fn later_calls_add_at_the_pool_until_taken() {
    let (tokens, inp, out) = (6, 7, 10);
    let mut rng = Lcg::new(9);
    let batches: Vec<(Vec<f32>, Vec<f32>)> = (0..3)
        .map(|_| (ints(&mut rng, tokens * inp), ints(&mut rng, tokens * out)))
        .collect();
    let dws: Vec<Vec<f32>> = batches
        .iter()
        .map(|(x, dy)| dense_dw(x, dy, tokens, inp, out))
        .collect();
    let k = 13;
    for block in [1, 3, 4, out, 100] {
        let sink = ProbeSink::new();
        // Three backward passes (micro-batches) into one sink.
        for (x, dy) in &batches {
            fire(&sink, t2(x, [tokens, inp], &device()), dy, out, k, block);
        }
        let got = sink.take().unwrap();
        let (pool, _) = reference(&dws[0], k);
        assert_eq!(got.indices, pool, "block {block}: the first call's pool");
        let at = |dw: &Vec<f32>, i: u64| dw[i as usize];
        let sum: Vec<f32> = pool
            .iter()
            .map(|&i| dws.iter().map(|dw| at(dw, i)).sum())
            .collect();
        let sum_sq: Vec<f32> = pool
            .iter()
            .map(|&i| dws.iter().map(|dw| at(dw, i) * at(dw, i)).sum())
            .collect();
        assert_eq!(got.sum, sum, "block {block}: Σg");
        assert_eq!(got.sum_sq, sum_sq, "block {block}: Σg²");
        assert_eq!(got.count, 3);
        // After a take, the next call chooses a new pool.
        assert_eq!(sink.take(), None);
        let (x, dy) = &batches[2];
        fire(&sink, t2(x, [tokens, inp], &device()), dy, out, k, block);
        assert_eq!(sink.take().unwrap().indices, reference(&dws[2], k).0);
    }
}

#[test]
fn two_calls_in_one_graph_follow_the_same_rule() {
    // A layer used twice in one forward pass: both probe terms fire in one backward pass.
    let (tokens, inp, out) = (4, 5, 6);
    let mut rng = Lcg::new(3);
    let d = device();
    let (x1, x2) = (ints(&mut rng, tokens * inp), ints(&mut rng, tokens * inp));
    let (r1, r2) = (ints(&mut rng, tokens * out), ints(&mut rng, tokens * out));
    let sink = ProbeSink::new();
    let anchor = Tensor::<1>::zeros([1], &d).require_grad();
    let y1 = grad_topk_probe(t2(&x1, [tokens, inp], &d), anchor.clone(), out, 8, 2, &sink);
    let y2 = grad_topk_probe(t2(&x2, [tokens, inp], &d), anchor.clone(), out, 8, 2, &sink);
    let loss = (y1 * t2(&r1, [tokens, out], &d)).sum() + (y2 * t2(&r2, [tokens, out], &d)).sum();
    let grads = loss.backward();
    assert_eq!(read(anchor.grad(&grads).unwrap()), vec![0.0]);
    let got = sink.take().unwrap();
    assert_eq!(got.count, 2);
    let (dw1, dw2) = (
        dense_dw(&x1, &r1, tokens, inp, out),
        dense_dw(&x2, &r2, tokens, inp, out),
    );
    // Whichever call fired first chose the pool; Σg is the total gradient there.
    let first = [&dw1, &dw2]
        .into_iter()
        .find(|dw| reference(dw, 8).0 == got.indices)
        .expect("the pool of one of the calls");
    assert_eq!(got.indices, reference(first, 8).0);
    let total: Vec<f32> = got
        .indices
        .iter()
        .map(|&i| dw1[i as usize] + dw2[i as usize])
        .collect();
    assert_eq!(got.sum, total);
}

#[test]
fn non_contiguous_inputs() {
    let (tokens, inp, out) = (9, 6, 7);
    let mut rng = Lcg::new(5);
    let (x, dy) = (ints(&mut rng, tokens * inp), ints(&mut rng, tokens * out));
    let want = reference(&dense_dw(&x, &dy, tokens, inp, out), 10);
    for layout in [Layout::Transposed, Layout::Sliced] {
        let xt = with_layout(&x, [tokens, inp], layout, &device());
        for block in [1, 4] {
            let got = run(xt.clone(), &dy, out, 10, block);
            assert_eq!((got.indices, got.sum), want.clone(), "{layout:?}, {block}");
        }
    }
}

#[test]
fn the_other_gradients_are_unchanged() {
    // loss = Σ (x·W ⊙ R)² with x and W trainable, with and without the probe term.
    let (tokens, inp, out) = (5, 4, 3);
    let mut rng = Lcg::new(8);
    let (x, w, r) = (
        rng.vec(tokens * inp),
        rng.vec(inp * out),
        rng.vec(tokens * out),
    );
    let d = device();
    let grads_of = |probe: Option<&ProbeSink>| {
        let xt = t2(&x, [tokens, inp], &d).require_grad();
        let wt = t2(&w, [inp, out], &d).require_grad();
        let mut y = xt.clone().matmul(wt.clone());
        let anchor = Tensor::<1>::zeros([1], &d).require_grad();
        if let Some(sink) = probe {
            y = y + grad_topk_probe(xt.clone(), anchor.clone(), out, 4, 1, sink);
        }
        let z = y * t2(&r, [tokens, out], &d);
        let grads = (z.clone() * z).sum().backward();
        (
            read(xt.grad(&grads).unwrap()),
            read(wt.grad(&grads).unwrap()),
            anchor.grad(&grads).map(read),
        )
    };
    let sink = ProbeSink::new();
    let (dx0, dw0, a0) = grads_of(None);
    let (dx1, dw1, a1) = grads_of(Some(&sink));
    assert_eq!(dx1, dx0, "dx");
    assert_eq!(dw1, dw0, "dW");
    assert_eq!(a0, None);
    assert_eq!(a1, Some(vec![0.0]));
    // The pool is the top-4 of |dW| in [out, in] orientation: dW_burn = xᵀ·dY, dY = 2·z⊙R.
    let y = matmul(&x, &w, tokens, inp, out).f32();
    let dy: Vec<f32> = (0..tokens * out)
        .map(|e| 2.0 * y[e] * r[e] * r[e])
        .collect();
    let got = sink.take().unwrap();
    let want = reference(&dense_dw(&x, &dy, tokens, inp, out), 4);
    assert_eq!(got.indices, want.0);
    assert_close(&got.sum, &Reference::exact(&want.1), "pool values");
    let dw_torch = transpose(&dw0, inp, out);
    let at: Vec<f32> = got.indices.iter().map(|&i| dw_torch[i as usize]).collect();
    assert_close(
        &got.sum,
        &Reference::exact(&at),
        "pool values = autodiff's dW",
    );
}

/// Ids are unique, and a backward pass for a dropped sink reaches no other sink (the dropped
/// sink's own slot is observed in `probe.rs`'s unit test).
#[test]
fn a_dropped_sink_reaches_no_other_sink_and_ids_are_unique() {
    let d = device();
    let (a, b) = (ProbeSink::new(), ProbeSink::new());
    assert_ne!(a.id(), b.id());
    let x = t2(&[1.0, 2.0], [1, 2], &d);
    let anchor = Tensor::<1>::zeros([1], &d).require_grad();
    let y = grad_topk_probe(x, anchor.clone(), 3, 2, 1, &a);
    drop(a);
    let grads = y.sum().backward();
    assert_eq!(read(anchor.grad(&grads).unwrap()), vec![0.0]);
    assert_eq!(b.take(), None);
}
