//! Every method's training steps on wgpu equal the same steps on flex (the CPU backend), within
//! f32 tolerance: a software adapter such as Mesa's lavapipe is enough, and the same build runs
//! on any GPU whose driver ships Vulkan.
//!
//! A PEFT method case starts from one adapter: created on flex (its random initial values come
//! from flex's generator), saved, and loaded onto the wgpu copy of the base model, so that the
//! load path is part of the test. Both copies then train through their own steppers (the
//! method's controllers included: AdaLoRA's allocator, RoSA's mask generation and restart, SFT's
//! reselections); after every step the structures (rank pattern, masks, indices) must be equal
//! and the adapter parameters close. At the end the wgpu adapter is saved and loaded again, and
//! merged: its outputs must equal flex's. The selective methods (ID3, PaFI, BitFit) train the
//! base model's own entries, built from the same weights on both devices.
#![cfg(feature = "wgpu")]

use std::collections::BTreeMap;

use burn::module::Module;
use burn::optim::SgdConfig;
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use peft_adalora::{AdaLoraAdapter, AdaLoraConfig};
use peft_conformance::{Emb, Proj, TinyModel, random_torch_weights, token_ids};
use peft_core::model::adapters_of;
use peft_core::{
    Adapter, LoadOptions, Method, ModuleSelector, PeftEmbedding, PeftLinear, PeftModel,
    SaveOptions, hosts,
};
use peft_lora::{LoraAdapter, LoraConfig};
use peft_rosa::{RosaAdapter, RosaConfig};
use peft_selective::{SelectiveConfig, SelectiveModel};
use peft_sft::{SelectionAlgorithm, SftAdapter, SftConfig};

type Activation<A> = TinyModel<PeftLinear<A>, PeftEmbedding<A>>;
type Plain = TinyModel<burn::nn::Linear, burn::nn::Embedding>;

/// The relative tolerance of every comparison: the GPU sums in another order, and a few steps
/// compound the differences.
const TOL: f32 = 1e-4;

fn flex() -> Device {
    Device::flex().autodiff()
}

fn wgpu() -> Device {
    Device::wgpu(DeviceKind::DefaultDevice).autodiff()
}

fn base<P: Proj, E: Emb>(device: &Device) -> TinyModel<P, E> {
    TinyModel::from_torch(&random_torch_weights(3, device), device)
}

fn loss<P: Proj, E: Emb>(m: &TinyModel<P, E>, device: &Device) -> Tensor<1> {
    (m.forward(token_ids(device)) - 0.5)
        .powi_scalar(2)
        .mean()
        .reshape([1])
}

fn output<P: Proj, E: Emb>(m: &TinyModel<P, E>, device: &Device) -> TensorData {
    m.forward(token_ids(device)).into_data()
}

/// `|a - b| ≤ TOL · (1 + |b|)` everywhere.
fn close(what: &str, a: &TensorData, b: &TensorData) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    let (a, b) = (
        a.try_to_vec_as::<f32>().unwrap(),
        b.try_to_vec_as::<f32>().unwrap(),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst <= TOL, "{what}: relative difference {worst}");
}

/// The same parameter names, each close.
fn close_params(what: &str, a: &BTreeMap<String, TensorData>, b: &BTreeMap<String, TensorData>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: parameter names"
    );
    assert!(!a.is_empty(), "{what}: no parameters compared");
    for (k, x) in a {
        close(&format!("{what}: {k}"), x, &b[k]);
    }
}

fn adapter_params<M: Module>(m: &M) -> BTreeMap<String, TensorData> {
    hosts::read_params(m, |k| k.contains(".peft."))
}

