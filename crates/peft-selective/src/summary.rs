//! The `O(budget)` result of a selective run: the chosen entries' final values and coordinates,
//! keyed by parameter path.
//!
//! On disk it uses burn-peft's two-file adapter layout in a directory:
//! * `adapter_config.json`: `{"peft_type": "SELECTIVE", "method", "budget", "budget_used",
//!   "params": {path: {"shape": [...], "full": bool, "count": n}}, "batch_norm": {path:
//!   {"shape": [...]}}}` (`batch_norm` only when the model has BatchNorm layers);
//! * `adapter_model.safetensors`: for every parameter, `<path>.values` (f32, the final values,
//!   not deltas) and, unless the parameter is trained in full, `<path>.indices` (i64 row-major
//!   flat indices into the parameter in burn's orientation, ascending); and every BatchNorm
//!   running statistic in full under its own path (`<bn>.running_mean`, `<bn>.running_var`),
//!   the toolkit's `bn_metadata`: they change in training without being parameters. (burn's
//!   BatchNorm has no `num_batches_tracked`.)
//!
//! The toolkit keys its summary by the order of `model.parameters()`, so any change of
//! architecture or order misloads silently; here every entry names its parameter and applying a
//! summary to a model that lacks a path or has another shape is an error.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::optim::Optimizer;
use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{hf, hosts};
use serde_json::{Map, Value, json};

use crate::error::{Result, SelectiveError};
use crate::format::{check_indices, json_shape};
use crate::optimizer::SelectiveOptimizer;
use crate::params;

/// File name of the summary's tensors.
pub const SUMMARY_TENSORS: &str = "adapter_model.safetensors";
/// File name of the summary's metadata.
pub const SUMMARY_JSON: &str = "adapter_config.json";
/// `peft_type` of a summary.
pub const PEFT_TYPE: &str = "SELECTIVE";

/// The chosen entries of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryEntry {
    /// The parameter's shape (burn orientation).
    pub shape: Vec<usize>,
    /// Ascending row-major flat indices; `None` when the parameter is trained in full.
    pub indices: Option<Vec<i64>>,
    /// Final values at those indices (all values, row-major, when trained in full).
    pub values: Vec<f32>,
}

/// Chosen entries' final values and coordinates, by parameter path.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// The method that chose them (`id3`, `pafi`, `bitfit`).
    pub method: String,
    /// The budget of the run.
    pub budget: usize,
    /// Entries by parameter path.
    pub params: BTreeMap<String, SummaryEntry>,
    /// BatchNorm running statistics by path (`<bn>.running_mean`, `<bn>.running_var`), in full
    /// (`indices` is `None`).
    pub batch_norm: BTreeMap<String, SummaryEntry>,
}

impl<O: Optimizer> SelectiveOptimizer<O> {
    /// The summary of `model` (trained by this optimizer): its values at the chosen entries.
    ///
    /// # Errors
    /// A tracked parameter is missing from `model`.
    pub fn summary<M: Module>(&self, model: &M) -> Result<Summary> {
        let snaps = params::snapshots(model, &self.lookup, None);
        let mut out = BTreeMap::new();
        for (p, s) in self.params.iter().zip(snaps) {
            if p.count() == 0 {
                continue;
            }
            let s = s.ok_or_else(|| SelectiveError::UnknownParameter {
                path: p.path.clone(),
            })?;
            if s.shape != p.shape {
                return Err(SelectiveError::ShapeMismatch {
                    path: p.path.clone(),
                    expected: p.shape.clone(),
                    found: s.shape,
                });
            }
            let (indices, values) = if p.full {
                (None, s.value)
            } else {
                let mut sorted = p.chosen.clone();
                sorted.sort_unstable();
                let idx: Tensor<1, Int> = crate::format::index_tensor(&sorted, &self.device);
                (Some(sorted), s.value.select(0, idx))
            };
            out.insert(
                p.path.clone(),
                SummaryEntry {
                    shape: p.shape.clone(),
                    indices,
                    values: values.into_data().iter::<f32>().collect(),
                },
            );
        }
        let stats = params::batch_norm_stats(model);
        let batch_norm = hosts::read_params(model, |p| stats.iter().any(|s| s == p))
            .into_iter()
            .map(|(path, data)| {
                let entry = SummaryEntry {
                    shape: data.shape().to_vec(),
                    indices: None,
                    values: data.iter::<f32>().collect(),
                };
                (path, entry)
            })
            .collect();
        Ok(Summary {
            method: self.config.method.name().into(),
            budget: self.budget,
            params: out,
            batch_norm,
        })
    }
}

