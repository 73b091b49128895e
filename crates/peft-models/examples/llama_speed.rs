//! Prefill and decode speed of [`generate`] (greedy, key/value cache) on a LLaMA model.
//!
//! ```sh
//! # A Hugging Face folder (config.json + model.safetensors or shards):
//! cargo run --release -p peft-models --example llama_speed -- path/to/model
//! # No folder: a randomly initialised model of SmolLM2-135M's shapes (speed does not depend on
//! # the weights' values):
//! cargo run --release -p peft-models --example llama_speed
//! # Options: --prompt N (prompt tokens, default 64), --new N (tokens to generate, default 128),
//! # --runs N (default 3; the best run is reported).
//! ```
//!
//! Prints prefill tokens/s (prompt tokens over the time to the first token's logits) and decode
//! tokens/s (one cached step per token after the first).

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::nn::Linear;
use burn::tensor::Device;
use peft_models::generate::{GenerationConfig, generate};
use peft_models::llama::{Llama, LlamaConfig};

fn smollm2_135m_shapes() -> LlamaConfig {
    let mut config = LlamaConfig::new(49152, 576, 1536, 30, 9);
    config.num_key_value_heads = 3;
    config.rope_theta = 100000.0;
    config.rms_norm_eps = 1e-5;
    config.max_position_embeddings = 8192;
    config.tie_word_embeddings = true;
    config
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut folder = None;
    let (mut prompt_len, mut new_tokens, mut runs) = (64usize, 128usize, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> Result<usize, Box<dyn std::error::Error>> {
            Ok(args.next().ok_or(format!("{arg} needs a value"))?.parse()?)
        };
        match arg.as_str() {
            "--prompt" => prompt_len = value()?,
            "--new" => new_tokens = value()?,
            "--runs" => runs = value()?,
            _ => folder = Some(PathBuf::from(arg)),
        }
    }
    let device = Device::flex();
    let (model, config) = match &folder {
        Some(dir) => Llama::<Linear>::from_pretrained(dir, &device)?,
        None => {
            let config = smollm2_135m_shapes();
            (Llama::<Linear>::new(&config, &device), config)
        }
    };
    let name = folder.map_or("random SmolLM2-135M shapes".into(), |d| {
        d.display().to_string()
    });
    println!(
        "{name}: {} layers, hidden {}, {} heads / {} kv heads, vocab {}",
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size
    );
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|i| ((i * 7919 + 11) % config.vocab_size) as u32)
        .collect();
    let gen_config = GenerationConfig::new(new_tokens);
    let (mut best_prefill, mut best_decode) = (0f64, 0f64);
    for run in 0..runs.max(1) {
        let out = generate(&model, &prompt, &gen_config, |_| ControlFlow::Continue(()))?;
        println!(
            "run {run}: prefill {} tokens {:.1} tok/s, decode {} tokens {:.1} tok/s",
            out.prompt_tokens,
            out.prefill_tokens_per_s(),
            out.tokens.len().saturating_sub(1),
            out.decode_tokens_per_s()
        );
        best_prefill = best_prefill.max(out.prefill_tokens_per_s());
        best_decode = best_decode.max(out.decode_tokens_per_s());
    }
    println!("best: prefill {best_prefill:.1} tok/s, decode {best_decode:.1} tok/s");
    Ok(())
}
