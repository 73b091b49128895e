//! The RoSA adapter of one layer: LoRA factors plus a CSR sparse adapter.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::embedding;
use burn::tensor::{Device, Distribution, Int, Tensor};
use peft_core::error::Result;
use peft_core::kernels::{linear, lora_linear};
use peft_core::packed_linear::packed_lora_linear;
use peft_core::{Adapter, Created, LayerInfo, LayerKind, LinearBase, PeftError, Placement};
use peft_lora::{InitLoraWeights, init_factors};
use sparse_kernels::{
    Csr, CsrLayout, CsrStructure, packed_sparse_lora_linear, sparse_linear, sparse_lora_linear,
    to_dense,
};

use crate::config::{InitRosaWeights, RosaConfig};
use crate::initial::InitialMasks;
use crate::masks::random_structure;

/// RoSA on one layer: `ΔW = s·A·B + Sᵀ` in burn orientation.
///
/// For a weight `W` of shape `[rows, cols]` (a linear layer's `[d_in, d_out]`, an embedding's
/// `[num_embeddings, d_model]`):
/// - `lora_a` `[rows, r]` and `lora_b` `[r, cols]`, absent when `r = 0` (peft-rosa stores the
///   transposes, `rosa_A.weight` and `rosa_B.weight`);
/// - the sparse adapter `S` in PyTorch orientation (`[out, in]` = `[cols, rows]` for a linear
///   layer, `[rows, cols]` for an embedding): a [`CsrLayout`] (`spa`) and its values
///   (`spa_values`, `[nnz]`), absent until a mask is set;
/// - `probe`, a zero `[rows, cols]` parameter that exists only during gradient collection: its
///   gradient is the layer's weight gradient, which the base weight (frozen) does not get.
///
/// On the activation path the sparse term is [`sparse_linear`] (SpMM forward, SDDMM for the
/// values' gradient, no dense weight-shaped tensor), the LoRA term `s·drop(x)·A·B`.
#[derive(Module, Debug)]
pub struct RosaAdapter {
    /// `[rows, r]`.
    pub lora_a: Option<Param<Tensor<2>>>,
    /// `[r, cols]`.
    pub lora_b: Option<Param<Tensor<2>>>,
    /// Values of `S`, `[nnz]`, in CSR order of `spa`.
    pub spa_values: Option<Param<Tensor<1>>>,
    /// Zero, `[rows, cols]`; only while gradients are collected for the mask.
    pub probe: Option<Param<Tensor<2>>>,
    /// Dropout on the LoRA branch input (activation space).
    pub dropout: Dropout,
    /// `alpha / r`, `alpha / √r`, or 1 when `r = 0`.
    #[module(skip)]
    pub scale: f64,
    /// The structure of `S`, once a mask is set.
    #[module(skip)]
    pub spa: Option<CsrLayout>,
    /// The sparse budget of this layer, `int(d · rows · cols)`.
    #[module(skip)]
    pub nnz: usize,
    /// The kind of the host layer (fixes the orientation of `S`).
    #[module(skip)]
    pub kind: LayerKind,
    /// The host's weight shape, `[rows, cols]` (burn orientation).
    #[module(skip)]
    pub base_shape: [usize; 2],
    /// Where new sparse values and the probe are created (the host's device at creation).
    #[module(skip)]
    pub device: Device,
}

impl RosaAdapter {
    /// The LoRA rank (0 without LoRA).
    pub fn rank(&self) -> usize {
        self.lora_a.as_ref().map_or(0, |a| a.shape().dims::<2>()[1])
    }

    /// The shape of `S`, PyTorch orientation, for a base weight of burn shape `[rows, cols]`.
    pub fn spa_shape(kind: LayerKind, [rows, cols]: [usize; 2]) -> [usize; 2] {
        match kind {
            LayerKind::Linear => [cols, rows],
            LayerKind::Embedding => [rows, cols],
        }
    }

    /// Whether the sparse adapter has its mask.
    pub fn has_mask(&self) -> bool {
        self.spa.is_some()
    }

    /// The sparse adapter as a [`Csr`] (tracked values), if its mask is set.
    pub fn spa_csr(&self) -> Option<Csr> {
        match (&self.spa, &self.spa_values) {
            (Some(layout), Some(values)) => Some(Csr {
                layout: layout.clone(),
                values: values.val(),
            }),
            _ => None,
        }
    }

