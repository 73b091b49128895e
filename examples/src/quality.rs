//! The "which method should I use?" study (`docs/quality.md`, `benchmarks/quality.sh`): the
//! task scorers, the methods at matched budgets, the run files of each (task, method, seed,
//! learning rate), the learning-rate sweep on the validation split, and the report (tables of
//! mean ± std over seeds, the papers' orderings, eval-loss curves as SVG).
//!
//! The study lives in one root folder. `plan` writes the run files and a plan (`plan-sweep.tsv`,
//! `plan-study.tsv`: one run a line, its folder and the file whose presence says it finished);
//! `benchmarks/quality.sh` trains what is not finished (resuming half-done runs) and scores
//! the held-out test split with `burn-peft eval --eval-file --predictions`; `report` reads
//! whatever has finished and names what has not.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

// ------------------------------------------------------------------------------ scorers

/// The last number in `text` (`-3`, `12`, `4.5`, `1,200`), as the final answer of a worked
/// solution; `None` when there is none.
pub fn final_number(text: &str) -> Option<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut last = None;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let negative =
                i > 0 && chars[i - 1] == '-' && (i < 2 || !chars[i - 2].is_ascii_alphanumeric());
            let mut s = String::new();
            while i < chars.len() {
                let c = chars[i];
                let next_digit = chars.get(i + 1).is_some_and(char::is_ascii_digit);
                if c.is_ascii_digit() || (c == '.' && next_digit && !s.contains('.')) {
                    s.push(c);
                } else if c == ',' && next_digit {
                    // a thousands separator
                } else {
                    break;
                }
                i += 1;
            }
            let v: f64 = s.parse().ok()?;
            last = Some(if negative { -v } else { v });
        } else {
            i += 1;
        }
    }
    last
}

/// Whether the final number of `generated` is `answer`.
pub fn final_number_matches(generated: &str, answer: f64) -> bool {
    final_number(generated).is_some_and(|v| (v - answer).abs() < 1e-9)
}

/// A SQL query normalised for exact match: split into tokens (quoted literals kept verbatim,
/// identifiers and keywords lowercased, numbers, operators `<= >= <> != = < >`, and single
/// punctuation characters), joined by single spaces; a trailing `;` is dropped and double-quoted
/// literals become single-quoted. So `select  COUNT(*) from T where x='a';` and
/// `SELECT count( * ) FROM t WHERE x = 'a'` are equal, and `'A'` and `'a'` are not.
pub fn normalise_sql(query: &str) -> String {
    let chars: Vec<char> = query.trim().trim_end_matches(';').trim().chars().collect();
    let mut tokens: Vec<String> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '\'' || c == '"' {
            let mut s = String::from('\'');
            i += 1;
            while i < chars.len() && chars[i] != c {
                s.push(chars[i]);
                i += 1;
            }
            s.push('\'');
            i += 1;
            tokens.push(s);
        } else if c.is_alphanumeric() || c == '_' || c == '.' {
            let mut s = String::new();
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                s.extend(chars[i].to_lowercase());
                i += 1;
            }
            tokens.push(s);
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["<=", ">=", "<>", "!="].contains(&two.as_str()) {
                tokens.push(two);
                i += 2;
            } else {
                tokens.push(c.to_string());
                i += 1;
            }
        }
    }
    tokens.join(" ")
}

/// Slot coverage of a data-to-text output: how many of `slots` (the MR's values) occur in
/// `generated`, case-insensitively, and how many there are.
pub fn slots_found(generated: &str, slots: &[String]) -> (usize, usize) {
    let text = generated.to_lowercase();
    let found = slots
        .iter()
        .filter(|s| text.contains(&s.to_lowercase()))
        .count();
    (found, slots.len())
}

/// One task's scores over a test split.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskScore {
    /// The task's own metric: slot coverage (d2t), final-number accuracy (math), normalised-SQL
    /// accuracy (sql); a fraction.
    pub primary: f64,
    /// Exact match of the completion (surrounding whitespace trimmed); a fraction.
    pub exact: f64,
    /// d2t only: the share of outputs that realise every slot.
    pub all_slots: Option<f64>,
}

/// Score `predictions` (`burn-peft eval --predictions` rows: `line`, `generated`, `matched`)
/// of `task` against its test file's rows (`lines`, the file's lines in order).
///
/// # Errors
/// A prediction whose line is not in the file, or a row without the field the task needs.
pub fn score_task(task: &str, predictions: &[Value], lines: &[Value]) -> anyhow::Result<TaskScore> {
    ensure!(!predictions.is_empty(), "no predictions");
    let (mut primary, mut exact, mut all) = (0.0, 0.0, 0.0);
    for p in predictions {
        let line = p["line"].as_u64().context("a prediction without `line`")? as usize;
        let row = lines
            .get(line.wrapping_sub(1))
            .with_context(|| format!("prediction for line {line}, not in the test file"))?;
        let generated = p["generated"].as_str().unwrap_or_default();
        let reference = row["completion"].as_str().unwrap_or_default();
        if generated.trim() == reference.trim() {
            exact += 1.0;
        }
        match task {
            "d2t" => {
                let slots: Vec<String> = row["slots"]
                    .as_array()
                    .context("a d2t row without `slots`")?
                    .iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect();
                let (found, total) = slots_found(generated, &slots);
                primary += found as f64 / total.max(1) as f64;
                if found == total {
                    all += 1.0;
                }
            }
            "math" => {
                let answer = row["answer"]
                    .as_f64()
                    .context("a math row without `answer`")?;
                if final_number_matches(generated, answer) {
                    primary += 1.0;
                }
            }
            "sql" => {
                if normalise_sql(generated) == normalise_sql(reference) {
                    primary += 1.0;
                }
            }
            other => bail!("unknown task `{other}`"),
        }
    }
    let n = predictions.len() as f64;
    Ok(TaskScore {
        primary: primary / n,
        exact: exact / n,
        all_slots: (task == "d2t").then_some(all / n),
    })
}

/// The name of each task's own metric, for the report.
pub fn primary_metric(task: &str) -> &'static str {
    match task {
        "d2t" => "slot coverage",
        "math" => "final-number accuracy",
        "sql" => "normalised-SQL accuracy",
        _ => "score",
    }
}

// ------------------------------------------------------------------------------ budgets

/// The linear layers every adapter targets in SmolLM2-135M (`q/k/v/o/gate/up/down_proj` of
/// its 30 decoder layers), as `(out, in)`: hidden 576, 9 query and 3 key/value heads of 64,
/// MLP 1536 (the GGUF file's config).
pub fn smollm2_linears() -> Vec<(usize, usize)> {
    let (hidden, kv, mlp) = (576, 192, 1536);
    let layer = [
        (hidden, hidden),
        (kv, hidden),
        (kv, hidden),
        (hidden, hidden),
        (mlp, hidden),
        (mlp, hidden),
        (hidden, mlp),
    ];
    (0..30).flat_map(|_| layer).collect()
}

