//! A LLaMA-architecture decoder (Hugging Face `LlamaForCausalLM`) whose module paths are Hugging
//! Face's: `model.embed_tokens`, `model.layers.N.self_attn.{q_proj,k_proj,v_proj,o_proj}`,
//! `model.layers.N.mlp.{gate_proj,up_proj,down_proj}`, `model.layers.N.input_layernorm`,
//! `model.layers.N.post_attention_layernorm`, `model.norm` and `lm_head`, so PEFT
//! `target_modules` such as `["q_proj", "v_proj"]` and adapters saved by Python PEFT apply
//! unchanged.
//!
//! The model is RMSNorm pre-norm blocks, rotary position embeddings (Hugging Face's
//! `rotate_half` convention), grouped-query attention (key/value heads repeated to the query
//! heads), a SwiGLU MLP and a tied or untied LM head.
//!
//! ```
//! use std::path::Path;
//!
//! use burn::tensor::{Device, Int, Tensor};
//! use peft_core::PeftLinear;
//! use peft_lora::{LoadOptions, LoraAdapter, LoraModel};
//! use peft_models::llama::Llama;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::flex();
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama/untied");
//! let (llama, config) = Llama::<PeftLinear<LoraAdapter>>::from_pretrained(&dir, &device)?;
//! // A LoRA adapter on ["q_proj", "v_proj"] saved by Python PEFT.
//! let lora = LoraModel::from_pretrained(llama, &dir.join("lora_qv"), &LoadOptions::default())?;
//! let ids = Tensor::<2, Int>::from_ints([[1, 5, 9, 2]], &device);
//! let logits = lora.model().forward(ids, None);
//! assert_eq!(logits.dims(), [1, 4, config.vocab_size]);
//! # Ok(()) }
//! ```

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, LinearConfig};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::ModelType;
use serde::Deserialize;
use serde_json::Value;

use peft_kernels::cross_entropy::HeadWeight;
use peft_kernels::packed_linear::{PackedWeight, packed_linear};

use crate::checkpoint::{Checkpoint, read_config};
use crate::error::{ModelError, Result};
use crate::layers::{BaseFormat, LinearLayer, RmsNorm, packed_lookup};
use crate::loss::causal_lm_loss_from_hidden;
use peft_kernels::{causal_attention, swiglu};

/// A validated LLaMA configuration, read from a Hugging Face `config.json`
/// ([`LlamaConfig::from_dir`]) or built in code ([`LlamaConfig::new`]).
///
/// `config.json` is read as Transformers 4 and 5 write it: the rotary parameters are a non-empty
/// `rope_scaling` (the older name, which Transformers 5 still prefers when present), else
/// `rope_parameters`; the rotary base is their `rope_theta`, else the top-level `rope_theta`,
/// else 10000. The `default`, `linear` and `llama3` rotary types are supported ([`RopeScaling`]);
/// other types (`dynamic`, `yarn`, `longrope`, ...) and `partial_rotary_factor` ≠ 1 are refused.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key/value heads per layer (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Size of one head (`hidden_size / num_attention_heads` unless the config says otherwise).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding base.
    pub rope_theta: f64,
    /// Rotary frequency scaling (`rope_type` `linear` or `llama3`), none by default.
    pub rope_scaling: RopeScaling,
    /// Context length the model was trained for: the default context limit of generation
    /// ([`crate::generate::GenerationConfig::max_context`]).
    pub max_position_embeddings: usize,
    /// Whether the LM head is the transposed token embedding.
    pub tie_word_embeddings: bool,
    /// Whether the attention projections have biases.
    pub attention_bias: bool,
    /// Whether the MLP projections have biases.
    pub mlp_bias: bool,
}

/// `config.json` as written on disk (the fields this model reads).
#[derive(Deserialize)]
struct WireConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    partial_rotary_factor: Option<f64>,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_positions() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

const DEFAULT_THETA: f64 = 10000.0;

/// The rotary frequency scaling of a LLaMA model, as Transformers' `modeling_rope_utils.py`
/// computes it from `rope_parameters` (or `rope_scaling`).
#[derive(Clone, Debug, Default, PartialEq)]
pub enum RopeScaling {
    /// `rope_type` `default`: `inv_freq[i] = 1 / theta^(2i / head_dim)`.
    #[default]
    None,
    /// `rope_type` `linear`: every inverse frequency divided by `factor` (positions
    /// interpolated).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// `rope_type` `llama3` (Llama 3.1): long wavelengths divided by `factor`, short ones kept,
    /// the ones between interpolated smoothly.
    Llama3 {
        /// The divisor of the long wavelengths.
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The context length of pre-training.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The inverse frequencies `[head_dim / 2]` for rotary base `theta`, computed in f32 in the
    /// order of Transformers' `_compute_default_rope_parameters`,
    /// `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters`.
    pub fn inv_freq(&self, theta: f64, head_dim: usize) -> Vec<f32> {
        let base =
            (0..head_dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32));
        match *self {
            Self::None => base.collect(),
            Self::Linear { factor } => base.map(|f| f / factor as f32).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let factor = factor as f32;
                base.map(|f| {
                    let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled
                    } else {
                        let smooth = (old as f32 / wavelen - low_freq_factor as f32)
                            / (high_freq_factor - low_freq_factor) as f32;
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    }
                })
                .collect()
            }
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("rope scaling `{name}` {v} must be positive"))
            }
        };
        match *self {
            Self::None => Ok(()),
            Self::Linear { factor } => positive("factor", factor),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                positive(
                    "original_max_position_embeddings",
                    original_max_position_embeddings as f64,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope scaling high_freq_factor {high_freq_factor} must exceed \
                         low_freq_factor {low_freq_factor}"
                    ));
                }
                Ok(())
            }
        }
    }
}

