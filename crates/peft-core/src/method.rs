//! [`Method`]: what a PEFT method tells [`PeftModel`](crate::PeftModel) about itself.
//!
//! A method crate implements it on its configuration type (`LoraConfig`, …) and gets adapter
//! management (several named adapters, activation, disable, delete, merge/unmerge, merge and
//! unload, `modules_to_save`, base-bias training) and Hugging Face PEFT save/load for free.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::adapter::Adapter;
use crate::config::PeftConfig;
use crate::error::Result;
use crate::hf::KeyMap;
use crate::hosts::{Created, LayerInfo};
use crate::step::Controller;
use crate::target::{LayerKind, TargetSpec};

/// Which base biases train with the adapter (PEFT's `bias`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasMode {
    /// All base parameters frozen.
    #[default]
    None,
    /// Every bias of the model trains and is saved.
    All,
    /// The biases of adapted layers train and are saved (`lora_only`; RoSA's name for it,
    /// `rosa_only`, is read as the same).
    LoraOnly,
}

/// By hand, so that a bad value's error names the field (serde's names only the value).
impl<'de> Deserialize<'de> for BiasMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        match value.as_str() {
            "none" => Ok(Self::None),
            "all" => Ok(Self::All),
            "lora_only" | "rosa_only" => Ok(Self::LoraOnly),
            other => Err(serde::de::Error::custom(format!(
                "`bias` = `{other}` is not one of `none`, `all`, `lora_only` (`rosa_only`)"
            ))),
        }
    }
}

/// Replace a parameter's value, keeping its id (so optimizer state and gradients still find
/// it) and its trainability: for [`Method::load_tensors`] implementations.
pub fn set_param<const D: usize>(param: &Param<Tensor<D>>, value: Tensor<D>) -> Param<Tensor<D>> {
    let require_grad = param.is_require_grad();
    param.clone().map(|_| value.set_require_grad(require_grad))
}

/// The transpose of a `[rows, cols]` matrix read from a file (PEFT stores `lora_A.weight` as
/// `[r, in]`, burn keeps `[in, r]`), stored contiguously: a transposed view would make the
/// products that read it sum in another order than after a save and reload (and than in the
/// run that wrote the file), so a resumed run would no longer equal one that did not stop.
pub fn transposed_from_data(data: TensorData, device: &Device) -> Tensor<2> {
    let (rows, cols) = (data.shape()[0], data.shape()[1]);
    let values: Vec<f32> = data.convert::<f32>().try_to_vec().unwrap_or_default();
    let mut out = vec![0.0f32; values.len()];
    for (i, row) in values.chunks(cols.max(1)).enumerate() {
        for (j, v) in row.iter().enumerate() {
            out[j * rows + i] = *v;
        }
    }
    Tensor::from_data(TensorData::new(out, [cols, rows]), device)
}

/// Takes a tensor from a file by its key suffix, checking its shape
/// (see [`Method::load_tensors`]).
pub type TakeTensor<'a> = dyn FnMut(&str, &[usize]) -> Result<TensorData> + 'a;

/// Creates the adapter of each layer one attach selects (see [`Method::factory`]).
pub type AdapterFactory<A> = Box<dyn FnMut(&LayerInfo) -> Result<Created<A>>>;

