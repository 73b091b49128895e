//! Saving and loading adapters in Hugging Face PEFT's format.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use peft_core::LayerKind;
use peft_core::error::{PeftError, Result};
use peft_core::hf::{self, KEY_PREFIX, KeyMap};
use peft_core::hosts::{self, HostView};

use crate::adapter::LoraAdapter;
use crate::config::{BiasMode, InitLoraWeights, LoraConfig};
use crate::model::{LoraModel, adapters_of};

/// Options for loading an adapter.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Train the loaded adapter (PEFT's `is_trainable`); by default it is frozen (inference).
    pub is_trainable: bool,
    /// Maps Hugging Face module paths to the model's burn paths.
    pub key_map: KeyMap,
}

/// Options for saving an adapter.
#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    /// Maps the model's burn paths to Hugging Face module paths.
    pub key_map: KeyMap,
}

fn transpose(t: Tensor<2>) -> TensorData {
    t.transpose().into_data()
}

fn hf_key(map: &KeyMap, path: &str, suffix: &str) -> String {
    format!("{KEY_PREFIX}{}.{suffix}", map.to_hf(path))
}

impl<M: Module> LoraModel<M> {
    /// Save every adapter as PEFT does: `default` in `dir`, any other in `dir/<name>`.
    ///
    /// # Errors
    /// I/O errors; files already there are left intact when a write fails.
    pub fn save_pretrained(&self, dir: &Path, options: &SaveOptions) -> Result<()> {
        for name in self.adapters().keys() {
            let target = if name == "default" {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            self.save_adapter(name, &target, options)?;
        }
        Ok(())
    }

    /// Save one adapter into `dir` (`adapter_config.json` + `adapter_model.safetensors`).
    ///
    /// # Errors
    /// Unknown adapter, or I/O errors (existing files stay intact).
    pub fn save_adapter(&self, name: &str, dir: &Path, options: &SaveOptions) -> Result<()> {
        let entry = self
            .adapters()
            .get(name)
            .ok_or_else(|| PeftError::UnknownAdapter {
                name: name.into(),
                available: self.adapters().keys().cloned().collect(),
            })?;
        let map = &options.key_map;
        let mut tensors = BTreeMap::new();
        for (path, kind, a) in adapters_of(self.model(), name) {
            let (ka, kb) = match kind {
                LayerKind::Linear => ("lora_A.weight", "lora_B.weight"),
                LayerKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
            };
            tensors.insert(hf_key(map, &path, ka), transpose(a.lora_a.val()));
            tensors.insert(hf_key(map, &path, kb), transpose(a.lora_b.val()));
            if let Some(m) = &a.magnitude {
                tensors.insert(
                    hf_key(map, &path, "lora_magnitude_vector"),
                    m.val().into_data(),
                );
            }
        }
        let extra = base_tensors(self.model(), &entry.config, &entry.layers);
        for (path, (transposed, data)) in extra {
            let (module, leaf) = path.rsplit_once('.').unwrap_or(("", &path));
            let leaf = if entry.layers.iter().any(|l| l == module) && !transposed {
                format!("base_layer.{leaf}")
            } else {
                leaf.to_string()
            };
            tensors.insert(hf_key(map, module, &leaf), data);
        }
        std::fs::create_dir_all(dir).map_err(|e| PeftError::Io {
            path: dir.into(),
            source: e,
        })?;
        hf::write_tensors(&dir.join(hf::WEIGHTS_FILE), &tensors)?;
        hf::write_json(&dir.join(hf::CONFIG_FILE), &entry.config.to_json_map())
    }

    /// Load a PEFT adapter directory into `model` as adapter `"default"`, active
    /// (PEFT's `PeftModel.from_pretrained`).
    ///
    /// # Errors
    /// Invalid config or files, shape mismatches (naming the key), missing or unexpected
    /// tensors.
    pub fn from_pretrained(model: M, dir: &Path, options: &LoadOptions) -> Result<Self> {
        let mut this = Self::empty(model);
        this.load_adapter(dir, "default", options)?;
        this.set_adapter(&["default"])?;
        Ok(this)
    }

    /// Load a PEFT adapter directory as adapter `name` (inactive until
    /// [`set_adapter`](Self::set_adapter)). All or nothing.
    ///
    /// # Errors
    /// As [`from_pretrained`](Self::from_pretrained).
    pub fn load_adapter(&mut self, dir: &Path, name: &str, options: &LoadOptions) -> Result<()> {
        let mut config = LoraConfig::from_pretrained(dir)?;
        config.inference_mode = !options.is_trainable;
        let weights_path = dir.join(hf::WEIGHTS_FILE);
        let mut tensors = hf::read_tensors(&weights_path)?;
        let mut attach_cfg = config.clone();
        attach_cfg.init_lora_weights = InitLoraWeights::Default;
        attach_cfg.target_modules = config.target_modules.clone();
        let mut next = self.clone();
        next.add_adapter(name, attach_cfg)?;
        if let Some(entry) = next.adapters.get_mut(name) {
            entry.config = config.clone();
        }
        take_adapter_tensors(
            &mut next.model,
            name,
            &mut tensors,
            &options.key_map,
            &weights_path,
        )?;
        let model = next.model.clone();
        next.model = load_base_tensors(
            model,
            &config,
            &next.adapters[name].layers,
            &mut tensors,
            &options.key_map,
        )?;
        if !tensors.is_empty() {
            return Err(PeftError::UnexpectedTensors {
                file: weights_path,
                keys: tensors.into_keys().collect(),
            });
        }
        next.refresh_trainable();
        *self = next;
        Ok(())
    }
}

fn take_adapter_tensors<M: Module>(
    model: &mut M,
    name: &str,
    tensors: &mut BTreeMap<String, TensorData>,
    map: &KeyMap,
    file: &Path,
) -> Result<()> {
    let pool = std::rc::Rc::new(std::cell::RefCell::new(std::mem::take(tensors)));
    let shared = pool.clone();
    let name = name.to_string();
    let map = map.clone();
    let file: PathBuf = file.into();
    let result = hosts::for_each(model, move |host: HostView<'_, LoraAdapter>| {
        let Some(adapter) = host.slot.get_mut(&name) else {
            return Ok(());
        };
        let (ka, kb) = match host.kind {
            LayerKind::Linear => ("lora_A.weight", "lora_B.weight"),
            LayerKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
        };
        let mut pool = shared.borrow_mut();
        let mut take = |suffix: &str, expected: Vec<usize>| -> Result<TensorData> {
            let key = hf_key(&map, &host.path, suffix);
            let alt = format!(
                "{KEY_PREFIX}{}.{}",
                map.to_hf(&host.path),
                insert_name(suffix, &name)
            );
            let data = pool
                .remove(&key)
                .or_else(|| pool.remove(&alt))
                .ok_or_else(|| PeftError::MissingTensor {
                    file: file.clone(),
                    key: key.clone(),
                })?;
            if data.shape().to_vec() != expected {
                return Err(PeftError::ShapeMismatch {
                    key,
                    expected,
                    found: data.shape().to_vec(),
                });
            }
            Ok(data)
        };
        let [rows, r] = adapter.lora_a.shape().dims();
        let [_, cols] = adapter.lora_b.shape().dims();
        let a = take(ka, vec![r, rows])?;
        let b = take(kb, vec![cols, r])?;
        let device = adapter.lora_a.device();
        adapter.lora_a = set(
            &adapter.lora_a,
            Tensor::<2>::from_data(a, &device).transpose(),
        );
        adapter.lora_b = set(
            &adapter.lora_b,
            Tensor::<2>::from_data(b, &device).transpose(),
        );
        if let Some(m) = &adapter.magnitude {
            let data = take("lora_magnitude_vector", vec![cols])?;
            adapter.magnitude = Some(set(m, Tensor::<1>::from_data(data, &device)));
        }
        Ok(())
    });
    *tensors = std::mem::take(&mut *pool.borrow_mut());
    result
}

