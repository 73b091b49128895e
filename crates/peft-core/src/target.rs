//! Which modules get an adapter: Hugging Face PEFT's matching rules over burn module paths.
//!
//! burn paths are the field names of a model joined by dots, with `Vec` elements as their index
//! (`layers.0.self_attn.q_proj`), which is exactly the key PyTorch's `named_modules()` gives for
//! a model with the same field names. The rules below follow PEFT 0.21.2
//! (`check_target_module_exists`, `get_pattern_key`):
//!
//! * `target_modules` as a list matches a key that equals an entry or ends with `"." + entry`;
//!   entries are not regular expressions.
//! * `target_modules` as a string is a regular expression that must match the whole key, except
//!   `"all-linear"` (any case), which selects every linear layer except the output layer: a
//!   module named `lm_head` (the output embeddings of every causal LM), and with
//!   `task_type = "SEQ_CLS"` the classification heads `classifier` and `score`, as PEFT's
//!   `_maybe_include_all_linear_layers`.
//! * `target_modules` unset: [`default_target_modules`] gives PEFT's per-architecture default
//!   for a model type (LLaMA: `q_proj`, `v_proj`; BERT: `query`, `value`), applied by
//!   [`PeftModel::new_typed`](crate::PeftModel::new_typed) to a model that knows its type
//!   ([`ModelType`]); without one, selection fails with [`PeftError::TargetNotFound`] listing
//!   every candidate.
//! * `exclude_modules` uses the same two forms and wins over `target_modules`.
//! * `modules_to_save` modules never get an adapter.
//! * `layers_to_transform` (list targets only) keeps keys whose first numbered segment, or the
//!   number after `layers_pattern`, is one of the given indices.
//! * `rank_pattern` / `alpha_pattern`: the first key `k`, in insertion order, for which
//!   `(.*\.)?(k)$` matches the module path wins.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{PeftError, Result};

/// The kind of layer an adapter is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayerKind {
    /// A linear layer: `y = x·W + b` with `W` of shape `[d_in, d_out]` in burn.
    Linear,
    /// An embedding table of shape `[num_embeddings, d_model]`.
    Embedding,
}

/// `target_modules` / `exclude_modules`: a list of names or one regular expression.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// One full-match regular expression, or `"all-linear"`.
    Regex(String),
    /// Names matched exactly or as a dot-boundary suffix.
    List(Vec<String>),
}

impl ModuleSelector {
    /// A list selector from names.
    pub fn names<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self::List(names.into_iter().map(Into::into).collect())
    }

    /// A regular-expression selector (must match the whole module path).
    pub fn regex(pattern: impl Into<String>) -> Self {
        Self::Regex(pattern.into())
    }

    /// The `"all-linear"` shorthand.
    pub fn all_linear() -> Self {
        Self::Regex("all-linear".into())
    }

    fn is_all_linear(&self) -> bool {
        matches!(self, Self::Regex(s) if s.eq_ignore_ascii_case("all-linear"))
    }

    fn describe(&self) -> String {
        match self {
            Self::Regex(s) => format!("{s:?}"),
            Self::List(l) => format!("{l:?}"),
        }
    }
}

/// `layers_to_transform`: one index or a list of indices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// A single layer index.
    One(usize),
    /// Several layer indices.
    Many(Vec<usize>),
}

impl LayerIndices {
    fn contains(&self, index: usize) -> bool {
        match self {
            Self::One(i) => *i == index,
            Self::Many(v) => v.contains(&index),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Self::Many(v) if v.is_empty())
    }
}

/// `layers_pattern`: one pattern or several.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// A single pattern, e.g. `"layers"`.
    One(String),
    /// Several patterns, tried in order.
    Many(Vec<String>),
}

