//! Shared pieces of the cross-crate conformance suite: the tiny model of the PEFT fixtures, in
//! both attach paths, and helpers to compare tensors.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{Adapter, PeftEmbedding, PeftLinear};

/// A linear layer the tiny model can use: plain (weight-space adapters) or [`PeftLinear`].
pub trait Proj: Module + burn::module::ModuleDisplay {
    /// Build from a plain linear layer.
    fn from_linear(l: Linear) -> Self;
    /// Apply.
    fn apply(&self, x: Tensor<3>) -> Tensor<3>;
}

impl Proj for Linear {
    fn from_linear(l: Linear) -> Self {
        l
    }
    fn apply(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward(x)
    }
}

impl<A: Adapter> Proj for PeftLinear<A> {
    fn from_linear(l: Linear) -> Self {
        l.into()
    }
    fn apply(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward(x)
    }
}

/// An embedding the tiny model can use.
pub trait Emb: Module + burn::module::ModuleDisplay {
    /// Build from a plain embedding.
    fn from_embedding(e: Embedding) -> Self;
    /// Look up.
    fn lookup(&self, ids: Tensor<2, Int>) -> Tensor<3>;
}

impl Emb for Embedding {
    fn from_embedding(e: Embedding) -> Self {
        e
    }
    fn lookup(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward(ids)
    }
}

impl<A: Adapter> Emb for PeftEmbedding<A> {
    fn from_embedding(e: Embedding) -> Self {
        e.into()
    }
    fn lookup(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward(ids)
    }
}

/// Attention-like block of the tiny model.
#[derive(Module, Debug)]
pub struct Attn<P> {
    /// Query.
    pub q_proj: P,
    /// Key.
    pub k_proj: P,
    /// Value.
    pub v_proj: P,
    /// Output.
    pub o_proj: P,
}

/// MLP block of the tiny model.
#[derive(Module, Debug)]
pub struct Mlp<P> {
    /// Up projection.
    pub up_proj: P,
    /// Down projection.
    pub down_proj: P,
}

/// One layer.
#[derive(Module, Debug)]
pub struct Block<P> {
    /// Attention part.
    pub self_attn: Attn<P>,
    /// MLP part.
    pub mlp: Mlp<P>,
}

/// The model of `tests/fixtures/make_peft_fixtures.py`, field for field.
#[derive(Module, Debug)]
pub struct TinyModel<P, E> {
    /// Token embedding.
    pub embed_tokens: E,
    /// Layers.
    pub layers: Vec<Block<P>>,
    /// Head.
    pub classifier: P,
}

/// Vocabulary size of the tiny model.
pub const VOCAB: usize = 50;
/// Hidden size.
pub const D: usize = 16;
/// MLP size.
pub const F: usize = 32;
/// Classes.
pub const CLASSES: usize = 4;

impl<P: Proj, E: Emb> TinyModel<P, E> {
    /// Apply the model to `[batch, seq]` token ids; returns `[batch, seq, CLASSES]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let mut h = self.embed_tokens.lookup(ids);
        for l in &self.layers {
            let a = &l.self_attn;
            let mixed = a.q_proj.apply(h.clone())
                * burn::tensor::activation::sigmoid(a.k_proj.apply(h.clone()))
                + a.v_proj.apply(h.clone());
            h = h.clone() + a.o_proj.apply(mixed);
            h = h.clone()
                + l.mlp
                    .down_proj
                    .apply(burn::tensor::activation::relu(l.mlp.up_proj.apply(h)));
        }
        self.classifier.apply(h)
    }

    /// Build from PyTorch-named weights (`layers.0.self_attn.q_proj.weight` as `[out, in]`).
    pub fn from_torch(weights: &BTreeMap<String, TensorData>, device: &Device) -> Self {
        let linear = |name: &str| {
            let w = Tensor::<2>::from_data(weights[&format!("{name}.weight")].clone(), device);
            let b = Tensor::<1>::from_data(weights[&format!("{name}.bias")].clone(), device);
            P::from_linear(Linear {
                weight: Param::from_tensor(w.transpose()).set_require_grad(false),
                bias: Some(Param::from_tensor(b).set_require_grad(false)),
            })
        };
        let layers = (0..2)
            .map(|i| Block {
                self_attn: Attn {
                    q_proj: linear(&format!("layers.{i}.self_attn.q_proj")),
                    k_proj: linear(&format!("layers.{i}.self_attn.k_proj")),
                    v_proj: linear(&format!("layers.{i}.self_attn.v_proj")),
                    o_proj: linear(&format!("layers.{i}.self_attn.o_proj")),
                },
                mlp: Mlp {
                    up_proj: linear(&format!("layers.{i}.mlp.up_proj")),
                    down_proj: linear(&format!("layers.{i}.mlp.down_proj")),
                },
            })
            .collect();
        let emb = Tensor::<2>::from_data(weights["embed_tokens.weight"].clone(), device);
        Self {
            embed_tokens: E::from_embedding(Embedding {
                weight: Param::from_tensor(emb),
            }),
            layers,
            classifier: linear("classifier"),
        }
    }
}

