//! Tokenizers of causal language models: built from a GGUF file's metadata (as transformers builds
//! one when it loads a GGUF tokenizer) or loaded from a Hugging Face folder (`tokenizer.json` and
//! `tokenizer_config.json`), with encoding, decoding, an incremental decoder for streaming
//! generated text, and the model's chat template.
//!
//! ```no_run
//! # fn main() -> peft_models::Result<()> {
//! # let metadata = std::collections::BTreeMap::new();
//! use peft_models::tokenizer::ModelTokenizer;
//!
//! // `metadata`: the key-value pairs of a GGUF file (see `peft_models::gguf`).
//! let tokenizer = ModelTokenizer::from_gguf_metadata(&metadata, "model.gguf")?;
//! let ids = tokenizer.encode("Hello world", false)?;
//! assert_eq!(tokenizer.decode(&ids, false)?, "Hello world");
//!
//! // Printing generated ids one at a time:
//! let mut stream = tokenizer.stream_decoder(true);
//! for &id in &ids {
//!     if let Some(text) = stream.step(id)? {
//!         print!("{text}");
//!     }
//! }
//! if let Some(text) = stream.flush()? {
//!     print!("{text}");
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::chat::ChatTemplate;
use crate::error::{ModelError, Result};
use crate::gguf::GgufValue;

/// GGUF token type of a control token (`<|im_start|>`, `<|endoftext|>`): an added special token.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF token type of a user-defined token (`<think>`): an added token that is not special.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The LLaMA 3 split (`llama-bpe`, `llama3`, ...), as in llama.cpp and transformers.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 split (`qwen2`, `deepseek-r1-qwen`): single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The GPT-4o split (`gpt-4o`, `llama4`): case-aware words with contractions attached.
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// How text is split before byte-level BPE, by `tokenizer.ggml.pre`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PreSplit {
    /// GPT-2's split, done by `ByteLevel` itself.
    Gpt2,
    /// Every number character alone (`\p{N}`), then GPT-2's split (SmolLM, StarCoder).
    DigitsThenGpt2,
    /// One regex, then byte-level mapping without a further split.
    Regex(&'static str),
}

/// The `tokenizer.ggml.pre` values [`ModelTokenizer::from_gguf_metadata`] understands, with the
/// split each selects. A file without the key gets GPT-2's split, as in transformers.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "starcoder",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "smaug-bpe",
    "dbrx",
    "qwen2",
    "deepseek-r1-qwen",
    "gpt-4o",
    "llama4",
];

fn pre_split(pre: &str) -> Option<PreSplit> {
    Some(match pre {
        "default" | "gpt2" => PreSplit::Gpt2,
        "smollm" | "starcoder" => PreSplit::DigitsThenGpt2,
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            PreSplit::Regex(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" => PreSplit::Regex(QWEN2_SPLIT),
        "gpt-4o" | "llama4" => PreSplit::Regex(GPT4O_SPLIT),
        _ => return None,
    })
}

/// How [`ModelTokenizer::encode`] adds special tokens when asked to.
#[derive(Clone, Debug)]
enum SpecialTokens {
    /// The wrapped tokenizer's own post-processor (a `tokenizer.json` without explicit flags).
    PostProcessor,
    /// BOS in front and/or EOS at the end.
    Explicit { bos: Option<u32>, eos: Option<u32> },
}

/// A tokenizer of a causal language model: a [`tokenizers::Tokenizer`] with the model's special
/// token ids, whether BOS/EOS are added, and its chat template.
#[derive(Clone, Debug)]
pub struct ModelTokenizer {
    inner: Tokenizer,
    source_name: String,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    unk_token_id: Option<u32>,
    add_bos_token: bool,
    add_eos_token: bool,
    special: SpecialTokens,
    chat_template: Option<String>,
}

/// Whether GPT-2's byte alphabet spells byte `b` as itself (printable Latin-1).
fn printable_byte(b: u32) -> bool {
    (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes stand for themselves, the other 68
/// bytes for U+0100 to U+0143, in byte order.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 0x100u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let code = if printable_byte(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).expect("code points below U+0144 are characters");
    }
    table
}

/// Whether `c` is a character of GPT-2's byte alphabet.
fn in_byte_alphabet(c: char) -> bool {
    printable_byte(c as u32) || (0x100..=0x143).contains(&(c as u32))
}

/// Reads typed values from GGUF metadata, naming the source and key in every error.
struct Meta<'a> {
    map: &'a BTreeMap<String, GgufValue>,
    source: &'a str,
}