impl LayersPattern {
    fn patterns(&self) -> Vec<&str> {
        match self {
            Self::One(s) => vec![s.as_str()],
            Self::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// A module of the model that could take an adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Dotted module path, e.g. `layers.0.self_attn.q_proj`.
    pub path: String,
    /// What kind of layer it is.
    pub kind: LayerKind,
}

/// The target-selection fields of a PEFT config, compiled.
#[derive(Clone, Debug, Default)]
pub struct TargetSpec {
    target: Option<Compiled>,
    exclude: Option<Compiled>,
    modules_to_save: Vec<Regex>,
    layers_to_transform: Option<LayerIndices>,
    layers_pattern: Vec<Regex>,
    described: String,
    seq_cls: bool,
}

#[derive(Clone, Debug)]
enum Compiled {
    AllLinear,
    Regex(Regex),
    List(Vec<String>),
}

impl Compiled {
    fn new(selector: &ModuleSelector) -> Result<Self> {
        Ok(match selector {
            s if s.is_all_linear() => Self::AllLinear,
            ModuleSelector::Regex(p) => Self::Regex(full_match(p)?),
            ModuleSelector::List(l) => Self::List(l.clone()),
        })
    }

    fn matches(&self, candidate: &Candidate) -> bool {
        match self {
            Self::AllLinear => candidate.kind == LayerKind::Linear,
            Self::Regex(r) => r.is_match(&candidate.path),
            Self::List(l) => list_matches(l, &candidate.path),
        }
    }
}

fn list_matches(list: &[String], key: &str) -> bool {
    list.iter().any(|t| {
        key == t
            || key
                .strip_suffix(t.as_str())
                .is_some_and(|head| head.ends_with('.'))
    })
}

fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|source| PeftError::Regex {
        pattern: pattern.to_string(),
        source,
    })
}

pub(crate) fn full_match(pattern: &str) -> Result<Regex> {
    compile(&format!("^(?:{pattern})$"))
}

/// The inputs of [`TargetSpec::new`], as they appear in a PEFT config.
#[derive(Clone, Debug, Default)]
pub struct TargetFields<'a> {
    /// `target_modules`.
    pub target_modules: Option<&'a ModuleSelector>,
    /// `exclude_modules`.
    pub exclude_modules: Option<&'a ModuleSelector>,
    /// `modules_to_save`.
    pub modules_to_save: &'a [String],
    /// `layers_to_transform`.
    pub layers_to_transform: Option<&'a LayerIndices>,
    /// `layers_pattern`.
    pub layers_pattern: Option<&'a LayersPattern>,
    /// `task_type` (`"SEQ_CLS"` keeps the classification head out of `"all-linear"`).
    pub task_type: Option<&'a str>,
}

