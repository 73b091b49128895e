//! # bench_packed: memory and training-step time over a packed (4-bit) frozen base
//!
//! ```sh
//! python3 scripts/fetch_smollm2.py && python3 scripts/fetch_minilm.py   # once: the models
//! cargo run --release --example bench_packed --features x86-v4 -- [--steps 4] [--warmup 1]
//! ```
//!
//! One run measures every cell (model × method × base), each in its own process (a peak
//! resident set is per process), and prints the table with each cell's ratio to the f32 base of
//! the same model and method:
//!
//! * SmolLM2-135M-Instruct, batch 4 × 128 tokens (deterministic ids), causal-LM loss over every
//!   token; the model loaded with [`load_llama_as`] as `burn-peft train` loads it (`f32`: the
//!   GGUF file dequantized; `nf4-dq`: each weight quantized as it is read, token table in bf16;
//!   `gguf`: the file's `Q4_1` / `Q8_0` blocks kept packed in the mapped file).
//! * all-MiniLM-L6-v2, batch 16 × 128 (the `bench_minilm` workload, loss `mean(h²)`), its linear
//!   layers packed after loading with `PeftModel::pack_base` (`nf4-dq`; `gguf`: `Q4_1` blocks
//!   quantized as llama.cpp's quantizer does), its token table with `BertEmbeddings::pack_words`
//!   (`nf4-dq`: bf16, as QLoRA keeps embeddings; `gguf`: `Q8_0`, as GGUF files store them). The
//!   position and token-type tables stay f32.
//!
//! Methods: LoRA r 16, alpha 32 on every linear layer; RoSA r 12 with density 4/256 (the
//! `bench_rosa` setting), its first step collecting the mask gradients (reported apart). AdamW
//! (lr 1e-4, weight decay 0.01). Reported: the base weights' bytes (packed blocks and scales,
//! plus every f32 frozen tensor), the median step time after `--warmup` steps, the peak
//! resident set of the whole process (`VmHWM`: loading included) and the peak during training
//! alone (`VmHWM` reset after loading through `/proc/self/clear_refs`).
//!
//! `--checkpointing`: SmolLM2 cells train with gradient checkpointing (each decoder layer's
//! activations recomputed in the backward pass); `--models`, `--methods`, `--llm-shapes` pick
//! cells.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor};
use burn_peft_examples::bench::{Workload, adamw, median, memory_mib, targets};
use clap::Parser;
use peft_core::step::Stepper;
use peft_core::{Adapter, Method, ModuleSelector, PeftLinear, PeftModel, hosts};
use peft_kernels::quant::PackedFormat;
use peft_kernels::quant::ggml::GgmlBlock;
use peft_lora::{LoraAdapter, LoraConfig};
use peft_models::BaseFormat;
use peft_models::bert::Bert;
use peft_models::gguf::load_llama_as;
use peft_models::llama::Llama;
use peft_rosa::{RosaAdapter, RosaConfig, RosaScheduler};

#[derive(Parser, Debug)]
#[command(about = "memory and step time over a packed frozen base")]
struct Args {
    /// Steps at the start that are not timed (after RoSA's collection step).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed steps per cell.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// SmolLM2's micro-batches, `BATCHxSEQ`, comma-separated (each a set of cells).
    #[arg(long, value_delimiter = ',', default_values_t = ["1x128".to_string(), "4x128".to_string()])]
    llm_shapes: Vec<String>,
    /// Only these models (smollm2, minilm).
    #[arg(long, value_delimiter = ',', default_values_t = ["smollm2".to_string(), "minilm".to_string()])]
    models: Vec<String>,
    /// Only these methods (lora, rosa).
    #[arg(long, value_delimiter = ',', default_values_t = ["lora".to_string(), "rosa".to_string()])]
    methods: Vec<String>,
    /// SmolLM2 cells train with gradient checkpointing (`Llama::causal_lm_loss_checkpointed`).
    #[arg(long)]
    checkpointing: bool,
    /// Run one cell, `model:method:base` (SmolLM2: `smollm2@BxS:method:base`), and print its
    /// JSON (what the parent runs).
    #[arg(long)]
    cell: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

const BASES: [&str; 3] = ["f32", "nf4-dq", "gguf"];

/// Bytes of every frozen f32 float tensor (trainable ones are the adapters) of `model`, less the
/// weights of packed layers (visitors see those as a zero view of their shape).
fn frozen_f32_bytes<M: Module>(model: &M) -> usize {
    struct Count {
        packed: Vec<String>,
        path: Vec<String>,
        bytes: usize,
    }
    impl ModuleVisitor for Count {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let layer = self.path[..self.path.len().saturating_sub(1)].join(".");
            let packed =
                self.path.last().is_some_and(|l| l == "weight") && self.packed.contains(&layer);
            if !packed && !param.is_require_grad() {
                self.bytes += param.shape().num_elements() * 4;
            }
        }
    }
    let mut c = Count {
        packed: hosts::packed_paths(model),
        path: Vec::new(),
        bytes: 0,
    };
    model.visit(&mut c);
    c.bytes
}

