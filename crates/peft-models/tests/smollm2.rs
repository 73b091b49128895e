//! SmolLM2-135M-Instruct end to end against transformers + PEFT 0.21.2 (fixtures written by
//! `fixtures/make_smollm2_fixtures.py`): a LoRA adapter that Python PEFT saved for the
//! transformers model loaded from the same GGUF file gives the same logits here, unmerged and
//! merged; the chat template renders the same prompt ids; greedy chat generation of 24 tokens
//! gives transformers' tokens, without and with the adapter; and a few LoRA steps on the real
//! model teach it an answer while its base weights stay bit-identical.
//!
//! The model is `peft_models::smollm2_path()`, fetched by `python3 scripts/fetch_smollm2.py`: a
//! missing model fails these tests (CI fetches it first).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

mod common;

use burn::optim::AdamWConfig;
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::parameters;
use peft_core::step::Stepper;
use peft_core::{ModuleSelector, PeftLinear, hf};
use peft_lora::{LoadOptions, LoraAdapter, LoraConfig, LoraModel};
use peft_models::BaseFormat;
use peft_models::chat::ChatMessage;
use peft_models::generate::{GenerationConfig, StopReason, generate};
use peft_models::gguf::{GgufFile, load_llama, load_llama_as};
use peft_models::llama::Llama;
use peft_models::loss::{IGNORE_INDEX, causal_lm_loss};
use peft_models::tokenizer::ModelTokenizer;
use serde::Deserialize;

/// Logits tolerance against transformers' float32 model (the bound).
const TOL: f32 = 2e-3;

type Fast = Llama<PeftLinear<LoraAdapter>>;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/smollm2")
        .join(path)
}

fn model_path() -> PathBuf {
    peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"))
}

fn base() -> Fast {
    load_llama::<PeftLinear<LoraAdapter>>(model_path(), &Device::flex())
        .unwrap()
        .0
}

fn with_adapter() -> LoraModel<Fast> {
    LoraModel::from_pretrained(base(), &fixture("lora_qv"), &LoadOptions::default()).unwrap()
}

fn tokenizer() -> ModelTokenizer {
    let file = GgufFile::open(model_path()).unwrap();
    ModelTokenizer::from_gguf_metadata(file.metadata(), "SmolLM2").unwrap()
}

struct Expected(BTreeMap<String, TensorData>);

impl Expected {
    fn load() -> Self {
        Self(hf::read_tensors(&fixture("expected.safetensors")).unwrap())
    }
    fn ints<const D: usize>(&self, key: &str) -> Tensor<D, Int> {
        Tensor::from_data(self.0[key].clone(), &Device::flex())
    }
    fn vec_i64(&self, key: &str) -> Vec<i64> {
        self.0[key].clone().convert::<i64>().try_to_vec().unwrap()
    }
    fn vec_f32(&self, key: &str) -> Vec<f32> {
        self.0[key].try_to_vec().unwrap()
    }
}

/// Compare `logits` `[2, S, vocab]` with PEFT's at the fixture's vocabulary columns, at every
/// non-padding position, and the argmax over the whole vocabulary.
fn check_logits(label: &str, logits: Tensor<3>, exp: &Expected) {
    let [batch, seq, vocab] = logits.dims();
    let mask = exp.vec_i64("attention_mask");
    let columns = exp.vec_i64("columns");
    let theirs = exp.vec_f32("adapter_logits_subset");
    let argmax = exp.vec_i64("adapter_argmax");
    let ours_argmax = logits
        .clone()
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let ours = logits.into_data().try_to_vec::<f32>().unwrap();
    let mut worst = 0.0f32;
    let mut checked = 0;
    for row in 0..batch * seq {
        if mask[row] == 0 {
            continue;
        }
        for (j, &c) in columns.iter().enumerate() {
            let d = (ours[row * vocab + c as usize] - theirs[row * columns.len() + j]).abs();
            worst = worst.max(d);
        }
        assert_eq!(
            ours_argmax[row], argmax[row],
            "{label}: argmax differs at row {row}"
        );
        checked += 1;
    }
    println!("{label}: max |diff| {worst:.2e} over {checked} positions");
    assert!(checked >= 12, "{label}: too few positions compared");
    assert!(worst <= TOL, "{label}: logits differ by {worst} (> {TOL})");
}

