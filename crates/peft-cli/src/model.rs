//! Model detection and loading, shared by every subcommand.
//!
//! A model path is either a llama.cpp `.gguf` file (LLaMA family) or a Hugging Face model
//! folder whose `config.json` names the architecture in `model_type`. [`detect`] tells which,
//! without reading any weights; [`with_llama`] and [`with_bert`] load the model, attach what
//! `burn-peft train` (or Python PEFT) saved when it is given (an adapter folder: LoRA and its
//! variants, AdaLoRA, RoSA or SFT; a selective summary folder; or, for LLaMA, a `full` run's
//! `model.safetensors`), optionally merge it, and hand the model to a [`LlamaJob`] or
//! [`BertJob`], which is generic over the linear-layer type the adapter needs.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use burn::nn::Linear;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use peft_core::{LoadOptions, Method, PeftLinear, PeftModel};
use peft_models::bert::{Bert, BertConfig};
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::tokenizer::ModelTokenizer;
use peft_models::{BaseFormat, LinearLayer};

/// The architectures the program runs, as `model_type` in `config.json` names them.
pub const SUPPORTED_MODEL_TYPES: [&str; 2] = ["llama", "bert"];

/// A model on disk, recognised by [`detect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A llama.cpp GGUF file (LLaMA-family weights, tokenizer and chat template in its
    /// metadata).
    Gguf(PathBuf),
    /// A Hugging Face folder with `model_type: "llama"` (`LlamaForCausalLM`).
    HfLlama(PathBuf),
    /// A Hugging Face folder with `model_type: "bert"` (`BertModel`).
    HfBert(PathBuf),
}

impl ModelSource {
    /// The file or folder the model was found at.
    pub fn path(&self) -> &Path {
        match self {
            Self::Gguf(p) | Self::HfLlama(p) | Self::HfBert(p) => p,
        }
    }
}

/// Recognise the model at `path`: a GGUF file (by its magic bytes), or a folder with a
/// `config.json` whose `model_type` is one of [`SUPPORTED_MODEL_TYPES`].
///
/// # Errors
/// A path that does not exist, a file that is not GGUF, a folder without a readable
/// `config.json`, or an unsupported or missing `model_type` (named, with the supported ones).
pub fn detect(path: &Path) -> anyhow::Result<ModelSource> {
    ensure!(
        path.exists(),
        "model not found: {} does not exist (give a .gguf file or a Hugging Face model folder)",
        path.display()
    );
    if path.is_file() {
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("reading the model file {}", path.display()));
        let is_gguf_name = path.extension().is_some_and(|e| e == "gguf");
        return match read {
            Ok(()) if &magic == b"GGUF" => Ok(ModelSource::Gguf(path.into())),
            _ if is_gguf_name => bail!(
                "{}: not a valid GGUF file (it does not start with the GGUF magic bytes)",
                path.display()
            ),
            Err(e) => Err(e),
            Ok(()) => bail!(
                "{}: not a model (expected a .gguf file or a Hugging Face model folder with \
                 config.json)",
                path.display()
            ),
        };
    }
    let config = path.join("config.json");
    ensure!(
        config.is_file(),
        "{}: no config.json in this folder (a Hugging Face model folder needs config.json, \
         the weights and, to tokenize, tokenizer.json)",
        path.display()
    );
    let json = peft_core::hf::read_json(&config)
        .with_context(|| format!("reading the model config {}", config.display()))?;
    let supported = SUPPORTED_MODEL_TYPES.join(", ");
    match json.get("model_type").and_then(|v| v.as_str()) {
        Some("llama") => Ok(ModelSource::HfLlama(path.into())),
        Some("bert") => Ok(ModelSource::HfBert(path.into())),
        Some(other) => bail!(
            "{}: unsupported architecture: model_type `{other}` (supported: {supported})",
            config.display()
        ),
        None => bail!(
            "{}: no `model_type` string, so the architecture is unknown (supported: {supported})",
            config.display()
        ),
    }
}