    /// `S` as a dense matrix in burn orientation (`[rows, cols]`).
    fn spa_dense(&self) -> Option<Tensor<2>> {
        let dense = to_dense(&self.spa_csr()?);
        Some(match self.kind {
            LayerKind::Linear => dense.transpose(),
            LayerKind::Embedding => dense,
        })
    }

    /// Set the mask: a fresh values parameter (`[nnz]`, CSR order of `structure`) on the
    /// device of `values`.
    ///
    /// # Errors
    /// A structure of another shape or size than this layer's sparse adapter.
    pub fn set_mask(
        &mut self,
        path: &str,
        structure: CsrStructure,
        values: Tensor<1>,
        trainable: bool,
    ) -> Result<()> {
        let expected = Self::spa_shape(self.kind, self.base_shape);
        if structure.shape() != expected || structure.nnz() != self.nnz {
            return Err(PeftError::ShapeMismatch {
                key: format!("{path} (RoSA mask)"),
                expected: vec![expected[0], expected[1], self.nnz],
                found: vec![structure.rows(), structure.cols(), structure.nnz()],
            });
        }
        let device = values.device();
        self.spa_values = Some(Param::from_tensor(values).set_require_grad(trainable));
        self.spa = Some(CsrLayout::new(structure, &device));
        Ok(())
    }

    /// Add (`on`) or remove the gradient probe.
    pub fn set_probe(&mut self, on: bool) {
        if on == self.probe.is_some() {
            return;
        }
        self.probe =
            on.then(|| Param::from_tensor(Tensor::<2>::zeros(self.base_shape, &self.device)));
    }

    fn lora_delta(&self) -> Option<Tensor<2>> {
        match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => Some(a.val().matmul(b.val()) * self.scale),
            _ => None,
        }
    }
}

fn add(acc: Option<Tensor<2>>, term: Option<Tensor<2>>) -> Option<Tensor<2>> {
    match (acc, term) {
        (Some(a), Some(t)) => Some(a + t),
        (a, t) => a.or(t),
    }
}

impl Adapter for RosaAdapter {
    type MergeState = ();

    fn weight_delta(&self, base: Tensor<2>) -> Tensor<2> {
        let delta = add(self.lora_delta(), self.spa_dense());
        let delta = add(delta, self.probe.as_ref().map(Param::val));
        delta.unwrap_or_else(|| base.zeros_like())
    }

    fn forward_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        _weight: &Tensor<2>,
        _bias: Option<&Tensor<1>>,
        mut result: Tensor<D>,
    ) -> Tensor<D> {
        if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
            let dropped = self.dropout.forward(x.clone());
            result = result + linear(linear(dropped, a.val(), None), b.val(), None) * self.scale;
        }
        if let (Some(layout), Some(values)) = (&self.spa, &self.spa_values) {
            result = result + sparse_linear(x.clone(), layout, values.val());
        }
        if let Some(p) = &self.probe {
            result = result + linear(x, p.val(), None);
        }
        result
    }

    /// The LoRA term through peft-core's fused LoRA op and the sparse term accumulated into it
    /// ([`sparse_lora_linear`], over a packed base [`packed_sparse_lora_linear`]), when dropout
    /// is inactive and no gradient probe is on.
    fn fused_linear<const D: usize>(
        &self,
        x: &Tensor<D>,
        base: LinearBase<'_>,
        bias: Option<&Tensor<1>>,
    ) -> Option<Tensor<D>> {
        if self.probe.is_some() || self.kind != LayerKind::Linear {
            return None;
        }
        let low_rank = match (&self.lora_a, &self.lora_b) {
            (Some(a), Some(b)) => {
                let dropout_off = self.dropout.prob == 0.0 || !x.device().is_autodiff();
                if !dropout_off {
                    return None;
                }
                Some((a.val(), b.val(), self.scale))
            }
            _ => None,
        };
        let (x, bias) = (x.clone(), bias.cloned());
        match (&self.spa, &self.spa_values, low_rank, base) {
            (Some(layout), Some(values), low_rank, LinearBase::Dense(w)) => Some(
                sparse_lora_linear(x, w.clone(), bias, low_rank, layout, values.val()),
            ),
            (Some(layout), Some(values), low_rank, LinearBase::Packed(w)) => Some(
                packed_sparse_lora_linear(x, w, bias, low_rank, layout, values.val()),
            ),
            (_, _, Some((a, b, scale)), LinearBase::Dense(w)) => {
                Some(lora_linear(x, w.clone(), bias, a, b, scale))
            }
            (_, _, Some((a, b, scale)), LinearBase::Packed(w)) => {
                Some(packed_lora_linear(x, w, bias, a, b, scale))
            }
            _ => None,
        }
    }

    fn forward_embedding(
        &self,
        ids: Tensor<2, Int>,
        _weight: &Tensor<2>,
        mut result: Tensor<3>,
    ) -> Tensor<3> {
        if let (Some(a), Some(b)) = (&self.lora_a, &self.lora_b) {
            let rows = embedding(a.val(), ids.clone());
            result = result + linear(rows, b.val(), None) * self.scale;
        }
        // An embedding's sparse rows are looked up from the dense table (O(vocab · dim) per
        // forward); linear layers, the common target, never form it.
        if let Some(dense) = self.spa_dense() {
            result = result + embedding(dense, ids.clone());
        }
        if let Some(p) = &self.probe {
            result = result + embedding(p.val(), ids);
        }
        result
    }

    fn merge(&self, base: Tensor<2>) -> (Tensor<2>, Option<()>) {
        let delta = self.weight_delta(base.clone());
        (base + delta, None)
    }
}