fn insert_name(suffix: &str, name: &str) -> String {
    match suffix.rsplit_once('.') {
        Some((head, last)) => format!("{head}.{name}.{last}"),
        None => format!("{suffix}.{name}"),
    }
}

fn set<const D: usize>(param: &Param<Tensor<D>>, value: Tensor<D>) -> Param<Tensor<D>> {
    let require_grad = param.is_require_grad();
    param.clone().map(|_| value.set_require_grad(require_grad))
}

/// Base tensors an adapter saves: biases under `bias`, and `modules_to_save` parameters.
/// Returns `path -> (transposed_to_pytorch, data)`.
fn base_tensors<M: Module>(
    model: &M,
    config: &LoraConfig,
    layers: &[String],
) -> BTreeMap<String, (bool, TensorData)> {
    struct Collect<'a> {
        path: Vec<String>,
        containers: Vec<String>,
        config: &'a LoraConfig,
        spec: Option<peft_core::TargetSpec>,
        layers: BTreeSet<&'a str>,
        out: BTreeMap<String, (bool, TensorData)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push(name.into());
            self.containers.push(container_type.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
            self.containers.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.join(".");
            if path.contains(".peft.") || path.starts_with("peft.") {
                return;
            }
            let (module, leaf) = path.rsplit_once('.').unwrap_or(("", &path));
            let to_save = self
                .spec
                .as_ref()
                .is_some_and(|s| s.is_module_to_save(module));
            let bias = leaf == "bias"
                && match self.config.bias {
                    BiasMode::All => true,
                    BiasMode::LoraOnly => self.layers.contains(module),
                    BiasMode::None => false,
                };
            if !(to_save || bias) {
                return;
            }
            let linear_weight = D == 2
                && leaf == "weight"
                && self.containers.last().map(String::as_str) == Some("Struct:Linear");
            let value = param.val();
            let data = if linear_weight {
                let dims = value.dims();
                value.reshape([dims[0], dims[1]]).transpose().into_data()
            } else {
                value.into_data()
            };
            self.out.insert(path.clone(), (to_save, data));
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        containers: Vec::new(),
        config,
        spec: config
            .modules_to_save
            .as_ref()
            .and_then(|_| config.target_spec().ok()),
        layers: layers.iter().map(String::as_str).collect(),
        out: BTreeMap::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Load biases and `modules_to_save` parameters from the remaining tensors.
fn load_base_tensors<M: Module>(
    model: M,
    config: &LoraConfig,
    layers: &[String],
    tensors: &mut BTreeMap<String, TensorData>,
    map: &KeyMap,
) -> Result<M> {
    let wanted = base_tensors(&model, config, layers);
    if wanted.is_empty() {
        return Ok(model);
    }
    let mut values = BTreeMap::new();
    for (path, (_, current)) in &wanted {
        let (module, leaf) = path.rsplit_once('.').unwrap_or(("", path));
        let plain = hf_key(map, module, leaf);
        let wrapped = hf_key(map, module, &format!("base_layer.{leaf}"));
        let saved = hf_key(map, module, &format!("modules_to_save.{leaf}"));
        let Some((key, data)) = [plain, wrapped, saved]
            .into_iter()
            .find_map(|k| tensors.remove(&k).map(|d| (k, d)))
        else {
            continue;
        };
        if data.shape() != current.shape() {
            return Err(PeftError::ShapeMismatch {
                key,
                expected: current.shape().to_vec(),
                found: data.shape().to_vec(),
            });
        }
        values.insert(path.clone(), data);
    }
    struct Put {
        path: Vec<String>,
        containers: Vec<String>,
        values: BTreeMap<String, TensorData>,
    }
    impl ModuleMapper for Put {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push(name.into());
            self.containers.push(container_type.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
            self.containers.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(data) = self.values.remove(&self.path.join(".")) else {
                return param;
            };
            let linear_weight = D == 2
                && self.path.last().map(String::as_str) == Some("weight")
                && self.containers.last().map(String::as_str) == Some("Struct:Linear");
            let device = param.lazy_device();
            let mut value = Tensor::<D>::from_data(data, &device);
            if linear_weight {
                value = value.transpose();
            }
            set(&param, value)
        }
    }
    Ok(model.map(&mut Put {
        path: Vec::new(),
        containers: Vec::new(),
        values,
    }))
}
