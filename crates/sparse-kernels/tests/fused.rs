//! The fused sparse-adapter layer (`sparse_lora_linear`) against the composed ops it replaces
//! (`lora_linear` / `linear` + `sparse_linear`): outputs and every gradient, with and without a
//! LoRA term, a bias and a tracked base weight, at token counts that are and are not multiples
//! of the kernels' 16-token blocks, on both sides of `merge_pays` (the SpMM accumulated into the
//! product's output, or `S` added into a copy of the weight) and for both weight layouts, on
//! every CPU body this machine supports; and the input
//! gradient against finite differences. The same over a packed base
//! (`packed_sparse_lora_linear` against `packed_lora_linear` / `packed_linear` +
//! `sparse_linear`).

mod common;

use burn::tensor::{Device, Tensor};
use common::*;
use std::sync::Arc;

use peft_kernels::linear::{linear, lora_linear};
use peft_kernels::packed_linear::{packed_linear, packed_lora_linear};
use peft_kernels::quant::ggml::GgmlBlock;
use peft_kernels::quant::{PackedFormat, PackedMatrix};
use sparse_kernels::{
    CsrLayout, merge_pays, packed_sparse_lora_linear, sparse_grad_sample, sparse_linear,
    sparse_lora_linear,
};

fn device() -> Device {
    Device::flex().autodiff()
}

/// `max |got - want| <= 1e-4 · (1 + max |want|)`, naming the tensor.
#[track_caller]
fn assert_near(got: Vec<f32>, want: Vec<f32>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        err <= 1e-4 * (1.0 + scale),
        "{what}: max error {err} (largest value {scale})"
    );
}

struct Case {
    tokens: usize,
    inp: usize,
    out: usize,
    rank: Option<usize>,
    bias: bool,
    weight_tracked: bool,
    density: f32,
}

/// Checks one case; returns whether the fused op took the merged path ([`merge_pays`]). Odd
/// seeds hold the weight as the transpose of a row-major `[out, in]` buffer (a PyTorch file's
/// layout), even ones row-major `[in, out]`.
fn check(case: &Case, seed: u64) -> bool {
    let d = device();
    let mut rng = Lcg::new(seed);
    let Case {
        tokens, inp, out, ..
    } = *case;
    let (s, values) = random_sparse(&mut rng, out, inp, case.density);
    let layout = CsrLayout::new(s, &d);
    let x = t2(&rng.vec(tokens * inp), [tokens, inp], &d).require_grad();
    let mut w = if seed % 2 == 1 {
        t2(&rng.vec(inp * out), [out, inp], &d).transpose()
    } else {
        t2(&rng.vec(inp * out), [inp, out], &d)
    };
    let merged = merge_pays(values.len(), tokens, inp, out);
    if case.weight_tracked {
        w = w.require_grad();
    }
    let bias = case.bias.then(|| t1(&rng.vec(out), &d).require_grad());
    let v = t1(&values, &d).require_grad();
    let low_rank = case.rank.map(|r| {
        let a = t2(&rng.vec(inp * r), [inp, r], &d).require_grad();
        let b = t2(&rng.vec(r * out), [r, out], &d).require_grad();
        (a, b, 0.75)
    });
    let g = t2(&rng.vec(tokens * out), [tokens, out], &d);
    let fused = sparse_lora_linear(
        x.clone(),
        w.clone(),
        bias.clone(),
        low_rank.clone(),
        &layout,
        v.clone(),
    );
    let dense = match low_rank.clone() {
        Some((a, b, scale)) => lora_linear(x.clone(), w.clone(), bias.clone(), a, b, scale),
        None => linear(x.clone(), w.clone(), bias.clone()),
    };
    let composed = dense + sparse_linear(x.clone(), &layout, v.clone());
    assert_near(read(fused.clone()), read(composed.clone()), "output");
    let gf = (fused * g.clone()).sum().backward();
    let gc = (composed * g).sum().backward();
    let pair = |t: &Tensor<2>, what: &str| {
        assert_near(read(t.grad(&gf).unwrap()), read(t.grad(&gc).unwrap()), what);
    };
    pair(&x, "dx");
    if case.weight_tracked {
        pair(&w, "dW");
    } else {
        assert!(w.grad(&gf).is_none(), "a frozen weight gets no gradient");
    }
    if let Some((a, b, _)) = &low_rank {
        pair(a, "dA");
        pair(b, "dB");
    }
    if let Some(bias) = &bias {
        assert_near(
            read(bias.grad(&gf).unwrap()),
            read(bias.grad(&gc).unwrap()),
            "dbias",
        );
    }
    assert_near(
        read(v.grad(&gf).unwrap()),
        read(v.grad(&gc).unwrap()),
        "dvalues",
    );
    merged
}

