//! The wrapped optimizer's state over the chosen entries: growing it when entries are unmasked,
//! measuring it, and saving/loading it with the chosen sets (checkpoints).
//!
//! A checkpoint is a directory with two files, written atomically one after the other:
//! * `selective_state.safetensors`: `state.<name>` (the wrapped optimizer's state tensors, one
//!   value per chosen entry) and `chosen.<param path>` (i64 flat indices, in the order of the
//!   state vector) for every parameter that is not trained in full;
//! * `selective_state.json`: method, budget, step, per-parameter shape / full flag / count, the
//!   optimizer's scalar state (e.g. Adam's step counter), and a total that must match the tensors
//!   (so a torn save is detected instead of silently loaded).

use std::collections::BTreeMap;
use std::path::Path;

use burn::optim::{Optimizer, RecordState, StateSink, StateSource};
use burn::store::burn_pack::Scalar;
use burn::tensor::TensorData;
use peft_core::hf;
use serde_json::{Map, Value, json};

use crate::error::{Result, SelectiveError};
use crate::flat_state::PREFIX;
use crate::format::{check_indices, index_tensor, json_shape};
use crate::optimizer::SelectiveOptimizer;

/// File name of the checkpoint tensors.
pub const STATE_TENSORS: &str = "selective_state.safetensors";
/// File name of the checkpoint metadata.
pub const STATE_JSON: &str = "selective_state.json";
const FORMAT: &str = "peft-selective-state";

fn scalar_to_json(s: Scalar) -> Value {
    match s {
        Scalar::Int(v) => json!({ "int": v }),
        Scalar::UInt(v) => json!({ "uint": v }),
        Scalar::Float(v) => json!({ "float": v }),
        Scalar::Bool(v) => json!({ "bool": v }),
    }
}

fn scalar_from_json(v: &Value) -> Option<Scalar> {
    let (kind, v) = v.as_object()?.iter().next()?;
    Some(match kind.as_str() {
        "int" => Scalar::Int(v.as_i64()?),
        "uint" => Scalar::UInt(v.as_u64()?),
        "float" => Scalar::Float(v.as_f64()?),
        "bool" => Scalar::Bool(v.as_bool()?),
        _ => return None,
    })
}

