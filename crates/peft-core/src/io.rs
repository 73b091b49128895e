//! Saving and loading adapters in Hugging Face PEFT's format, for every [`Method`].
//!
//! The method supplies its config JSON and the per-layer adapter tensors; this module adds
//! the key naming (`base_model.model.` prefix, adapter name stripped, `.default.` accepted on
//! read), `[out, in]` orientation of saved modules, base biases under `bias`,
//! `modules_to_save` copies, atomic writes and all-or-nothing loads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::TensorData;

use crate::LayerKind;
use crate::error::{PeftError, Result};
use crate::hf::{self, KEY_PREFIX, KeyMap};
use crate::hosts::{self, HostView};
use crate::method::{BiasMode, Method};
use crate::model::{PeftModel, adapters_of};

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

fn hf_key(map: &KeyMap, path: &str, suffix: &str) -> String {
    format!("{KEY_PREFIX}{}.{suffix}", map.to_hf(path))
}

impl<M: Module, C: Method> PeftModel<M, C> {
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
        for (path, kind, adapter) in adapters_of::<M, C::Adapter>(self.model(), name) {
            for (suffix, data) in entry.config.save_tensors(&path, kind, &adapter) {
                tensors.insert(hf_key(map, &path, &suffix), data);
            }
        }
        let linear = linear_weights(self.model());
        let owned = self.saved.values(self.model(), name);
        for (path, data) in bias_values(self.model(), entry.config.bias(), &entry.layers) {
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
        hf::write_json(&dir.join(hf::CONFIG_FILE), &entry.config.to_json(map))
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
        let config_path = dir.join(hf::CONFIG_FILE);
        let mut config =
            C::from_json(hf::read_json(&config_path)?, &config_path, &options.key_map)?;
        config.set_inference_mode(!options.is_trainable);
        let weights_path = dir.join(hf::WEIGHTS_FILE);
        let mut tensors = hf::read_tensors(&weights_path)?;
        let mut next = self.clone();
        next.add_adapter(name, config.for_loading())?;
        if let Some(entry) = next.adapters.get_mut(name) {
            entry.config = config.clone();
        }
        let map = &options.key_map;
        take_adapter_tensors(
            &mut next.model,
            &config,
            name,
            &mut tensors,
            map,
            &weights_path,
        )?;
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
        for (path, current) in bias_values(&next.model, config.bias(), &layers) {
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

fn take_adapter_tensors<M: Module, C: Method>(
    model: &mut M,
    config: &C,
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
    let config = config.clone();
    let result = hosts::for_each(model, move |host: HostView<'_, C::Adapter>| {
        let Some(adapter) = host.slot.get_mut(&name) else {
            return Ok(());
        };
        let mut pool = shared.borrow_mut();
        let mut take = |suffix: &str, expected: &[usize]| -> Result<TensorData> {
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
                    expected: expected.to_vec(),
                    found: data.shape().to_vec(),
                });
            }
            Ok(data)
        };
        config.load_tensors(&host.path, host.kind, adapter, &mut take)
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

fn split_leaf(path: &str) -> (&str, &str) {
    path.rsplit_once('.').unwrap_or(("", path))
}

/// Transpose a 2-D tensor's data (burn `[d_in, d_out]` <-> PyTorch `[out, in]`); other ranks
/// are returned as they are.
pub fn transpose_data(data: TensorData) -> TensorData {
    let shape = data.shape().to_vec();
    if shape.len() != 2 {
        return data;
    }
    let v: Vec<f32> = data.iter::<f32>().collect();
    let (rows, cols) = (shape[0], shape[1]);
    // By index, so that an empty side (a rank-0 factor) gives an empty result.
    let t: Vec<f32> = (0..cols)
        .flat_map(|c| (0..rows).map(move |r| (r, c)))
        .map(|(r, c)| v[r * cols + c])
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

/// The base biases that train and are saved under `mode`.
fn bias_values<M: Module>(
    model: &M,
    mode: BiasMode,
    layers: &[String],
) -> BTreeMap<String, TensorData> {
    let layers: BTreeSet<&str> = layers.iter().map(String::as_str).collect();
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
