//! `AdaLoraConfig`: PEFT 0.21.2's `AdaLoraConfig`, i.e. every LoRA field plus the rank
//! allocator's, parsed and validated.

use std::collections::BTreeMap;

use burn::optim::grad_clipping::GradientClippingConfig;
use peft_core::config::{ConfigWarning, PeftConfig, PeftConfigBase};
use peft_core::error::{PeftError, Result};
use peft_core::target::{ModuleSelector, TargetSpec};
use peft_lora::{InitLoraWeights, LoraConfig};
use serde::Deserialize;
use serde_json::{Map, Value};

/// An AdaLoRA configuration (`peft_type: "ADALORA"`).
///
/// The LoRA fields live in [`lora`](Self::lora) with PEFT's meaning, except: `r` is ignored
/// (the rank is [`init_r`](Self::init_r)), the scaling is `lora_alpha / (init_r + 1e-5)`,
/// `init_lora_weights` is truthy (A, B `N(0, 0.02²)`, E zero: an identity at start; PEFT takes
/// any non-empty string such as `"gaussian"` as `true`) or falsy (`false`, `""`: A, E, B
/// `N(0, 1)`), `use_rslora` is ignored, and DoRA and embeddings are refused, as in PEFT. What is
/// accepted only for compatibility is listed by [`PeftConfig::warnings`].
#[derive(Clone, Debug, Deserialize)]
pub struct AdaLoraConfig {
    /// The LoRA fields (targets, alpha, dropout, bias, `modules_to_save`, layer filters, …).
    #[serde(flatten)]
    pub lora: LoraConfig,
    /// Initial rank of every adapted matrix.
    #[serde(default = "default_init_r")]
    pub init_r: usize,
    /// Average final rank: the total budget is `target_r · #matrices`.
    #[serde(default = "default_target_r")]
    pub target_r: usize,
    /// Steps with the full budget before it starts to shrink.
    #[serde(default)]
    pub tinit: usize,
    /// Final steps with a fixed rank pattern.
    #[serde(default)]
    pub tfinal: usize,
    /// Masking interval during the budget decay (PEFT's `deltaT`).
    #[serde(default = "default_delta_t", rename = "deltaT")]
    pub delta_t: usize,
    /// EMA coefficient of the sensitivity.
    #[serde(default = "default_beta")]
    pub beta1: f64,
    /// EMA coefficient of the uncertainty.
    #[serde(default = "default_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality regularizer added to the loss by the training step.
    #[serde(default = "default_orth")]
    pub orth_reg_weight: f64,
    /// Total number of training steps `T` (required).
    #[serde(default)]
    pub total_step: Option<usize>,
    /// loralib's `target_total_rank`: the final total budget in triplets, instead of
    /// `target_r · #matrices` (PEFT has no such field; written to `adapter_config.json` only when
    /// set).
    #[serde(default)]
    pub target_total_rank: Option<usize>,
    /// The kept singular triplets of every matrix, keyed by the burn path of the adapted layer
    /// (in files: the PEFT path of its `lora_E`). `None` until the first masking step.
    #[serde(skip)]
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    /// The gradient clipping of the optimizer given to the stepper, so that the allocator's
    /// sensitivity `|θ ⊙ g|` uses the clipped gradients the optimizer steps with (burn clips
    /// inside `ModuleOptimizer::step`, after the controllers ran; PEFT users clip before
    /// `update_and_allocate`). A training setting: never written to `adapter_config.json`.
    #[serde(skip)]
    pub grad_clipping: Option<GradientClippingConfig>,
    /// The `init_lora_weights` string of the file when it was read as a boolean (PEFT's
    /// truthiness), for [`PeftConfig::warnings`].
    #[serde(skip)]
    pub init_lora_weights_string: Option<String>,
}

fn default_init_r() -> usize {
    12
}
fn default_target_r() -> usize {
    8
}
fn default_delta_t() -> usize {
    1
}
fn default_beta() -> f64 {
    0.85
}
fn default_orth() -> f64 {
    0.5
}

/// The `adapter_config.json` fields AdaLoRA adds to LoRA's.
const ADALORA_FIELDS: &[&str] = &[
    "init_r",
    "target_r",
    "tinit",
    "tfinal",
    "deltaT",
    "beta1",
    "beta2",
    "orth_reg_weight",
    "total_step",
    "target_total_rank",
    "rank_pattern",
];

impl AdaLoraConfig {
    /// PEFT's defaults with the given targets and total step count.
    pub fn new(target_modules: ModuleSelector, total_step: usize) -> Self {
        let mut lora = LoraConfig::new(8, 8.0, target_modules);
        lora.peft_type = "ADALORA".into();
        Self {
            lora,
            init_r: default_init_r(),
            target_r: default_target_r(),
            tinit: 0,
            tfinal: 0,
            delta_t: default_delta_t(),
            beta1: default_beta(),
            beta2: default_beta(),
            orth_reg_weight: default_orth(),
            total_step: Some(total_step),
            target_total_rank: None,
            rank_pattern: None,
            grad_clipping: None,
            init_lora_weights_string: None,
        }
    }

