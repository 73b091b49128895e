//! `LoraConfig`: every field of PEFT 0.21.2's `LoraConfig`, parsed and validated.

use std::path::Path;

use peft_core::config::{PeftConfig, PeftConfigBase};
use peft_core::error::{PeftError, Result};
use peft_core::hf;
pub use peft_core::method::BiasMode;
use peft_core::target::{ModuleSelector, TargetSpec, pattern_key};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How LoRA factors start (`init_lora_weights`).
#[derive(Clone, Debug, PartialEq)]
pub enum InitLoraWeights {
    /// `true`: A kaiming-uniform (`U(±1/√d_in)`), B zero (embeddings: A zero, B `N(0,1)`).
    Default,
    /// `false`: both non-zero (A `U(±1/√d_in)`, B `U(±1/√r)`; embeddings `N(0,1)`): for tests.
    Random,
    /// `"gaussian"`: A `N(0, 1/r)`, B zero.
    Gaussian,
    /// `"pissa"`: A, B from the top-`r` SVD of the base weight, which keeps the residual.
    Pissa,
}

impl Serialize for InitLoraWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Default => s.serialize_bool(true),
            Self::Random => s.serialize_bool(false),
            Self::Gaussian => s.serialize_str("gaussian"),
            Self::Pissa => s.serialize_str("pissa"),
        }
    }
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(Self::Default),
            Value::Bool(false) => Ok(Self::Random),
            Value::String(s) if s == "gaussian" => Ok(Self::Gaussian),
            Value::String(s) if s == "pissa" => Ok(Self::Pissa),
            other => Err(serde::de::Error::custom(format!(
                "init_lora_weights = {other} is not supported (supported: true, false, \"gaussian\", \"pissa\")"
            ))),
        }
    }
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_init() -> InitLoraWeights {
    InitLoraWeights::Default
}
fn default_peft_type() -> String {
    "LORA".into()
}

/// A LoRA configuration, field for field PEFT's `LoraConfig` (`adapter_config.json`).
///
/// Fields this library does not implement are accepted only at their "off" value (null, false,
/// or an empty object); any other value is an [`PeftError::UnsupportedField`] naming the field.
/// Fields it does not know are kept in [`extra`](Self::extra) and written back on save.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// Rank of the update.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scaling numerator: `s = lora_alpha / r` (or `/ √r` with rsLoRA).
    #[serde(default = "default_alpha", serialize_with = "number")]
    pub lora_alpha: f64,
    /// Dropout probability on the adapter input (activation-space layers only).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Must be `false`: burn layers store `[d_in, d_out]` and are handled natively.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA: `s = lora_alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Initialization of the factors.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitLoraWeights,
    /// Per-module rank (pattern -> r), first match in order wins.
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Per-module alpha (pattern -> alpha), first match in order wins.
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    /// DoRA: a learned magnitude per output feature.
    #[serde(default)]
    pub use_dora: bool,
    /// A bias on `lora_B` (not supported: must be `false`).
    #[serde(default)]
    pub lora_bias: bool,
    /// PEFT's common fields (targets, `bias`, `modules_to_save`, layer filter, …).
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// Every other field of the file, kept in order and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn number<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

/// Fields of PEFT's LoRA config this library does not implement; accepted when "off".
const OFF_FIELDS: &[&str] = &[
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "megatron_config",
    "loftq_config",
    "eva_config",
    "corda_config",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
    "ensure_weight_tying",
];

/// Fields that carry no behaviour here and are kept as they are.
const PASSIVE_FIELDS: &[&str] = &[
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl Default for LoraConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults parse")
    }
}

impl LoraConfig {
    /// A config with rank `r`, `lora_alpha` and target modules; everything else PEFT's default.
    pub fn new(r: usize, lora_alpha: f64, target_modules: ModuleSelector) -> Self {
        Self {
            r,
            lora_alpha,
            base: PeftConfigBase {
                target_modules: Some(target_modules),
                ..PeftConfigBase::default()
            },
            ..Self::default()
        }
    }

    /// Set `use_rslora`.
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Set `use_dora`.
    pub fn with_dora(mut self, on: bool) -> Self {
        self.use_dora = on;
        self
    }