impl Meta<'_> {
    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::Tokenizer {
            source_name: self.source.to_string(),
            message: message.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&GgufValue> {
        self.map.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.err(format!("`{key}` is {other:?}, expected a string"))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(format!("`{key}` is {other:?}, expected a bool"))),
        }
    }

    fn int(&self, key: &str, value: &GgufValue) -> Result<i64> {
        Ok(match *value {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => {
                i64::try_from(v).map_err(|_| self.err(format!("`{key}` holds {v}, too large")))?
            }
            GgufValue::I64(v) => v,
            ref other => {
                return Err(self.err(format!("`{key}` holds {other:?}, expected an integer")));
            }
        })
    }

    /// A token id, checked against the vocabulary size.
    fn token_id(&self, key: &str, vocab_len: usize) -> Result<Option<u32>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let id = self.int(key, value)?;
        // llama.cpp writes -1 (or u32::MAX) for "no such token" in some files.
        if id == -1 || id == i64::from(u32::MAX) {
            return Ok(None);
        }
        match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab_len => Ok(Some(id)),
            _ => Err(self.err(format!(
                "`{key}` = {id} is outside the vocabulary of {vocab_len} tokens"
            ))),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&[GgufValue]>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => Ok(Some(items)),
            Some(other) => Err(self.err(format!(
                "`{key}` is {}, expected an array",
                value_kind(other)
            ))),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                GgufValue::String(s) => Ok(s.as_str()),
                other => Err(self.err(format!(
                    "`{key}`[{i}] is {}, expected a string",
                    value_kind(other)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .map(|item| self.int(key, item))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The variant name of a value, for errors (without printing a whole array).
fn value_kind(value: &GgufValue) -> String {
    match value {
        GgufValue::Array(items) => format!("an array of {} values", items.len()),
        GgufValue::String(_) => "a string".into(),
        other => format!("{other:?}"),
    }
}

impl ModelTokenizer {
    /// Builds the tokenizer a GGUF file's metadata describes, as transformers does when it loads
    /// a GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): a byte-level BPE
    /// model over `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the split that
    /// `tokenizer.ggml.pre` names (see [`SUPPORTED_PRE_TOKENIZERS`]; `smollm` and `starcoder`
    /// isolate every number character first, as llama.cpp and SmolLM2's own `tokenizer.json` do,
    /// while transformers 5.25 applies GPT-2's split alone for them), a byte-level decoder,
    /// control tokens (type 3) as special added tokens and user-defined tokens (type 4) as
    /// added tokens, the BOS/EOS/padding/unknown ids, `add_bos_token`/`add_eos_token` and
    /// `tokenizer.chat_template`.
    ///
    /// `source_name` names the file in errors.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the metadata has no tokenizer or a tokenizer other than
    /// byte-level BPE (`tokenizer.ggml.model = gpt2`), an unknown `tokenizer.ggml.pre`, values of
    /// the wrong type, a `token_type` array whose length differs from `tokens`, a merge that is
    /// not two vocabulary tokens, or a special token id outside the vocabulary.
    pub fn from_gguf_metadata(
        metadata: &BTreeMap<String, GgufValue>,
        source_name: impl Into<String>,
    ) -> Result<Self> {
        let source_name = source_name.into();
        let meta = Meta {
            map: metadata,
            source: &source_name,
        };
        let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
            meta.err("no tokenizer in the metadata (`tokenizer.ggml.model` is missing)")
        })?;
        if model != "gpt2" {
            return Err(meta.err(format!(
                "tokenizer.ggml.model = `{model}` is not supported (only `gpt2`, byte-level BPE)"
            )));
        }
        let pre_name = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let split = pre_split(pre_name).ok_or_else(|| {
            meta.err(format!(
                "tokenizer.ggml.pre = `{pre_name}` is not supported; supported: {}",
                SUPPORTED_PRE_TOKENIZERS.join(", ")
            ))
        })?;
        let tokens = meta
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| meta.err("`tokenizer.ggml.tokens` is missing"))?;
        if tokens.is_empty() {
            return Err(meta.err("`tokenizer.ggml.tokens` is empty"));
        }
        let token_types = meta.ints("tokenizer.ggml.token_type")?;
        if let Some(types) = &token_types
            && types.len() != tokens.len()
        {
            return Err(meta.err(format!(
                "`tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                types.len(),
                tokens.len()
            )));
        }
        let merges = meta.strings("tokenizer.ggml.merges")?.ok_or_else(|| {
            meta.err("`tokenizer.ggml.merges` is missing (byte-level BPE needs it)")
        })?;

        // Tokens are stored in GPT-2's byte alphabet; one spelled otherwise is respelled byte by
        // byte, as transformers does.
        let table = byte_to_char();
        let spelled = |token: &str| -> String {
            if token.chars().all(in_byte_alphabet) {
                token.to_string()
            } else {
                token.bytes().map(|b| table[b as usize]).collect()
            }
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, token)| (spelled(token), id as u32))
            .collect();
        let merges: Merges = merges
            .iter()
            .enumerate()
            .map(|(i, merge)| {
                let mut parts = merge.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                    _ => Err(meta.err(format!(
                        "`tokenizer.ggml.merges`[{i}] = {merge:?} is not two tokens split by one space"
                    ))),
                }
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| meta.err(format!("byte-level BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer(split).map_err(|e| meta.err(e))?));
        inner.with_decoder(Some(ByteLevel::default()));

        let vocab_len = tokens.len();
        let bos_token_id = meta.token_id("tokenizer.ggml.bos_token_id", vocab_len)?;
        let eos_token_id = meta.token_id("tokenizer.ggml.eos_token_id", vocab_len)?;
        let unk_token_id = meta.token_id("tokenizer.ggml.unknown_token_id", vocab_len)?;
        let pad_token_id = meta.token_id("tokenizer.ggml.padding_token_id", vocab_len)?;

        if let Some(types) = &token_types {
            // Control tokens written in the byte alphabet become special; one that is not is a
            // mislabel transformers skips.
            let control = tokens
                .iter()
                .zip(types)
                .filter(|&(token, &ty)| {
                    ty == TOKEN_TYPE_CONTROL && token.chars().all(in_byte_alphabet)
                })
                .map(|(token, _)| AddedToken::from(*token, true).normalized(false));
            inner
                .add_special_tokens(control.collect::<Vec<_>>())
                .map_err(|e| meta.err(format!("adding the control tokens: {e}")))?;
            let user_defined: Vec<AddedToken> = tokens
                .iter()
                .zip(types)
                .filter(|&(token, &ty)| {
                    ty == TOKEN_TYPE_USER_DEFINED && inner.token_to_id(token).is_some()
                })
                .map(|(token, _)| AddedToken::from(*token, false).normalized(false))
                .collect();
            inner
                .add_tokens(user_defined)
                .map_err(|e| meta.err(format!("adding the user-defined tokens: {e}")))?;
        }
        // transformers also registers the named special tokens as special.
        let named: Vec<AddedToken> = [bos_token_id, eos_token_id, unk_token_id, pad_token_id]
            .into_iter()
            .flatten()
            .filter_map(|id| inner.id_to_token(id))
            .map(|token| AddedToken::from(token, true).normalized(false))
            .collect();
        inner
            .add_special_tokens(named)
            .map_err(|e| meta.err(format!("adding the special tokens: {e}")))?;

        let add_bos_token = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos_token = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos_token && bos_token_id.is_none() {
            return Err(meta.err("`add_bos_token` is set but there is no `bos_token_id`"));
        }
        if add_eos_token && eos_token_id.is_none() {
            return Err(meta.err("`add_eos_token` is set but there is no `eos_token_id`"));
        }
        let chat_template = meta.string("tokenizer.chat_template")?.map(str::to_string);
        Ok(Self {
            inner,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            unk_token_id,
            add_bos_token,
            add_eos_token,
            special: SpecialTokens::Explicit {
                bos: bos_token_id.filter(|_| add_bos_token),
                eos: eos_token_id.filter(|_| add_eos_token),
            },
            chat_template,
            source_name,
        })
    }

    /// Reads a GGUF file's metadata and builds its tokenizer (see
    /// [`from_gguf_metadata`](Self::from_gguf_metadata)); errors name the file.
    ///
    /// # Errors
    /// [`ModelError::Gguf`] when the file cannot be read as GGUF; [`ModelError::Tokenizer`] as
    /// for [`from_gguf_metadata`](Self::from_gguf_metadata).
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::gguf::GgufFile::open(path)?;
        Self::from_gguf_metadata(file.metadata(), path.display().to_string())
    }

    /// Loads a Hugging Face tokenizer folder: `tokenizer.json`, and when present
    /// `tokenizer_config.json` (`bos_token`, `eos_token`, `pad_token`, `unk_token`,
    /// `add_bos_token`, `add_eos_token`, `chat_template`) and `chat_template.jinja` (where
    /// transformers 5 saves the template). Truncation and padding saved in `tokenizer.json` are
    /// turned off, as transformers does for a call that does not ask for them. When the config
    /// sets `add_bos_token` or `add_eos_token`, those replace `tokenizer.json`'s post-processor,
    /// as in transformers; otherwise the post-processor adds the special tokens.
    ///
    /// # Errors
    /// [`ModelError::NotFound`] when `tokenizer.json` is missing; [`ModelError::Tokenizer`] when
    /// a file cannot be read or parsed, or names a special token that is not in the vocabulary.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(ModelError::NotFound {
                what: "tokenizer.json".into(),
                path: file,
                hint: "a Hugging Face tokenizer folder holds tokenizer.json (saved by \
                       `save_pretrained`)"
                    .into(),
            });
        }
        let source_name = file.display().to_string();
        let mut inner = Tokenizer::from_file(&file).map_err(|e| ModelError::Tokenizer {
            source_name: source_name.clone(),
            message: format!("cannot load: {e}"),
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                source_name: source_name.clone(),
                message: format!("cannot turn truncation off: {e}"),
            })?;

        let config_file = dir.join("tokenizer_config.json");
        let config_name = config_file.display().to_string();
        let config_err = |message: String| ModelError::Tokenizer {
            source_name: config_name.clone(),
            message,
        };
        let config: serde_json::Map<String, serde_json::Value> = if config_file.is_file() {
            let text = std::fs::read_to_string(&config_file)
                .map_err(|e| config_err(format!("cannot read: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| config_err(format!("not a JSON object: {e}")))?
        } else {
            serde_json::Map::new()
        };
        // A special token is a string or an `AddedToken` object with `content`.
        let token_id = |key: &str| -> Result<Option<u32>> {
            let content = match config.get(key) {
                None | Some(serde_json::Value::Null) => return Ok(None),
                Some(serde_json::Value::String(s)) => s.as_str(),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => s.as_str(),
                    _ => return Err(config_err(format!("`{key}` has no string `content`"))),
                },
                Some(other) => {
                    return Err(config_err(format!(
                        "`{key}` is {other}, expected a token string"
                    )));
                }
            };
            inner.token_to_id(content).map(Some).ok_or_else(|| {
                config_err(format!(
                    "`{key}` = {content:?} is not in the vocabulary of {source_name}"
                ))
            })
        };
        let bos_token_id = token_id("bos_token")?;
        let eos_token_id = token_id("eos_token")?;
        let pad_token_id = token_id("pad_token")?;
        let unk_token_id = token_id("unk_token")?;
        let flag = |key: &str| -> Result<Option<bool>> {
            match config.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(config_err(format!("`{key}` is {other}, expected a bool"))),
            }
        };
        let explicit_bos = flag("add_bos_token")?;
        let explicit_eos = flag("add_eos_token")?;

        let jinja_file = dir.join("chat_template.jinja");
        let chat_template = if jinja_file.is_file() {
            Some(
                std::fs::read_to_string(&jinja_file).map_err(|e| ModelError::Tokenizer {
                    source_name: jinja_file.display().to_string(),
                    message: format!("cannot read: {e}"),
                })?,
            )
        } else {
            match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Several named templates: `[{"name": "default", "template": "..."}, ...]`.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                    .map(str::to_string),
                Some(other) => {
                    return Err(config_err(format!(
                        "`chat_template` is {other}, expected a string"
                    )));
                }
            }
        };

        let mut tokenizer = Self {
            inner,
            source_name,
            bos_token_id,
            eos_token_id,
            pad_token_id,
            unk_token_id,
            add_bos_token: false,
            add_eos_token: false,
            special: SpecialTokens::PostProcessor,
            chat_template,
        };
        if explicit_bos.is_some() || explicit_eos.is_some() {
            let add_bos = explicit_bos.unwrap_or(false) && bos_token_id.is_some();
            let add_eos = explicit_eos.unwrap_or(false) && eos_token_id.is_some();
            tokenizer
                .inner
                .with_post_processor(None::<tokenizers::PostProcessorWrapper>);
            tokenizer.add_bos_token = add_bos;
            tokenizer.add_eos_token = add_eos;
            tokenizer.special = SpecialTokens::Explicit {
                bos: bos_token_id.filter(|_| add_bos),
                eos: eos_token_id.filter(|_| add_eos),
            };
        } else {
            // Read the flags off what the post-processor does to an empty text.
            let ids = tokenizer.encode("", true)?;
            tokenizer.add_bos_token =
                bos_token_id.is_some() && ids.first() == bos_token_id.as_ref();
            tokenizer.add_eos_token = eos_token_id.is_some() && ids.last() == eos_token_id.as_ref();
        }
        Ok(tokenizer)
    }

    fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::Tokenizer {
            source_name: self.source_name.clone(),
            message: message.into(),
        }
    }

    /// The token ids of `text`. Special tokens written in the text (`<|im_start|>`) are matched
    /// whole. With `add_special_tokens`, BOS/EOS are added as the tokenizer is configured to
    /// (transformers' `encode(text, add_special_tokens=...)`).
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the wrapped tokenizer fails.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let post = add_special_tokens && matches!(self.special, SpecialTokens::PostProcessor);
        let encoding = self
            .inner
            .encode(text, post)
            .map_err(|e| self.error(format!("cannot encode: {e}")))?;
        let body = encoding.get_ids();
        match self.special {
            SpecialTokens::Explicit { bos, eos } if add_special_tokens => {
                let mut ids = Vec::with_capacity(body.len() + 2);
                ids.extend(bos);
                ids.extend_from_slice(body);
                ids.extend(eos);
                Ok(ids)
            }
            _ => Ok(body.to_vec()),
        }
    }

    /// The text of `ids`; with `skip_special_tokens`, special tokens are left out. Bytes that do
    /// not form UTF-8 come out as U+FFFD, as in transformers.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode: {e}")))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            Some(id) => Err(self.error(format!(
                "token id {id} is outside the vocabulary of {} tokens",
                self.vocab_size()
            ))),
            None => Ok(()),
        }
    }

    /// An incremental decoder for text generated one token at a time.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_ids: 0,
        }
    }

    /// The number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, written as the vocabulary spells it (byte-level tokens in GPT-2's byte
    /// alphabet, `Ġ` for a space).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id, as the vocabulary spells it.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token (left out by decoding with `skip_special_tokens`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|token| token.special)
    }

    /// The beginning-of-sequence id.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The end-of-sequence id (where generation stops).
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_id
    }

    /// The padding id.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token_id
    }

    /// The unknown-token id.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token_id
    }

    /// The beginning-of-sequence token's text.
    pub fn bos_token(&self) -> Option<String> {
        self.bos_token_id.and_then(|id| self.id_to_token(id))
    }

    /// The end-of-sequence token's text.
    pub fn eos_token(&self) -> Option<String> {
        self.eos_token_id.and_then(|id| self.id_to_token(id))
    }

    /// Whether [`encode`](Self::encode) with special tokens puts BOS in front.
    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    /// Whether [`encode`](Self::encode) with special tokens puts EOS at the end.
    pub fn add_eos_token(&self) -> bool {
        self.add_eos_token
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The chat template, compiled, with this tokenizer's special tokens (`bos_token`,
    /// `eos_token`, `unk_token`, `pad_token`) as template variables, as transformers passes them.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the model has no chat template or it does not compile.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| self.error("the model has no chat template"))?;
        let token = |id: Option<u32>| id.and_then(|id| self.id_to_token(id));
        let mut special = HashMap::new();
        for (name, id) in [
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_id),
            ("unk_token", self.unk_token_id),
            ("pad_token", self.pad_token_id),
        ] {
            if let Some(text) = token(id) {
                special.insert(name.to_string(), text);
            }
        }
        ChatTemplate::new(source, format!("{} (chat template)", self.source_name))
            .map(|t| t.with_variables(special))
    }

    /// Where this tokenizer came from (used in errors).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The wrapped Hugging Face tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