impl<O: Optimizer> SelectiveOptimizer<O> {
    /// Save the controller state (chosen entries, step, the wrapped optimizer's state) into the
    /// directory `dir` (created if needed). Save the model with burn as usual next to it.
    ///
    /// # Errors
    /// I/O errors; files already there are replaced atomically, one at a time.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| peft_core::PeftError::Io {
            path: dir.into(),
            source,
        })?;
        let mut tensors = BTreeMap::new();
        let mut scalars = Map::new();
        let mut state_entries = 0;
        if let Some(state) = &self.state {
            let mut sink = StateSink::default();
            state.state_flatten(PREFIX, &mut sink);
            for (name, data) in sink.tensors {
                state_entries += data.num_elements();
                tensors.insert(name, data);
            }
            for (name, value) in sink.scalars {
                scalars.insert(name, scalar_to_json(value));
            }
        }
        let mut params = Map::new();
        for p in &self.params {
            if !p.full && !p.chosen.is_empty() {
                tensors.insert(
                    format!("chosen.{}", p.path),
                    TensorData::new(p.chosen.clone(), [p.chosen.len()]),
                );
            }
            params.insert(
                p.path.clone(),
                json!({ "shape": p.shape, "full": p.full, "count": p.count() }),
            );
        }
        let mut meta = Map::new();
        meta.insert("format".into(), json!(FORMAT));
        meta.insert("method".into(), json!(self.config.method.name()));
        meta.insert("budget".into(), json!(self.budget));
        meta.insert("budget_used".into(), json!(self.budget_used()));
        meta.insert("step".into(), json!(self.step));
        meta.insert("has_state".into(), json!(self.state.is_some()));
        meta.insert("state_entries".into(), json!(state_entries));
        meta.insert("scalars".into(), Value::Object(scalars));
        meta.insert("params".into(), Value::Object(params));
        hf::write_tensors(&dir.join(STATE_TENSORS), &tensors)?;
        hf::write_json(&dir.join(STATE_JSON), &meta)?;
        Ok(())
    }

    /// Load a state saved by [`save_state`](Self::save_state) into an optimizer built with the
    /// same config for the same model; continuing then gives the same result as not stopping.
    ///
    /// # Errors
    /// Missing or inconsistent files, another method or budget, parameters whose paths or
    /// shapes differ from this optimizer's. Nothing is changed then.
    pub fn load_state(&mut self, dir: &Path) -> Result<()> {
        let json_path = dir.join(STATE_JSON);
        let tensor_path = dir.join(STATE_TENSORS);
        let meta = hf::read_json(&json_path)?;
        let mut tensors = hf::read_tensors(&tensor_path)?;
        let bad = |reason: String| SelectiveError::file(&json_path, reason);
        let field = |name: &str| {
            meta.get(name)
                .ok_or_else(|| bad(format!("missing field `{name}`")))
        };
        if field("format")?.as_str() != Some(FORMAT) {
            return Err(bad(format!("not a `{FORMAT}` file")));
        }
        let method = field("method")?.as_str().unwrap_or_default();
        if method != self.config.method.name() {
            return Err(bad(format!(
                "saved by method `{method}`, this optimizer runs `{}`",
                self.config.method.name()
            )));
        }
        let as_usize = |name: &str| -> Result<usize> {
            field(name)?
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("field `{name}` is not a count")))
        };
        let budget = as_usize("budget")?;
        if budget != self.budget {
            return Err(bad(format!(
                "saved with budget {budget}, this optimizer has {}",
                self.budget
            )));
        }
        let step = as_usize("step")?;
        let state_entries = as_usize("state_entries")?;
        let has_state = field("has_state")?.as_bool().unwrap_or(false);
        let params = field("params")?
            .as_object()
            .ok_or_else(|| bad("`params` is not an object".into()))?;
        let mut chosen: Vec<Vec<i64>> = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let entry = params
                .get(&p.path)
                .ok_or_else(|| bad(format!("no entry for parameter `{}`", p.path)))?;
            let shape = json_shape(entry).unwrap_or_default();
            if shape != p.shape {
                return Err(SelectiveError::ShapeMismatch {
                    path: p.path.clone(),
                    expected: shape,
                    found: p.shape.clone(),
                });
            }
            let full = entry.get("full").and_then(Value::as_bool).unwrap_or(false);
            if full != p.full {
                return Err(bad(format!(
                    "`{}` is {}trained in full in the file but {}in this optimizer",
                    p.path,
                    if full { "" } else { "not " },
                    if p.full { "" } else { "not " }
                )));
            }
            let count = entry.get("count").and_then(Value::as_u64).unwrap_or(0) as usize;
            let indices: Vec<i64> = match tensors.remove(&format!("chosen.{}", p.path)) {
                Some(d) => d.iter::<i64>().collect(),
                None => Vec::new(),
            };
            if !p.full {
                check_indices(&indices, p.numel).map_err(|r| {
                    SelectiveError::file(&tensor_path, format!("`{}`: {r}", p.path))
                })?;
                if indices.len() != count {
                    return Err(SelectiveError::file(
                        &tensor_path,
                        format!(
                            "`{}` has {} chosen indices, the metadata says {count}",
                            p.path,
                            indices.len()
                        ),
                    ));
                }
            }
            chosen.push(indices);
        }
        if let Some(extra) = params.keys().find(|k| !self.lookup.contains_key(*k)) {
            return Err(SelectiveError::UnknownParameter {
                path: extra.clone(),
            });
        }
        let total: usize = self
            .params
            .iter()
            .zip(&chosen)
            .map(|(p, c)| if p.full { p.numel } else { c.len() })
            .sum();
        if total > self.budget {
            return Err(bad(format!(
                "{total} chosen entries exceed the budget {}",
                self.budget
            )));
        }
        let state = if has_state {
            let mut scalars = BTreeMap::new();
            if let Some(map) = field("scalars")?.as_object() {
                for (k, v) in map {
                    let s = scalar_from_json(v)
                        .ok_or_else(|| bad(format!("scalar `{k}` is not readable")))?;
                    scalars.insert(k.clone(), s);
                }
            }
            let mut src = StateSource::new(scalars);
            let mut found = 0;
            for (name, data) in tensors {
                if name.starts_with(PREFIX) {
                    if data.shape().to_vec() != [total] {
                        return Err(SelectiveError::file(
                            &tensor_path,
                            format!("state tensor `{name}` does not have {total} entries"),
                        ));
                    }
                    found += data.num_elements();
                    src.insert_tensor(name, data);
                }
            }
            if found != state_entries {
                return Err(SelectiveError::file(
                    &tensor_path,
                    format!("{found} state values, the metadata says {state_entries} (torn save?)"),
                ));
            }
            let state = O::State::<1>::state_unflatten(PREFIX, &mut src, &self.device).ok_or_else(
                || {
                    SelectiveError::file(
                        &tensor_path,
                        "the optimizer state does not match this optimizer",
                    )
                },
            )?;
            Some(state)
        } else {
            None
        };
        for (p, c) in self.params.iter_mut().zip(chosen) {
            if !p.full {
                p.index = (!c.is_empty()).then(|| index_tensor(&c, &self.device));
                p.chosen = c;
            }
        }
        self.state = state;
        self.step = step;
        Ok(())
    }
}