    /// Set `lora_dropout`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// Set `init_lora_weights`.
    pub fn with_init(mut self, init: InitLoraWeights) -> Self {
        self.init_lora_weights = init;
        self
    }

    /// Add a `rank_pattern` entry.
    pub fn with_rank_pattern(mut self, key: &str, r: usize) -> Self {
        self.rank_pattern.insert(key.into(), Value::from(r));
        self
    }

    /// Add an `alpha_pattern` entry.
    pub fn with_alpha_pattern(mut self, key: &str, alpha: f64) -> Self {
        self.alpha_pattern.insert(key.into(), Value::from(alpha));
        self
    }

    /// Parse `adapter_config.json` text.
    ///
    /// # Errors
    /// Invalid JSON, a wrong type, or an unsupported or invalid field value.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|source| PeftError::Json {
            file: "adapter_config.json".into(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read `dir/adapter_config.json`.
    ///
    /// # Errors
    /// As [`from_json`](Self::from_json), plus I/O errors.
    pub fn from_pretrained(dir: &Path) -> Result<Self> {
        let path = dir.join(hf::CONFIG_FILE);
        <Self as peft_core::Method>::from_json(hf::read_json(&path)?, &path, &hf::KeyMap::default())
    }

    /// Fields of the file this library does not know (kept and written back).
    pub fn unknown_fields(&self) -> Vec<&str> {
        self.extra
            .keys()
            .map(String::as_str)
            .filter(|k| !OFF_FIELDS.contains(k) && !PASSIVE_FIELDS.contains(k))
            .collect()
    }

    /// Check every field.
    ///
    /// # Errors
    /// The first invalid or unsupported field.
    pub fn validate(&self) -> Result<()> {
        if self.peft_type != "LORA" {
            return Err(PeftError::InvalidConfig {
                field: "peft_type".into(),
                reason: format!("expected \"LORA\", found {:?}", self.peft_type),
            });
        }
        self.validate_fields()
    }

    /// Check every field but `peft_type`: for configs that extend LoRA's (AdaLoRA's).
    ///
    /// # Errors
    /// The first invalid or unsupported field.
    pub fn validate_fields(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::InvalidConfig {
                field: "r".into(),
                reason: "must be a positive integer".into(),
            });
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::InvalidConfig {
                field: "lora_dropout".into(),
                reason: format!("{} is not in [0, 1)", self.lora_dropout),
            });
        }
        if self.fan_in_fan_out {
            return Err(PeftError::unsupported_field(
                "fan_in_fan_out",
                true,
                "burn layers store [d_in, d_out] and are handled natively; set it to false",
            ));
        }
        if self.lora_bias {
            return Err(PeftError::unsupported_field(
                "lora_bias",
                true,
                "not implemented",
            ));
        }
        for field in OFF_FIELDS {
            if let Some(v) = self.extra.get(*field)
                && !is_off(v)
            {
                return Err(PeftError::unsupported_field(field, v, "not implemented"));
            }
        }
        for (k, v) in &self.rank_pattern {
            if v.as_u64().is_none_or(|r| r == 0) {
                return Err(PeftError::InvalidConfig {
                    field: "rank_pattern".into(),
                    reason: format!("`{k}`: {v} is not a positive integer"),
                });
            }
        }
        for (k, v) in &self.alpha_pattern {
            if !v.is_number() {
                return Err(PeftError::InvalidConfig {
                    field: "alpha_pattern".into(),
                    reason: format!("`{k}`: {v} is not a number"),
                });
            }
        }
        self.target_spec().map(|_| ())
    }

    /// The compiled target selection.
    ///
    /// # Errors
    /// Invalid regular expressions or field combinations.
    pub fn target_spec(&self) -> Result<TargetSpec> {
        self.base.target_spec()
    }

    /// Rank and alpha of the module at `path`, after `rank_pattern` / `alpha_pattern`.
    ///
    /// # Errors
    /// A pattern that is not a valid regular expression.
    pub fn rank_alpha(&self, path: &str) -> Result<(usize, f64)> {
        let r = pattern_key(self.rank_pattern.keys(), path)?
            .and_then(|k| self.rank_pattern[k].as_u64())
            .map_or(self.r, |r| r as usize);
        let alpha = pattern_key(self.alpha_pattern.keys(), path)?
            .and_then(|k| self.alpha_pattern[k].as_f64())
            .unwrap_or(self.lora_alpha);
        Ok((r, alpha))
    }

    /// The scaling of a module with rank `r` and `alpha`.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        crate::adapter::lora_scaling(r, alpha, self.use_rslora)
    }

    /// The JSON object PEFT writes for this config (every field, `inference_mode: true`).
    pub fn to_json_map(&self) -> Map<String, Value> {
        let mut map = match serde_json::to_value(self).expect("config serializes") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serializes to an object"),
        };
        map.insert("inference_mode".into(), Value::Bool(true));
        for field in OFF_FIELDS {
            map.entry(*field).or_insert(match *field {
                "loftq_config" => Value::Object(Map::new()),
                "use_qalora" | "ensure_weight_tying" => Value::Bool(false),
                _ => Value::Null,
            });
        }
        map.entry("peft_version").or_insert(Value::from("0.21.2"));
        map.entry("megatron_core")
            .or_insert(Value::from("megatron.core"));
        map.entry("qalora_group_size").or_insert(Value::from(16));
        map.entry("auto_mapping").or_insert(Value::Null);
        map
    }
}

