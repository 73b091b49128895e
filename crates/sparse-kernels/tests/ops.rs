//! Every op against a slow dense reference on the flex CPU backend.

mod common;

use burn::tensor::Device;
use common::*;
use proptest::prelude::*;
use sparse_kernels::{Csr, CsrLayout, CsrStructure, SparseError, sddmm, sparse_linear, spmm};

fn device() -> Device {
    Device::flex()
}

fn layout_kind() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Contiguous),
        Just(Layout::Transposed),
        Just(Layout::Sliced)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn ops_match_dense_reference(
        seed in any::<u64>(),
        m in 0usize..24, k in 0usize..24, n in 0usize..24,
        density in prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..1.0],
        kind in layout_kind(),
    ) {
        check_all_ops(&device(), seed, [m, k, n], density, &[kind]);
    }

    // Enough tokens for the token-blocked CPU path (n >= 32 lanes x threads) and its tail.
    #[test]
    fn ops_match_dense_reference_many_tokens(
        seed in any::<u64>(),
        m in 1usize..40, k in 1usize..40, n in 60usize..300,
        density in 0.0f32..0.3,
        kind in layout_kind(),
    ) {
        check_all_ops(&device(), seed, [m, k, n], density, &[kind]);
    }
}

#[test]
fn edge_shapes() {
    let d = device();
    for (i, shape) in [
        [0, 0, 0],
        [0, 5, 3],
        [5, 0, 3],
        [5, 3, 0],
        [1, 1, 1],
        [1, 17, 70],
        [17, 1, 70],
        [1, 33, 1],
        [33, 1, 1],
        // Several 512-token chunks (the last one partial) and several column tiles of the
        // CPU SDDMM; more than 64 tokens for the CPU adapter SpMM.
        [20, 700, 1100],
        [70, 40, 1030],
        // Panels above 1 MiB: the CPU SDDMM's shared-panel path, with a partial last chunk.
        [20, 4200, 300],
    ]
    .into_iter()
    .enumerate()
    {
        for density in [0.0, 0.5, 1.0] {
            let kinds = [Layout::Contiguous, Layout::Transposed, Layout::Sliced];
            check_all_ops(&d, i as u64, shape, density, &kinds);
        }
    }
}

#[test]
fn dimensions_above_int16() {
    // spops' int16 indices cap both dimensions at 32767; ours do not.
    let d = device();
    check_all_ops(&d, 7, [3, 40_000, 2], 0.001, &[Layout::Contiguous]);
    check_all_ops(&d, 8, [40_000, 2, 3], 0.01, &[Layout::Transposed]);
    let s = CsrStructure::from_flat_indices(40_000, 70_000, &[0, 39_999 * 70_000 + 69_999])
        .unwrap()
        .0;
    assert_eq!(s.col_indices(), &[0, 69_999]);
    assert_eq!(s.transpose().0.col_indices(), &[0, 39_999]);
}

#[test]
fn explicit_zeros_are_entries() {
    let d = device();
    let s = CsrStructure::from_mask(2, 2, &[true, false, true, true]).unwrap();
    let layout = CsrLayout::new(s, &d);
    let a = Csr::zeros(layout.clone());
    let (at, _) = sparse_kernels::csr_transpose(&a);
    assert_eq!(at.layout.nnz(), 3);
    let x = t2(&[1.0, 2.0], [1, 2], &d);
    let y = sparse_linear(x, &layout, a.values.clone());
    assert_eq!(read(y), vec![0.0, 0.0]);
    // The gradient reaches every entry even though all values are zero: dS[o, i] = x[i] for
    // the entries (0, 0), (1, 0), (1, 1).
    let ad = Device::flex().autodiff();
    let layout = CsrLayout::new(layout.structure().clone(), &ad);
    let values = t1(&[0.0; 3], &ad).require_grad();
    let y = sparse_linear(t2(&[1.0, 2.0], [1, 2], &ad), &layout, values.clone());
    let grads = y.sum().backward();
    assert_eq!(read(values.grad(&grads).unwrap()), vec![1.0, 1.0, 2.0]);
}

