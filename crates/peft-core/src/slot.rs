//! The named adapters of one layer, which of them are active, and which are merged.

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
};
use burn::tensor::{Device, Int, Tensor};

use crate::adapter::{Adapter, LinearBase};
use crate::error::{PeftError, Result};

/// The adapters attached to one layer, by name.
///
/// Several adapters can be active at once; their contributions add up in activation order.
/// Merged adapters live in the base weight and are skipped by the forward pass; they are unmerged
/// in last-in, first-out order.
#[derive(Clone, Debug)]
pub struct AdapterSlot<A: Adapter> {
    entries: Vec<(String, A)>,
    active: Vec<String>,
    enabled: bool,
    merged: Vec<(String, Option<A::MergeState>)>,
}

impl<A: Adapter> Default for AdapterSlot<A> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            active: Vec::new(),
            enabled: true,
            merged: Vec::new(),
        }
    }
}

impl<A: Adapter> AdapterSlot<A> {
    /// The adapter called `name`, if this layer has one.
    pub fn get(&self, name: &str) -> Option<&A> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    /// Mutable access to the adapter called `name`.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut A> {
        self.entries
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// Names of the adapters of this layer, in insertion order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// `(name, adapter)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &A)> {
        self.entries.iter().map(|(n, a)| (n.as_str(), a))
    }

    /// Whether the slot holds no adapter.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The active adapters, in activation order.
    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// Whether adapters are applied at all (see [`set_enabled`](Self::set_enabled)).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Names of merged adapters, oldest first.
    pub fn merged(&self) -> impl Iterator<Item = &str> {
        self.merged.iter().map(|(n, _)| n.as_str())
    }

    /// Whether `name` is merged into the base weight.
    pub fn is_merged(&self, name: &str) -> bool {
        self.merged.iter().any(|(n, _)| n == name)
    }

    /// Add an adapter. It starts inactive, as in PEFT's `add_adapter`.
    ///
    /// # Errors
    /// [`PeftError::DuplicateAdapter`] if the name is taken.
    pub fn insert(&mut self, name: &str, adapter: A) -> Result<()> {
        if self.get(name).is_some() {
            return Err(PeftError::DuplicateAdapter { name: name.into() });
        }
        self.entries.push((name.to_string(), adapter));
        Ok(())
    }

    /// Replace an existing adapter's value (same name).
    pub fn replace(&mut self, name: &str, adapter: A) {
        if let Some(slot) = self.get_mut(name) {
            *slot = adapter;
        }
    }

    /// Remove an adapter.
    ///
    /// # Errors
    /// [`PeftError::AdapterMerged`] if it is merged; the slot is unchanged.
    pub fn remove(&mut self, name: &str) -> Result<Option<A>> {
        if self.is_merged(name) {
            return Err(PeftError::AdapterMerged { name: name.into() });
        }
        self.active.retain(|n| n != name);
        Ok(self
            .entries
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| self.entries.remove(i).1))
    }

    /// Make exactly `names` active, in this order. Names this layer lacks are skipped, as in PEFT.
    pub fn set_active<S: AsRef<str>>(&mut self, names: &[S]) {
        self.active = names
            .iter()
            .map(AsRef::as_ref)
            .filter(|n| self.get(n).is_some())
            .map(str::to_string)
            .collect();
    }

    /// Turn every adapter off (`false`) or back on (`true`), keeping the active set.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    fn applied(&self) -> impl Iterator<Item = &A> {
        let on = self.enabled;
        self.active
            .iter()
            .filter(move |n| on && !self.is_merged(n))
            .filter_map(|n| self.get(n))
    }

    /// The effective weight: the base plus the deltas of the active, unmerged adapters.
    pub fn effective_weight(&self, base: Tensor<2>) -> Tensor<2> {
        let mut weight = base.clone();
        for adapter in self.applied() {
            weight = weight + adapter.weight_delta(base.clone());
        }
        weight
    }

    /// Add the active, unmerged adapters' contributions to a linear layer's output.
    pub fn forward_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        weight: &Tensor<2>,
        bias: Option<&Tensor<1>>,
        mut result: Tensor<D>,
    ) -> Tensor<D> {
        for adapter in self.applied() {
            result = adapter.forward_linear(x.clone(), weight, bias, result);
        }
        result
    }

    /// The factors of the only applied adapter, if there is exactly one and its contribution
    /// is a plain low-rank product ([`Adapter::low_rank_factors`]).
    pub fn single_low_rank(&self, device: &Device) -> Option<(Tensor<2>, Tensor<2>, f64)> {
        let mut applied = self.applied();
        let only = applied.next()?;
        if applied.next().is_some() {
            return None;
        }
        only.low_rank_factors(device)
    }

    /// Whether an applied adapter reads the base weight in its forward pass
    /// ([`Adapter::reads_base_weight`]).
    pub fn reads_base_weight(&self) -> bool {
        self.applied().any(Adapter::reads_base_weight)
    }

    /// The whole linear output from the only applied adapter's fused op, if there is exactly one
    /// and it has one ([`Adapter::fused_linear`]).
    pub fn single_fused<const D: usize>(
        &self,
        x: &Tensor<D>,
        base: LinearBase<'_>,
        bias: Option<&Tensor<1>>,
    ) -> Option<Tensor<D>> {
        let mut applied = self.applied();
        let only = applied.next()?;
        if applied.next().is_some() {
            return None;
        }
        only.fused_linear(x, base, bias)
    }

    /// Add the active, unmerged adapters' contributions to an embedding lookup.
    pub fn forward_embedding(
        &self,
        ids: Tensor<2, Int>,
        weight: &Tensor<2>,
        mut result: Tensor<3>,
    ) -> Tensor<3> {
        for adapter in self.applied() {
            result = adapter.forward_embedding(ids.clone(), weight, result);
        }
        result
    }

    /// Merge `names` (skipping those already merged) into `base`, in order.
    ///
    /// With `safe`, every intermediate weight is checked for NaN and infinity first.
    ///
    /// # Errors
    /// [`PeftError::NonFiniteMerge`] (with `safe`), naming the adapter; `self` is unchanged then.
    pub fn merge<S: AsRef<str>>(
        &mut self,
        base: Tensor<2>,
        names: &[S],
        safe: bool,
        module: &str,
    ) -> Result<Tensor<2>> {
        let mut weight = base;
        let mut merged = Vec::new();
        for name in names.iter().map(AsRef::as_ref) {
            if self.is_merged(name) || merged.iter().any(|(n, _)| n == name) {
                continue;
            }
            let Some(adapter) = self.get(name) else {
                continue;
            };
            let (next, state) = adapter.merge(weight);
            if safe && !is_finite(&next) {
                return Err(PeftError::NonFiniteMerge {
                    name: name.into(),
                    module: module.into(),
                });
            }
            weight = next;
            merged.push((name.to_string(), state));
        }
        self.merged.extend(merged);
        Ok(weight)
    }

    /// Unmerge every merged adapter, last merged first, and return the restored base.
    pub fn unmerge(&mut self, merged: Tensor<2>) -> Tensor<2> {
        let mut weight = merged;
        while let Some((name, state)) = self.merged.pop() {
            if let Some(adapter) = self.get(&name) {
                weight = adapter.unmerge(weight, state.as_ref());
            }
        }
        weight
    }

    /// Forget which adapters are merged, keeping the base as it is (after `merge_and_unload`).
    pub fn forget_merged(&mut self) {
        self.merged.clear();
    }

    fn map_entries(self, f: impl Fn(A) -> A) -> Self {
        Self {
            entries: self.entries.into_iter().map(|(n, a)| (n, f(a))).collect(),
            ..self
        }
    }
}

