//! Reading Hugging Face `model.safetensors` checkpoints into burn modules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, RmsNorm};

/// Where a checkpoint's tensors come from: tensors by Hugging Face name, read (converted or
/// dequantized to f32) one at a time when the model asks for them, so that a loader never holds
/// more than one converted tensor beside the model.
pub trait TensorSource: Send + Sync {
    /// Every tensor name, in Hugging Face's naming (`model.layers.0.self_attn.q_proj.weight`).
    fn names(&self) -> Vec<String>;
    /// The shape of `name` (PyTorch order), or `None` when there is no such tensor.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// The tensor `name` as f32 data of shape [`TensorSource::shape`].
    ///
    /// # Errors
    /// A missing tensor, or one that cannot be read or converted.
    fn read(&self, name: &str) -> Result<TensorData>;
}

/// A source holding tensors already in memory (what [`Checkpoint::open`] reads).
pub struct InMemory(pub BTreeMap<String, TensorData>);

impl TensorSource for InMemory {
    fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).map(|d| d.shape().to_vec())
    }
    fn read(&self, name: &str) -> Result<TensorData> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| ModelError::MissingTensor {
                file: PathBuf::new(),
                key: name.into(),
            })
    }
}

/// The tensors of a checkpoint, with an optional key prefix (`bert.`, `model.`) detected once and
/// applied to every lookup.
pub struct Checkpoint {
    file: PathBuf,
    tensors: Box<dyn TensorSource>,
    prefix: String,
}

impl Checkpoint {
    /// Read every tensor of `file` (f16/bf16/f64 converted to f32).
    ///
    /// # Errors
    /// Missing or unreadable file, invalid safetensors.
    pub fn open(file: &Path) -> Result<Self> {
        if !file.is_file() {
            return Err(ModelError::NotFound {
                what: "checkpoint".into(),
                path: file.into(),
                hint: "expected a Hugging Face `model.safetensors`".into(),
            });
        }
        Ok(Self::from_source(
            file,
            Box::new(InMemory(peft_core::hf::read_tensors(file)?)),
        ))
    }

    /// A checkpoint over any tensor source; `file` names it in errors.
    pub fn from_source(file: &Path, tensors: Box<dyn TensorSource>) -> Self {
        Self {
            file: file.into(),
            tensors,
            prefix: String::new(),
        }
    }

    /// Use the first of `prefixes` (e.g. `["", "bert."]`) under which `probe` exists.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when `probe` exists under none of them.
    pub fn detect_prefix(mut self, probe: &str, prefixes: &[&str]) -> Result<Self> {
        match prefixes
            .iter()
            .find(|p| self.tensors.shape(&format!("{p}{probe}")).is_some())
        {
            Some(p) => {
                self.prefix = (*p).to_string();
                Ok(self)
            }
            None => Err(ModelError::MissingTensor {
                file: self.file,
                key: format!("{probe} (tried prefixes {prefixes:?})"),
            }),
        }
    }

    /// The checkpoint file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether `key` (after the prefix) is in the checkpoint.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.shape(&self.full(key)).is_some()
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The float tensor `key`, which must have shape `shape`.
    ///
    /// # Errors
    /// Missing key, other shape, or an integer tensor.
    pub fn tensor<const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>> {
        let full = self.full(key);
        let found = self
            .tensors
            .shape(&full)
            .ok_or_else(|| ModelError::MissingTensor {
                file: self.file.clone(),
                key: full.clone(),
            })?;
        let bad = |found: Vec<usize>, dtype: DType| ModelError::BadTensor {
            file: self.file.clone(),
            key: full.clone(),
            expected: shape.to_vec(),
            found,
            dtype: format!("{dtype:?}"),
        };
        if found.as_slice() != shape.as_slice() {
            return Err(bad(found, DType::F32));
        }
        let data = self.tensors.read(&full)?;
        if data.shape().as_slice() != shape.as_slice() || data.dtype() != DType::F32 {
            return Err(bad(data.shape().to_vec(), data.dtype()));
        }
        Ok(Tensor::from_data(data, device))
    }

    /// A linear layer from PyTorch's `<path>.weight` (`[d_out, d_in]`, transposed here) and
    /// `<path>.bias` when `bias`.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`].
    pub fn linear(
        &self,
        path: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Linear> {
        let weight = self
            .tensor(&format!("{path}.weight"), [d_out, d_in], device)?
            .transpose();
        let bias = if bias {
            Some(Param::from_tensor(self.tensor(
                &format!("{path}.bias"),
                [d_out],
                device,
            )?))
        } else {
            None
        };
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias,
        })
    }

    /// An embedding table `<path>.weight` of shape `[n, d]`.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`].
    pub fn embedding(&self, path: &str, n: usize, d: usize, device: &Device) -> Result<Embedding> {
        Ok(Embedding {
            weight: Param::from_tensor(self.tensor(&format!("{path}.weight"), [n, d], device)?),
        })
    }

    /// A layer norm from `<path>.weight` and `<path>.bias`.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`].
    pub fn layer_norm(&self, path: &str, d: usize, eps: f64, device: &Device) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Param::from_tensor(self.tensor(&format!("{path}.weight"), [d], device)?),
            bias: Param::from_tensor(self.tensor(&format!("{path}.bias"), [d], device)?),
            eps,
        })
    }

    /// An RMS norm from `<path>.weight`.
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`].
    pub fn rms_norm(&self, path: &str, d: usize, eps: f64, device: &Device) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: Param::from_tensor(self.tensor(&format!("{path}.weight"), [d], device)?),
            eps,
        })
    }
}

/// Read and parse a `config.json`.
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let file = dir.join("config.json");
    if !file.is_file() {
        return Err(ModelError::NotFound {
            what: "config.json".into(),
            path: file,
            hint: "expected a Hugging Face model folder (config.json + model.safetensors)".into(),
        });
    }
    let text = std::fs::read_to_string(&file).map_err(|e| peft_core::PeftError::io(&file, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        file,
        message: e.to_string(),
    })
}
