//! `PeftModel`: a burn model with named adapters of one method, managed like PEFT's
//! `PeftModel` / `LoraModel`.

use std::collections::{BTreeMap, BTreeSet};

use burn::module::Module;

use crate::adapter::Adapter;
use crate::error::{PeftError, Result};
use crate::hosts::{self, Created, HostView, LayerInfo};
use crate::method::{BiasMode, Method};
use crate::modules_to_save::SavedModules;
use crate::step::{Controller, Stepper, Tuned};
use crate::target::ModelType;

/// One adapter known to a [`PeftModel`].
#[derive(Clone, Debug)]
pub struct AdapterEntry<C> {
    /// Its configuration.
    pub config: C,
    /// The layers it adapts.
    pub layers: Vec<String>,
}

/// A burn model carrying adapters of the method `C` (its config type), e.g.
/// `PeftModel<MyModel, LoraConfig>` (`peft_lora::LoraModel<MyModel>`).
///
/// Layers declared as [`PeftLinear`](crate::PeftLinear) / [`PeftEmbedding`](crate::PeftEmbedding)
/// get activation-space adapters; plain `Linear` / `Embedding` layers get weight-space ones. All
/// operations are all-or-nothing: on an error the model is unchanged.
#[derive(Clone, Debug)]
pub struct PeftModel<M, C> {
    pub(crate) model: M,
    pub(crate) adapters: BTreeMap<String, AdapterEntry<C>>,
    active: Vec<String>,
    enabled: bool,
    pub(crate) saved: SavedModules,
}

impl<M: Module, C: Method> PeftModel<M, C> {
    /// Wrap `model` and attach the adapter `"default"`, active and trainable
    /// (PEFT's `get_peft_model`).
    ///
    /// # Errors
    /// Invalid config, or targets that match nothing.
    pub fn new(model: M, config: C) -> Result<Self> {
        let mut this = Self {
            model,
            adapters: BTreeMap::new(),
            active: Vec::new(),
            enabled: true,
            saved: SavedModules::default(),
        };
        this.add_adapter("default", config)?;
        this.set_adapter(&["default"])?;
        Ok(this)
    }

    /// [`new`](Self::new) for a model that knows its type ([`ModelType`]): an unset
    /// `target_modules` takes PEFT's default for it (LLaMA: `q_proj`, `v_proj`; BERT: `query`,
    /// `value`), as PEFT's `get_peft_model` does.
    ///
    /// # Errors
    /// As [`new`](Self::new): a type without a default and unset targets give
    /// [`PeftError::TargetNotFound`] listing every candidate.
    pub fn new_typed(model: M, config: C) -> Result<Self>
    where
        M: ModelType,
    {
        let mut this = Self::empty(model);
        this.add_adapter_typed("default", config)?;
        this.set_adapter(&["default"])?;
        Ok(this)
    }

    /// [`add_adapter`](Self::add_adapter) for a model that knows its type: an unset
    /// `target_modules` takes PEFT's default for it (see [`new_typed`](Self::new_typed)).
    ///
    /// # Errors
    /// As [`add_adapter`](Self::add_adapter).
    pub fn add_adapter_typed(&mut self, name: &str, config: C) -> Result<()>
    where
        M: ModelType,
    {
        let config = match self.model.model_type() {
            Some(model_type) => config.with_default_targets(model_type),
            None => config,
        };
        self.add_adapter(name, config)
    }

    /// Wrap `model` without any adapter.
    pub fn empty(model: M) -> Self {
        Self {
            model,
            adapters: BTreeMap::new(),
            active: Vec::new(),
            enabled: true,
            saved: SavedModules::default(),
        }
    }

    /// Add an adapter. It is inactive and frozen until [`set_adapter`](Self::set_adapter).
    /// The config is first completed from the model ([`Method::for_model`]).
    ///
    /// # Errors
    /// A taken name, an invalid config, targets that match nothing, or a second adapter with
    /// `bias != "none"`.
    pub fn add_adapter(&mut self, name: &str, config: C) -> Result<()> {
        config.validate()?;
        let config = config.for_model(&self.model)?;
        let factory = config.factory()?;
        self.add_adapter_with(name, config, factory)
    }