impl WireConfig {
    /// The rotary base and scaling, refusing the rotary variants not implemented here.
    fn rope(&self) -> std::result::Result<(f64, RopeScaling), String> {
        if let Some(f) = self.partial_rotary_factor
            && f != 1.0
        {
            return Err(format!(
                "partial_rotary_factor {f} is not supported (only 1.0)"
            ));
        }
        let present = |v: &Option<Value>| {
            v.as_ref()
                .filter(|v| !v.is_null() && v.as_object().is_none_or(|m| !m.is_empty()))
                .cloned()
        };
        // Transformers 5 (`RotaryEmbeddingConfigMixin`): `rope_scaling or rope_parameters`.
        let (field, params) = match (present(&self.rope_scaling), present(&self.rope_parameters)) {
            (Some(p), _) => ("rope_scaling", p),
            (None, Some(p)) => ("rope_parameters", p),
            (None, None) => {
                return Ok((self.rope_theta.unwrap_or(DEFAULT_THETA), RopeScaling::None));
            }
        };
        let Some(map) = params.as_object() else {
            return Err(format!("`{field}` must be an object, found {params}"));
        };
        let kind = map
            .get("rope_type")
            .or_else(|| map.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if let Some(f) = map.get("partial_rotary_factor").and_then(Value::as_f64)
            && f != 1.0
        {
            return Err(format!(
                "{field}.partial_rotary_factor {f} is not supported (only 1.0)"
            ));
        }
        let theta = match map.get("rope_theta").filter(|t| !t.is_null()) {
            Some(t) => t
                .as_f64()
                .ok_or_else(|| format!("{field}.rope_theta must be a number, found {t}"))?,
            None => self.rope_theta.unwrap_or(DEFAULT_THETA),
        };
        let number = |key: &str| {
            map.get(key).and_then(Value::as_f64).ok_or_else(|| {
                format!("{field}.{key} (a number) is required for rope_type `{kind}`")
            })
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "llama3" => {
                // As `standardize_rope_params`: a top-level value wins, else the one in the
                // parameters, else `max_position_embeddings`.
                let original = match self.original_max_position_embeddings {
                    Some(n) => n,
                    None => match map.get("original_max_position_embeddings") {
                        Some(v) => v.as_u64().ok_or_else(|| {
                            format!(
                                "{field}.original_max_position_embeddings must be a positive \
                                 integer, found {v}"
                            )
                        })? as usize,
                        None => self.max_position_embeddings,
                    },
                };
                RopeScaling::Llama3 {
                    factor: number("factor")?,
                    low_freq_factor: number("low_freq_factor")?,
                    high_freq_factor: number("high_freq_factor")?,
                    original_max_position_embeddings: original,
                }
            }
            other => {
                return Err(format!(
                    "{field}.rope_type `{other}` is not supported (`default`, `linear` and \
                     `llama3` are)"
                ));
            }
        };
        Ok((theta, scaling))
    }

    fn resolve(self) -> std::result::Result<LlamaConfig, String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (silu)",
                self.hidden_act
            ));
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        let heads = self.num_attention_heads;
        if heads == 0 {
            return Err("num_attention_heads must be positive".into());
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(heads) => self.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size {} is not a multiple of num_attention_heads {heads} (and no \
                     head_dim is given)",
                    self.hidden_size
                ));
            }
        };
        let config = LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
        };
        config.check()?;
        Ok(config)
    }
}

impl LlamaConfig {
    /// A configuration with the given sizes: multi-head attention (as many key/value heads as
    /// query heads), `head_dim = hidden_size / num_attention_heads`, eps 1e-6, rotary base 10000
    /// without scaling, 2048 positions, untied head, no biases. Adjust the public fields as
    /// needed.
    pub fn new(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: num_attention_heads,
            head_dim: hidden_size / num_attention_heads.max(1),
            rms_norm_eps: default_eps(),
            rope_theta: DEFAULT_THETA,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: default_positions(),
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
        }
    }

    /// Read `config.json` from a model folder and check it.
    ///
    /// # Errors
    /// [`ModelError::NotFound`] for a missing file; [`ModelError::Config`] for invalid JSON, an
    /// activation other than `silu`, an unsupported rotary embedding, or inconsistent sizes.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let file = dir.join("config.json");
        let wire: WireConfig = read_config(dir)?;
        wire.resolve()
            .map_err(|message| ModelError::Config { file, message })
    }

    /// Parse the text of a `config.json` and check it; `file` only names it in errors.
    ///
    /// # Errors
    /// As [`LlamaConfig::from_dir`], without the missing-file case.
    pub fn from_json(text: &str, file: &Path) -> Result<Self> {
        let fail = |message: String| ModelError::Config {
            file: file.into(),
            message,
        };
        let wire: WireConfig = serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
        wire.resolve().map_err(fail)
    }

    /// Check the sizes fit together.
    fn check(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        self.rope_scaling.check()
    }
}

