#![allow(non_snake_case)] // `LayerNorm` fields keep Hugging Face's parameter names.
//! A BERT encoder (Hugging Face `BertModel`) whose module paths are Hugging Face's:
//! `embeddings.word_embeddings`, `encoder.layer.N.attention.self.query`,
//! `encoder.layer.N.attention.output.dense`, `encoder.layer.N.intermediate.dense`,
//! `encoder.layer.N.output.dense`, `pooler.dense`, with `LayerNorm.weight` / `LayerNorm.bias`.

use std::path::Path;
use std::sync::Arc;

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param,
};
use burn::nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, LinearConfig};
use burn::tensor::activation::{relu, tanh};
use burn::tensor::{Bool, Device, Int, Tensor};
use peft_core::ModelType;
use serde::Deserialize;

use crate::checkpoint::{Checkpoint, read_config};
use crate::error::{ModelError, Result};
use crate::layers::{LayerNorm, LinearLayer, packed_lookup};
use peft_kernels::packed_linear::PackedWeight;
use peft_kernels::quant::{PackedFormat, PackedMatrix};
use peft_kernels::{attention, gelu};

/// The fields of a Hugging Face BERT `config.json` this model uses.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// FFN inner size.
    pub intermediate_size: usize,
    /// FFN activation: `gelu` (exact erf form) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Number of positions.
    pub max_position_embeddings: usize,
    /// Number of token types.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Dropout on hidden states (training only).
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities (training only; not applied by this model, see
    /// [`BertSelfAttention::forward`]).
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    /// Position embedding type; only `absolute` is supported.
    #[serde(default = "default_position")]
    pub position_embedding_type: String,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_position() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Read `config.json` from a model folder and check it.
    ///
    /// # Errors
    /// Missing or invalid file, unsupported activation or position embedding.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config: Self = read_config(dir)?;
        config.validate(&dir.join("config.json"))?;
        Ok(config)
    }

    fn validate(&self, file: &Path) -> Result<()> {
        let fail = |message: String| {
            Err(ModelError::Config {
                file: file.into(),
                message,
            })
        };
        if !matches!(self.hidden_act.as_str(), "gelu" | "relu") {
            return fail(format!(
                "hidden_act `{}` is not supported (gelu, relu)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return fail(format!(
                "position_embedding_type `{}` is not supported (absolute)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return fail(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Token, position and token-type embeddings, summed and normalised.
#[derive(Module, Debug)]

pub struct BertEmbeddings {
    /// Token embeddings `[vocab, hidden]` (an empty `[0, hidden]` placeholder when the table is
    /// held packed in `packed_words`).
    pub word_embeddings: Embedding,
    /// The token table `[vocab, hidden]` held packed (frozen; [`pack_words`]
    /// (Self::pack_words)): a lookup decodes only the rows it reads.
    #[module(skip)]
    pub packed_words: Option<PackedWeight>,
    /// Absolute position embeddings.
    pub position_embeddings: Embedding,
    /// Token-type embeddings.
    pub token_type_embeddings: Embedding,
    /// Layer norm (Hugging Face's name).
    pub LayerNorm: LayerNorm,
    /// Dropout on the output.
    pub dropout: Dropout,
}

impl BertEmbeddings {
    /// Embed `input_ids` `[batch, seq]` (token type 0 everywhere), giving `[batch, seq, hidden]`.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let words = match &self.packed_words {
            Some(table) => packed_lookup(table, input_ids),
            None => self.word_embeddings.forward(input_ids),
        };
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).reshape([1, seq]);
        let positions = self.position_embeddings.forward(positions);
        let types = self
            .token_type_embeddings
            .forward(Tensor::<2, Int>::zeros([1, 1], &device));
        let x = words + positions + types;
        let _ = batch;
        self.dropout.forward(self.LayerNorm.forward(x))
    }

    /// Hold the token table packed in `format` from now on (frozen: a packed table takes no
    /// updates), as a packed base does for the linear layers ([`PeftModel::pack_base`]
    /// (peft_core::PeftModel::pack_base)): BERT's token table is about half of a small
    /// encoder's weights (all-MiniLM-L6-v2: 11.7 M of 22.7 M). QLoRA's recipe keeps embeddings
    /// in 16 bits ([`BaseFormat::table_format`](crate::BaseFormat::table_format): bf16); a
    /// GGUF file stores them as `Q8_0`. A table already packed is left as it is.
    ///
    /// # Errors
    /// A table the format cannot hold (ggml blocks need a hidden size that is a multiple of 32;
    /// non-finite values).
    pub fn pack_words(&mut self, format: PackedFormat) -> Result<()> {
        if self.packed_words.is_some() {
            return Ok(());
        }
        let weight = self.word_embeddings.weight.val();
        let [vocab, hidden] = weight.dims();
        let values = weight
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ModelError::InvalidInput {
                field: "embeddings.word_embeddings".into(),
                reason: format!("{e:?}"),
            })?;
        let packed = PackedMatrix::quantize(&values, vocab, hidden, format).map_err(|e| {
            ModelError::InvalidInput {
                field: "embeddings.word_embeddings".into(),
                reason: format!("cannot be held as {}: {e}", format.name()),
            }
        })?;
        let device = self.word_embeddings.weight.device();
        self.word_embeddings.weight =
            Param::from_tensor(Tensor::zeros([0, hidden], &device)).set_require_grad(false);
        self.packed_words = Some(Arc::new(packed));
        Ok(())
    }
}