/// `steps` steps of `config` on flex and on wgpu from the same adapter; `structure` is what the
/// method's controllers decide (must be equal on both devices after every step), `controlled`
/// says whether it must have changed by the end.
fn method_case<A, C, S>(
    label: &str,
    config: C,
    steps: usize,
    structure: impl Fn(&PeftModel<Activation<A>, C>) -> S,
    controlled: bool,
) where
    A: Adapter,
    C: Method<Adapter = A>,
    S: PartialEq + std::fmt::Debug,
{
    let (cpu_dev, gpu_dev) = (flex(), wgpu());
    let mut cpu: PeftModel<Activation<A>, C> = PeftModel::new(base(&cpu_dev), config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    cpu.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let trainable = LoadOptions {
        is_trainable: true,
        ..Default::default()
    };
    let mut gpu: PeftModel<Activation<A>, C> =
        PeftModel::from_pretrained(base(&gpu_dev), dir.path(), &trainable).unwrap();
    assert_eq!(
        adapter_params(cpu.model()),
        adapter_params(gpu.model()),
        "{label}: the loaded adapter is the saved one"
    );
    close(
        &format!("{label}: output before training"),
        &output(gpu.model(), &gpu_dev),
        &output(cpu.model(), &cpu_dev),
    );
    let start = structure(&cpu);

    let mut cpu_stepper = cpu.stepper(steps).unwrap();
    let mut gpu_stepper = gpu.stepper(steps).unwrap();
    let mut optim_cpu = SgdConfig::new().init();
    let mut optim_gpu = SgdConfig::new().init();
    for step in 1..=steps {
        let l = loss(cpu.model(), &cpu_dev);
        cpu_stepper
            .train(&mut cpu, &mut optim_cpu, 1e-2, l)
            .unwrap();
        let l = loss(gpu.model(), &gpu_dev);
        gpu_stepper
            .train(&mut gpu, &mut optim_gpu, 1e-2, l)
            .unwrap();
        assert_eq!(
            structure(&gpu),
            structure(&cpu),
            "{label}: structure after step {step}"
        );
        close_params(
            &format!("{label}: step {step}"),
            &adapter_params(gpu.model()),
            &adapter_params(cpu.model()),
        );
    }
    if controlled {
        assert_ne!(structure(&cpu), start, "{label}: the controller acted");
    }
    let trained = output(gpu.model(), &gpu_dev);
    close(
        &format!("{label}: output after training"),
        &trained,
        &output(cpu.model(), &cpu_dev),
    );

    // Save on wgpu, load onto a fresh wgpu base: the same outputs.
    let dir = tempfile::tempdir().unwrap();
    gpu.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let reloaded: PeftModel<Activation<A>, C> =
        PeftModel::from_pretrained(base(&gpu_dev), dir.path(), &LoadOptions::default()).unwrap();
    close(
        &format!("{label}: reloaded on wgpu"),
        &output(reloaded.model(), &gpu_dev),
        &trained,
    );

    // Merged on both devices: equal, and equal to the unmerged output.
    cpu.merge_adapter(None, true).unwrap();
    gpu.merge_adapter(None, true).unwrap();
    let merged = output(gpu.model(), &gpu_dev);
    close(&format!("{label}: merged vs unmerged"), &merged, &trained);
    close(
        &format!("{label}: merged on wgpu vs flex"),
        &merged,
        &output(cpu.model(), &cpu_dev),
    );
}

fn targets() -> ModuleSelector {
    ModuleSelector::names(["q_proj", "v_proj", "down_proj"])
}

#[test]
fn lora_and_dora_steps_on_wgpu_equal_flex() {
    let no_structure = |_: &PeftModel<Activation<LoraAdapter>, LoraConfig>| ();
    let with_embedding = ModuleSelector::names(["q_proj", "v_proj", "down_proj", "embed_tokens"]);
    method_case(
        "lora",
        LoraConfig::new(4, 8.0, with_embedding),
        3,
        no_structure,
        false,
    );
    let dora = LoraConfig::new(4, 8.0, targets()).with_dora(true);
    method_case("dora", dora, 3, no_structure, false);
}

#[test]
fn adalora_allocator_on_wgpu_equals_flex() {
    // Masking from step 2, every step until 7 of 10: the pattern shrinks to the budget.
    let config = AdaLoraConfig::new(targets(), 10)
        .with_ranks(4, 2)
        .with_schedule(2, 3, 1);
    let pattern = |p: &PeftModel<Activation<AdaLoraAdapter>, AdaLoraConfig>| {
        p.adapters()["default"].config.rank_pattern.clone()
    };
    method_case("adalora", config, 10, pattern, true);
}

/// RoSA's masks (CSR structure of every adapted layer).
fn rosa_masks(p: &PeftModel<Activation<RosaAdapter>, RosaConfig>) -> Vec<Option<Vec<u64>>> {
    adapters_of::<_, RosaAdapter>(p.model(), "default")
        .into_iter()
        .map(|(_, _, a)| a.spa_csr().map(|c| c.layout.structure().flat_indices()))
        .collect()
}

#[test]
fn rosa_mask_generation_and_restart_on_wgpu_equal_flex() {
    // wl2: two LoRA steps, one collection step, masks and the restart, then both parts train.
    let config = RosaConfig::new(4, 0.1, 8.0, targets()).with_schedule("wl2");
    method_case("rosa", config, 5, rosa_masks, true);
}

fn sft_indices(p: &PeftModel<Activation<SftAdapter>, SftConfig>) -> Vec<Vec<u64>> {
    adapters_of::<_, SftAdapter>(p.model(), "default")
        .into_iter()
        .map(|(_, _, a)| a.indices())
        .collect()
}

#[test]
fn sft_reselections_on_wgpu_equal_flex() {
    // R = 4, S = 2: reselections after update steps 2 and 6.
    let rigl = SftConfig::new(0.1, targets()).with_steps(4, 2);
    method_case("sft rigl", rigl, 7, sft_indices, true);
    let sm3 = SftConfig::new(0.1, targets())
        .with_steps(4, 2)
        .with_selection(SelectionAlgorithm::Sm3);
    method_case("sft sm3", sm3, 7, sft_indices, true);
}

/// `steps` steps of a selective method on both devices from the same weights: the same entries
/// chosen and trained to close values.
fn selective_case(label: &str, config: SelectiveConfig, steps: usize) {
    let run = |device: &Device| {
        let model: Plain = base(device);
        let model = hosts::set_trainable(model, |_| Some(true));
        let start = hosts::read_params(&model, |_| true);
        let mut t = SelectiveModel::new(model, config.clone());
        let mut stepper = t.stepper(steps).unwrap();
        let mut optim = SgdConfig::new().init();
        for _ in 0..steps {
            let l = loss(t.model(), device);
            stepper.train(&mut t, &mut optim, 1e-2, l).unwrap();
        }
        (
            start,
            hosts::read_params(t.model(), |_| true),
            output(t.model(), device),
        )
    };
    let (cpu_start, cpu, cpu_out) = run(&flex());
    let (gpu_start, gpu, gpu_out) = run(&wgpu());
    assert_eq!(cpu_start, gpu_start, "{label}: the same start");
    let moved = |start: &BTreeMap<String, TensorData>, now: &BTreeMap<String, TensorData>| {
        let mut entries = Vec::new();
        for (k, x) in start {
            for (i, (a, b)) in x.iter::<f32>().zip(now[k].iter::<f32>()).enumerate() {
                if a != b {
                    entries.push((k.clone(), i));
                }
            }
        }
        entries
    };
    let chosen = moved(&cpu_start, &cpu);
    assert!(!chosen.is_empty(), "{label}: something trained");
    assert_eq!(moved(&gpu_start, &gpu), chosen, "{label}: the same entries");
    close_params(label, &gpu, &cpu);
    close(&format!("{label}: output"), &gpu_out, &cpu_out);
}

#[test]
fn id3_pafi_and_bitfit_steps_on_wgpu_equal_flex() {
    selective_case("id3", SelectiveConfig::id3(12, 3), 4);
    selective_case("pafi", SelectiveConfig::pafi(20), 3);
    selective_case("bitfit", SelectiveConfig::bitfit(), 3);
}