/// Self-attention with rotary embeddings and grouped-query attention
/// (`model.layers.N.self_attn`).
#[derive(Module, Debug)]
pub struct LlamaAttention<L: LinearLayer> {
    /// `hidden -> heads · head_dim`.
    pub q_proj: L,
    /// `hidden -> kv_heads · head_dim`.
    pub k_proj: L,
    /// `hidden -> kv_heads · head_dim`.
    pub v_proj: L,
    /// `heads · head_dim -> hidden`.
    pub o_proj: L,
    /// Query heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Key/value heads.
    #[module(skip)]
    pub num_kv_heads: usize,
    /// Size of one head.
    #[module(skip)]
    pub head_dim: usize,
}

/// The rotary tables of a run of positions: `cos` and `sin`, `[1, 1, seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct Rotary {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rotary {
    /// The tables for positions `0..seq` as Hugging Face's `LlamaRotaryEmbedding` computes them
    /// (in f32) without scaling: `inv_freq[i] = 1 / theta^(2i / head_dim)`, angles
    /// `pos · inv_freq` repeated over both halves of the head.
    pub fn new(seq: usize, head_dim: usize, theta: f64, device: &Device) -> Self {
        Self::from_inv_freq(&RopeScaling::None.inv_freq(theta, head_dim), 0, seq, device)
    }

    /// The tables for positions `start..start + seq` from inverse frequencies `[head_dim / 2]`
    /// (see [`RopeScaling::inv_freq`]).
    pub fn from_inv_freq(inv_freq: &[f32], start: usize, seq: usize, device: &Device) -> Self {
        let head_dim = 2 * inv_freq.len();
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for pos in start..start + seq {
            // Both halves of the head use the same angles (`cat(freqs, freqs)`).
            for _ in 0..2 {
                for f in inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |v: Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v, [seq, head_dim]), device)
                .reshape([1, 1, seq, head_dim])
        };
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    /// The number of positions.
    pub fn len(&self) -> usize {
        self.cos.dims()[2]
    }

    /// Whether the tables cover no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tables of positions `start..start + len` of these tables (views, no copy).
    ///
    /// # Panics
    /// If the range is outside the tables.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        Self {
            cos: self.cos.clone().narrow(2, start, len),
            sin: self.sin.clone().narrow(2, start, len),
        }
    }

    /// Rotate `x` `[batch, heads, seq, head_dim]`: `x · cos + rotate_half(x) · sin`, where
    /// `rotate_half([x1, x2]) = [-x2, x1]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, seq, d] = self.cos.dims();
        let table = |t: &Tensor<4>| t.clone().reshape([seq, d]);
        peft_kernels::rotary(x, table(&self.cos), table(&self.sin))
    }
}

/// The keys and values of earlier positions, for decoding one token at a time without running
/// the whole sequence again.
///
/// Each layer keeps `[batch, kv_heads, capacity, head_dim]` keys (after rotary) and values,
/// allocated once for the whole capacity and written in place position by position (grouped
/// -query attention keeps the key/value heads, never the repeated query heads). The rotary
/// tables of every position up to the capacity are computed once too. Make one with
/// [`Llama::new_cache`]; [`Llama::forward_cached`] appends to it.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Option<Tensor<4>>>,
    values: Vec<Option<Tensor<4>>>,
    rotary: Rotary,
    len: usize,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl KvCache {
    /// The number of positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of positions the cache can hold.
    pub fn capacity(&self) -> usize {
        self.rotary.len()
    }

    /// The batch size the cache was made for.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Forget every position (the buffers are kept for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Write `k`, `v` `[batch, kv_heads, n, head_dim]` of layer `layer` at positions
    /// `len..len + n` and return that layer's keys and values of positions `0..len + n`.
    fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let n = k.dims()[2];
        let (start, end) = (self.len, self.len + n);
        let ranges = [
            0..self.batch,
            0..self.kv_heads,
            start..end,
            0..self.head_dim,
        ];
        let write = |slot: &mut Option<Tensor<4>>, x: Tensor<4>| {
            // The buffer is uniquely owned here, so the write happens in place.
            let buffer = slot
                .take()
                .expect("a cache buffer is put back after each write")
                .slice_assign(ranges.clone(), x);
            let prefix = buffer.clone().narrow(2, 0, end);
            *slot = Some(buffer);
            prefix
        };
        let keys = write(&mut self.keys[layer], k);
        let values = write(&mut self.values[layer], v);
        (keys, values)
    }
}