fn pre_tokenizer(split: PreSplit) -> std::result::Result<PreTokenizerWrapper, String> {
    let regex = |pattern: &str| {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("pre-tokenizer regex {pattern:?}: {e}"))
    };
    // GPT-2's split (`use_regex`) inside ByteLevel, no prefix space, as transformers' GPT-2
    // tokenizer; after a separate split, ByteLevel only maps bytes.
    let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
    Ok(match split {
        PreSplit::Gpt2 => byte_level(true).into(),
        // `Digits` isolates each `char::is_numeric` character, llama.cpp's `\p{N}` split, as
        // SmolLM2's own `tokenizer.json` does.
        PreSplit::DigitsThenGpt2 => {
            Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into()
        }
        PreSplit::Regex(pattern) => {
            Sequence::new(vec![regex(pattern)?.into(), byte_level(false).into()]).into()
        }
    })
}

/// Decodes generated ids one at a time into text that can be printed as it comes: a step returns
/// only text that is complete, holding back bytes of a character split across tokens (an emoji or
/// a CJK character in byte-level BPE), so the pieces put together equal a full
/// [`ModelTokenizer::decode`] of all the ids. Call [`flush`](Self::flush) at the end for whatever
/// is held back.
#[derive(Clone, Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a ModelTokenizer,
    skip_special_tokens: bool,
    /// The ids not yet fully printed, after `prefix_ids` ids of context already printed.
    ids: Vec<u32>,
    /// The text of the context ids.
    prefix: String,
    prefix_ids: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes, or `None` while a character is still
    /// incomplete (or the token prints nothing).
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the id is outside the vocabulary.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new = new_text(&self.prefix, &text);
        // Keep only the ids after the old context: they decode to what was just printed and give
        // the next step its context (decoders may treat the first token differently).
        self.ids.drain(..self.prefix_ids);
        self.prefix_ids = self.ids.len();
        self.prefix = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(Some(new))
    }

    /// Returns the text still held back (bytes of an unfinished character come out as U+FFFD)
    /// and starts over.
    ///
    /// # Errors
    /// [`ModelError::Tokenizer`] when the wrapped tokenizer fails.
    pub fn flush(&mut self) -> Result<Option<String>> {
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let new = (text.len() > self.prefix.len()).then(|| new_text(&self.prefix, &text));
        self.ids.clear();
        self.prefix.clear();
        self.prefix_ids = 0;
        Ok(new.filter(|s| !s.is_empty()))
    }
}

/// The part of `text` after `prefix` (after their longest common start when a decoder changed
/// the earlier text).
fn new_text(prefix: &str, text: &str) -> String {
    if let Some(rest) = text.strip_prefix(prefix) {
        return rest.to_string();
    }
    let common = prefix
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(text.len()), |((i, _), _)| i);
    text.get(common..).unwrap_or_default().to_string()
}
