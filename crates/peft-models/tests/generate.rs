//! Generation with the LLaMA decoder: greedy ids equal Transformers' `generate` and PEFT's on the
//! tiny sharded bf16 model of `fixtures/make_llama_generation_fixtures.py` (base, a LoRA adapter
//! unmerged, merged and on weight-space layers, and two adapters combined with weights),
//! reproducible seeded sampling that respects top-k and top-p, typed errors, and a LoRA
//! fine-tuning run whose adapter moves generation towards the task.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

mod common;

use burn::nn::Linear;
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::parameters;
use peft_core::step::Stepper;
use peft_core::{ModuleSelector, PeftLinear, hf};
use peft_lora::{Combination, LoadOptions, LoraAdapter, LoraConfig, LoraModel, WeightedAdapters};
use peft_models::generate::{GenerationConfig, Sampler, StopReason, generate};
use peft_models::llama::Llama;
use peft_models::loss::{IGNORE_INDEX, causal_lm_loss};
use peft_models::{LinearLayer, ModelError};

type Fast = Llama<PeftLinear<LoraAdapter>>;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/llama/sharded_bf16")
        .join(path)
}

fn expected() -> BTreeMap<String, TensorData> {
    hf::read_tensors(&fixture("expected.safetensors")).unwrap()
}

fn ids(data: &TensorData) -> Vec<u32> {
    data.iter::<i64>().map(|i| i as u32).collect()
}

fn load<L: LinearLayer>(device: &Device) -> Llama<L> {
    Llama::<L>::from_pretrained(&fixture(""), device).unwrap().0
}

fn greedy<L: LinearLayer>(model: &Llama<L>, prompt: &[u32], config: &GenerationConfig) -> Vec<u32> {
    generate(model, prompt, config, |_| ControlFlow::Continue(()))
        .unwrap()
        .tokens
}

