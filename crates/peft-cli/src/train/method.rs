//! From `[method]` to a model to train: the only per-method code of `burn-peft train`, which
//! builds the method's config and wraps the model; everything else runs through
//! [`crate::train::run::train_model`], the same for every method.
//!
//! Adapter methods read their fields under PEFT's `adapter_config.json` names (a key the
//! config does not have is an error naming the key and the run file). `dora` is LoRA with
//! `use_dora = true`; `spa` is RoSA with `r = 0` and `schedule = "spa_only"`; AdaLoRA's
//! `total_step` defaults to `[train] steps`.

use std::path::Path;

use anyhow::{Context, bail};
use burn::nn::Linear;
use burn::tensor::Device;
use peft_core::hf::KeyMap;
use peft_core::{Method, PeftLinear, PeftModel};
use serde::Deserialize;
use serde_json::{Map, Value};

use peft_models::BaseFormat;

use crate::model::{self, ModelSource};
use crate::train::run::{Full, Job, Selective};

/// Build the model of `[method]` and run `job` on it.
///
/// # Errors
/// An invalid `[method]` table (named with `file`), model loading errors, and the job's.
pub fn dispatch<J: Job>(
    table: &toml::Table,
    file: &Path,
    steps: usize,
    source: (&ModelSource, BaseFormat),
    device: &Device,
    job: J,
) -> anyhow::Result<J::Output> {
    let name = table
        .get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or_default();
    let base = source.1;
    if base.is_packed() && matches!(name, "id3" | "pafi" | "bitfit" | "full") {
        bail!(
            "{}: [method] `{name}` updates base weights, which `[model] base = \"{base}\"` \
             keeps packed and frozen; use base = \"f32\", or an adapter method (lora, dora, \
             adalora, rosa, spa, sft) over the packed base",
            file.display()
        );
    }
    let mut fields = table.clone();
    fields.remove("name");
    match name {
        "lora" | "dora" => {
            if name == "dora" {
                fields
                    .entry("use_dora")
                    .or_insert(toml::Value::Boolean(true));
            }
            adapter::<peft_lora::LoraConfig, J>(fields, file, source, device, job)
        }
        "adalora" => {
            fields
                .entry("total_step")
                .or_insert(toml::Value::Integer(steps as i64));
            adapter::<peft_adalora::AdaLoraConfig, J>(fields, file, source, device, job)
        }
        "rosa" | "spa" => {
            if name == "spa" {
                fields.entry("r").or_insert(toml::Value::Integer(0));
                fields
                    .entry("schedule")
                    .or_insert(toml::Value::String("spa_only".into()));
            }
            adapter::<peft_rosa::RosaConfig, J>(fields, file, source, device, job)
        }
        "sft" => adapter::<peft_sft::SftConfig, J>(fields, file, source, device, job),
        "id3" | "pafi" | "bitfit" => {
            let config = selective_config(name, fields, file, steps)?;
            let model = load::<Linear>(source, device)?;
            let model = peft_core::hosts::set_trainable(model, |_| Some(true));
            job.run(Selective::new(model, config))
        }
        "full" => {
            if let Some(key) = fields.keys().next() {
                bail!(
                    "{}: [method] `{key}` is not a field of method `full` (it has none)",
                    file.display()
                );
            }
            let model = load::<Linear>(source, device)?;
            job.run(Full(peft_core::hosts::set_trainable(model, |_| Some(true))))
        }
        other => bail!(
            "{}: [method] name `{other}` is not a method",
            file.display()
        ),
    }
}

fn load<L: peft_models::LinearLayer>(
    (source, base): (&ModelSource, BaseFormat),
    device: &Device,
) -> anyhow::Result<peft_models::llama::Llama<L>> {
    Ok(model::load_llama::<L>(source, base, device)?.0)
}

/// The config of adapter method `C` from the `[method]` fields (without `name`), then the
/// model with it attached (PEFT's default LLaMA targets when `target_modules` is not given).
fn adapter<C: Method, J: Job>(
    fields: toml::Table,
    file: &Path,
    source: (&ModelSource, BaseFormat),
    device: &Device,
    job: J,
) -> anyhow::Result<J::Output> {
    let config = method_config::<C>(fields, file)?;
    let model = load::<PeftLinear<C::Adapter>>(source, device)?;
    let peft = PeftModel::new_typed(model, config)
        .with_context(|| format!("attaching the [method] of {}", file.display()))?;
    job.run(peft)
}