/// The target modules of every adapter in the study.
pub const TARGETS: &str =
    r#"["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]"#;

/// LoRA's trainable count at rank `r` on `linears`: `r · (in + out)` each.
pub fn lora_count(linears: &[(usize, usize)], r: usize) -> usize {
    linears.iter().map(|&(o, i)| r * (o + i)).sum()
}

/// RoSA's sparse count at density `d`: `⌊d · out · in⌋` per layer (peft-rosa's rule).
pub fn sparse_count(linears: &[(usize, usize)], d: f64) -> usize {
    linears
        .iter()
        .map(|&(o, i)| (d * (o * i) as f64) as usize)
        .sum()
}

/// The density (a multiple of 1e-6) whose sparse count on `linears` is the smallest at or above
/// `target`.
pub fn density_for(linears: &[(usize, usize)], target: usize) -> f64 {
    let numel: usize = linears.iter().map(|&(o, i)| o * i).sum();
    let mut micro = (target as f64 / numel as f64 * 1e6).floor() as u64;
    while sparse_count(linears, micro as f64 / 1e6) < target {
        micro += 1;
    }
    micro as f64 / 1e6
}

/// The study's budget: LoRA r 16 on every targeted layer.
pub fn budget() -> usize {
    lora_count(&smollm2_linears(), 16)
}

// ------------------------------------------------------------------------------ presets

/// How big a study is.
#[derive(Clone, Debug, PartialEq)]
pub struct Preset {
    /// `quick` or `full`.
    pub name: &'static str,
    /// The tasks (folders of `benchmarks/quality/data`).
    pub tasks: Vec<&'static str>,
    /// The seeds of each (task, method).
    pub seeds: Vec<u64>,
    /// Optimizer steps per run.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Truncation length (no example of the tasks is longer).
    pub max_seq_len: usize,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Validation evaluations (loss only) every this many steps.
    pub eval_every: usize,
    /// Checkpoints every this many steps (what an interrupted run resumes from).
    pub save_every: usize,
    /// Validation examples (the first of the split).
    pub n_valid: usize,
    /// Test examples (the first of the split).
    pub n_test: usize,
    /// The task of the learning-rate sweep (seed 0); `None`: each method's middle rate.
    pub sweep_task: Option<&'static str>,
}

impl Preset {
    /// `quick` (one task, one seed, short runs, no sweep) or `full`.
    ///
    /// # Errors
    /// Another name.
    pub fn named(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "quick" => Self {
                name: "quick",
                tasks: vec!["sql"],
                seeds: vec![0],
                steps: 8,
                batch_size: 4,
                max_seq_len: 160,
                warmup_steps: 1,
                eval_every: 4,
                save_every: 4,
                n_valid: 12,
                n_test: 12,
                sweep_task: None,
            },
            "full" => Self {
                name: "full",
                tasks: vec!["d2t", "math", "sql"],
                seeds: vec![0, 1, 2],
                steps: 20,
                batch_size: 4,
                max_seq_len: 160,
                warmup_steps: 2,
                eval_every: 5,
                save_every: 5,
                n_valid: 24,
                n_test: 32,
                sweep_task: Some("math"),
            },
            other => bail!("unknown preset `{other}` (quick or full)"),
        })
    }
}

/// One method of the study.
#[derive(Clone, Debug, PartialEq)]
pub struct Method {
    /// The name in tables and folders (`sft-rigl`, `sft-sm3`; else the method's name).
    pub label: &'static str,
    /// The `[method]` table's body.
    pub table: String,
    /// The learning rates of the sweep (the middle one without a sweep).
    pub lrs: [f64; 3],
    /// More rates of the sweep, grid steps beyond the edge of `lrs` where the first full
    /// sweep's winner sat (2026-12-06: nine of the eleven winners were at an edge of their
    /// grid, so the best rate could lie outside it; AdaLoRA and PaFI won at the first extra
    /// rate too and got a second); empty where the winner was inside.
    pub extra_lrs: &'static [f64],
    /// The trainable count the settings aim at (`None`: the method's own: full, BitFit).
    pub planned: Option<usize>,
}

/// The study's methods at matched budgets for `preset`'s run length: LoRA r 16 on every linear
/// layer is the budget; DoRA r 16 (plus its magnitudes); AdaLoRA from r 24 to an average of
/// r 16; RoSA r 8 plus the density that makes up the rest; SpA the density alone; SFT (RigL,
/// SM3), ID3 and PaFI that count of weights; BitFit and full fine-tuning their own.
pub fn methods(preset: &Preset) -> Vec<Method> {
    let linears = smollm2_linears();
    let budget = budget();
    let r8 = lora_count(&linears, 8);
    let rosa_d = density_for(&linears, budget - r8);
    let spa_d = density_for(&linears, budget);
    let steps = preset.steps;
    // Phases scaled to the run: RoSA's LoRA warm-up (the paper's wl recipe) a sixth of the
    // run, AdaLoRA's budgeting between a sixth and two thirds, SFT reselecting three times.
    let warm = (steps / 6).max(1);
    let (tinit, tfinal) = ((steps / 6).max(1), (steps / 3).max(1));
    let reselect = (steps / 3).max(1);
    let lora = format!("r = 16\nlora_alpha = 32\nlora_dropout = 0.0\ntarget_modules = {TARGETS}\n");
    let m = |label, table: String, lrs, planned| Method {
        label,
        table,
        lrs,
        extra_lrs: extra_lrs(label),
        planned,
    };
    vec![
        m("full", "name = \"full\"\n".into(), [1e-5, 3e-5, 1e-4], None),
        m(
            "lora",
            format!("name = \"lora\"\n{lora}"),
            [3e-4, 1e-3, 3e-3],
            Some(budget),
        ),
        m(
            "dora",
            format!("name = \"dora\"\n{lora}"),
            [3e-4, 1e-3, 3e-3],
            Some(budget),
        ),
        m(
            "adalora",
            format!(
                "name = \"adalora\"\ninit_r = 24\ntarget_r = 16\nlora_alpha = 32\ntinit = \
                 {tinit}\ntfinal = {tfinal}\ndeltaT = 1\ntarget_modules = {TARGETS}\n"
            ),
            [1e-3, 3e-3, 1e-2],
            Some(budget),
        ),
        m(
            "rosa",
            format!(
                "name = \"rosa\"\nr = 8\nlora_alpha = 16\nd = {rosa_d}\nschedule = \
                 \"wl{warm}\"\nspa_num_grads = 1\ntarget_modules = {TARGETS}\n"
            ),
            [3e-4, 1e-3, 3e-3],
            Some(r8 + sparse_count(&linears, rosa_d)),
        ),
        m(
            "spa",
            format!("name = \"spa\"\nd = {spa_d}\ntarget_modules = {TARGETS}\n"),
            [3e-4, 1e-3, 3e-3],
            Some(sparse_count(&linears, spa_d)),
        ),
        m(
            "sft-rigl",
            format!(
                "name = \"sft\"\nnum_tunable_weights = {budget}\nselection_algorithm = \
                 \"rigl\"\nreselection_steps = {reselect}\nselection_accumulation_steps = 1\n\
                 target_modules = {TARGETS}\n"
            ),
            [3e-4, 1e-3, 3e-3],
            Some(budget),
        ),
        m(
            "sft-sm3",
            format!(
                "name = \"sft\"\nnum_tunable_weights = {budget}\nselection_algorithm = \
                 \"sm3\"\nreselection_steps = {reselect}\nselection_accumulation_steps = 1\n\
                 target_modules = {TARGETS}\n"
            ),
            [1e-3, 3e-3, 1e-2],
            Some(budget),
        ),
        m(
            "id3",
            format!("name = \"id3\"\nbudget = {budget}\n"),
            [1e-4, 3e-4, 1e-3],
            Some(budget),
        ),
        m(
            "pafi",
            format!("name = \"pafi\"\nbudget = {budget}\n"),
            [1e-4, 3e-4, 1e-3],
            Some(budget),
        ),
        m(
            "bitfit",
            "name = \"bitfit\"\n".into(),
            [1e-3, 3e-3, 1e-2],
            None,
        ),
    ]
}

