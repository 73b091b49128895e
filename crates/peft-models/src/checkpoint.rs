//! Reading Hugging Face checkpoints into burn modules: single-file or sharded safetensors,
//! memory-mapped and converted to f32 one tensor at a time, behind the [`TensorSource`] trait
//! that other formats (GGUF) implement too.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, Linear};
use burn::tensor::{DType, Device, Tensor, TensorData};
use peft_kernels::mmap::Mmap;

use crate::error::{ModelError, Result};
use crate::layers::{BaseFormat, LayerNorm, LinearLayer, RmsNorm};
use peft_kernels::packed_linear::PackedWeight;
use peft_kernels::quant::PackedMatrix;

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

    /// The 2-D tensor `name` as the packed blocks it is stored in, for a base kept as loaded
    /// ([`BaseFormat::Gguf`]): `Ok(None)` when it is stored in f32 (nothing to keep packed).
    /// The default (safetensors, in memory) has no packed tensors.
    ///
    /// # Errors
    /// A missing tensor, or a storage type that cannot be kept packed.
    fn read_packed(&self, name: &str) -> Result<Option<PackedMatrix>> {
        let _ = name;
        Ok(None)
    }

    /// Whether [`TensorSource::read_packed`] can give packed tensors (a GGUF file).
    fn has_packed(&self) -> bool {
        false
    }
}

/// A source holding tensors already in memory (tests, converted weights).
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
    /// Open a safetensors file through a memory map ([`Safetensors::open`]); tensors are
    /// converted to f32 (from f16, bf16 or f64) one at a time when the model reads them.
    ///
    /// # Errors
    /// Missing or unreadable file, invalid safetensors header.
    pub fn open(file: &Path) -> Result<Self> {
        Ok(Self::from_source(file, Box::new(Safetensors::open(file)?)))
    }

    /// Open the weights of a Hugging Face model folder: `model.safetensors`, else the shards
    /// listed by `model.safetensors.index.json` ([`Safetensors::open_dir`]).
    ///
    /// # Errors
    /// As [`Safetensors::open_dir`].
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let source = Safetensors::open_dir(dir)?;
        let file = source.origin().to_path_buf();
        Ok(Self::from_source(&file, Box::new(source)))
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

    /// That the source has tensor `full` (prefixed key) of shape `shape`, from its listed shape.
    fn check_shape(&self, full: &str, shape: &[usize]) -> Result<()> {
        let found = self
            .tensors
            .shape(full)
            .ok_or_else(|| ModelError::MissingTensor {
                file: self.file.clone(),
                key: full.into(),
            })?;
        if found.as_slice() != shape {
            return Err(ModelError::BadTensor {
                file: self.file.clone(),
                key: full.into(),
                expected: shape.to_vec(),
                found,
                dtype: format!("{:?}", DType::F32),
            });
        }
        Ok(())
    }

    /// `<path>.bias` (`[d_out]`) when `bias`.
    fn bias(
        &self,
        path: &str,
        d_out: usize,
        bias: bool,
        device: &Device,
    ) -> Result<Option<Param<Tensor<1>>>> {
        if !bias {
            return Ok(None);
        }
        let b = self.tensor(&format!("{path}.bias"), [d_out], device)?;
        Ok(Some(Param::from_tensor(b)))
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
        self.check_shape(&full, &shape)?;
        let bad = |found: Vec<usize>, dtype: DType| ModelError::BadTensor {
            file: self.file.clone(),
            key: full.clone(),
            expected: shape.to_vec(),
            found,
            dtype: format!("{dtype:?}"),
        };
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
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias: self.bias(path, d_out, bias, device)?,
        })
    }

    /// A linear layer of type `L` from `<path>.weight` (`[d_out, d_in]`) and `<path>.bias`,
    /// its weight held as `base` says ([`BaseFormat`]): f32 as [`Checkpoint::linear`]; else
    /// packed, from the stored blocks (`gguf`) or quantized one layer at a time as it is read
    /// (`bf16`, `nf4`, `nf4-dq`), and handed to [`LinearLayer::from_packed`] (a `PeftLinear`
    /// keeps it packed; a plain `Linear` holds its values dequantized, as rounded).
    ///
    /// # Errors
    /// As [`Checkpoint::tensor`]; [`ModelError::Packing`] for `gguf` over a source with no
    /// packed tensors, a storage type that cannot be kept, or a weight the format cannot hold.
    pub fn linear_layer<L: LinearLayer>(
        &self,
        path: &str,
        (d_in, d_out): (usize, usize),
        bias: bool,
        base: BaseFormat,
        device: &Device,
    ) -> Result<L> {
        if !base.is_packed() {
            return self.linear(path, d_in, d_out, bias, device).map(L::from);
        }
        let key = format!("{path}.weight");
        let weight = self.packed(&key, [d_out, d_in], base, base.linear_format())?;
        let bias = self.bias(path, d_out, bias, device)?;
        match weight {
            Some(w) => L::from_packed(w, bias, device),
            // A `gguf` tensor stored in f32: nothing to keep packed.
            None => Ok(L::from(Linear {
                weight: Param::from_tensor(self.tensor(&key, [d_out, d_in], device)?.transpose()),
                bias,
            })),
        }
    }

    /// The `[n, d]` tensor `key` held as `base` holds token tables and LM heads
    /// ([`BaseFormat::table_format`]; `gguf`: as stored), or `None` for an f32 base.
    ///
    /// # Errors
    /// As [`Checkpoint::linear_layer`].
    pub fn packed_table(
        &self,
        key: &str,
        (n, d): (usize, usize),
        base: BaseFormat,
    ) -> Result<Option<PackedWeight>> {
        if !base.is_packed() {
            return Ok(None);
        }
        self.packed(key, [n, d], base, base.table_format())
    }

    /// The 2-D weight `key` of `shape` packed in `format`, or as stored when `format` is `None`
    /// (`gguf`); `None` when a `gguf` tensor is stored in f32.
    fn packed(
        &self,
        key: &str,
        shape: [usize; 2],
        base: BaseFormat,
        format: Option<peft_kernels::quant::PackedFormat>,
    ) -> Result<Option<PackedWeight>> {
        let full = self.full(key);
        let packing = |reason: String| ModelError::Packing {
            file: self.file.clone(),
            key: full.clone(),
            base: base.name(),
            reason,
        };
        self.check_shape(&full, &shape)?;
        let packed = match format {
            None => {
                if !self.tensors.has_packed() {
                    return Err(packing(
                        "a `gguf` base needs a GGUF model (use `nf4`, `nf4-dq` or `bf16` to \
                         quantize this one)"
                            .into(),
                    ));
                }
                match self.tensors.read_packed(&full)? {
                    Some(p) => p,
                    None => return Ok(None),
                }
            }
            Some(format) => {
                let data = self.tensors.read(&full)?;
                let values = data
                    .as_slice::<f32>()
                    .map_err(|e| packing(format!("reading it as f32: {e:?}")))?;
                PackedMatrix::quantize(values, shape[0], shape[1], format)
                    .map_err(|e| packing(e.to_string()))?
            }
        };
        if packed.shape() != shape {
            return Err(packing(format!(
                "its packed blocks hold {:?}, expected {shape:?}",
                packed.shape()
            )));
        }
        Ok(Some(PackedWeight::new(packed)))
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

/// The name of a single-file Hugging Face checkpoint.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// The name of the index of a sharded Hugging Face checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file: its map and where its data section starts.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
}