/// Deterministic pseudo-random values in `[-bound, bound]`, independent of burn's global RNG
/// (which tests running in parallel threads share).
pub fn spread(seed: u64, salt: usize, n: usize, bound: f64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = ((i + 1) as f64 * 12.9898 + (salt as f64 + 1.0) * 78.233 + seed as f64 * 3.7)
                .sin()
                * 43_758.545_3;
            ((x - x.floor()) * 2.0 - 1.0) as f32 * bound as f32
        })
        .collect()
}

/// Pseudo-random PyTorch-layout weights for the tiny model, reproducible from `seed`.
pub fn random_torch_weights(seed: u64, _device: &Device) -> BTreeMap<String, TensorData> {
    let mut w = BTreeMap::new();
    let mut salt = 0;
    let mut lin = |name: String, out: usize, inp: usize| {
        let bound = 1.0 / (inp as f64).sqrt();
        salt += 2;
        w.insert(
            format!("{name}.weight"),
            TensorData::new(spread(seed, salt, out * inp, bound), [out, inp]),
        );
        w.insert(
            format!("{name}.bias"),
            TensorData::new(spread(seed, salt + 1, out, bound), [out]),
        );
    };
    for i in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            lin(format!("layers.{i}.self_attn.{p}"), D, D);
        }
        lin(format!("layers.{i}.mlp.up_proj"), F, D);
        lin(format!("layers.{i}.mlp.down_proj"), D, F);
    }
    lin("classifier".into(), CLASSES, D);
    w.insert(
        "embed_tokens.weight".into(),
        TensorData::new(spread(seed, 999, VOCAB * D, 1.7), [VOCAB, D]),
    );
    w
}

/// Fixed token ids `[2, 5]`.
pub fn token_ids(device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(vec![3i64, 17, 42, 0, 9, 11, 49, 25, 3, 8], [2, 5]),
        device,
    )
}

/// Largest absolute difference.
pub fn max_diff<const N: usize>(a: &Tensor<N>, b: &Tensor<N>) -> f32 {
    (a.clone() - b.clone()).abs().max().into_scalar::<f32>()
}

/// The tiny model with plain layers: adapters attach in weight space.
pub type WeightModel = TinyModel<Linear, Embedding>;
/// The tiny model with [`PeftLinear`] / [`PeftEmbedding`]: adapters attach in activation space.
pub type ActivationModel =
    TinyModel<PeftLinear<peft_lora::LoraAdapter>, PeftEmbedding<peft_lora::LoraAdapter>>;

/// Path of a file under `tests/fixtures`.
pub fn fixture(rel: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// A regression batch for burn-train: token ids and targets `[batch, seq, CLASSES]`.
#[cfg(feature = "learner")]
#[derive(Clone, Debug)]
pub struct Batch {
    /// Inputs, `[batch, seq]`.
    pub ids: Tensor<2, Int>,
    /// Targets, `[batch, seq, CLASSES]`.
    pub targets: Tensor<3>,
}

#[cfg(feature = "learner")]
impl<P: Proj, E: Emb> TinyModel<P, E> {
    fn regression(&self, batch: Batch) -> burn::train::RegressionOutput {
        let out = self.forward(batch.ids);
        let [b, s, c] = out.dims();
        let output = out.reshape([b * s, c]);
        let targets = batch.targets.reshape([b * s, c]);
        let loss = (output.clone() - targets.clone())
            .powi_scalar(2)
            .mean()
            .reshape([1]);
        burn::train::RegressionOutput {
            loss,
            output,
            targets,
        }
    }
}

#[cfg(feature = "learner")]
impl<P: Proj, E: Emb> burn::train::TrainStep for TinyModel<P, E> {
    type Input = Batch;
    type Output = burn::train::RegressionOutput;

    fn step(&self, item: Batch) -> burn::train::TrainOutput<Self::Output> {
        let out = self.regression(item);
        burn::train::TrainOutput::new(self, out.loss.backward(), out)
    }
}

#[cfg(feature = "learner")]
impl<P: Proj, E: Emb> burn::train::InferenceStep for TinyModel<P, E> {
    type Input = Batch;
    type Output = burn::train::RegressionOutput;

    fn step(&self, item: Batch) -> Self::Output {
        self.regression(item)
    }
}