    /// [`add_adapter`](Self::add_adapter) with the adapter of each selected layer made by
    /// `create` instead of the config's [`Method::factory`]: for adapters whose start a method
    /// knows beyond its config (combinations of existing adapters, such as LoRA's weighted
    /// adapters; RoSA masks given in-process).
    ///
    /// # Errors
    /// As [`add_adapter`](Self::add_adapter), and whatever `create` returns.
    pub fn add_adapter_with<F>(&mut self, name: &str, config: C, create: F) -> Result<()>
    where
        F: FnMut(&LayerInfo) -> Result<Created<C::Adapter>> + 'static,
    {
        config.validate()?;
        if self.adapters.contains_key(name) {
            return Err(PeftError::DuplicateAdapter { name: name.into() });
        }
        if config.bias() != BiasMode::None
            && self
                .adapters
                .values()
                .any(|e| e.config.bias() != BiasMode::None)
        {
            return Err(PeftError::InvalidConfig {
                field: "bias".into(),
                reason: "only one adapter per model may train base biases".into(),
            });
        }
        let spec = config.target_spec()?;
        let mut model = self.model.clone();
        let layers = hosts::attach(&mut model, name, &spec, create)?;
        self.model = model;
        if config.has_modules_to_save() {
            self.saved.register(&self.model, name, &spec);
        }
        self.adapters
            .insert(name.to_string(), AdapterEntry { config, layers });
        self.refresh_trainable();
        Ok(())
    }

    /// The adapters, by name.
    pub fn adapters(&self) -> &BTreeMap<String, AdapterEntry<C>> {
        &self.adapters
    }

    /// The config of adapter `name`, for fields that do not change its layers' shapes (e.g.
    /// AdaLoRA's rank pattern, written in before saving).
    ///
    /// # Errors
    /// An unknown name.
    pub fn config_mut(&mut self, name: &str) -> Result<&mut C> {
        self.check_known(name)?;
        Ok(&mut self.adapters.get_mut(name).expect("checked above").config)
    }