impl PeftConfig for LoraConfig {
    fn base(&self) -> &PeftConfigBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut PeftConfigBase {
        &mut self.base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_values_are_named() {
        let err = LoraConfig::from_json(r#"{"peft_type":"LORA","layer_replication":[[0,2]]}"#)
            .unwrap_err();
        assert!(
            matches!(err, PeftError::UnsupportedField { ref field, .. } if field == "layer_replication"),
            "{err}"
        );
        let err = LoraConfig::from_json(r#"{"peft_type":"LORA","init_lora_weights":"olora"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("olora"), "{err}");
        let err =
            LoraConfig::from_json(r#"{"peft_type":"LORA","fan_in_fan_out":true}"#).unwrap_err();
        assert!(err.to_string().contains("fan_in_fan_out"), "{err}");
    }

    #[test]
    fn off_values_and_unknown_fields_are_accepted_and_kept() {
        let cfg = LoraConfig::from_json(
            r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"loftq_config":{},"megatron_config":null,"brand_new_field":3}"#,
        )
        .unwrap();
        assert_eq!(cfg.unknown_fields(), vec!["brand_new_field"]);
        let out = cfg.to_json_map();
        assert_eq!(out["brand_new_field"], 3);
        assert_eq!(out["lora_alpha"], 8);
        assert_eq!(out["inference_mode"], true);
    }

    #[test]
    fn patterns_and_scaling_follow_peft() {
        let cfg = LoraConfig::new(4, 8.0, ModuleSelector::names(["q_proj", "v_proj"]))
            .with_rank_pattern("model.layers.1.self_attn.q_proj", 2)
            .with_alpha_pattern("v_proj", 3.0);
        assert_eq!(
            cfg.rank_alpha("model.layers.1.self_attn.q_proj").unwrap(),
            (2, 8.0)
        );
        assert_eq!(
            cfg.rank_alpha("model.layers.0.self_attn.q_proj").unwrap(),
            (4, 8.0)
        );
        assert_eq!(
            cfg.rank_alpha("model.layers.0.self_attn.v_proj").unwrap(),
            (4, 3.0)
        );
        assert_eq!(cfg.scaling(2, 8.0), 4.0);
        assert_eq!(cfg.clone().with_rslora(true).scaling(4, 8.0), 4.0);
    }

    #[test]
    fn bad_values_are_rejected() {
        for (json, field) in [
            (r#"{"peft_type":"LORA","r":0}"#, "r"),
            (r#"{"peft_type":"LORA","lora_dropout":1.5}"#, "lora_dropout"),
            (r#"{"peft_type":"ADALORA"}"#, "peft_type"),
        ] {
            let err = LoraConfig::from_json(json).unwrap_err();
            assert!(
                matches!(&err, PeftError::InvalidConfig { field: f, .. } if *f == field),
                "{json}: {err:?}"
            );
        }
        // An unknown `bias` value fails in serde, with the field, the value and the choices.
        let err = LoraConfig::from_json(r#"{"peft_type":"LORA","bias":"some"}"#).unwrap_err();
        assert!(matches!(err, PeftError::Json { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("`bias` = `some`") && text.contains("lora_only"),
            "{text}"
        );
    }
}