impl Summary {
    /// Number of chosen entries.
    pub fn num_entries(&self) -> usize {
        self.params.values().map(|e| e.values.len()).sum()
    }

    /// Bytes of the tensors on disk (values f32, indices i64, BatchNorm statistics f32), without
    /// headers.
    pub fn tensor_bytes(&self) -> usize {
        self.params
            .values()
            .chain(self.batch_norm.values())
            .map(|e| 4 * e.values.len() + 8 * e.indices.as_ref().map_or(0, Vec::len))
            .sum()
    }

    /// Write the summary into the directory `dir` (created if needed).
    ///
    /// # Errors
    /// I/O errors; existing files are replaced atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| peft_core::PeftError::Io {
            path: dir.into(),
            source,
        })?;
        let mut tensors = BTreeMap::new();
        let mut params = Map::new();
        for (path, e) in &self.params {
            tensors.insert(
                format!("{path}.values"),
                TensorData::new(e.values.clone(), [e.values.len()]),
            );
            if let Some(idx) = &e.indices {
                tensors.insert(
                    format!("{path}.indices"),
                    TensorData::new(idx.clone(), [idx.len()]),
                );
            }
            params.insert(
                path.clone(),
                json!({ "shape": e.shape, "full": e.indices.is_none(), "count": e.values.len() }),
            );
        }
        let mut batch_norm = Map::new();
        for (path, e) in &self.batch_norm {
            tensors.insert(
                path.clone(),
                TensorData::new(e.values.clone(), [e.values.len()]),
            );
            batch_norm.insert(path.clone(), json!({ "shape": e.shape }));
        }
        let mut meta = Map::new();
        meta.insert("peft_type".into(), json!(PEFT_TYPE));
        meta.insert("method".into(), json!(self.method));
        meta.insert("budget".into(), json!(self.budget));
        meta.insert("budget_used".into(), json!(self.num_entries()));
        meta.insert("params".into(), Value::Object(params));
        if !batch_norm.is_empty() {
            meta.insert("batch_norm".into(), Value::Object(batch_norm));
        }
        hf::write_tensors(&dir.join(SUMMARY_TENSORS), &tensors)?;
        hf::write_json(&dir.join(SUMMARY_JSON), &meta)?;
        Ok(())
    }

    /// Read a summary written by [`save`](Self::save), checking that it is consistent.
    ///
    /// # Errors
    /// Missing files, another `peft_type`, missing or extra tensors, counts that disagree,
    /// indices out of range or repeated.
    pub fn load(dir: &Path) -> Result<Self> {
        let json_path = dir.join(SUMMARY_JSON);
        let tensor_path = dir.join(SUMMARY_TENSORS);
        let meta = hf::read_json(&json_path)?;
        let mut tensors = hf::read_tensors(&tensor_path)?;
        let bad = |reason: String| SelectiveError::file(&json_path, reason);
        if meta.get("peft_type").and_then(Value::as_str) != Some(PEFT_TYPE) {
            return Err(bad(format!("`peft_type` is not `{PEFT_TYPE}`")));
        }
        let method = meta
            .get("method")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing `method`".into()))?
            .to_string();
        let budget = meta
            .get("budget")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("missing `budget`".into()))? as usize;
        let entries = meta
            .get("params")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("missing `params`".into()))?;
        let mut params = BTreeMap::new();
        for (path, e) in entries {
            let shape = json_shape(e).ok_or_else(|| bad(format!("`{path}` has no shape")))?;
            let numel: usize = shape.iter().product();
            let full = e.get("full").and_then(Value::as_bool).unwrap_or(false);
            let count = e.get("count").and_then(Value::as_u64).unwrap_or(0) as usize;
            let values: Vec<f32> = tensors
                .remove(&format!("{path}.values"))
                .ok_or_else(|| SelectiveError::file(&tensor_path, format!("no `{path}.values`")))?
                .iter::<f32>()
                .collect();
            let indices = if full {
                None
            } else {
                let idx: Vec<i64> = tensors
                    .remove(&format!("{path}.indices"))
                    .ok_or_else(|| {
                        SelectiveError::file(&tensor_path, format!("no `{path}.indices`"))
                    })?
                    .iter::<i64>()
                    .collect();
                check_indices(&idx, numel)
                    .map_err(|r| SelectiveError::file(&tensor_path, format!("`{path}`: {r}")))?;
                Some(idx)
            };
            let expected = indices.as_ref().map_or(numel, Vec::len);
            if values.len() != expected || values.len() != count {
                return Err(SelectiveError::file(
                    &tensor_path,
                    format!(
                        "`{path}` has {} values for {expected} entries (metadata: {count})",
                        values.len()
                    ),
                ));
            }
            params.insert(
                path.clone(),
                SummaryEntry {
                    shape,
                    indices,
                    values,
                },
            );
        }
        let mut batch_norm = BTreeMap::new();
        let stats = meta.get("batch_norm").and_then(Value::as_object);
        for (path, e) in stats.into_iter().flatten() {
            let shape = json_shape(e).ok_or_else(|| bad(format!("`{path}` has no shape")))?;
            let values: Vec<f32> = tensors
                .remove(path)
                .ok_or_else(|| SelectiveError::file(&tensor_path, format!("no `{path}`")))?
                .iter::<f32>()
                .collect();
            if values.len() != shape.iter().product::<usize>() {
                return Err(SelectiveError::file(
                    &tensor_path,
                    format!("`{path}` has {} values for shape {shape:?}", values.len()),
                ));
            }
            let entry = SummaryEntry {
                shape,
                indices: None,
                values,
            };
            batch_norm.insert(path.clone(), entry);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(SelectiveError::file(
                &tensor_path,
                format!("tensor `{extra}` belongs to no parameter of the metadata"),
            ));
        }
        Ok(Self {
            method,
            budget,
            params,
            batch_norm,
        })
    }

    /// Write the chosen values and the BatchNorm running statistics into `model` (a freshly
    /// loaded base model), leaving every other entry as it is. This reproduces the trained model
    /// exactly.
    ///
    /// # Errors
    /// A path the model does not have or a shape that differs; the model is unchanged then
    /// (it is returned only on success).
    pub fn apply<M: Module>(&self, model: M) -> Result<M> {
        let inventory = params::inventory(&model);
        let shapes: BTreeMap<&str, &Vec<usize>> = inventory
            .iter()
            .map(|p| (p.path.as_str(), &p.shape))
            .collect();
        for (path, e) in self.params.iter().chain(&self.batch_norm) {
            let found = shapes
                .get(path.as_str())
                .ok_or_else(|| SelectiveError::UnknownParameter { path: path.clone() })?;
            if **found != e.shape {
                return Err(SelectiveError::ShapeMismatch {
                    path: path.clone(),
                    expected: e.shape.clone(),
                    found: (*found).clone(),
                });
            }
        }
        let current = hosts::read_params(&model, |p| {
            self.params.contains_key(p) || self.batch_norm.contains_key(p)
        });
        let mut updated = BTreeMap::new();
        for (path, data) in current {
            let e = self
                .params
                .get(&path)
                .unwrap_or_else(|| &self.batch_norm[&path]);
            let dtype = data.dtype();
            let mut flat: Vec<f32> = data.iter::<f32>().collect();
            match &e.indices {
                None => flat.copy_from_slice(&e.values),
                Some(idx) => {
                    for (&j, &v) in idx.iter().zip(&e.values) {
                        flat[j as usize] = v;
                    }
                }
            }
            updated.insert(
                path,
                TensorData::new(flat, e.shape.clone()).convert_dtype(dtype),
            );
        }
        let (model, missing) = hosts::write_params(model, updated);
        debug_assert!(missing.is_empty(), "paths were checked above: {missing:?}");
        Ok(model)
    }
}