    /// The active adapters, in activation order.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    fn check_known(&self, name: &str) -> Result<()> {
        if self.adapters.contains_key(name) {
            Ok(())
        } else {
            Err(PeftError::UnknownAdapter {
                name: name.into(),
                available: self.adapters.keys().cloned().collect(),
            })
        }
    }

    /// Make `names` the active adapters; their deltas add up. Active adapters are trainable
    /// unless their config is in inference mode; the others are frozen.
    ///
    /// # Errors
    /// An unknown name.
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            self.check_known(n)?;
        }
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let set = names.clone();
        hosts::for_each(&mut self.model, move |host: HostView<'_, C::Adapter>| {
            host.slot.set_active(&set);
            Ok(())
        })?;
        self.active = names;
        self.refresh_trainable();
        Ok(())
    }

    /// Turn all adapters off (the base model's output) or back on. Turning them off unmerges
    /// merged adapters first, as PEFT does.
    pub fn set_enabled(&mut self, enabled: bool) {
        if !enabled {
            self.unmerge_adapter();
        }
        hosts::for_each(&mut self.model, move |host: HostView<'_, C::Adapter>| {
            host.slot.set_enabled(enabled);
            Ok(())
        })
        .expect("enabling cannot fail");
        self.enabled = enabled;
        self.refresh_trainable();
    }

    /// Whether adapters are applied.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Remove an adapter from every layer.
    ///
    /// # Errors
    /// An unknown name, or a merged adapter (the model is unchanged).
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.check_known(name)?;
        let target = name.to_string();
        hosts::for_each(&mut self.model, move |host: HostView<'_, C::Adapter>| {
            host.slot.remove(&target).map(|_| ())
        })?;
        self.adapters.remove(name);
        self.active.retain(|n| n != name);
        let model = self.model.clone();
        self.model = self.saved.remove(model, name);
        self.refresh_trainable();
        Ok(())
    }

    /// Merge adapters into the base weights (`None`: the active ones), in order.
    ///
    /// With `safe`, a NaN or infinite merged weight leaves every weight untouched and returns
    /// [`PeftError::NonFiniteMerge`] naming the adapter.
    ///
    /// A base kept packed ([`pack_base`](Self::pack_base)) is dequantized, merged and quantized
    /// again in its format, as PEFT merges into a 4-bit base: the rounding moves the outputs by
    /// about the format's own quantization error, and unmerging does not give the original
    /// packed values back. [`unpack_base`](Self::unpack_base) first for an exact merge.
    ///
    /// # Errors
    /// Unknown names, or a non-finite merge with `safe`.
    pub fn merge_adapter(&mut self, names: Option<&[&str]>, safe: bool) -> Result<()> {
        let names: Vec<String> = match names {
            Some(n) => {
                for name in n {
                    self.check_known(name)?;
                }
                n.iter().map(|s| s.to_string()).collect()
            }
            None => self.active.clone(),
        };
        hosts::for_each(
            &mut self.model,
            move |mut host: HostView<'_, C::Adapter>| merge_host(&mut host, &names, safe),
        )
    }

    /// Unmerge every merged adapter (last merged first), restoring the base weights.
    pub fn unmerge_adapter(&mut self) {
        hosts::for_each(&mut self.model, |mut host: HostView<'_, C::Adapter>| {
            if host.slot.merged().next().is_some() {
                let base = host.base_weight();
                let restored = host.slot.unmerge(base);
                host.set_base_weight(restored)?;
            }
            Ok(())
        })
        .expect("unmerging cannot fail");
    }

    /// Merge the active adapters and return the model without adapters: weight-space slots are
    /// removed (`Module::materialize`), activation-space layers keep no adapter.
    ///
    /// # Errors
    /// A non-finite merge with `safe`.
    pub fn merge_and_unload(mut self, safe: bool) -> Result<M> {
        self.merge_adapter(None, safe)?;
        Ok(self.unload())
    }

    /// [`merge_and_unload`](Self::merge_and_unload) restricted to the layers whose path in the
    /// model full-matches `module_regex` (the reference SFT's `merge_and_unload(module_regex)`):
    /// every other layer is unloaded without merging.
    ///
    /// # Errors
    /// An invalid regular expression, or a non-finite merge with `safe` (nothing is merged
    /// then).
    pub fn merge_and_unload_matching(mut self, module_regex: &str, safe: bool) -> Result<M> {
        let re = crate::target::full_match(module_regex)?;
        let names = self.active.clone();
        hosts::for_each(
            &mut self.model,
            move |mut host: HostView<'_, C::Adapter>| {
                if !re.is_match(&host.path) {
                    return Ok(());
                }
                merge_host(&mut host, &names, safe)
            },
        )?;
        Ok(self.unload())
    }

    /// The model without adapters and without merging what is not merged yet.
    pub fn unload(mut self) -> M {
        hosts::for_each(&mut self.model, |host: HostView<'_, C::Adapter>| {
            host.slot.forget_merged();
            let names: Vec<String> = host.slot.names().map(str::to_string).collect();
            for n in names {
                host.slot.remove(&n)?;
            }
            Ok(())
        })
        .expect("unloading cannot fail");
        // Empty weight slots are identities; `materialize` removes them.
        self.model.materialize()
    }

    /// Keep the frozen base of every `PeftLinear` layer whose path `select` accepts packed in
    /// `format` (QLoRA's NF4, or a GGUF block format); returns the paths packed. The adapters
    /// then train over the packed base, whose products read the packed blocks.
    ///
    /// # Errors
    /// A layer whose weight the format cannot store (named); nothing is packed then.
    pub fn pack_base(
        &mut self,
        format: peft_kernels::quant::PackedFormat,
        select: impl Fn(&str) -> bool + 'static,
    ) -> Result<Vec<String>> {
        hosts::pack_linears::<M, C::Adapter>(&mut self.model, format, select)
    }

    /// Give every packed base an f32 weight again (its packed values, dequantized): what a
    /// full-precision [`merge_and_unload`](Self::merge_and_unload) starts from. (Merging into a
    /// packed base quantizes the merged weight again, which rounds.) Returns how many layers
    /// were unpacked.
    ///
    /// # Errors
    /// None today; kept for symmetry with [`pack_base`](Self::pack_base).
    pub fn unpack_base(&mut self) -> Result<usize> {
        hosts::unpack_linears::<M, C::Adapter>(&mut self.model)
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Replace the wrapped model by `f(model)` (an optimizer step, a device move, …).
    pub fn map_model(&mut self, f: impl FnOnce(M) -> M) {
        self.model = f(self.model.clone());
    }

    /// The model with its adapters, leaving the wrapper.
    pub fn into_model(self) -> M {
        self.model
    }

    /// Re-wrap a model that came out of [`into_model`](Self::into_model) (after training).
    pub fn with_model(mut self, model: M) -> Self {
        self.model = model;
        self
    }

    /// The adapters that train: active, enabled, not in inference mode.
    pub fn trained_adapters(&self) -> Vec<String> {
        if !self.enabled {
            return Vec::new();
        }
        self.active
            .iter()
            .filter(|n| !self.adapters[*n].config.inference_mode())
            .cloned()
            .collect()
    }

    /// The step runner for a run of `total_steps` optimizer steps: every controller the
    /// trained adapters' methods need ([`Method::controllers`]), built from their configs and
    /// prepared on the model (which this call updates: probes, known masks, trainability).
    /// Train with [`Stepper::train`].
    ///
    /// # Errors
    /// A config that cannot train, or a controller's `prepare` error (the model is unchanged).
    pub fn stepper(&mut self, total_steps: usize) -> Result<Stepper<M>> {
        let mut stepper = Stepper::new();
        let mut model = self.model.clone();
        for name in self.trained_adapters() {
            for c in self.adapters[&name]
                .config
                .controllers::<M>(&name, total_steps)?
            {
                model = stepper.push_prepared(c, model)?;
            }
        }
        self.model = model;
        Ok(stepper)
    }

    /// `(trainable, total)` parameter counts, like PEFT's `get_nb_trainable_parameters`.
    pub fn trainable_parameters(&self) -> (usize, usize) {
        hosts::parameters(&self.model)
            .into_iter()
            .fold((0, 0), |(t, a), (_, on, n)| {
                (t + if on { n } else { 0 }, a + n)
            })
    }

    /// Apply PEFT's trainability rules: active adapters train (unless in inference mode),
    /// everything else is frozen except biases under `bias` and `modules_to_save` modules.
    pub(crate) fn refresh_trainable(&mut self) {
        let active: BTreeSet<String> = if self.enabled {
            self.active
                .iter()
                .filter(|n| !self.adapters[*n].config.inference_mode())
                .cloned()
                .collect()
        } else {
            BTreeSet::new()
        };
        let owner = if self.enabled {
            self.active.iter().find(|n| self.saved.has(n)).cloned()
        } else {
            None
        };
        let model = self.model.clone();
        self.model = self.saved.switch(model, owner.as_deref());
        let trained_copies: BTreeSet<String> = owner
            .filter(|o| active.contains(o))
            .map(|o| self.saved.live_paths_of(&o))
            .unwrap_or_default();
        let mut bias_all = false;
        let mut bias_layers = BTreeSet::new();
        for entry in self.adapters.values() {
            match entry.config.bias() {
                BiasMode::All => bias_all = true,
                BiasMode::LoraOnly => bias_layers.extend(entry.layers.iter().cloned()),
                BiasMode::None => {}
            }
        }
        let model = self.model.clone();
        self.model = hosts::set_trainable(model, move |path| {
            if let Some((_, rest)) = split_adapter_path(path) {
                let name = rest.split('.').next().unwrap_or_default();
                return Some(active.contains(name));
            }
            let (module, leaf) = path.rsplit_once('.').unwrap_or(("", path));
            if leaf == "bias" && (bias_all || bias_layers.contains(module)) {
                return Some(true);
            }
            if trained_copies.contains(path) {
                return Some(true);
            }
            Some(false)
        });
    }
}