impl<L: LinearLayer> LlamaAttention<L> {
    /// Causal attention of `x` `[batch, seq, hidden]` over itself. `padding` `[batch, seq]` is
    /// `true` at padding keys; those keys are masked for every query.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rotary: &Rotary,
        padding: Option<&Tensor<2, burn::tensor::Bool>>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let (heads, kv_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let split = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, d]).swap_dims(1, 2);
        let q = rotary.apply(split(self.q_proj.forward(x.clone()), heads));
        let k = rotary.apply(split(self.k_proj.forward(x.clone()), kv_heads));
        let v = split(self.v_proj.forward(x), kv_heads);
        // Hugging Face's `repeat_kv`: query head h reads key/value head h / (heads / kv_heads).
        let repeat = |t: Tensor<4>| {
            if kv_heads == heads {
                t
            } else {
                t.unsqueeze_dim::<5>(2)
                    .expand([batch, kv_heads, heads / kv_heads, seq, d])
                    .reshape([batch, heads, seq, d])
            }
        };
        let context = causal_attention(q, repeat(k), repeat(v), padding.cloned());
        self.o_proj
            .forward(context.swap_dims(1, 2).reshape([batch, seq, heads * d]))
    }

    /// Causal attention of the `n` new positions `x` `[batch, n, hidden]` over the cached ones
    /// and themselves; `rotary` holds the tables of the new positions. The new keys and values
    /// are appended to layer `layer` of `cache` (whose length is not advanced here).
    ///
    /// The query heads sharing a key/value head are stacked as rows of one product
    /// (`[batch, kv_heads, group · n, head_dim]` against `[batch, kv_heads, len, head_dim]`), so
    /// the cached keys and values are never repeated.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        rotary: &Rotary,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let [batch, n, _] = x.dims();
        let (heads, kv_heads, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let group = heads / kv_heads;
        let split = |t: Tensor<3>, h: usize| t.reshape([batch, n, h, d]).swap_dims(1, 2);
        let q = rotary.apply(split(self.q_proj.forward(x.clone()), heads));
        let k = rotary.apply(split(self.k_proj.forward(x.clone()), kv_heads));
        let v = split(self.v_proj.forward(x), kv_heads);
        let offset = cache.len;
        let (keys, values) = cache.append(layer, k, v);
        let total = offset + n;
        let q = q.reshape([batch, kv_heads, group * n, d]) * (1.0 / (d as f64).sqrt());
        let mut scores = q.matmul(keys.swap_dims(2, 3));
        if n > 1 {
            // Row r of a group is query position offset + r % n; it sees keys 0..=that.
            let mask: Vec<bool> = (0..group * n)
                .flat_map(|r| (0..total).map(move |j| j > offset + r % n))
                .collect();
            let mask = Tensor::<2, burn::tensor::Bool>::from_data(
                TensorData::new(mask, [group * n, total]),
                &scores.device(),
            )
            .reshape([1, 1, group * n, total])
            .expand([batch, kv_heads, group * n, total]);
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        let context = softmax(scores, 3).matmul(values);
        self.o_proj.forward(
            context
                .reshape([batch, heads, n, d])
                .swap_dims(1, 2)
                .reshape([batch, n, heads * d]),
        )
    }
}

/// The SwiGLU MLP (`model.layers.N.mlp`): `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp<L: LinearLayer> {
    /// `hidden -> intermediate`, activated.
    pub gate_proj: L,
    /// `hidden -> intermediate`.
    pub up_proj: L,
    /// `intermediate -> hidden`.
    pub down_proj: L,
}

impl<L: LinearLayer> LlamaMlp<L> {
    /// Apply the MLP to `[..., hidden]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = self.gate_proj.forward(x.clone());
        self.down_proj
            .forward(swiglu(gate, self.up_proj.forward(x)))
    }
}

