//! GGUF tensors under Hugging Face names and layouts, and LLaMA models built from GGUF files.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, TensorData};

use peft_kernels::quant::PackedMatrix;
use peft_kernels::quant::ggml::GgmlBlock;

use super::{GgmlType, GgufError, GgufFile};
use crate::checkpoint::{Checkpoint, TensorSource};
use crate::error::{ModelError, Result};
use crate::layers::{BaseFormat, LinearLayer};
use crate::llama::{Llama, LlamaConfig};

/// The Hugging Face name of a GGUF tensor of a LLaMA-family model (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`), or `None` for a name outside the mapping.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (module, param) = rest.rsplit_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{param}"))
}

/// The tensors of a GGUF file as a [`TensorSource`]: Hugging Face names (see
/// [`gguf_to_hf_name`]; names outside the mapping keep their GGUF name), PyTorch shapes (GGUF
/// dimensions reversed), f32 data dequantized one tensor per [`TensorSource::read`], and, for a
/// `llama` file, the rows of `attn_q`/`attn_k` weights and biases un-permuted back to Hugging
/// Face's rotary layout (llama.cpp's converter interleaves the two halves of each head; this
/// undoes it as Transformers' `LlamaTensorProcessor._reverse_permute_weights` does).
pub struct GgufTensors {
    file: GgufFile,
    /// Hugging Face name → GGUF name.
    names: BTreeMap<String, String>,
    /// Query and key/value head counts, when the rows of Q and K are to be un-permuted.
    heads: Option<(usize, usize)>,
}

impl GgufTensors {
    /// Wrap an opened file. For `general.architecture` = `llama`, the head counts for the Q/K
    /// un-permutation come from `llama.attention.head_count` and `llama.attention.head_count_kv`
    /// (default: the head count).
    ///
    /// # Errors
    /// A `llama` file without a usable `llama.attention.head_count`, or two GGUF names mapping
    /// to one Hugging Face name.
    pub fn new(file: GgufFile) -> std::result::Result<Self, GgufError> {
        let heads = if file.get("general.architecture").and_then(|v| v.as_str()) == Some("llama") {
            let n = file.get_usize("llama.attention.head_count")?;
            let kv = match file.get("llama.attention.head_count_kv") {
                Some(_) => file.get_usize("llama.attention.head_count_kv")?,
                None => n,
            };
            Some((n, kv))
        } else {
            None
        };
        let mut names = BTreeMap::new();
        for t in file.tensors() {
            let hf = gguf_to_hf_name(&t.name).unwrap_or_else(|| t.name.clone());
            if let Some(other) = names.insert(hf.clone(), t.name.clone()) {
                return Err(GgufError::Format {
                    file: file.path().into(),
                    message: format!("tensors `{other}` and `{}` both map to `{hf}`", t.name),
                });
            }
        }
        Ok(Self { file, names, heads })
    }

    /// The file.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// The file, given back.
    pub fn into_file(self) -> GgufFile {
        self.file
    }

    /// The GGUF name behind Hugging Face name `hf`.
    pub fn gguf_name(&self, hf: &str) -> Option<&str> {
        self.names.get(hf).map(String::as_str)
    }

    /// The GGUF name behind Hugging Face name `hf`, or the error naming it.
    fn require(&self, hf: &str) -> Result<&str> {
        self.gguf_name(hf).ok_or_else(|| ModelError::MissingTensor {
            file: self.file.path().into(),
            key: hf.into(),
        })
    }

    /// The number of heads whose rows are interleaved in GGUF tensor `name`, if any.
    fn permuted_heads(&self, name: &str) -> Option<usize> {
        let (n, kv) = self.heads?;
        if name.contains(".attn_q.") {
            Some(n)
        } else if name.contains(".attn_k.") {
            Some(kv)
        } else {
            None
        }
    }
}

