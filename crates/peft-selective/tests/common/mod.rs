//! Shared helpers of the peft-selective tests: a small MLP with explicit, deterministic weights
//! (no global seed, so tests can run in parallel) and its loss.
#![allow(dead_code)]

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

/// A 2-layer MLP with burn `Linear`s (`[d_in, d_out]` weights).
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

/// Deterministic pseudo-random values in [-1, 1) from `seed` (an LCG, not `Device::seed`).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn device() -> Device {
    Device::flex().autodiff()
}

pub fn linear(w: Vec<f32>, b: Vec<f32>, d_in: usize, d_out: usize, device: &Device) -> Linear {
    Linear {
        weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [d_in, d_out]), device)),
        bias: Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(b, [d_out]),
            device,
        ))),
    }
}

/// An MLP `d_in -> hidden -> d_out` with weights drawn from `seed`.
pub fn mlp(seed: u64, d_in: usize, hidden: usize, d_out: usize) -> Mlp {
    let dev = device();
    Mlp {
        fc1: linear(
            values(seed, d_in * hidden),
            values(seed + 1, hidden),
            d_in,
            hidden,
            &dev,
        ),
        fc2: linear(
            values(seed + 2, hidden * d_out),
            values(seed + 3, d_out),
            hidden,
            d_out,
            &dev,
        ),
    }
}

impl Mlp {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.fc1.forward(x).tanh())
    }

    pub fn dims(&self) -> (usize, usize, usize) {
        let [d_in, hidden] = self.fc1.weight.dims();
        let [_, d_out] = self.fc2.weight.dims();
        (d_in, hidden, d_out)
    }
}

/// Gradients of a mean squared error on batch `step` (inputs and targets drawn from `step`).
pub fn grads(model: &Mlp, step: u64) -> GradientsParams {
    let (d_in, _, d_out) = model.dims();
    let dev = device();
    let x = Tensor::<2>::from_data(
        TensorData::new(values(1000 + step, 5 * d_in), [5, d_in]),
        &dev,
    );
    let y = Tensor::<2>::from_data(
        TensorData::new(values(2000 + step, 5 * d_out), [5, d_out]),
        &dev,
    );
    let loss = (model.forward(x) - y).powi_scalar(2).mean();
    GradientsParams::from_grads(loss.backward(), model)
}

/// Every float parameter's values by path.
pub fn values_of<M: Module>(model: &M) -> BTreeMap<String, Vec<f32>> {
    peft_core::hosts::read_params(model, |_| true)
        .into_iter()
        .map(|(k, d)| (k, d.iter::<f32>().collect()))
        .collect()
}

/// Bit patterns, so that equality means bit-identical.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}