/// One pre-norm decoder layer (`model.layers.N`).
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<L: LinearLayer> {
    /// Attention.
    pub self_attn: LlamaAttention<L>,
    /// MLP.
    pub mlp: LlamaMlp<L>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl<L: LinearLayer> LlamaDecoderLayer<L> {
    /// `h = x + attn(norm(x))`, then `h + mlp(norm(h))`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rotary: &Rotary,
        padding: Option<&Tensor<2, burn::tensor::Bool>>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rotary, padding);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }

    /// As [`LlamaDecoderLayer::forward`] for new positions attending to the cache (see
    /// [`LlamaAttention::forward_cached`]).
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        rotary: &Rotary,
        cache: &mut KvCache,
        layer: usize,
    ) -> Tensor<3> {
        let attn = self.self_attn.forward_cached(
            self.input_layernorm.forward(x.clone()),
            rotary,
            cache,
            layer,
        );
        let h = x + attn;
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// Hugging Face's `LlamaModel`: embeddings, decoder layers and the final norm (`model`).
#[derive(Module, Debug)]
pub struct LlamaModel<L: LinearLayer> {
    /// Token embeddings `[vocab, hidden]` (an empty `[0, hidden]` placeholder when the table is
    /// held packed in `packed_embed`).
    pub embed_tokens: Embedding,
    /// The token table `[vocab, hidden]` held packed (a packed [`BaseFormat`]; frozen), read
    /// row by row for lookups and in place by a tied LM head.
    #[module(skip)]
    pub packed_embed: Option<PackedWeight>,
    /// The decoder layers.
    pub layers: Vec<LlamaDecoderLayer<L>>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Rotary embedding base.
    #[module(skip)]
    pub rope_theta: f64,
    /// Rotary frequency scaling.
    #[module(skip)]
    pub rope_scaling: RopeScaling,
    /// The context length the model was trained for (the default context of generation).
    #[module(skip)]
    pub max_position_embeddings: usize,
}

impl<L: LinearLayer> LlamaModel<L> {
    /// The normalised last hidden state `[batch, seq, hidden]` for `input_ids` `[batch, seq]`
    /// and an optional `attention_mask` `[batch, seq]` (1 for tokens, 0 for padding). Positions
    /// are `0..seq` for every row, as in Hugging Face without `position_ids`.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        let (rotary, padding) = self.layer_inputs(&input_ids, attention_mask);
        let mut x = self.embed(input_ids);
        for layer in &self.layers {
            x = layer.forward(x, &rotary, padding.as_ref());
        }
        self.norm.forward(x)
    }

    /// What every decoder layer takes besides its input, for a whole sequence: the rotary
    /// tables of positions `0..seq` and the padding (`attention_mask` 0) as a mask.
    fn layer_inputs(
        &self,
        input_ids: &Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> (Rotary, Option<Tensor<2, burn::tensor::Bool>>) {
        let [_, seq] = input_ids.dims();
        let rotary = Rotary::from_inv_freq(&self.inv_freq(), 0, seq, &input_ids.device());
        (rotary, attention_mask.map(|m| m.equal_elem(0)))
    }

    /// The embeddings `[batch, seq, hidden]` of `input_ids` (from the packed table when there
    /// is one: only the rows looked up are decoded).
    ///
    /// # Panics
    /// For an id outside a packed table.
    pub fn embed(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        match &self.packed_embed {
            Some(table) => packed_lookup(table, input_ids),
            None => self.embed_tokens.forward(input_ids),
        }
    }

    /// The vocabulary size (rows of the token table).
    pub fn vocab_size(&self) -> usize {
        match &self.packed_embed {
            Some(table) => table.shape()[0],
            None => self.embed_tokens.weight.dims()[0],
        }
    }

    /// The size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.layers.first().map_or(2, |l| l.self_attn.head_dim)
    }

    /// The rotary inverse frequencies `[head_dim / 2]` (base and scaling applied).
    pub fn inv_freq(&self) -> Vec<f32> {
        self.rope_scaling.inv_freq(self.rope_theta, self.head_dim())
    }

    /// The normalised hidden state `[batch, n, hidden]` of `n` new positions after the ones in
    /// `cache`, which grows by `n`. Ids are not checked here (see [`Llama::forward_cached`]).
    ///
    /// # Errors
    /// [`ModelError::CacheFull`] when the new positions do not fit, [`ModelError::CacheBatch`]
    /// for another batch size than the cache's.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let [batch, n] = input_ids.dims();
        if batch != cache.batch {
            return Err(ModelError::CacheBatch {
                expected: cache.batch,
                found: batch,
            });
        }
        if cache.len + n > cache.capacity() {
            return Err(ModelError::CacheFull {
                needed: cache.len + n,
                capacity: cache.capacity(),
            });
        }
        let rotary = cache.rotary.narrow(cache.len, n);
        let mut x = self.embed(input_ids);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward_cached(x, &rotary, cache, i);
        }
        cache.len += n;
        Ok(self.norm.forward(x))
    }
}

/// Hugging Face's `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct Llama<L: LinearLayer> {
    /// The decoder (`model.*`).
    pub model: LlamaModel<L>,
    /// The untied LM head `hidden -> vocab` (`lm_head`); `None` when the head is the
    /// transposed token embedding.
    pub lm_head: Option<L>,
}

/// `"llama"`: every LLaMA-architecture checkpoint this model loads (Mistral, Qwen2, SmolLM, …)
/// has PEFT's LLaMA default targets, `q_proj` and `v_proj`.
impl<L: LinearLayer> ModelType for Llama<L> {
    fn model_type(&self) -> Option<&str> {
        Some("llama")
    }
}

/// `"llama"`, as [`Llama`] (the decoder alone has the same projections).
impl<L: LinearLayer> ModelType for LlamaModel<L> {
    fn model_type(&self) -> Option<&str> {
        Some("llama")
    }
}

