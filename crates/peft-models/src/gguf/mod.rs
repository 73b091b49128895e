//! Reading GGUF files (llama.cpp's model format, versions 2 and 3): metadata, tensor infos and
//! tensor data dequantized to f32, with GGUF tensor names mapped to Hugging Face module paths.
//!
//! * [`GgufFile::open`] memory-maps a file and parses its header, metadata and tensor infos,
//!   checking everything a later read relies on: every tensor's type is known, its first
//!   dimension is a whole number of blocks, its bytes lie inside the file, names are unique, and
//!   no count or length claims more than the rest of the file could hold (so a damaged file gives
//!   a [`GgufError`], never a panic or a huge allocation).
//! * [`GgufFile::tensor_bytes`] gives a tensor's packed blocks as stored; [`dequantize`] turns
//!   blocks of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K into f32, bit
//!   for bit as ggml's reference (the Python `gguf` package's `gguf.quants.dequantize`).
//! * [`GgufTensors`] is a [`crate::TensorSource`] over a file with Hugging Face names and PyTorch
//!   layouts (Q/K rows un-permuted as Transformers' GGUF loader does); [`llama_config`] and
//!   [`load_llama`] build a [`crate::llama::Llama`] from a `llama` GGUF file.
//!
//! # Why the header parser is written here
//!
//! The crate `ggus` (0.5.1, InfiniTensor) parses GGUF headers, but it cannot be used as the
//! reader: it refuses version 2 files; it reads the metadata value type and the tensor type by
//! copying four arbitrary file bytes into a Rust enum (undefined behaviour for an unknown type
//! number instead of an error); it reserves `IndexMap` capacity for the file's unchecked key and
//! tensor counts (an absurd count aborts the process on allocation); and it panics (subtraction
//! overflow, slice index) when tensor data runs past the end of the file. Validating around it
//! would mean parsing everything first anyway, so the small parser here reads the format
//! (documented in ggml's `docs/gguf.md`) with checked reads only. The block decoders of
//! `ggml-quants` (0.1.0, the crate `ggus` uses) are used where they are correct: see
//! [`dequantize`].

mod dequant;
mod llama;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use peft_kernels::mmap::{Mmap, map_file};
use peft_kernels::quant::PackedBytes;

pub use dequant::{DequantizeError, dequantize};
pub use llama::{GgufTensors, gguf_to_hf_name, llama_config, load_llama, load_llama_as};

/// One metadata value of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    String(String),
    /// `ARRAY` (of one element type).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The GGUF name of the value's type (`UINT32`, `STRING`, `ARRAY`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "UINT8",
            Self::I8(_) => "INT8",
            Self::U16(_) => "UINT16",
            Self::I16(_) => "INT16",
            Self::U32(_) => "UINT32",
            Self::I32(_) => "INT32",
            Self::U64(_) => "UINT64",
            Self::I64(_) => "INT64",
            Self::F32(_) => "FLOAT32",
            Self::F64(_) => "FLOAT64",
            Self::Bool(_) => "BOOL",
            Self::String(_) => "STRING",
            Self::Array(_) => "ARRAY",
        }
    }

    /// The value as an unsigned integer, when it is an integer of any width and not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, when it is `FLOAT32` or `FLOAT64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string, when it is `STRING`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }
}

