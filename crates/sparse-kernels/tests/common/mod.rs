//! Shared test helpers: a seeded generator, random structures, dense references, and the op
//! checks run on every device (flex in `ops.rs`, wgpu in `wgpu.rs`).
#![allow(dead_code)]

use burn::tensor::{Device, Tensor, TensorData};
pub use peft_kernels::cpu_body::for_each_cpu_body;
use sparse_kernels::{
    Csr, CsrLayout, CsrStructure, csr_add, csr_gather, csr_transpose, sddmm, sparse_linear,
    sparse_linear_fused, spmm, to_dense,
};

/// A small deterministic generator (burn's RNG is process-global; tests run in parallel).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Self(
            seed.wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407)
                | 1,
        )
    }
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        self.next_u32() as f32 / (1u64 << 31) as f32
    }
    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.sym()).collect()
    }
}

/// A random mask of the given density, plus values with some explicit zeros.
pub fn random_sparse(
    rng: &mut Lcg,
    rows: usize,
    cols: usize,
    density: f32,
) -> (CsrStructure, Vec<f32>) {
    let mask: Vec<bool> = (0..rows * cols).map(|_| rng.unit() < density).collect();
    let s = CsrStructure::from_mask(rows, cols, &mask).unwrap();
    let values = (0..s.nnz())
        .map(|_| if rng.unit() < 0.15 { 0.0 } else { rng.sym() })
        .collect();
    (s, values)
}

/// Row-major dense matrix of a structure and values.
pub fn dense_of(s: &CsrStructure, values: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; s.rows() * s.cols()];
    for r in 0..s.rows() {
        for k in s.row_offsets()[r] as usize..s.row_offsets()[r + 1] as usize {
            out[r * s.cols() + s.col_indices()[k] as usize] += values[k];
        }
    }
    out
}

/// A reference result: each element's value, accumulated in f64 from the f32 inputs, and its
/// magnitude `Σ |a_i b_i|`, the sum of the absolute values of the terms that made it. An f32
/// kernel's rounding error is a small multiple of `u · magnitude` (u = 2⁻²⁴), whatever the size
/// of the result: the magnitude is what the tolerance scales with.
#[derive(Clone, Debug)]
pub struct Reference {
    pub value: Vec<f64>,
    pub magnitude: Vec<f64>,
}

impl Reference {
    /// Copies (and single terms): the magnitude is each value's own size.
    pub fn exact(values: &[f32]) -> Self {
        Self {
            value: values.iter().map(|&v| v as f64).collect(),
            magnitude: values.iter().map(|&v| (v as f64).abs()).collect(),
        }
    }

    /// The values rounded to f32, to feed another reference computation.
    pub fn f32(&self) -> Vec<f32> {
        self.value.iter().map(|&v| v as f32).collect()
    }

    /// The element-wise sum (magnitudes add: a kernel may compute each part on its own).
    pub fn plus(&self, other: &Reference) -> Reference {
        assert_eq!(self.value.len(), other.value.len());
        Self {
            value: self
                .value
                .iter()
                .zip(&other.value)
                .map(|(a, b)| a + b)
                .collect(),
            magnitude: (self.magnitude.iter().zip(&other.magnitude))
                .map(|(a, b)| a + b)
                .collect(),
        }
    }

    /// The elements at the given row-major flat indices.
    pub fn sample(&self, flat: &[u64]) -> Reference {
        Self {
            value: flat.iter().map(|&f| self.value[f as usize]).collect(),
            magnitude: flat.iter().map(|&f| self.magnitude[f as usize]).collect(),
        }
    }
}

/// Dense `a [m,k] · b [k,n]`, f64 accumulation, with each element's `Σ_p |a_ip b_pj|`.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Reference {
    let mut value = vec![0.0; m * n];
    let mut magnitude = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut acc, mut abs) = (0f64, 0f64);
            for p in 0..k {
                let term = a[i * k + p] as f64 * b[p * n + j] as f64;
                acc += term;
                abs += term.abs();
            }
            value[i * n + j] = acc;
            magnitude[i * n + j] = abs;
        }
    }
    Reference { value, magnitude }
}

