//! The sparse delta of one weight: `k` values at unique flat indices, held as a CSR layout.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::error::Result;
use peft_core::{Adapter, Created, LayerInfo, LayerKind, LinearBase, PeftError};
use sparse_kernels::{
    Csr, CsrLayout, CsrStructure, ProbeResult, ProbeSink, default_probe_block, grad_topk_probe,
    packed_sparse_lora_linear, sparse_grad_sample, sparse_linear, sparse_lora_linear, to_dense,
};

use crate::config::{InitDeltas, SftConfig};

/// SFT on one linear layer: `W' = W + Δ` with `Δ` sparse.
///
/// `Δ` is stored in PyTorch orientation (`[out, in]`, flat index `o · in + i`, as the
/// reference's `indices` into `W.view(-1)`) as a [`CsrLayout`] (`layout`) and its values
/// (`delta_values`, `[k]`, in CSR order, i.e. by increasing flat index).
///
/// - Activation path ([`PeftLinear`](peft_core::PeftLinear)): `y += sparse_linear(x, Δ)`, an
///   SpMM forward whose backward gives the values' gradient by SDDMM at the `k` positions; no
///   dense weight-shaped tensor and no `W + Δ`.
/// - Weight path: `W + Δᵀ` (burn orientation) by a dense scatter.
///
/// Three optional terms exist only while [`SftSelector`](crate::SftSelector) collects RigL
/// statistics, on the first step of a window (the candidate pool, top-`k` of `|dW|`):
/// - activation path: `probe_anchor`, a zero `[1]` parameter, and `probe_sink`: the output gets
///   [`grad_topk_probe`]`(x, anchor)`, a zero term whose backward pass computes
///   `dW = dYᵀ·x` in blocks of `probe_block` rows and sends only its top-`k` to the sink. No
///   weight-shaped tensor is formed; the anchor's gradient is zero.
/// - weight path: `probe`, a zero `[in, out]` parameter added to the weight, whose gradient is
///   the dense `dW`. There the delta enters through the weight, so autodiff forms the dense
///   gradient of `W + Δ` on every step anyway, and the layer's input and output gradient,
///   which a blockwise probe needs, are not visible to the adapter.
///
/// On the later steps of the window, `candidate_values` (zero values on the pool positions,
/// `candidates`) get the weight gradient sampled there by SDDMM (activation path) or gathered
/// from the weight's gradient (weight path).
#[derive(Module, Debug)]
pub struct SftAdapter {
    /// The delta values, `[k]`, CSR order of `layout`.
    pub delta_values: Param<Tensor<1>>,
    /// Zero, `[in, out]`; only on the first step of a RigL window, weight path.
    pub probe: Option<Param<Tensor<2>>>,
    /// Zero, `[1]`; the tracked input of the blockwise probe; only on the first step of a RigL
    /// window, activation path.
    pub probe_anchor: Option<Param<Tensor<1>>>,
    /// Zero, `[candidates]`; only on later steps of a RigL window.
    pub candidate_values: Option<Param<Tensor<1>>>,
    /// The structure of `Δ`, `[out, in]`.
    #[module(skip)]
    pub layout: CsrLayout,
    /// The RigL candidate positions while they are sampled.
    #[module(skip)]
    pub candidates: Option<CsrLayout>,
    /// Where the blockwise probe sends the candidate pool (with `probe_anchor`).
    #[module(skip)]
    pub probe_sink: Option<Arc<ProbeSink>>,
    /// Rows of `dW` per block of the blockwise probe.
    #[module(skip)]
    pub probe_block: usize,
    /// The host weight's shape in burn orientation, `[in, out]`.
    #[module(skip)]
    pub base_shape: [usize; 2],
    /// Where new tensors are created.
    #[module(skip)]
    pub device: Device,
}

pub use peft_core::rng::random_indices;