/// A PEFT method, implemented by its configuration type. The common fields (targets, bias,
/// `modules_to_save`, inference mode) come from the config's
/// [`PeftConfigBase`](crate::PeftConfigBase).
pub trait Method: PeftConfig + Clone + Debug + Send + Sync + 'static {
    /// The per-layer adapter the method attaches.
    type Adapter: Adapter + Clone;

    /// `peft_type` in `adapter_config.json` (`"LORA"`, `"ADALORA"`, …).
    const PEFT_TYPE: &'static str;

    /// Whether an adapter of this config cannot train without its controllers
    /// ([`controllers`](Self::controllers) returns some). A stepper without them is refused by
    /// [`Stepper::train`](crate::step::Stepper::train) with
    /// [`PeftError::MissingController`](crate::PeftError::MissingController).
    fn needs_controller(&self) -> bool {
        false
    }

    /// The training-time controllers of adapter `adapter` for a run of `total_steps` optimizer
    /// steps, in run order (none for plain LoRA). [`PeftModel::stepper`](crate::PeftModel::stepper)
    /// collects them for every trained adapter.
    ///
    /// # Errors
    /// A config that cannot train (e.g. a RoSA adapter without `schedule`).
    fn controllers<M: Module>(
        &self,
        adapter: &str,
        total_steps: usize,
    ) -> Result<Vec<Box<dyn Controller<M>>>> {
        let _ = (adapter, total_steps);
        Ok(Vec::new())
    }

    /// Check every field.
    ///
    /// # Errors
    /// The first invalid or unsupported field.
    fn validate(&self) -> Result<()>;

    /// The compiled target selection (targets, excludes, layer filter, `modules_to_save`).
    ///
    /// # Errors
    /// Invalid regular expressions or field combinations.
    fn target_spec(&self) -> Result<TargetSpec> {
        self.base().target_spec()
    }

    /// Which base biases train.
    fn bias(&self) -> BiasMode {
        self.base().bias
    }

    /// Whether the config names `modules_to_save`.
    fn has_modules_to_save(&self) -> bool {
        self.base().modules_to_save.is_some()
    }

    /// An adapter in inference mode stays frozen when active.
    fn inference_mode(&self) -> bool {
        self.base().inference_mode
    }

    /// Set [`inference_mode`](Self::inference_mode).
    fn set_inference_mode(&mut self, on: bool) {
        self.base_mut().inference_mode = on;
    }

    /// A fresh adapter for one matched layer (and, for inits such as PiSSA, its new base).
    ///
    /// # Errors
    /// A layer the method cannot adapt, or an invalid per-layer setting.
    fn create(&self, info: &LayerInfo) -> Result<Created<Self::Adapter>>;

    /// The config completed from the whole model before an attach
    /// ([`PeftModel::add_adapter`](crate::PeftModel::add_adapter)); what it returns is what the
    /// adapter is built from and saved with. The default returns the config unchanged; SFT
    /// splits its budget (a share of the whole model) over the target layers here, as the
    /// reference does at injection.
    ///
    /// # Errors
    /// A config that does not fit the model.
    fn for_model<M: Module>(&self, model: &M) -> Result<Self> {
        let _ = model;
        Ok(self.clone())
    }

    /// The factory of one attach ([`PeftModel::add_adapter`](crate::PeftModel::add_adapter)),
    /// called once, then once per selected layer. The default calls [`create`](Self::create);
    /// a method whose new adapters start from a file the config names (RoSA's
    /// `mask_load_path`) reads it here, once per attach.
    ///
    /// # Errors
    /// A file the config names cannot be read.
    fn factory(&self) -> Result<AdapterFactory<Self::Adapter>> {
        let config = self.clone();
        Ok(Box::new(move |info| config.create(info)))
    }

    /// The config as PEFT writes it in `adapter_config.json` (every field).
    fn to_json(&self, key_map: &KeyMap) -> Map<String, Value>;

    /// Parse and validate `adapter_config.json` (`file` names it in errors).
    ///
    /// # Errors
    /// A wrong `peft_type`, a wrong field type, or an unsupported or invalid value.
    fn from_json(map: Map<String, Value>, file: &Path, key_map: &KeyMap) -> Result<Self>;

    /// The config used to attach adapters whose tensors are then read from a file. The
    /// default keeps it as is; a method whose init also changes the base (PiSSA) or whose
    /// shapes depend on saved state (AdaLoRA's kept ranks) adjusts it here.
    fn for_loading(&self) -> Self {
        self.clone()
    }

    /// The tensors of one layer's adapter, by PEFT key suffix (e.g. `lora_A.weight`), in
    /// PyTorch orientation.
    fn save_tensors(
        &self,
        layer: &str,
        kind: LayerKind,
        adapter: &Self::Adapter,
    ) -> BTreeMap<String, TensorData>;

    /// Fill one layer's adapter from a file: `take(suffix, expected PyTorch shape)` returns
    /// the tensor, or an error naming the key when it is missing or has another shape.
    ///
    /// # Errors
    /// Whatever `take` returns.
    fn load_tensors(
        &self,
        layer: &str,
        kind: LayerKind,
        adapter: &mut Self::Adapter,
        take: &mut TakeTensor<'_>,
    ) -> Result<()>;
}
