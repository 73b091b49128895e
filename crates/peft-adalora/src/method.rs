//! AdaLoRA as a [`Method`]: creation, and PEFT's file format (keys without `.weight`,
//! matrices truncated to the kept triplets, `rank_pattern` as boolean lists keyed by the
//! `lora_E` path, `ranknum` not saved and restored as `init_r`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use peft_core::error::{PeftError, Result};
use peft_core::hf::KeyMap;
use peft_core::io::transpose_data;
use peft_core::method::{Method, TakeTensor, set_param};
use peft_core::target::LayerKind;
use peft_core::{Created, LayerInfo};
use serde_json::{Map, Value};

use crate::adapter::{AdaLoraAdapter, create};
use crate::allocator::host_vec;
use crate::config::AdaLoraConfig;

/// Keep the rows of a row-major `[rows, cols]` matrix where `keep` is true.
fn keep_rows(values: &[f32], cols: usize, keep: &[bool]) -> Vec<f32> {
    values
        .chunks(cols.max(1))
        .zip(keep)
        .filter(|(_, k)| **k)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}

impl Method for AdaLoraConfig {
    type Adapter = AdaLoraAdapter;

    const PEFT_TYPE: &'static str = "ADALORA";

    fn validate(&self) -> Result<()> {
        AdaLoraConfig::validate(self)
    }

    fn needs_controller(&self) -> bool {
        true
    }

    /// The [`RankAllocator`](crate::RankAllocator) (with the orthogonality regularizer), on the
    /// config's own `total_step` schedule (`total_steps` is not used: PEFT's AdaLoRA config
    /// carries it).
    fn controllers<M: burn::module::Module>(
        &self,
        adapter: &str,
        total_steps: usize,
    ) -> Result<Vec<Box<dyn peft_core::Controller<M>>>> {
        let _ = total_steps;
        Ok(vec![Box::new(crate::RankAllocator::new(self, adapter)?)])
    }

    /// `init_r` triplets, or as many as `rank_pattern` keeps for the layer when it is set
    /// (an adapter loaded from a file, as PEFT's `resize_modules_by_rank_pattern`).
    fn create(&self, info: &LayerInfo) -> Result<Created<AdaLoraAdapter>> {
        let rank = self
            .rank_pattern
            .as_ref()
            .and_then(|p| p.get(&info.candidate.path))
            .map_or(self.init_r, |mask| mask.iter().filter(|k| **k).count());
        create(self, info, rank)
    }

    fn to_json(&self, key_map: &KeyMap) -> Map<String, Value> {
        let pattern = self.rank_pattern.as_ref().map(|p| {
            p.iter()
                .map(|(path, mask)| {
                    (
                        format!("{}.lora_E", key_map.to_hf(path)),
                        Value::from(mask.clone()),
                    )
                })
                .collect()
        });
        self.to_json_map(pattern)
    }

    fn from_json(map: Map<String, Value>, file: &Path, key_map: &KeyMap) -> Result<Self> {
        let (mut config, pattern) =
            AdaLoraConfig::from_json_map(map).map_err(|source| PeftError::Json {
                file: file.into(),
                source,
            })?;
        if let Some(pattern) = pattern {
            let mut parsed = BTreeMap::new();
            for (key, mask) in pattern {
                let module = key.strip_suffix(".lora_E").unwrap_or(&key);
                let module = hf_module(module);
                let mask: Vec<bool> =
                    serde_json::from_value(mask).map_err(|source| PeftError::Json {
                        file: file.into(),
                        source,
                    })?;
                parsed.insert(key_map.to_burn(module), mask);
            }
            config.rank_pattern = Some(parsed);
        }
        config.validate()?;
        Ok(config)
    }

    /// Truncated to the kept triplets when a `rank_pattern` is set and the adapter still has
    /// all `init_r` of them; masked-out triplets are dropped, not stored as zeros.
    fn save_tensors(
        &self,
        layer: &str,
        _kind: LayerKind,
        adapter: &AdaLoraAdapter,
    ) -> BTreeMap<String, TensorData> {
        let r = adapter.rank();
        let [rows, _] = adapter.lora_a.shape().dims();
        let [_, cols] = adapter.lora_b.shape().dims();
        let all = vec![true; r];
        let keep = self
            .rank_pattern
            .as_ref()
            .and_then(|p| p.get(layer))
            .filter(|mask| mask.len() == r)
            .unwrap_or(&all);
        let kept = keep.iter().filter(|k| **k).count();
        // PEFT layout: A (r, in), E (r, 1), B (out, r); rows of A/E and of Bᵀ are triplets.
        let a = keep_rows(&host_vec(adapter.lora_a.val().transpose()), rows, keep);
        let e = keep_rows(&host_vec(adapter.lora_e.val()), 1, keep);
        let b_t = keep_rows(&host_vec(adapter.lora_b.val()), cols, keep);
        let b = transpose_data(TensorData::new(b_t, [kept, cols]));
        BTreeMap::from([
            ("lora_A".to_string(), TensorData::new(a, [kept, rows])),
            ("lora_E".to_string(), TensorData::new(e, [kept, 1])),
            ("lora_B".to_string(), b),
        ])
    }

    fn load_tensors(
        &self,
        _layer: &str,
        _kind: LayerKind,
        adapter: &mut AdaLoraAdapter,
        take: &mut TakeTensor<'_>,
    ) -> Result<()> {
        let r = adapter.rank();
        let [rows, _] = adapter.lora_a.shape().dims();
        let [_, cols] = adapter.lora_b.shape().dims();
        let device = adapter.lora_a.device();
        let a = take("lora_A", &[r, rows])?;
        let e = take("lora_E", &[r, 1])?;
        let b = take("lora_B", &[cols, r])?;
        adapter.lora_a = set_param(
            &adapter.lora_a,
            peft_core::method::transposed_from_data(a, &device),
        );
        adapter.lora_e = set_param(
            &adapter.lora_e,
            Tensor::<2>::from_data(e, &device).reshape([r]),
        );
        adapter.lora_b = set_param(
            &adapter.lora_b,
            peft_core::method::transposed_from_data(b, &device),
        );
        Ok(())
    }
}

/// PEFT writes `rank_pattern` keys relative to the base model; older files may carry the
/// `base_model.model.` prefix.
fn hf_module(key: &str) -> &str {
    key.strip_prefix(peft_core::hf::KEY_PREFIX).unwrap_or(key)
}