/// The tokenizer of `source`: from a GGUF file's metadata, or a folder's `tokenizer.json`
/// (with `tokenizer_config.json` and the chat template when present).
///
/// # Errors
/// A GGUF file without a (supported) tokenizer, a folder without `tokenizer.json`, or an
/// unreadable tokenizer.
pub fn load_tokenizer(source: &ModelSource) -> anyhow::Result<ModelTokenizer> {
    match source {
        ModelSource::Gguf(file) => ModelTokenizer::from_gguf(file)
            .with_context(|| format!("reading the tokenizer of {}", file.display())),
        ModelSource::HfLlama(dir) | ModelSource::HfBert(dir) => {
            ensure!(
                dir.join("tokenizer.json").is_file(),
                "{}: no tokenizer.json in the model folder (the tokenizer is missing)",
                dir.display()
            );
            ModelTokenizer::from_hf_dir(dir)
                .with_context(|| format!("reading the tokenizer in {}", dir.display()))
        }
    }
}

/// Open a GGUF file (its header, metadata and tensor table).
fn open_gguf(file: &Path) -> anyhow::Result<peft_models::gguf::GgufFile> {
    peft_models::gguf::GgufFile::open(file)
        .with_context(|| format!("opening the GGUF model {}", file.display()))
}

/// A spinner with `message` on stderr while something long runs (drawn only on a terminal).
pub fn spinner(message: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner().with_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

/// What an `--adapter` path holds: a PEFT method's saved adapter (`peft_type`), a selective
/// summary, or a whole model's weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    /// `LORA` (with rsLoRA, DoRA, rank/alpha patterns).
    Lora,
    /// `ADALORA`.
    AdaLora,
    /// `ROSA`.
    Rosa,
    /// `SFT`.
    Sft,
    /// `SELECTIVE`: the trained entries of ID3, PaFI or BitFit (`peft_selective::Summary`).
    Selective,
    /// A `.safetensors` file with every weight under Transformers' names (what a `full` run
    /// saves).
    Weights,
}

/// What `adapter` holds: a `.safetensors` file is [`AdapterKind::Weights`]; a folder's
/// `adapter_config.json` names the method in `peft_type`.
///
/// # Errors
/// A missing folder or config, or a `peft_type` this program does not load (named).
pub fn adapter_kind(adapter: &Path) -> anyhow::Result<AdapterKind> {
    if adapter.is_file() && adapter.extension().is_some_and(|e| e == "safetensors") {
        return Ok(AdapterKind::Weights);
    }
    ensure!(
        adapter.is_dir(),
        "adapter not found: {} is not a folder (expected adapter_config.json + \
         adapter_model.safetensors, or a full run's model.safetensors)",
        adapter.display()
    );
    let file = adapter.join("adapter_config.json");
    let config = peft_core::hf::read_json(&file)
        .with_context(|| format!("reading the adapter config {}", file.display()))?;
    let kind = config
        .get("peft_type")
        .and_then(|v| v.as_str())
        .with_context(|| format!("{}: no `peft_type`", file.display()))?;
    Ok(match kind {
        "LORA" => AdapterKind::Lora,
        "ADALORA" => AdapterKind::AdaLora,
        "ROSA" => AdapterKind::Rosa,
        "SFT" => AdapterKind::Sft,
        peft_selective::summary::PEFT_TYPE => AdapterKind::Selective,
        other => bail!(
            "{}: peft_type `{other}` is not supported (LORA, ADALORA, ROSA, SFT, SELECTIVE)",
            file.display()
        ),
    })
}

/// Something to do with a loaded LLaMA-family model, whatever its linear-layer type.
pub trait LlamaJob {
    /// What the job returns.
    type Output;
    /// Run the job on `model` (`config` is its configuration).
    ///
    /// # Errors
    /// Whatever the job finds wrong.
    fn run<L: LinearLayer>(
        self,
        model: Llama<L>,
        config: &LlamaConfig,
    ) -> anyhow::Result<Self::Output>;
}

