//! The Hugging Face PEFT on-disk layout: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Method crates decide which tensors and fields they write; this module does the parts every
//! method shares: key naming (`base_model.model.` prefix, no adapter name, optional remapping of
//! module paths between a Hugging Face model and the burn model), safetensors and JSON reading,
//! and atomic writes (a failed save never damages an existing file).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use regex::Regex;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{PeftError, Result};

/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter configuration.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// Prefix of every key PEFT writes.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Rewrites module paths between a Hugging Face model and a burn model.
///
/// Rules are regular expressions applied in order to module paths (without the
/// `base_model.model.` prefix) when reading; [`KeyMap::to_hf`] applies the reverse rules when
/// writing. For example a Hugging Face BERT (`encoder.layer.0.attention.self.query`) loaded into
/// a burn model with `layers.0.attn.query`:
/// `KeyMap::new().rule(r"^encoder\.layer\.(\d+)\.attention\.self\.", "layers.$1.attn.", r"^layers\.(\d+)\.attn\.", "encoder.layer.$1.attention.self.")`.
#[derive(Clone, Debug, Default)]
pub struct KeyMap {
    to_burn: Vec<(Regex, String)>,
    to_hf: Vec<(Regex, String)>,
}

impl KeyMap {
    /// The identity mapping.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a rule pair: `hf_pattern -> burn_replacement` when reading and
    /// `burn_pattern -> hf_replacement` when writing.
    ///
    /// # Errors
    /// A pattern that does not compile.
    pub fn rule(
        mut self,
        hf_pattern: &str,
        burn_replacement: &str,
        burn_pattern: &str,
        hf_replacement: &str,
    ) -> Result<Self> {
        self.to_burn
            .push((compile(hf_pattern)?, burn_replacement.to_string()));
        self.to_hf
            .push((compile(burn_pattern)?, hf_replacement.to_string()));
        Ok(self)
    }

    /// Map a Hugging Face module path to a burn module path.
    pub fn to_burn(&self, path: &str) -> String {
        apply(&self.to_burn, path)
    }

    /// Map a burn module path to a Hugging Face module path.
    pub fn to_hf(&self, path: &str) -> String {
        apply(&self.to_hf, path)
    }
}

fn compile(p: &str) -> Result<Regex> {
    Regex::new(p).map_err(|source| PeftError::Regex {
        pattern: p.to_string(),
        source,
    })
}

fn apply(rules: &[(Regex, String)], path: &str) -> String {
    rules.iter().fold(path.to_string(), |p, (r, rep)| {
        r.replace_all(&p, rep.as_str()).into_owned()
    })
}

/// Remove the adapter name from a key as PEFT does on save: a trailing `.name` or a `.name.`
/// just before the last component. Keys without it are returned unchanged.
pub fn strip_adapter_name(key: &str, name: &str) -> String {
    if let Some(head) = key.strip_suffix(&format!(".{name}")) {
        return head.to_string();
    }
    if let Some((head, last)) = key.rsplit_once('.')
        && let Some(h) = head.strip_suffix(&format!(".{name}"))
    {
        return format!("{h}.{last}");
    }
    key.to_string()
}

/// Split a saved key into the module path (without prefix) and the PEFT parameter suffix that
/// follows it, given the suffixes a method knows (e.g. `lora_A.weight`).
pub fn split_key<'k>(key: &'k str, suffixes: &[&'static str]) -> Option<(&'k str, &'static str)> {
    let key = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    suffixes.iter().find_map(|s| {
        key.strip_suffix(s)
            .and_then(|head| head.strip_suffix('.'))
            .map(|path| (path, *s))
    })
}

/// The tensors of a safetensors file, converted to `f32` (floats) or `i64` (integers).
///
/// # Errors
/// Unreadable file, invalid safetensors, or a dtype other than f16/bf16/f32/f64/i32/i64/bool.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, TensorData>> {
    let bytes = fs::read(path).map_err(|e| PeftError::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| PeftError::Safetensors {
        file: path.into(),
        message: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        out.insert(name.clone(), to_data(&name, &view)?);
    }
    Ok(out)
}

