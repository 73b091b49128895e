//! Evaluation of a model on an eval set, shared by `burn-peft train` (every `eval_every` steps
//! and at the end) and `burn-peft eval`: the loss with the training masks, and the exact match
//! of greedy completions.
//!
//! Exact match: each [`Target`] prompt (encoded as training encodes it) is completed greedily
//! with the shared [`crate::completion`] code, up to the reference completion's token count
//! plus [`MARGIN`] new tokens, stopping at the end-of-sequence token (and, through the chat
//! template, at the template's end-of-turn marker). The generated text (special tokens left
//! out) matches when it equals the reference after both are trimmed of surrounding whitespace
//! ([`matches`]); nothing else is normalised (case, inner spaces and punctuation count). A
//! prompt that leaves no room in the model's context for a new token counts as a miss.
//!
//! Evaluation runs on the model without autodiff (`valid()`, so no dropout), with greedy
//! decoding (no draw from any random generator), and leaves no state behind: training is the
//! same with or without it.

use anyhow::Context;
use burn::module::Module;
use burn::tensor::Device;
use peft_models::LinearLayer;
use peft_models::generate::GenerationConfig;
use peft_models::llama::Llama;
use peft_models::tokenizer::ModelTokenizer;
use serde_json::{Map, Value};

use crate::completion;
use crate::train::data::{self, Dataset, Target};

/// New tokens allowed beyond the reference completion's own token count (the reference
/// tokenized alone may split differently than after the prompt; the end-of-turn marker needs
/// one or two).
pub const MARGIN: usize = 4;

/// An eval set and how to score it.
pub struct Evaluation<'a> {
    /// The examples and their targets.
    pub set: &'a Dataset,
    /// The model's tokenizer (to count reference tokens and decode completions).
    pub tokenizer: &'a ModelTokenizer,
    /// Whether the prompts went through the chat template (its end-of-turn markers stop
    /// generation).
    pub chat: bool,
    /// Examples per loss batch.
    pub batch_size: usize,
    /// Whether to generate and match completions (`false`: the loss alone, as `[train]
    /// eval_generate = false` asks for training's evaluations).
    pub generate: bool,
}

/// What an evaluation measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// The mean loss per counted label.
    pub loss: f64,
    /// Targets whose greedy completion matched.
    pub matched: usize,
    /// Targets (examples with a completion) that were completed; 0 when the evaluation did
    /// not generate.
    pub targets: usize,
    /// The greedy completion of each target, in the eval set's order (empty when the
    /// evaluation did not generate).
    pub completions: Vec<Completion>,
}

/// One target's greedy completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The target's line in the eval file (1-based).
    pub line: usize,
    /// The generated text (special tokens left out).
    pub generated: String,
    /// Whether it matched the reference ([`matches`]).
    pub matched: bool,
}

impl Scores {
    /// The fraction of targets matched; `None` when the set has no completions.
    pub fn accuracy(&self) -> Option<f64> {
        (self.targets > 0).then(|| self.matched as f64 / self.targets as f64)
    }

    /// `eval_loss`, and `eval_accuracy` when the set has completions.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut json = Map::new();
        json.insert("eval_loss".into(), self.loss.into());
        if let Some(a) = self.accuracy() {
            json.insert("eval_accuracy".into(), a.into());
        }
        json
    }
}

/// Score `model` (on `device`, with or without autodiff) on `eval`.
///
/// # Errors
/// Loss, generation or decoding errors.
pub fn evaluate<L: LinearLayer>(
    model: &Llama<L>,
    eval: &Evaluation<'_>,
    device: &Device,
) -> anyhow::Result<Scores> {
    let model = model.valid();
    let device = device.clone().inner();
    let loss = loss(&model, eval.set, eval.batch_size, &device)?;
    let completions = if eval.generate {
        complete_all(&model, eval)?
    } else {
        Vec::new()
    };
    Ok(Scores {
        loss,
        matched: completions.iter().filter(|c| c.matched).count(),
        targets: completions.len(),
        completions,
    })
}

/// The mean loss over `set` in batches of `batch_size`, weighted by counted labels.
fn loss<L: LinearLayer>(
    model: &Llama<L>,
    set: &Dataset,
    batch_size: usize,
    device: &Device,
) -> anyhow::Result<f64> {
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in set.examples.chunks(batch_size) {
        let refs: Vec<_> = chunk.iter().collect();
        let b = data::batch(&refs, device);
        let n = chunk
            .iter()
            .map(|e| e.labels.iter().skip(1).filter(|&&l| l >= 0).count())
            .sum::<usize>();
        let loss = model
            .causal_lm_loss(b.ids, Some(b.mask), b.labels)?
            .into_scalar::<f64>();
        sum += loss * n as f64;
        count += n;
    }
    Ok(sum / count.max(1) as f64)
}

/// The greedy completion of every target of `eval`.
fn complete_all<L: LinearLayer>(
    model: &Llama<L>,
    eval: &Evaluation<'_>,
) -> anyhow::Result<Vec<Completion>> {
    let context = model.model.max_position_embeddings;
    let mut done = Vec::with_capacity(eval.set.targets.len());
    for target in &eval.set.targets {
        let generated = completes(model, target, eval, context)?;
        let matched = generated
            .as_deref()
            .is_some_and(|g| matches(g, &target.completion));
        done.push(Completion {
            line: target.line,
            generated: generated.unwrap_or_default(),
            matched,
        });
    }
    Ok(done)
}

/// The greedy completion of `target`'s prompt; `None` when the prompt leaves no room.
fn completes<L: LinearLayer>(
    model: &Llama<L>,
    target: &Target,
    eval: &Evaluation<'_>,
    context: usize,
) -> anyhow::Result<Option<String>> {
    if target.prompt.is_empty() || target.prompt.len() >= context {
        return Ok(None);
    }
    let reference = eval
        .tokenizer
        .encode(&target.completion, false)
        .context("tokenizing a reference completion")?;
    let config = completion::stops(
        GenerationConfig::new(reference.len() + MARGIN),
        eval.tokenizer,
        eval.chat,
    );
    let (text, _) = completion::complete(model, &target.prompt, &config, eval.tokenizer)?;
    Ok(Some(text))
}

/// Exact match after trimming surrounding whitespace from both texts.
pub fn matches(generated: &str, reference: &str) -> bool {
    generated.trim() == reference.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_surrounding_whitespace_is_ignored() {
        assert!(matches(" t3 t2\n", "t3 t2"));
        assert!(!matches("t3  t2", "t3 t2"));
        assert!(!matches("T3 t2", "t3 t2"));
        let none = Scores {
            loss: 1.0,
            matched: 0,
            targets: 0,
            completions: Vec::new(),
        };
        assert_eq!(none.accuracy(), None);
        assert!(!none.to_json().contains_key("eval_accuracy"));
        let some = Scores {
            matched: 1,
            targets: 4,
            ..none.clone()
        };
        assert_eq!(some.to_json()["eval_accuracy"], 0.25);
    }
}