/// Something to do with a loaded BERT model, whatever its linear-layer type.
pub trait BertJob {
    /// What the job returns.
    type Output;
    /// Run the job on `model` (`config` is its configuration).
    ///
    /// # Errors
    /// Whatever the job finds wrong.
    fn run<L: LinearLayer>(
        self,
        model: Bert<L>,
        config: &BertConfig,
    ) -> anyhow::Result<Self::Output>;
}

/// The configuration of a LLaMA-family model, read without loading its weights.
///
/// # Errors
/// An unreadable or unsupported configuration, or a source that is not a LLaMA model.
pub fn llama_config(source: &ModelSource) -> anyhow::Result<LlamaConfig> {
    match source {
        ModelSource::Gguf(file) => {
            let gguf = open_gguf(file)?;
            peft_models::gguf::llama_config(&gguf)
                .with_context(|| format!("reading the model config of {}", file.display()))
        }
        ModelSource::HfLlama(dir) => LlamaConfig::from_dir(dir)
            .with_context(|| format!("reading the model config in {}", dir.display())),
        ModelSource::HfBert(dir) => bail!(
            "{}: a BERT encoder, not a causal language model",
            dir.display()
        ),
    }
}

/// Load the LLaMA-family model of `source` with layers `L`, its frozen base held as `base`
/// says (packed when `L` keeps a packed base).
///
/// # Errors
/// Unreadable weights, or a source that is not a LLaMA model.
pub fn load_llama<L: LinearLayer>(
    source: &ModelSource,
    base: BaseFormat,
    device: &Device,
) -> anyhow::Result<(Llama<L>, LlamaConfig)> {
    match source {
        ModelSource::Gguf(file) => peft_models::gguf::load_llama_as::<L>(file, base, device)
            .with_context(|| format!("loading the GGUF model {}", file.display())),
        ModelSource::HfLlama(dir) => Llama::<L>::from_pretrained_as(dir, base, device)
            .with_context(|| format!("loading the model in {}", dir.display())),
        ModelSource::HfBert(dir) => bail!(
            "{}: a BERT encoder, not a causal language model",
            dir.display()
        ),
    }
}

/// Attach the adapter in `adapter` (method `C`) to `model`, merged into the weights when
/// `merge` is set.
fn attach<M: burn::module::Module, C: Method>(
    model: M,
    adapter: &Path,
    merge: bool,
) -> anyhow::Result<M> {
    let peft = PeftModel::<M, C>::from_pretrained(model, adapter, &LoadOptions::default())
        .with_context(|| format!("loading the adapter in {}", adapter.display()))?;
    if merge {
        peft.merge_and_unload(true)
            .with_context(|| format!("merging the adapter in {}", adapter.display()))
    } else {
        Ok(peft.into_model())
    }
}

/// Write the values of the selective summary in `dir` into `model`.
fn apply_summary<M: burn::module::Module>(model: M, dir: &Path) -> anyhow::Result<M> {
    let summary = peft_selective::Summary::load(dir)
        .with_context(|| format!("loading the summary in {}", dir.display()))?;
    summary
        .apply(model)
        .with_context(|| format!("applying the summary in {}", dir.display()))
}

