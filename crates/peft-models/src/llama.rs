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

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;

use crate::checkpoint::{Checkpoint, read_config};
use crate::error::{ModelError, Result};
use crate::layers::{LinearLayer, RmsNorm};

/// A validated LLaMA configuration, read from a Hugging Face `config.json`
/// ([`LlamaConfig::from_dir`]) or built in code ([`LlamaConfig::new`]).
///
/// `config.json` is read as Transformers 4 and 5 write it: the rotary base comes from
/// `rope_parameters.rope_theta` (Transformers 5), else `rope_theta`, else 10000. Only the default
/// rotary embedding is supported; `rope_scaling` / `rope_parameters` of another `rope_type`
/// (`linear`, `dynamic`, `llama3`, `yarn`, ...) and `partial_rotary_factor` ≠ 1 are refused.
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
    /// Context length the model was trained for (informational; not enforced).
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

impl WireConfig {
    /// The rotary base, refusing every rotary variant but the default one.
    fn rope_theta(&self) -> std::result::Result<f64, String> {
        let mut theta = self.rope_theta;
        for (field, params) in [
            ("rope_scaling", &self.rope_scaling),
            ("rope_parameters", &self.rope_parameters),
        ] {
            let Some(params) = params.as_ref().filter(|p| !p.is_null()) else {
                continue;
            };
            let Some(map) = params.as_object() else {
                return Err(format!("`{field}` must be an object, found {params}"));
            };
            let kind = map
                .get("rope_type")
                .or_else(|| map.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(format!(
                    "{field}.rope_type `{kind}` is not supported (only `default` rotary \
                     embeddings, without scaling)"
                ));
            }
            if let Some(f) = map.get("partial_rotary_factor").and_then(Value::as_f64)
                && f != 1.0
            {
                return Err(format!(
                    "{field}.partial_rotary_factor {f} is not supported (only 1.0)"
                ));
            }
            if let Some(t) = map.get("rope_theta") {
                theta =
                    Some(t.as_f64().ok_or_else(|| {
                        format!("{field}.rope_theta must be a number, found {t}")
                    })?);
            }
        }
        if let Some(f) = self.partial_rotary_factor
            && f != 1.0
        {
            return Err(format!(
                "partial_rotary_factor {f} is not supported (only 1.0)"
            ));
        }
        Ok(theta.unwrap_or(DEFAULT_THETA))
    }

    fn resolve(self) -> std::result::Result<LlamaConfig, String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act `{}` is not supported (silu)",
                self.hidden_act
            ));
        }
        let rope_theta = self.rope_theta()?;
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
    /// query heads), `head_dim = hidden_size / num_attention_heads`, eps 1e-6, rotary base 10000,
    /// 2048 positions, untied head, no biases. Adjust the public fields as needed.
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
        Ok(())
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

/// The rotary tables of one forward pass: `cos` and `sin`, `[1, 1, seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct Rotary {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl Rotary {
    /// The tables for positions `0..seq` as Hugging Face's `LlamaRotaryEmbedding` computes them
    /// (in f32): `inv_freq[i] = 1 / theta^(2i / head_dim)`, angles `pos · inv_freq` repeated
    /// over both halves of the head.
    pub fn new(seq: usize, head_dim: usize, theta: f64, device: &Device) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(seq * head_dim);
        let mut sin = Vec::with_capacity(seq * head_dim);
        for pos in 0..seq {
            for j in 0..head_dim {
                let angle = pos as f32 * inv_freq[j % half];
                cos.push(angle.cos());
                sin.push(angle.sin());
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

    /// Rotate `x` `[batch, heads, seq, head_dim]`: `x · cos + rotate_half(x) · sin`, where
    /// `rotate_half([x1, x2]) = [-x2, x1]`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let d = x.dims()[3];
        let half = d / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
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
        let mask = padding.map(|p| {
            p.clone()
                .reshape([batch, 1, 1, seq])
                .expand([batch, heads, seq, seq])
        });
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        let context = attention(q, repeat(k), repeat(v), mask, None, options);
        self.o_proj
            .forward(context.swap_dims(1, 2).reshape([batch, seq, heads * d]))
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
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
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
}

/// Hugging Face's `LlamaModel`: embeddings, decoder layers and the final norm (`model`).
#[derive(Module, Debug)]
pub struct LlamaModel<L: LinearLayer> {
    /// Token embeddings `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// The decoder layers.
    pub layers: Vec<LlamaDecoderLayer<L>>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Rotary embedding base.
    #[module(skip)]
    pub rope_theta: f64,
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
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let padding = attention_mask.map(|m| m.equal_elem(0));
        let head_dim = self.layers.first().map_or(2, |l| l.self_attn.head_dim);
        let rotary = Rotary::new(seq, head_dim, self.rope_theta, &device);
        let mut x = self.embed_tokens.forward(input_ids);
        for layer in &self.layers {
            x = layer.forward(x, &rotary, padding.as_ref());
        }
        self.norm.forward(x)
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
                layers,
                norm: RmsNorm::new(h, config.rms_norm_eps, device),
                rope_theta: config.rope_theta,
            },
            lm_head: (!config.tie_word_embeddings).then(|| linear(h, config.vocab_size, false)),
        }
    }

    /// Load a Hugging Face `LlamaForCausalLM` folder (`config.json` + `model.safetensors`).
    /// With tied embeddings, `lm_head.weight` may be absent from the checkpoint and is ignored
    /// when present (the head is the token embedding, as in Transformers).
    ///
    /// # Errors
    /// Missing files, an unsupported config, or a missing or misshapen tensor (named).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<(Self, LlamaConfig)> {
        let config = LlamaConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(&dir.join("model.safetensors"))?;
        Ok((Self::load(&config, &ckpt, device)?, config))
    }

    /// Build the model from an opened checkpoint with `LlamaForCausalLM` keys (`model.…`,
    /// `lm_head.weight`).
    ///
    /// # Errors
    /// A missing or misshapen tensor (named), or an inconsistent `config`.
    pub fn load(config: &LlamaConfig, ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        config.check().map_err(|message| ModelError::Config {
            file: ckpt.file().into(),
            message,
        })?;
        let h = config.hidden_size;
        let eps = config.rms_norm_eps;
        let linear = |path: &str, i, o, bias| ckpt.linear(path, i, o, bias, device).map(L::from);
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
        let model = LlamaModel {
            embed_tokens: ckpt.embedding("model.embed_tokens", config.vocab_size, h, device)?,
            layers,
            norm: ckpt.rms_norm("model.norm", h, eps, device)?,
            rope_theta: config.rope_theta,
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(linear("lm_head", h, config.vocab_size, false)?)
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
        let hidden = self.model.forward(input_ids, attention_mask);
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [batch, seq, h] = hidden.dims();
                let table = self.model.embed_tokens.weight.val();
                let vocab = table.dims()[0];
                hidden
                    .reshape([batch * seq, h])
                    .matmul(table.transpose())
                    .reshape([batch, seq, vocab])
            }
        }
    }
}
