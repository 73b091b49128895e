//! Text generation with a [`Llama`]: greedy decoding or sampling (temperature, top-k, top-p)
//! from a seeded generator, a key/value cache so each new token runs one position through the
//! model, stop tokens, a context limit, and a callback per generated token for streaming.
//!
//! Generation takes any `&Llama<L>`, so it runs with adapters active: a
//! `Llama<PeftLinear<LoraAdapter>>` inside a `LoraModel` (unmerged, or several adapters mixed with
//! `add_weighted_adapter`), or a merged model.
//!
//! ```
//! use std::ops::ControlFlow;
//! use std::path::Path;
//!
//! use burn::nn::Linear;
//! use burn::tensor::Device;
//! use peft_models::generate::{GenerationConfig, StopReason, generate};
//! use peft_models::llama::Llama;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama/untied");
//! let (llama, _) = Llama::<Linear>::from_pretrained(&dir, &Device::flex())?;
//! let config = GenerationConfig::new(5); // greedy, 5 new tokens at most
//! let mut streamed = Vec::new();
//! let out = generate(&llama, &[1, 5, 9], &config, |id| {
//!     streamed.push(id); // a CLI would print the decoded text here
//!     ControlFlow::Continue(())
//! })?;
//! assert_eq!(out.tokens, streamed);
//! assert_eq!((out.tokens.len(), out.stop), (5, StopReason::MaxNewTokens));
//! # Ok(()) }
//! ```

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{ModelError, Result};
use crate::layers::LinearLayer;
use crate::llama::Llama;

/// How to generate: greedy unless a sampling option (`temperature`, `top_k`, `top_p`) is set.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// Divide the logits by this before sampling; `Some(0.0)` means greedy.
    pub temperature: Option<f64>,
    /// Sample among the `top_k` most likely tokens only.
    pub top_k: Option<usize>,
    /// Sample among the smallest set of most likely tokens whose probabilities sum to at least
    /// `top_p` (nucleus sampling), in `(0, 1]`.
    pub top_p: Option<f64>,
    /// Seed of the sampler's random generator (sampling with the same seed repeats).
    pub seed: u64,
    /// The end-of-sequence token: generation stops after emitting it.
    pub eos_token_id: Option<u32>,
    /// More tokens that stop generation after being emitted (chat end-of-turn markers).
    pub stop_token_ids: Vec<u32>,
    /// The most positions (prompt and generated tokens) a sequence may have; the model's
    /// `max_position_embeddings` when `None`.
    pub max_context: Option<usize>,
    /// Decoding steps over weights kept packed in ggml's `Q4_0` / `Q4_1` / `Q8_0` blocks
    /// quantize the activation row to 8 bits and take integer block dots, as llama.cpp does
    /// (`peft_kernels::quant::q8`; about 2x faster decoding). `false` keeps f32 activations: the
    /// numbers of the dequantized model. No effect on other bases.
    pub q8_activations: bool,
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens, without stop tokens, seed 0, the
    /// model's context.
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: None,
            top_k: None,
            top_p: None,
            seed: 0,
            eos_token_id: None,
            stop_token_ids: Vec::new(),
            max_context: None,
            q8_activations: true,
        }
    }

    /// Sample with this temperature.
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = Some(temperature);
        self
    }

    /// Sample among the `k` most likely tokens.
    pub fn with_top_k(mut self, k: usize) -> Self {
        self.top_k = Some(k);
        self
    }

    /// Nucleus sampling with mass `p`.
    pub fn with_top_p(mut self, p: f64) -> Self {
        self.top_p = Some(p);
        self
    }

    /// The seed of the sampler.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Stop after this end-of-sequence token.
    pub fn with_eos(mut self, id: u32) -> Self {
        self.eos_token_id = Some(id);
        self
    }

    /// Stop after any of these tokens too.
    pub fn with_stop_tokens(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.stop_token_ids.extend(ids);
        self
    }

    /// Limit the positions of a sequence (prompt and generated tokens).
    pub fn with_max_context(mut self, positions: usize) -> Self {
        self.max_context = Some(positions);
        self
    }

    /// Keep f32 activations in decoding steps over packed ggml blocks (see
    /// [`q8_activations`](Self::q8_activations)).
    pub fn with_f32_activations(mut self) -> Self {
        self.q8_activations = false;
        self
    }

    /// Whether tokens are drawn at random (a sampling option is set and the temperature is not
    /// 0).
    pub fn is_sampling(&self) -> bool {
        self.temperature != Some(0.0)
            && (self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some())
    }

    /// Check the options.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] for a negative or non-finite temperature, `top_k` 0 or a
    /// `top_p` outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(ModelError::InvalidInput {
                field: field.into(),
                reason,
            })
        };
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return bad("temperature", format!("{t} must be finite and >= 0"));
        }
        if self.top_k == Some(0) {
            return bad("top_k", "must be at least 1".into());
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad("top_p", format!("{p} must be in (0, 1]"));
        }
        Ok(())
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The end-of-sequence token was generated (it is the last of the tokens).
    Eos,
    /// A stop token was generated (it is the last of the tokens).
    StopToken(u32),
    /// `max_new_tokens` tokens were generated.
    MaxNewTokens,
    /// The sequence reached the context limit.
    ContextFull,
    /// The callback asked to stop.
    Callback,
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated tokens (without the prompt), including a final stop token.
    pub tokens: Vec<u32>,
    /// Why generation ended.
    pub stop: StopReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time spent on the prompt (prefill, up to the first token's logits).
    pub prefill_time: Duration,
    /// Time spent on the decoding steps after the first token.
    pub decode_time: Duration,
}

