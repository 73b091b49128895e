//! Dense SM3 (Anil et al., 2019) as a burn [`Optimizer`]: what the reference's `SftSM3`
//! does to every trainable tensor that is not a sparse delta (`modules_to_save`, biases).
//!
//! A tensor of shape `[n_0, …, n_{D-1}]` keeps `D` accumulators, one `[n_i]` vector per
//! dimension (zeros at the start; a 1-D tensor's single accumulator is elementwise). Per step,
//! with `acc_i` broadcast along its dimension:
//!
//! ```text
//! ν = β · min_i acc_i + (1 − β) g²        (β = 0: ν = min_i acc_i + g²)
//! acc_i = max(acc_i, max of ν over every dimension but i)
//! u = g · (ν + ε)^(-1/2);   if μ > 0: u = (1 − μ) u + μ u_prev;   p -= lr · u;   if wd: p -= lr · wd · p
//! ```
//!
//! With β = 0 the reference copies the reduced `ν` into `acc_i` (it is never smaller: SM3's
//! cover property), which the `max` gives too; with β > 0 it takes the `max`, as here.
//!
//! The sparse deltas' counterpart, with row and column accumulators over the delta's weight,
//! is [`SftSm3`](crate::SftSm3); both read the step's learning rate.

use burn::config::Config;
use burn::optim::{ModuleOptimizer, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};

/// The settings of [`Sm3`], with the reference's `SftSM3` defaults.
///
/// ```
/// use peft_sft::Sm3Config;
///
/// // Wherever a burn module optimizer goes (the learning rate comes with each step).
/// let _optim: burn::optim::ModuleOptimizer = Sm3Config::new().with_momentum(0.9).init();
/// ```
#[derive(Config, Debug)]
pub struct Sm3Config {
    /// μ: the weight of the previous update (0: no momentum buffer).
    #[config(default = 0.0)]
    pub momentum: f64,
    /// β: the weight of the accumulators in `ν` (0: `ν = min_i acc_i + g²`).
    #[config(default = 0.0)]
    pub beta: f64,
    /// ε (1e-8).
    #[config(default = 1e-8)]
    pub eps: f64,
    /// Decoupled weight decay, `p -= lr · wd · p` after the update (0).
    #[config(default = 0.0)]
    pub weight_decay: f64,
}

impl Sm3Config {
    /// The bare optimizer (for [`ModuleOptimizer::with_group`]).
    ///
    /// # Returns
    /// An [`Sm3`] with these settings.
    pub fn build(&self) -> Sm3 {
        Sm3 {
            momentum: self.momentum,
            beta: self.beta,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// An SM3 for a whole module.
    ///
    /// # Returns
    /// A [`ModuleOptimizer`] that steps every parameter it is given gradients for with [`Sm3`].
    pub fn init(&self) -> ModuleOptimizer {
        ModuleOptimizer::from(self.build())
    }
}

/// Dense SM3 (see the [module documentation](self) for the update); build it with
/// [`Sm3Config`].
#[derive(Clone, Debug, PartialEq)]
pub struct Sm3 {
    momentum: f64,
    beta: f64,
    eps: f64,
    weight_decay: f64,
}

/// The state of [`Sm3`] for one parameter of rank `D`.
#[derive(Clone, Debug)]
pub struct Sm3TensorState<const D: usize> {
    /// One accumulator per dimension, `[n_i]`, monotone non-decreasing.
    pub accumulators: Vec<Tensor<1>>,
    /// The previous update (only with momentum).
    pub momentum: Option<Tensor<D>>,
}

impl<const D: usize> RecordState for Sm3TensorState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        for (i, acc) in self.accumulators.iter().enumerate() {
            out.push_tensor(prefix, &format!("accumulator.{i}"), acc.clone().into_data());
        }
        if let Some(m) = &self.momentum {
            out.push_tensor(prefix, "momentum", m.clone().into_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let accumulators = (0..D)
            .map(|i| {
                src.take_tensor(prefix, &format!("accumulator.{i}"))
                    .map(|data| Tensor::from_data(data, device))
            })
            .collect::<Option<Vec<_>>>()?;
        let momentum = src
            .take_tensor(prefix, "momentum")
            .map(|data| Tensor::from_data(data, device));
        Some(Self {
            accumulators,
            momentum,
        })
    }
}

impl Optimizer for Sm3 {
    type State<const D: usize> = Sm3TensorState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let dims = tensor.dims();
        let device = tensor.device();
        let (accumulators, previous) = match state {
            Some(s) if s.accumulators.len() == D => (s.accumulators, s.momentum),
            _ => (
                dims.iter().map(|&n| Tensor::zeros([n], &device)).collect(),
                None,
            ),
        };
        // min_i acc_i, each accumulator broadcast along its own dimension.
        let along = |i: usize| {
            let mut shape = [1; D];
            shape[i] = dims[i];
            shape
        };
        let min = accumulators
            .iter()
            .enumerate()
            .map(|(i, acc)| acc.clone().reshape(along(i)).expand(dims))
            .reduce(|a, b| a.min_pair(b))
            .expect("a parameter has at least one dimension");
        let g2 = grad.clone().square();
        let nu = if self.beta > 0.0 {
            min.mul_scalar(self.beta) + g2.mul_scalar(1.0 - self.beta)
        } else {
            min + g2
        };
        let accumulators = accumulators
            .into_iter()
            .enumerate()
            .map(|(i, acc)| {
                let reduced = (0..D)
                    .filter(|&j| j != i)
                    .fold(nu.clone(), |t, j| t.max_dim(j));
                acc.max_pair(reduced.reshape([dims[i]]))
            })
            .collect();
        let mut update = grad / nu.add_scalar(self.eps).sqrt();
        let mut momentum = None;
        if self.momentum > 0.0 {
            if let Some(prev) = previous {
                update = update.mul_scalar(1.0 - self.momentum) + prev.mul_scalar(self.momentum);
            } else {
                update = update.mul_scalar(1.0 - self.momentum);
            }
            momentum = Some(update.clone());
        }
        let mut param = tensor - update.mul_scalar(lr);
        if self.weight_decay != 0.0 {
            param = param.clone() - param.mul_scalar(lr * self.weight_decay);
        }
        (
            param,
            Some(Sm3TensorState {
                accumulators,
                momentum,
            }),
        )
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        Sm3TensorState {
            accumulators: state
                .accumulators
                .into_iter()
                .map(|a| a.to_device(device))
                .collect(),
            momentum: state.momentum.map(|m| m.to_device(device)),
        }
    }
}
