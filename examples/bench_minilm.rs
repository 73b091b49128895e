//! # bench_minilm: training-step and forward cost on all-MiniLM-L6-v2, against PyTorch + PEFT
//!
//! ```sh
//! python3 scripts/fetch_minilm.py                     # once: the model
//! bash benchmarks/minilm.sh                           # both sides in one run, ratios printed
//! # or the Rust side alone:
//! cargo run --release --example bench_minilm --features x86-v4 -- [--rounds 3] [--steps 5]
//! ```
//!
//! Workload (the same in `benchmarks/minilm_pytorch.py`): batch 16 x 128 tokens (random ids,
//! no padding), loss `mean(last_hidden_state²)`, AdamW (lr 1e-4, weight decay 0.01, eps 1e-8),
//! dropout off. Variants: full fine-tuning; LoRA r=16, alpha 32 on every linear layer
//! (`query`, `key`, `value`, `dense`) in activation space (`PeftLinear`) and in weight space
//! (`burn::nn::Linear` + reparameterization); the eval forward without gradients. Each round
//! runs every variant for `--steps` steps after one warm-up step; the medians of the rounds are
//! printed, in milliseconds, and written as JSON with `--json`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::nn::Linear;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Int, Tensor};
use burn_peft_examples::bench::{BATCH, SEQ, Workload, adamw, median, targets};
use clap::Parser;
use peft_core::PeftLinear;
use peft_lora::{LoraAdapter, LoraConfig, LoraModel};
use peft_models::LinearLayer;
use peft_models::bert::Bert;

#[derive(Parser, Debug)]
#[command(about = "MiniLM training-step and forward benchmark (burn-peft side)")]
struct Args {
    /// Model folder (default: all-MiniLM-L6-v2 in the cache).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Rounds (the reported figure is the median over rounds of per-round medians).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Timed steps per variant and round.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Also time each op of a layer once (eval mode).
    #[arg(long)]
    breakdown: bool,
    /// Run only these variants (comma-separated: full, activation, weight, eval); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Variant<L: LinearLayer> {
    model: Bert<L>,
    optim: ModuleOptimizer,
}

impl<L: LinearLayer> Variant<L> {
    fn step(&mut self, ids: &Tensor<2, Int>, mask: &Tensor<2, Int>) -> f32 {
        let hidden = self.model.forward(ids.clone(), mask.clone());
        let loss = hidden.square().mean();
        let value = loss.clone().into_scalar::<f32>();
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optim.step(1e-4, self.model.clone(), grads);
        value
    }
}

fn lora() -> LoraConfig {
    LoraConfig::new(16, 32.0, targets())
}