/// Query, key and value projections (Hugging Face's `attention.self`).
#[derive(Module, Debug)]
pub struct BertSelfAttention<L: LinearLayer> {
    /// Query projection.
    pub query: L,
    /// Key projection.
    pub key: L,
    /// Value projection.
    pub value: L,
    /// Number of heads.
    #[module(skip)]
    pub num_heads: usize,
}

impl<L: LinearLayer> BertSelfAttention<L> {
    /// Multi-head attention of `x` `[batch, seq, hidden]` over itself; `mask` `[batch, 1, 1,
    /// seq]` is `true` at padding keys. Attention-probability dropout is not applied (burn's
    /// fused attention has none); hidden-state dropout is.
    pub fn forward(&self, x: Tensor<3>, mask: &Tensor<4, Bool>) -> Tensor<3> {
        let [batch, seq, hidden] = x.dims();
        let heads = self.num_heads;
        let split = |t: Tensor<3>| {
            t.reshape([batch, seq, heads, hidden / heads])
                .swap_dims(1, 2)
        };
        let q = split(self.query.forward(x.clone()));
        let k = split(self.key.forward(x.clone()));
        let v = split(self.value.forward(x));
        let context = attention(q, k, v, Some(mask.clone().reshape([batch, seq])));
        context.swap_dims(1, 2).reshape([batch, seq, hidden])
    }
}

/// Output projection, dropout, residual and layer norm (`attention.output` and `output`).
#[derive(Module, Debug)]

pub struct BertResidual<L: LinearLayer> {
    /// Projection.
    pub dense: L,
    /// Layer norm (Hugging Face's name).
    pub LayerNorm: LayerNorm,
    /// Dropout before the residual.
    pub dropout: Dropout,
}

impl<L: LinearLayer> BertResidual<L> {
    /// `LayerNorm(dropout(dense(x)) + residual)`.
    pub fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        self.LayerNorm
            .forward(self.dropout.forward(self.dense.forward(x)) + residual)
    }
}

/// Self-attention and its output block; stored under `attention.self` and `attention.output`.
///
/// `self` is a Rust keyword, so the field is `self_attn` and this module's `Module`
/// implementation names it `self` in every path.
#[derive(Clone, Debug)]
pub struct BertAttention<L: LinearLayer> {
    /// `attention.self`.
    pub self_attn: BertSelfAttention<L>,
    /// `attention.output`.
    pub output: BertResidual<L>,
}

const SELF: &str = "self";
const SELF_TYPE: &str = "Struct:BertSelfAttention";
const OUTPUT_TYPE: &str = "Struct:BertResidual";

impl<L: LinearLayer> Module for BertAttention<L> {
    fn collect_devices(&self, devices: Devices) -> Devices {
        let devices = self.self_attn.collect_devices(devices);
        self.output.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        Self {
            self_attn: self.self_attn.fork(device),
            output: self.output.fork(device),
        }
    }

    fn to_device(self, device: &Device) -> Self {
        Self {
            self_attn: self.self_attn.to_device(device),
            output: self.output.to_device(device),
        }
    }

    fn train(self) -> Self {
        Self {
            self_attn: self.self_attn.train(),
            output: self.output.train(),
        }
    }

    fn valid(&self) -> Self {
        Self {
            self_attn: self.self_attn.valid(),
            output: self.output.valid(),
        }
    }

    fn materialize(self) -> Self {
        Self {
            self_attn: self.self_attn.materialize(),
            output: self.output.materialize(),
        }
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module(SELF, SELF_TYPE);
        self.self_attn.visit(visitor);
        visitor.exit_module(SELF, SELF_TYPE);
        visitor.enter_module("output", OUTPUT_TYPE);
        self.output.visit(visitor);
        visitor.exit_module("output", OUTPUT_TYPE);
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        mapper.enter_module(SELF, SELF_TYPE);
        let self_attn = self.self_attn.map(mapper);
        mapper.exit_module(SELF, SELF_TYPE);
        mapper.enter_module("output", OUTPUT_TYPE);
        let output = self.output.map(mapper);
        mapper.exit_module("output", OUTPUT_TYPE);
        Self { self_attn, output }
    }
}