#[test]
fn structure_validation() {
    use SparseError::*;
    assert!(matches!(
        CsrStructure::new(2, 3, vec![0, 1], vec![0]),
        Err(LengthMismatch { .. })
    ));
    assert!(matches!(
        CsrStructure::new(1, 3, vec![1, 1], vec![0]),
        Err(BadRowOffsets { .. })
    ));
    assert!(matches!(
        CsrStructure::new(2, 3, vec![0, 2, 1], vec![0, 1]),
        Err(BadRowOffsets { .. })
    ));
    assert!(matches!(
        CsrStructure::new(1, 3, vec![0, 1], vec![3]),
        Err(ColumnOutOfBounds { col: 3, .. })
    ));
    assert!(matches!(
        CsrStructure::new(1, 3, vec![0, 2], vec![1, 1]),
        Err(UnsortedRow { .. })
    ));
    assert!(matches!(
        CsrStructure::new(1, 3, vec![0, 2], vec![2, 1]),
        Err(UnsortedRow { .. })
    ));
    assert!(matches!(
        CsrStructure::new(1, 3, vec![0, 1], vec![0, 1]),
        Err(BadRowOffsets { .. })
    ));
    assert!(matches!(
        CsrStructure::from_mask(2, 2, &[true]),
        Err(LengthMismatch { .. })
    ));
    assert!(matches!(
        CsrStructure::from_flat_indices(2, 2, &[4]),
        Err(IndexOutOfBounds { index: 4, .. })
    ));
    assert!(matches!(
        CsrStructure::from_flat_indices(2, 2, &[1, 1]),
        Err(DuplicateIndex { index: 1 })
    ));
    assert!(matches!(
        CsrStructure::from_topk(1, 2, &[1.0, f32::NAN], 1),
        Err(NanScore { index: 1 })
    ));
    assert!(matches!(
        CsrStructure::from_topk(1, 2, &[1.0, 2.0], 3),
        Err(TopKTooLarge { .. })
    ));
    assert!(matches!(
        CsrStructure::new(usize::MAX / 2, 1, vec![], vec![]),
        Err(TooLarge { .. })
    ));
    let s = CsrStructure::from_mask(2, 2, &[true, false, true, true]).unwrap();
    assert!(matches!(
        s.clone().with_custom_row_order(vec![0, 0]),
        Err(BadRowOrder { .. })
    ));
    let msg = CsrStructure::new(1, 3, vec![0, 1], vec![3])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("out of bounds"), "{msg}");
    let d = device();
    assert!(matches!(
        Csr::new(CsrLayout::new(s, &d), t1(&[1.0], &d)),
        Err(LengthMismatch { what: "values", .. })
    ));
}

#[test]
fn builders_agree() {
    let mut rng = Lcg::new(3);
    let (rows, cols) = (7, 9);
    let mask: Vec<bool> = (0..rows * cols).map(|_| rng.unit() < 0.3).collect();
    let from_mask = CsrStructure::from_mask(rows, cols, &mask).unwrap();
    // Flat indices in scrambled order, with the order that maps values into CSR order.
    let mut flat = from_mask.flat_indices();
    flat.reverse();
    let (from_flat, order) = CsrStructure::from_flat_indices(rows, cols, &flat).unwrap();
    assert_eq!(from_flat, from_mask);
    let sorted: Vec<u64> = order.iter().map(|&p| flat[p as usize]).collect();
    assert_eq!(sorted, from_mask.flat_indices());
    // Top-k of a score that is high exactly on the mask.
    let scores: Vec<f32> = mask
        .iter()
        .map(|&m| if m { 2.0 + rng.unit() } else { rng.unit() })
        .collect();
    let topk = CsrStructure::from_topk(rows, cols, &scores, from_mask.nnz()).unwrap();
    assert_eq!(topk, from_mask);
    assert_eq!(
        CsrStructure::from_topk(rows, cols, &scores, 0)
            .unwrap()
            .nnz(),
        0
    );
    // Row order: longest rows first, a permutation.
    let ordered = from_mask.clone().with_row_order();
    let order = ordered.row_order().unwrap();
    let len =
        |r: u32| from_mask.row_offsets()[r as usize + 1] - from_mask.row_offsets()[r as usize];
    assert!(order.windows(2).all(|w| len(w[0]) >= len(w[1])));
    let mut sorted = order.to_vec();
    sorted.sort();
    assert_eq!(sorted, (0..rows as u32).collect::<Vec<_>>());
}

#[test]
fn spmm_on_a_3d_batch_through_sparse_linear() {
    let d = device();
    let mut rng = Lcg::new(11);
    let (s, values) = random_sparse(&mut rng, 6, 5, 0.4);
    let layout = CsrLayout::new(s.clone(), &d);
    let x = rng.vec(2 * 3 * 5);
    let y = sparse_linear(
        burn::tensor::Tensor::<3>::from_data(
            burn::tensor::TensorData::new(x.clone(), [2, 3, 5]),
            &d,
        ),
        &layout,
        t1(&values, &d),
    );
    assert_eq!(y.dims(), [2, 3, 6]);
    let want = matmul(&x, &transpose(&dense_of(&s, &values), 6, 5), 6, 5, 6);
    assert_close(&read(y), &want, "3d sparse_linear");
    // And spmm of a plain matrix.
    let a = Csr::new(layout, t1(&values, &d)).unwrap();
    let b = rng.vec(5 * 4);
    assert_close(
        &read(spmm(&a, t2(&b, [5, 4], &d))),
        &matmul(&dense_of(&s, &values), &b, 6, 5, 4),
        "spmm",
    );
}