/// Where one tensor lies: its file, dtype, shape and byte range inside the data section.
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    range: (usize, usize),
}

/// Map the file at `path` read-only.
fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| peft_core::PeftError::io(path, e))?;
    peft_kernels::mmap::map_file(&file).map_err(|e| peft_core::PeftError::io(path, e).into())
}

/// Safetensors files (one, or the shards of a sharded checkpoint) read through memory maps:
/// only the headers are parsed when opening; [`TensorSource::read`] converts one tensor to f32
/// (from F32, F16, BF16 or F64) straight from the mapped bytes, so no copy of a whole file is
/// made in memory.
pub struct Safetensors {
    origin: PathBuf,
    files: Vec<MappedFile>,
    entries: BTreeMap<String, Entry>,
}

impl Safetensors {
    /// Map one safetensors file and parse its header.
    ///
    /// # Errors
    /// [`ModelError::NotFound`] for a missing file; an I/O or safetensors error (named with the
    /// file) for an unreadable one or a damaged header.
    pub fn open(file: &Path) -> Result<Self> {
        if !file.is_file() {
            return Err(ModelError::NotFound {
                what: "checkpoint".into(),
                path: file.into(),
                hint: "expected a Hugging Face `model.safetensors`".into(),
            });
        }
        let mut source = Self {
            origin: file.into(),
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        source.add_file(file, None)?;
        Ok(source)
    }

    /// Map every shard named by a `model.safetensors.index.json` (its `weight_map`, tensor name
    /// to shard file, resolved next to the index).
    ///
    /// # Errors
    /// A missing or invalid index, a missing shard, or a tensor the index puts in a shard that
    /// does not hold it.
    pub fn open_sharded(index: &Path) -> Result<Self> {
        let json = peft_core::hf::read_json(index)?;
        let bad = |message: String| ModelError::Config {
            file: index.into(),
            message,
        };
        let map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| bad(format!("weight_map.{name} is not a file name")))?;
            shards.entry(shard).or_default().push(name);
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut source = Self {
            origin: index.into(),
            files: Vec::new(),
            entries: BTreeMap::new(),
        };
        for (shard, names) in shards {
            let path = dir.join(shard);
            if !path.is_file() {
                return Err(ModelError::NotFound {
                    what: "checkpoint shard".into(),
                    path,
                    hint: format!("listed in {}", index.display()),
                });
            }
            source.add_file(&path, Some(&names))?;
        }
        Ok(source)
    }

