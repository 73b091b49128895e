//! `RosaConfig`: the fields of peft-rosa's `RosaConfig`, parsed and validated, and the
//! schedule grammar.

use std::path::{Path, PathBuf};

use peft_core::config::{PeftConfig, PeftConfigBase};
use peft_core::error::{PeftError, Result};
use peft_core::hf;
use peft_core::method::BiasMode;
use peft_core::target::{ModuleSelector, TargetSpec, pattern_key};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::masks::RosaMasks;

/// How the LoRA factors (and, with masks given at creation, the sparse values) start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitRosaWeights {
    /// `true`: A kaiming-uniform (`U(±1/√d_in)`), B zero, sparse values zero: an identity.
    Default,
    /// `"gaussian"`: A `N(0, 1/r)`, B zero.
    Gaussian,
    /// `false`: every factor and sparse value random (not an identity): for tests.
    Random,
}

impl Serialize for InitRosaWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Default => s.serialize_bool(true),
            Self::Random => s.serialize_bool(false),
            Self::Gaussian => s.serialize_str("gaussian"),
        }
    }
}

impl<'de> Deserialize<'de> for InitRosaWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(Self::Default),
            Value::Bool(false) => Ok(Self::Random),
            Value::String(s) if s == "gaussian" => Ok(Self::Gaussian),
            other => Err(serde::de::Error::custom(format!(
                "init_lora_weights = {other} is not supported (supported: true, false, \"gaussian\")"
            ))),
        }
    }
}

/// What the mask statistic accumulates (`grad_acc_mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradAccMode {
    /// The running mean of the squared weight gradient (a diagonal empirical Fisher).
    #[default]
    MeanSquared,
    /// The running mean of the weight gradient; the mask takes its largest magnitudes.
    Mean,
}

/// What a step of training does (an agenda of the schedule, spec §1.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Agenda {
    /// The LoRA factors train.
    pub lora: bool,
    /// The weight gradients of this step feed the mask statistic.
    pub grad_collection: bool,
    /// The sparse values train.
    pub spa: bool,
}

/// One segment of a schedule: `agenda` until step `end` (exclusive), or forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// What the steps of the segment do.
    pub agenda: Agenda,
    /// The first step after the segment; `None` for the last one.
    pub end: Option<usize>,
}

/// A parsed schedule name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// `wl{N}` (`default` and `df` are `wl0`): `N` LoRA-only steps, then `spa_num_grads` steps
    /// of LoRA with gradient collection, then both adapters.
    Warmup(usize),
    /// `spa_only`: gradient collection, then the sparse adapter alone.
    SpaOnly,
    /// `lora_only`: LoRA alone (requires `d = 0`).
    LoraOnly,
}

impl Schedule {
    /// Parse a schedule name.
    ///
    /// # Errors
    /// A name outside `default`, `df`, `wl{N}`, `spa_only`, `lora_only`.
    pub fn parse(name: &str) -> Result<Self> {
        let bad = || PeftError::InvalidConfig {
            field: "schedule".into(),
            reason: format!(
                "{name:?} is not a schedule (expected \"default\", \"df\", \"wl<N>\", \"spa_only\" or \"lora_only\")"
            ),
        };
        Ok(match name {
            "default" | "df" => Self::Warmup(0),
            "spa_only" => Self::SpaOnly,
            "lora_only" => Self::LoraOnly,
            _ => Self::Warmup(
                name.strip_prefix("wl")
                    .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(bad)?,
            ),
        })
    }

    /// The segments, exactly as the reference builds them; `collect` is false when the masks
    /// are already known (loaded or given), which drops the collection segment.
    pub fn segments(self, spa_num_grads: usize, collect: bool) -> Vec<Segment> {
        let agenda = |lora, grad_collection, spa| Agenda {
            lora,
            grad_collection,
            spa,
        };
        let mut out = Vec::new();
        match self {
            Self::Warmup(n) => {
                if n > 0 {
                    out.push(Segment {
                        agenda: agenda(true, false, false),
                        end: Some(n),
                    });
                }
                if collect {
                    out.push(Segment {
                        agenda: agenda(true, true, false),
                        end: Some(n + spa_num_grads),
                    });
                }
                out.push(Segment {
                    agenda: agenda(true, false, true),
                    end: None,
                });
            }
            Self::SpaOnly => {
                if collect {
                    out.push(Segment {
                        agenda: agenda(false, true, false),
                        end: Some(spa_num_grads),
                    });
                }
                out.push(Segment {
                    agenda: agenda(false, false, true),
                    end: None,
                });
            }
            Self::LoraOnly => out.push(Segment {
                agenda: agenda(true, false, false),
                end: None,
            }),
        }
        out
    }
}