    /// Set loralib's `target_total_rank`: the final total number of kept triplets, instead of
    /// `target_r` per matrix.
    pub fn with_target_total_rank(mut self, total: usize) -> Self {
        self.target_total_rank = Some(total);
        self
    }

    /// Tell the allocator the gradient clipping of the optimizer it runs with (the
    /// `GradientClippingConfig` given to e.g. `AdamWConfig::with_grad_clipping`), so its
    /// importance scores see the clipped gradients, as in PEFT when the user clips before
    /// `update_and_allocate`.
    pub fn with_grad_clipping(mut self, clipping: GradientClippingConfig) -> Self {
        self.grad_clipping = Some(clipping);
        self
    }

    /// The final total budget: `target_total_rank` when set, else `target_r · matrices`.
    pub fn target_budget(&self, matrices: usize) -> usize {
        self.target_total_rank.unwrap_or(self.target_r * matrices)
    }

    /// Set `init_r` and `target_r`.
    pub fn with_ranks(mut self, init_r: usize, target_r: usize) -> Self {
        self.init_r = init_r;
        self.target_r = target_r;
        self
    }

    /// Set `tinit`, `tfinal` and `deltaT`.
    pub fn with_schedule(mut self, tinit: usize, tfinal: usize, delta_t: usize) -> Self {
        self.tinit = tinit;
        self.tfinal = tfinal;
        self.delta_t = delta_t;
        self
    }

    /// Set `lora_alpha`.
    pub fn with_alpha(mut self, alpha: f64) -> Self {
        self.lora.lora_alpha = alpha;
        self
    }

    /// Set `orth_reg_weight`.
    pub fn with_orth_reg_weight(mut self, weight: f64) -> Self {
        self.orth_reg_weight = weight;
        self
    }

    /// Set `init_lora_weights` (`true`: identity at start; `false`: random, for tests).
    pub fn with_identity_init(mut self, on: bool) -> Self {
        self.lora.init_lora_weights = if on {
            InitLoraWeights::Default
        } else {
            InitLoraWeights::Random
        };
        self
    }

    /// `T`, once validated.
    pub fn total_steps(&self) -> usize {
        self.total_step.unwrap_or(0)
    }

    /// The scale of every adapter: `lora_alpha / (init_r + 1e-5)` (PEFT's
    /// `scaling / (ranknum + 1e-5)` with `ranknum = init_r`, never changed).
    pub fn scale(&self) -> f64 {
        let alpha = if self.lora.lora_alpha > 0.0 {
            self.lora.lora_alpha
        } else {
            self.init_r as f64
        };
        alpha / (self.init_r as f64 + 1e-5)
    }

