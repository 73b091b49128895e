//! Reading Hugging Face `model.safetensors` checkpoints into burn modules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{DType, Device, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, RmsNorm};

/// The tensors of a Hugging Face checkpoint, with an optional key prefix (`bert.`, `model.`)
/// detected once and applied to every lookup.
pub struct Checkpoint {
    file: PathBuf,
    tensors: BTreeMap<String, TensorData>,
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
        Ok(Self {
            file: file.into(),
            tensors: peft_core::hf::read_tensors(file)?,
            prefix: String::new(),
        })
    }

    /// Use the first of `prefixes` (e.g. `["", "bert."]`) under which `probe` exists.
    ///
    /// # Errors
    /// [`ModelError::MissingTensor`] when `probe` exists under none of them.
    pub fn detect_prefix(mut self, probe: &str, prefixes: &[&str]) -> Result<Self> {
        match prefixes
            .iter()
            .find(|p| self.tensors.contains_key(&format!("{p}{probe}")))
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
        self.tensors.contains_key(&self.full(key))
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
        let data = self
            .tensors
            .get(&full)
            .ok_or_else(|| ModelError::MissingTensor {
                file: self.file.clone(),
                key: full.clone(),
            })?;
        if data.shape().as_slice() != shape.as_slice() || data.dtype() != DType::F32 {
            return Err(ModelError::BadTensor {
                file: self.file.clone(),
                key: full,
                expected: shape.to_vec(),
                found: data.shape().to_vec(),
                dtype: format!("{:?}", data.dtype()),
            });
        }
        Ok(Tensor::from_data(data.clone(), device))
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