/// [`Method::extra_lrs`]: the first full sweep's winners at the top edge get the next rates
/// up, those at the bottom edge the next rates down (the grids step by about 3.16x).
fn extra_lrs(label: &str) -> &'static [f64] {
    match label {
        "full" => &[3e-4],
        "lora" | "dora" => &[1e-2],
        "adalora" => &[3e-2, 1e-1],
        "bitfit" => &[3e-2],
        "rosa" | "spa" | "sft-rigl" => &[1e-4],
        "id3" => &[3e-3],
        "pafi" => &[3e-3, 1e-2],
        _ => &[],
    }
}

/// Every rate `method` is swept at, in increasing order.
pub fn sweep_rates(method: &Method) -> Vec<f64> {
    let mut rates: Vec<f64> = method.lrs.iter().chain(method.extra_lrs).copied().collect();
    rates.sort_by(f64::total_cmp);
    rates
}

// ------------------------------------------------------------------------------ plan

/// Which part of the study a run belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The learning-rate sweep (validation split only).
    Sweep,
    /// The study's runs (scored on the test split).
    Study,
}

/// One run of the study.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// The task.
    pub task: String,
    /// The method's label.
    pub label: String,
    /// The seed.
    pub seed: u64,
    /// The peak learning rate.
    pub lr: f64,
}

impl RunSpec {
    /// The run's folder under the study root: `runs/<task>/<label>/lr<lr>/seed<seed>`.
    pub fn dir(&self) -> PathBuf {
        Path::new("runs")
            .join(&self.task)
            .join(&self.label)
            .join(format!("lr{:e}", self.lr))
            .join(format!("seed{}", self.seed))
    }
}

/// What a finished run leaves in its `out/`, by method label.
pub fn final_output(label: &str) -> &'static str {
    match label {
        "id3" | "pafi" | "bitfit" => "out/summary",
        "full" => "out/model.safetensors",
        _ => "out/adapter",
    }
}

/// The run file of `spec` (paths relative to the run's folder, four levels below the root).
pub fn run_file(preset: &Preset, method: &Method, spec: &RunSpec) -> String {
    let data = format!("../../../../../data/{}", spec.task);
    let p = preset;
    format!(
        "# The quality study ({preset}): {task}, {label}, seed {seed}, lr {lr:e}.\n\
         [model]\npath = \"SmolLM2-135M-Instruct.Q4_1.gguf\"\n\n\
         [data]\ntrain = \"{data}/train.jsonl\"\neval = \"{data}/validation.jsonl\"\n\
         chat_template = true\nmax_seq_len = {msl}\n\n\
         [method]\n{table}\n\
         [train]\nsteps = {steps}\nbatch_size = {bs}\nlr = {lr:e}\nlr_schedule = \"cosine\"\n\
         warmup_steps = {warm}\nseed = {seed}\neval_every = {ee}\neval_generate = false\n\
         save_every = {se}\nsave_total_limit = 1\nout_dir = \"out\"\n",
        preset = p.name,
        task = spec.task,
        label = spec.label,
        seed = spec.seed,
        lr = spec.lr,
        msl = p.max_seq_len,
        table = method.table,
        steps = p.steps,
        bs = p.batch_size,
        warm = p.warmup_steps,
        ee = p.eval_every,
        se = p.save_every,
    )
}

/// The sweep's runs: every method at each of its rates on the sweep task, seed 0.
pub fn sweep_specs(preset: &Preset) -> Vec<RunSpec> {
    let Some(task) = preset.sweep_task else {
        return Vec::new();
    };
    methods(preset)
        .iter()
        .flat_map(|m| {
            sweep_rates(m).into_iter().map(move |lr| RunSpec {
                task: task.into(),
                label: m.label.into(),
                seed: 0,
                lr,
            })
        })
        .collect()
}

/// The study's runs: every task, method and seed at the method's chosen rate.
pub fn study_specs(preset: &Preset, lrs: &BTreeMap<String, f64>) -> Vec<RunSpec> {
    let mut specs = Vec::new();
    for task in &preset.tasks {
        for m in methods(preset) {
            for &seed in &preset.seeds {
                specs.push(RunSpec {
                    task: (*task).into(),
                    label: m.label.into(),
                    seed,
                    lr: lrs.get(m.label).copied().unwrap_or(m.lrs[1]),
                });
            }
        }
    }
    specs
}

/// A finished run's metrics: the validation curve and the step times.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// `(step, eval_loss)` of each evaluation, in order.
    pub curve: Vec<(usize, f64)>,
    /// Each logged step's wall time in seconds.
    pub step_s: Vec<f64>,
}

impl Metrics {
    /// Parse `metrics.jsonl` text.
    ///
    /// # Errors
    /// A line that is not JSON.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut m = Self::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).context("a metrics line is not JSON")?;
            let step = v["step"].as_u64().unwrap_or(0) as usize;
            if let Some(loss) = v["eval_loss"].as_f64() {
                m.curve.push((step, loss));
            }
            if let Some(s) = v["step_s"].as_f64() {
                m.step_s.push(s);
            }
        }
        Ok(m)
    }

    /// The last evaluation's loss.
    pub fn final_eval_loss(&self) -> Option<f64> {
        self.curve.last().map(|&(_, l)| l)
    }
}

/// The marker `benchmarks/quality.sh` writes in a run's folder when its training finished: the
/// committed record of a run whose model git does not keep.
pub const TRAINED: &str = "trained";

/// The metrics of the run in `dir` when it finished (its final output or its [`TRAINED`]
/// marker exists).
fn finished_metrics(root: &Path, spec: &RunSpec) -> anyhow::Result<Option<Metrics>> {
    let dir = root.join(spec.dir());
    if !dir.join(final_output(&spec.label)).exists() && !dir.join(TRAINED).is_file() {
        return Ok(None);
    }
    let file = dir.join("out/metrics.jsonl");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Metrics::parse(&text).map(Some)
}

