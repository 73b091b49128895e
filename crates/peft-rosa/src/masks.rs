//! [`RosaMasks`]: the sparse adapters' structures by module path, and their file format.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::tensor::TensorData;
use peft_core::error::{PeftError, Result};
use peft_core::hf;
use sparse_kernels::CsrStructure;

/// The mask of every sparse adapter, by module path (exact match, never a substring).
///
/// A structure has the shape of the layer's weight in PyTorch orientation: `[out, in]` for a
/// linear layer, `[num_embeddings, dim]` for an embedding, like peft-rosa's `SparseLinear`.
///
/// On disk (`save` / `load`) it is a safetensors file with, per module, `<path>.shape`
/// (`[2]`), `<path>.row_offsets` (`[rows + 1]`) and `<path>.col_indices` (`[nnz]`), all
/// `int64`: the CSR of the boolean mask, so the file is O(nnz), not O(rows · cols).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RosaMasks {
    layers: BTreeMap<String, CsrStructure>,
}

impl RosaMasks {
    /// No masks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the mask of the module at `path`.
    pub fn insert(&mut self, path: impl Into<String>, structure: CsrStructure) {
        self.layers.insert(path.into(), structure);
    }

    /// The mask of the module at `path`.
    pub fn get(&self, path: &str) -> Option<&CsrStructure> {
        self.layers.get(path)
    }

    /// Masks by path, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &CsrStructure)> {
        self.layers.iter().map(|(p, s)| (p.as_str(), s))
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Total number of entries.
    pub fn nnz(&self) -> usize {
        self.layers.values().map(CsrStructure::nnz).sum()
    }

    /// Write the masks to `path` (atomically: a failed write keeps any old file).
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let ints = |v: Vec<i64>| {
            let n = v.len();
            TensorData::new(v, [n])
        };
        let mut tensors = BTreeMap::new();
        for (name, s) in &self.layers {
            tensors.insert(
                format!("{name}.shape"),
                ints(vec![s.rows() as i64, s.cols() as i64]),
            );
            tensors.insert(
                format!("{name}.row_offsets"),
                ints(s.row_offsets().iter().map(|&v| i64::from(v)).collect()),
            );
            tensors.insert(
                format!("{name}.col_indices"),
                ints(s.col_indices().iter().map(|&v| i64::from(v)).collect()),
            );
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
                path: dir.into(),
                source,
            })?;
        }
        hf::write_tensors(path, &tensors)
    }

    /// Read masks written by [`save`](Self::save).
    ///
    /// # Errors
    /// I/O errors, a missing part of a module's mask, or an invalid CSR (named by module).
    pub fn load(path: &Path) -> Result<Self> {
        let mut tensors = hf::read_tensors(path)?;
        let bad = |reason: String| PeftError::Safetensors {
            file: path.into(),
            message: reason,
        };
        let names: BTreeSet<String> = tensors
            .keys()
            .filter_map(|k| k.strip_suffix(".shape").map(str::to_string))
            .collect();
        let mut out = Self::new();
        for name in names {
            let mut take = |part: &str| -> Result<Vec<u32>> {
                let key = format!("{name}.{part}");
                let data = tensors
                    .remove(&key)
                    .ok_or_else(|| PeftError::MissingTensor {
                        file: path.into(),
                        key: key.clone(),
                    })?;
                let values = data
                    .convert::<i64>()
                    .try_into_vec::<i64>()
                    .map_err(|e| bad(format!("`{key}`: {e:?}")))?;
                values
                    .into_iter()
                    .map(|v| {
                        u32::try_from(v).map_err(|_| bad(format!("`{key}`: {v} is out of range")))
                    })
                    .collect()
            };
            let shape = take("shape")?;
            if shape.len() != 2 {
                return Err(bad(format!("`{name}.shape` must have 2 entries")));
            }
            let structure = CsrStructure::new(
                shape[0] as usize,
                shape[1] as usize,
                take("row_offsets")?,
                take("col_indices")?,
            )
            .map_err(|e| bad(format!("mask of `{name}`: {e}")))?;
            out.insert(name, structure);
        }
        if !tensors.is_empty() {
            return Err(PeftError::UnexpectedTensors {
                file: path.into(),
                keys: tensors.into_keys().collect(),
            });
        }
        Ok(out)
    }
}

/// A uniformly random structure of `nnz` entries in a `rows x cols` matrix, from `seed` and
/// the module path (so every module gets its own, reproducibly).
pub(crate) fn random_structure(
    path: &str,
    rows: usize,
    cols: usize,
    nnz: usize,
    seed: u64,
) -> CsrStructure {
    let flat = peft_core::rng::random_indices(path, seed, rows * cols, nnz);
    CsrStructure::from_flat_indices(rows, cols, &flat)
        .expect("distinct in-range indices")
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_is_exact_and_names_bad_files() {
        let mut masks = RosaMasks::new();
        masks.insert("layers.0.q", random_structure("layers.0.q", 7, 5, 9, 3));
        masks.insert(
            "layers.10.q",
            random_structure("layers.10.q", 3, 40_000, 20, 3),
        );
        masks.insert("empty", CsrStructure::empty(2, 2).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/masks.safetensors");
        masks.save(&file).unwrap();
        let back = RosaMasks::load(&file).unwrap();
        assert_eq!(back, masks);
        assert_eq!(back.nnz(), 29);
        // Columns beyond 32767 survive (the reference's int16 indices would wrap).
        assert!(
            back.get("layers.10.q")
                .unwrap()
                .col_indices()
                .iter()
                .any(|&c| c > 32_767)
        );

        // A broken CSR is named by module.
        let mut tensors = hf::read_tensors(&file).unwrap();
        tensors.insert(
            "layers.0.q.col_indices".into(),
            TensorData::new(vec![9i64; 9], [9]),
        );
        hf::write_tensors(&file, &tensors).unwrap();
        let err = RosaMasks::load(&file).unwrap_err().to_string();
        assert!(err.contains("layers.0.q"), "{err}");
    }

    #[test]
    fn random_structures_are_reproducible_distinct_and_sized() {
        let a = random_structure("x", 10, 10, 30, 1);
        assert_eq!(a.nnz(), 30);
        assert_eq!(a, random_structure("x", 10, 10, 30, 1));
        assert_ne!(a, random_structure("y", 10, 10, 30, 1));
        assert_ne!(a, random_structure("x", 10, 10, 30, 2));
        assert_eq!(random_structure("x", 3, 3, 9, 1).nnz(), 9);
        assert_eq!(random_structure("x", 3, 3, 0, 1).nnz(), 0);
    }
}