/// Whether every value of `t` is finite.
pub fn is_finite<const D: usize>(t: &Tensor<D>) -> bool {
    !t.clone().is_nan().any().into_scalar::<bool>()
        && !t.clone().is_inf().any().into_scalar::<bool>()
}

impl<A: Adapter> Module for AdapterSlot<A> {
    fn collect_devices(&self, mut devices: Devices) -> Devices {
        for (_, a) in &self.entries {
            devices = a.collect_devices(devices);
        }
        devices
    }

    fn fork(self, device: &Device) -> Self {
        self.map_entries(|a| a.fork(device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.map_entries(|a| a.to_device(device))
    }

    fn train(self) -> Self {
        self.map_entries(Module::train)
    }

    fn valid(&self) -> Self {
        self.clone().map_entries(|a| a.valid())
    }

    fn materialize(self) -> Self {
        self.map_entries(Module::materialize)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        for (name, a) in &self.entries {
            visitor.enter_module(name, "Struct:AdapterSlot");
            a.visit(visitor);
            visitor.exit_module(name, "Struct:AdapterSlot");
        }
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let entries = self
            .entries
            .into_iter()
            .map(|(name, a)| {
                mapper.enter_module(&name, "Struct:AdapterSlot");
                let a = a.map(mapper);
                mapper.exit_module(&name, "Struct:AdapterSlot");
                (name, a)
            })
            .collect();
        Self { entries, ..self }
    }
}

impl<A: Adapter> ModuleDisplayDefault for AdapterSlot<A> {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add_formatted(&format!(
                "adapters: {:?}, active: {:?}, enabled: {}, merged: {:?}",
                self.names().collect::<Vec<_>>(),
                self.active,
                self.enabled,
                self.merged().collect::<Vec<_>>()
            ))
            .optional()
    }
}

impl<A: Adapter> ModuleDisplay for AdapterSlot<A> {}
