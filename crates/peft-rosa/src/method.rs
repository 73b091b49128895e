//! RoSA as a [`Method`]: what [`PeftModel`](peft_core::PeftModel) needs to manage, save and
//! load RoSA adapters.
//!
//! Keys per layer (peft-rosa's, adapter name stripped): `rosa_A.weight` `[r, in]`,
//! `rosa_B.weight` `[out, r]` (embeddings: `rosa_embedding_A` / `rosa_embedding_B`), and the
//! sparse adapter `rosa_spa.values` `[nnz]`, `rosa_spa.row_offs` `[rows + 1]`,
//! `rosa_spa.row_idx` `[rows]` (rows by decreasing length, for load balance) and
//! `rosa_spa.col_idx` `[nnz]`, integers as `int64` (the reference's int16 caps dimensions at
//! 32767) and values as `f32`. A layer without a mask yet writes zero offsets, as the reference
//! does. Files as peft-rosa writes them load too: `int32` offsets, `int16` or `int32` indices,
//! `bf16` or `f16` values and factors (cast to `f32`), and the transposed CSR `rosa_spa.tr_*`
//! (written for every embedding and under `impl = "spmm"`; rebuilt here, so read and dropped).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use peft_core::error::{PeftError, Result};
use peft_core::hf::KeyMap;
use peft_core::method::{Method, TakeTensor, set_param};
use peft_core::target::LayerKind;
use peft_core::{AdapterFactory, Created, LayerInfo};
use serde_json::{Map, Value};
use sparse_kernels::CsrStructure;

use crate::adapter::{RosaAdapter, create};
use crate::config::{InitRosaWeights, RosaConfig};
use crate::initial::InitialMasks;

fn factor_keys(kind: LayerKind) -> (&'static str, &'static str) {
    match kind {
        LayerKind::Linear => ("rosa_A.weight", "rosa_B.weight"),
        LayerKind::Embedding => ("rosa_embedding_A", "rosa_embedding_B"),
    }
}

fn ints(values: Vec<i64>) -> TensorData {
    let n = values.len();
    TensorData::new(values, [n])
}

fn to_u32(data: TensorData, key: &str) -> Result<Vec<u32>> {
    let bad = |message: String| PeftError::InvalidConfig {
        field: key.into(),
        reason: message,
    };
    data.convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| bad(format!("{e:?}")))?
        .into_iter()
        .map(|v| u32::try_from(v).map_err(|_| bad(format!("index {v} is out of range"))))
        .collect()
}

/// The rows of `s` by decreasing number of entries (peft-rosa's `row_idx`).
fn row_order(s: &CsrStructure) -> Vec<i64> {
    let offs = s.row_offsets();
    let mut order: Vec<usize> = (0..s.rows()).collect();
    order.sort_by_key(|&r| std::cmp::Reverse(offs[r + 1] - offs[r]));
    order.into_iter().map(|r| r as i64).collect()
}

impl Method for RosaConfig {
    type Adapter = RosaAdapter;

    const PEFT_TYPE: &'static str = "ROSA";

    fn validate(&self) -> Result<()> {
        RosaConfig::validate(self)
    }

    fn needs_controller(&self) -> bool {
        true
    }

    /// The [`RosaScheduler`](crate::RosaScheduler), running the paper's recipe in one run:
    /// with a `wl<N>` schedule (`N > 0`) and no known masks, the LoRA warm-up and gradient
    /// collection give the masks, then the adapters restart from their initial values with
    /// the masks (see [`RosaScheduler::with_restart`](crate::RosaScheduler::with_restart)).
    fn controllers<M: burn::module::Module>(
        &self,
        adapter: &str,
        total_steps: usize,
    ) -> Result<Vec<Box<dyn peft_core::Controller<M>>>> {
        let _ = total_steps;
        let warm = matches!(
            self.parsed_schedule()?,
            Some(crate::Schedule::Warmup(n)) if n > 0
        );
        let scheduler = crate::RosaScheduler::new(self, adapter)?
            .with_restart(warm && self.mask_load_path.is_none());
        Ok(vec![Box::new(scheduler)])
    }

    /// One adapter, its mask from `mask_load_path` if set (the file is read on every call:
    /// attaching goes through [`factory`](Self::factory), which reads it once).
    fn create(&self, info: &LayerInfo) -> Result<Created<RosaAdapter>> {
        create(self, info, &InitialMasks::of_config(self)?)
    }

