//! Training data for `burn-peft train`: JSONL files of `{"prompt","completion"}`,
//! `{"messages":[{"role","content"}]}` or `{"text"}` objects, tokenized into examples with
//! labels, and batched in a deterministic order.
//!
//! Prompt/completion and messages examples go through the model's chat template when the run
//! asks for it; the loss counts only completion / assistant tokens (every other label is
//! [`IGNORE_INDEX`]). `{"text"}` examples count every token.
//!
//! Each prompt/completion example, and each messages example whose last message is the
//! assistant's, also gives a [`Target`]: the prompt's ids as training encodes them (up to the
//! assistant's generation prompt) and the reference completion, for exact-match evaluation.

use std::path::Path;

use anyhow::{Context, bail, ensure};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_models::chat::{ChatMessage, ChatTemplate};
use peft_models::loss::IGNORE_INDEX;
use peft_models::tokenizer::ModelTokenizer;
use serde::Deserialize;

use crate::completion::chat_prompt;

/// One line of a data file.
#[derive(Debug)]
enum Record {
    /// A prompt and the completion to learn.
    Completion(CompletionRecord),
    /// A conversation; the assistant turns are learned.
    Chat(ChatRecord),
    /// Plain text, learned in full.
    Text(TextRecord),
}

/// `{"prompt", "completion"}`.
#[derive(Debug, Deserialize)]
struct CompletionRecord {
    prompt: String,
    completion: String,
}

/// `{"messages": [{"role", "content"}]}`.
#[derive(Debug, Deserialize)]
struct ChatRecord {
    messages: Vec<Message>,
}

/// `{"text"}`.
#[derive(Debug, Deserialize)]
struct TextRecord {
    text: String,
}

impl Record {
    /// The record of one parsed line, its kind told by its fields; the error says what is
    /// wrong (a missing field, a value of the wrong type, an unknown shape).
    fn parse(value: serde_json::Value) -> Result<Self, String> {
        let Some(object) = value.as_object() else {
            return Err(format!("expected a JSON object, found `{value}`"));
        };
        let has = |k: &str| object.contains_key(k);
        // Name the field whose value has the wrong type (serde's message does not).
        let strings = |v: &serde_json::Value, fields: &[&str], at: &str| -> Result<(), String> {
            for f in fields {
                match v.get(f) {
                    Some(serde_json::Value::String(_)) | None => {}
                    Some(other) => {
                        return Err(format!("`{at}{f}` must be a string, found `{other}`"));
                    }
                }
            }
            Ok(())
        };
        strings(&value, &["prompt", "completion", "text"], "")?;
        if let Some(messages) = object.get("messages") {
            let Some(list) = messages.as_array() else {
                return Err(format!("`messages` must be a list, found `{messages}`"));
            };
            for (i, m) in list.iter().enumerate() {
                if !m.is_object() {
                    return Err(format!("`messages[{i}]` must be an object, found `{m}`"));
                }
                strings(m, &["role", "content"], &format!("messages[{i}]."))?;
            }
        }
        let parsed = if has("messages") {
            serde_json::from_value(value).map(Record::Chat)
        } else if has("prompt") || has("completion") {
            serde_json::from_value(value).map(Record::Completion)
        } else if has("text") {
            serde_json::from_value(value).map(Record::Text)
        } else {
            return Err(
                "expected {\"prompt\", \"completion\"}, {\"messages\": [{\"role\", \"content\"}]} \
                 or {\"text\"}, found none of these fields"
                    .into(),
            );
        };
        parsed.map_err(|e| e.to_string())
    }
}

/// One chat turn.
#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// A tokenized example: ids and their labels ([`IGNORE_INDEX`] where the loss does not count).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<i64>,
    /// Labels, the same length.
    pub labels: Vec<i64>,
}

/// A prompt and the completion the model should give, for exact-match evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The prompt's token ids, as training encodes the prompt (through the chat template up to
    /// the assistant's generation prompt, or the prompt text with the tokenizer's special
    /// tokens), never truncated.
    pub prompt: Vec<u32>,
    /// The reference completion text.
    pub completion: String,
    /// The example's line in its data file (1-based), so scores can be joined with the
    /// file's other fields.
    pub line: usize,
}

/// The examples of one file, and how many were truncated or left out.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// The targets of the kept examples that have a completion, in file order.
    pub targets: Vec<Target>,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Examples left with no label to learn after truncation (dropped).
    pub dropped: usize,
}