fn default_r() -> usize {
    8
}
fn default_d() -> f64 {
    0.003
}
fn default_alpha() -> f64 {
    8.0
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_impl() -> String {
    "auto".into()
}
fn default_dtype() -> String {
    "bf16".into()
}
fn default_init() -> InitRosaWeights {
    InitRosaWeights::Default
}
fn default_peft_type() -> String {
    "ROSA".into()
}

/// A RoSA configuration, field for field peft-rosa's `RosaConfig` (`adapter_config.json`).
///
/// Differences from the reference, all deliberate:
/// - per-layer `density_pattern` sizes both the adapter and its mask (the reference sizes the
///   mask with the global `d` and asserts);
/// - `rosa_dtype`, `impl` and `spa_store_transpose` are kept and written back, but parameters
///   are kept in `f32` and the sparse term always runs on the CSR kernels of `sparse-kernels`
///   (SpMM forward, SDDMM gradient), which is what `sp_add` and `spmm` compute;
/// - masks files (`mask_load_path`, `mask_save_path`) are safetensors (see [`RosaMasks`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RosaConfig {
    /// Always `"ROSA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// LoRA rank; 0 means no low-rank part (sparse only).
    #[serde(default = "default_r")]
    pub r: usize,
    /// Density of the sparse adapter: `int(d · rows · cols)` entries per layer; 0 means none.
    #[serde(default = "default_d")]
    pub d: f64,
    /// Scaling numerator: `s = lora_alpha / r` (or `/ √r` with rsLoRA); 1 when `r = 0`.
    #[serde(default = "default_alpha", serialize_with = "number")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch input (activation-space layers only).
    #[serde(default)]
    pub lora_dropout: f64,
    /// `auto`, `spmm` or `sp_add` (kept; both compute the same function here).
    #[serde(default = "default_impl", rename = "impl")]
    pub implementation: String,
    /// Kept for the file (the layout always stores its transpose for the backward pass).
    #[serde(default = "default_true")]
    pub spa_store_transpose: bool,
    /// Optimizer steps of gradient collection before the masks are taken.
    #[serde(default = "default_one")]
    pub spa_num_grads: usize,
    /// What the mask statistic accumulates.
    #[serde(default)]
    pub grad_acc_mode: GradAccMode,
    /// Masks to start from (a [`RosaMasks`] file); no collection then.
    #[serde(default)]
    pub mask_load_path: Option<PathBuf>,
    /// Where generated masks are written.
    #[serde(default)]
    pub mask_save_path: Option<PathBuf>,
    /// `fp32`, `fp16` or `bf16` (kept; parameters are `f32`).
    #[serde(default = "default_dtype")]
    pub rosa_dtype: String,
    /// Stop after the masks are generated and saved (see [`RosaScheduler::should_stop`](crate::RosaScheduler::should_stop)).
    #[serde(default)]
    pub terminate_after_mask_generation: bool,
    /// The schedule name (required to train, see [`Schedule`]).
    #[serde(default)]
    pub schedule: Option<String>,
    /// Must be `false`.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// Initialization.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitRosaWeights,
    /// Per-module rank (pattern -> r).
    #[serde(default)]
    pub rank_pattern: Map<String, Value>,
    /// Per-module density (pattern -> d).
    #[serde(default)]
    pub density_pattern: Map<String, Value>,
    /// Per-module alpha (pattern -> alpha).
    #[serde(default)]
    pub alpha_pattern: Map<String, Value>,
    /// PEFT's common fields (targets, `modules_to_save`, layer filter, …); `bias` is written
    /// as RoSA names it: `none`, `all`, `rosa_only` (the biases of adapted layers).
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

/// Fields of the reference config this library does not implement; accepted when "off".
const OFF_FIELDS: &[&str] = &["megatron_config", "loftq_config"];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

impl Default for RosaConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults parse")
    }
}

impl RosaConfig {
    /// A config with rank `r`, density `d`, `lora_alpha`, target modules and a schedule;
    /// everything else the reference's default.
    pub fn new(r: usize, d: f64, lora_alpha: f64, target_modules: ModuleSelector) -> Self {
        Self {
            r,
            d,
            lora_alpha,
            base: PeftConfigBase {
                target_modules: Some(target_modules),
                ..PeftConfigBase::default()
            },
            schedule: Some("default".into()),
            ..Self::default()
        }
    }

    /// Set the schedule (`default`, `wl<N>`, `spa_only`, `lora_only`).
    pub fn with_schedule(mut self, schedule: &str) -> Self {
        self.schedule = Some(schedule.into());
        self
    }

