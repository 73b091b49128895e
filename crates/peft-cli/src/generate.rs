//! `burn-peft generate`: text generation with a causal LM (LLaMA family), streamed to stdout.
//!
//! Only the generated text goes to stdout, printed piece by piece as tokens are chosen (a
//! character split across tokens is held back until it is complete); a final newline is added
//! only when stdout is a terminal. Loading, token counts and speeds go to stderr.
//!
//! The prompt is checked (tokens inside the model's vocabulary, fitting its context) before
//! the weights are loaded.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use burn::tensor::Device;
use peft_models::BaseFormat;
use peft_models::LinearLayer;
use peft_models::chat::ChatMessage;
use peft_models::generate::{Generation, GenerationConfig, StopReason, generate};
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::tokenizer::ModelTokenizer;

use crate::completion;
use crate::model::{self, LlamaJob, ModelSource};

/// Options of `burn-peft generate`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateArgs {
    /// The model: a `.gguf` file, or a Hugging Face LLaMA folder with `tokenizer.json`.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt (the user message with `--chat`).
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt through the model's chat template as a user message, with the
    /// generation prompt of the assistant's turn.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the user's (with `--chat`).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`): LoRA (with
    /// rsLoRA, DoRA, patterns), AdaLoRA, RoSA or SFT, as Python PEFT / `burn-peft train` save
    /// them; or a selective summary folder, or a `full` run's `model.safetensors` (LLaMA).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Merge the adapter into the base weights before generating.
    #[arg(long, requires = "adapter")]
    pub merge: bool,
    /// How the frozen base weights are held: `f32`; `bf16`; `nf4` / `nf4-dq` (QLoRA's 4-bit
    /// NF4, quantized at load; the token table at 16 bits); `gguf` (a GGUF file's own blocks,
    /// never dequantized).
    #[arg(long, default_value = "f32")]
    pub base: BaseFormat,
    /// With `--base gguf`: keep the activations in f32 in decoding steps (the dequantized
    /// model's numbers). By default they are quantized to 8 bits per step as llama.cpp does,
    /// about twice as fast.
    #[arg(long)]
    pub f32_activations: bool,
    /// The most tokens to generate (generation also stops at the end-of-sequence token and at
    /// the end of the model's context).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sample with this temperature (0 means greedy). Without any of `--temperature`,
    /// `--top-p` and `--top-k`, decoding is greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample from the smallest set of most likely tokens whose probabilities reach this mass,
    /// in (0, 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sample among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Seed of the sampler (the same seed and options give the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Run `burn-peft generate`.
///
/// # Errors
/// Bad model, tokenizer, adapter, options or prompt (named); a failed write to stdout.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let source = model::detect(&args.model)?;
    if let ModelSource::HfBert(dir) = &source {
        bail!(
            "{}: a BERT encoder cannot generate text; generate needs a causal language model \
             (LLaMA family, a .gguf file or a folder with model_type `llama`)",
            dir.display()
        );
    }
    let mut config = GenerationConfig::new(args.max_new_tokens).with_seed(args.seed);
    if args.f32_activations {
        config = config.with_f32_activations();
    }
    if let Some(t) = args.temperature {
        config = config.with_temperature(t);
    }
    if let Some(p) = args.top_p {
        config = config.with_top_p(p);
    }
    if let Some(k) = args.top_k {
        config = config.with_top_k(k);
    }
    config.validate().context("invalid generation options")?;

    let tokenizer = model::load_tokenizer(&source)?;
    let prompt = prompt_ids(args, &tokenizer)?;
    let model_config = model::llama_config(&source)?;
    completion::check_prompt(&prompt, &model_config)?;
    let config = completion::stops(config, &tokenizer, args.chat);

    let device = Device::default();
    let start = Instant::now();
    let spinner = model::spinner(format!("loading {}", source.path().display()));
    let mut on_loaded = || {
        spinner.finish_and_clear();
        eprintln!(
            "loaded {} in {:.2} s",
            source.path().display(),
            start.elapsed().as_secs_f64()
        );
    };
    let job = Generate {
        prompt: &prompt,
        config: &config,
        tokenizer: &tokenizer,
        loaded: &mut on_loaded,
    };
    let out = model::with_llama(
        &source,
        args.adapter.as_deref(),
        args.merge,
        args.base,
        &device,
        job,
    );
    spinner.finish_and_clear();
    let out = out?;
    report(&out);
    Ok(())
}