pub fn transpose(a: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[j * m + i] = a[i * n + j];
        }
    }
    out
}

pub fn t2(data: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), device)
}

pub fn t1(data: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(data.to_vec(), [data.len()]), device)
}

pub fn read<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

/// The error an f32 kernel may make on an element of this magnitude: `1e-5 (1 + Σ |a_i b_i|)`.
/// Rounding in any summation order stays below `k·u·magnitude` (u = 2⁻²⁴) and in practice near
/// `√k·u·magnitude` (at most ~4e-6·magnitude for the 4200-term sums here); one dropped term of
/// typical size, or a bf16 accumulation, is far above it (`tolerance_catches_a_dropped_term_and_bf16`).
pub fn tolerance(magnitude: f64) -> f64 {
    1e-5 * (1.0 + magnitude)
}

/// The first element (index, got, want, allowed error) outside `bound(value, magnitude)`.
pub fn first_violation(
    got: &[f32],
    want: &Reference,
    bound: impl Fn(f64, f64) -> f64,
) -> Option<(usize, f32, f64, f64)> {
    got.iter()
        .zip(want.value.iter().zip(&want.magnitude))
        .enumerate()
        .map(|(i, (&g, (&w, &m)))| (i, g, w, bound(w, m)))
        // A NaN error is a violation too.
        .find(|&(_, g, w, tol)| (g as f64 - w).abs().is_nan() || (g as f64 - w).abs() > tol)
}

#[track_caller]
pub fn assert_close(got: &[f32], want: &Reference, what: &str) {
    assert_eq!(got.len(), want.value.len(), "{what}: length");
    if let Some((i, g, w, tol)) = first_violation(got, want, |_, m| tolerance(m)) {
        panic!("{what}: element {i}: got {g}, want {w} (allowed error {tol:e})");
    }
}

/// How the dense operand is laid out in memory.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    /// Row-major contiguous.
    Contiguous,
    /// A transposed view of a row-major tensor.
    Transposed,
    /// A column slice of a wider tensor (non-contiguous rows).
    Sliced,
}

/// Builds a `[r, c]` tensor holding `data` (row-major) with the requested memory layout.
pub fn with_layout(data: &[f32], [r, c]: [usize; 2], layout: Layout, device: &Device) -> Tensor<2> {
    match layout {
        Layout::Contiguous => t2(data, [r, c], device),
        Layout::Transposed => t2(&transpose(data, r, c), [c, r], device).transpose(),
        Layout::Sliced => {
            let mut wide = vec![9.0; r * (c + 3)];
            for i in 0..r {
                wide[i * (c + 3) + 1..i * (c + 3) + 1 + c]
                    .copy_from_slice(&data[i * c..(i + 1) * c]);
            }
            t2(&wide, [r, c + 3], device).slice([0..r, 1..c + 1])
        }
    }
}