    /// Set `spa_num_grads`.
    pub fn with_num_grads(mut self, n: usize) -> Self {
        self.spa_num_grads = n;
        self
    }

    /// Set `grad_acc_mode`.
    pub fn with_grad_acc_mode(mut self, mode: GradAccMode) -> Self {
        self.grad_acc_mode = mode;
        self
    }

    /// Set `use_rslora`.
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Set `lora_dropout`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// Set `init_lora_weights`.
    pub fn with_init(mut self, init: InitRosaWeights) -> Self {
        self.init_lora_weights = init;
        self
    }

    /// Add a `rank_pattern` entry.
    pub fn with_rank_pattern(mut self, key: &str, r: usize) -> Self {
        self.rank_pattern.insert(key.into(), Value::from(r));
        self
    }

    /// Add a `density_pattern` entry.
    pub fn with_density_pattern(mut self, key: &str, d: f64) -> Self {
        self.density_pattern.insert(key.into(), Value::from(d));
        self
    }

    /// Add an `alpha_pattern` entry.
    pub fn with_alpha_pattern(mut self, key: &str, alpha: f64) -> Self {
        self.alpha_pattern.insert(key.into(), Value::from(alpha));
        self
    }

    /// Set `mask_save_path`.
    pub fn with_mask_save_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.mask_save_path = Some(path.into());
        self
    }

    /// Set `terminate_after_mask_generation` (needs `mask_save_path`): the first run of the
    /// reference's two-run recipe.
    pub fn with_terminate_after_mask_generation(mut self, on: bool) -> Self {
        self.terminate_after_mask_generation = on;
        self
    }

    /// Set `mask_load_path`: new adapters start with these masks (read once per attach), and
    /// no step collects gradients. Masks known in-process are given when attaching instead
    /// ([`MaskedAdapters`](crate::MaskedAdapters)).
    pub fn with_mask_load_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.mask_load_path = Some(path.into());
        self
    }

    /// Read `dir/adapter_config.json`.
    ///
    /// # Errors
    /// Invalid JSON, a wrong type, or an unsupported or invalid field value.
    pub fn from_pretrained(dir: &Path) -> Result<Self> {
        let path = dir.join(hf::CONFIG_FILE);
        <Self as peft_core::Method>::from_json(hf::read_json(&path)?, &path, &hf::KeyMap::default())
    }

    /// Fields of the file this library does not know (kept and written back).
    pub fn unknown_fields(&self) -> Vec<&str> {
        self.extra
            .keys()
            .map(String::as_str)
            .filter(|k| {
                !OFF_FIELDS.contains(k)
                    && !["peft_version", "megatron_core", "auto_mapping"].contains(k)
            })
            .collect()
    }

    /// The parsed schedule, if one is set.
    ///
    /// # Errors
    /// An unknown schedule name.
    pub fn parsed_schedule(&self) -> Result<Option<Schedule>> {
        self.schedule.as_deref().map(Schedule::parse).transpose()
    }

    /// Check every field.
    ///
    /// # Errors
    /// The first invalid or unsupported field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| PeftError::InvalidConfig {
            field: field.into(),
            reason,
        };
        if self.peft_type != "ROSA" {
            return Err(invalid(
                "peft_type",
                format!("expected \"ROSA\", found {:?}", self.peft_type),
            ));
        }
        if !(0.0..=1.0).contains(&self.d) {
            return Err(invalid("d", format!("{} is not in [0, 1]", self.d)));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                "lora_dropout",
                format!("{} is not in [0, 1)", self.lora_dropout),
            ));
        }
        if self.spa_num_grads == 0 {
            return Err(invalid("spa_num_grads", "must be at least 1".into()));
        }
        if !["auto", "spmm", "sp_add"].contains(&self.implementation.as_str()) {
            return Err(invalid(
                "impl",
                format!(
                    "{:?} is not \"auto\", \"spmm\" or \"sp_add\"",
                    self.implementation
                ),
            ));
        }
        if !["fp32", "fp16", "bf16"].contains(&self.rosa_dtype.as_str()) {
            return Err(invalid(
                "rosa_dtype",
                format!(
                    "{:?} is not \"fp32\", \"fp16\" or \"bf16\"",
                    self.rosa_dtype
                ),
            ));
        }
        if self.mask_load_path.is_some() && self.mask_save_path.is_some() {
            return Err(invalid(
                "mask_save_path",
                "cannot be set together with mask_load_path (the masks would not be generated)"
                    .into(),
            ));
        }
        if self.terminate_after_mask_generation && self.mask_save_path.is_none() {
            return Err(invalid(
                "terminate_after_mask_generation",
                "requires mask_save_path, or the generated masks would be lost".into(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(PeftError::unsupported_field(
                "fan_in_fan_out",
                true,
                "burn layers store [d_in, d_out] and are handled natively; set it to false",
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
            if v.as_u64().is_none() {
                return Err(invalid(
                    "rank_pattern",
                    format!("`{k}`: {v} is not a non-negative integer"),
                ));
            }
        }
        for (k, v) in &self.density_pattern {
            if v.as_f64().is_none_or(|d| !(0.0..=1.0).contains(&d)) {
                return Err(invalid(
                    "density_pattern",
                    format!("`{k}`: {v} is not a number in [0, 1]"),
                ));
            }
        }
        for (k, v) in &self.alpha_pattern {
            if !v.is_number() {
                return Err(invalid(
                    "alpha_pattern",
                    format!("`{k}`: {v} is not a number"),
                ));
            }
        }
        let any_density = self.d > 0.0
            || self
                .density_pattern
                .values()
                .any(|v| v.as_f64().is_some_and(|d| d > 0.0));
        let any_rank = self.r > 0 || self.rank_pattern.values().any(|v| v.as_u64() > Some(0));
        if !any_density && !any_rank {
            return Err(invalid(
                "r",
                "r = 0 and d = 0 leave no trainable adapter".into(),
            ));
        }
        match self.parsed_schedule()? {
            Some(Schedule::LoraOnly) if any_density => {
                return Err(invalid(
                    "schedule",
                    "\"lora_only\" requires d = 0 (and no positive density_pattern)".into(),
                ));
            }
            Some(Schedule::SpaOnly) if !any_density => {
                return Err(invalid("schedule", "\"spa_only\" requires d > 0".into()));
            }
            Some(Schedule::Warmup(n)) if n > 0 && !any_density => {
                return Err(invalid(
                    "schedule",
                    format!("\"wl{n}\" warms LoRA up for a sparse adapter, which d = 0 disables"),
                ));
            }
            _ => {}
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

    /// Rank, alpha and density of the module at `path`, after the patterns.
    ///
    /// # Errors
    /// A pattern that is not a valid regular expression.
    pub fn layer_settings(&self, path: &str) -> Result<(usize, f64, f64)> {
        let r = pattern_key(self.rank_pattern.keys(), path)?
            .and_then(|k| self.rank_pattern[k].as_u64())
            .map_or(self.r, |r| r as usize);
        let alpha = pattern_key(self.alpha_pattern.keys(), path)?
            .and_then(|k| self.alpha_pattern[k].as_f64())
            .unwrap_or(self.lora_alpha);
        let d = pattern_key(self.density_pattern.keys(), path)?
            .and_then(|k| self.density_pattern[k].as_f64())
            .unwrap_or(self.d);
        Ok((r, alpha, d))
    }

    /// The LoRA scaling of a module with rank `r` and `alpha` (1 when `r = 0`).
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if r == 0 {
            1.0
        } else {
            peft_lora::lora_scaling(r, alpha, self.use_rslora)
        }
    }

    /// The masks of the `mask_load_path` file, if the config names one.
    ///
    /// # Errors
    /// The masks file cannot be read.
    pub(crate) fn file_masks(&self) -> Result<Option<RosaMasks>> {
        self.mask_load_path
            .as_deref()
            .map(|path| {
                RosaMasks::load(path).map_err(|e| PeftError::InvalidConfig {
                    field: "mask_load_path".into(),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// The JSON object written to `adapter_config.json` (every field, `inference_mode: true`).
    pub fn to_json_map(&self) -> Map<String, Value> {
        let mut map = match serde_json::to_value(self).expect("config serializes") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serializes to an object"),
        };
        map.insert("inference_mode".into(), Value::Bool(true));
        if self.base.bias == BiasMode::LoraOnly {
            map.insert("bias".into(), Value::from("rosa_only"));
        }
        map.entry("megatron_config").or_insert(Value::Null);
        map.entry("megatron_core")
            .or_insert(Value::from("megatron.core"));
        map.entry("loftq_config")
            .or_insert(Value::Object(Map::new()));
        map
    }
}

impl PeftConfig for RosaConfig {
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

    fn parse(json: &str) -> Result<RosaConfig> {
        let c: RosaConfig = serde_json::from_str(json).map_err(|source| PeftError::Json {
            file: "adapter_config.json".into(),
            source,
        })?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn reference_defaults_and_fields_round_trip() {
        let c = parse(
            r#"{"peft_type":"ROSA","r":4,"d":0.01,"lora_alpha":16,"impl":"sp_add","schedule":"wl64",
                "bias":"rosa_only","rosa_dtype":"bf16","target_modules":["q_proj"],"loftq_config":{}}"#,
        )
        .unwrap();
        assert_eq!((c.r, c.d, c.lora_alpha), (4, 0.01, 16.0));
        assert_eq!(c.base.bias, BiasMode::LoraOnly);
        assert_eq!(c.parsed_schedule().unwrap(), Some(Schedule::Warmup(64)));
        assert_eq!(c.spa_num_grads, 1);
        assert_eq!(c.grad_acc_mode, GradAccMode::MeanSquared);
        let out = c.to_json_map();
        assert_eq!(out["impl"], "sp_add");
        assert_eq!(out["bias"], "rosa_only");
        assert_eq!(out["lora_alpha"], 16);
        assert_eq!(out["grad_acc_mode"], "mean_squared");
        let back = parse(&serde_json::to_string(&out).unwrap()).unwrap();
        assert_eq!(back.to_json_map(), out);
    }

    #[test]
    fn schedules_follow_the_reference_table() {
        let seg = |s: &str, g, collect| Schedule::parse(s).unwrap().segments(g, collect);
        let a = |lora, grad_collection, spa| Agenda {
            lora,
            grad_collection,
            spa,
        };
        let wl3 = seg("wl3", 2, true);
        assert_eq!(
            wl3,
            vec![
                Segment {
                    agenda: a(true, false, false),
                    end: Some(3)
                },
                Segment {
                    agenda: a(true, true, false),
                    end: Some(5)
                },
                Segment {
                    agenda: a(true, false, true),
                    end: None
                },
            ]
        );
        assert_eq!(seg("default", 1, true), seg("wl0", 1, true));
        assert_eq!(seg("df", 1, true)[0].end, Some(1));
        assert_eq!(seg("wl3", 2, false).len(), 2, "masks known: no collection");
        assert_eq!(seg("spa_only", 4, true)[0].agenda, a(false, true, false));
        assert_eq!(seg("spa_only", 4, true)[1].agenda, a(false, false, true));
        assert_eq!(
            seg("lora_only", 1, true),
            vec![Segment {
                agenda: a(true, false, false),
                end: None
            }]
        );
        for bad in ["wl", "wl-1", "wl2,spa", "warmup", ""] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_combinations_are_named() {
        let err = |json: &str| parse(json).unwrap_err().to_string();
        assert!(err(r#"{"schedule":"lora_only","d":0.01}"#).contains("lora_only"));
        assert!(err(r#"{"schedule":"spa_only","r":0,"d":0}"#).contains("no trainable"));
        assert!(err(r#"{"schedule":"wl5","d":0}"#).contains("wl5"));
        assert!(err(r#"{"d":1.5}"#).contains("`d`"));
        assert!(err(r#"{"spa_num_grads":0}"#).contains("spa_num_grads"));
        assert!(err(r#"{"impl":"dense"}"#).contains("impl"));
        assert!(err(r#"{"rosa_dtype":"int8"}"#).contains("rosa_dtype"));
        assert!(err(r#"{"mask_load_path":"a","mask_save_path":"b"}"#).contains("mask_save_path"));
        assert!(
            err(r#"{"terminate_after_mask_generation":true}"#)
                .contains("terminate_after_mask_generation")
        );
        assert!(err(r#"{"init_lora_weights":"loftq"}"#).contains("loftq"));
        assert!(err(r#"{"density_pattern":{"q":2.0}}"#).contains("density_pattern"));
        assert!(err(r#"{"peft_type":"LORA"}"#).contains("ROSA"));
        assert!(err(r#"{"bias":"some"}"#).contains("some"));
        assert!(parse(r#"{"schedule":"lora_only","d":0}"#).is_ok());
        assert!(parse(r#"{"schedule":"spa_only","r":0,"d":0.01}"#).is_ok());
    }

    #[test]
    fn patterns_set_rank_alpha_and_density_per_layer() {
        let c = RosaConfig::new(4, 0.01, 8.0, ModuleSelector::names(["q", "v"]))
            .with_rank_pattern("layers.1.q", 2)
            .with_alpha_pattern("v", 3.0)
            .with_density_pattern("v", 0.05);
        assert_eq!(c.layer_settings("layers.1.q").unwrap(), (2, 8.0, 0.01));
        assert_eq!(c.layer_settings("layers.0.v").unwrap(), (4, 3.0, 0.05));
        assert_eq!(c.scaling(2, 8.0), 4.0);
        assert_eq!(c.scaling(0, 8.0), 1.0);
        assert_eq!(c.clone().with_rslora(true).scaling(4, 8.0), 4.0);
    }
}
