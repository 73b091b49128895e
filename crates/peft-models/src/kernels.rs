//! Fused CPU kernels for the models' elementwise hot spots, as a burn backend extension.
//!
//! flex computes the exact (erf) GELU and its backward pass with one scalar `erf` and `exp` per
//! element on one thread: about 16 ms for a `[2048, 1536]` forward on a 2-core Xeon, where
//! PyTorch takes 1 ms (`docs/benchmarks.md`, "MiniLM against PyTorch"). [`gelu`] is the same
//! function with a vectorisable `erf` (Abramowitz & Stegun 7.1.26, absolute error below
//! 1.5e-7, 6e-7 after f32 rounding; the form PyTorch's own vectorised CPU `erf` uses) and `exp` (Cephes' polynomial),
//! compiled for AVX-512 / AVX2+FMA when the CPU has them, over rayon chunks.
//!
//! Implementations: `Flex` (the kernels below), `CubeBackend` and its generated `Fusion`
//! wrapper (default bodies: the backend's own `gelu`, which CubeCL already fuses), and
//! `Autodiff` (its backward pass calls [`GeluBackend::fast_gelu_backward`] of the inner backend).

use burn::backend::{
    Autodiff, Backend, Dispatch,
    autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::Tensor;

/// The extension behind [`gelu`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait GeluBackend: Backend {
    /// `x · Φ(x)`, the exact GELU, elementwise.
    #[fusion(default)]
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu(x)
    }

    /// `grad · (Φ(x) + x · φ(x))`, the GELU's backward pass, elementwise.
    #[fusion(default)]
    fn fast_gelu_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gelu_backward(x, grad)
    }
}

#[cfg(feature = "cube")]
impl GeluBackend for burn_cubecl::CubeBackend {}

impl<B: GeluBackend, C: CheckpointStrategy> GeluBackend for Autodiff<B, C> {
    fn fast_gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: GeluBackend> Backward<B, 1> for GeluBackward {
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                if let Some(node) = node {
                    grads.register::<B>(node.id, B::fast_gelu_backward(ops.state, grad));
                }
            }
        }

        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let input = x.primitive().clone();
                prep.finish(input.clone(), B::fast_gelu(input))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::fast_gelu(x.into_primitive())),
        }
    }
}

/// The exact GELU, `x · Φ(x) = 0.5 · x · (1 + erf(x / √2))`, as `burn::tensor::activation::gelu`
/// computes it, with fast kernels on flex (vectorised, multithreaded, forward and backward).
///
/// Agrees with burn's `gelu` to about 1e-6 absolute (the `erf` approximation's error times
/// `|x| / 2`); differentiable on `Autodiff` devices.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// let x = Tensor::<2>::from_floats([[-1.0, 0.0, 2.0]], &Device::flex());
/// let y = peft_models::kernels::gelu(x.clone());
/// let reference = burn::tensor::activation::gelu(x);
/// let diff = (y - reference).abs().max().into_scalar::<f32>();
/// assert!(diff < 1e-6);
/// ```
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GeluBackend>::fast_gelu(x.into_dispatch()))
}

#[cfg(feature = "flex")]
mod flex {
    use burn::backend::{Flex, ops::ActivationOps, tensor::FloatTensor};
    use burn::tensor::{DType, TensorData};
    use rayon::prelude::*;

    use super::GeluBackend;

    /// Elements per rayon task (64 KiB of f32).
    const CHUNK: usize = 1 << 14;

    impl GeluBackend for Flex {
        fn fast_gelu(x: FloatTensor<Flex>) -> FloatTensor<Flex> {
            if x.dtype() != DType::F32 {
                return <Flex as ActivationOps<Flex>>::gelu(x);
            }
            let mut x = if x.is_contiguous() {
                x
            } else {
                x.to_contiguous()
            };
            if let Some((start, end)) = x.layout().contiguous_offsets()
                && let Some(buf) = x.try_storage_mut::<f32>()
            {
                buf[start..end]
                    .par_chunks_mut(CHUNK)
                    .for_each(|c| kernels::gelu_in_place(c));
                return x;
            }
            let src = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            let mut out = vec![0.0f32; src.len()];
            out.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(o, s)| kernels::gelu_into(s, o));
            let shape = x.layout().shape().clone();
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }

        fn fast_gelu_backward(x: FloatTensor<Flex>, grad: FloatTensor<Flex>) -> FloatTensor<Flex> {
            if x.dtype() != DType::F32 || grad.dtype() != DType::F32 {
                return <Flex as ActivationOps<Flex>>::gelu_backward(x, grad);
            }
            if x.layout().shape() != grad.layout().shape() {
                // Broadcasting between the two: flex's general path handles it.
                return <Flex as ActivationOps<Flex>>::gelu_backward(x, grad);
            }
            let x = if x.is_contiguous() {
                x
            } else {
                x.to_contiguous()
            };
            let mut g = if grad.is_contiguous() {
                grad
            } else {
                grad.to_contiguous()
            };
            let xs = x.as_slice::<f32>().expect("a contiguous f32 tensor");
            if let Some((start, end)) = g.layout().contiguous_offsets()
                && let Some(buf) = g.try_storage_mut::<f32>()
            {
                buf[start..end]
                    .par_chunks_mut(CHUNK)
                    .zip(xs.par_chunks(CHUNK))
                    .for_each(|(gc, xc)| kernels::gelu_grad_in_place(xc, gc));
                return g;
            }
            let gs = g.as_slice::<f32>().expect("a contiguous f32 tensor");
            let mut out = gs.to_vec();
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK))
                .for_each(|(gc, xc)| kernels::gelu_grad_in_place(xc, gc));
            let shape = g.layout().shape().clone();
            FloatTensor::<Flex>::from_data(TensorData::new(out, shape))
        }
    }

    /// The slice loops, compiled for AVX-512, AVX2+FMA and the baseline; the widest the CPU has
    /// runs.
    pub(crate) mod kernels {
        use super::super::math::{gelu, gelu_grad};

        macro_rules! dispatch {
            ($(fn $name:ident($($arg:ident : $ty:ty),*) $body:block)*) => {$(
                pub(crate) fn $name($($arg: $ty),*) {
                    #[inline(always)]
                    fn generic($($arg: $ty),*) $body

                    #[cfg(target_arch = "x86_64")]
                    #[target_feature(enable = "avx512f,avx2,fma")]
                    fn avx512($($arg: $ty),*) {
                        generic($($arg),*)
                    }

                    #[cfg(target_arch = "x86_64")]
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) {
                        generic($($arg),*)
                    }

                    #[cfg(target_arch = "x86_64")]
                    {
                        if std::arch::is_x86_feature_detected!("avx512f") {
                            // SAFETY: `avx512` only needs the target features detected here.
                            #[allow(unsafe_code)]
                            unsafe { avx512($($arg),*) };
                            return;
                        }
                        if std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma")
                        {
                            // SAFETY: `avx2` only needs the target features detected here.
                            #[allow(unsafe_code)]
                            unsafe { avx2($($arg),*) };
                            return;
                        }
                    }
                    generic($($arg),*)
                }
            )*};
        }

        dispatch! {
            fn gelu_in_place(buf: &mut [f32]) {
                for v in buf.iter_mut() {
                    *v = gelu(*v);
                }
            }
            fn gelu_into(src: &[f32], dst: &mut [f32]) {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = gelu(*s);
                }
            }
            fn gelu_grad_in_place(x: &[f32], grad: &mut [f32]) {
                for (g, x) in grad.iter_mut().zip(x) {
                    *g *= gelu_grad(*x);
                }
            }
        }
    }
}

