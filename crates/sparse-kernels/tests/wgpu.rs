//! The CubeCL kernels on wgpu (a software adapter such as Mesa's lavapipe/llvmpipe is enough):
//! the same op checks as `ops.rs`, plus the autodiff path through `Fusion<CubeBackend>`.
#![cfg(feature = "wgpu")]

mod common;

use burn::tensor::{Device, DeviceKind};
use common::*;
use proptest::prelude::*;
use sparse_kernels::{CsrLayout, sparse_linear};

fn device() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn ops_match_dense_reference_on_wgpu(
        seed in any::<u64>(),
        m in 0usize..20, k in 0usize..20, n in 0usize..20,
        density in prop_oneof![Just(0.0f32), Just(1.0f32), 0.0f32..1.0],
        kind in prop_oneof![Just(Layout::Contiguous), Just(Layout::Transposed), Just(Layout::Sliced)],
    ) {
        check_all_ops(&device(), seed, [m, k, n], density, &[kind]);
    }
}

#[test]
fn edge_shapes_on_wgpu() {
    let d = device();
    for (i, shape) in [
        [0, 0, 0],
        [0, 5, 3],
        [5, 0, 3],
        [5, 3, 0],
        [1, 1, 1],
        [1, 17, 70],
        [17, 1, 70],
    ]
    .into_iter()
    .enumerate()
    {
        for density in [0.0, 0.5, 1.0] {
            check_all_ops(&d, i as u64, shape, density, &[Layout::Transposed]);
        }
    }
    check_all_ops(&d, 7, [3, 40_000, 2], 0.001, &[Layout::Contiguous]);
}

#[test]
fn sparse_linear_gradients_on_wgpu() {
    let d = device().autodiff();
    let mut rng = Lcg::new(5);
    let (s, values) = random_sparse(&mut rng, 7, 5, 0.4);
    let layout = CsrLayout::new(s.clone(), &d);
    let x_data = rng.vec(3 * 5);
    let x = t2(&x_data, [3, 5], &d).require_grad();
    let v = t1(&values, &d).require_grad();
    let y = sparse_linear(x.clone(), &layout, v.clone());
    let grads = (y.clone() * y).sum().backward();
    let (dx, dv) = (read(x.grad(&grads).unwrap()), read(v.grad(&grads).unwrap()));
    let (want_dx, want_dv) = dense_sparse_linear_grads(&s, &values, &x_data, 3);
    assert_close(&dx, &want_dx, "dx");
    assert_close(&dv, &want_dv, "dvalues");
}

#[test]
fn grad_topk_probe_on_wgpu_matches_the_cpu() {
    use burn::tensor::Tensor;
    use sparse_kernels::{ProbeResult, ProbeSink, grad_topk_probe};

    let (tokens, inp, out, k) = (7, 9, 11, 20);
    let mut rng = Lcg::new(11);
    // Small integers: every dot product is exact in f32, so both devices agree bit for bit.
    let mut ints =
        |n: usize| -> Vec<f32> { (0..n).map(|_| (rng.next_u32() % 7) as f32 - 3.0).collect() };
    let batches: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
        .map(|_| (ints(tokens * inp), ints(tokens * out)))
        .collect();
    let run = |d: &Device, block: usize| -> ProbeResult {
        let sink = ProbeSink::new();
        for (x, dy) in &batches {
            let anchor = Tensor::<1>::zeros([1], d).require_grad();
            let x = t2(x, [tokens, inp], d).transpose().transpose();
            let y = grad_topk_probe(x, anchor.clone(), out, k, block, &sink);
            assert_eq!(read(y.clone()), vec![0.0; tokens * out], "zero forward");
            let grads = (y * t2(dy, [tokens, out], d)).sum().backward();
            assert_eq!(read(anchor.grad(&grads).unwrap()), vec![0.0]);
        }
        sink.take().unwrap()
    };
    for block in [1, 3, out] {
        let cpu = run(&Device::flex().autodiff(), block);
        let gpu = run(&device().autodiff(), block);
        assert_eq!(gpu, cpu, "block {block}");
        assert_eq!((gpu.indices.len(), gpu.count), (k, 2));
    }
}