/// The bound `assert_close` used before: `1e-3 (1 + |w|)`, kept here only to show what it missed.
fn former_bound(value: f64, _magnitude: f64) -> f64 {
    1e-3 * (1.0 + value.abs())
}

/// `x` rounded to the nearest bfloat16 (ties to even), back in f32.
fn bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    f32::from_bits(bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000)
}

/// Drops one product term from one element of a reference spmm result, for every (element,
/// nonzero term) pair; returns how many of these mutations the former and the new bound miss,
/// after checking the mutation with the largest term the former bound misses.
fn drop_one_term([m, k, n]: [usize; 3], seed: u64) -> (usize, usize, usize) {
    let mut rng = Lcg::new(seed);
    let (s, values) = random_sparse(&mut rng, m, k, 0.5);
    let a = dense_of(&s, &values);
    let b = rng.vec(k * n);
    let want = matmul(&a, &b, m, k, n);
    let exact = want.f32();
    assert!(first_violation(&exact, &want, |_, mag| tolerance(mag)).is_none());
    let (mut drops, mut missed_old, mut missed_new) = (0, 0, 0);
    let mut worst: Option<(usize, f64)> = None;
    for e in 0..m * n {
        let (i, j) = (e / n, e % n);
        let old = former_bound(want.value[e], want.magnitude[e]);
        let new = tolerance(want.magnitude[e]);
        for p in 0..k {
            let term = a[i * k + p] as f64 * b[p * n + j] as f64;
            if term == 0.0 {
                continue;
            }
            drops += 1;
            missed_old += usize::from(term.abs() <= old);
            missed_new += usize::from(term.abs() <= new);
            if term.abs() <= old && term.abs() > new && worst.is_none_or(|w| term.abs() > w.1.abs())
            {
                worst = Some((e, term));
            }
        }
    }
    let (e, term) = worst.expect("a dropped term the former bound cannot see");
    let mut mutated = exact;
    mutated[e] = (want.value[e] - term) as f32;
    assert!(first_violation(&mutated, &want, former_bound).is_none());
    assert_eq!(
        first_violation(&mutated, &want, |_, mag| tolerance(mag)).map(|v| v.0),
        Some(e),
        "dropping the term {term:e} from element {e}"
    );
    (drops, missed_old, missed_new)
}

/// Mutations applied to a reference result: the former bound accepts them, `tolerance` does not.
#[test]
fn tolerance_catches_a_dropped_term_and_bf16_products() {
    // Shapes of the proptests (k < 24) and of the [20, 4200, 300] edge case (8 columns).
    for shape in [[20, 23, 8], [20, 4200, 8]] {
        let (drops, old, new) = drop_one_term(shape, 2026);
        println!(
            "{shape:?}: of {drops} single-term drops, the former bound misses {old}, the new \
             one {new}"
        );
        assert!(new < old, "{shape:?}");
    }

    // Products rounded to bf16 (an operand loaded as bf16), on sparse values of the size that
    // SFT and RoSA deltas have (|v| <= 0.01): every error is below the former bound's 1e-3
    // floor.
    let (m, k, n) = (20, 4200, 8);
    let mut rng = Lcg::new(7);
    let (s, values) = random_sparse(&mut rng, m, k, 0.5);
    let small: Vec<f32> = dense_of(&s, &values).iter().map(|v| v * 0.01).collect();
    let b = rng.vec(k * n);
    let want = matmul(&small, &b, m, k, n);
    let mutated: Vec<f32> = (0..m * n)
        .map(|e| {
            let (i, j) = (e / n, e % n);
            (0..k).map(|p| bf16(small[i * k + p] * b[p * n + j])).sum()
        })
        .collect();
    assert!(first_violation(&want.f32(), &want, |_, mag| tolerance(mag)).is_none());
    assert!(first_violation(&mutated, &want, former_bound).is_none());
    assert!(first_violation(&mutated, &want, |_, mag| tolerance(mag)).is_some());
}

/// SDDMM gives the same bits on every call (training runs, and a resumed run against one that
/// did not stop, depend on it): many chunks of the contracted dimension, summed by several
/// threads, never in an order that depends on their timing.
#[test]
fn sddmm_is_deterministic() {
    let dev = device();
    let mut rng = Lcg::new(11);
    let (m, n, d) = (24, 20, 64 * 9 + 5);
    let (s, _) = random_sparse(&mut rng, m, n, 0.3);
    let layout = CsrLayout::new(s, &dev);
    let a = t2(&rng.vec(m * d), [m, d], &dev);
    let bt = t2(&rng.vec(n * d), [n, d], &dev);
    let bits = || -> Vec<u32> {
        let out = sddmm(&layout, a.clone(), bt.clone()).into_data();
        out.iter::<f32>().map(f32::to_bits).collect()
    };
    let first = bits();
    for _ in 0..30 {
        assert_eq!(bits(), first);
    }
}