/// The row order that undoes llama.cpp's interleaving (see [`unpermute_rows`]): row `k` of the
/// Hugging Face layout is GGUF row `order[k]`.
fn unpermuted_order(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(format!(
            "{rows} rows cannot be split into {heads} heads of two rotary halves"
        ));
    }
    let half = rows / heads / 2;
    let mut order = vec![0; rows];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                order[h * 2 * half + j * half + i] = h * 2 * half + 2 * i + j;
            }
        }
    }
    Ok(order)
}

/// Undo llama.cpp's row interleaving of a Q or K projection in place: within each of `heads`
/// groups of `2·half` rows of length `cols`, GGUF row `2i + j` becomes row `j·half + i`.
fn unpermute_rows(
    data: &mut [f32],
    rows: usize,
    cols: usize,
    heads: usize,
) -> std::result::Result<(), String> {
    let order = unpermuted_order(rows, heads)?;
    let src = data.to_vec();
    for (dst, &r) in data.chunks_exact_mut(cols.max(1)).zip(&order) {
        dst.copy_from_slice(&src[r * cols..(r + 1) * cols]);
    }
    Ok(())
}

impl TensorSource for GgufTensors {
    fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let gguf = self.names.get(name)?;
        self.file.tensor_info(gguf).map(|t| t.shape())
    }

    fn read(&self, name: &str) -> Result<TensorData> {
        let gguf = self.require(name)?;
        let shape = self
            .file
            .tensor_info(gguf)
            .map(|t| t.shape())
            .unwrap_or_default();
        let mut data = self.file.dequantize(gguf)?;
        if let Some(heads) = self.permuted_heads(gguf) {
            let rows = shape.first().copied().unwrap_or(1);
            let cols = shape[1..].iter().product();
            unpermute_rows(&mut data, rows, cols, heads).map_err(|message| {
                GgufError::BadTensorShape {
                    file: self.file.path().into(),
                    tensor: gguf.into(),
                    message,
                }
            })?;
        }
        Ok(TensorData::new(data, shape))
    }

    fn has_packed(&self) -> bool {
        true
    }

    /// `Q4_0`, `Q4_1`, `Q8_0`, `F16` and `BF16` tensors as their blocks in the mapped file (Q
    /// and K rows put back in Hugging Face's order, which copies those two); `None` for `F32`.
    fn read_packed(&self, name: &str) -> Result<Option<PackedMatrix>> {
        let gguf = self.require(name)?;
        let info = self.file.tensor_info(gguf).expect("mapped names exist");
        let shape = info.shape();
        let packing = |reason: String| ModelError::Packing {
            file: self.file.path().into(),
            key: gguf.into(),
            base: BaseFormat::Gguf.name(),
            reason,
        };
        let block = match info.ggml_type {
            GgmlType::F32 => return Ok(None),
            GgmlType::Q4_0 => GgmlBlock::Q4_0,
            GgmlType::Q4_1 => GgmlBlock::Q4_1,
            GgmlType::Q8_0 => GgmlBlock::Q8_0,
            GgmlType::F16 => GgmlBlock::F16,
            GgmlType::BF16 => GgmlBlock::Bf16,
            other => {
                return Err(packing(format!(
                    "it is stored as {other}, which cannot be kept packed (the kept formats \
                     are Q4_0, Q4_1, Q8_0, F16 and BF16; `nf4`, `nf4-dq` or `bf16` \
                     re-quantize any file)"
                )));
            }
        };
        let [rows, cols] = shape[..] else {
            return Err(packing(format!(
                "it has shape {shape:?}, not two dimensions"
            )));
        };
        let bytes = self.file.tensor_shared(gguf)?;
        let mut packed =
            PackedMatrix::ggml(block, bytes, rows, cols).map_err(|e| packing(e.to_string()))?;
        if let Some(heads) = self.permuted_heads(gguf) {
            let order = unpermuted_order(rows, heads).map_err(&packing)?;
            packed = packed
                .permute_rows(&order)
                .map_err(|e| packing(e.to_string()))?;
        }
        Ok(Some(packed))
    }
}

