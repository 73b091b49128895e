//! `SftConfig`: the fields of the reference's `SftConfig` (AlanAnsell/peft), parsed and
//! validated, and the budget split across target weights.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use peft_core::config::{PeftConfig, PeftConfigBase};
use peft_core::error::{PeftError, Result};
use peft_core::hf;
use peft_core::hosts;
use peft_core::target::{LayerKind, ModuleSelector, TargetSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How new slots are grown at a reselection (`selection_algorithm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectionAlgorithm {
    /// SpIEL-AG: candidates by accumulated weight gradient (RigL); trained with
    /// [`SftAdamW`](crate::SftAdamW).
    #[default]
    Rigl,
    /// SpIEL-MA: candidates by SM3 moment estimates; trained with [`SftSm3`](crate::SftSm3).
    Sm3,
}

/// How the reselection rate decays over training (`reselection_rate_policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatePolicy {
    /// `r0 · (1 − t/T)`.
    #[default]
    Linear,
    /// `r0 · (1 + cos(π t/T)) / 2`.
    Cosine,
}

/// The values new adapters start with (in-process only, not part of the file).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum InitDeltas {
    /// Zeros, as the reference: the adapted model starts as the base model.
    #[default]
    Zeros,
    /// Deterministic values in `[-scale/2, scale/2)` (seeded by the module path): for tests.
    Random(f32),
}

fn default_density() -> f64 {
    0.01
}
fn default_selection_steps() -> usize {
    20
}
fn default_accumulation_steps() -> usize {
    5
}
fn default_rate() -> f64 {
    0.2
}
fn default_dtype() -> String {
    "float32".into()
}
fn default_peft_type() -> String {
    "SFT".into()
}

/// An SFT configuration, field for field the reference's `SftConfig` (`adapter_config.json`),
/// plus `reselection_rate_policy` (the reference's trainer argument).
///
/// Differences from the reference, all deliberate:
/// - `dtype` is kept and written back, but deltas are `f32` (`"auto"`, a `NameError` in the
///   reference, is refused);
/// - without `num_deltas`, attaching ([`PeftModel::add_adapter`](peft_core::PeftModel::add_adapter))
///   computes them from the model with [`allocate`](Self::allocate) (the reference's rule,
///   `k_m = int(N·numel_m/Σ numel)`, `N` a share of **all** the model's parameters); only a
///   config that reaches [`Method::create`](peft_core::Method::create) directly without
///   `num_deltas` and without `num_tunable_weights` gives each layer `int(density · numel)`
///   entries;
/// - only linear layers are adapted, as in the reference.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SftConfig {
    /// Always `"SFT"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// Fraction of **all** model parameters that are tunable (`N = int(total · density)`).
    #[serde(default = "default_density")]
    pub density: f64,
    /// Absolute number of tunable weights; overrides `density`.
    #[serde(default)]
    pub num_tunable_weights: Option<usize>,
    /// Deltas per module path; overrides both. Filled in by [`allocate`](Self::allocate).
    #[serde(default)]
    pub num_deltas: Option<BTreeMap<String, usize>>,
    /// `rigl` or `sm3`.
    #[serde(default)]
    pub selection_algorithm: SelectionAlgorithm,
    /// `R`: update steps between reselections.
    #[serde(default = "default_selection_steps")]
    pub reselection_steps: usize,
    /// `S`: update steps of gradient accumulation before a RigL reselection (`1 ≤ S < R`).
    #[serde(default = "default_accumulation_steps")]
    pub selection_accumulation_steps: usize,
    /// Decay of the reselection rate.
    #[serde(default)]
    pub reselection_rate_policy: RatePolicy,
    /// `r0`: the proportion of slots changed early in training (the first selection changes
    /// all of them).
    #[serde(default = "default_rate")]
    pub initial_reselection_rate: f64,
    /// Unused by the selector (kept for the file).
    #[serde(default)]
    pub candidate_reselection_steps: Option<usize>,
    /// Unused by the selector (kept for the file).
    #[serde(default = "default_rate")]
    pub candidate_reselection_proportion: f64,
    /// `float32`, `bfloat16` or `float16` (kept; deltas are `f32`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// PEFT's common fields (targets, `bias` with `lora_only` = biases of adapted layers,
    /// `modules_to_save`, layer filter, …).
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// Every other field of the file, kept in order and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Seed of the initial random index choice (mixed with the module path).
    #[serde(skip)]
    pub seed: u64,
    /// Initial values of new adapters (in-process only).
    #[serde(skip)]
    pub init_deltas: InitDeltas,
}

impl Default for SftConfig {
    fn default() -> Self {
        serde_json::from_value(Value::Object(Map::new())).expect("defaults parse")
    }
}

impl SftConfig {
    /// A config with `density` over `target_modules`; everything else the reference's default.
    pub fn new(density: f64, target_modules: ModuleSelector) -> Self {
        Self {
            density,
            base: PeftConfigBase {
                target_modules: Some(target_modules),
                ..PeftConfigBase::default()
            },
            ..Self::default()
        }
    }