    /// Reads `mask_load_path`, if set, once for all the layers of the attach.
    fn factory(&self) -> Result<AdapterFactory<RosaAdapter>> {
        let masks = InitialMasks::of_config(self)?;
        let config = self.clone();
        Ok(Box::new(move |info| create(&config, info, &masks)))
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

    /// The file carries the factors and the masks: new adapters start empty.
    fn for_loading(&self) -> Self {
        let mut config = self.clone();
        config.init_lora_weights = InitRosaWeights::Default;
        config.mask_load_path = None;
        config
    }

    fn save_tensors(
        &self,
        _layer: &str,
        kind: LayerKind,
        adapter: &RosaAdapter,
    ) -> BTreeMap<String, TensorData> {
        let mut out = BTreeMap::new();
        if let (Some(a), Some(b)) = (&adapter.lora_a, &adapter.lora_b) {
            let (ka, kb) = factor_keys(kind);
            out.insert(ka.into(), a.val().transpose().into_data());
            out.insert(kb.into(), b.val().transpose().into_data());
        }
        if adapter.nnz == 0 {
            return out;
        }
        match (&adapter.spa, &adapter.spa_values) {
            (Some(layout), Some(values)) => {
                let s = layout.structure();
                out.insert("rosa_spa.values".into(), values.val().into_data());
                out.insert(
                    "rosa_spa.row_offs".into(),
                    ints(s.row_offsets().iter().map(|&v| i64::from(v)).collect()),
                );
                out.insert("rosa_spa.row_idx".into(), ints(row_order(s)));
                out.insert(
                    "rosa_spa.col_idx".into(),
                    ints(s.col_indices().iter().map(|&v| i64::from(v)).collect()),
                );
            }
            _ => {
                // No mask yet: the reference's state before `set_mask` (all-zero offsets).
                let rows = spa_rows(adapter);
                out.insert(
                    "rosa_spa.values".into(),
                    TensorData::new(vec![0f32; adapter.nnz], [adapter.nnz]),
                );
                out.insert("rosa_spa.row_offs".into(), ints(vec![0; rows + 1]));
                out.insert("rosa_spa.row_idx".into(), ints((0..rows as i64).collect()));
                out.insert("rosa_spa.col_idx".into(), ints(vec![0; adapter.nnz]));
            }
        }
        out
    }

    fn load_tensors(
        &self,
        layer: &str,
        kind: LayerKind,
        adapter: &mut RosaAdapter,
        take: &mut TakeTensor<'_>,
    ) -> Result<()> {
        let base_shape = adapter.base_shape;
        let [rows, cols] = base_shape;
        if let (Some(a), Some(b)) = (&adapter.lora_a, &adapter.lora_b) {
            let (ka, kb) = factor_keys(kind);
            let r = a.shape().dims::<2>()[1];
            let device = a.device();
            let da = take(ka, &[r, rows])?;
            let db = take(kb, &[cols, r])?;
            adapter.lora_a = Some(set_param(
                a,
                peft_core::method::transposed_from_data(da, &device),
            ));
            adapter.lora_b = Some(set_param(
                b,
                peft_core::method::transposed_from_data(db, &device),
            ));
        }
        if adapter.nnz == 0 {
            return Ok(());
        }
        let nnz = adapter.nnz;
        let [sr, sc] = RosaAdapter::spa_shape(kind, base_shape);
        let values = take("rosa_spa.values", &[nnz])?;
        let offsets = to_u32(take("rosa_spa.row_offs", &[sr + 1])?, "rosa_spa.row_offs")?;
        take("rosa_spa.row_idx", &[sr])?;
        let cols_idx = to_u32(take("rosa_spa.col_idx", &[nnz])?, "rosa_spa.col_idx")?;
        // The reference also writes the transposed CSR when it runs `spmm` with a stored
        // transpose (`impl = "spmm"`, and always for embeddings, whatever `impl` says); the
        // layout rebuilds it, so those tensors are read where present and dropped.
        for (key, len) in [
            ("rosa_spa.tr_perm", nnz),
            ("rosa_spa.tr_row_offs", sc + 1),
            ("rosa_spa.tr_row_idx", sc),
            ("rosa_spa.tr_col_idx", nnz),
        ] {
            match take(key, &[len]) {
                Ok(_) | Err(PeftError::MissingTensor { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if offsets.last().copied().unwrap_or(0) == 0 {
            // Saved before its mask was generated.
            adapter.spa = None;
            adapter.spa_values = None;
            return Ok(());
        }
        let structure =
            CsrStructure::new(sr, sc, offsets, cols_idx).map_err(|e| PeftError::InvalidConfig {
                field: format!("{layer}.rosa_spa"),
                reason: e.to_string(),
            })?;
        // Trainability is set by the model after loading (PEFT's rules).
        let values = Tensor::<1>::from_data(values, &adapter.device);
        adapter.set_mask(layer, structure, values, false)
    }
}

fn spa_rows(adapter: &RosaAdapter) -> usize {
    RosaAdapter::spa_shape(adapter.kind, adapter.base_shape)[0]
}