#[test]
fn fused_layer_equals_the_composed_ops() {
    let cases = [
        // RoSA at ranks 16 (peft-core's one-pass gradient kernel) and 12, a token count with a
        // partial 16-token block, a tracked weight.
        (70, 40, 36, Some(16), true, false, 0.05),
        (64, 33, 20, Some(12), true, true, 0.1),
        (17, 48, 48, Some(4), false, false, 0.3),
        // SFT: no LoRA term.
        (50, 36, 52, None, true, false, 0.06),
        (16, 20, 12, None, false, true, 0.5),
        (3, 7, 5, None, true, false, 1.0),
        // Many tokens at a high density: S is added into a copy of the weight (merge_pays),
        // RoSA and SFT, frozen and tracked weights, both weight layouts.
        (96, 24, 20, Some(8), true, false, 0.3),
        (80, 20, 28, Some(16), false, true, 0.25),
        (128, 16, 24, None, true, false, 0.2),
        (70, 12, 18, None, false, true, 0.5),
    ];
    for_each_cpu_body(|_| {
        let mut paths = [0; 2];
        for (i, &(tokens, inp, out, rank, bias, weight_tracked, density)) in
            cases.iter().enumerate()
        {
            let case = Case {
                tokens,
                inp,
                out,
                rank,
                bias,
                weight_tracked,
                density,
            };
            paths[usize::from(check(&case, 40 + i as u64))] += 1;
        }
        assert_eq!(
            paths,
            [6, 4],
            "cases on both paths: SpMM into the output, merged weight"
        );
    });
}

#[test]
fn fused_layer_on_a_3d_input_and_without_autodiff() {
    // 2 x 19 tokens take the SpMM path, 2 x 64 the merged weight.
    for tokens in [19, 64] {
        on_a_3d_input_and_without_autodiff(tokens);
    }
}

fn on_a_3d_input_and_without_autodiff(tokens: usize) {
    let d = device();
    let mut rng = Lcg::new(7);
    let (out, inp) = (24, 20);
    let (s, values) = random_sparse(&mut rng, out, inp, 0.2);
    assert_eq!(merge_pays(values.len(), 2 * tokens, inp, out), tokens == 64);
    let layout = CsrLayout::new(s, &d);
    let x = Tensor::<3>::from_data(
        burn::tensor::TensorData::new(rng.vec(2 * tokens * inp), [2, tokens, inp]),
        &d,
    );
    let w = t2(&rng.vec(inp * out), [inp, out], &d);
    let (a, b) = (
        t2(&rng.vec(inp * 8), [inp, 8], &d),
        t2(&rng.vec(8 * out), [8, out], &d),
    );
    let v = t1(&values, &d);
    let fused = sparse_lora_linear(
        x.clone(),
        w.clone(),
        None,
        Some((a.clone(), b.clone(), 2.0)),
        &layout,
        v.clone(),
    );
    let composed = lora_linear(x.clone(), w.clone(), None, a.clone(), b.clone(), 2.0)
        + sparse_linear(x.clone(), &layout, v.clone());
    assert_eq!(fused.dims(), [2, tokens, out]);
    assert_near(read(fused), read(composed.clone()), "3-D output");
    // The inner backend (no autodiff) runs the same op.
    let plain = sparse_lora_linear(
        x.inner(),
        w.inner(),
        None,
        Some((a.inner(), b.inner(), 2.0)),
        &CsrLayout::new(layout.structure().clone(), &Device::flex()),
        v.inner(),
    );
    assert_near(read(plain), read(composed), "output without autodiff");
}