    /// Set `num_tunable_weights` (overrides `density`).
    pub fn with_num_tunable_weights(mut self, n: usize) -> Self {
        self.num_tunable_weights = Some(n);
        self
    }

    /// Set `num_deltas` (overrides everything else).
    pub fn with_num_deltas(mut self, deltas: BTreeMap<String, usize>) -> Self {
        self.num_deltas = Some(deltas);
        self
    }

    /// Set `selection_algorithm`.
    pub fn with_selection(mut self, algorithm: SelectionAlgorithm) -> Self {
        self.selection_algorithm = algorithm;
        self
    }

    /// Set `reselection_steps` (R) and `selection_accumulation_steps` (S).
    pub fn with_steps(mut self, reselection_steps: usize, accumulation_steps: usize) -> Self {
        self.reselection_steps = reselection_steps;
        self.selection_accumulation_steps = accumulation_steps;
        self
    }

    /// Set `reselection_rate_policy` and `initial_reselection_rate`.
    pub fn with_rate(mut self, policy: RatePolicy, initial: f64) -> Self {
        self.reselection_rate_policy = policy;
        self.initial_reselection_rate = initial;
        self
    }

    /// Set the seed of the initial index choice.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Set the initial values of new adapters.
    pub fn with_init(mut self, init: InitDeltas) -> Self {
        self.init_deltas = init;
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

    /// Check every field.
    ///
    /// # Errors
    /// The first invalid or unsupported field.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| PeftError::InvalidConfig {
            field: field.into(),
            reason,
        };
        if self.peft_type != "SFT" {
            return Err(invalid(
                "peft_type",
                format!("expected \"SFT\", found {:?}", self.peft_type),
            ));
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(invalid(
                "density",
                format!("{} is not in (0, 1]", self.density),
            ));
        }
        if self.num_tunable_weights == Some(0) {
            return Err(invalid("num_tunable_weights", "must be positive".into()));
        }
        if self.reselection_steps < 2 {
            return Err(invalid(
                "reselection_steps",
                format!("{} must be at least 2", self.reselection_steps),
            ));
        }
        let (r, s) = (self.reselection_steps, self.selection_accumulation_steps);
        if s == 0 || s >= r {
            return Err(invalid(
                "selection_accumulation_steps",
                format!("{s} must be in [1, reselection_steps = {r})"),
            ));
        }
        if !(0.0..=1.0).contains(&self.initial_reselection_rate) {
            return Err(invalid(
                "initial_reselection_rate",
                format!("{} is not in [0, 1]", self.initial_reselection_rate),
            ));
        }
        match self.dtype.as_str() {
            "float32" | "bfloat16" | "float16" => {}
            "auto" => {
                return Err(PeftError::unsupported_field(
                    "dtype",
                    "auto",
                    "deltas are float32; use \"float32\" (the reference's \"auto\" fails too)",
                ));
            }
            other => {
                return Err(invalid(
                    "dtype",
                    format!("{other:?} is not \"float32\", \"bfloat16\" or \"float16\""),
                ));
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

    /// The number of deltas of the layer at `path` with `numel` weights, when `num_deltas`
    /// is not set: `int(density · numel)`.
    ///
    /// # Errors
    /// `num_deltas` lacks the layer, or only `num_tunable_weights` is set (the split needs the
    /// whole model: call [`allocate`](Self::allocate) first).
    pub fn layer_deltas(&self, path: &str, numel: usize) -> Result<usize> {
        if let Some(map) = &self.num_deltas {
            let k = map
                .get(path)
                .copied()
                .ok_or_else(|| PeftError::InvalidConfig {
                    field: "num_deltas".into(),
                    reason: format!(
                        "no entry for `{path}` (entries: {})",
                        map.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                })?;
            if k > numel {
                return Err(PeftError::InvalidConfig {
                    field: "num_deltas".into(),
                    reason: format!("`{path}`: {k} deltas in a weight of {numel} entries"),
                });
            }
            return Ok(k);
        }
        if self.num_tunable_weights.is_some() {
            return Err(PeftError::InvalidConfig {
                field: "num_tunable_weights".into(),
                reason: "splitting an absolute budget needs the whole model: call \
                         SftConfig::allocate(&model) before attaching"
                    .into(),
            });
        }
        Ok((self.density * numel as f64) as usize)
    }

    /// The reference's budget split, written into `num_deltas`: `N = num_tunable_weights` or
    /// `int(total · density)` with `total` every float parameter of `model` (adapter
    /// parameters excluded), and `k_m = int(N · numel_m / Σ numel)` over the target linear
    /// layers (floors, so `Σ k_m ≤ N`).
    ///
    /// # Errors
    /// Targets that match nothing, or `N` larger than the targets' size.
    pub fn allocate<M: Module>(&self, model: &M) -> Result<Self> {
        self.validate()?;
        let total: usize = hosts::parameters(model)
            .iter()
            .filter(|(p, _, _)| !p.contains(".peft.") && !p.starts_with("peft."))
            .map(|(_, _, n)| n)
            .sum();
        let layers = hosts::layers(model);
        let candidates: Vec<_> = layers.iter().map(|l| l.candidate.clone()).collect();
        let spec = self.target_spec()?;
        let selected = spec.select(&candidates)?;
        let targets: Vec<(String, usize)> = layers
            .iter()
            .filter(|l| {
                l.candidate.kind == LayerKind::Linear
                    && selected.iter().any(|c| c.path == l.candidate.path)
            })
            .map(|l| (l.candidate.path.clone(), l.shape[0] * l.shape[1]))
            .collect();
        let sum: usize = targets.iter().map(|(_, n)| n).sum();
        let n = self
            .num_tunable_weights
            .unwrap_or((total as f64 * self.density) as usize);
        if n > sum {
            return Err(PeftError::InvalidConfig {
                field: "density".into(),
                reason: format!(
                    "{n} tunable weights exceed the {sum} entries of the target layers"
                ),
            });
        }
        let deltas = targets
            .into_iter()
            .map(|(p, numel)| {
                let k = (n as u128 * numel as u128 / sum.max(1) as u128) as usize;
                (p, k)
            })
            .collect();
        Ok(self.clone().with_num_deltas(deltas))
    }

    /// Fields of the file this library does not know (kept and written back).
    pub fn unknown_fields(&self) -> Vec<&str> {
        self.extra
            .keys()
            .map(String::as_str)
            .filter(|k| !["peft_version", "auto_mapping"].contains(k))
            .collect()
    }

    /// The JSON object written to `adapter_config.json` (every field, `inference_mode: true`),
    /// `num_deltas` keyed by Hugging Face module paths.
    pub fn to_json_map(&self, key_map: &hf::KeyMap) -> Map<String, Value> {
        let mut config = self.clone();
        config.num_deltas = self.num_deltas.as_ref().map(|m| {
            m.iter()
                .map(|(p, k)| (key_map.to_hf(p), *k))
                .collect::<BTreeMap<_, _>>()
        });
        let mut map = match serde_json::to_value(&config).expect("config serializes") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serializes to an object"),
        };
        map.insert("inference_mode".into(), Value::Bool(true));
        map
    }
}

impl PeftConfig for SftConfig {
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

    fn parse(json: &str) -> Result<SftConfig> {
        let c: SftConfig = serde_json::from_str(json).map_err(|source| PeftError::Json {
            file: "adapter_config.json".into(),
            source,
        })?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn reference_defaults_and_fields_round_trip() {
        let c = parse(
            r#"{"peft_type":"SFT","density":0.02,"selection_algorithm":"sm3",
                "num_deltas":{"model.layers.0.q_proj":12},"target_modules":["q_proj"],
                "candidate_reselection_steps":null}"#,
        )
        .unwrap();
        assert_eq!(c.selection_algorithm, SelectionAlgorithm::Sm3);
        assert_eq!(
            (c.reselection_steps, c.selection_accumulation_steps),
            (20, 5)
        );
        assert_eq!(c.initial_reselection_rate, 0.2);
        assert_eq!(c.reselection_rate_policy, RatePolicy::Linear);
        assert_eq!(c.dtype, "float32");
        assert_eq!(c.layer_deltas("model.layers.0.q_proj", 100).unwrap(), 12);
        assert!(c.layer_deltas("other", 100).is_err());
        let out = c.to_json_map(&hf::KeyMap::default());
        assert_eq!(out["selection_algorithm"], "sm3");
        assert_eq!(out["num_deltas"]["model.layers.0.q_proj"], 12);
        let back = parse(&serde_json::to_string(&out).unwrap()).unwrap();
        assert_eq!(back.to_json_map(&hf::KeyMap::default()), out);
    }

    #[test]
    fn invalid_fields_are_named() {
        let err = |json: &str| parse(json).unwrap_err().to_string();
        assert!(err(r#"{"peft_type":"LORA"}"#).contains("SFT"));
        assert!(err(r#"{"density":0}"#).contains("density"));
        assert!(
            err(r#"{"reselection_steps":5,"selection_accumulation_steps":5}"#)
                .contains("selection_accumulation_steps")
        );
        assert!(
            err(r#"{"selection_accumulation_steps":0}"#).contains("selection_accumulation_steps")
        );
        assert!(err(r#"{"dtype":"auto"}"#).contains("dtype"));
        assert!(err(r#"{"selection_algorithm":"random"}"#).contains("random"));
        assert!(err(r#"{"initial_reselection_rate":1.5}"#).contains("initial_reselection_rate"));
        let only_n = SftConfig::default().with_num_tunable_weights(10);
        assert!(
            only_n
                .layer_deltas("a", 100)
                .unwrap_err()
                .to_string()
                .contains("allocate")
        );
        assert_eq!(SftConfig::default().layer_deltas("a", 1000).unwrap(), 10);
    }
}
