//! Small helpers shared by the optimizer, its checkpoints and the summaries: index tensors,
//! index checks, and the `shape` field of the JSON files. A leaf module.

use std::collections::HashSet;

use burn::tensor::{Device, Int, Tensor, TensorData};
use serde_json::Value;

/// The chosen flat indices as a device tensor.
pub(crate) fn index_tensor(chosen: &[i64], device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(chosen.to_vec(), [chosen.len()]), device)
}

/// Indices must be unique and within the parameter.
pub(crate) fn check_indices(indices: &[i64], numel: usize) -> std::result::Result<(), String> {
    let mut seen = HashSet::with_capacity(indices.len());
    for &j in indices {
        if j < 0 || j as usize >= numel {
            return Err(format!("index {j} is outside 0..{numel}"));
        }
        if !seen.insert(j) {
            return Err(format!("index {j} appears twice"));
        }
    }
    Ok(())
}

/// The `shape` list of a parameter entry in the JSON files (summary and optimizer state).
pub(crate) fn json_shape(entry: &Value) -> Option<Vec<usize>> {
    entry.get("shape").and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_u64)
            .map(|v| v as usize)
            .collect()
    })
}