/// Load the LLaMA-family model of `source`, with `adapter` attached (an adapter folder, merged
/// when `merge`; a selective summary, written into the weights; a `full` run's weights file,
/// read instead of the source's weights), and run `job` on it.
///
/// # Errors
/// Model or adapter loading errors (with the file, tensor or module named), and the job's.
pub fn with_llama<J: LlamaJob>(
    source: &ModelSource,
    adapter: Option<&Path>,
    merge: bool,
    base: BaseFormat,
    device: &Device,
    job: J,
) -> anyhow::Result<J::Output> {
    fn adapted<C: Method, J: LlamaJob>(
        source: &ModelSource,
        adapter: &Path,
        merge: bool,
        base: BaseFormat,
        device: &Device,
        job: J,
    ) -> anyhow::Result<J::Output> {
        let (model, config) = load_llama::<PeftLinear<C::Adapter>>(source, base, device)?;
        if merge && base.is_packed() {
            eprintln!(
                "warning: merging into a `{base}` base dequantizes, merges and quantizes again \
                 (as PEFT merges into a 4-bit base): outputs move by the format's rounding; \
                 `burn-peft merge` merges in full precision"
            );
        }
        job.run(attach::<_, C>(model, adapter, merge)?, &config)
    }
    let Some(adapter) = adapter else {
        if base.is_packed() {
            // A layer type that keeps the packed base (no adapter attached).
            let (model, config) =
                load_llama::<PeftLinear<peft_lora::LoraAdapter>>(source, base, device)?;
            return job.run(model, &config);
        }
        let (model, config) = load_llama::<Linear>(source, base, device)?;
        return job.run(model, &config);
    };
    let kind = adapter_kind(adapter)?;
    ensure!(
        !base.is_packed() || !matches!(kind, AdapterKind::Selective | AdapterKind::Weights),
        "{}: a selective summary or full weights change the base weights, which a `{base}` \
         base keeps packed; use `--base f32`",
        adapter.display()
    );
    match kind {
        AdapterKind::Lora => {
            adapted::<peft_lora::LoraConfig, J>(source, adapter, merge, base, device, job)
        }
        AdapterKind::AdaLora => {
            adapted::<peft_adalora::AdaLoraConfig, J>(source, adapter, merge, base, device, job)
        }
        AdapterKind::Rosa => {
            adapted::<peft_rosa::RosaConfig, J>(source, adapter, merge, base, device, job)
        }
        AdapterKind::Sft => {
            adapted::<peft_sft::SftConfig, J>(source, adapter, merge, base, device, job)
        }
        AdapterKind::Selective => {
            let (model, config) = load_llama::<Linear>(source, base, device)?;
            job.run(apply_summary(model, adapter)?, &config)
        }
        AdapterKind::Weights => {
            let config = llama_config(source)?;
            let ckpt = peft_models::Checkpoint::open(adapter)
                .with_context(|| format!("opening the weights {}", adapter.display()))?;
            let model = Llama::<Linear>::load(&config, &ckpt, device).with_context(|| {
                format!(
                    "loading the weights {} on the configuration of {}",
                    adapter.display(),
                    source.path().display()
                )
            })?;
            job.run(model, &config)
        }
    }
}

/// Load the BERT model in `dir` (its `config` read already), with the PEFT adapter folder
/// `adapter` attached (merged when `merge`), and run `job` on it.
///
/// # Errors
/// Model or adapter loading errors (with the file, tensor or module named), and the job's.
pub fn with_bert<J: BertJob>(
    dir: &Path,
    config: &BertConfig,
    adapter: Option<&Path>,
    merge: bool,
    device: &Device,
    job: J,
) -> anyhow::Result<J::Output> {
    fn adapted<C: Method, J: BertJob>(
        dir: &Path,
        config: &BertConfig,
        adapter: &Path,
        merge: bool,
        device: &Device,
        job: J,
    ) -> anyhow::Result<J::Output> {
        let bert = Bert::<PeftLinear<C::Adapter>>::from_dir_with(dir, config, device)
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        job.run(attach::<_, C>(bert, adapter, merge)?, config)
    }
    let Some(adapter) = adapter else {
        let bert = Bert::<Linear>::from_dir_with(dir, config, device)
            .with_context(|| format!("loading the model in {}", dir.display()))?;
        return job.run(bert, config);
    };
    match adapter_kind(adapter)? {
        AdapterKind::Lora => {
            adapted::<peft_lora::LoraConfig, J>(dir, config, adapter, merge, device, job)
        }
        AdapterKind::AdaLora => {
            adapted::<peft_adalora::AdaLoraConfig, J>(dir, config, adapter, merge, device, job)
        }
        AdapterKind::Rosa => {
            adapted::<peft_rosa::RosaConfig, J>(dir, config, adapter, merge, device, job)
        }
        AdapterKind::Sft => {
            adapted::<peft_sft::SftConfig, J>(dir, config, adapter, merge, device, job)
        }
        AdapterKind::Selective => {
            let bert = Bert::<Linear>::from_dir_with(dir, config, device)
                .with_context(|| format!("loading the model in {}", dir.display()))?;
            job.run(apply_summary(bert, adapter)?, config)
        }
        AdapterKind::Weights => bail!(
            "{}: a weights file replaces a LLaMA model's weights; for BERT give an adapter or \
             summary folder",
            adapter.display()
        ),
    }
}