/// Deterministic values in `[-scale/2, scale/2)`.
fn spread(path: &str, seed: u64, k: usize, scale: f32) -> Vec<f32> {
    let mut state = peft_core::rng::path_seed(path, seed ^ 0x5151);
    (0..k)
        .map(|_| {
            ((peft_core::rng::splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                * scale
        })
        .collect()
}

pub(crate) fn host_f32(t: Tensor<1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data")
}

pub(crate) fn values_tensor(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), device)
}

impl SftAdapter {
    /// A delta at `indices` (flat, `[out, in]`, any order, unique) with `values` (same order)
    /// for a linear weight of burn shape `[in, out]`.
    ///
    /// # Errors
    /// Out-of-range or repeated indices, or lengths that differ.
    pub fn new(
        path: &str,
        base_shape: [usize; 2],
        indices: &[u64],
        values: &[f32],
        device: &Device,
    ) -> Result<Self> {
        let [inp, out] = base_shape;
        if indices.len() != values.len() {
            return Err(PeftError::ShapeMismatch {
                key: format!("{path}.sft_delta.values"),
                expected: vec![indices.len()],
                found: vec![values.len()],
            });
        }
        let (structure, order) =
            CsrStructure::from_flat_indices(out, inp, indices).map_err(|e| {
                PeftError::InvalidConfig {
                    field: format!("{path}.sft_delta.indices"),
                    reason: e.to_string(),
                }
            })?;
        let ordered: Vec<f32> = order.iter().map(|&p| values[p as usize]).collect();
        Ok(Self {
            delta_values: Param::from_tensor(values_tensor(ordered, device)),
            probe: None,
            probe_anchor: None,
            candidate_values: None,
            layout: CsrLayout::new(structure, device),
            candidates: None,
            probe_sink: None,
            probe_block: default_probe_block(inp),
            base_shape,
            device: device.clone(),
        })
    }

    /// The number of deltas `k`.
    pub fn num_deltas(&self) -> usize {
        self.layout.nnz()
    }

    /// The shape of `Δ`, PyTorch orientation `[out, in]`.
    pub fn delta_shape(&self) -> [usize; 2] {
        self.layout.shape()
    }

    /// The flat indices (`[out, in]` row-major), in the order of the values (increasing).
    pub fn indices(&self) -> Vec<u64> {
        self.layout.structure().flat_indices()
    }

    /// The values on the host, in the order of [`indices`](Self::indices).
    pub fn values(&self) -> Vec<f32> {
        host_f32(self.delta_values.val())
    }

    /// `Δ` as a [`Csr`] (tracked values).
    pub fn csr(&self) -> Csr {
        Csr {
            layout: self.layout.clone(),
            values: self.delta_values.val(),
        }
    }

    /// Replace the structure and values (same `k`), keeping the parameter's id and
    /// trainability. `values` are in the order of `indices`, which must be sorted.
    ///
    /// # Errors
    /// Invalid indices or a different `k`.
    pub fn set_delta(&mut self, indices: &[u64], values: Vec<f32>) -> Result<()> {
        let [out, inp] = self.delta_shape();
        let k = self.num_deltas();
        if indices.len() != k || values.len() != k {
            return Err(PeftError::ShapeMismatch {
                key: "sft_delta".into(),
                expected: vec![k],
                found: vec![indices.len(), values.len()],
            });
        }
        let (structure, order) =
            CsrStructure::from_flat_indices(out, inp, indices).map_err(|e| {
                PeftError::InvalidConfig {
                    field: "sft_delta.indices".into(),
                    reason: e.to_string(),
                }
            })?;
        let ordered: Vec<f32> = order.iter().map(|&p| values[p as usize]).collect();
        self.layout = CsrLayout::new(structure, &self.device);
        self.set_values(ordered);
        Ok(())
    }

    /// Replace the values (CSR order), keeping the parameter's id and trainability.
    pub fn set_values(&mut self, values: Vec<f32>) {
        let t = values_tensor(values, &self.device);
        self.delta_values = peft_core::method::set_param(&self.delta_values, t);
    }