impl<L: LinearLayer> ModuleDisplayDefault for BertAttention<L> {
    fn content(&self, content: Content) -> Option<Content> {
        content
            .add(SELF, &self.self_attn)
            .add("output", &self.output)
            .optional()
    }
}

impl<L: LinearLayer> ModuleDisplay for BertAttention<L> {}

/// The FFN's first projection (`intermediate.dense`) and activation.
#[derive(Module, Debug)]
pub struct BertIntermediate<L: LinearLayer> {
    /// `hidden -> intermediate`.
    pub dense: L,
    /// Whether the activation is ReLU (else exact GELU).
    #[module(skip)]
    pub relu: bool,
}

impl<L: LinearLayer> BertIntermediate<L> {
    /// `act(dense(x))`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.dense.forward(x);
        if self.relu { relu(h) } else { gelu(h) }
    }
}

/// One encoder layer.
#[derive(Module, Debug)]
pub struct BertLayer<L: LinearLayer> {
    /// Self-attention block.
    pub attention: BertAttention<L>,
    /// FFN first half.
    pub intermediate: BertIntermediate<L>,
    /// FFN second half with residual and norm.
    pub output: BertResidual<L>,
}

impl<L: LinearLayer> BertLayer<L> {
    /// Apply the layer.
    pub fn forward(&self, x: Tensor<3>, mask: &Tensor<4, Bool>) -> Tensor<3> {
        let a = self.attention.self_attn.forward(x.clone(), mask);
        let a = self.attention.output.forward(a, x);
        let h = self.intermediate.forward(a.clone());
        self.output.forward(h, a)
    }
}

/// The layer stack (`encoder.layer.N`).
#[derive(Module, Debug)]
pub struct BertEncoder<L: LinearLayer> {
    /// The layers.
    pub layer: Vec<BertLayer<L>>,
}

/// The pooler (`pooler.dense` + tanh on the first token).
#[derive(Module, Debug)]
pub struct BertPooler<L: LinearLayer> {
    /// `hidden -> hidden`.
    pub dense: L,
}

/// Hugging Face's `BertModel`.
#[derive(Module, Debug)]
pub struct Bert<L: LinearLayer> {
    /// Embeddings.
    pub embeddings: BertEmbeddings,
    /// Encoder layers.
    pub encoder: BertEncoder<L>,
    /// Pooler, when the checkpoint has one.
    pub pooler: Option<BertPooler<L>>,
}

/// `"bert"`: PEFT's default targets are `query` and `value`.
impl<L: LinearLayer> ModelType for Bert<L> {
    fn model_type(&self) -> Option<&str> {
        Some("bert")
    }
}

impl<L: LinearLayer> Bert<L> {
    /// A randomly initialised model of `config` (with a pooler).
    pub fn new(config: &BertConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let dropout = || DropoutConfig::new(config.hidden_dropout_prob).init();
        let linear = |i, o| L::from(LinearConfig::new(i, o).init(device));
        let residual = |i| BertResidual {
            dense: linear(i, h),
            LayerNorm: LayerNorm::new(h, eps, device),
            dropout: dropout(),
        };
        Self {
            embeddings: BertEmbeddings {
                word_embeddings: EmbeddingConfig::new(config.vocab_size, h).init(device),
                packed_words: None,
                position_embeddings: EmbeddingConfig::new(config.max_position_embeddings, h)
                    .init(device),
                token_type_embeddings: EmbeddingConfig::new(config.type_vocab_size, h).init(device),
                LayerNorm: LayerNorm::new(h, eps, device),
                dropout: dropout(),
            },
            encoder: BertEncoder {
                layer: (0..config.num_hidden_layers)
                    .map(|_| BertLayer {
                        attention: BertAttention {
                            self_attn: BertSelfAttention {
                                query: linear(h, h),
                                key: linear(h, h),
                                value: linear(h, h),
                                num_heads: config.num_attention_heads,
                            },
                            output: residual(h),
                        },
                        intermediate: BertIntermediate {
                            dense: linear(h, config.intermediate_size),
                            relu: config.hidden_act == "relu",
                        },
                        output: residual(config.intermediate_size),
                    })
                    .collect(),
            },
            pooler: Some(BertPooler {
                dense: linear(h, h),
            }),
        }
    }

