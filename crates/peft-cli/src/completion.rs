//! Completing a prompt with a causal LM: the pieces `burn-peft generate` and the evaluation of
//! `burn-peft train` / `burn-peft eval` share, so that a prompt is rendered, checked and stopped
//! the same way in both.
//!
//! - [`chat_prompt`]: the chat template's rendering of the messages with the generation prompt
//!   of the assistant's turn, tokenized without adding special tokens (the template writes
//!   them); training encodes the prompt before an assistant turn with the same call.
//! - [`stops`]: the end-of-sequence token and, for chat prompts, the end-of-turn markers
//!   ([`END_OF_TURN`]) that are special tokens of the tokenizer.
//! - [`check_prompt`]: ids inside the model's vocabulary and fitting its context.
//! - [`complete`]: generate and decode the whole completion (special tokens left out).

use anyhow::{Context, ensure};
use peft_models::LinearLayer;
use peft_models::chat::{ChatMessage, ChatTemplate};
use peft_models::generate::{Generation, GenerationConfig, generate};
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::tokenizer::ModelTokenizer;

use crate::model;

/// End-of-turn markers of common chat templates; for chat prompts, those that are special
/// tokens of the model's tokenizer stop generation too.
pub const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_turn|>",
];

/// `config` with the tokenizer's end-of-sequence token and, when `chat`, the [`END_OF_TURN`]
/// markers that are special tokens of `tokenizer` as stop tokens.
pub fn stops(
    mut config: GenerationConfig,
    tokenizer: &ModelTokenizer,
    chat: bool,
) -> GenerationConfig {
    if let Some(eos) = tokenizer.eos_token_id() {
        config = config.with_eos(eos);
    }
    if chat {
        let markers = END_OF_TURN
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .filter(|&id| tokenizer.is_special(id));
        config = config.with_stop_tokens(markers);
    }
    config
}

/// The token ids of `messages` rendered by `template` with the generation prompt of the
/// assistant's turn, tokenized without adding special tokens (the template writes them).
///
/// # Errors
/// A template that fails to render, or a tokenizer error.
pub fn chat_prompt(
    tokenizer: &ModelTokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> anyhow::Result<Vec<u32>> {
    let text = template
        .render(messages, true)
        .context("rendering the chat template")?;
    tokenizer
        .encode(&text, false)
        .context("tokenizing the chat prompt")
}

/// The prompt against the model: ids inside its vocabulary (a tokenizer that does not belong to
/// the model gives larger ones) and fitting its context.
///
/// # Errors
/// An id outside the vocabulary, or a prompt that leaves no position for a new token.
pub fn check_prompt(prompt: &[u32], config: &LlamaConfig) -> anyhow::Result<()> {
    let ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    model::check_ids(&ids, config.vocab_size, "the prompt")
        .context("the tokenizer does not match the model")?;
    let context = config.max_position_embeddings;
    ensure!(
        prompt.len() < context,
        "the prompt is too long: {} tokens, but the model's context holds {context} positions \
         (and at least one is needed for a new token)",
        prompt.len()
    );
    Ok(())
}

/// Generate from `prompt` with `config` and decode the generated tokens, special tokens (the
/// stop token among them) left out.
///
/// # Errors
/// Generation errors (an empty prompt, ids outside the vocabulary, a prompt longer than the
/// context) and decoding errors.
pub fn complete<L: LinearLayer>(
    model: &Llama<L>,
    prompt: &[u32],
    config: &GenerationConfig,
    tokenizer: &ModelTokenizer,
) -> anyhow::Result<(String, Generation)> {
    let out = generate(model, prompt, config, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .context("generating")?;
    let text = tokenizer
        .decode(&out.tokens, true)
        .context("decoding the generated tokens")?;
    Ok((text, out))
}