impl<M: Module, C: Method> Tuned<M> for PeftModel<M, C> {
    fn stepper(&mut self, total_steps: usize) -> Result<Stepper<M>> {
        PeftModel::stepper(self, total_steps)
    }

    fn tuned_model(&self) -> &M {
        &self.model
    }

    fn set_tuned_model(&mut self, model: M) {
        self.model = model;
    }

    fn check_controllers(&self, served: &[String]) -> Result<()> {
        for name in self.trained_adapters() {
            let config = &self.adapters[&name].config;
            if config.needs_controller() && !served.contains(&name) {
                return Err(PeftError::MissingController {
                    adapter: name,
                    method: C::PEFT_TYPE.into(),
                });
            }
        }
        Ok(())
    }

    fn update_configs(&mut self, controllers: &[Box<dyn Controller<M>>]) {
        for c in controllers {
            if let Some(entry) = c.adapter().and_then(|n| self.adapters.get_mut(&n)) {
                c.update_config(&mut entry.config);
            }
        }
    }
}

/// Split `layers.0.q.peft.default.lora_a` (or `…q.weight.peft.…`) into the layer path and the
/// part after `peft.`.
pub(crate) fn split_adapter_path(path: &str) -> Option<(&str, &str)> {
    let (head, rest) = path
        .split_once(".peft.")
        .or_else(|| path.strip_prefix("peft.").map(|rest| ("", rest)))?;
    Some((head.strip_suffix(".weight").unwrap_or(head), rest))
}

/// Collect `(layer path, kind, adapter)` of adapter `name`, in path order.
pub fn adapters_of<M: Module, A: crate::Adapter + Clone>(
    model: &M,
    name: &str,
) -> Vec<(String, crate::LayerKind, A)> {
    let name = name.to_string();
    hosts::collect(model, move |host: &HostView<'_, A>| {
        host.slot
            .get(&name)
            .map(|a| (host.path.clone(), host.kind, a.clone()))
    })
}

/// Merge `names` into `host`'s base weight. A host holding none of them unmerged is left as it
/// is: its base is not read or written (a packed base is not quantized again).
fn merge_host<A: Adapter>(host: &mut HostView<'_, A>, names: &[String], safe: bool) -> Result<()> {
    let pending = names
        .iter()
        .any(|n| host.slot.get(n).is_some() && !host.slot.is_merged(n));
    if !pending {
        return Ok(());
    }
    let base = host.base_weight();
    let path = host.path.clone();
    let merged = host.slot.merge(base, names, safe, &path)?;
    host.set_base_weight(merged)
}