/// How text becomes examples.
pub struct Encoder<'a> {
    tokenizer: &'a ModelTokenizer,
    template: Option<ChatTemplate>,
    max_seq_len: usize,
}

impl<'a> Encoder<'a> {
    /// An encoder with `tokenizer`, through its chat template when `chat_template`.
    ///
    /// # Errors
    /// `chat_template` is asked for but the model has none (or it does not compile).
    pub fn new(
        tokenizer: &'a ModelTokenizer,
        chat_template: bool,
        max_seq_len: usize,
    ) -> anyhow::Result<Self> {
        let template = if chat_template {
            Some(tokenizer.chat_template().context(
                "[data] chat_template = true, but the model's chat template is not usable (set \
                 chat_template = false to train on raw text)",
            )?)
        } else {
            None
        };
        Ok(Self {
            tokenizer,
            template,
            max_seq_len,
        })
    }

    fn ids(&self, text: &str, special: bool) -> anyhow::Result<Vec<i64>> {
        let ids = self.tokenizer.encode(text, special)?;
        Ok(ids.into_iter().map(i64::from).collect())
    }

    /// The example of one record, untruncated, and its target when it has a completion.
    fn encode(&self, record: Record) -> anyhow::Result<(Example, Option<Target>)> {
        match (record, &self.template) {
            (Record::Text(TextRecord { text }), _) => {
                let ids = self.ids(&text, true)?;
                let example = Example {
                    labels: ids.clone(),
                    ids,
                };
                Ok((example, None))
            }
            (Record::Completion(CompletionRecord { prompt, completion }), Some(template)) => {
                let messages = [
                    ChatMessage::user(prompt),
                    ChatMessage::assistant(completion),
                ];
                self.chat(template, &messages)
            }
            (Record::Completion(CompletionRecord { prompt, completion }), None) => {
                let prompt_ids = self.ids(&prompt, true)?;
                let mut ids = self.ids(&format!("{prompt}{completion}"), true)?;
                if let Some(eos) = self.tokenizer.eos_token_id() {
                    ids.push(i64::from(eos));
                }
                let cut = common_prefix(&prompt_ids, &ids);
                let labels = masked(&ids, &[(cut, ids.len())]);
                let target = Target {
                    prompt: to_u32(&prompt_ids),
                    completion,
                    line: 0,
                };
                Ok((Example { ids, labels }, Some(target)))
            }
            (Record::Chat(ChatRecord { messages }), Some(template)) => {
                let messages: Vec<ChatMessage> = messages
                    .into_iter()
                    .map(|m| ChatMessage::new(m.role, m.content))
                    .collect();
                self.chat(template, &messages)
            }
            (Record::Chat(_), None) => {
                bail!("a `messages` example needs the chat template ([data] chat_template = true)")
            }
        }
    }

    /// Render `messages`; the labels are the tokens of each assistant turn (from the end of
    /// the generation prompt before it to the end of the turn). When the last message is the
    /// assistant's, the target is the prompt before it and its content.
    fn chat(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
    ) -> anyhow::Result<(Example, Option<Target>)> {
        ensure!(
            messages.iter().any(|m| m.role == "assistant"),
            "no assistant message: nothing to learn"
        );
        let ids = self.ids(&template.render(messages, false)?, false)?;
        let mut spans = Vec::new();
        let mut target = None;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = chat_prompt(self.tokenizer, template, &messages[..i])?;
            let through = self.ids(&template.render(&messages[..=i], false)?, false)?;
            let before_ids: Vec<i64> = before.iter().map(|&t| i64::from(t)).collect();
            spans.push((
                common_prefix(&before_ids, &ids),
                through.len().min(ids.len()),
            ));
            if i + 1 == messages.len() {
                target = Some(Target {
                    prompt: before,
                    completion: m.content.clone(),
                    line: 0,
                });
            }
        }
        let labels = masked(&ids, &spans);
        Ok((Example { ids, labels }, target))
    }

    /// Read and tokenize `file`.
    ///
    /// # Errors
    /// An unreadable file, a malformed line (file, line number and what is wrong), a token
    /// outside the model's vocabulary, or no example at all.
    pub fn read(&self, file: &Path, vocab_size: usize) -> anyhow::Result<Dataset> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the data file {}", file.display()))?;
        let mut set = Dataset {
            examples: Vec::new(),
            targets: Vec::new(),
            truncated: 0,
            dropped: 0,
        };
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", file.display(), n + 1);
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            let record = Record::parse(value).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
            let (mut example, mut target) = self.encode(record).with_context(at)?;
            if let Some(t) = &mut target {
                t.line = n + 1;
            }
            if let Some(bad) = example
                .ids
                .iter()
                .find(|&&t| t < 0 || t as usize >= vocab_size)
            {
                bail!(
                    "{}: token id {bad} is outside the model's vocabulary (0..{vocab_size})",
                    at()
                );
            }
            if example.ids.len() > self.max_seq_len {
                example.ids.truncate(self.max_seq_len);
                example.labels.truncate(self.max_seq_len);
                set.truncated += 1;
            }
            // The first label is never predicted (the loss is shifted).
            if example.labels.iter().skip(1).all(|&l| l == IGNORE_INDEX) {
                set.dropped += 1;
                continue;
            }
            set.examples.push(example);
            set.targets.extend(target);
        }
        ensure!(
            !set.examples.is_empty(),
            "{}: empty dataset: no example with a token to learn ({} dropped after truncation)",
            file.display(),
            set.dropped
        );
        Ok(set)
    }
}