#[test]
fn fused_input_gradient_matches_finite_differences() {
    let d = device();
    let mut rng = Lcg::new(3);
    let (tokens, inp, out, r) = (18, 9, 11, 3);
    let (s, values) = random_sparse(&mut rng, out, inp, 0.3);
    let layout = CsrLayout::new(s, &d);
    let x_data = rng.vec(tokens * inp);
    let (w, bias) = (rng.vec(inp * out), rng.vec(out));
    let (a, b) = (rng.vec(inp * r), rng.vec(r * out));
    let g = rng.vec(tokens * out);
    let loss = |x: Tensor<2>| {
        let y = sparse_lora_linear(
            x,
            t2(&w, [inp, out], &d),
            Some(t1(&bias, &d)),
            Some((t2(&a, [inp, r], &d), t2(&b, [r, out], &d), 0.5)),
            &layout,
            t1(&values, &d),
        );
        (y * t2(&g, [tokens, out], &d)).sum()
    };
    let x = t2(&x_data, [tokens, inp], &d).require_grad();
    let dx = read(x.grad(&loss(x.clone()).backward()).unwrap());
    let eps = 1e-2f32;
    for i in [0, 5, inp + 3, tokens * inp - 1] {
        let at = |delta: f32| {
            let mut xs = x_data.clone();
            xs[i] += delta;
            loss(t2(&xs, [tokens, inp], &d)).into_scalar::<f32>() as f64
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        assert!(
            (dx[i] as f64 - fd).abs() < 2e-2 * (1.0 + fd.abs()),
            "dx[{i}] = {}, finite difference {fd}",
            dx[i]
        );
    }
}

/// QRoSA and QSFT layers: the packed fused op against the composed packed ops, outputs and every
/// gradient, with and without a LoRA term, a bias and a tracked input, over NF4 and ggml blocks,
/// at row counts on both sides of the packed product's few-rows path.
#[test]
fn packed_fused_layer_equals_the_composed_packed_ops() {
    let formats = [
        PackedFormat::Nf4 { double: true },
        PackedFormat::Ggml(GgmlBlock::Q4_1),
        PackedFormat::Ggml(GgmlBlock::Q8_0),
    ];
    // (tokens, in, out, rank, bias, x tracked, density)
    let cases = [
        (70, 64, 72, Some(16), true, true, 0.05),
        (3, 96, 40, Some(4), false, true, 0.2),
        (33, 64, 20, None, true, true, 0.1),
        (5, 32, 48, None, false, false, 0.3),
        (20, 128, 36, Some(8), true, false, 0.1),
    ];
    let d = device();
    for (f, format) in formats.into_iter().enumerate() {
        for (i, &(tokens, inp, out, rank, with_bias, x_tracked, density)) in
            cases.iter().enumerate()
        {
            let what = format!("{} case {i}", format.name());
            let mut rng = Lcg::new(300 + 10 * f as u64 + i as u64);
            let (s, values) = random_sparse(&mut rng, out, inp, density);
            let layout = CsrLayout::new(s, &d);
            let w =
                Arc::new(PackedMatrix::quantize(&rng.vec(out * inp), out, inp, format).unwrap());
            let x = t2(&rng.vec(tokens * inp), [tokens, inp], &d);
            let x = if x_tracked { x.require_grad() } else { x };
            let bias = with_bias.then(|| t1(&rng.vec(out), &d).require_grad());
            let v = t1(&values, &d).require_grad();
            let low_rank = rank.map(|r| {
                let a = t2(&rng.vec(inp * r), [inp, r], &d).require_grad();
                let b = t2(&rng.vec(r * out), [r, out], &d).require_grad();
                (a, b, 1.25)
            });
            let g = t2(&rng.vec(tokens * out), [tokens, out], &d);
            let fused = packed_sparse_lora_linear(
                x.clone(),
                &w,
                bias.clone(),
                low_rank.clone(),
                &layout,
                v.clone(),
            );
            let dense = match low_rank.clone() {
                Some((a, b, scale)) => packed_lora_linear(x.clone(), &w, bias.clone(), a, b, scale),
                None => packed_linear(x.clone(), &w, bias.clone()),
            };
            let composed = dense + sparse_linear(x.clone(), &layout, v.clone());
            assert_near(
                read(fused.clone()),
                read(composed.clone()),
                &format!("{what} output"),
            );
            let gf = (fused * g.clone()).sum().backward();
            let gc = (composed * g).sum().backward();
            let pair = |t: &Tensor<2>, name: &str| {
                let (got, want) = (t.grad(&gf).unwrap(), t.grad(&gc).unwrap());
                assert_near(read(got), read(want), &format!("{what} {name}"));
            };
            if x_tracked {
                pair(&x, "dx");
            } else {
                assert!(x.grad(&gf).is_none(), "{what}: an untracked input");
            }
            if let Some((a, b, _)) = &low_rank {
                pair(a, "dA");
                pair(b, "dB");
            }
            if let Some(bias) = &bias {
                let (got, want) = (bias.grad(&gf).unwrap(), bias.grad(&gc).unwrap());
                assert_near(read(got), read(want), &format!("{what} dbias"));
            }
            let (got, want) = (v.grad(&gf).unwrap(), v.grad(&gc).unwrap());
            assert_near(read(got), read(want), &format!("{what} dvalues"));
        }
    }
}

/// RigL's candidate term: `sparse_grad_sample(x, S, 0, result)` against `result +
/// sparse_linear(x, S, 0)`: the same output, the same values' gradient (the SDDMM), and the same
/// gradients upstream of `result` and of `x` (the zero term adds none), on 2-D and 3-D inputs.
#[test]
fn a_sampled_gradient_term_equals_adding_the_zero_sparse_term() {
    let d = device();
    let mut rng = Lcg::new(11);
    for dims in [vec![37, 20], vec![2, 19, 20]] {
        let (out, inp) = (24, 20);
        let tokens: usize = dims[..dims.len() - 1].iter().product();
        let (s, values) = random_sparse(&mut rng, out, inp, 0.3);
        let layout = CsrLayout::new(s, &d);
        let x = t2(&rng.vec(tokens * inp), [tokens, inp], &d).require_grad();
        let w = t2(&rng.vec(inp * out), [inp, out], &d).require_grad();
        let g = t2(&rng.vec(tokens * out), [tokens, out], &d);
        let zeros = || t1(&vec![0.0; values.len()], &d).require_grad();
        let (v_sampled, v_composed) = (zeros(), zeros());
        let run = |sampled: bool| {
            let result = x.clone().matmul(w.clone());
            let y = if dims.len() == 3 {
                let (x3, r3) = (
                    x.clone().reshape([dims[0], dims[1], inp]),
                    result.reshape([dims[0], dims[1], out]),
                );
                let y3 = if sampled {
                    sparse_grad_sample(x3, &layout, v_sampled.clone(), r3)
                } else {
                    r3 + sparse_linear(x3, &layout, v_composed.clone())
                };
                y3.reshape([tokens, out])
            } else if sampled {
                sparse_grad_sample(x.clone(), &layout, v_sampled.clone(), result)
            } else {
                result + sparse_linear(x.clone(), &layout, v_composed.clone())
            };
            let grads = (y.clone() * g.clone()).sum().backward();
            (y, grads)
        };
        let ((ys, gs), (yc, gc)) = (run(true), run(false));
        assert_near(read(ys), read(yc), "output");
        let dv = read(v_sampled.grad(&gs).unwrap());
        assert!(dv.iter().any(|v| v.abs() > 1e-3), "the SDDMM ran");
        assert_near(dv, read(v_composed.grad(&gc).unwrap()), "dvalues");
        assert_near(read(x.grad(&gs).unwrap()), read(x.grad(&gc).unwrap()), "dx");
        assert_near(read(w.grad(&gs).unwrap()), read(w.grad(&gc).unwrap()), "dW");
    }
}