/// The [`LlamaConfig`] of a GGUF file with `general.architecture` = `llama`, from its `llama.*`
/// keys: `embedding_length`, `block_count`, `feed_forward_length`, `attention.head_count`,
/// `attention.head_count_kv` (default: the head count), `attention.layer_norm_rms_epsilon`,
/// `rope.freq_base` (default 10000), `context_length`, the head size from
/// `attention.key_length`, else `rope.dimension_count`, else `embedding_length / head_count`
/// (a `rope.dimension_count` other than the head size, i.e. partial rotary, is refused); the
/// vocabulary size from `tokenizer.ggml.tokens`, else `llama.vocab_size`, else the shape of
/// `token_embd.weight`; tied embeddings when there is no `output.weight`; attention and MLP
/// biases when `blk.0.attn_q.bias` / `blk.0.ffn_up.bias` exist.
///
/// # Errors
/// [`GgufError::Architecture`] for another architecture; a missing or mistyped key
/// ([`GgufError::MissingKey`], [`GgufError::WrongValueType`]); [`ModelError::Config`] for
/// unsupported rotary scaling or partial rotary embeddings.
pub fn llama_config(file: &GgufFile) -> Result<LlamaConfig> {
    let arch = file.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::Architecture {
            file: file.path().into(),
            found: arch.into(),
            expected: "llama",
        }
        .into());
    }
    let config_err = |message: String| ModelError::Config {
        file: file.path().into(),
        message,
    };
    let key = |k: &str| format!("llama.{k}");
    let opt_usize = |k: &str| -> Result<Option<usize>> {
        let k = key(k);
        Ok(match file.get(&k) {
            Some(_) => Some(file.get_usize(&k)?),
            None => None,
        })
    };
    let hidden = file.get_usize(&key("embedding_length"))?;
    let heads = file.get_usize(&key("attention.head_count"))?;
    if heads == 0 {
        return Err(config_err("llama.attention.head_count is 0".into()));
    }
    let vocab = match file.get("tokenizer.ggml.tokens") {
        Some(_) => file.get_array("tokenizer.ggml.tokens")?.len(),
        None => match opt_usize("vocab_size")? {
            Some(v) => v,
            None => file
                .tensor_info("token_embd.weight")
                .and_then(|t| t.shape().first().copied())
                .ok_or_else(|| GgufError::MissingKey {
                    file: file.path().into(),
                    key: "tokenizer.ggml.tokens (or llama.vocab_size, or a token_embd.weight)"
                        .into(),
                })?,
        },
    };
    let mut config = LlamaConfig::new(
        vocab,
        hidden,
        file.get_usize(&key("feed_forward_length"))?,
        file.get_usize(&key("block_count"))?,
        heads,
    );
    config.num_key_value_heads = opt_usize("attention.head_count_kv")?.unwrap_or(heads);
    config.rms_norm_eps = file.get_f64(&key("attention.layer_norm_rms_epsilon"))?;
    if file.get(&key("rope.freq_base")).is_some() {
        config.rope_theta = file.get_f64(&key("rope.freq_base"))?;
    } else {
        config.rope_theta = 10000.0;
    }
    if let Some(n) = opt_usize("context_length")? {
        config.max_position_embeddings = n;
    }
    let rope_dims = opt_usize("rope.dimension_count")?;
    config.head_dim = match (opt_usize("attention.key_length")?, rope_dims) {
        (Some(k), _) => k,
        (None, Some(r)) => r,
        (None, None) => hidden / heads,
    };
    if let Some(r) = rope_dims
        && r != config.head_dim
    {
        return Err(config_err(format!(
            "llama.rope.dimension_count {r} differs from the head size {} (partial rotary \
             embeddings are not supported)",
            config.head_dim
        )));
    }
    if let Some(v) = file.get(&key("rope.scaling.type")) {
        let kind = v.as_str().unwrap_or("?");
        if kind != "none" {
            return Err(config_err(format!(
                "llama.rope.scaling.type `{kind}` is not supported"
            )));
        }
    }
    config.tie_word_embeddings = file.tensor_info("output.weight").is_none();
    config.attention_bias = file.tensor_info("blk.0.attn_q.bias").is_some();
    config.mlp_bias = file.tensor_info("blk.0.ffn_up.bias").is_some();
    Ok(config)
}

