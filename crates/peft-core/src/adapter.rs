//! The per-layer math every method implements once, shared by both attach paths.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

use peft_kernels::packed_linear::PackedWeight;

use crate::target::LayerKind;

/// The base weight of a linear layer as [`Adapter::fused_linear`] reads it.
#[derive(Clone, Copy, Debug)]
pub enum LinearBase<'a> {
    /// An f32 weight, `[d_in, d_out]`.
    Dense(&'a Tensor<2>),
    /// A frozen weight kept packed, `[d_out, d_in]` ([`PeftLinear::from_packed`]
    /// (crate::PeftLinear::from_packed)).
    Packed(&'a PackedWeight),
}

/// One adapter on one layer: its parameters and how they change the layer.
///
/// Weights are in burn orientation: a linear weight is `[d_in, d_out]`, an embedding table
/// `[num_embeddings, d_model]`. An implementation is an ordinary burn [`Module`], so optimizers,
/// records and device moves see its parameters.
///
/// The two attach paths use the same adapter value: the weight-space path asks for
/// [`weight_delta`](Adapter::weight_delta) and adds it to the base weight on every forward, the
/// activation-space path asks for [`forward_linear`](Adapter::forward_linear) /
/// [`forward_embedding`](Adapter::forward_embedding), which must give the same result (up to
/// dropout, which only the activation path can apply).
pub trait Adapter: Module + Sync + 'static {
    /// What [`merge`](Adapter::merge) needs to remember to [`unmerge`](Adapter::unmerge) exactly.
    type MergeState: Clone + Send + Sync + std::fmt::Debug + 'static;

    /// The additive change of the effective weight, given the current base weight.
    ///
    /// # Shapes
    /// * `base`: `[rows, cols]`
    /// * returns `[rows, cols]`
    fn weight_delta(&self, base: Tensor<2>) -> Tensor<2>;

    /// Add this adapter's contribution to a linear layer's output.
    ///
    /// # Arguments
    /// * `x` - the layer input, `[..., d_in]`.
    /// * `weight` - the base weight, `[d_in, d_out]`.
    /// * `bias` - the base bias, `[d_out]`, if any.
    /// * `result` - the output so far (base output plus earlier adapters), `[..., d_out]`.
    fn forward_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        weight: &Tensor<2>,
        bias: Option<&Tensor<1>>,
        result: Tensor<D>,
    ) -> Tensor<D>;

    /// Whether [`forward_linear`](Adapter::forward_linear) reads its `weight` argument (DoRA
    /// does; most adapters do not). A layer whose base is kept packed builds the f32 weight for
    /// that call only when an applied adapter says it does; otherwise it passes an empty
    /// placeholder. The default is `false`.
    fn reads_base_weight(&self) -> bool {
        false
    }

    /// When this adapter's contribution to a linear layer is exactly `scale · x · a · b` for an
    /// input on `device` (plain LoRA: no DoRA, no active dropout), its factors `(a, b, scale)`
    /// (`a`: `[d_in, r]`, `b`: `[r, d_out]`).
    ///
    /// A [`PeftLinear`](crate::PeftLinear) whose only applied adapter answers this runs the
    /// base product and the adapter term as one fused op ([`crate::kernels::lora_linear`])
    /// instead of [`forward_linear`](Adapter::forward_linear). The default is `None`.
    fn low_rank_factors(&self, device: &Device) -> Option<(Tensor<2>, Tensor<2>, f64)> {
        let _ = device;
        None
    }

    /// When this adapter computes a linear layer's whole output (base product included) as one
    /// fused op for an input on this device, that output; the default is `None`.
    ///
    /// A [`PeftLinear`](crate::PeftLinear) whose only applied adapter answers this returns it
    /// instead of running the base product and [`forward_linear`](Adapter::forward_linear)
    /// (RoSA and SFT: the sparse term accumulated into the dense or LoRA product, over an f32
    /// or a packed base). It must equal `forward_linear(x, weight, bias, linear(x, weight,
    /// bias))` for the base's f32 weight.
    ///
    /// # Arguments
    /// * `x` - the layer input, `[..., d_in]`.
    /// * `base` - the base weight, f32 or kept packed.
    /// * `bias` - the base bias, `[d_out]`, if any.
    fn fused_linear<const D: usize>(
        &self,
        x: &Tensor<D>,
        base: LinearBase<'_>,
        bias: Option<&Tensor<1>>,
    ) -> Option<Tensor<D>> {
        let _ = (x, base, bias);
        None
    }

    /// Add this adapter's contribution to an embedding lookup.
    ///
    /// # Arguments
    /// * `ids` - token ids, `[batch, seq]`.
    /// * `weight` - the base table, `[num_embeddings, d_model]`.
    /// * `result` - the lookup so far, `[batch, seq, d_model]`.
    fn forward_embedding(
        &self,
        ids: Tensor<2, Int>,
        weight: &Tensor<2>,
        result: Tensor<3>,
    ) -> Tensor<3>;

    /// Fold the adapter into a base weight.
    ///
    /// The default adds [`weight_delta`](Adapter::weight_delta) and remembers nothing.
    fn merge(&self, base: Tensor<2>) -> (Tensor<2>, Option<Self::MergeState>) {
        let delta = self.weight_delta(base.clone());
        (base + delta, None)
    }

    /// Undo [`merge`](Adapter::merge).
    ///
    /// The default subtracts [`weight_delta`](Adapter::weight_delta) of the merged weight, which
    /// is exact for adapters whose delta does not depend on the base.
    fn unmerge(&self, merged: Tensor<2>, state: Option<&Self::MergeState>) -> Tensor<2> {
        let _ = state;
        let delta = self.weight_delta(merged.clone());
        merged - delta
    }

    /// Whether this adapter can sit on a layer of this kind.
    fn supports(&self, kind: LayerKind) -> bool {
        let _ = kind;
        true
    }
}