/// Branch-free scalar forms that the compiler vectorises.
mod math {
    /// `exp(z)` for `z ≤ 0` (Cephes' `expf` polynomial; relative error about 1e-7; `z` below
    /// -87 gives about 1.6e-38 instead of a denormal).
    #[inline(always)]
    pub(crate) fn exp_nonpositive(z: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let z = z.max(-87.0);
        let m = z * std::f32::consts::LOG2_E + MAGIC;
        let n = m - MAGIC;
        let r = z - n * LN2_HI - n * LN2_LO;
        let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
            * r
            + 1.666_666_5e-1)
            * r
            + 5.000_000_1e-1;
        let p = p * r * r + r + 1.0;
        // 2ⁿ from the integer left in m's mantissa.
        let e = (m.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
        p * f32::from_bits(e as u32)
    }

    /// `(erf(u), exp(-u²))` (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7 in exact arithmetic,
    /// < 6e-7 in f32).
    #[inline(always)]
    pub(crate) fn erf_and_gauss(u: f32) -> (f32, f32) {
        const P: f32 = 0.327_591_1;
        const A: [f32; 5] = [
            0.254_829_6,
            -0.284_496_74,
            1.421_413_7,
            -1.453_152,
            1.061_405_4,
        ];
        let a = u.abs();
        let t = 1.0 / (1.0 + P * a);
        let poly = ((((A[4] * t + A[3]) * t + A[2]) * t + A[1]) * t + A[0]) * t;
        let gauss = exp_nonpositive(-u * u);
        ((1.0 - poly * gauss).copysign(u), gauss)
    }

    /// `x · Φ(x)`.
    #[inline(always)]
    pub(crate) fn gelu(x: f32) -> f32 {
        let (erf, _) = erf_and_gauss(x * std::f32::consts::FRAC_1_SQRT_2);
        0.5 * x * (1.0 + erf)
    }

    /// `Φ(x) + x · φ(x)`.
    #[inline(always)]
    pub(crate) fn gelu_grad(x: f32) -> f32 {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        let (erf, gauss) = erf_and_gauss(x * std::f32::consts::FRAC_1_SQRT_2);
        0.5 * (1.0 + erf) + x * gauss * INV_SQRT_2PI
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp_matches_std_over_its_range() {
            let mut worst = 0.0f32;
            for i in 0..=200_000 {
                let z = -87.0 * i as f32 / 200_000.0;
                let rel = (exp_nonpositive(z) - z.exp()).abs() / z.exp();
                worst = worst.max(rel);
            }
            assert!(worst < 3e-7, "worst relative error {worst}");
            assert_eq!(exp_nonpositive(0.0), 1.0);
            assert!(exp_nonpositive(-1e30) > 0.0 && exp_nonpositive(-1e30) < 2e-38);
        }

        #[test]
        fn erf_is_within_the_bound_of_a_and_s() {
            let mut worst = 0.0f64;
            for i in -40_000..=40_000 {
                let u = i as f32 / 8_000.0;
                let (erf, gauss) = erf_and_gauss(u);
                worst = worst.max((erf as f64 - libm_erf(u as f64)).abs());
                assert!((gauss as f64 - (-(u as f64).powi(2)).exp()).abs() < 1e-7);
            }
            // A&S bound 1.5e-7 in exact arithmetic; f32 rounding of `1 - poly·gauss` adds a few ulp.
            assert!(worst < 6e-7, "worst absolute error {worst}");
        }

        /// erf in f64 by its Taylor series (|u| ≤ 3) or continued fraction, for reference.
        fn libm_erf(u: f64) -> f64 {
            let a = u.abs();
            let v = if a < 3.0 {
                let (mut term, mut sum, mut n) = (a, a, 0.0);
                while term.abs() > 1e-17 * sum.abs() {
                    n += 1.0;
                    term *= -a * a / n;
                    sum += term / (2.0 * n + 1.0);
                }
                sum * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
                let mut f = a;
                for k in (1..60).rev() {
                    f = a + (k as f64 / 2.0) / f;
                }
                1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
            };
            v.copysign(u)
        }
    }
}
