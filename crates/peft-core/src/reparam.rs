//! Weight-space host: adapters on any `Param` of any burn model, through burn's
//! reparameterization hook.

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Reparameterization,
};
use burn::tensor::{Device, Tensor};

use crate::adapter::Adapter;
use crate::hook::visit_host;
use crate::slot::AdapterSlot;
use crate::target::LayerKind;

/// The adapters of one weight, attached with burn's `Reparameterization` hook.
///
/// The layer keeps reading `weight.val()`, which becomes `W + Σ delta(W)` of the active
/// adapters. This works for every burn model without changing it, at the cost of forming the
/// dense effective weight on every forward and a dense weight-shaped gradient on every backward,
/// and without adapter dropout. Its parameters sit under `<layer>.weight.peft.<adapter name>`.
#[derive(Clone, Debug)]
pub struct WeightSlot<A: Adapter> {
    /// The adapters of this weight.
    pub adapters: AdapterSlot<A>,
    /// What kind of layer owns the weight.
    pub kind: LayerKind,
}

impl<A: Adapter> Reparameterization for WeightSlot<A> {
    const NAME: &'static str = "peft";

    fn apply<const D: usize>(&self, base: Tensor<D>) -> Tensor<D> {
        if D != 2 || self.adapters.is_empty() {
            return base;
        }
        let dims = base.dims();
        let weight: Tensor<2> = base.reshape([dims[0], dims[1]]);
        self.adapters.effective_weight(weight).reshape(dims)
    }
}

impl<A: Adapter> Module for WeightSlot<A> {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.adapters.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        Self {
            adapters: self.adapters.fork(device),
            ..self
        }
    }

    fn to_device(self, device: &Device) -> Self {
        Self {
            adapters: self.adapters.to_device(device),
            ..self
        }
    }

    fn train(self) -> Self {
        Self {
            adapters: self.adapters.train(),
            ..self
        }
    }

    fn valid(&self) -> Self {
        Self {
            adapters: self.adapters.valid(),
            kind: self.kind,
        }
    }

    fn materialize(self) -> Self {
        Self {
            adapters: self.adapters.materialize(),
            ..self
        }
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        self.adapters.visit(visitor);
    }

    fn map<M: ModuleMapper>(mut self, mapper: &mut M) -> Self {
        visit_host(&mut self);
        Self {
            adapters: self.adapters.map(mapper),
            kind: self.kind,
        }
    }
}

impl<A: Adapter> ModuleDisplayDefault for WeightSlot<A> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add("adapters", &self.adapters).optional()
    }
}

impl<A: Adapter> ModuleDisplay for WeightSlot<A> {}