    /// Load a Hugging Face BERT folder (`config.json` + `model.safetensors`), with or without
    /// the `bert.` key prefix. The pooler is loaded when the checkpoint has one.
    ///
    /// # Errors
    /// Missing files, an unsupported config, or a missing or misshapen tensor (named).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<(Self, BertConfig)> {
        let config = BertConfig::from_dir(dir)?;
        Ok((Self::from_dir_with(dir, &config, device)?, config))
    }

    /// Load the weights of a Hugging Face BERT folder into a model of `config`: the folder's
    /// own config as read by [`BertConfig::from_dir`], possibly edited (dropout, say).
    ///
    /// # Errors
    /// A missing checkpoint, or a missing or misshapen tensor (named).
    pub fn from_dir_with(dir: &Path, config: &BertConfig, device: &Device) -> Result<Self> {
        let ckpt = Checkpoint::open(&dir.join("model.safetensors"))?
            .detect_prefix("embeddings.word_embeddings.weight", &["", "bert."])?;
        Self::load(config, &ckpt, device)
    }

    /// Build the model from an opened checkpoint.
    ///
    /// # Errors
    /// A missing or misshapen tensor (named).
    pub fn load(config: &BertConfig, ckpt: &Checkpoint, device: &Device) -> Result<Self> {
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let dropout = || DropoutConfig::new(config.hidden_dropout_prob).init();
        let linear = |path: &str, i, o| ckpt.linear(path, i, o, true, device).map(L::from);
        let residual = |path: &str, i| -> Result<BertResidual<L>> {
            Ok(BertResidual {
                dense: linear(&format!("{path}.dense"), i, h)?,
                LayerNorm: ckpt.layer_norm(&format!("{path}.LayerNorm"), h, eps, device)?,
                dropout: dropout(),
            })
        };
        let e = "embeddings";
        let embeddings = BertEmbeddings {
            word_embeddings: ckpt.embedding(
                &format!("{e}.word_embeddings"),
                config.vocab_size,
                h,
                device,
            )?,
            packed_words: None,
            position_embeddings: ckpt.embedding(
                &format!("{e}.position_embeddings"),
                config.max_position_embeddings,
                h,
                device,
            )?,
            token_type_embeddings: ckpt.embedding(
                &format!("{e}.token_type_embeddings"),
                config.type_vocab_size,
                h,
                device,
            )?,
            LayerNorm: ckpt.layer_norm(&format!("{e}.LayerNorm"), h, eps, device)?,
            dropout: dropout(),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for n in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{n}");
            layers.push(BertLayer {
                attention: BertAttention {
                    self_attn: BertSelfAttention {
                        query: linear(&format!("{p}.attention.self.query"), h, h)?,
                        key: linear(&format!("{p}.attention.self.key"), h, h)?,
                        value: linear(&format!("{p}.attention.self.value"), h, h)?,
                        num_heads: config.num_attention_heads,
                    },
                    output: residual(&format!("{p}.attention.output"), h)?,
                },
                intermediate: BertIntermediate {
                    dense: linear(
                        &format!("{p}.intermediate.dense"),
                        h,
                        config.intermediate_size,
                    )?,
                    relu: config.hidden_act == "relu",
                },
                output: residual(&format!("{p}.output"), config.intermediate_size)?,
            });
        }
        let pooler = if ckpt.contains("pooler.dense.weight") {
            Some(BertPooler {
                dense: linear("pooler.dense", h, h)?,
            })
        } else {
            None
        };
        Ok(Self {
            embeddings,
            encoder: BertEncoder { layer: layers },
            pooler,
        })
    }

    /// The last hidden state `[batch, seq, hidden]` for `input_ids` and `attention_mask`
    /// (`[batch, seq]`, 1 for tokens, 0 for padding).
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = attention_mask.dims();
        let mask = attention_mask.equal_elem(0).reshape([batch, 1, 1, seq]);
        let mut x = self.embeddings.forward(input_ids);
        for layer in &self.encoder.layer {
            x = layer.forward(x, &mask);
        }
        x
    }

    /// The pooled output `tanh(dense(h[:, 0]))` `[batch, hidden]`, if the model has a pooler.
    pub fn pooled(&self, hidden: Tensor<3>) -> Option<Tensor<2>> {
        let [batch, _, h] = hidden.dims();
        self.pooler.as_ref().map(|p| {
            tanh(
                p.dense
                    .forward(hidden.slice([0..batch, 0..1]).reshape([batch, h])),
            )
        })
    }
}

/// Mean of the hidden states over the tokens where `attention_mask` is 1 (sentence-transformers'
/// pooling), `[batch, hidden]`.
pub fn mean_pool(hidden: Tensor<3>, attention_mask: Tensor<2, Int>) -> Tensor<2> {
    let [batch, seq, h] = hidden.dims();
    let m = attention_mask.float().reshape([batch, seq, 1]);
    let summed = (hidden * m.clone()).sum_dim(1).reshape([batch, h]);
    let count = m.sum_dim(1).reshape([batch, 1]).clamp_min(1e-9);
    summed / count
}
