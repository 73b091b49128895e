//! Saving and loading adapters in Hugging Face PEFT's format.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
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
        let linear = linear_weights(self.model());
        let owned = self.saved.values(self.model(), name);
        for (path, data) in bias_values(self.model(), &entry.config, &entry.layers) {
            if owned.contains_key(&path) {
                continue;
            }
            let (module, leaf) = split_leaf(&path);
            let leaf = if entry.layers.iter().any(|l| l == module) {
                format!("base_layer.{leaf}")
            } else {
                leaf.to_string()
            };
            tensors.insert(hf_key(map, module, &leaf), data);
        }
        for (path, data) in owned {
            let (module, leaf) = split_leaf(&path);
            let data = if linear.contains(&path) {
                transpose_data(data)
            } else {
                data
            };
            tensors.insert(hf_key(map, module, leaf), data);
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
        // The factors are overwritten below; only PiSSA's init matters, because it also moves the
        // principal part out of the base weight (PEFT redoes it on load too).
        if attach_cfg.init_lora_weights != InitLoraWeights::Pissa {
            attach_cfg.init_lora_weights = InitLoraWeights::Default;
        }
        let mut next = self.clone();
        next.add_adapter(name, attach_cfg)?;
        if let Some(entry) = next.adapters.get_mut(name) {
            entry.config = config.clone();
        }
        let map = &options.key_map;
        take_adapter_tensors(&mut next.model, name, &mut tensors, map, &weights_path)?;
        let layers = next.adapters[name].layers.clone();
        let linear = linear_weights(&next.model);
        let mut copies = BTreeMap::new();
        for (path, current) in next.saved.values(&next.model, name) {
            let (module, leaf) = split_leaf(&path);
            let keys = [
                hf_key(map, module, &format!("modules_to_save.{leaf}")),
                hf_key(map, module, leaf),
            ];
            let transposed = linear.contains(&path);
            let expected = if transposed {
                current.shape().iter().rev().copied().collect()
            } else {
                current.shape().to_vec()
            };
            if let Some(data) = take_checked(&mut tensors, &keys, &expected)? {
                copies.insert(
                    path.clone(),
                    if transposed {
                        transpose_data(data)
                    } else {
                        data
                    },
                );
            }
            // PEFT may write the copy under both names, plus the untouched original: they carry
            // nothing new.
            for key in keys {
                tensors.remove(&key);
            }
            tensors.remove(&hf_key(map, module, &format!("original_module.{leaf}")));
        }
        let mut biases = BTreeMap::new();
        for (path, current) in bias_values(&next.model, &config, &layers) {
            if copies.contains_key(&path) {
                continue;
            }
            let (module, leaf) = split_leaf(&path);
            let keys = [
                hf_key(map, module, leaf),
                hf_key(map, module, &format!("base_layer.{leaf}")),
            ];
            if let Some(data) = take_checked(&mut tensors, &keys, current.shape())? {
                biases.insert(path, data);
            }
        }
        // A saved module's own bias belongs to its copy, not to the `bias` setting.
        let (model, _) = next.saved.set_values(next.model.clone(), name, copies);
        next.model = hosts::write_params(model, biases).0;
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

fn split_leaf(path: &str) -> (&str, &str) {
    path.rsplit_once('.').unwrap_or(("", path))
}

fn transpose_data(data: TensorData) -> TensorData {
    let shape = data.shape().to_vec();
    if shape.len() != 2 {
        return data;
    }
    let v: Vec<f32> = data.iter::<f32>().collect();
    let (rows, cols) = (shape[0], shape[1]);
    let t: Vec<f32> = (0..cols)
        .flat_map(|c| {
            v[c..]
                .iter()
                .step_by(cols)
                .take(rows)
                .copied()
                .collect::<Vec<_>>()
        })
        .collect();
    TensorData::new(t, [cols, rows])
}

/// Paths of the weights of linear layers (stored `[d_in, d_out]`, transposed in PEFT files).
fn linear_weights<M: Module>(model: &M) -> BTreeSet<String> {
    hosts::layers(model)
        .into_iter()
        .filter(|l| l.candidate.kind == LayerKind::Linear)
        .map(|l| format!("{}.weight", l.candidate.path))
        .collect()
}

/// The base biases that train and are saved under `config.bias`.
fn bias_values<M: Module>(
    model: &M,
    config: &LoraConfig,
    layers: &[String],
) -> BTreeMap<String, TensorData> {
    let layers: BTreeSet<&str> = layers.iter().map(String::as_str).collect();
    let mode = config.bias;
    hosts::read_params(model, |path| {
        if path.contains(".peft.") || path.starts_with("peft.") {
            return false;
        }
        match split_leaf(path) {
            (module, "bias") => match mode {
                BiasMode::All => true,
                BiasMode::LoraOnly => layers.contains(module),
                BiasMode::None => false,
            },
            _ => false,
        }
    })
}

/// Remove the first of `keys` present, checking its shape.
fn take_checked(
    tensors: &mut BTreeMap<String, TensorData>,
    keys: &[String],
    expected: &[usize],
) -> Result<Option<TensorData>> {
    let Some((key, data)) = keys
        .iter()
        .find_map(|k| tensors.remove(k).map(|d| (k.clone(), d)))
    else {
        return Ok(None);
    };
    if data.shape().to_vec() != expected {
        return Err(PeftError::ShapeMismatch {
            key,
            expected: expected.to_vec(),
            found: data.shape().to_vec(),
        });
    }
    Ok(Some(data))
}