/// Load a LLaMA-family model from a GGUF file: [`llama_config`], then
/// [`Llama::load`] over [`GgufTensors`] (each tensor dequantized to f32 when the model asks for
/// it, so loading holds one converted tensor beside the model and the mapped file).
///
/// # Errors
/// As [`GgufFile::open`], [`llama_config`] and [`Llama::load`].
pub fn load_llama<L: LinearLayer>(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<(Llama<L>, LlamaConfig)> {
    load_llama_as(path, BaseFormat::F32, device)
}

/// [`load_llama`] with the frozen base held as `base` says ([`BaseFormat`]): with
/// [`BaseFormat::Gguf`] the file's blocks are kept as loaded (the memory map is shared, never
/// dequantized to f32), with `nf4`/`bf16` each weight is quantized as it is read.
///
/// # Errors
/// As [`load_llama`]; [`ModelError::Packing`] for a tensor the base cannot hold.
pub fn load_llama_as<L: LinearLayer>(
    path: impl AsRef<Path>,
    base: BaseFormat,
    device: &Device,
) -> Result<(Llama<L>, LlamaConfig)> {
    let path = path.as_ref();
    let file = GgufFile::open(path)?;
    let config = llama_config(&file)?;
    let source = GgufTensors::new(file)?;
    let ckpt = Checkpoint::from_source(path, Box::new(source));
    let model = Llama::load_as(&config, &ckpt, base, device)?;
    Ok((model, config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        let cases = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            (
                "blk.12.attn_q.weight",
                "model.layers.12.self_attn.q_proj.weight",
            ),
            ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
            (
                "blk.1.attn_v.weight",
                "model.layers.1.self_attn.v_proj.weight",
            ),
            (
                "blk.1.attn_output.weight",
                "model.layers.1.self_attn.o_proj.weight",
            ),
            (
                "blk.2.ffn_gate.weight",
                "model.layers.2.mlp.gate_proj.weight",
            ),
            ("blk.2.ffn_up.bias", "model.layers.2.mlp.up_proj.bias"),
            (
                "blk.2.ffn_down.weight",
                "model.layers.2.mlp.down_proj.weight",
            ),
            (
                "blk.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
        ];
        for (gguf, hf) in cases {
            assert_eq!(gguf_to_hf_name(gguf).as_deref(), Some(hf), "{gguf}");
        }
        for other in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_q.scale",
        ] {
            assert_eq!(gguf_to_hf_name(other), None, "{other}");
        }
    }

    #[test]
    fn unpermute_matches_transformers_reshape() {
        // 2 heads of 2·3 rows, 2 columns: GGUF row r of head h holds HF row h·6 + (r%2)·3 + r/2.
        let (rows, cols, heads) = (12, 2, 2);
        let gguf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut hf = gguf.clone();
        unpermute_rows(&mut hf, rows, cols, heads).unwrap();
        for h in 0..heads {
            for r in 0..6 {
                let dst = h * 6 + (r % 2) * 3 + r / 2;
                let src = h * 6 + r;
                assert_eq!(
                    hf[dst * cols..dst * cols + cols],
                    gguf[src * cols..src * cols + cols]
                );
            }
        }
        assert!(unpermute_rows(&mut hf, rows, cols, 5).is_err());
        // The row order the packed path uses moves the rows the same way.
        let order = unpermuted_order(rows, heads).unwrap();
        for (k, &src) in order.iter().enumerate() {
            assert_eq!(
                hf[k * cols..k * cols + cols],
                gguf[src * cols..src * cols + cols]
            );
        }
        assert!(unpermuted_order(rows, 5).is_err());
    }
}