/// Create the adapter `config` asks for on one layer, its mask from `masks`.
///
/// # Errors
/// Dropout in weight space, or given masks that lack the layer or do not fit it.
pub(crate) fn create(
    config: &RosaConfig,
    info: &LayerInfo,
    masks: &InitialMasks,
) -> Result<Created<RosaAdapter>> {
    let path = &info.candidate.path;
    let (r, alpha, d) = config.layer_settings(path)?;
    let device = info.base.device();
    let base_shape = info.base.dims();
    let [rows, cols] = base_shape;
    let kind = info.candidate.kind;
    if info.placement == Placement::Weight
        && config.lora_dropout > 0.0
        && !config.base.inference_mode
    {
        return Err(PeftError::unsupported_field(
            "lora_dropout",
            config.lora_dropout,
            format!(
                "`{path}` is a plain layer, adapted in weight space, where dropout on the adapter \
                 input cannot be applied; declare it as `PeftLinear`/`PeftEmbedding` or set lora_dropout = 0"
            ),
        ));
    }
    let init = config.init_lora_weights;
    let (lora_a, lora_b) = if r == 0 {
        (None, None)
    } else {
        let lora_init = match init {
            InitRosaWeights::Default => InitLoraWeights::Default,
            InitRosaWeights::Gaussian => InitLoraWeights::Gaussian,
            InitRosaWeights::Random => InitLoraWeights::Random,
        };
        let (a, b) = init_factors(&lora_init, kind, base_shape, r, &device)
            .expect("RoSA's inits are LoRA's drawn inits");
        (Some(Param::from_tensor(a)), Some(Param::from_tensor(b)))
    };
    let nnz = (d * (rows * cols) as f64) as usize;
    let mut adapter = RosaAdapter {
        lora_a,
        lora_b,
        spa_values: None,
        probe: None,
        dropout: DropoutConfig::new(config.lora_dropout).init(),
        scale: config.scaling(r, alpha),
        spa: None,
        nnz,
        kind,
        base_shape,
        device: device.clone(),
    };
    if nnz > 0 {
        let [sr, sc] = RosaAdapter::spa_shape(kind, base_shape);
        let structure = match masks {
            InitialMasks::Given(masks) => Some(masks.get(path).cloned().ok_or_else(|| {
                PeftError::InvalidConfig {
                    field: "masks".into(),
                    reason: format!(
                        "no mask for `{path}` (masks are matched by exact module path; the masks \
                         have: {})",
                        masks.iter().map(|(p, _)| p).collect::<Vec<_>>().join(", ")
                    ),
                }
            })?),
            InitialMasks::Random(seed) => Some(random_structure(path, sr, sc, nnz, *seed)),
            InitialMasks::None => None,
        };
        if let Some(structure) = structure {
            let values = if init == InitRosaWeights::Random {
                let bound = 1.0 / (rows as f64).sqrt();
                Tensor::<1>::random([nnz], Distribution::Uniform(-bound, bound), &device)
            } else {
                Tensor::<1>::zeros([nnz], &device)
            };
            adapter.set_mask(path, structure, values, true)?;
        }
    }
    Ok(Created {
        adapter,
        new_base: None,
    })
}