/// Token ids as the tokenizer gives them (the encoder's ids come from it, so they fit).
fn to_u32(ids: &[i64]) -> Vec<u32> {
    ids.iter().map(|&t| t as u32).collect()
}

/// The length of the common prefix of `a` and `b`.
fn common_prefix(a: &[i64], b: &[i64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `ids` as labels inside `spans` (half-open), [`IGNORE_INDEX`] elsewhere.
fn masked(ids: &[i64], spans: &[(usize, usize)]) -> Vec<i64> {
    ids.iter()
        .enumerate()
        .map(|(i, &t)| {
            if spans.iter().any(|&(a, b)| i >= a && i < b) {
                t
            } else {
                IGNORE_INDEX
            }
        })
        .collect()
}

/// A padded batch: ids, attention mask and labels `[batch, seq]`, and its number of tokens.
pub struct Batch {
    /// Token ids (padding: 0).
    pub ids: Tensor<2, Int>,
    /// 1 for tokens, 0 for padding.
    pub mask: Tensor<2, Int>,
    /// Labels ([`IGNORE_INDEX`] on padding).
    pub labels: Tensor<2, Int>,
    /// Tokens that are not padding.
    pub tokens: usize,
}

/// Pad `examples` on the right into one batch on `device`.
pub fn batch(examples: &[&Example], device: &Device) -> Batch {
    let seq = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let n = examples.len();
    let (mut ids, mut mask, mut labels) = (
        vec![0i64; n * seq],
        vec![0i64; n * seq],
        vec![IGNORE_INDEX; n * seq],
    );
    let mut tokens = 0;
    for (row, e) in examples.iter().enumerate() {
        for (j, (&t, &l)) in e.ids.iter().zip(&e.labels).enumerate() {
            ids[row * seq + j] = t;
            mask[row * seq + j] = 1;
            labels[row * seq + j] = l;
        }
        tokens += e.ids.len();
    }
    let tensor = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [n, seq]), device);
    Batch {
        ids: tensor(ids),
        mask: tensor(mask),
        labels: tensor(labels),
        tokens,
    }
}

/// The example order of pass `epoch` over `n` examples: a permutation from `seed` and the
/// epoch (a Fisher-Yates shuffle driven by SplitMix64), the same on every machine.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    peft_core::rng::shuffled(n, seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The examples of micro-batch `index` (0-based over the whole run): consecutive slices of
/// the epoch orders, `batch_size` at a time, a batch never spanning two epochs.
pub fn micro_batch(n: usize, batch_size: usize, seed: u64, index: usize) -> Vec<usize> {
    let batch_size = batch_size.min(n);
    let per_epoch = n / batch_size;
    let (epoch, within) = (index / per_epoch, index % per_epoch);
    let order = epoch_order(n, seed, epoch as u64);
    order[within * batch_size..(within + 1) * batch_size].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_is_a_seeded_permutation() {
        let a = epoch_order(10, 3, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(10, 3, 0));
        assert_ne!(a, epoch_order(10, 3, 1));
        assert_eq!(micro_batch(10, 4, 3, 0), a[..4]);
        assert_eq!(micro_batch(10, 4, 3, 2), epoch_order(10, 3, 1)[..4]);
    }

    #[test]
    fn labels_outside_the_spans_are_ignored() {
        assert_eq!(
            masked(&[5, 6, 7], &[(1, 2)]),
            vec![IGNORE_INDEX, 6, IGNORE_INDEX]
        );
    }
}
