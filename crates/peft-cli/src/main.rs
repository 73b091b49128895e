//! `burn-peft`: run, generate with and tokenize for BERT and LLaMA-family models (a GGUF file
//! or a Hugging Face folder), with PEFT adapters attached or merged; fine-tune, evaluate and
//! merge LLaMA-family models.
//!
//! Each subcommand lives in its own module of the `peft_cli` library; `model` detects and loads
//! models for all of them. Errors are printed on stderr as one line (`error: ...` with their
//! causes) and the program exits with status 1.

#![forbid(unsafe_code)]

use peft_cli::{eval, forward, generate, merge, tokenize, train};

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command line of `burn-peft`.
#[derive(Parser, Debug)]
#[command(
    name = "burn-peft",
    version,
    about = "Fine-tune, evaluate, merge, run, generate with and tokenize for models with PEFT adapters"
)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// One forward pass over token ids from a safetensors file: `logits` (causal LM) or
    /// `last_hidden_state` (BERT) written to another.
    Forward(forward::ForwardArgs),
    /// Generate text from a prompt with a causal LM; only the generated text goes to stdout.
    Generate(generate::GenerateArgs),
    /// Print the token ids of a text (space-separated, no special tokens added).
    Tokenize(tokenize::TokenizeArgs),
    /// Fine-tune a causal LM with any method from a TOML run file (checkpoints, `--resume`).
    Train(train::TrainArgs),
    /// Score a trained run on its eval set: loss and exact match of greedy completions (one
    /// JSON object on stdout).
    Eval(eval::EvalArgs),
    /// Merge an adapter into a LLaMA-family model and write a Hugging Face folder that
    /// Transformers loads.
    Merge(merge::MergeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Forward(args) => forward::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Merge(args) => merge::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes on one line, joined by `: `, leaving out a cause that the message before
/// it already ends with (some errors print their source in their own message too).
fn describe(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