/// What can go wrong when reading a GGUF file. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file is not a GGUF file or is damaged in a way no other variant describes (invalid
    /// UTF-8, a boolean that is neither 0 nor 1, a bad `general.alignment`, ...).
    #[error("{file}: {message}")]
    Format {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Opening, reading or mapping the file failed.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not start with the GGUF magic `GGUF`.
    #[error("{file}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The file.
        file: PathBuf,
        /// The first bytes of the file (fewer than 4 when the file is that short).
        found: Vec<u8>,
    },
    /// A GGUF version other than 2 or 3 (or a big-endian file).
    #[error(
        "{file}: unsupported GGUF version {version} (versions 2 and 3, little-endian, are read)"
    )]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// The version field as read (little-endian).
        version: u32,
    },
    /// The file ends inside the header, the metadata or the tensor infos.
    #[error("{file}: truncated: the file ends at byte {len} while reading {what} at byte {offset}")]
    Truncated {
        /// The file.
        file: PathBuf,
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// The file length.
        len: u64,
    },
    /// A count or length larger than the whole file could hold (a file that merely ends too
    /// early is [`GgufError::Truncated`]).
    #[error(
        "{file}: {what} is {count} (read at byte {offset}), more than a file of {file_len} bytes \
         could hold"
    )]
    AbsurdCount {
        /// The file.
        file: PathBuf,
        /// Which count (`tensor count`, `metadata key/value count`, `array length of key ...`).
        what: String,
        /// The count read.
        count: u64,
        /// The file length.
        file_len: u64,
        /// Where it was read.
        offset: u64,
    },
    /// A metadata value type number that GGUF does not define.
    #[error("{file}: metadata key `{key}` has unknown value type {type_id}")]
    UnknownValueType {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The type number.
        type_id: u32,
    },
    /// Two metadata entries with one key.
    #[error("{file}: metadata key `{key}` appears twice")]
    DuplicateKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// Two tensors with one name.
    #[error("{file}: tensor `{name}` appears twice")]
    DuplicateTensor {
        /// The file.
        file: PathBuf,
        /// The name.
        name: String,
    },
    /// A tensor type number that ggml does not define.
    #[error("{file}: tensor `{tensor}` has unknown ggml type {type_id}")]
    UnknownTensorType {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type number.
        type_id: u32,
    },
    /// A tensor whose dimensions do not fit its type (first dimension not a whole number of
    /// blocks, too many dimensions, a size that overflows).
    #[error("{file}: tensor `{tensor}`: {message}")]
    BadTensorShape {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor whose data lies (partly) past the end of the file, or is misaligned.
    #[error(
        "{file}: tensor `{tensor}` data at bytes {start}..{end} lies outside the data section \
         (the file has {file_len} bytes){detail}"
    )]
    TensorOutOfBounds {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// First byte (absolute).
        start: u64,
        /// One past the last byte (absolute; saturated on overflow).
        end: u64,
        /// The file length.
        file_len: u64,
        /// More detail (empty, or e.g. a misalignment note).
        detail: String,
    },
    /// A tensor asked for by name that the file does not have.
    #[error("{file}: no tensor `{name}`")]
    MissingTensor {
        /// The file.
        file: PathBuf,
        /// The (GGUF) name.
        name: String,
    },
    /// A tensor whose type cannot be dequantized.
    #[error("{file}: tensor `{tensor}`: {source}")]
    Dequantize {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// What went wrong.
        source: DequantizeError,
    },
    /// A metadata key the caller needs is missing.
    #[error("{file}: metadata key `{key}` is missing")]
    MissingKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata value of another type than the caller needs.
    #[error("{file}: metadata key `{key}` is {found}, expected {expected}")]
    WrongValueType {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// What was expected (`an unsigned integer`, `a string`, ...).
        expected: &'static str,
        /// What was found (`STRING`, `INT32 -1`, ...).
        found: String,
    },
    /// A model architecture (`general.architecture`) the loader does not handle.
    #[error("{file}: architecture `{found}` is not supported here (expected `{expected}`)")]
    Architecture {
        /// The file.
        file: PathBuf,
        /// `general.architecture`.
        found: String,
        /// The architecture the loader handles.
        expected: &'static str,
    },
}