    /// Check every field.
    ///
    /// # Errors
    /// The first invalid or unsupported field, with PEFT's rules: `total_step` set and
    /// positive, a budgeting phase (`tinit < total_step - tfinal`), `init_r > 0`,
    /// `deltaT > 0`, betas in (0, 1), `orth_reg_weight >= 0`, no DoRA. What PEFT accepts and
    /// ignores (`use_rslora`, `init_lora_weights` strings, `target_r > init_r`) is valid and
    /// listed by [`PeftConfig::warnings`].
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| {
            Err(PeftError::InvalidConfig {
                field: field.into(),
                reason,
            })
        };
        if self.lora.peft_type != "ADALORA" {
            return invalid(
                "peft_type",
                format!("expected \"ADALORA\", found {:?}", self.lora.peft_type),
            );
        }
        self.lora.validate_fields()?;
        if self.lora.use_dora {
            return Err(PeftError::unsupported_field(
                "use_dora",
                true,
                "AdaLoRA does not support DoRA (as in PEFT)",
            ));
        }
        let Some(total) = self.total_step.filter(|&t| t > 0) else {
            return invalid(
                "total_step",
                "AdaLoRA needs the total number of training steps (a positive integer)".into(),
            );
        };
        if self.tinit + self.tfinal >= total {
            return invalid(
                "tinit",
                format!(
                    "tinit ({}) >= total_step ({total}) - tfinal ({}): no budgeting phase is left",
                    self.tinit, self.tfinal
                ),
            );
        }
        if self.init_r == 0 {
            return invalid("init_r", "must be a positive integer".into());
        }
        if self.delta_t == 0 {
            return invalid("deltaT", "must be a positive integer".into());
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(beta > 0.0 && beta < 1.0) {
                return invalid(field, format!("{beta} is not in (0, 1)"));
            }
        }
        if self.orth_reg_weight.is_nan() || self.orth_reg_weight < 0.0 {
            return invalid(
                "orth_reg_weight",
                format!("{} is negative", self.orth_reg_weight),
            );
        }
        if let Some(pattern) = &self.rank_pattern {
            for (path, mask) in pattern {
                if mask.len() != self.init_r {
                    return invalid(
                        "rank_pattern",
                        format!(
                            "`{path}` has {} entries, init_r is {}",
                            mask.len(),
                            self.init_r
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// The compiled target selection.
    ///
    /// # Errors
    /// Invalid regular expressions or field combinations.
    pub fn target_spec(&self) -> Result<TargetSpec> {
        self.lora.target_spec()
    }

    /// The JSON object PEFT writes (`rank_pattern` keys already mapped to PEFT's `lora_E`
    /// paths by the caller).
    pub(crate) fn to_json_map(
        &self,
        rank_pattern: Option<Map<String, Value>>,
    ) -> Map<String, Value> {
        let mut map = self.lora.to_json_map();
        map.insert("peft_type".into(), Value::from("ADALORA"));
        map.insert("init_r".into(), Value::from(self.init_r));
        map.insert("target_r".into(), Value::from(self.target_r));
        map.insert("tinit".into(), Value::from(self.tinit));
        map.insert("tfinal".into(), Value::from(self.tfinal));
        map.insert("deltaT".into(), Value::from(self.delta_t));
        map.insert("beta1".into(), Value::from(self.beta1));
        map.insert("beta2".into(), Value::from(self.beta2));
        map.insert("orth_reg_weight".into(), Value::from(self.orth_reg_weight));
        map.insert("total_step".into(), Value::from(self.total_step));
        if let Some(total) = self.target_total_rank {
            map.insert("target_total_rank".into(), Value::from(total));
        }
        map.insert(
            "rank_pattern".into(),
            rank_pattern.map_or(Value::Null, Value::Object),
        );
        map
    }

    /// Parse the JSON object of `adapter_config.json`; `rank_pattern` is returned raw (PEFT
    /// paths) for the caller to map.
    pub(crate) fn from_json_map(
        mut map: Map<String, Value>,
    ) -> std::result::Result<(Self, Option<Map<String, Value>>), serde_json::Error> {
        let rank_pattern = match map.remove("rank_pattern") {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        };
        // PEFT tests `if init_lora_weights:`, so any non-empty string is `true` and "" is
        // `false`; the string itself is kept for the warning.
        let mut init_string = None;
        if let Some(Value::String(s)) = map.get("init_lora_weights") {
            init_string = Some(s.clone());
            let truthy = !s.is_empty();
            map.insert("init_lora_weights".into(), Value::Bool(truthy));
        }
        let mut config: Self = serde_json::from_value(Value::Object(map))?;
        config.init_lora_weights_string = init_string;
        // The flattened LoRA part collects every key it does not know, AdaLoRA's included.
        for field in ADALORA_FIELDS {
            config.lora.extra.remove(*field);
        }
        Ok((config, rank_pattern))
    }
}

/// The common fields are LoRA's (`AdaLoraConfig::lora.base`).
impl PeftConfig for AdaLoraConfig {
    fn base(&self) -> &PeftConfigBase {
        &self.lora.base
    }

    fn base_mut(&mut self) -> &mut PeftConfigBase {
        &mut self.lora.base
    }

    fn warnings(&self) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        if self.lora.use_rslora {
            out.push(ConfigWarning::new(
                "use_rslora",
                "ignored, as in PEFT: AdaLoRA scales by lora_alpha / (init_r + 1e-5)",
            ));
        }
        let string = match (&self.init_lora_weights_string, &self.lora.init_lora_weights) {
            (Some(s), _) => Some(s.clone()),
            (None, InitLoraWeights::Gaussian) => Some("gaussian".into()),
            (None, InitLoraWeights::Pissa) => Some("pissa".into()),
            _ => None,
        };
        if let Some(s) = string {
            let meaning = if s.is_empty() {
                "false (A, E, B N(0, 1))"
            } else {
                "true (A, B N(0, 0.02²), E zero)"
            };
            out.push(ConfigWarning::new(
                "init_lora_weights",
                format!("{s:?} is read as {meaning}, as PEFT's AdaLoRA does"),
            ));
        }
        if self.target_total_rank.is_none() && self.target_r > self.init_r {
            out.push(ConfigWarning::new(
                "target_r",
                format!(
                    "target_r ({}) > init_r ({}): the budget never shrinks, no triplet is masked \
                     (PEFT accepts the config and fails at its first masking step)",
                    self.target_r, self.init_r
                ),
            ));
        }
        out
    }
}