#[test]
fn greedy_ids_match_transformers() {
    let exp = expected();
    let prompt = ids(&exp["prompt"]);
    let want = ids(&exp["greedy"]);
    let config = GenerationConfig::new(want.len());
    let model = load::<Linear>(&Device::flex());
    let mut streamed = Vec::new();
    let out = generate(&model, &prompt, &config, |t| {
        streamed.push(t);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(out.tokens, want, "greedy ids");
    assert_eq!(streamed, want, "every token is streamed as it is chosen");
    assert_eq!(out.stop, StopReason::MaxNewTokens);
    assert_eq!(out.prompt_tokens, prompt.len());

    // With the eos of the fixture, generation stops right after its first occurrence.
    let eos_ids = ids(&exp["greedy_eos"]);
    let eos = *eos_ids.last().unwrap();
    let out = generate(&model, &prompt, &config.clone().with_eos(eos), |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!((out.tokens, out.stop), (eos_ids.clone(), StopReason::Eos));
    // A stop token does the same; the callback can stop too.
    let out = generate(
        &model,
        &prompt,
        &config.clone().with_stop_tokens([eos]),
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(out.stop, StopReason::StopToken(eos));
    let out = generate(&model, &prompt, &config, |_| ControlFlow::Break(())).unwrap();
    assert_eq!((out.tokens.len(), out.stop), (1, StopReason::Callback));
}

#[test]
fn greedy_ids_with_a_lora_adapter_match_peft() {
    let exp = expected();
    let prompt = ids(&exp["prompt"]);
    let want = ids(&exp["greedy_lora"]);
    assert_ne!(want, ids(&exp["greedy"]), "the adapter changes generation");
    let config = GenerationConfig::new(want.len());
    let device = Device::flex();
    let options = LoadOptions::default();

    let lora = LoraModel::from_pretrained(
        load::<PeftLinear<LoraAdapter>>(&device),
        &fixture("lora"),
        &options,
    )
    .unwrap();
    assert_eq!(greedy(lora.model(), &prompt, &config), want, "unmerged");
    let merged = lora.merge_and_unload(true).unwrap();
    assert_eq!(greedy(&merged, &prompt, &config), want, "merged");

    let weight_space =
        LoraModel::from_pretrained(load::<Linear>(&device), &fixture("lora"), &options).unwrap();
    assert_eq!(
        greedy(weight_space.model(), &prompt, &config),
        want,
        "weight space"
    );
}

#[test]
fn greedy_ids_with_weighted_adapters_match_peft() {
    let exp = expected();
    let prompt = ids(&exp["prompt"]);
    let want = ids(&exp["greedy_mix"]);
    let options = LoadOptions::default();
    let mut peft = LoraModel::empty(load::<PeftLinear<LoraAdapter>>(&Device::flex()));
    peft.load_adapter(&fixture("lora"), "lora", &options)
        .unwrap();
    peft.load_adapter(&fixture("lora_b"), "lora_b", &options)
        .unwrap();
    peft.add_weighted_adapter(&["lora", "lora_b"], &[0.7, 0.5], "mix", Combination::Cat)
        .unwrap();
    peft.set_adapter(&["mix"]).unwrap();
    let config = GenerationConfig::new(want.len());
    assert_eq!(greedy(peft.model(), &prompt, &config), want);
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let exp = expected();
    let prompt = ids(&exp["prompt"]);
    let model: Fast = load(&Device::flex());
    let sample = GenerationConfig::new(12)
        .with_temperature(1.5)
        .with_top_p(0.95)
        .with_seed(42);
    let a = greedy(&model, &prompt, &sample);
    let b = greedy(&model, &prompt, &sample);
    assert_eq!(a, b, "same seed, same tokens");
    let c = greedy(&model, &prompt, &sample.clone().with_seed(43));
    assert_ne!(a, c, "another seed draws other tokens");
    assert_ne!(
        a,
        ids(&exp["greedy"])[..12],
        "sampling at temperature 1.5 departs from greedy"
    );
    let top1 = GenerationConfig::new(12)
        .with_temperature(3.0)
        .with_top_k(1)
        .with_seed(1);
    assert!(top1.is_sampling());
    assert_eq!(greedy(&model, &prompt, &top1), ids(&exp["greedy"])[..12]);
    let zero = GenerationConfig::new(12)
        .with_temperature(0.0)
        .with_top_k(50);
    assert!(!zero.is_sampling(), "temperature 0 is greedy");
}

#[test]
fn top_k_and_top_p_bound_the_draws() {
    // Probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs), shuffled.
    let probs = [0.15f32, 0.5, 0.05, 0.3];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let draws = |config: GenerationConfig| {
        let mut sampler = Sampler::new(&config).unwrap();
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sampler.pick(&logits) as usize] += 1;
        }
        counts
    };
    // top_p 0.7: the nucleus is {0.5, 0.3} (0.5 < 0.7 <= 0.8).
    let counts = draws(GenerationConfig::new(1).with_top_p(0.7).with_seed(3));
    assert_eq!((counts[0], counts[2]), (0, 0), "{counts:?}");
    let share = counts[1] as f64 / 4000.0;
    assert!(
        (share - 0.625).abs() < 0.03,
        "renormalised 0.5 / 0.8: {share}"
    );
    // top_k 3 never draws the least likely token; plain sampling follows the probabilities.
    let counts = draws(GenerationConfig::new(1).with_top_k(3).with_seed(4));
    assert_eq!(counts[2], 0, "{counts:?}");
    assert!(counts.iter().filter(|&&c| c > 0).count() == 3, "{counts:?}");
    let counts = draws(GenerationConfig::new(1).with_temperature(1.0).with_seed(5));
    for (c, p) in counts.iter().zip(probs) {
        assert!(
            (*c as f64 / 4000.0 - f64::from(p)).abs() < 0.03,
            "{counts:?}"
        );
    }
    // Temperature 0.2 sharpens: p^5 renormalised gives the top token 0.924.
    let counts = draws(GenerationConfig::new(1).with_temperature(0.2).with_seed(6));
    let sharp: f64 = probs.iter().map(|p| f64::from(*p).powi(5)).sum();
    let share = counts[1] as f64 / 4000.0;
    assert!((share - 0.5f64.powi(5) / sharp).abs() < 0.03, "{counts:?}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let model: Fast = load(&Device::flex());
    let run = |prompt: &[u32], config: &GenerationConfig| {
        generate(&model, prompt, config, |_| ControlFlow::Continue(()))
    };
    let config = GenerationConfig::new(4).with_max_context(6);
    match run(&[5; 7], &config) {
        Err(ModelError::PromptTooLong {
            prompt_len: 7,
            context: 6,
        }) => {}
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    // The model's own context (128 positions) is the default limit.
    assert!(matches!(
        run(&[5; 129], &GenerationConfig::new(1)),
        Err(ModelError::PromptTooLong { context: 128, .. })
    ));
    match run(&[5, 128, 6], &config) {
        Err(ModelError::TokenOutOfVocab {
            id: 128,
            vocab_size: 128,
        }) => {}
        other => panic!("expected TokenOutOfVocab, got {other:?}"),
    }
    assert!(matches!(
        run(&[], &config),
        Err(ModelError::InvalidInput { .. })
    ));
    for bad in [
        GenerationConfig::new(2).with_top_p(0.0),
        GenerationConfig::new(2).with_top_p(1.5),
        GenerationConfig::new(2).with_top_k(0),
        GenerationConfig::new(2).with_temperature(-1.0),
    ] {
        assert!(
            matches!(run(&[5], &bad), Err(ModelError::InvalidInput { .. })),
            "{bad:?}"
        );
    }
    // A prompt that leaves room for 2 tokens of the 4 asked for stops at the context.
    let out = run(&[5, 6, 7, 8], &config).unwrap();
    assert_eq!((out.tokens.len(), out.stop), (2, StopReason::ContextFull));
    // The cached forward checks ids and the cache's room itself.
    let device = Device::flex();
    let mut cache = model.new_cache(1, 3);
    let ids = |v: Vec<i64>| {
        Tensor::<2, Int>::from_data(TensorData::new(v.clone(), [1, v.len()]), &device)
    };
    assert!(matches!(
        model.forward_cached(ids(vec![1, -1]), &mut cache),
        Err(ModelError::TokenOutOfVocab { id: -1, .. })
    ));
    assert!(matches!(
        model.forward_cached(ids(vec![1, 2, 3, 4]), &mut cache),
        Err(ModelError::CacheFull {
            needed: 4,
            capacity: 3
        })
    ));
    assert!(
        cache.is_empty(),
        "a refused step leaves the cache unchanged"
    );
}

/// LoRA (r 4, alpha 8) on every projection of the tiny model learns to continue a prompt with a
/// fixed sequence: the loss on the continuation falls, the base weights stay bit-identical, and
/// greedy generation after training follows the taught sequence.
#[test]
fn lora_fine_tuning_teaches_a_continuation() {
    let device = Device::flex().autodiff();
    let prompt = [3u32, 4];
    let target = [10u32, 11, 12, 13, 14, 15];
    let sequence: Vec<i64> = prompt.iter().chain(&target).map(|&t| t.into()).collect();
    let n = sequence.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(sequence.clone(), [1, n]), &device);
    let mut labels = sequence.clone();
    labels[..prompt.len()].fill(IGNORE_INDEX);
    let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [1, n]), &device);

    let config = LoraConfig::new(
        4,
        8.0,
        ModuleSelector::names([
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]),
    );
    let mut model = LoraModel::new(load::<PeftLinear<LoraAdapter>>(&device), config)
        .unwrap()
        .into_model();
    let before = parameters(&model);
    let matched = |model: &Fast| {
        let out = greedy(model, &prompt, &GenerationConfig::new(target.len()));
        out.iter().zip(&target).filter(|(a, b)| a == b).count()
    };
    let matched_before = matched(&model);

    let mut optim = AdamWConfig::new().init();
    let mut stepper = Stepper::new();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let loss = causal_lm_loss(model.forward(input.clone(), None), labels.clone()).unwrap();
        losses.push(loss.clone().into_scalar::<f32>());
        model = stepper.step(model, &mut optim, 1e-2, loss).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    println!("loss {first:.3} -> {last:.3}");
    assert!(last < 0.25 * first, "the loss falls clearly: {losses:?}");

    let after = parameters(&model);
    let mut adapted = 0;
    for (path, old) in &before {
        let new = &after[path];
        if path.contains("lora") {
            adapted += usize::from(new != old);
        } else {
            assert_eq!(
                new.as_bytes(),
                old.as_bytes(),
                "base parameter {path} changed"
            );
        }
    }
    assert!(adapted > 0, "adapter parameters were trained");

    let matched_after = matched(&model);
    println!(
        "target tokens matched: {matched_before} -> {matched_after} of {}",
        target.len()
    );
    assert!(matched_after >= target.len() - 1 && matched_after > matched_before);
}