/// The prompt's token ids: the chat template's rendering (with `--chat`, special tokens come
/// from the template), else the text with the tokenizer's own special tokens (BOS) added.
fn prompt_ids(args: &GenerateArgs, tokenizer: &ModelTokenizer) -> anyhow::Result<Vec<u32>> {
    let ids = if args.chat {
        let template = tokenizer
            .chat_template()
            .context("--chat needs the model's chat template")?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        completion::chat_prompt(tokenizer, &template, &messages)?
    } else {
        tokenizer
            .encode(&args.prompt, true)
            .context("tokenizing the prompt")?
    };
    ensure!(!ids.is_empty(), "the prompt is empty (it has no tokens)");
    Ok(ids)
}

/// The generation job: run [`generate`] and stream the text to stdout.
struct Generate<'a> {
    prompt: &'a [u32],
    config: &'a GenerationConfig,
    tokenizer: &'a ModelTokenizer,
    /// Called once the model is loaded, before the prefill.
    loaded: &'a mut dyn FnMut(),
}

impl LlamaJob for Generate<'_> {
    type Output = Generation;

    fn run<L: LinearLayer>(self, model: Llama<L>, _: &LlamaConfig) -> anyhow::Result<Generation> {
        (self.loaded)();
        let mut decoder = self.tokenizer.stream_decoder(true);
        let mut stdout = Output {
            out: std::io::stdout().lock(),
            closed: false,
        };
        let mut failure: Option<anyhow::Error> = None;
        let out = generate(&model, self.prompt, self.config, |id| {
            let written = match decoder.step(id).context("decoding a generated token") {
                Ok(Some(text)) => stdout.write(&text),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match written {
                Ok(()) if !stdout.closed => ControlFlow::Continue(()),
                Ok(()) => ControlFlow::Break(()),
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .context("generating")?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(rest) = decoder.flush().context("decoding the generated tokens")? {
            stdout.write(&rest)?;
        }
        if std::io::stdout().is_terminal() {
            stdout.write("\n")?;
        }
        Ok(out)
    }
}

/// Locked stdout that notes when its reader went away (a closed pipe ends generation quietly,
/// as when the output is piped into `head`).
struct Output {
    out: std::io::StdoutLock<'static>,
    closed: bool,
}

impl Output {
    /// Write and flush `text`, unless the reader has gone.
    ///
    /// # Errors
    /// Write errors other than a closed pipe.
    fn write(&mut self, text: &str) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        match self
            .out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
        {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => other.context("writing to stdout"),
        }
    }
}

/// Token counts and speeds on stderr.
fn report(out: &Generation) {
    let stop = match out.stop {
        StopReason::Eos => "end of sequence".to_string(),
        StopReason::StopToken(id) => format!("stop token {id}"),
        StopReason::MaxNewTokens => "--max-new-tokens reached".to_string(),
        StopReason::ContextFull => "context full".to_string(),
        StopReason::Callback => "output closed".to_string(),
    };
    eprintln!(
        "prompt tokens: {}, generated tokens: {} (stopped: {stop})",
        out.prompt_tokens,
        out.tokens.len()
    );
    if out.tokens.is_empty() {
        return;
    }
    eprintln!(
        "prefill: {:.1} tokens/s ({:.3} s), decode: {:.1} tokens/s ({:.3} s)",
        out.prefill_tokens_per_s(),
        out.prefill_time.as_secs_f64(),
        out.decode_tokens_per_s(),
        out.decode_time.as_secs_f64()
    );
}
