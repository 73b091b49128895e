//! Gradients of every op: against the dense formula and against finite differences, on every
//! CPU body this machine supports.

mod common;

use burn::module::Param;
use burn::tensor::Device;
use common::*;
use proptest::prelude::*;
use sparse_kernels::{
    Csr, CsrLayout, csr_add, csr_gather, csr_transpose, sddmm, sparse_linear, sparse_linear_fused,
    spmm, to_dense,
};

fn device() -> Device {
    Device::flex().autodiff()
}

fn check_sparse_linear(seed: u64, out: usize, inp: usize, tokens: usize, density: f32) {
    for_each_cpu_body(|_| {
        let d = device();
        let mut rng = Lcg::new(seed);
        let (s, values) = random_sparse(&mut rng, out, inp, density);
        let layout = CsrLayout::new(s.clone(), &d);
        let x_data = rng.vec(tokens * inp);
        let x = t2(&x_data, [tokens, inp], &d).require_grad();
        let v = t1(&values, &d).require_grad();
        let y = sparse_linear(x.clone(), &layout, v.clone());
        let grads = (y.clone() * y).sum().backward();
        let (want_dx, want_dv) = dense_sparse_linear_grads(&s, &values, &x_data, tokens);
        assert_close(&read(x.grad(&grads).unwrap()), &want_dx, "dx");
        assert_close(&read(v.grad(&grads).unwrap()), &want_dv, "dvalues");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn sparse_linear_gradients_match_dense_formula(
        seed in any::<u64>(), out in 1usize..24, inp in 1usize..24,
        tokens in prop_oneof![1usize..8, 60usize..200], density in 0.0f32..1.0,
    ) {
        check_sparse_linear(seed, out, inp, tokens, density);
    }
}

/// `loss = Σ y²` as f64 on the host for finite differences.
fn host_loss(s: &sparse_kernels::CsrStructure, values: &[f32], x: &[f32], tokens: usize) -> f64 {
    let (out, inp) = (s.rows(), s.cols());
    let y = matmul(
        x,
        &transpose(&dense_of(s, values), out, inp),
        tokens,
        inp,
        out,
    );
    y.value.iter().map(|v| v * v).sum()
}

#[test]
fn sparse_linear_gradients_match_finite_differences() {
    for_each_cpu_body(|_| {
        let d = device();
        let mut rng = Lcg::new(42);
        let (out, inp, tokens) = (9, 11, 70);
        let (s, values) = random_sparse(&mut rng, out, inp, 0.3);
        let x_data = rng.vec(tokens * inp);
        let layout = CsrLayout::new(s.clone(), &d);
        let x = t2(&x_data, [tokens, inp], &d).require_grad();
        let v = t1(&values, &d).require_grad();
        let y = sparse_linear(x.clone(), &layout, v.clone());
        let grads = (y.clone() * y).sum().backward();
        let (dx, dv) = (read(x.grad(&grads).unwrap()), read(v.grad(&grads).unwrap()));
        // The loss is quadratic, so central differences are exact up to rounding.
        let eps = 1e-2f32;
        for k in (0..values.len()).step_by(3) {
            let (mut plus, mut minus) = (values.clone(), values.clone());
            plus[k] += eps;
            minus[k] -= eps;
            let fd = (host_loss(&s, &plus, &x_data, tokens)
                - host_loss(&s, &minus, &x_data, tokens))
                / (2.0 * eps as f64);
            assert!(
                (dv[k] as f64 - fd).abs() <= 1e-3 * (1.0 + fd.abs()),
                "dvalues[{k}]: {} vs {fd}",
                dv[k]
            );
        }
        for i in (0..x_data.len()).step_by(37) {
            let (mut plus, mut minus) = (x_data.clone(), x_data.clone());
            plus[i] += eps;
            minus[i] -= eps;
            let fd = (host_loss(&s, &values, &plus, tokens)
                - host_loss(&s, &values, &minus, tokens))
                / (2.0 * eps as f64);
            assert!(
                (dx[i] as f64 - fd).abs() <= 1e-3 * (1.0 + fd.abs()),
                "dx[{i}]: {} vs {fd}",
                dx[i]
            );
        }
    });
}

#[test]
fn values_as_a_param_receive_gradients() {
    for_each_cpu_body(|_| {
        let d = device();
        let mut rng = Lcg::new(9);
        let (s, values) = random_sparse(&mut rng, 4, 6, 0.5);
        let layout = CsrLayout::new(s.clone(), &d);
        let param = Param::from_tensor(t1(&values, &d));
        let x_data = rng.vec(2 * 6);
        let y = sparse_linear(t2(&x_data, [2, 6], &d), &layout, param.val());
        let grads = (y.clone() * y).sum().backward();
        let (_, want_dv) = dense_sparse_linear_grads(&s, &values, &x_data, 2);
        assert_close(&read(param.grad(&grads).unwrap()), &want_dv, "param grad");
    });
}

#[test]
fn fused_form_with_frozen_base() {
    for_each_cpu_body(|_| {
        let d = device();
        let mut rng = Lcg::new(13);
        let (out, inp, tokens) = (6, 5, 80);
        let (s, values) = random_sparse(&mut rng, out, inp, 0.4);
        let layout = CsrLayout::new(s.clone(), &d);
        let (w, b, x_data) = (rng.vec(inp * out), rng.vec(out), rng.vec(tokens * inp));
        let weight = t2(&w, [inp, out], &d); // frozen: not tracked
        let bias = t1(&b, &d).require_grad();
        let x = t2(&x_data, [tokens, inp], &d).require_grad();
        let v = t1(&values, &d).require_grad();
        let y = sparse_linear_fused(
            x.clone(),
            weight.clone(),
            Some(bias.clone()),
            &layout,
            v.clone(),
        );
        let r = rng.vec(tokens * out);
        let grads = (y * t2(&r, [tokens, out], &d)).sum().backward();
        assert!(
            weight.grad(&grads).is_none(),
            "a frozen base gets no gradient"
        );
        // dY = r: dx = r·(W + Sᵀ)ᵀ... with W [in, out]: dx = r·Wᵀ + r·S; dS = rᵀ·x; dbias = Σ_t r.
        let dense = dense_of(&s, &values);
        let want_dx = matmul(&r, &transpose(&w, inp, out), tokens, out, inp)
            .plus(&matmul(&r, &dense, tokens, out, inp));
        assert_close(&read(x.grad(&grads).unwrap()), &want_dx, "dx");
        let want_dv = matmul(&transpose(&r, tokens, out), &x_data, out, tokens, inp)
            .sample(&s.flat_indices());
        assert_close(&read(v.grad(&grads).unwrap()), &want_dv, "dvalues");
        let want_db = matmul(&vec![1.0; tokens], &r, 1, tokens, out);
        assert_close(&read(bias.grad(&grads).unwrap()), &want_db, "dbias");
    });
}

#[test]
fn primitive_gradients_match_dense_formulas() {
    for_each_cpu_body(|_| {
        let d = device();
        let mut rng = Lcg::new(21);
        let (m, k, n) = (7, 9, 5);
        let (s, values) = random_sparse(&mut rng, m, k, 0.35);
        let dense_a = dense_of(&s, &values);
        let flat = s.flat_indices();
        let layout = CsrLayout::new(s.clone(), &d);
        let sample =
            |full: &[f32]| -> Vec<f32> { flat.iter().map(|&f| full[f as usize]).collect() };
        let exact = |v: &[f32]| Reference::exact(v);

        // spmm: loss = Σ R ⊙ (A·B): dA = R·Bᵀ on the structure, dB = Aᵀ·R.
        let (b, r) = (rng.vec(k * n), rng.vec(m * n));
        let v = t1(&values, &d).require_grad();
        let bt = t2(&b, [k, n], &d).require_grad();
        let a = Csr::new(layout.clone(), v.clone()).unwrap();
        let grads = (spmm(&a, bt.clone()) * t2(&r, [m, n], &d)).sum().backward();
        assert_close(
            &read(v.grad(&grads).unwrap()),
            &matmul(&r, &transpose(&b, k, n), m, n, k).sample(&flat),
            "spmm dvalues",
        );
        assert_close(
            &read(bt.grad(&grads).unwrap()),
            &matmul(&transpose(&dense_a, m, k), &r, k, m, n),
            "spmm db",
        );

        // sddmm: loss = Σ r ⊙ sddmm(P, Q): dP = S(r)·Q, dQ = S(r)ᵀ·P.
        let (p, q) = (rng.vec(m * n), rng.vec(k * n));
        let rv = rng.vec(s.nnz());
        let pt = t2(&p, [m, n], &d).require_grad();
        let qt = t2(&q, [k, n], &d).require_grad();
        let out = sddmm(&layout, pt.clone(), qt.clone());
        let grads = (out * t1(&rv, &d)).sum().backward();
        let sr = dense_of(&s, &rv);
        assert_close(
            &read(pt.grad(&grads).unwrap()),
            &matmul(&sr, &q, m, k, n),
            "sddmm da",
        );
        assert_close(
            &read(qt.grad(&grads).unwrap()),
            &matmul(&transpose(&sr, m, k), &p, k, m, n),
            "sddmm dbt",
        );

        // csr_add / to_dense: loss = Σ R ⊙ (D + A): dvalues = R on the structure, dD = R.
        let (base, r2) = (rng.vec(m * k), rng.vec(m * k));
        let v = t1(&values, &d).require_grad();
        let dt = t2(&base, [m, k], &d).require_grad();
        let a = Csr::new(layout.clone(), v.clone()).unwrap();
        let loss = (csr_add(&a, dt.clone()) * t2(&r2, [m, k], &d)).sum()
            + (to_dense(&a) * t2(&r2, [m, k], &d)).sum();
        let grads = loss.backward();
        let twice: Vec<f32> = sample(&r2).iter().map(|x| 2.0 * x).collect();
        assert_close(
            &read(v.grad(&grads).unwrap()),
            &exact(&twice),
            "csr_add dvalues",
        );
        assert_close(
            &read(dt.grad(&grads).unwrap()),
            &exact(&r2),
            "csr_add ddense",
        );

        // gather: loss = Σ r ⊙ gather(D): dD = dense(r).
        let dt = t2(&base, [m, k], &d).require_grad();
        let grads = (csr_gather(&layout, dt.clone()) * t1(&rv, &d))
            .sum()
            .backward();
        assert_close(
            &read(dt.grad(&grads).unwrap()),
            &exact(&sr),
            "gather ddense",
        );

        // transpose: values of the transpose are a permutation of the values.
        let v = t1(&values, &d).require_grad();
        let a = Csr::new(layout.clone(), v.clone()).unwrap();
        let (at, _) = csr_transpose(&a);
        let rt = rng.vec(s.nnz());
        let grads = (at.values.clone() * t1(&rt, &d)).sum().backward();
        let (_, perm) = s.transpose();
        let mut want = vec![0.0; s.nnz()];
        for (pos, &p) in perm.iter().enumerate() {
            want[p as usize] = rt[pos];
        }
        assert_close(
            &read(v.grad(&grads).unwrap()),
            &exact(&want),
            "transpose dvalues",
        );
    });
}