/// The sweep's choice: per method, the rate whose run ends with the lowest validation loss
/// (ties: the lower rate); `Err` naming the unfinished runs while any is.
///
/// # Errors
/// Unfinished sweep runs, unreadable metrics.
pub fn choose_lrs(preset: &Preset, root: &Path) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut chosen: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    let mut missing = Vec::new();
    for spec in sweep_specs(preset) {
        match finished_metrics(root, &spec)?.and_then(|m| m.final_eval_loss()) {
            Some(loss) => {
                let best = chosen.entry(spec.label.clone()).or_insert((spec.lr, loss));
                if loss < best.1 {
                    *best = (spec.lr, loss);
                }
            }
            None => missing.push(spec.dir().display().to_string()),
        }
    }
    ensure!(
        missing.is_empty(),
        "the sweep is not finished: {}",
        missing.join(", ")
    );
    Ok(chosen.into_iter().map(|(k, (lr, _))| (k, lr)).collect())
}

/// Write the run files and the plan of `phase` under `root` (and the data subsets of the
/// preset, copied from `data`); returns the plan file. Each plan line: the run's folder
/// (relative to `root`), the file whose presence says it finished (relative to the folder),
/// then `phase task label seed lr`.
///
/// # Errors
/// Unreadable data, I/O errors; for the study phase, an unfinished sweep.
pub fn plan(preset: &Preset, root: &Path, data: &Path, phase: Phase) -> anyhow::Result<PathBuf> {
    for task in &preset.tasks {
        let out = root.join("data").join(task);
        std::fs::create_dir_all(&out)?;
        for (split, n) in [
            ("train", usize::MAX),
            ("validation", preset.n_valid),
            ("test", preset.n_test),
        ] {
            let file = data.join(task).join(format!("{split}.jsonl"));
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let kept: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
            write_if_changed(&out.join(format!("{split}.jsonl")), &kept)?;
        }
    }
    let (specs, name) = match phase {
        Phase::Sweep => (sweep_specs(preset), "sweep"),
        Phase::Study => {
            let lrs = if preset.sweep_task.is_some() {
                choose_lrs(preset, root)?
            } else {
                BTreeMap::new()
            };
            (study_specs(preset, &lrs), "study")
        }
    };
    let methods = methods(preset);
    let mut plan = String::new();
    for spec in &specs {
        let method = methods
            .iter()
            .find(|m| m.label == spec.label)
            .context("a run of an unknown method")?;
        let dir = root.join(spec.dir());
        std::fs::create_dir_all(&dir)?;
        write_if_changed(&dir.join("run.toml"), &run_file(preset, method, spec))?;
        writeln!(
            plan,
            "{}\t{}\t{name}\t{}\t{}\t{}\t{:e}",
            spec.dir().display(),
            final_output(&spec.label),
            spec.task,
            spec.label,
            spec.seed,
            spec.lr
        )?;
    }
    let file = root.join(format!("plan-{name}.tsv"));
    std::fs::write(&file, plan)?;
    Ok(file)
}

/// Write `text` to `file` unless it already holds it (a resumed run checks its run file).
fn write_if_changed(file: &Path, text: &str) -> anyhow::Result<()> {
    if std::fs::read_to_string(file).is_ok_and(|old| old == text) {
        return Ok(());
    }
    std::fs::write(file, text).with_context(|| format!("writing {}", file.display()))
}

// ------------------------------------------------------------------------------ report

/// Mean and sample standard deviation (`n - 1`; `None` below two values).
pub fn mean_std(values: &[f64]) -> Option<(f64, Option<f64>)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let std = (values.len() > 1)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    Some((mean, std))
}

/// `mean ± std` with `digits` decimals, scaled by `scale` (100 for percentages); `—` when
/// there is no value, no `± ` with one value.
pub fn fmt_mean_std(values: &[f64], scale: f64, digits: usize) -> String {
    match mean_std(values) {
        None => "—".into(),
        Some((m, None)) => format!("{:.*}", digits, m * scale),
        Some((m, Some(s))) => format!("{:.*} ± {:.*}", digits, m * scale, digits, s * scale),
    }
}

/// What one finished study run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// The run.
    pub spec: RunSpec,
    /// Its validation curve and step times.
    pub metrics: Metrics,
    /// The test split's scores (absent until `burn-peft eval` ran on it).
    pub test: Option<TaskScore>,
    /// The test split's eval loss.
    pub test_loss: Option<f64>,
    /// The trainable count the run printed.
    pub trainable: Option<usize>,
    /// The training's peak resident memory in MB (`/usr/bin/time -v`, the largest over its
    /// resumed segments).
    pub peak_rss_mb: Option<f64>,
    /// Wall seconds of training and test evaluation, summed over segments.
    pub wall_s: f64,
}

/// Read the study run `spec` under `root`; `None` while unfinished (no final output).
///
/// # Errors
/// Unreadable or malformed files of a finished run.
pub fn read_run(root: &Path, spec: &RunSpec) -> anyhow::Result<Option<RunResult>> {
    let Some(metrics) = finished_metrics(root, spec)? else {
        return Ok(None);
    };
    let dir = root.join(spec.dir());
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let (mut test, mut test_loss) = (None, None);
    if let (Some(eval), Some(preds)) = (read("test_eval.json"), read("test_predictions.jsonl")) {
        let eval: Value = serde_json::from_str(eval.trim()).context("test_eval.json")?;
        test_loss = eval["eval_loss"].as_f64();
        let rows = json_lines(&preds)?;
        let file = root.join("data").join(&spec.task).join("test.jsonl");
        let lines = json_lines(&std::fs::read_to_string(&file)?)?;
        test = Some(score_task(&spec.task, &rows, &lines)?);
    }
    // The last count `burn-peft train` printed: a RoSA or SpA run prints it again at the end,
    // once its masks have made the sparse values.
    let trainable = read("train.log").and_then(|log| {
        log.lines().rev().find_map(|l| {
            let rest = l.split("trainable params: ").nth(1)?;
            rest.split_whitespace().next()?.parse::<usize>().ok()
        })
    });
    let peak_rss_mb = read("time-train.txt").and_then(|t| {
        t.lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("Maximum resident set size (kbytes): ")
            })
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .reduce(f64::max)
            .map(|kb| kb / 1024.0)
    });
    let wall_s = read("wall.tsv")
        .map(|w| {
            w.lines()
                .filter_map(|l| l.split('\t').nth(1)?.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    Ok(Some(RunResult {
        spec: spec.clone(),
        metrics,
        test,
        test_loss,
        trainable,
        peak_rss_mb,
        wall_s,
    }))
}

fn json_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("a line is not JSON"))
        .collect()
}