fn time(steps: usize, mut f: impl FnMut() -> f32) -> f64 {
    f(); // warm-up
    let t: Vec<f64> = (0..steps)
        .map(|_| {
            let start = Instant::now();
            let v = f();
            assert!(v.is_finite());
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(t)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rounds > 0 && args.steps > 0,
        "--rounds and --steps must be positive"
    );
    let Workload {
        dir,
        config,
        device,
        ids,
        mask,
    } = Workload::load(args.model.clone())?;

    let mut full = Variant {
        model: Bert::<Linear>::from_dir_with(&dir, &config, &device)?,
        optim: adamw(),
    };
    let act = LoraModel::new(
        Bert::<PeftLinear<LoraAdapter>>::from_dir_with(&dir, &config, &device)?,
        lora(),
    )?;
    let weight = LoraModel::new(
        Bert::<Linear>::from_dir_with(&dir, &config, &device)?,
        lora(),
    )?;
    println!(
        "trainable: full {}, LoRA activation-space {}, LoRA weight-space {}",
        peft_core::hosts::parameters(&full.model)
            .iter()
            .map(|p| p.2)
            .sum::<usize>(),
        act.trainable_parameters().0,
        weight.trainable_parameters().0
    );
    let mut act = Variant {
        model: act.into_model(),
        optim: adamw(),
    };
    let mut weight = Variant {
        model: weight.into_model(),
        optim: adamw(),
    };
    let eval_model = Bert::<Linear>::from_dir_with(&dir, &config, &device)?.valid();
    let (eval_ids, eval_mask) = (ids.clone().inner(), mask.clone().inner());

    let (mut t_full, mut t_act, mut t_weight, mut t_eval) = (vec![], vec![], vec![], vec![]);
    let on = |v: &str| args.only.is_empty() || args.only.iter().any(|o| o == v);
    let timed =
        |v: &str, f: &mut dyn FnMut() -> f32| if on(v) { time(args.steps, f) } else { f64::NAN };
    for round in 0..args.rounds {
        t_full.push(timed("full", &mut || full.step(&ids, &mask)));
        t_act.push(timed("activation", &mut || act.step(&ids, &mask)));
        t_weight.push(timed("weight", &mut || weight.step(&ids, &mask)));
        t_eval.push(timed("eval", &mut || {
            eval_model
                .forward(eval_ids.clone(), eval_mask.clone())
                .slice([0..1, 0..1, 0..1])
                .into_scalar::<f32>()
        }));
        println!(
            "round {}: full {:.0} ms, LoRA activation {:.0} ms, LoRA weight {:.0} ms, eval forward {:.0} ms",
            round + 1,
            t_full[round],
            t_act[round],
            t_weight[round],
            t_eval[round]
        );
    }
    // Where the forward's time goes: one instance of each op of a layer, eval mode.
    if args.breakdown {
        let inf = device.clone().inner();
        let h = config.hidden_size;
        let x3 = Tensor::<3>::ones([BATCH, SEQ, h], &inf).mul_scalar(0.1);
        let w = Tensor::<2>::ones([h, config.intermediate_size], &inf).mul_scalar(0.01);
        let one = |t: Tensor<2>| t.slice([0..1, 0..1]).into_scalar::<f32>();
        let t_lin3 = time(args.steps, || {
            one(burn::tensor::module::linear(x3.clone(), w.clone(), None)
                .reshape([BATCH * SEQ, config.intermediate_size]))
        });
        let t_lin2 = time(args.steps, || {
            one(burn::tensor::module::linear(
                x3.clone().reshape([BATCH * SEQ, h]),
                w.clone(),
                None,
            ))
        });
        let heads = config.num_attention_heads;
        let q = Tensor::<4>::ones([BATCH, heads, SEQ, h / heads], &inf).mul_scalar(0.1);
        let m = Tensor::<2, Int>::ones([BATCH, SEQ], &inf)
            .equal_elem(0)
            .reshape([BATCH, 1, 1, SEQ])
            .expand([BATCH, heads, SEQ, SEQ]);
        let t_att = time(args.steps, || {
            let o = burn::tensor::module::attention(
                q.clone(),
                q.clone(),
                q.clone(),
                Some(m.clone()),
                None,
                Default::default(),
            );
            one(o.reshape([BATCH * heads * SEQ, h / heads]))
        });
        let key_mask = Tensor::<2, Int>::ones([BATCH, SEQ], &inf).equal_elem(0);
        let t_att_fused = time(args.steps, || {
            let o =
                peft_kernels::attention(q.clone(), q.clone(), q.clone(), Some(key_mask.clone()));
            one(o.reshape([BATCH * heads * SEQ, h / heads]))
        });
        let ln = peft_models::LayerNorm::new(h, 1e-12, &inf);
        let t_ln = time(args.steps, || {
            one(ln.forward(x3.clone()).reshape([BATCH * SEQ, h]))
        });
        let wide = Tensor::<2>::ones([BATCH * SEQ, config.intermediate_size], &inf).mul_scalar(0.3);
        let t_gelu = time(args.steps, || {
            one(burn::tensor::activation::gelu(wide.clone()))
        });
        let t_gelu_fused = time(args.steps, || one(peft_kernels::gelu(wide.clone())));
        // One FFN linear in training: frozen (dX only) against frozen + LoRA r=16 in
        // activation space (dX, dA, dB), forward + backward.
        let (d_in, d_out) = (h, config.intermediate_size);
        let x = Tensor::<2>::ones([BATCH * SEQ, d_in], &device).mul_scalar(0.1);
        let wf = Tensor::<2>::ones([d_in, d_out], &device).mul_scalar(0.01);
        let g = Tensor::<2>::ones([BATCH * SEQ, d_out], &device).mul_scalar(0.001);
        let a = Tensor::<2>::ones([d_in, 16], &device)
            .mul_scalar(0.01)
            .require_grad();
        let b = Tensor::<2>::ones([16, d_out], &device)
            .mul_scalar(0.01)
            .require_grad();
        let train = |lora: bool| {
            let xv = x.clone().require_grad();
            let mut y = burn::tensor::module::linear(xv.clone(), wf.clone(), None);
            if lora {
                let xa = burn::tensor::module::linear(xv.clone(), a.clone(), None) * 2.0;
                y = y + burn::tensor::module::linear(xa, b.clone(), None);
            }
            let grads = (y * g.clone()).sum().backward();
            xv.grad(&grads)
                .map_or(f32::NAN, |t| t.slice([0..1, 0..1]).into_scalar::<f32>())
        };
        let ln_train = peft_models::LayerNorm::new(h, 1e-12, &device);
        let t_ln_train = time(args.steps, || {
            let xv = x.clone().require_grad();
            let y = ln_train.forward(xv.clone());
            let grads = (y * x.clone()).sum().backward();
            xv.grad(&grads)
                .map_or(f32::NAN, |t| t.slice([0..1, 0..1]).into_scalar::<f32>())
        });
        println!("per op, training: layer norm forward + backward {t_ln_train:.1} ms");
        let t_frozen = time(args.steps, || train(false));
        let t_lora = time(args.steps, || train(true));
        println!(
            "per op, training: linear h->ffn forward + backward: frozen {t_frozen:.1} ms, with LoRA r=16 {t_lora:.1} ms"
        );
        println!(
            "per op, eval: linear 3-D {t_lin3:.1} ms, linear 2-D {t_lin2:.1} ms (h->ffn), attention: burn {t_att:.1} ms, fused {t_att_fused:.1} ms, layer norm {t_ln:.1} ms, gelu: burn {t_gelu:.1} ms, fused {t_gelu_fused:.1} ms"
        );
    }
    // Exact GELU forward + backward on one FFN activation, times the layers: burn's own op
    // against the fused one the model uses.
    let gelu_step = |fused: bool| {
        time(args.steps, || {
            let x = Tensor::<2>::ones([BATCH * SEQ, config.intermediate_size], &device)
                .mul_scalar(0.3)
                .require_grad();
            let y = if fused {
                peft_kernels::gelu(x.clone())
            } else {
                burn::tensor::activation::gelu(x.clone())
            };
            let g = y.sum().backward();
            x.grad(&g)
                .map_or(f32::NAN, |g| g.slice([0..1, 0..1]).into_scalar::<f32>())
        }) * config.num_hidden_layers as f64
    };
    let (gelu_ms, fused_gelu_ms) = (gelu_step(false), gelu_step(true));
    println!(
        "exact GELU forward + backward, all {} layers: burn's {gelu_ms:.0} ms, fused {fused_gelu_ms:.0} ms per step",
        config.num_hidden_layers
    );
    let result = serde_json::json!({
        "gelu_fwd_bwd_all_layers_ms": gelu_ms,
        "fused_gelu_fwd_bwd_all_layers_ms": fused_gelu_ms,
        "full_ft_ms": median(t_full),
        "lora_activation_ms": median(t_act),
        "lora_weight_ms": median(t_weight),
        "eval_forward_ms": median(t_eval),
    });
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(path) = args.json {
        std::fs::write(&path, result.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
