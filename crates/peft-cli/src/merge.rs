//! `burn-peft merge`: fold an adapter into a LLaMA-family model and write the result as a
//! Hugging Face folder that Transformers loads ([`crate::export`]).
//!
//! The adapter is anything `--adapter` takes elsewhere: a PEFT adapter folder (LoRA, DoRA,
//! AdaLoRA, RoSA, SFT; merged with NaN/Inf checks), a selective summary (its values written
//! into the weights) or a `full` run's `model.safetensors`. The folder is written into a
//! temporary sibling and renamed into place at the end, so the output is never half written;
//! an existing non-empty output is refused.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::tensor::Device;
use peft_models::LinearLayer;
use peft_models::llama::{Llama, LlamaConfig};

use crate::export;
use crate::model::{self, LlamaJob, ModelSource};

/// Options of `burn-peft merge`.
#[derive(clap::Args, Debug, Clone)]
pub struct MergeArgs {
    /// The base model: a `.gguf` file (dequantized) or a Hugging Face LLaMA folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The adapter: a PEFT adapter folder (LoRA, DoRA, AdaLoRA, RoSA, SFT), a selective
    /// summary folder, or a `full` run's `model.safetensors`.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The folder to write (must not exist, or be empty).
    #[arg(long)]
    pub output: PathBuf,
}

/// Run `burn-peft merge`.
///
/// # Errors
/// As [`merge`].
pub fn run(args: &MergeArgs) -> anyhow::Result<()> {
    let spinner = model::spinner(format!("merging into {}", args.output.display()));
    let out = merge(&args.model, &args.adapter, &args.output);
    spinner.finish_and_clear();
    out?;
    eprintln!(
        "wrote {} ({} merged into {})",
        args.output.display(),
        args.adapter.display(),
        args.model.display()
    );
    Ok(())
}

/// Merge `adapter` into `model` and write the Hugging Face folder `output`.
///
/// # Errors
/// An existing non-empty `output`; a model that is not a causal LM; model, tokenizer or
/// adapter loading errors (an adapter for another model shape names the tensor); a non-finite
/// merged weight; I/O errors (the temporary folder is removed, `output` is left as it was).
pub fn merge(model_path: &Path, adapter: &Path, output: &Path) -> anyhow::Result<()> {
    check_output(output)?;
    let source = model::detect(model_path)?;
    if let ModelSource::HfBert(dir) = &source {
        bail!(
            "{}: a BERT encoder; merge writes causal LMs (LLaMA family)",
            dir.display()
        );
    }
    let config = model::llama_config(&source)?;
    let tokenizer = model::load_tokenizer(&source)?;
    model::adapter_kind(adapter)?;

    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = output
        .file_name()
        .with_context(|| format!("{}: not a folder name", output.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = write(&source, &config, &tokenizer, adapter, &tmp).and_then(|()| {
        if output.exists() {
            // Empty (checked above): a rename replaces an empty folder.
            std::fs::remove_dir(output)
                .with_context(|| format!("replacing the empty folder {}", output.display()))?;
        }
        std::fs::rename(&tmp, output)
            .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Refuse an output that exists and is not an empty folder.
fn check_output(output: &Path) -> anyhow::Result<()> {
    if !output.exists() {
        return Ok(());
    }
    ensure!(
        output.is_dir(),
        "{}: the output exists and is not a folder",
        output.display()
    );
    let mut entries = std::fs::read_dir(output)
        .with_context(|| format!("reading the output folder {}", output.display()))?;
    ensure!(
        entries.next().is_none(),
        "{}: the output folder exists and is not empty (refusing to overwrite it)",
        output.display()
    );
    Ok(())
}

/// Write the merged folder's files into `dir`.
fn write(
    source: &ModelSource,
    config: &LlamaConfig,
    tokenizer: &peft_models::tokenizer::ModelTokenizer,
    adapter: &Path,
    dir: &Path,
) -> anyhow::Result<()> {
    let device = Device::default();
    // Full precision: the merged export is an f32 model.
    model::with_llama(
        source,
        Some(adapter),
        true,
        peft_models::BaseFormat::F32,
        &device,
        WriteWeights(dir),
    )?;
    export::write_metadata(source, config, tokenizer, dir)
}

/// The job that writes a loaded (merged) model's weights into a folder.
struct WriteWeights<'a>(&'a Path);

impl LlamaJob for WriteWeights<'_> {
    type Output = ();

    fn run<L: LinearLayer>(self, model: Llama<L>, _: &LlamaConfig) -> anyhow::Result<()> {
        export::write_weights(&model, self.0)
    }
}