impl Generation {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-12)
    }

    /// Tokens per second of the decoding steps (one step per generated token after the first).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-12)
    }
}

/// A token picker: greedy (arg max, the first on ties) or sampling with temperature, top-k and
/// top-p applied in that order (as Transformers' logits warpers), from a seeded SplitMix64
/// generator.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    sampling: bool,
    state: u64,
}

impl Sampler {
    /// A sampler for `config`'s options.
    ///
    /// # Errors
    /// As [`GenerationConfig::validate`].
    pub fn new(config: &GenerationConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            temperature: config.temperature.unwrap_or(1.0),
            top_k: config.top_k,
            top_p: config.top_p,
            sampling: config.is_sampling(),
            state: config.seed,
        })
    }

    /// The next token for the logits of one position `[vocab]`.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if !self.sampling {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        if let Some(k) = self.top_k.filter(|&k| k < order.len()) {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        // Softmax of logits / temperature over the candidates, most likely first.
        let top = f64::from(logits[order[0]]);
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i]) - top) / self.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.top_p {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    mass += q;
                    mass >= p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.next_f64() * total;
        for (i, q) in probs.iter().enumerate() {
            if u < *q {
                return order[i] as u32;
            }
            u -= q;
        }
        order[probs.len() - 1] as u32
    }

    /// A uniform draw in `[0, 1)` (SplitMix64, 53 bits).
    fn next_f64(&mut self) -> f64 {
        let z = peft_core::rng::splitmix64(&mut self.state);
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the largest value (the first on ties, NaN never chosen over a number).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Generate up to `config.max_new_tokens` tokens after `prompt` with `model`, calling
/// `on_token` with each new token as soon as it is chosen (return
/// [`ControlFlow::Break`] to stop).
///
/// The prompt runs through the model once (prefill), then each new token is one cached
/// decoding step ([`Llama::forward_cached_last`]); the cache is allocated once for the whole
/// sequence.
///
/// # Errors
/// [`ModelError::InvalidInput`] for an empty prompt or invalid options,
/// [`ModelError::TokenOutOfVocab`] for a prompt id outside the vocabulary,
/// [`ModelError::PromptTooLong`] for a prompt longer than the context.
pub fn generate<L: LinearLayer>(
    model: &Llama<L>,
    prompt: &[u32],
    config: &GenerationConfig,
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    if config.q8_activations {
        peft_kernels::quant::q8::with_q8_activations(|| {
            generate_with(model, prompt, config, on_token)
        })
    } else {
        generate_with(model, prompt, config, on_token)
    }
}

fn generate_with<L: LinearLayer>(
    model: &Llama<L>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(config)?;
    if prompt.is_empty() {
        return Err(ModelError::InvalidInput {
            field: "prompt".into(),
            reason: "generation needs at least one prompt token".into(),
        });
    }
    let vocab_size = model.vocab_size();
    if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ModelError::TokenOutOfVocab {
            id: id.into(),
            vocab_size,
        });
    }
    let context = config
        .max_context
        .unwrap_or(model.model.max_position_embeddings);
    if prompt.len() > context {
        return Err(ModelError::PromptTooLong {
            prompt_len: prompt.len(),
            context,
        });
    }
    // The last generated token is never fed back, so the cache needs one position less than
    // the whole sequence.
    let length = context.min(prompt.len() + config.max_new_tokens);
    let device = model.model.embed_tokens.weight.device();
    let mut cache = model.new_cache(1, length.max(prompt.len()));
    let ids = |tokens: &[u32]| {
        let data: Vec<i64> = tokens.iter().map(|&t| t.into()).collect();
        Tensor::<2, Int>::from_data(TensorData::new(data, [1, tokens.len()]), &device)
    };
    let mut out = Generation {
        tokens: Vec::new(),
        stop: StopReason::MaxNewTokens,
        prompt_tokens: prompt.len(),
        prefill_time: Duration::ZERO,
        decode_time: Duration::ZERO,
    };
    if config.max_new_tokens == 0 {
        return Ok(out);
    }
    if prompt.len() == context {
        out.stop = StopReason::ContextFull;
        return Ok(out);
    }
    let start = Instant::now();
    let mut logits = model.forward_cached_last(ids(prompt), &mut cache)?;
    let mut decode_start = None;
    loop {
        let row: Vec<f32> = logits.into_data().iter::<f32>().collect();
        let token = sampler.pick(&row);
        let now = Instant::now();
        match decode_start {
            None => {
                out.prefill_time = now - start;
                decode_start = Some(now);
            }
            Some(t) => out.decode_time = now - t,
        }
        out.tokens.push(token);
        if config.eos_token_id == Some(token) {
            out.stop = StopReason::Eos;
            break;
        }
        if config.stop_token_ids.contains(&token) {
            out.stop = StopReason::StopToken(token);
            break;
        }
        if on_token(token).is_break() {
            out.stop = StopReason::Callback;
            break;
        }
        if out.tokens.len() == config.max_new_tokens {
            out.stop = StopReason::MaxNewTokens;
            break;
        }
        if prompt.len() + out.tokens.len() >= context {
            out.stop = StopReason::ContextFull;
            break;
        }
        logits = model.forward_cached_last(ids(&[token]), &mut cache)?;
    }
    Ok(out)
}