impl TargetSpec {
    /// Compile the target-selection fields of a config.
    ///
    /// # Errors
    /// A regular expression that does not compile, or `layers_to_transform` /
    /// `layers_pattern` combined with a string `target_modules` (PEFT rejects this too).
    pub fn new(fields: TargetFields<'_>) -> Result<Self> {
        if let Some(ModuleSelector::Regex(_)) = fields.target_modules {
            if fields.layers_to_transform.is_some() {
                return Err(PeftError::InvalidConfig {
                    field: "layers_to_transform".into(),
                    reason: "cannot be used when `target_modules` is a string".into(),
                });
            }
            if fields.layers_pattern.is_some() {
                return Err(PeftError::InvalidConfig {
                    field: "layers_pattern".into(),
                    reason: "cannot be used when `target_modules` is a string".into(),
                });
            }
        }
        if fields.layers_pattern.is_some() && fields.layers_to_transform.is_none() {
            return Err(PeftError::InvalidConfig {
                field: "layers_pattern".into(),
                reason: "requires `layers_to_transform`".into(),
            });
        }
        let layers_pattern = fields
            .layers_pattern
            .map(|p| {
                p.patterns()
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| compile(&format!(r"^(?:|.*?\.){p}\.(\d+)\.")))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok(Self {
            target: fields.target_modules.map(Compiled::new).transpose()?,
            exclude: fields.exclude_modules.map(Compiled::new).transpose()?,
            modules_to_save: fields
                .modules_to_save
                .iter()
                .map(|m| compile(&format!(r"^(?:|.*\.){m}(?:$|\..*)")))
                .collect::<Result<_>>()?,
            layers_to_transform: fields.layers_to_transform.cloned(),
            layers_pattern,
            described: fields
                .target_modules
                .map(ModuleSelector::describe)
                .unwrap_or_else(|| {
                    "None (unset, and no default without the model's type: name the targets, \
                     or attach a `ModelType` model with `PeftModel::new_typed`)"
                        .into()
                }),
            seq_cls: fields.task_type == Some("SEQ_CLS"),
        })
    }

    /// Whether `candidate` gets an adapter.
    pub fn matches(&self, candidate: &Candidate) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(candidate)) {
            return false;
        }
        if self
            .modules_to_save
            .iter()
            .any(|r| r.is_match(&candidate.path))
        {
            return false;
        }
        let Some(target) = &self.target else {
            return false;
        };
        if !target.matches(candidate) || self.is_output_layer(candidate) {
            return false;
        }
        match (&self.layers_to_transform, target) {
            (Some(indices), Compiled::List(_)) if !indices.is_empty() => self
                .layer_index(&candidate.path)
                .is_some_and(|i| indices.contains(i)),
            _ => true,
        }
    }

    /// Whether `"all-linear"` leaves `candidate` out as the model's output layer.
    fn is_output_layer(&self, candidate: &Candidate) -> bool {
        let last = candidate.path.rsplit('.').next().unwrap_or_default();
        matches!(self.target, Some(Compiled::AllLinear))
            && (last == "lm_head" || (self.seq_cls && (last == "classifier" || last == "score")))
    }

    fn layer_index(&self, key: &str) -> Option<usize> {
        let default;
        let patterns: &[Regex] = if self.layers_pattern.is_empty() {
            default = [Regex::new(r"^.*?\.[^.]*\.(\d+)\.").expect("static regex")];
            &default
        } else {
            &self.layers_pattern
        };
        patterns
            .iter()
            .find_map(|r| r.captures(key))
            .and_then(|c| c[1].parse().ok())
    }

    /// The candidates that get an adapter, in the order given.
    ///
    /// # Errors
    /// [`PeftError::TargetNotFound`] when nothing matches, listing every candidate path.
    pub fn select<'c>(&self, candidates: &'c [Candidate]) -> Result<Vec<&'c Candidate>> {
        let selected: Vec<_> = candidates.iter().filter(|c| self.matches(c)).collect();
        if selected.is_empty() {
            return Err(PeftError::TargetNotFound {
                pattern: self.described.clone(),
                available: candidates.iter().map(|c| c.path.clone()).collect(),
            });
        }
        Ok(selected)
    }

    /// Whether `path` is, or is inside, one of `modules_to_save`.
    pub fn is_module_to_save(&self, path: &str) -> bool {
        self.modules_to_save.iter().any(|r| r.is_match(path))
    }
}