    /// Add (`on`) or remove the dense gradient probe (weight path).
    pub fn set_dense_probe(&mut self, on: bool) {
        if on == self.probe.is_some() {
            return;
        }
        self.probe = on.then(|| {
            // `from_tensor` records `require_grad` (plain backends activate it later).
            Param::from_tensor(Tensor::<2>::zeros(self.base_shape, &self.device))
        });
    }

    /// Add (`on`) or remove the blockwise probe (activation path): from the next backward pass
    /// on, the top-`k` of `|dW|` goes to a fresh sink, read with
    /// [`take_probe`](Self::take_probe).
    pub fn set_probe(&mut self, on: bool) {
        if on == self.probe_anchor.is_some() {
            return;
        }
        self.probe_anchor = on.then(|| Param::from_tensor(Tensor::<1>::zeros([1], &self.device)));
        self.probe_sink = on.then(|| Arc::new(ProbeSink::new()));
    }

    /// Set the blockwise probe's block size (rows of the `[out, in]` gradient; the default is
    /// [`default_probe_block`]`(in)`, about 4 MB of `f32`).
    pub fn set_probe_block(&mut self, rows: usize) {
        self.probe_block = rows.max(1);
    }

    /// What the blockwise probe collected since the last call: the pool (top-`k` of `|dW|`,
    /// flat `[out, in]` indices, sorted) and the gradient there; see [`ProbeSink`].
    pub fn take_probe(&self) -> Option<ProbeResult> {
        self.probe_sink.as_ref()?.take()
    }

    /// Sample the weight gradient at `indices` (sorted flat indices) from the next backward
    /// pass on, or stop (`None`).
    ///
    /// # Errors
    /// Invalid indices.
    pub fn set_candidates(&mut self, indices: Option<&[u64]>) -> Result<()> {
        let Some(indices) = indices else {
            self.candidates = None;
            self.candidate_values = None;
            return Ok(());
        };
        let [out, inp] = self.delta_shape();
        let (structure, _) = CsrStructure::from_flat_indices(out, inp, indices).map_err(|e| {
            PeftError::InvalidConfig {
                field: "sft candidates".into(),
                reason: e.to_string(),
            }
        })?;
        self.candidate_values = Some(Param::from_tensor(Tensor::<1>::zeros(
            [indices.len()],
            &self.device,
        )));
        self.candidates = Some(CsrLayout::new(structure, &self.device));
        Ok(())
    }

    fn dense(csr: &Csr) -> Tensor<2> {
        // [out, in] -> burn's [in, out].
        to_dense(csr).transpose()
    }
}

impl SftAdapter {
    /// The RigL statistics terms added to a layer output `result`: the candidates' sampled
    /// gradient (zero values: [`sparse_grad_sample`], one SDDMM in the backward pass) and the
    /// blockwise probe.
    fn statistics_terms<const D: usize>(&self, x: Tensor<D>, mut result: Tensor<D>) -> Tensor<D> {
        if let (Some(layout), Some(v)) = (&self.candidates, &self.candidate_values) {
            result = sparse_grad_sample(x.clone(), layout, v.val(), result);
        }
        if let Some(p) = &self.probe {
            // The dense probe on the activation path (data-parallel runs): `x·P`, zero, whose
            // gradient is the dense `dW`.
            let [inp, out] = self.base_shape;
            let mut dims = result.dims();
            let tokens = dims[..D - 1].iter().product();
            dims[D - 1] = out;
            result = result
                + x.clone()
                    .reshape([tokens, inp])
                    .matmul(p.val())
                    .reshape(dims);
        }
        if let (Some(anchor), Some(sink)) = (&self.probe_anchor, &self.probe_sink) {
            let [inp, out] = self.base_shape;
            let dims = result.dims();
            let tokens = dims[..D - 1].iter().product();
            let zeros = grad_topk_probe(
                x.reshape([tokens, inp]),
                anchor.val(),
                out,
                self.num_deltas(),
                self.probe_block,
                sink,
            );
            result = result + zeros.reshape(dims);
        }
        result
    }
}

impl Adapter for SftAdapter {
    type MergeState = ();