/// Checks every op on one random case against the dense reference, with the dense operands in
/// each of `layouts`, on every CPU body this machine supports (references computed once).
pub fn check_all_ops(
    device: &Device,
    seed: u64,
    [m, k, n]: [usize; 3],
    density: f32,
    layouts: &[Layout],
) {
    let mut rng = Lcg::new(seed);
    let (s, values) = random_sparse(&mut rng, m, k, density);
    let dense_a = dense_of(&s, &values);
    let flat = s.flat_indices();
    let (d, t) = (n, n);
    let b = rng.vec(k * n);
    let p = rng.vec(m * d);
    let q = rng.vec(k * d);
    let base = rng.vec(m * k);
    let x = rng.vec(t * k);
    let w = rng.vec(k * m);
    let bias = rng.vec(m);
    let a_t = transpose(&dense_a, m, k);
    let want_spmm = matmul(&dense_a, &b, m, k, n);
    let want_sddmm = matmul(&p, &transpose(&q, k, d), m, d, k).sample(&flat);
    let want_add = Reference::exact(&base).plus(&Reference::exact(&dense_a));
    let want_linear = matmul(&x, &a_t, t, k, m);
    let bias_rows: Vec<f32> = (0..t * m).map(|i| bias[i % m]).collect();
    let want_fused = matmul(&x, &w, t, k, m)
        .plus(&want_linear)
        .plus(&Reference::exact(&bias_rows));
    let (st, host_perm) = s.transpose();

    for_each_cpu_body(|body| {
        for &layout_kind in layouts {
            let what = |op: &str| format!("{body:?} body, {layout_kind:?}, {op}");
            let layout = CsrLayout::new(s.clone(), device);
            let a = Csr::new(layout.clone(), t1(&values, device)).unwrap();

            // spmm: A [m,k] · B [k,n]
            let got = read(spmm(&a, with_layout(&b, [k, n], layout_kind, device)));
            assert_close(&got, &want_spmm, &what("spmm"));

            // sddmm: (P [m,d] · Q[k,d]ᵀ) sampled on A's structure
            let got = read(sddmm(
                &layout,
                with_layout(&p, [m, d], layout_kind, device),
                with_layout(&q, [k, d], layout_kind, device),
            ));
            assert_close(&got, &want_sddmm, &what("sddmm"));

            // csr_add, to_dense, gather
            let got = read(csr_add(&a, with_layout(&base, [m, k], layout_kind, device)));
            assert_close(&got, &want_add, &what("csr_add"));
            let dense = Reference::exact(&dense_a);
            assert_close(&read(to_dense(&a)), &dense, &what("to_dense"));
            let got = read(csr_gather(
                &layout,
                with_layout(&base, [m, k], layout_kind, device),
            ));
            let want = Reference::exact(&base).sample(&flat);
            assert_close(&got, &want, &what("csr_gather"));

            // transpose keeps every entry, explicit zeros included
            let (at, perm) = csr_transpose(&a);
            assert_eq!(at.layout.nnz(), s.nnz(), "transpose nnz");
            assert_eq!(at.shape(), [k, m]);
            let want = Reference::exact(&a_t);
            assert_close(&read(at.to_dense()), &want, &what("transpose"));
            let perm: Vec<i64> = perm.into_data().convert::<i64>().try_into_vec().unwrap();
            assert_eq!(
                perm,
                host_perm.iter().map(|&p| p as i64).collect::<Vec<_>>()
            );
            assert_eq!(at.layout.structure(), &st);

            // sparse_linear: y = x·Aᵀ with x [t, k] (A as [out = m, in = k])
            let got = read(sparse_linear(
                with_layout(&x, [t, k], layout_kind, device),
                &layout,
                t1(&values, device),
            ));
            assert_close(&got, &want_linear, &what("sparse_linear"));

            // fused: y = x·(W + A)ᵀ + bias with W given as [in, out]
            let got = read(sparse_linear_fused(
                t2(&x, [t, k], device),
                t2(&w, [k, m], device),
                Some(t1(&bias, device)),
                &layout,
                t1(&values, device),
            ));
            assert_close(&got, &want_fused, &what("sparse_linear_fused"));
        }
    });
}

/// Gradients of `loss = Σ y²` with `y = x·Sᵀ` by the dense formula:
/// `dY = 2y`, `dx = dY·S`, `dS = dYᵀ·x` sampled on the structure.
pub fn dense_sparse_linear_grads(
    s: &CsrStructure,
    values: &[f32],
    x: &[f32],
    tokens: usize,
) -> (Reference, Reference) {
    let (out, inp) = (s.rows(), s.cols());
    let dense = dense_of(s, values);
    let y = matmul(x, &transpose(&dense, out, inp), tokens, inp, out).f32();
    let dy: Vec<f32> = y.iter().map(|v| 2.0 * v).collect();
    let dx = matmul(&dy, &dense, tokens, out, inp);
    let ds = matmul(&transpose(&dy, tokens, out), x, out, tokens, inp);
    (dx, ds.sample(&s.flat_indices()))
}