/// The key of a `rank_pattern` / `alpha_pattern` map that applies to `path`, if any.
///
/// PEFT's `get_pattern_key`: the first key `k` for which `(.*\.)?(k)$` matches from the start.
///
/// # Errors
/// A key that is not a valid regular expression.
pub fn pattern_key<'k>(
    keys: impl IntoIterator<Item = &'k String>,
    path: &str,
) -> Result<Option<&'k String>> {
    for key in keys {
        if compile(&format!(r"^(?:.*\.)?(?:{key})$"))?.is_match(path) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// A model that knows its architecture: `config.json`'s `model_type`, the key of
/// [`default_target_modules`]. [`PeftModel::new_typed`](crate::PeftModel::new_typed) reads it to
/// fill an unset `target_modules`, as PEFT's `get_peft_model` does (peft-models' LLaMA and
/// BERT implement it; so can any model).
pub trait ModelType {
    /// The model type (`"llama"`, `"bert"`, …), or `None` when unknown.
    fn model_type(&self) -> Option<&str>;
}

/// PEFT's default `target_modules` for a model type (`config.json`'s `model_type`), from its
/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, for the architectures burn-peft's
/// models implement or resemble. `None` for an unknown type: then name the targets.
///
/// [`PeftModel::new_typed`](crate::PeftModel::new_typed) applies it where `target_modules` is
/// unset, for a model that implements [`ModelType`].
pub fn default_target_modules(model_type: &str) -> Option<ModuleSelector> {
    let names: &[&str] = match model_type {
        "llama" | "mistral" | "mixtral" | "qwen2" | "qwen3" | "gemma" | "gemma2" | "phi3"
        | "smollm" | "olmo" => &["q_proj", "v_proj"],
        "bert" | "roberta" | "xlm-roberta" | "electra" | "deberta" | "deberta-v2" => {
            &["query", "value"]
        }
        "distilbert" => &["q_lin", "v_lin"],
        "gpt2" => &["c_attn"],
        "t5" | "mt5" => &["q", "v"],
        _ => return None,
    };
    Some(ModuleSelector::names(names.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(path: &str) -> Candidate {
        Candidate {
            path: path.into(),
            kind: LayerKind::Linear,
        }
    }

    fn spec(target: ModuleSelector) -> TargetSpec {
        TargetSpec::new(TargetFields {
            target_modules: Some(&target),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn list_entries_match_whole_segments_only() {
        let s = spec(ModuleSelector::names(["q_proj", "mlp.up"]));
        assert!(s.matches(&lin("layers.0.attn.q_proj")));
        assert!(s.matches(&lin("q_proj")));
        assert!(s.matches(&lin("layers.1.mlp.up")));
        assert!(!s.matches(&lin("layers.0.attn.xq_proj")));
        assert!(!s.matches(&lin("layers.0.attn.q_proj.inner")));
        assert!(!s.matches(&lin("layers.1.mlpx.up")));
    }

    #[test]
    fn string_target_is_a_full_match_regex() {
        let s = spec(ModuleSelector::regex(r".*\.(q|v)_proj"));
        assert!(s.matches(&lin("layers.0.attn.q_proj")));
        assert!(!s.matches(&lin("layers.0.attn.q_proj2")));
        assert!(!s.matches(&lin("q_proj")));
    }

    #[test]
    fn all_linear_leaves_the_output_layer_out() {
        let all = ModuleSelector::all_linear();
        let s = spec(all.clone());
        assert!(s.matches(&lin("model.layers.0.mlp.down_proj")));
        assert!(!s.matches(&lin("lm_head")));
        assert!(s.matches(&lin("classifier")));
        let cls = TargetSpec::new(TargetFields {
            target_modules: Some(&all),
            task_type: Some("SEQ_CLS"),
            ..Default::default()
        })
        .unwrap();
        assert!(!cls.matches(&lin("classifier")) && !cls.matches(&lin("score")));
        assert!(cls.matches(&lin("bert.encoder.layer.0.attention.self.query")));
    }

    #[test]
    fn default_targets_follow_peft_mapping() {
        assert_eq!(
            default_target_modules("llama"),
            Some(ModuleSelector::names(["q_proj", "v_proj"]))
        );
        assert_eq!(
            default_target_modules("bert"),
            Some(ModuleSelector::names(["query", "value"]))
        );
        assert_eq!(default_target_modules("my-own-model"), None);
        // Unset targets select nothing; the error lists every candidate.
        let s = TargetSpec::new(TargetFields::default()).unwrap();
        match s.select(&[lin("a.q"), lin("a.v")]) {
            Err(PeftError::TargetNotFound { available, .. }) => {
                assert_eq!(available, ["a.q", "a.v"])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn all_linear_selects_linear_layers_only() {
        let s = spec(ModuleSelector::regex("ALL-LINEAR"));
        assert!(s.matches(&lin("a.b")));
        assert!(!s.matches(&Candidate {
            path: "emb".into(),
            kind: LayerKind::Embedding
        }));
    }

    #[test]
    fn exclude_and_modules_to_save_win() {
        let target = ModuleSelector::names(["proj"]);
        let exclude = ModuleSelector::names(["layers.0.proj"]);
        let mts = vec!["head".to_string()];
        let s = TargetSpec::new(TargetFields {
            target_modules: Some(&target),
            exclude_modules: Some(&exclude),
            modules_to_save: &mts,
            ..Default::default()
        })
        .unwrap();
        assert!(!s.matches(&lin("layers.0.proj")));
        assert!(s.matches(&lin("layers.1.proj")));
        assert!(!s.matches(&lin("head.proj")));
        assert!(s.is_module_to_save("head"));
        assert!(s.is_module_to_save("x.head.weight"));
        assert!(!s.is_module_to_save("xhead"));
    }

    #[test]
    fn layers_to_transform_follows_peft_index_rules() {
        let target = ModuleSelector::names(["q"]);
        let idx = LayerIndices::Many(vec![1]);
        let without_pattern = TargetSpec::new(TargetFields {
            target_modules: Some(&target),
            layers_to_transform: Some(&idx),
            ..Default::default()
        })
        .unwrap();
        // PEFT's default regex needs a segment before the numbered one.
        assert!(without_pattern.matches(&lin("model.layers.1.q")));
        assert!(!without_pattern.matches(&lin("model.layers.0.q")));
        assert!(!without_pattern.matches(&lin("layers.1.q")));
        let pattern = LayersPattern::One("layers".into());
        let with_pattern = TargetSpec::new(TargetFields {
            target_modules: Some(&target),
            layers_to_transform: Some(&idx),
            layers_pattern: Some(&pattern),
            ..Default::default()
        })
        .unwrap();
        assert!(with_pattern.matches(&lin("layers.1.q")));
        assert!(with_pattern.matches(&lin("model.layers.1.q")));
        assert!(!with_pattern.matches(&lin("model.blocks.1.q")));
    }

    #[test]
    fn string_target_rejects_layer_selection() {
        let target = ModuleSelector::regex(".*");
        let idx = LayerIndices::One(0);
        let err = TargetSpec::new(TargetFields {
            target_modules: Some(&target),
            layers_to_transform: Some(&idx),
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            matches!(err, PeftError::InvalidConfig { ref field, .. } if field == "layers_to_transform")
        );
    }

    #[test]
    fn no_match_lists_available_paths() {
        let s = spec(ModuleSelector::names(["nope"]));
        let err = s.select(&[lin("a.q"), lin("b.v")]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("a.q") && msg.contains("b.v") && msg.contains("nope"),
            "{msg}"
        );
    }

    #[test]
    fn pattern_key_takes_first_match_in_order() {
        let keys = vec!["v_proj".to_string(), "layers.1.attn.v_proj".to_string()];
        assert_eq!(
            pattern_key(&keys, "layers.1.attn.v_proj").unwrap(),
            Some(&keys[0])
        );
        let keys = vec!["layers.1.attn.q_proj".to_string()];
        assert_eq!(
            pattern_key(&keys, "layers.1.attn.q_proj").unwrap(),
            Some(&keys[0])
        );
        assert_eq!(pattern_key(&keys, "layers.0.attn.q_proj").unwrap(), None);
        // A `^` anchor never matches after the optional prefix group (PEFT #3582), like PEFT.
        let keys = vec!["^layers.1.attn.q_proj".to_string()];
        assert_eq!(pattern_key(&keys, "x.layers.1.attn.q_proj").unwrap(), None);
    }
}