    /// Open a Hugging Face model folder's weights: `model.safetensors` if present, else
    /// `model.safetensors.index.json` and its shards.
    ///
    /// # Errors
    /// [`ModelError::NotFound`] when the folder has neither; otherwise as [`Safetensors::open`]
    /// and [`Safetensors::open_sharded`].
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join(SAFETENSORS_FILE);
        let index = dir.join(SAFETENSORS_INDEX);
        if single.is_file() {
            Self::open(&single)
        } else if index.is_file() {
            Self::open_sharded(&index)
        } else {
            Err(ModelError::NotFound {
                what: "checkpoint".into(),
                path: single,
                hint: format!(
                    "expected a Hugging Face `{SAFETENSORS_FILE}` or `{SAFETENSORS_INDEX}` with \
                     its shards"
                ),
            })
        }
    }

    /// The file this source was opened from (the single file, or the index).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The number of mapped files (1, or the number of shards).
    pub fn num_files(&self) -> usize {
        self.files.len()
    }

    /// Map `path` and add its tensors (only `only`, when given: the ones an index assigns it).
    fn add_file(&mut self, path: &Path, only: Option<&[&str]>) -> Result<()> {
        let map = map_file(path)?;
        let bad = |message: String| peft_core::PeftError::Safetensors {
            file: path.into(),
            message,
        };
        let (header, metadata) =
            safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + header;
        let data_len = map.len().saturating_sub(data_start);
        let file = self.files.len();
        let tensors = metadata.tensors();
        if let Some(missing) =
            only.and_then(|names| names.iter().find(|n| !tensors.contains_key(**n)))
        {
            return Err(ModelError::MissingTensor {
                file: path.into(),
                key: (*missing).into(),
            });
        }
        for (name, info) in tensors {
            if only.is_some_and(|names| !names.contains(&name.as_str())) {
                continue;
            }
            let (start, end) = info.data_offsets;
            if start > end || end > data_len {
                return Err(bad(format!(
                    "tensor `{name}` lies outside the file ({start}..{end} of {data_len} bytes)"
                ))
                .into());
            }
            self.entries.insert(
                name,
                Entry {
                    file,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: (start, end),
                },
            );
        }
        self.files.push(MappedFile {
            path: path.into(),
            map,
            data_start,
        });
        Ok(())
    }
}

impl TensorSource for Safetensors {
    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                file: self.origin.clone(),
                key: name.into(),
            })?;
        let file = &self.files[entry.file];
        let bytes = &file.map[file.data_start + entry.range.0..file.data_start + entry.range.1];
        let values = to_f32(bytes, entry.dtype).ok_or_else(|| {
            ModelError::from(peft_core::PeftError::UnsupportedDtype {
                key: name.into(),
                dtype: format!("{:?} (in {})", entry.dtype, file.path.display()),
            })
        })?;
        let n: usize = entry.shape.iter().product();
        if values.len() != n {
            return Err(peft_core::PeftError::Safetensors {
                file: file.path.clone(),
                message: format!(
                    "tensor `{name}` has {} values for shape {:?}",
                    values.len(),
                    entry.shape
                ),
            }
            .into());
        }
        Ok(TensorData::new(values, entry.shape.clone()))
    }
}

/// Little-endian `bytes` of a float dtype as f32 values; `None` for other dtypes.
fn to_f32(bytes: &[u8], dtype: safetensors::Dtype) -> Option<Vec<f32>> {
    use safetensors::Dtype;
    let convert = |size: usize, f: fn(&[u8]) -> f32| bytes.chunks_exact(size).map(f).collect();
    Some(match dtype {
        Dtype::F32 => convert(4, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        Dtype::F16 => convert(2, |c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        Dtype::BF16 => convert(2, |c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        Dtype::F64 => convert(8, |c| {
            f64::from_le_bytes(c.try_into().expect("chunks of 8 bytes")) as f32
        }),
        _ => return None,
    })
}