/// Token ids checked against a model: every id in `0..vocab_size`.
///
/// # Errors
/// The first id outside the vocabulary, named with `what` (the file or text it came from).
pub fn check_ids(ids: &[i64], vocab_size: usize, what: &str) -> anyhow::Result<()> {
    if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= vocab_size) {
        bail!("{what}: token id {bad} is outside the vocabulary (0..{vocab_size})");
    }
    Ok(())
}

/// `input_ids` and `attention_mask` read from a safetensors file and checked against a model.
pub struct Inputs {
    /// Token ids `[batch, seq]`.
    pub ids: Tensor<2, Int>,
    /// Attention mask `[batch, seq]`, 1 for tokens and 0 for padding.
    pub mask: Tensor<2, Int>,
}

/// Read `input_ids` and `attention_mask` (int64 `[batch, seq]`, same shape, mask of 0 and 1)
/// from `file`, with ids in `0..vocab_size` and `seq <= max_positions`.
///
/// # Errors
/// An unreadable file, a missing tensor, a wrong dtype or shape, ids outside the vocabulary,
/// a sequence longer than the model's context, or a mask with other values than 0 and 1.
pub fn read_inputs(
    file: &Path,
    vocab_size: usize,
    max_positions: usize,
    device: &Device,
) -> anyhow::Result<Inputs> {
    let mut tensors = peft_core::hf::read_tensors(file)
        .with_context(|| format!("reading the input file {}", file.display()))?;
    let mut take = |key: &str| -> anyhow::Result<TensorData> {
        let data = tensors.remove(key).with_context(|| {
            format!(
                "{}: no tensor `{key}` (need input_ids and attention_mask)",
                file.display()
            )
        })?;
        ensure!(
            data.dtype() == DType::I64,
            "{}: `{key}` is {:?}, expected an integer tensor (int64)",
            file.display(),
            data.dtype()
        );
        ensure!(
            data.shape().len() == 2,
            "{}: `{key}` has shape {:?}, expected [batch, seq]",
            file.display(),
            data.shape()
        );
        Ok(data)
    };
    let ids = take("input_ids")?;
    let mask = take("attention_mask")?;
    ensure!(
        ids.shape() == mask.shape(),
        "{}: input_ids {:?} and attention_mask {:?} differ in shape",
        file.display(),
        ids.shape(),
        mask.shape()
    );
    let seq = ids.shape()[1];
    ensure!(
        seq > 0 && ids.shape()[0] > 0,
        "{}: input_ids is empty ({:?})",
        file.display(),
        ids.shape()
    );
    ensure!(
        seq <= max_positions,
        "{}: sequence length {seq} is longer than the model's context ({max_positions} \
         positions)",
        file.display()
    );
    let ids_v = ids
        .try_to_vec::<i64>()
        .map_err(|e| anyhow::anyhow!("{}: input_ids: {e:?}", file.display()))?;
    check_ids(&ids_v, vocab_size, &format!("{}", file.display()))?;
    let mask_v = mask
        .try_to_vec::<i64>()
        .map_err(|e| anyhow::anyhow!("{}: attention_mask: {e:?}", file.display()))?;
    ensure!(
        mask_v.iter().all(|&m| m == 0 || m == 1),
        "{}: attention_mask must hold only 0 and 1",
        file.display()
    );
    Ok(Inputs {
        ids: Tensor::from_data(ids, device),
        mask: Tensor::from_data(mask, device),
    })
}
