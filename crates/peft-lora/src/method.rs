//! LoRA as a [`Method`]: what [`PeftModel`](peft_core::PeftModel) needs to manage, save and
//! load LoRA adapters.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use peft_core::error::{PeftError, Result};
use peft_core::hf::KeyMap;
use peft_core::method::{Method, TakeTensor, set_param};
use peft_core::target::LayerKind;
use peft_core::{Created, LayerInfo};
use serde_json::{Map, Value};

use crate::adapter::{LoraAdapter, create};
use crate::config::{InitLoraWeights, LoraConfig};

/// PEFT's key suffixes of the two factors of a layer.
fn factor_keys(kind: LayerKind) -> (&'static str, &'static str) {
    match kind {
        LayerKind::Linear => ("lora_A.weight", "lora_B.weight"),
        LayerKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
    }
}

impl Method for LoraConfig {
    type Adapter = LoraAdapter;

    const PEFT_TYPE: &'static str = "LORA";

    fn validate(&self) -> Result<()> {
        LoraConfig::validate(self)
    }

    fn create(&self, info: &LayerInfo) -> Result<Created<LoraAdapter>> {
        create(self, info)
    }

    fn to_json(&self, _key_map: &KeyMap) -> Map<String, Value> {
        self.to_json_map()
    }

    fn from_json(map: Map<String, Value>, file: &Path, _key_map: &KeyMap) -> Result<Self> {
        let config: Self =
            serde_json::from_value(Value::Object(map)).map_err(|source| PeftError::Json {
                file: file.into(),
                source,
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The factors are overwritten by the file; only PiSSA's init matters, because it also
    /// moves the principal part out of the base weight (PEFT redoes it on load too).
    fn for_loading(&self) -> Self {
        let mut config = self.clone();
        if config.init_lora_weights != InitLoraWeights::Pissa {
            config.init_lora_weights = InitLoraWeights::Default;
        }
        config
    }

    fn save_tensors(
        &self,
        _layer: &str,
        kind: LayerKind,
        adapter: &LoraAdapter,
    ) -> BTreeMap<String, TensorData> {
        let (ka, kb) = factor_keys(kind);
        let mut out = BTreeMap::new();
        out.insert(ka.into(), adapter.lora_a.val().transpose().into_data());
        out.insert(kb.into(), adapter.lora_b.val().transpose().into_data());
        if let Some(m) = &adapter.magnitude {
            out.insert("lora_magnitude_vector".into(), m.val().into_data());
        }
        out
    }

    fn load_tensors(
        &self,
        _layer: &str,
        kind: LayerKind,
        adapter: &mut LoraAdapter,
        take: &mut TakeTensor<'_>,
    ) -> Result<()> {
        let (ka, kb) = factor_keys(kind);
        let [rows, r] = adapter.lora_a.shape().dims();
        let [_, cols] = adapter.lora_b.shape().dims();
        let a = take(ka, &[r, rows])?;
        let b = take(kb, &[cols, r])?;
        let device = adapter.lora_a.device();
        adapter.lora_a = set_param(
            &adapter.lora_a,
            peft_core::method::transposed_from_data(a, &device),
        );
        adapter.lora_b = set_param(
            &adapter.lora_b,
            peft_core::method::transposed_from_data(b, &device),
        );
        if let Some(m) = &adapter.magnitude {
            let data = take("lora_magnitude_vector", &[cols])?;
            adapter.magnitude = Some(set_param(m, Tensor::<1>::from_data(data, &device)));
        }
        Ok(())
    }
}