/// Method `C`'s config from `fields`: every key must be one of the config's fields.
///
/// # Errors
/// An unknown key, a value of the wrong type or an invalid value, named with `file`.
pub fn method_config<C: Method>(fields: toml::Table, file: &Path) -> anyhow::Result<C> {
    let where_ = format!("{} [method]", file.display());
    let Value::Object(mut map) = serde_json::to_value(&fields)? else {
        unreachable!("a TOML table is an object")
    };
    if let Some(Value::String(t)) = map.get("peft_type")
        && t != C::PEFT_TYPE
    {
        bail!("{where_}: peft_type `{t}` does not match the method");
    }
    map.insert("peft_type".into(), Value::from(C::PEFT_TYPE));
    let known = known_fields::<C>(&map);
    if let Some(known) = known
        && let Some(key) = map.keys().find(|k| !known.contains(*k))
    {
        bail!(
            "{where_}: unknown key `{key}` (not a field of {} configs)",
            C::PEFT_TYPE
        );
    }
    let config = C::from_json(map, Path::new(&where_), &KeyMap::default())
        .map_err(|e| anyhow::anyhow!("{where_}: {e}"))?;
    for warning in config.warnings() {
        eprintln!("warning: {where_}: {warning}");
    }
    Ok(config)
}

/// The fields a config of method `C` writes (its known keys), from a config built of the
/// required fields in `map` alone; `None` when that config does not build.
fn known_fields<C: Method>(map: &Map<String, Value>) -> Option<Vec<String>> {
    let mut minimal = Map::new();
    for key in ["peft_type", "total_step"] {
        if let Some(v) = map.get(key) {
            minimal.insert(key.into(), v.clone());
        }
    }
    let config = C::from_json(minimal, Path::new(""), &KeyMap::default()).ok()?;
    let mut keys: Vec<String> = config.to_json(&KeyMap::default()).keys().cloned().collect();
    // Written only when set.
    keys.extend(["rank_pattern", "alpha_pattern"].map(String::from));
    if C::PEFT_TYPE == "ADALORA" {
        keys.push("target_total_rank".into());
    }
    Some(keys)
}

/// The fields of `[method]` for the selective methods.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectiveFields {
    budget: Option<usize>,
    max_steps: Option<usize>,
    exp: Option<f64>,
    eps: Option<f64>,
    bias_only: Option<bool>,
    /// The earlier name, kept for run files that have it: `all_1d = false` is
    /// `bias_only = true`; `all_1d = true` is the default now.
    all_1d: Option<bool>,
    decay_chosen: Option<bool>,
}

fn selective_config(
    name: &str,
    fields: toml::Table,
    file: &Path,
    steps: usize,
) -> anyhow::Result<peft_selective::SelectiveConfig> {
    use peft_selective::SelectiveConfig;
    let f: SelectiveFields = fields
        .try_into()
        .map_err(|e| anyhow::anyhow!("{} [method]: {e}", file.display()))?;
    let need_budget = || {
        f.budget.with_context(|| {
            format!(
                "{} [method]: `budget` (the number of entries to train) is required for {name}",
                file.display()
            )
        })
    };
    let mut config = match name {
        "id3" => SelectiveConfig::id3(need_budget()?, f.max_steps.unwrap_or(steps)),
        "pafi" => SelectiveConfig::pafi(need_budget()?),
        _ => {
            let mut c = SelectiveConfig::bitfit();
            if let Some(b) = f.budget {
                c = c.with_budget(b);
            }
            c
        }
    };
    if let Some(exp) = f.exp {
        config = config.with_exp(exp);
    }
    if let Some(eps) = f.eps {
        config = config.with_eps(eps);
    }
    let bias_only = match (f.bias_only, f.all_1d) {
        (Some(b), Some(a)) if b == a => bail!(
            "{} [method]: `bias_only = {b}` and `all_1d = {a}` contradict each other",
            file.display()
        ),
        (Some(b), _) => Some(b),
        (None, a) => a.map(|all| !all),
    };
    if let Some(bias_only) = bias_only {
        config = config.with_bias_only(bias_only);
    }
    if let Some(on) = f.decay_chosen {
        config = config.with_decay_chosen(on);
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{} [method]: {e}", file.display()))?;
    Ok(config)
}