impl<L: LinearLayer> Llama<L> {
    /// A randomly initialised model of `config` (burn's default initialisers; norms at 1).
    ///
    /// # Panics
    /// If `config` is inconsistent (see [`LlamaConfig::from_dir`] for the checks).
    pub fn new(config: &LlamaConfig, device: &Device) -> Self {
        if let Err(message) = config.check() {
            panic!("invalid LlamaConfig: {message}");
        }
        let h = config.hidden_size;
        let linear = |i, o, bias| L::from(LinearConfig::new(i, o).with_bias(bias).init(device));
        let (q, kv) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let (ab, mb) = (config.attention_bias, config.mlp_bias);
        let layers = (0..config.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: linear(h, q, ab),
                    k_proj: linear(h, kv, ab),
                    v_proj: linear(h, kv, ab),
                    o_proj: linear(q, h, ab),
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                mlp: LlamaMlp {
                    gate_proj: linear(h, config.intermediate_size, mb),
                    up_proj: linear(h, config.intermediate_size, mb),
                    down_proj: linear(config.intermediate_size, h, mb),
                },
                input_layernorm: RmsNorm::new(h, config.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::new(h, config.rms_norm_eps, device),
            })
            .collect();
        Self {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(config.vocab_size, h).init(device),
                packed_embed: None,
                layers,
                norm: RmsNorm::new(h, config.rms_norm_eps, device),
                rope_theta: config.rope_theta,
                rope_scaling: config.rope_scaling.clone(),
                max_position_embeddings: config.max_position_embeddings,
            },
            lm_head: (!config.tie_word_embeddings).then(|| linear(h, config.vocab_size, false)),
        }
    }

    /// Load a Hugging Face `LlamaForCausalLM` folder: `config.json` and `model.safetensors`, or
    /// `model.safetensors.index.json` and its shards (F32, F16 or BF16, memory-mapped and
    /// converted to f32 one tensor at a time; see [`Checkpoint::open_dir`]). With tied
    /// embeddings, `lm_head.weight` may be absent from the checkpoint and is ignored when
    /// present (the head is the token embedding, as in Transformers).
    ///
    /// # Errors
    /// Missing files, an unsupported config, or a missing or misshapen tensor (named).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<(Self, LlamaConfig)> {
        Self::from_pretrained_as(dir, BaseFormat::F32, device)
    }

    /// [`Llama::from_pretrained`] with the frozen base held as `base` says ([`Llama::load_as`]).
    ///
    /// # Errors
    /// As [`Llama::from_pretrained`] and [`Llama::load_as`].
    pub fn from_pretrained_as(
        dir: &Path,
        base: BaseFormat,
        device: &Device,
    ) -> Result<(Self, LlamaConfig)> {
        let config = LlamaConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open_dir(dir)?;
        Ok((Self::load_as(&config, &ckpt, base, device)?, config))
    }

    /// Build the model from an opened checkpoint with `LlamaForCausalLM` keys (`model.…`,
    /// `lm_head.weight`).
    ///
    /// # Errors
    /// A missing or misshapen tensor (named), or an inconsistent `config`.
    pub fn load(config: &LlamaConfig, ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        Self::load_as(config, ckpt, BaseFormat::F32, device)
    }

    /// [`Llama::load`] with the frozen base held as `base` says ([`BaseFormat`]: the linear
    /// layers through [`Checkpoint::linear_layer`], the token table and an untied LM head through
    /// [`Checkpoint::packed_table`]; norms stay f32). Each weight is packed as it is read, so
    /// loading never holds the whole model in f32.
    ///
    /// # Errors
    /// As [`Llama::load`]; [`ModelError::Packing`] for a tensor the base cannot hold.
    pub fn load_as(
        config: &LlamaConfig,
        ckpt: &Checkpoint,
        base: BaseFormat,
        device: &Device,
    ) -> Result<Self> {
        config.check().map_err(|message| ModelError::Config {
            file: ckpt.file().into(),
            message,
        })?;
        let h = config.hidden_size;
        let eps = config.rms_norm_eps;
        let linear =
            |path: &str, i, o, bias| ckpt.linear_layer::<L>(path, (i, o), bias, base, device);
        let (q, kv) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let (ab, mb) = (config.attention_bias, config.mlp_bias);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for n in 0..config.num_hidden_layers {
            let p = format!("model.layers.{n}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let inter = config.intermediate_size;
            layers.push(LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: linear(&format!("{a}.q_proj"), h, q, ab)?,
                    k_proj: linear(&format!("{a}.k_proj"), h, kv, ab)?,
                    v_proj: linear(&format!("{a}.v_proj"), h, kv, ab)?,
                    o_proj: linear(&format!("{a}.o_proj"), q, h, ab)?,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                mlp: LlamaMlp {
                    gate_proj: linear(&format!("{m}.gate_proj"), h, inter, mb)?,
                    up_proj: linear(&format!("{m}.up_proj"), h, inter, mb)?,
                    down_proj: linear(&format!("{m}.down_proj"), inter, h, mb)?,
                },
                input_layernorm: ckpt.rms_norm(&format!("{p}.input_layernorm"), h, eps, device)?,
                post_attention_layernorm: ckpt.rms_norm(
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    eps,
                    device,
                )?,
            });
        }
        let vocab = config.vocab_size;
        let packed_embed = ckpt.packed_table("model.embed_tokens.weight", (vocab, h), base)?;
        let embed_tokens = match packed_embed {
            Some(_) => Embedding {
                weight: Param::from_tensor(Tensor::zeros([0, h], device)).set_require_grad(false),
            },
            None => ckpt.embedding("model.embed_tokens", vocab, h, device)?,
        };
        let model = LlamaModel {
            embed_tokens,
            packed_embed,
            layers,
            norm: ckpt.rms_norm("model.norm", h, eps, device)?,
            rope_theta: config.rope_theta,
            rope_scaling: config.rope_scaling.clone(),
            max_position_embeddings: config.max_position_embeddings,
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(
                match ckpt.packed_table("lm_head.weight", (vocab, h), base)? {
                    Some(table) => L::from_packed(table, None, device)?,
                    None => ckpt
                        .linear("lm_head", h, vocab, false, device)
                        .map(L::from)?,
                },
            )
        };
        Ok(Self { model, lm_head })
    }

    /// The logits `[batch, seq, vocab]` for `input_ids` `[batch, seq]` under causal attention;
    /// `attention_mask` `[batch, seq]` (1 for tokens, 0 for padding) also hides padding keys.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
    ) -> Tensor<3> {
        self.head(self.model.forward(input_ids, attention_mask))
    }

    /// The vocabulary size (rows of the token embedding).
    pub fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }

    /// An empty key/value cache for `batch` sequences of up to `capacity` positions, on the
    /// model's device, with the rotary tables of those positions computed once.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let device = self.model.embed_tokens.weight.device();
        let (kv_heads, head_dim) = self
            .model
            .layers
            .first()
            .map_or((1, 2), |l| (l.self_attn.num_kv_heads, l.self_attn.head_dim));
        let buffer = || {
            Some(Tensor::<4>::zeros(
                [batch, kv_heads, capacity, head_dim],
                &device,
            ))
        };
        let layers = self.model.layers.len();
        KvCache {
            keys: (0..layers).map(|_| buffer()).collect(),
            values: (0..layers).map(|_| buffer()).collect(),
            rotary: Rotary::from_inv_freq(&self.model.inv_freq(), 0, capacity, &device),
            len: 0,
            batch,
            kv_heads,
            head_dim,
        }
    }

    /// The logits `[batch, n, vocab]` of `n` new tokens `input_ids` `[batch, n]` that follow the
    /// positions held by `cache` (a prompt's prefill, or one token per decoding step); the new
    /// keys and values are appended to `cache`. Equal to the last `n` positions of
    /// [`Llama::forward`] over the whole sequence.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfVocab`] for an id outside the vocabulary,
    /// [`ModelError::CacheFull`] when the cache cannot hold the new positions,
    /// [`ModelError::CacheBatch`] for another batch size than the cache's. The cache is
    /// unchanged then.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        check_ids(&input_ids, self.vocab_size())?;
        Ok(self.head(self.model.forward_cached(input_ids, cache)?))
    }

    /// As [`Llama::forward_cached`], but only the logits `[batch, vocab]` of the last new
    /// position (what generation needs: the LM head runs on one row per sequence).
    ///
    /// # Errors
    /// As [`Llama::forward_cached`].
    pub fn forward_cached_last(
        &self,
        input_ids: Tensor<2, Int>,
        cache: &mut KvCache,
    ) -> Result<Tensor<2>> {
        check_ids(&input_ids, self.vocab_size())?;
        let hidden = self.model.forward_cached(input_ids, cache)?;
        let [batch, n, _] = hidden.dims();
        let last = hidden.narrow(1, n - 1, 1);
        Ok(self.head(last).reshape([batch, self.vocab_size()]))
    }

    /// The causal-LM loss of `input_ids` `[batch, seq]` against `labels` `[batch, seq]` (as
    /// [`causal_lm_loss`](crate::loss::causal_lm_loss) of [`Llama::forward`]'s logits), with the
    /// LM head and the loss fused ([`causal_lm_loss_from_hidden`]): the `[batch, seq, vocab]`
    /// logits are never built, and positions whose next label is ignored skip the head. A head
    /// that is not a plain weight (a bias, or adapters on `lm_head`) takes the logits path.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfVocab`] for an input id or a label outside the vocabulary,
    /// [`ModelError::InvalidInput`] for labels of another shape or with nothing to predict.
    pub fn causal_lm_loss(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        labels: Tensor<2, Int>,
    ) -> Result<Tensor<1>> {
        check_ids(&input_ids, self.vocab_size())?;
        let hidden = self.model.forward(input_ids, attention_mask);
        self.loss_from_hidden(hidden, labels)
    }

    /// [`Llama::causal_lm_loss`] and its gradients with **gradient checkpointing** (Hugging
    /// Face's `gradient_checkpointing_enable()`): the forward pass keeps only each decoder
    /// layer's input, not the activations inside the layers; the backward pass then runs the
    /// layers from the top down, each one forward again on its saved input with the graph
    /// recorded and back with the gradient of its output. Activation memory falls from every
    /// layer's saved tensors (about 16 MB a layer for SmolLM2 at 512 tokens) to one
    /// `[batch, seq, hidden]` tensor a layer plus one layer's activations, for one more forward
    /// pass of the decoder layers.
    ///
    /// Returns the loss value and the gradients of the loss times `scale` (`1 / grad_accum` for
    /// gradient accumulation). The gradients equal [`Llama::causal_lm_loss`]'s `backward()` to
    /// rounding, and every autodiff hook inside the layers (RoSA's and SFT's gradient probes)
    /// runs once, in the recomputed pass. Dropout draws from the device's generator reseeded
    /// with `seed + layer` before both passes of a layer, so both see the same mask (a run with
    /// dropout draws other masks than without checkpointing; without dropout nothing is drawn).
    ///
    /// # Errors
    /// As [`Llama::causal_lm_loss`].
    pub fn causal_lm_loss_checkpointed(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        labels: Tensor<2, Int>,
        scale: f64,
        seed: u64,
    ) -> Result<(f64, GradientsParams)> {
        check_ids(&input_ids, self.vocab_size())?;
        let device = input_ids.device();
        let (rotary, padding) = self.model.layer_inputs(&input_ids, attention_mask);
        let layer_seed = |i: usize| device.seed(seed.wrapping_add(i as u64));
        // Forward without a graph: layers whose parameters require no gradient record nothing.
        let embedded = self.model.embed(input_ids.clone()).detach();
        let mut inputs = Vec::with_capacity(self.model.layers.len());
        let mut x = embedded;
        for (i, layer) in self.model.layers.iter().enumerate() {
            layer_seed(i);
            let next = layer
                .clone()
                .no_grad()
                .forward(x.clone(), &rotary, padding.as_ref())
                .detach();
            inputs.push(x);
            x = next;
        }
        let mut grads = GradientsAccumulator::<Self>::new();
        // The top: final norm, head and loss, from the last hidden state.
        let top = x.require_grad();
        let loss = self.loss_from_hidden(self.model.norm.forward(top.clone()), labels)?;
        let value = loss.clone().into_scalar::<f64>();
        let mut g = (loss * scale).backward();
        let mut upstream = top.grad_remove(&mut g);
        grads.accumulate(self, GradientsParams::from_grads(g, self));
        // Each layer again, top down, with the gradient of its output.
        for (i, (layer, input)) in self.model.layers.iter().zip(inputs).enumerate().rev() {
            let Some(dy) = upstream.take() else { break };
            layer_seed(i);
            let x = input.require_grad();
            let y = layer.forward(x.clone(), &rotary, padding.as_ref());
            let mut g = (y * dy).sum().backward();
            upstream = x.grad_remove(&mut g);
            grads.accumulate(self, GradientsParams::from_grads(g, self));
        }
        // The embeddings, when they train (full fine-tuning, an embedding adapter).
        if let Some(dy) = upstream {
            let e = self.model.embed(input_ids);
            if e.is_tracked() {
                let g = (e * dy).sum().backward();
                grads.accumulate(self, GradientsParams::from_grads(g, self));
            }
        }
        Ok((value, grads.grads()))
    }

    /// The loss of the normalised last hidden state (see [`Llama::causal_lm_loss`]).
    fn loss_from_hidden(&self, hidden: Tensor<3>, labels: Tensor<2, Int>) -> Result<Tensor<1>> {
        let head = match &self.lm_head {
            Some(head) => head.head_weight(),
            None => Some(match &self.model.packed_embed {
                Some(table) => HeadWeight::Packed(table.clone()),
                None => HeadWeight::Dense(self.model.embed_tokens.weight.val()),
            }),
        };
        match head {
            Some(head) => causal_lm_loss_from_hidden(hidden, head, labels),
            None => crate::loss::causal_lm_loss(self.head(hidden), labels),
        }
    }

    /// The LM head on hidden states `[batch, seq, hidden]`.
    fn head(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => match &self.model.packed_embed {
                Some(table) => packed_linear(hidden, table, None),
                None => {
                    // The transposed table is a strided view: `kernels::linear` reads it in
                    // place (a matmul would copy the whole table to a contiguous buffer on every
                    // call).
                    let table = self.model.embed_tokens.weight.val();
                    peft_kernels::linear(hidden, table.transpose(), None)
                }
            },
        }
    }
}

/// Check every id of `ids` is in `0..vocab_size`.
fn check_ids(ids: &Tensor<2, Int>, vocab_size: usize) -> Result<()> {
    let data = ids.to_data();
    match data
        .iter::<i64>()
        .find(|&id| id < 0 || id as usize >= vocab_size)
    {
        Some(id) => Err(ModelError::TokenOutOfVocab { id, vocab_size }),
        None => Ok(()),
    }
}