/// The papers' orderings the study tests: `(claim, better, worse)`, each meaning "`better`'s
/// mean test score is above `worse`'s".
pub const CLAIMS: [(&str, &str, &str); 7] = [
    (
        "RoSA paper: RoSA above LoRA at equal budget",
        "rosa",
        "lora",
    ),
    (
        "RoSA paper: RoSA at or above full fine-tuning",
        "rosa",
        "full",
    ),
    ("RoSA paper: RoSA above SpA (sparse alone)", "rosa", "spa"),
    (
        "SFT paper: SFT at least as good as LoRA at equal count",
        "sft-rigl",
        "lora",
    ),
    (
        "AdaLoRA paper: AdaLoRA above LoRA at equal budget",
        "adalora",
        "lora",
    ),
    ("ID3 paper: ID3 above PaFI", "id3", "pafi"),
    ("ID3 paper: ID3 above BitFit", "id3", "bitfit"),
];

/// Write the report of the study under `root` into `out_dir`: `<preset>.md` and one
/// `<preset>-<task>-eval-loss.svg` per task; returns the Markdown file.
///
/// # Errors
/// Unreadable results of finished runs, I/O errors.
pub fn report(preset: &Preset, root: &Path, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let lrs = if preset.sweep_task.is_some() {
        choose_lrs(preset, root).ok()
    } else {
        Some(BTreeMap::new())
    };
    std::fs::create_dir_all(out_dir)?;
    let methods = methods(preset);
    let mut md = String::new();
    let mut missing = Vec::new();
    let total_wall = total_wall(preset, root, lrs.as_ref())?;
    writeln!(
        md,
        "# Quality study: `{}` preset\n\nWritten by `benchmarks/quality.sh` (`quality_report \
         report`) from the runs under the study folder; every number below is read from the \
         runs' own files. Tasks: {}; seeds: {:?}; {} steps of batch {}, max_seq_len {}; \
         validation {} examples (loss every {} steps), test {} examples (held out).\n",
        preset.name,
        preset.tasks.join(", "),
        preset.seeds,
        preset.steps,
        preset.batch_size,
        preset.max_seq_len,
        preset.n_valid,
        preset.eval_every,
        preset.n_test,
    )?;
    if let Some(task) = preset.sweep_task {
        sweep_table(&mut md, preset, root, task, &mut missing)?;
    }
    let Some(lrs) = lrs else {
        writeln!(md, "The sweep is not finished: no study table yet.\n")?;
        return finish(md, missing, total_wall, out_dir, preset);
    };
    for task in &preset.tasks {
        let mut by_label: BTreeMap<String, Vec<RunResult>> = BTreeMap::new();
        for spec in study_specs(preset, &lrs).iter().filter(|s| s.task == *task) {
            match read_run(root, spec)? {
                Some(r) if r.test.is_some() => {
                    by_label.entry(spec.label.clone()).or_default().push(r);
                }
                Some(_) => missing.push(format!(
                    "{} (trained, not yet scored on test)",
                    spec.dir().display()
                )),
                None => missing.push(spec.dir().display().to_string()),
            }
        }
        task_table(&mut md, preset, task, &methods, &lrs, &by_label)?;
        let svg = format!("{}-{task}-eval-loss.svg", preset.name);
        let curves: Vec<(String, Vec<(usize, f64)>)> = methods
            .iter()
            .filter_map(|m| {
                let runs = by_label.get(m.label)?;
                Some((m.label.to_string(), mean_curve(runs)))
            })
            .collect();
        plot_curves(
            &out_dir.join(&svg),
            &format!("{task}: validation eval loss (mean over seeds)"),
            &curves,
        )?;
        writeln!(md, "![{task} eval-loss curves]({svg})\n")?;
        claims(&mut md, task, &by_label)?;
    }
    finish(md, missing, total_wall, out_dir, preset)
}