/// Reset this process's peak resident set (`VmHWM`) to the current one (Linux).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What one cell measured.
struct Measured {
    base_bytes: usize,
    load_peak_mib: f64,
    step_ms: Vec<f64>,
    collection_ms: Option<f64>,
    load_s: f64,
}

/// Train `peft` (its adapters attached) for `warmup + steps` steps of the gradients `grads`
/// gives, with RoSA's scheduler when `rosa`; the times after the warm-up.
fn train<M: Module + Clone, C: Method>(
    peft: PeftModel<M, C>,
    rosa: Option<&RosaConfig>,
    args: &Args,
    grads: impl Fn(&M) -> GradientsParams,
) -> anyhow::Result<(Vec<f64>, Option<f64>)> {
    let mut stepper = Stepper::new();
    let mut model = peft.into_model();
    if let Some(config) = rosa {
        let mut scheduler = RosaScheduler::new(config, "default")?;
        model = scheduler.prepare(model)?;
        stepper = stepper.with(scheduler);
    }
    let mut optim = adamw();
    let mut times = Vec::new();
    let mut collection = None;
    let first = usize::from(rosa.is_some());
    for step in 0..first + args.warmup + args.steps {
        let start = Instant::now();
        let g = grads(&model);
        model = stepper.optimize(model, &mut optim, 1e-4, g)?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if step < first {
            collection = Some(ms);
        } else if step >= first + args.warmup {
            times.push(ms);
        }
    }
    Ok((times, collection))
}

fn lora(targets: ModuleSelector) -> LoraConfig {
    LoraConfig::new(16, 32.0, targets)
}

fn rosa(targets: ModuleSelector) -> RosaConfig {
    RosaConfig::new(12, 4.0 / 256.0, 24.0, targets)
}

fn smollm2<A: Adapter, C: Method<Adapter = A>>(
    config: C,
    rosa: Option<&RosaConfig>,
    (base, batch, seq): (BaseFormat, usize, usize),
    args: &Args,
) -> anyhow::Result<Measured> {
    let device = Device::default().autodiff();
    let start = Instant::now();
    let (model, cfg) = load_llama_as::<PeftLinear<A>>(peft_models::smollm2_path()?, base, &device)?;
    let load_s = start.elapsed().as_secs_f64();
    let table = model
        .model
        .packed_embed
        .as_ref()
        .map_or(0, |t| t.size_bytes());
    let peft = PeftModel::new_typed(model, config)?;
    let base_bytes = packed_bytes::<_, A>(peft.model()) + table + frozen_f32_bytes(peft.model());
    let load_peak_mib = memory_mib("VmHWM:");
    reset_peak();
    let vocab = cfg.vocab_size as i64;
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| 100 + (i as i64 * 7919 + 13) % (vocab - 100))
        .collect();
    let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), &device).reshape([batch, seq]);
    let (step_ms, collection_ms) = train(peft, rosa, args, |m: &Llama<PeftLinear<A>>| {
        if args.checkpointing {
            m.causal_lm_loss_checkpointed(ids.clone(), None, ids.clone(), 1.0, 0)
                .expect("labels fit")
                .1
        } else {
            let loss = m
                .causal_lm_loss(ids.clone(), None, ids.clone())
                .expect("labels fit");
            GradientsParams::from_grads(loss.backward(), m)
        }
    })?;
    Ok(Measured {
        base_bytes,
        load_peak_mib,
        step_ms,
        collection_ms,
        load_s,
    })
}

fn minilm<A: Adapter, C: Method<Adapter = A>>(
    config: C,
    rosa: Option<&RosaConfig>,
    base: BaseFormat,
    args: &Args,
) -> anyhow::Result<Measured> {
    let w = Workload::load(None)?;
    let start = Instant::now();
    let mut model = Bert::<PeftLinear<A>>::from_dir_with(&w.dir, &w.config, &w.device)?;
    // The token table as QLoRA keeps it (bf16) or as a GGUF file stores it (`Q8_0`).
    let (linears, table) = match base {
        BaseFormat::F32 => (None, None),
        BaseFormat::Gguf => (
            Some(PackedFormat::Ggml(GgmlBlock::Q4_1)),
            Some(PackedFormat::Ggml(GgmlBlock::Q8_0)),
        ),
        other => (other.linear_format(), other.table_format()),
    };
    if let Some(format) = table {
        model.embeddings.pack_words(format)?;
    }
    let table_bytes = model
        .embeddings
        .packed_words
        .as_ref()
        .map_or(0, |t| t.size_bytes());
    let mut peft = PeftModel::new_typed(model, config)?;
    if let Some(format) = linears {
        peft.pack_base(format, |_| true)?;
    }
    let load_s = start.elapsed().as_secs_f64();
    let base_bytes =
        packed_bytes::<_, A>(peft.model()) + table_bytes + frozen_f32_bytes(peft.model());
    let load_peak_mib = memory_mib("VmHWM:");
    reset_peak();
    let (step_ms, collection_ms) = train(peft, rosa, args, |m: &Bert<PeftLinear<A>>| {
        let loss = m
            .forward(w.ids.clone(), w.mask.clone())
            .square()
            .mean()
            .reshape([1]);
        GradientsParams::from_grads(loss.backward(), m)
    })?;
    Ok(Measured {
        base_bytes,
        load_peak_mib,
        step_ms,
        collection_ms,
        load_s,
    })
}