macro_rules! ggml_types {
    ($($(#[$doc:meta])* $name:ident = $id:literal, $block:literal, $size:literal;)*) => {
        /// A ggml tensor type: how the elements of a tensor are stored (plain floats or blocks
        /// of quantized values). The numbers are ggml's `ggml_type`.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum GgmlType {
            $($(#[$doc])* $name,)*
        }

        impl GgmlType {
            /// The type with ggml number `id`, `None` for a number ggml does not define.
            pub fn from_id(id: u32) -> Option<Self> {
                match id {
                    $($id => Some(Self::$name),)*
                    _ => None,
                }
            }
            /// ggml's number for the type.
            pub fn id(self) -> u32 {
                match self { $(Self::$name => $id,)* }
            }
            /// Elements per block (1 for the plain types).
            pub fn block_size(self) -> usize {
                match self { $(Self::$name => $block,)* }
            }
            /// Bytes per block.
            pub fn type_size(self) -> usize {
                match self { $(Self::$name => $size,)* }
            }
            /// ggml's name of the type (`Q4_K`, `BF16`, ...).
            pub fn name(self) -> &'static str {
                match self { $(Self::$name => stringify!($name),)* }
            }
        }
    };
}

ggml_types! {
    /// 32-bit float.
    F32 = 0, 1, 4;
    /// IEEE half.
    F16 = 1, 1, 2;
    /// 4-bit, one f16 scale per 32.
    Q4_0 = 2, 32, 18;
    /// 4-bit, f16 scale and minimum per 32.
    Q4_1 = 3, 32, 20;
    /// 5-bit, one f16 scale per 32.
    Q5_0 = 6, 32, 22;
    /// 5-bit, f16 scale and minimum per 32.
    Q5_1 = 7, 32, 24;
    /// 8-bit, one f16 scale per 32.
    Q8_0 = 8, 32, 34;
    /// 8-bit with a block sum (an intermediate format of ggml).
    Q8_1 = 9, 32, 40;
    /// 2-bit k-quant.
    Q2_K = 10, 256, 84;
    /// 3-bit k-quant.
    Q3_K = 11, 256, 110;
    /// 4-bit k-quant (super-blocks of 256 with 6-bit sub-block scales and minimums).
    Q4_K = 12, 256, 144;
    /// 5-bit k-quant.
    Q5_K = 13, 256, 176;
    /// 6-bit k-quant.
    Q6_K = 14, 256, 210;
    /// 8-bit k-quant (an intermediate format of ggml).
    Q8_K = 15, 256, 292;
    /// i-quant.
    IQ2_XXS = 16, 256, 66;
    /// i-quant.
    IQ2_XS = 17, 256, 74;
    /// i-quant.
    IQ3_XXS = 18, 256, 98;
    /// i-quant.
    IQ1_S = 19, 256, 50;
    /// i-quant.
    IQ4_NL = 20, 32, 18;
    /// i-quant.
    IQ3_S = 21, 256, 110;
    /// i-quant.
    IQ2_S = 22, 256, 82;
    /// i-quant.
    IQ4_XS = 23, 256, 136;
    /// 8-bit integer.
    I8 = 24, 1, 1;
    /// 16-bit integer.
    I16 = 25, 1, 2;
    /// 32-bit integer.
    I32 = 26, 1, 4;
    /// 64-bit integer.
    I64 = 27, 1, 8;
    /// 64-bit float.
    F64 = 28, 1, 8;
    /// i-quant.
    IQ1_M = 29, 256, 56;
    /// bfloat16.
    BF16 = 30, 1, 2;
    /// Ternary quant.
    TQ1_0 = 34, 256, 54;
    /// Ternary quant.
    TQ2_0 = 35, 256, 66;
    /// Microscaling FP4.
    MXFP4 = 39, 32, 17;
    /// NVIDIA FP4.
    NVFP4 = 40, 64, 36;
    /// 1-bit quant.
    Q1_0 = 41, 128, 18;
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in a GGUF file's tensor infos.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// How the elements are stored.
    pub ggml_type: GgmlType,
    /// Dimensions in GGUF order: `dims[0]` (ggml's `ne0`) is the fastest-varying one, so a
    /// PyTorch `[out, in]` weight has `dims == [in, out]`.
    pub dims: Vec<u64>,
    /// Offset of the data from the start of the data section ([`GgufFile::data_offset`]).
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The number of elements (checked against overflow when the file was opened).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The number of bytes of the data.
    pub fn n_bytes(&self) -> u64 {
        self.n_elements() / self.ggml_type.block_size() as u64 * self.ggml_type.type_size() as u64
    }

    /// The shape in PyTorch order (the dimensions reversed).
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension fits in usize: their product was checked against the file length.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A GGUF file, memory-mapped, with its metadata and tensor infos parsed and checked.
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    /// The file, for [`GgufFile::dequantize`]'s reads.
    reader: Mutex<File>,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

/// The alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Bytes of packed data [`GgufFile::dequantize`] reads at a time.
const CHUNK_BYTES: usize = 1 << 20;

/// Deepest nesting of metadata arrays accepted (GGUF files use one level).
const MAX_ARRAY_DEPTH: usize = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

impl GgufFile {
    /// Open and parse `path` (see the module documentation for what is checked).
    ///
    /// # Errors
    /// The file cannot be opened or mapped ([`GgufError::Io`]), or it is not a valid GGUF v2/v3
    /// file (the other variants of [`GgufError`], each naming the problem).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            file: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 4 {
            // Too short to map meaningfully; report what is there.
            let bytes = std::fs::read(&path).map_err(io)?;
            return Err(GgufError::BadMagic {
                file: path,
                found: bytes,
            });
        }
        let map = Arc::new(map_file(&file).map_err(io)?);
        let parsed = Parser::new(&path, &map).parse()?;
        Ok(Self {
            path,
            map,
            reader: Mutex::new(file),
            version: parsed.version,
            metadata: parsed.metadata,
            index: parsed
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t.name.clone(), i))
                .collect(),
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata key and value.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The data section's alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts (bytes from the start of the file).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of tensor `name` (GGUF naming), if present.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo, GgufError> {
        self.tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor {
                file: self.path.clone(),
                name: name.into(),
            })
    }

    /// The raw data of tensor `name` as stored: packed blocks of its [`GgmlType`], rows of
    /// `dims[0]` elements one after the other.
    ///
    /// # Errors
    /// [`GgufError::MissingTensor`].
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self.info_or_err(name)?;
        // Bounds were checked when the file was opened.
        let start = (self.data_offset + info.offset) as usize;
        Ok(&self.map[start..start + info.n_bytes() as usize])
    }

    /// The raw data of tensor `name` as [`tensor_bytes`](Self::tensor_bytes), shared with the
    /// memory map (a packed base that keeps the file's blocks holds these).
    ///
    /// # Errors
    /// [`GgufError::MissingTensor`].
    pub fn tensor_shared(&self, name: &str) -> Result<PackedBytes, GgufError> {
        let info = self.info_or_err(name)?;
        let start = (self.data_offset + info.offset) as usize;
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.map.clone();
        PackedBytes::new(owner, start..start + info.n_bytes() as usize).map_err(|e| {
            GgufError::Format {
                file: self.path.clone(),
                message: format!("tensor `{name}`: {e}"),
            }
        })
    }

    /// Tensor `name` dequantized to f32, in storage order (which is PyTorch's row-major order of
    /// [`GgufTensorInfo::shape`]).
    ///
    /// The packed data is read from the file in chunks of about 1 MiB rather than through the
    /// memory map, so a model loaded tensor by tensor does not also keep the mapped file
    /// resident: loading peaks at the f32 weights plus one chunk.
    ///
    /// # Errors
    /// [`GgufError::MissingTensor`], [`GgufError::Dequantize`] for a type [`dequantize`] does
    /// not handle, [`GgufError::Io`] when reading fails.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.info_or_err(name)?;
        let ty = info.ggml_type;
        let dq = |source| GgufError::Dequantize {
            file: self.path.clone(),
            tensor: name.into(),
            source,
        };
        // Fail early (before allocating) for a type that cannot be dequantized.
        dequantize(ty, &[]).map_err(dq)?;
        let (block, size) = (ty.block_size(), ty.type_size());
        let blocks_per_chunk = (CHUNK_BYTES / size).max(1);
        let mut out = vec![0.0f32; info.n_elements() as usize];
        let mut buf = vec![0u8; blocks_per_chunk * size];
        let mut pos = self.data_offset + info.offset;
        let mut file = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        for o in out.chunks_mut(blocks_per_chunk * block) {
            let n = o.len() / block * size;
            let io = |source| GgufError::Io {
                file: self.path.clone(),
                source,
            };
            file.seek(SeekFrom::Start(pos)).map_err(io)?;
            file.read_exact(&mut buf[..n]).map_err(io)?;
            dequant::dequantize_into(ty, &buf[..n], o).map_err(dq)?;
            pos += n as u64;
        }
        Ok(out)
    }

    /// The value of metadata `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.metadata.get(key).ok_or_else(|| GgufError::MissingKey {
            file: self.path.clone(),
            key: key.into(),
        })
    }

    fn wrong(&self, key: &str, expected: &'static str, found: &GgufValue) -> GgufError {
        let found = match found {
            GgufValue::String(_) | GgufValue::Array(_) => found.type_name().to_string(),
            other => format!("{} {}", other.type_name(), scalar_text(other)),
        };
        GgufError::WrongValueType {
            file: self.path.clone(),
            key: key.into(),
            expected,
            found,
        }
    }

    /// Metadata `key` as an unsigned integer (any integer type, not negative).
    ///
    /// # Errors
    /// [`GgufError::MissingKey`] or [`GgufError::WrongValueType`].
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// Metadata `key` as a `usize` (as [`GgufFile::get_u64`], and fitting in `usize`).
    ///
    /// # Errors
    /// As [`GgufFile::get_u64`].
    pub fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// Metadata `key` as a float (`FLOAT32` or `FLOAT64`).
    ///
    /// # Errors
    /// [`GgufError::MissingKey`] or [`GgufError::WrongValueType`].
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong(key, "a float", v))
    }

    /// Metadata `key` as a string.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`] or [`GgufError::WrongValueType`].
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// Metadata `key` as a boolean.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`] or [`GgufError::WrongValueType`].
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, "a boolean", v)),
        }
    }

    /// Metadata `key` as an array.
    ///
    /// # Errors
    /// [`GgufError::MissingKey`] or [`GgufError::WrongValueType`].
    pub fn get_array(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        match self.require(key)? {
            GgufValue::Array(a) => Ok(a),
            v => Err(self.wrong(key, "an array", v)),
        }
    }
}