#[test]
fn python_peft_adapter_gives_peft_logits_unmerged_and_merged() {
    let exp = Expected::load();
    let ids = exp.ints::<2>("input_ids");
    let mask = exp.ints::<2>("attention_mask");
    let peft = with_adapter();
    check_logits(
        "unmerged",
        peft.model().forward(ids.clone(), Some(mask.clone())),
        &exp,
    );
    let merged = peft.merge_and_unload(true).unwrap();
    check_logits("merged", merged.forward(ids, Some(mask)), &exp);
}

#[derive(Deserialize)]
struct Chat {
    messages: Vec<Message>,
    prompt_ids: Vec<u32>,
    base_ids: Vec<u32>,
    base_text: String,
    adapter_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Generations {
    max_new_tokens: usize,
    eos_token_id: u32,
    chats: Vec<Chat>,
}

fn generations() -> Generations {
    serde_json::from_str(&std::fs::read_to_string(fixture("generation.json")).unwrap()).unwrap()
}

/// Greedy generation as transformers' `generate(do_sample=False)`: stops at the end-of-sequence
/// id, which is part of the returned tokens.
fn greedy(model: &Fast, prompt: &[u32], max_new: usize, eos: u32) -> Vec<u32> {
    greedy_with(model, prompt, GenerationConfig::new(max_new).with_eos(eos))
}

fn greedy_with(model: &Fast, prompt: &[u32], config: GenerationConfig) -> Vec<u32> {
    let mut streamed = Vec::new();
    let out = generate(model, prompt, &config, |t| {
        streamed.push(t);
        ControlFlow::Continue(())
    })
    .unwrap();
    // The callback sees every token but the final stop token.
    let shown = match out.stop {
        StopReason::Eos => &out.tokens[..out.tokens.len() - 1],
        _ => &out.tokens[..],
    };
    assert_eq!(streamed, shown, "the callback saw every token");
    out.tokens
}

#[test]
fn chat_template_and_greedy_generation_match_transformers() {
    let gens = generations();
    let tok = tokenizer();
    let template = tok.chat_template().unwrap();
    let model = base();
    for (i, chat) in gens.chats.iter().enumerate() {
        let messages: Vec<ChatMessage> = chat
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let text = template.render(&messages, true).unwrap();
        let ids = tok.encode(&text, false).unwrap();
        assert_eq!(ids, chat.prompt_ids, "chat {i}: prompt ids");
        let out = greedy(&model, &ids, gens.max_new_tokens, gens.eos_token_id);
        assert_eq!(out, chat.base_ids, "chat {i}: generated ids");
        assert_eq!(
            tok.decode(&out, true).unwrap(),
            chat.base_text,
            "chat {i}: text"
        );
    }
}

#[test]
fn greedy_generation_with_the_adapter_matches_peft_unmerged_and_merged() {
    let gens = generations();
    let peft = with_adapter();
    // The adapter must change at least one answer, or this test would not see it.
    assert!(gens.chats.iter().any(|c| c.adapter_ids != c.base_ids));
    for (i, chat) in gens.chats.iter().enumerate() {
        let out = greedy(
            peft.model(),
            &chat.prompt_ids,
            gens.max_new_tokens,
            gens.eos_token_id,
        );
        assert_eq!(out, chat.adapter_ids, "chat {i}: unmerged");
    }
    let merged = peft.merge_and_unload(true).unwrap();
    for (i, chat) in gens.chats.iter().enumerate() {
        let out = greedy(
            &merged,
            &chat.prompt_ids,
            gens.max_new_tokens,
            gens.eos_token_id,
        );
        assert_eq!(out, chat.adapter_ids, "chat {i}: merged");
    }
}

/// QLoRA over the GGUF file's own blocks: every linear layer and the token table stay packed
/// (`Q4_1`, `Q8_0`), read in place; with Python PEFT's adapter the logits equal PEFT's on the
/// dequantized float32 model within the same bound, and greedy generation gives its tokens, with
/// decoding steps on 8-bit activations (llama.cpp's arithmetic, the default) or f32 ones.
#[test]
fn lora_over_the_packed_gguf_blocks_gives_peft_logits_and_generations() {
    let device = Device::flex();
    let (model, _) =
        load_llama_as::<PeftLinear<LoraAdapter>>(model_path(), BaseFormat::Gguf, &device).unwrap();
    let table = model
        .model
        .packed_embed
        .as_ref()
        .expect("the token table is packed");
    assert_eq!(table.format().name(), "Q8_0");
    assert_eq!(model.model.embed_tokens.weight.dims()[0], 0, "no f32 table");
    for layer in &model.model.layers {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        for l in [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ] {
            let p = l.packed.as_ref().expect("every linear layer is packed");
            assert_eq!(p.format().name(), "Q4_1");
            assert_eq!(l.weight.dims(), [0, 0], "no f32 weight");
        }
    }
    let peft =
        LoraModel::from_pretrained(model, &fixture("lora_qv"), &LoadOptions::default()).unwrap();
    let exp = Expected::load();
    let ids = exp.ints::<2>("input_ids");
    let mask = exp.ints::<2>("attention_mask");
    check_logits(
        "packed gguf, unmerged",
        peft.model().forward(ids, Some(mask)),
        &exp,
    );
    // Decoding steps with llama.cpp's 8-bit activations (the default) and with f32 ones.
    let gens = generations();
    for (i, chat) in gens.chats.iter().enumerate() {
        let config = GenerationConfig::new(gens.max_new_tokens).with_eos(gens.eos_token_id);
        assert!(config.q8_activations);
        let out = greedy_with(peft.model(), &chat.prompt_ids, config.clone());
        assert_eq!(
            out, chat.adapter_ids,
            "chat {i}: packed base, 8-bit activations"
        );
        let out = greedy_with(
            peft.model(),
            &chat.prompt_ids,
            config.with_f32_activations(),
        );
        assert_eq!(
            out, chat.adapter_ids,
            "chat {i}: packed base, f32 activations"
        );
    }
}

/// LoRA (r 8, alpha 16) on `q_proj`/`v_proj` of SmolLM2, trained on one chat whose answer the
/// model would not give: the loss on the answer tokens (prompt masked with the ignore index)
/// falls, only adapter parameters change, and greedy chat generation then gives the answer.
#[test]
fn lora_steps_on_smollm2_teach_an_answer_and_leave_the_base_unchanged() {
    let device = Device::flex().autodiff();
    let tok = tokenizer();
    let template = tok.chat_template().unwrap();
    let question = [ChatMessage::user("What is the secret word?")];
    let prompt = tok
        .encode(&template.render(&question, true).unwrap(), false)
        .unwrap();
    let answer = tok.encode("The secret word is pineapple.", false).unwrap();
    let eos = tok.eos_token_id().unwrap();
    let mut target = answer.clone();
    target.push(eos);
    let sequence: Vec<i64> = prompt.iter().chain(&target).map(|&t| t.into()).collect();
    let n = sequence.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(sequence.clone(), [1, n]), &device);
    let mut labels = sequence;
    labels[..prompt.len()].fill(IGNORE_INDEX);
    let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [1, n]), &device);

    let base = load_llama::<PeftLinear<LoraAdapter>>(model_path(), &device)
        .unwrap()
        .0;
    let config = LoraConfig::new(8, 16.0, ModuleSelector::names(["q_proj", "v_proj"]));
    let mut model = LoraModel::new(base, config).unwrap().into_model();
    let before = parameters(&model);
    let answer_before = greedy(&model, &prompt, target.len(), eos);
    assert_ne!(answer_before, target, "the model knew the answer already");

    let mut optim = AdamWConfig::new().init();
    let mut stepper = Stepper::new();
    let mut losses = Vec::new();
    for _ in 0..8 {
        let loss = causal_lm_loss(model.forward(input.clone(), None), labels.clone()).unwrap();
        losses.push(loss.clone().into_scalar::<f32>());
        model = stepper.step(model, &mut optim, 3e-3, loss).unwrap();
    }
    println!("loss per step: {losses:?}");
    assert!(
        *losses.last().unwrap() < 0.2 * losses[0],
        "the loss falls clearly: {losses:?}"
    );

    let after = parameters(&model);
    let mut adapted = 0;
    for (path, old) in &before {
        let new = &after[path];
        if path.contains(".peft.") {
            adapted += usize::from(new != old);
        } else {
            assert!(
                new.as_bytes() == old.as_bytes(),
                "base parameter {path} changed"
            );
        }
    }
    assert_eq!(
        adapted,
        2 * 2 * 30,
        "every A and B of 30 layers' q_proj and v_proj trained"
    );
    assert_eq!(greedy(&model, &prompt, target.len(), eos), target);
}