/// Bytes of the packed bases of `model`'s linear layers.
fn packed_bytes<M: Module, A: Adapter>(model: &M) -> usize {
    hosts::collect::<M, A, usize, _>(model, |h| h.packed_bytes())
        .iter()
        .sum()
}

fn run_cell(cell: &str, args: &Args) -> anyhow::Result<serde_json::Value> {
    let parts: Vec<&str> = cell.split(':').collect();
    let [model, method, base] = parts[..] else {
        bail!("--cell {cell}: expected model:method:base");
    };
    let base: BaseFormat = base.parse().map_err(anyhow::Error::msg)?;
    let (model, shape) = model.split_once('@').unwrap_or((model, "4x128"));
    let (batch, seq) = shape
        .split_once('x')
        .and_then(|(b, s)| Some((b.parse::<usize>().ok()?, s.parse::<usize>().ok()?)))
        .with_context(|| format!("--cell {cell}: a shape BATCHxSEQ"))?;
    let llm = (base, batch, seq);
    // Every linear layer: LLaMA's seven projections, BERT's query/key/value/dense.
    let all = match model {
        "minilm" => targets(),
        _ => ModuleSelector::names([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]),
    };
    let rosa_config = rosa(all.clone());
    let m = match (model, method) {
        ("smollm2", "lora") => smollm2::<LoraAdapter, _>(lora(all), None, llm, args)?,
        ("smollm2", "rosa") => {
            smollm2::<RosaAdapter, _>(rosa_config.clone(), Some(&rosa_config), llm, args)?
        }
        ("minilm", "lora") => minilm::<LoraAdapter, _>(lora(all), None, base, args)?,
        ("minilm", "rosa") => {
            minilm::<RosaAdapter, _>(rosa_config.clone(), Some(&rosa_config), base, args)?
        }
        _ => bail!("--cell {cell}: unknown model or method"),
    };
    Ok(serde_json::json!({
        "cell": cell,
        "base_mib": m.base_bytes as f64 / (1 << 20) as f64,
        "step_ms": median(m.step_ms.clone()),
        "steps_ms": m.step_ms,
        "collection_step_ms": m.collection_ms,
        "load_s": m.load_s,
        "peak_rss_mib": memory_mib("VmHWM:").max(m.load_peak_mib),
        "train_peak_rss_mib": memory_mib("VmHWM:"),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.steps > 0, "--steps must be positive");
    if let Some(cell) = &args.cell {
        println!("{}", run_cell(cell, &args)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut results = Vec::new();
    let mut models = Vec::new();
    for model in &args.models {
        match model.as_str() {
            "smollm2" => models.extend(args.llm_shapes.iter().map(|s| format!("smollm2@{s}"))),
            other => models.push(other.to_string()),
        }
    }
    for model in &models {
        for method in &args.methods {
            for base in BASES {
                let cell = format!("{model}:{method}:{base}");
                eprintln!("running {cell} ...");
                let out = Command::new(&exe)
                    .args(["--cell", &cell, "--warmup", &args.warmup.to_string()])
                    .args(["--steps", &args.steps.to_string()])
                    .args(args.checkpointing.then_some("--checkpointing"))
                    .output()
                    .with_context(|| format!("running {cell}"))?;
                if !out.status.success() {
                    bail!("{cell} failed: {}", String::from_utf8_lossy(&out.stderr));
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let last = text.lines().last().unwrap_or_default();
                let value: serde_json::Value =
                    serde_json::from_str(last).with_context(|| format!("parsing {last:?}"))?;
                results.push(value);
            }
        }
    }
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| model | method | base | base weights MiB | x f32 | step ms | x f32 | peak RSS MiB | x f32 | training peak MiB | load s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for chunk in results.chunks(BASES.len()) {
        let reference = &chunk[0];
        for r in chunk {
            let cell = r["cell"].as_str().unwrap_or_default().replace(':', " | ");
            println!(
                "| {cell} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.1} |",
                f(r, "base_mib"),
                f(r, "base_mib") / f(reference, "base_mib"),
                f(r, "step_ms"),
                f(r, "step_ms") / f(reference, "step_ms"),
                f(r, "peak_rss_mib"),
                f(r, "peak_rss_mib") / f(reference, "peak_rss_mib"),
                f(r, "train_peak_rss_mib"),
                f(r, "load_s"),
            );
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::Value::Array(results).to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
