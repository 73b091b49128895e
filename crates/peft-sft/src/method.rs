//! SFT as a [`Method`]: what [`PeftModel`](peft_core::PeftModel) needs to manage, save and load
//! SFT adapters.
//!
//! Keys per layer (the reference's, adapter name stripped): `sft_delta.values` `[k]` (`f32`)
//! and `sft_delta.indices` `[k]`, flat row-major indices into the PyTorch-oriented weight
//! (`[out, in]`), written as `int64` in increasing order; any order and any integer dtype is
//! read. The config carries `num_deltas`.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::TensorData;
use peft_core::error::{PeftError, Result};
use peft_core::hf::KeyMap;
use peft_core::method::{Method, TakeTensor};
use peft_core::target::LayerKind;
use peft_core::{Created, LayerInfo};
use serde_json::{Map, Value};

use crate::adapter::{SftAdapter, create};
use crate::config::{InitDeltas, SftConfig};

/// Key suffix of the values.
pub const VALUES_KEY: &str = "sft_delta.values";
/// Key suffix of the indices.
pub const INDICES_KEY: &str = "sft_delta.indices";

impl Method for SftConfig {
    type Adapter = SftAdapter;

    const PEFT_TYPE: &'static str = "SFT";

    fn needs_controller(&self) -> bool {
        true
    }

    /// The [`SftSelector`](crate::SftSelector) with the reference's optimizer of the selection
    /// algorithm, on a schedule of `total_steps` update steps.
    fn controllers<M: burn::module::Module>(
        &self,
        adapter: &str,
        total_steps: usize,
    ) -> Result<Vec<Box<dyn peft_core::Controller<M>>>> {
        Ok(vec![Box::new(crate::SftSelector::new(
            self,
            adapter,
            total_steps,
        )?)])
    }

    fn validate(&self) -> Result<()> {
        SftConfig::validate(self)
    }

    /// The reference's budget split ([`SftConfig::allocate`]) when `num_deltas` is not set:
    /// `density` is a share of the whole model, `num_tunable_weights` an absolute count, split
    /// over the targets in proportion to their size.
    fn for_model<M: burn::module::Module>(&self, model: &M) -> Result<Self> {
        match self.num_deltas {
            Some(_) => Ok(self.clone()),
            None => self.allocate(model),
        }
    }

    fn create(&self, info: &LayerInfo) -> Result<Created<SftAdapter>> {
        create(self, info)
    }

    fn to_json(&self, key_map: &KeyMap) -> Map<String, Value> {
        self.to_json_map(key_map)
    }

    fn from_json(map: Map<String, Value>, file: &Path, key_map: &KeyMap) -> Result<Self> {
        let mut config: Self =
            serde_json::from_value(Value::Object(map)).map_err(|source| PeftError::Json {
                file: file.into(),
                source,
            })?;
        config.num_deltas = config.num_deltas.map(|m| {
            m.into_iter()
                .map(|(p, k)| (key_map.to_burn(&p), k))
                .collect()
        });
        config.validate()?;
        Ok(config)
    }

    /// The file carries the values: new adapters start at zero.
    fn for_loading(&self) -> Self {
        let mut config = self.clone();
        config.init_deltas = InitDeltas::Zeros;
        config
    }

    fn save_tensors(
        &self,
        _layer: &str,
        _kind: LayerKind,
        adapter: &SftAdapter,
    ) -> BTreeMap<String, TensorData> {
        let indices: Vec<i64> = adapter.indices().into_iter().map(|i| i as i64).collect();
        let k = indices.len();
        BTreeMap::from([
            (
                VALUES_KEY.to_string(),
                adapter.delta_values.val().into_data(),
            ),
            (INDICES_KEY.to_string(), TensorData::new(indices, [k])),
        ])
    }

    fn load_tensors(
        &self,
        layer: &str,
        _kind: LayerKind,
        adapter: &mut SftAdapter,
        take: &mut TakeTensor<'_>,
    ) -> Result<()> {
        let k = adapter.num_deltas();
        let values: Vec<f32> = take(VALUES_KEY, &[k])?
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| PeftError::InvalidConfig {
                field: format!("{layer}.{VALUES_KEY}"),
                reason: format!("{e:?}"),
            })?;
        let bad = |reason: String| PeftError::InvalidConfig {
            field: format!("{layer}.{INDICES_KEY}"),
            reason,
        };
        let indices: Vec<u64> = take(INDICES_KEY, &[k])?
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| bad(format!("{e:?}")))?
            .into_iter()
            .map(|i| u64::try_from(i).map_err(|_| bad(format!("negative index {i}"))))
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_unstable_by_key(|&p| indices[p]);
        let sorted: Vec<u64> = order.iter().map(|&p| indices[p]).collect();
        let values: Vec<f32> = order.iter().map(|&p| values[p]).collect();
        adapter.set_delta(&sorted, values).map_err(|e| match e {
            PeftError::InvalidConfig { reason, .. } => bad(reason),
            other => other,
        })
    }
}
