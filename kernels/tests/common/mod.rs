//! Seeded normal test data shared by the packed-weight and head-loss tests.

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// `len` draws of N(0, 1) from `seed`.
pub fn random_values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    TensorData::random::<f32, _, _>([len], Distribution::Normal(0.0, 1.0), &mut rng)
        .try_to_vec::<f32>()
        .unwrap()
}

/// A tensor of [`random_values`] on `device`.
pub fn random<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let len = shape.iter().product();
    Tensor::from_data(TensorData::new(random_values(len, seed), shape), device)
}