fn to_data(name: &str, view: &TensorView<'_>) -> Result<TensorData> {
    let shape = view.shape().to_vec();
    let b = view.data();
    let floats = |f: &dyn Fn(&[u8]) -> f32, size: usize| -> Vec<f32> {
        b.chunks_exact(size).map(f).collect()
    };
    Ok(match view.dtype() {
        Dtype::F32 => TensorData::new(
            floats(&|c| f32::from_le_bytes(c.try_into().unwrap()), 4),
            shape,
        ),
        Dtype::F64 => TensorData::new(
            floats(&|c| f64::from_le_bytes(c.try_into().unwrap()) as f32, 8),
            shape,
        ),
        Dtype::F16 => TensorData::new(
            floats(
                &|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                2,
            ),
            shape,
        ),
        Dtype::BF16 => TensorData::new(
            floats(
                &|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f32(),
                2,
            ),
            shape,
        ),
        Dtype::I64 => TensorData::new(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
            shape,
        ),
        Dtype::I32 => TensorData::new(
            b.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect::<Vec<_>>(),
            shape,
        ),
        // peft-rosa's CSR indices (`row_idx`, `col_idx`).
        Dtype::I16 => TensorData::new(
            b.chunks_exact(2)
                .map(|c| i64::from(i16::from_le_bytes(c.try_into().unwrap())))
                .collect::<Vec<_>>(),
            shape,
        ),
        other => {
            return Err(PeftError::UnsupportedDtype {
                key: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// Write tensors as safetensors (with PEFT's `{"format": "pt"}` metadata), atomically.
///
/// Float tensors are written as f32, integer tensors as i64.
///
/// # Errors
/// I/O errors; the previous file, if any, is intact then.
pub fn write_tensors(path: &Path, tensors: &BTreeMap<String, TensorData>) -> Result<()> {
    let mut encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, data) in tensors {
        let shape = data.shape().to_vec();
        let (dtype, bytes) = match data.dtype() {
            DType::I64 | DType::I32 | DType::I16 | DType::I8 | DType::U64 | DType::U32 => {
                let v: Vec<i64> = data.iter::<i64>().collect();
                (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            _ => {
                let v: Vec<f32> = data.iter::<f32>().collect();
                (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        };
        encoded.push((name.clone(), dtype, shape, bytes));
    }
    let views = encoded
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| PeftError::Safetensors {
                    file: path.into(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let bytes = safetensors::serialize(views, metadata).map_err(|e| PeftError::Safetensors {
        file: path.into(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers see the old file or the new one, never a half-written one.
///
/// # Errors
/// I/O errors; the temporary file is removed and the previous file kept.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| PeftError::io(path, std::io::ErrorKind::InvalidInput.into()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(PeftError::io(path, e));
    }
    Ok(())
}

/// Read a JSON object from a file, keeping the order of its keys.
///
/// # Errors
/// Unreadable file or invalid JSON.
pub fn read_json(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| PeftError::Json {
        file: path.into(),
        source,
    })
}

/// Write a JSON object as PEFT does (`indent=2`, keys sorted at the top level), atomically.
///
/// # Errors
/// I/O errors; the previous file is intact then.
pub fn write_json(path: &Path, value: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let sorted: BTreeMap<&String, &serde_json::Value> = value.iter().collect();
    let mut text = serde_json::to_string_pretty(&sorted).map_err(|source| PeftError::Json {
        file: path.into(),
        source,
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_name_is_stripped_like_peft() {
        assert_eq!(
            strip_adapter_name("m.q.lora_A.default.weight", "default"),
            "m.q.lora_A.weight"
        );
        assert_eq!(
            strip_adapter_name("m.q.lora_magnitude_vector.default", "default"),
            "m.q.lora_magnitude_vector"
        );
        assert_eq!(
            strip_adapter_name("m.q.lora_A.weight", "default"),
            "m.q.lora_A.weight"
        );
        assert_eq!(
            strip_adapter_name("m.default2.lora_A.weight", "default"),
            "m.default2.lora_A.weight"
        );
    }

    #[test]
    fn keys_split_into_module_and_suffix() {
        let suffixes = ["lora_A.weight", "lora_B.weight"];
        assert_eq!(
            split_key("base_model.model.layers.0.q.lora_A.weight", &suffixes),
            Some(("layers.0.q", "lora_A.weight"))
        );
        assert_eq!(
            split_key("base_model.model.layers.0.q.bias", &suffixes),
            None
        );
    }

    #[test]
    fn key_map_round_trips() {
        let map = KeyMap::new()
            .rule(
                r"^encoder\.layer\.(\d+)\.",
                "layers.$1.",
                r"^layers\.(\d+)\.",
                "encoder.layer.$1.",
            )
            .unwrap();
        assert_eq!(map.to_burn("encoder.layer.3.query"), "layers.3.query");
        assert_eq!(map.to_hf("layers.3.query"), "encoder.layer.3.query");
    }

    #[test]
    fn tensors_round_trip_and_failed_write_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        let mut t = BTreeMap::new();
        t.insert("a".to_string(), TensorData::new(vec![1.0f32, -2.5], [2]));
        t.insert("i".to_string(), TensorData::new(vec![3i64, 70000], [1, 2]));
        write_tensors(&path, &t).unwrap();
        let back = read_tensors(&path).unwrap();
        assert_eq!(back["a"].try_to_vec::<f32>().unwrap(), vec![1.0, -2.5]);
        assert_eq!(back["i"].try_to_vec::<i64>().unwrap(), vec![3, 70000]);
        assert_eq!(back["i"].shape().to_vec(), vec![1, 2]);
        // Writing into a directory that does not exist fails and leaves nothing behind.
        let bad = dir.path().join("missing").join(WEIGHTS_FILE);
        assert!(write_tensors(&bad, &t).is_err());
        // Writing over an existing path that is a directory fails; the old file stays.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        assert!(write_atomic(&blocked, b"x").is_err());
        assert_eq!(read_tensors(&path).unwrap().len(), 2);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