    /// `scatter(Δ)ᵀ`, plus the dense probe and candidate terms while they exist.
    fn weight_delta(&self, base: Tensor<2>) -> Tensor<2> {
        let mut delta = if self.num_deltas() > 0 {
            Self::dense(&self.csr())
        } else {
            base.zeros_like()
        };
        if let Some(p) = &self.probe {
            delta = delta + p.val();
        }
        if let (Some(layout), Some(v)) = (&self.candidates, &self.candidate_values) {
            delta = delta
                + Self::dense(&Csr {
                    layout: layout.clone(),
                    values: v.val(),
                });
        }
        delta
    }

    fn forward_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        _weight: &Tensor<2>,
        _bias: Option<&Tensor<1>>,
        mut result: Tensor<D>,
    ) -> Tensor<D> {
        if self.num_deltas() > 0 {
            result = result + sparse_linear(x.clone(), &self.layout, self.delta_values.val());
        }
        self.statistics_terms(x, result)
    }

    /// The delta accumulated into the base product ([`sparse_lora_linear`], over a packed base
    /// [`packed_sparse_lora_linear`]), then the RigL statistics terms while they exist.
    fn fused_linear<const D: usize>(
        &self,
        x: &Tensor<D>,
        base: LinearBase<'_>,
        bias: Option<&Tensor<1>>,
    ) -> Option<Tensor<D>> {
        if self.num_deltas() == 0 {
            return None;
        }
        let (values, bias) = (self.delta_values.val(), bias.cloned());
        let y = match base {
            LinearBase::Dense(w) => {
                sparse_lora_linear(x.clone(), w.clone(), bias, None, &self.layout, values)
            }
            LinearBase::Packed(w) => {
                packed_sparse_lora_linear(x.clone(), w, bias, None, &self.layout, values)
            }
        };
        Some(self.statistics_terms(x.clone(), y))
    }

    /// Not reached: [`supports`](Adapter::supports) refuses embeddings (the reference adapts
    /// linear layers only). Computed densely for completeness.
    fn forward_embedding(
        &self,
        ids: Tensor<2, Int>,
        _weight: &Tensor<2>,
        result: Tensor<3>,
    ) -> Tensor<3> {
        let delta = Self::dense(&self.csr()).transpose();
        result + embedding(delta, ids)
    }

    fn supports(&self, kind: LayerKind) -> bool {
        kind == LayerKind::Linear
    }
}

/// Create the adapter `config` asks for on one layer.
///
/// # Errors
/// An embedding layer, or a layer `num_deltas` does not cover.
pub(crate) fn create(config: &SftConfig, info: &LayerInfo) -> Result<Created<SftAdapter>> {
    let path = &info.candidate.path;
    if info.candidate.kind != LayerKind::Linear {
        return Err(PeftError::Unsupported(format!(
            "SFT adapts linear layers only (as the reference); `{path}` is an embedding"
        )));
    }
    let device = info.base.device();
    let base_shape = info.base.dims();
    let numel = base_shape[0] * base_shape[1];
    let k = config.layer_deltas(path, numel)?;
    let indices = random_indices(path, config.seed, numel, k);
    let values = match config.init_deltas {
        InitDeltas::Zeros => vec![0.0; k],
        InitDeltas::Random(scale) => spread(path, config.seed, k, scale),
    };
    let adapter = SftAdapter::new(path, base_shape, &indices, &values, &device)?;
    Ok(Created {
        adapter,
        new_base: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_indices_are_unique_sorted_in_range_and_deterministic() {
        for (numel, k) in [(10, 10), (100, 7), (1000, 0), (50, 49)] {
            let a = random_indices("layers.0.q", 3, numel, k);
            assert_eq!(a.len(), k);
            assert!(a.windows(2).all(|w| w[0] < w[1]));
            assert!(a.iter().all(|&i| i < numel as u64));
            assert_eq!(a, random_indices("layers.0.q", 3, numel, k));
        }
        assert_ne!(
            random_indices("a", 0, 1000, 10),
            random_indices("b", 0, 1000, 10)
        );
    }
}