/// The wall seconds of every finished run of the sweep and the study (a sweep run that is also
/// a study run counted once).
fn total_wall(
    preset: &Preset,
    root: &Path,
    lrs: Option<&BTreeMap<String, f64>>,
) -> anyhow::Result<f64> {
    let mut specs = sweep_specs(preset);
    if let Some(lrs) = lrs {
        specs.extend(study_specs(preset, lrs));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0.0;
    for spec in specs {
        if seen.insert(spec.dir())
            && let Some(r) = read_run(root, &spec)?
        {
            total += r.wall_s;
        }
    }
    Ok(total)
}

fn finish(
    mut md: String,
    missing: Vec<String>,
    total_wall: f64,
    out_dir: &Path,
    preset: &Preset,
) -> anyhow::Result<PathBuf> {
    writeln!(
        md,
        "## Runs\n\nWall time of the finished runs (training and test scoring, as measured by \
         the driver; see `wall.tsv` in each run for the load average at each start): {:.0} s \
         ({:.2} h).\n",
        total_wall,
        total_wall / 3600.0
    )?;
    if missing.is_empty() {
        writeln!(md, "Every planned run has finished.")?;
    } else {
        writeln!(md, "Not finished ({}):\n", missing.len())?;
        for m in &missing {
            writeln!(md, "- `{m}`")?;
        }
    }
    let file = out_dir.join(format!("{}.md", preset.name));
    std::fs::write(&file, md)?;
    Ok(file)
}

fn sweep_table(
    md: &mut String,
    preset: &Preset,
    root: &Path,
    task: &str,
    missing: &mut Vec<String>,
) -> anyhow::Result<()> {
    writeln!(
        md,
        "## Learning-rate sweep\n\n`{task}`, seed 0, final validation eval loss per rate (the \
         chosen rate, lowest loss, in bold). The test split is not used.\n\n| method | rates |\n\
         |---|---|"
    )?;
    let mut rows: BTreeMap<String, Vec<(f64, Option<f64>)>> = BTreeMap::new();
    for spec in sweep_specs(preset) {
        let loss = finished_metrics(root, &spec)?.and_then(|m| m.final_eval_loss());
        if loss.is_none() {
            missing.push(spec.dir().display().to_string());
        }
        rows.entry(spec.label.clone())
            .or_default()
            .push((spec.lr, loss));
    }
    for m in methods(preset) {
        let cells = &rows[m.label];
        let best = cells
            .iter()
            .filter_map(|&(lr, l)| Some((lr, l?)))
            .reduce(|a, b| if b.1 < a.1 { b } else { a });
        let text: Vec<String> = cells
            .iter()
            .map(|&(lr, l)| {
                let cell = match l {
                    Some(l) => format!("{lr:e}: {l:.4}"),
                    None => format!("{lr:e}: not run"),
                };
                if best.is_some_and(|b| b.0 == lr) {
                    format!("**{cell}**")
                } else {
                    cell
                }
            })
            .collect();
        writeln!(md, "| {} | {} |", m.label, text.join(", "))?;
    }
    writeln!(md)?;
    Ok(())
}

fn task_table(
    md: &mut String,
    preset: &Preset,
    task: &str,
    methods: &[Method],
    lrs: &BTreeMap<String, f64>,
    by_label: &BTreeMap<String, Vec<RunResult>>,
) -> anyhow::Result<()> {
    let extra = if task == "d2t" {
        " | all slots (%)"
    } else {
        ""
    };
    writeln!(
        md,
        "## Task `{task}`\n\nHeld-out test split; mean ± std over the finished seeds (n).\n\n\
         | method | lr | trainable | {} (%) | exact match (%){extra} | test eval loss | final \
         validation loss | step time (s) | peak RSS (MB) | n |\n\
         |---|---|---:|---:|---:|{}---:|---:|---:|---:|---:|",
        primary_metric(task),
        if task == "d2t" { "---:|" } else { "" }
    )?;
    for m in methods {
        let lr = lrs.get(m.label).copied().unwrap_or(m.lrs[1]);
        let runs = by_label.get(m.label).map(Vec::as_slice).unwrap_or_default();
        let pick = |f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<f64> {
            runs.iter().filter_map(f).collect()
        };
        let trainable = runs
            .iter()
            .find_map(|r| r.trainable)
            .map_or_else(|| "—".into(), |t| t.to_string());
        let all = if task == "d2t" {
            format!(
                " | {}",
                fmt_mean_std(&pick(&|r| r.test?.all_slots), 100.0, 1)
            )
        } else {
            String::new()
        };
        let step = pick(&|r| {
            let s = &r.metrics.step_s;
            (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64)
        });
        writeln!(
            md,
            "| {} | {lr:e} | {trainable} | {} | {}{all} | {} | {} | {} | {} | {}/{} |",
            m.label,
            fmt_mean_std(&pick(&|r| Some(r.test?.primary)), 100.0, 1),
            fmt_mean_std(&pick(&|r| Some(r.test?.exact)), 100.0, 1),
            fmt_mean_std(&pick(&|r| r.test_loss), 1.0, 4),
            fmt_mean_std(&pick(&|r| r.metrics.final_eval_loss()), 1.0, 4),
            fmt_mean_std(&step, 1.0, 2),
            fmt_mean_std(&pick(&|r| r.peak_rss_mb), 1.0, 0),
            runs.len(),
            preset.seeds.len(),
        )?;
    }
    writeln!(md)?;
    Ok(())
}

fn claims(
    md: &mut String,
    task: &str,
    by_label: &BTreeMap<String, Vec<RunResult>>,
) -> anyhow::Result<()> {
    writeln!(
        md,
        "Papers' orderings on `{task}` ({}; \"within noise\": the difference is smaller than \
         the larger of the two std):\n",
        primary_metric(task)
    )?;
    for (claim, better, worse) in CLAIMS {
        let scores = |label: &str| -> Vec<f64> {
            by_label
                .get(label)
                .map(|runs| runs.iter().filter_map(|r| Some(r.test?.primary)).collect())
                .unwrap_or_default()
        };
        let (a, b) = (scores(better), scores(worse));
        let (Some((ma, sa)), Some((mb, sb))) = (mean_std(&a), mean_std(&b)) else {
            writeln!(md, "- {claim}: not measured (runs missing)")?;
            continue;
        };
        let holds = if (better == "rosa" && worse == "full") || better == "sft-rigl" {
            ma >= mb
        } else {
            ma > mb
        };
        let noise = sa.unwrap_or(0.0).max(sb.unwrap_or(0.0));
        let verdict = match (holds, (ma - mb).abs() < noise) {
            (true, false) => "reproduced",
            (true, true) => "reproduced, within noise",
            (false, false) => "NOT reproduced",
            (false, true) => "not reproduced, within noise",
        };
        writeln!(
            md,
            "- {claim}: {better} {} vs {worse} {}: **{verdict}**",
            fmt_mean_std(&a, 100.0, 1),
            fmt_mean_std(&b, 100.0, 1)
        )?;
    }
    writeln!(md)?;
    Ok(())
}

/// The mean eval loss over runs at each step that every run evaluated.
pub fn mean_curve(runs: &[RunResult]) -> Vec<(usize, f64)> {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .metrics
        .curve
        .iter()
        .filter_map(|&(step, _)| {
            let at: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.metrics.curve.iter().find(|c| c.0 == step).map(|c| c.1))
                .collect();
            (at.len() == runs.len()).then(|| (step, at.iter().sum::<f64>() / at.len() as f64))
        })
        .collect()
}

