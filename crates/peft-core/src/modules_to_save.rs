//! `modules_to_save`: fully trained copies of whole modules, one per adapter.
//!
//! As in PEFT's `ModulesToSaveWrapper`, the model keeps the original module and every adapter
//! that lists it gets its own copy; the copy of the first active adapter is the one in use, the
//! original is in use when no such adapter is active or adapters are disabled. Here the module's
//! parameters stay where they are in the user's model and the values are swapped.

use std::collections::{BTreeMap, BTreeSet};

use crate::TargetSpec;
use crate::hosts;
use burn::module::Module;
use burn::tensor::TensorData;

/// Originals and per-adapter copies of `modules_to_save` parameters.
#[derive(Clone, Debug, Default)]
pub(crate) struct SavedModules {
    originals: BTreeMap<String, TensorData>,
    /// Values of adapters whose copy is not in the model right now.
    copies: BTreeMap<String, BTreeMap<String, TensorData>>,
    paths: BTreeMap<String, BTreeSet<String>>,
    live: Option<String>,
}

fn is_adapter_param(path: &str) -> bool {
    path.contains(".peft.") || path.starts_with("peft.")
}

impl SavedModules {
    /// Give `adapter` its own copy of the modules `spec` names (starting from the originals).
    pub fn register<M: Module>(&mut self, model: &M, adapter: &str, spec: &TargetSpec) {
        let current = hosts::read_params(model, |p| {
            !is_adapter_param(p)
                && p.rsplit_once('.')
                    .is_some_and(|(module, _)| spec.is_module_to_save(module))
        });
        if current.is_empty() {
            return;
        }
        let live_paths = self.live_paths();
        for (path, value) in &current {
            if !self.originals.contains_key(path) {
                // A path in use by a live copy was captured when that copy was registered.
                debug_assert!(!live_paths.contains(path));
                self.originals.insert(path.clone(), value.clone());
            }
        }
        let copy: BTreeMap<String, TensorData> = current
            .keys()
            .map(|p| (p.clone(), self.originals[p].clone()))
            .collect();
        self.paths
            .insert(adapter.to_string(), copy.keys().cloned().collect());
        self.copies.insert(adapter.to_string(), copy);
    }

    fn live_paths(&self) -> BTreeSet<String> {
        self.live
            .as_ref()
            .and_then(|l| self.paths.get(l))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether `adapter` has modules to save.
    pub fn has(&self, adapter: &str) -> bool {
        self.paths.contains_key(adapter)
    }

    /// Parameter paths whose copy is in use and belongs to `adapter`.
    pub fn live_paths_of(&self, adapter: &str) -> BTreeSet<String> {
        if self.live.as_deref() == Some(adapter) {
            self.live_paths()
        } else {
            BTreeSet::new()
        }
    }

    /// The values of `adapter`'s copy.
    pub fn values<M: Module>(&self, model: &M, adapter: &str) -> BTreeMap<String, TensorData> {
        if self.live.as_deref() == Some(adapter) {
            let paths = self.live_paths();
            hosts::read_params(model, |p| paths.contains(p))
        } else {
            self.copies.get(adapter).cloned().unwrap_or_default()
        }
    }

    /// Set values of `adapter`'s copy (paths it does not own are returned).
    pub fn set_values<M: Module>(
        &mut self,
        model: M,
        adapter: &str,
        values: BTreeMap<String, TensorData>,
    ) -> (M, Vec<String>) {
        let owned = self.paths.get(adapter).cloned().unwrap_or_default();
        let (mine, rest): (BTreeMap<_, _>, BTreeMap<_, _>) =
            values.into_iter().partition(|(p, _)| owned.contains(p));
        let rest = rest.into_keys().collect();
        if self.live.as_deref() == Some(adapter) {
            let (model, missing) = hosts::write_params(model, mine);
            debug_assert!(missing.is_empty());
            (model, rest)
        } else {
            self.copies
                .entry(adapter.to_string())
                .or_default()
                .extend(mine);
            (model, rest)
        }
    }

    /// Put `owner`'s copy (or the originals for `None`) into the model.
    pub fn switch<M: Module>(&mut self, model: M, owner: Option<&str>) -> M {
        if self.live.as_deref() == owner {
            return model;
        }
        let mut model = model;
        if let Some(live) = self.live.take() {
            let paths = self.paths.get(&live).cloned().unwrap_or_default();
            let values = hosts::read_params(&model, |p| paths.contains(p));
            self.copies.insert(live, values);
            let originals: BTreeMap<_, _> = paths
                .iter()
                .filter_map(|p| self.originals.get(p).map(|v| (p.clone(), v.clone())))
                .collect();
            model = hosts::write_params(model, originals).0;
        }
        if let Some(owner) = owner.filter(|o| self.paths.contains_key(*o)) {
            let values = self.copies.remove(owner).unwrap_or_default();
            model = hosts::write_params(model, values).0;
            self.live = Some(owner.to_string());
        }
        model
    }

    /// Forget `adapter`'s copy (restoring the originals if it was in use).
    pub fn remove<M: Module>(&mut self, model: M, adapter: &str) -> M {
        let model = if self.live.as_deref() == Some(adapter) {
            self.switch(model, None)
        } else {
            model
        };
        self.copies.remove(adapter);
        self.paths.remove(adapter);
        model
    }
}