fn scalar_text(v: &GgufValue) -> String {
    match v {
        GgufValue::U8(x) => x.to_string(),
        GgufValue::I8(x) => x.to_string(),
        GgufValue::U16(x) => x.to_string(),
        GgufValue::I16(x) => x.to_string(),
        GgufValue::U32(x) => x.to_string(),
        GgufValue::I32(x) => x.to_string(),
        GgufValue::U64(x) => x.to_string(),
        GgufValue::I64(x) => x.to_string(),
        GgufValue::F32(x) => x.to_string(),
        GgufValue::F64(x) => x.to_string(),
        GgufValue::Bool(x) => x.to_string(),
        GgufValue::String(_) | GgufValue::Array(_) => String::new(),
    }
}

/// What [`Parser::parse`] returns.
struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A cursor over the file's bytes whose every read is checked.
struct Parser<'a> {
    file: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(file: &'a Path, bytes: &'a [u8]) -> Self {
        Self {
            file,
            bytes,
            pos: 0,
        }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            file: self.file.into(),
            what: what.into(),
            offset: self.pos as u64,
            len: self.bytes.len() as u64,
        }
    }

    fn format(&self, message: String) -> GgufError {
        GgufError::Format {
            file: self.file.into(),
            message,
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        if (n as u64) > self.remaining() {
            return Err(self.truncated(what));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items each at least `min_size` bytes long, checked against the file length
    /// (which bounds every allocation made from it); a count that fits the file but not what is
    /// left of it fails later, as [`GgufError::Truncated`], where the data runs out.
    fn count(&mut self, what: &str, min_size: u64) -> Result<u64, GgufError> {
        let offset = self.pos as u64;
        let count = self.u64(what)?;
        let file_len = self.bytes.len() as u64;
        if count.saturating_mul(min_size) > file_len {
            return Err(GgufError::AbsurdCount {
                file: self.file.into(),
                what: what.into(),
                count,
                file_len,
                offset,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.count(&format!("length of {what}"), 1)?;
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.format(format!("{what} is not valid UTF-8: {e}")))
    }

    fn parse(mut self) -> Result<Parsed, GgufError> {
        let magic = self.bytes[..4].to_vec();
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                file: self.file.into(),
                found: magic,
            });
        }
        self.pos = 4;
        let version = self.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                file: self.file.into(),
                version,
            });
        }
        // A tensor info is at least 24 bytes (name length, dimension count, type, offset); a
        // key/value at least 13 (key length, value type, a one-byte value).
        // Both counts are read before either is checked, so a file cut inside the header is
        // `Truncated`, not `AbsurdCount`.
        let counts_at = self.pos;
        self.u64("the tensor count")?;
        self.u64("the metadata key/value count")?;
        self.pos = counts_at;
        let n_tensors = self.count("the tensor count", 24)?;
        let n_kv = self.count("the metadata key/value count", 13)?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = self.string(&format!("metadata key {i}"))?;
            let ty = self.u32(&format!("the value type of `{key}`"))?;
            let value = self.value(&key, ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey {
                    file: self.file.into(),
                    key,
                });
            }
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => {
                    return Err(self.format(format!(
                        "general.alignment must be a power of two, found {} {}",
                        v.type_name(),
                        scalar_text(v)
                    )));
                }
            },
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut names = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = self.string(&format!("the name of tensor {i}"))?;
            let n_dims = self.u32(&format!("the dimension count of `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::BadTensorShape {
                    file: self.file.into(),
                    tensor: name,
                    message: format!("{n_dims} dimensions (at most {MAX_DIMS})"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64(&format!("the dimensions of `{name}`"))?);
            }
            let type_id = self.u32(&format!("the type of `{name}`"))?;
            let offset = self.u64(&format!("the data offset of `{name}`"))?;
            let Some(ggml_type) = GgmlType::from_id(type_id) else {
                return Err(GgufError::UnknownTensorType {
                    file: self.file.into(),
                    tensor: name,
                    type_id,
                });
            };
            if names.insert(name.clone(), i).is_some() {
                return Err(GgufError::DuplicateTensor {
                    file: self.file.into(),
                    name,
                });
            }
            tensors.push(GgufTensorInfo {
                name,
                ggml_type,
                dims,
                offset,
            });
        }

        let end_of_infos = self.pos as u64;
        let data_offset = end_of_infos.div_ceil(alignment) * alignment;
        let file_len = self.bytes.len() as u64;
        for t in &tensors {
            self.check_tensor(t, data_offset, alignment, file_len)?;
        }
        Ok(Parsed {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    fn check_tensor(
        &self,
        t: &GgufTensorInfo,
        data_offset: u64,
        alignment: u64,
        file_len: u64,
    ) -> Result<(), GgufError> {
        let bad = |message: String| GgufError::BadTensorShape {
            file: self.file.into(),
            tensor: t.name.clone(),
            message,
        };
        let block = t.ggml_type.block_size() as u64;
        let ne0 = t.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(block) {
            return Err(bad(format!(
                "first dimension {ne0} is not a multiple of the {} block size {block}",
                t.ggml_type
            )));
        }
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {:?} overflow", t.dims)))?;
        let bytes = (n / block).checked_mul(t.ggml_type.type_size() as u64);
        let start = data_offset.checked_add(t.offset);
        let end = start.zip(bytes).and_then(|(s, b)| s.checked_add(b));
        let out = |detail: String| GgufError::TensorOutOfBounds {
            file: self.file.into(),
            tensor: t.name.clone(),
            start: start.unwrap_or(u64::MAX),
            end: end.unwrap_or(u64::MAX),
            file_len,
            detail,
        };
        match end {
            Some(end) if end <= file_len => {}
            _ => return Err(out(String::new())),
        }
        if !t.offset.is_multiple_of(alignment) {
            return Err(out(format!(
                "; offset {} is not a multiple of the alignment {alignment}",
                t.offset
            )));
        }
        Ok(())
    }

    fn value(&mut self, key: &str, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        let what = || format!("the value of `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(&what())?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what())?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.format(format!("`{key}`: boolean byte {b} is not 0 or 1"))),
            },
            8 => GgufValue::String(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.format(format!(
                        "`{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem = self.u32(&format!("the array element type of `{key}`"))?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(GgufError::UnknownValueType {
                            file: self.file.into(),
                            key: key.into(),
                            type_id: elem,
                        });
                    }
                };
                let n = self.count(&format!("the array length of `{key}`"), min)?;
                // Bounded by the file length through `count`; capped so a long array of bytes
                // does not reserve 32 bytes per file byte up front.
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(key, elem, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what())?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    file: self.file.into(),
                    key: key.into(),
                    type_id: ty,
                });
            }
        })
    }
}