/// Draw `curves` (label, `(step, loss)` points) as one SVG line chart into `file`.
///
/// # Errors
/// Drawing or I/O errors.
pub fn plot_curves(
    file: &Path,
    title: &str,
    curves: &[(String, Vec<(usize, f64)>)],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let points = curves.iter().flat_map(|(_, c)| c.iter());
    let max_step = points.clone().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let (lo, hi) = points
        .map(|p| p.1)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", file.display());
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("validation eval loss")
            .draw()
            .map_err(e)?;
        for (i, (label, curve)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    curve.iter().map(|&(s, l)| (s as f64, l)),
                    color.stroke_width(2),
                ))
                .map_err(e)?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    std::fs::write(file, svg).with_context(|| format!("writing {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_number_is_the_last_one() {
        assert_eq!(final_number("3 + 4 = 7. The answer is 12."), Some(12.0));
        assert_eq!(final_number("It is 1,200 apples"), Some(1200.0));
        assert_eq!(final_number("down to -3"), Some(-3.0));
        assert_eq!(final_number("x-3"), Some(3.0));
        assert_eq!(final_number("4.5 left."), Some(4.5));
        assert_eq!(final_number("no number"), None);
        assert!(final_number_matches("... The answer is 8.", 8.0));
        assert!(!final_number_matches("The answer is 8. Or 9", 8.0));
    }

    #[test]
    fn sql_normalisation_ignores_case_spacing_and_semicolons_but_not_literals() {
        let a = normalise_sql("SELECT COUNT(*) FROM ships WHERE flag = 'panama'");
        assert_eq!(a, "select count ( * ) from ships where flag = 'panama'");
        assert_eq!(
            normalise_sql("select count( * ) from Ships where flag='panama';"),
            a
        );
        assert_eq!(
            normalise_sql("SELECT COUNT(*) FROM ships WHERE flag = \"panama\""),
            a
        );
        assert_ne!(
            normalise_sql("SELECT COUNT(*) FROM ships WHERE flag = 'Panama'"),
            a
        );
        assert_ne!(
            normalise_sql("SELECT COUNT(*) FROM ship WHERE flag = 'panama'"),
            a
        );
        assert_eq!(normalise_sql("a<=3"), "a <= 3");
        assert_ne!(normalise_sql("a<=3"), normalise_sql("a<3"));
    }

    #[test]
    fn tasks_are_scored_by_their_own_metric() {
        let d2t = serde_json::json!({"completion": "X is a good puzzle game.",
            "slots": ["X", "puzzle", "good"]});
        let preds = [
            serde_json::json!({"line": 1, "generated": "X is a good puzzle game."}),
            serde_json::json!({"line": 1, "generated": "x, a Puzzle."}),
        ];
        let s = score_task("d2t", &preds, std::slice::from_ref(&d2t)).unwrap();
        assert!((s.primary - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert_eq!(s.exact, 0.5);
        assert_eq!(s.all_slots, Some(0.5));
        let math = serde_json::json!({"completion": "2 + 2 = 4. The answer is 4.", "answer": 4});
        let preds = [
            serde_json::json!({"line": 1, "generated": "2 + 3 = 5. The answer is 4."}),
            serde_json::json!({"line": 1, "generated": "The answer is 5."}),
        ];
        let s = score_task("math", &preds, std::slice::from_ref(&math)).unwrap();
        assert_eq!((s.primary, s.exact, s.all_slots), (0.5, 0.0, None));
        let sql = serde_json::json!({"completion": "SELECT a FROM t"});
        let preds = [serde_json::json!({"line": 1, "generated": "select a from t;"})];
        let s = score_task("sql", &preds, std::slice::from_ref(&sql)).unwrap();
        assert_eq!((s.primary, s.exact), (1.0, 0.0));
        let bad = [serde_json::json!({"line": 2, "generated": ""})];
        assert!(score_task("sql", &bad, std::slice::from_ref(&sql)).is_err());
    }

    #[test]
    fn budgets_match_lora_r16() {
        let linears = smollm2_linears();
        // PEFT's and burn-peft's printed count for LoRA r 16 on SmolLM2 (docs/benchmarks.md).
        assert_eq!(budget(), 4_884_480);
        assert_eq!(lora_count(&linears, 8), 2_442_240);
        let preset = Preset::named("full").unwrap();
        for m in methods(&preset) {
            if let Some(planned) = m.planned {
                let off = (planned as f64 - budget() as f64).abs() / budget() as f64;
                assert!(off < 1e-3, "{}: {planned} vs {}", m.label, budget());
            }
        }
        // RoSA: r 8 plus its density's weights; the density is the smallest reaching the rest.
        let d = density_for(&linears, budget() - 2_442_240);
        assert!(sparse_count(&linears, d) >= 2_442_240);
        assert!(sparse_count(&linears, d - 1e-6) < 2_442_240);
        assert!((d - 0.023).abs() < 1e-3, "{d}");
    }

    #[test]
    fn every_run_file_parses_as_a_run_file() {
        for preset in ["quick", "full"] {
            let preset = Preset::named(preset).unwrap();
            for spec in sweep_specs(&preset)
                .into_iter()
                .chain(study_specs(&preset, &BTreeMap::new()))
            {
                let m = methods(&preset)
                    .into_iter()
                    .find(|m| m.label == spec.label)
                    .unwrap();
                let text = run_file(&preset, &m, &spec);
                let c = peft_cli::train::config::RunConfig::parse(&text, Path::new("run.toml"))
                    .unwrap_or_else(|e| panic!("{}: {e:#}", spec.dir().display()));
                assert_eq!(c.train.lr, spec.lr);
                assert!(!c.train.eval_generate);
            }
        }
    }

    /// The committed task files: the sizes the docs give, and a test split built from
    /// material that training never shows.
    #[test]
    fn the_committed_tasks_hold_out_their_test_material() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benchmarks/quality/data");
        let read = |task: &str, split: &str| -> Vec<Value> {
            let file = data.join(task).join(format!("{split}.jsonl"));
            json_lines(&std::fs::read_to_string(&file).unwrap()).unwrap()
        };
        for task in ["d2t", "math", "sql"] {
            let (train, valid, test) = (
                read(task, "train"),
                read(task, "validation"),
                read(task, "test"),
            );
            assert_eq!(
                (train.len(), valid.len(), test.len()),
                (300, 40, 40),
                "{task}"
            );
            let seen: std::collections::BTreeSet<&str> = train
                .iter()
                .chain(&valid)
                .map(|r| r["prompt"].as_str().unwrap())
                .collect();
            assert_eq!(
                seen.len(),
                340,
                "{task}: train and validation prompts are distinct"
            );
            for r in &test {
                assert!(!seen.contains(r["prompt"].as_str().unwrap()), "{task}: {r}");
            }
            match task {
                "d2t" => {
                    let slot_keys = |r: &Value| -> String {
                        // The slot names: the word before each `[`.
                        let parts: Vec<&str> = r["mr"].as_str().unwrap().split('[').collect();
                        parts[..parts.len() - 1]
                            .iter()
                            .map(|p| p.rsplit([' ', '(']).next().unwrap_or(""))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    let train_values: std::collections::BTreeSet<String> = train
                        .iter()
                        .flat_map(|r| r["slots"].as_array().unwrap().iter())
                        .map(|v| v.as_str().unwrap().to_owned())
                        .collect();
                    let train_combos: std::collections::BTreeSet<String> =
                        train.iter().map(slot_keys).collect();
                    for r in &test {
                        // The name, always the first slot, is never seen in training.
                        let name = r["slots"][0].as_str().unwrap();
                        assert!(!train_values.contains(name), "{name}");
                        assert!(!train_combos.contains(&slot_keys(r)), "{r}");
                        let (found, total) = slots_found(
                            r["completion"].as_str().unwrap(),
                            &r["slots"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|v| v.as_str().unwrap().to_owned())
                                .collect::<Vec<_>>(),
                        );
                        assert_eq!(found, total, "the reference realises every slot: {r}");
                    }
                }
                "math" => {
                    let opening = |r: &Value| -> String {
                        let c = r["completion"].as_str().unwrap();
                        c.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
                    };
                    let train_openings: std::collections::BTreeSet<String> =
                        train.iter().map(opening).collect();
                    for r in &test {
                        assert!(
                            !train_openings.contains(&opening(r)),
                            "unseen template: {r}"
                        );
                        let answer = r["answer"].as_f64().unwrap();
                        assert!(final_number_matches(
                            r["completion"].as_str().unwrap(),
                            answer
                        ));
                    }
                }
                _ => {
                    let table = |r: &Value| -> String {
                        r["schema"]
                            .as_str()
                            .unwrap()
                            .split('(')
                            .next()
                            .unwrap()
                            .to_owned()
                    };
                    let train_tables: std::collections::BTreeSet<String> =
                        train.iter().map(table).collect();
                    for r in &test {
                        assert!(!train_tables.contains(&table(r)), "unseen schema: {r}");
                    }
                }
            }
        }
    }

    fn metrics_text(losses: &[(usize, f64)]) -> String {
        let mut t = String::new();
        for &(s, l) in losses {
            t.push_str(&format!(
                "{{\"step\":{s},\"train_loss\":1.0,\"step_s\":2.0}}\n"
            ));
            t.push_str(&format!("{{\"step\":{s},\"eval_loss\":{l}}}\n"));
        }
        t
    }

    /// The full sweep: each method's three rates plus, for the methods whose first sweep
    /// picked an edge rate, one or two more, each a grid step (about 3.16x) beyond the last.
    #[test]
    fn the_sweep_extends_edge_winners_by_one_grid_step() {
        let preset = Preset::named("full").unwrap();
        let methods = methods(&preset);
        let mut extended = 0;
        for m in &methods {
            let rates = sweep_rates(m);
            assert!(rates.windows(2).all(|w| w[0] < w[1]), "{}: sorted", m.label);
            assert!(
                m.lrs.iter().all(|r| rates.contains(r)),
                "{}: the grid",
                m.label
            );
            let mut edge = if m.extra_lrs.first() > Some(&m.lrs[2]) {
                m.lrs[2]
            } else {
                m.lrs[0]
            };
            for &extra in m.extra_lrs {
                extended += 1;
                let step = (extra / edge).max(edge / extra);
                assert!(
                    (2.9..3.5).contains(&step),
                    "{}: {extra} next to {edge}",
                    m.label
                );
                assert!(extra > m.lrs[2] || extra < m.lrs[0], "{}: outside", m.label);
                edge = extra;
            }
        }
        assert_eq!(
            extended, 12,
            "every method but SFT-SM3, AdaLoRA and PaFI twice"
        );
        let specs = sweep_specs(&preset);
        assert_eq!(specs.len(), 3 * methods.len() + extended);
        assert!(specs.iter().all(|s| s.seed == 0 && s.task == "math"));
        assert!(sweep_specs(&Preset::named("quick").unwrap()).is_empty());
    }

    #[test]
    fn mean_and_std_are_the_sample_ones() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(m, 2.5);
        assert!((s.unwrap() - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[2.0]), Some((2.0, None)));
        assert_eq!(mean_std(&[]), None);
        assert_eq!(fmt_mean_std(&[0.5, 0.7], 100.0, 1), "60.0 ± 14.1");
        assert_eq!(fmt_mean_std(&[], 1.0, 1), "—");
    }

    /// A synthetic quick study: two methods finished with fake metrics and predictions (one
    /// with its model, one with only the `trained` marker of a committed record), the rest
    /// missing; the report computes the means, writes an SVG and names the missing runs.
    #[test]
    fn the_report_reads_runs_and_names_missing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("study");
        let data = tmp.path().join("data/sql");
        std::fs::create_dir_all(&data).unwrap();
        let rows = [
            r#"{"prompt": "p1", "completion": "SELECT a FROM t"}"#,
            r#"{"prompt": "p2", "completion": "SELECT b FROM t"}"#,
        ];
        for split in ["train", "validation", "test"] {
            std::fs::write(data.join(format!("{split}.jsonl")), rows.join("\n")).unwrap();
        }
        let mut preset = Preset::named("quick").unwrap();
        preset.seeds = vec![0, 1];
        let plan_file = plan(&preset, &root, &tmp.path().join("data"), Phase::Study).unwrap();
        let plan_text = std::fs::read_to_string(plan_file).unwrap();
        assert_eq!(plan_text.lines().count(), 11 * 2);
        let lrs = BTreeMap::new();
        for spec in study_specs(&preset, &lrs) {
            let dir = root.join(spec.dir());
            assert!(dir.join("run.toml").is_file());
            if !["lora", "full"].contains(&spec.label.as_str()) {
                continue;
            }
            // lora: test accuracy 100 % and 50 %; full: 0 % and 50 %.
            let right = match (spec.label.as_str(), spec.seed) {
                ("lora", 0) => 2,
                ("full", 0) => 0,
                _ => 1,
            };
            // lora holds its adapter; full only the committed record's marker (no model).
            if spec.label == "lora" {
                std::fs::create_dir_all(dir.join(final_output(&spec.label))).unwrap();
            } else {
                std::fs::create_dir_all(dir.join("out")).unwrap();
                std::fs::write(dir.join(TRAINED), "2026-12-06T00:00:00Z\n").unwrap();
            }
            let base = if spec.label == "lora" { 1.0 } else { 2.0 };
            let curve = [(4, base + spec.seed as f64), (8, base)];
            std::fs::write(dir.join("out/metrics.jsonl"), metrics_text(&curve)).unwrap();
            let preds: Vec<String> = (0..2)
                .map(|i| {
                    let g = if i < right {
                        ["select a from t", "SELECT b FROM t;"][i]
                    } else {
                        "x"
                    };
                    format!("{{\"line\": {}, \"generated\": \"{g}\"}}", i + 1)
                })
                .collect();
            std::fs::write(dir.join("test_predictions.jsonl"), preds.join("\n")).unwrap();
            std::fs::write(dir.join("test_eval.json"), "{\"eval_loss\": 0.5}").unwrap();
            // The last count printed counts (a RoSA or SpA run prints it again at the end).
            std::fs::write(
                dir.join("train.log"),
                "trainable params: 0 || all params: 1\ntrained 8 steps\ntrainable params: 4884480 \
                 || all params: 1 || trainable%: 1.0 (at the end of the run)",
            )
            .unwrap();
            std::fs::write(
                dir.join("time-train.txt"),
                "\tMaximum resident set size (kbytes): 1048576\n\tMaximum resident set size (kbytes): 2097152\n",
            )
            .unwrap();
            std::fs::write(dir.join("wall.tsv"), "train\t10.5\t1.0\ntest\t2\t1.0\n").unwrap();
        }
        let out = tmp.path().join("docs");
        let md = std::fs::read_to_string(report(&preset, &root, &out).unwrap()).unwrap();
        let lora_row = md.lines().find(|l| l.starts_with("| lora |")).unwrap();
        // SQL accuracy 100 and 50: 75 ± 35.4; exact match 0 and 0 (case/semicolon differ) ...
        assert!(lora_row.contains("| 75.0 ± 35.4 |"), "{lora_row}");
        assert!(lora_row.contains("| 4884480 |"), "{lora_row}");
        assert!(lora_row.contains("| 2048 ± 0 |"), "{lora_row}");
        assert!(lora_row.contains("| 2/2 |"), "{lora_row}");
        // final validation loss: 1.0 both seeds.
        assert!(lora_row.contains("| 1.0000 ± 0.0000 |"), "{lora_row}");
        let full_row = md.lines().find(|l| l.starts_with("| full |")).unwrap();
        assert!(full_row.contains("| 25.0 ± 35.4 |"), "{full_row}");
        let dora_row = md.lines().find(|l| l.starts_with("| dora |")).unwrap();
        assert!(dora_row.contains("| 0/2 |"), "{dora_row}");
        assert!(
            md.contains("runs/sql/dora/lr1e-3/seed1"),
            "missing runs are listed"
        );
        assert!(md.contains("Not finished (18)"), "{md}");
        assert!(md.contains(": 50 s (0.01 h)"), "{md}");
        assert!(md.contains("RoSA above LoRA at equal budget: not measured"));
        let svg = std::fs::read_to_string(out.join("quick-sql-eval-loss.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // plotters writes each text element's content on a line of its own.
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| {
                t.split_once('>')
                    .and_then(|(_, rest)| rest.split("</text>").next())
            })
            .map(str::trim)
            .collect();
        assert!(
            texts.contains(&"lora") && texts.contains(&"full"),
            "legend names the methods: {texts:?}"
        );
        assert!(svg.matches("<polyline").count() >= 2, "the two curves");
    }
}
