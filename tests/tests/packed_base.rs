//! Every adapter method on a packed (NF4, double-quantized) frozen base: the packed model equals
//! its dequantized twin; identity at init; merging into the packed base (dequantize, merge,
//! quantize again) stays within NF4's own error while merging into the unpacked base is exact;
//! save/load; training moves only the adapters and leaves the packed base as it was.

use burn::module::Module;
use burn::optim::SgdConfig;
use burn::tensor::{Device, Tensor};
use peft_adalora::AdaLoraConfig;
use peft_conformance::{TinyModel, max_diff, random_torch_weights, token_ids};
use peft_core::{Method, ModuleSelector, PeftEmbedding, PeftLinear, PeftModel, hosts};
use peft_kernels::quant::PackedFormat;
use peft_lora::{InitLoraWeights, LoadOptions, LoraConfig, SaveOptions};
use peft_rosa::{InitRosaWeights, InitialMasks, MaskedAdapters, RosaConfig};
use peft_sft::{InitDeltas, SftConfig};

type Activation<A> = TinyModel<PeftLinear<A>, PeftEmbedding<A>>;

const NF4_DQ: PackedFormat = PackedFormat::Nf4 { double: true };

fn device() -> Device {
    Device::flex().autodiff()
}

fn rel_diff(a: &Tensor<3>, b: &Tensor<3>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1.0);
    max_diff(a, b) / scale
}

/// The tiny model with every linear layer's base packed.
fn packed_model<A: peft_core::Adapter>(seed: u64, dev: &Device) -> Activation<A> {
    let mut model: Activation<A> = TinyModel::from_torch(&random_torch_weights(seed, dev), dev);
    let packed = hosts::pack_linears::<_, A>(&mut model, NF4_DQ, |_| true).unwrap();
    assert_eq!(packed.len(), 13, "every linear layer packed: {packed:?}");
    model
}

fn run<A: peft_core::Adapter>(model: &Activation<A>, dev: &Device) -> Tensor<3> {
    model.forward(token_ids(dev))
}

/// The packed bases, dequantized, in traversal order.
fn packed_values<A: peft_core::Adapter>(model: &Activation<A>) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut layers = vec![&model.classifier];
    for l in &model.layers {
        let (a, m) = (&l.self_attn, &l.mlp);
        layers.extend([
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.up_proj,
            &m.down_proj,
        ]);
    }
    for l in layers {
        out.push(l.packed.as_ref().expect("a packed base").dequantize());
    }
    out
}

trait Perturbed: Method {
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>);
}

impl Perturbed for LoraConfig {
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>) {
        peft.add_adapter("default", self.clone().with_init(InitLoraWeights::Random))
            .unwrap();
    }
}
impl Perturbed for AdaLoraConfig {
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>) {
        peft.add_adapter("default", self.clone().with_identity_init(false))
            .unwrap();
    }
}
impl Perturbed for RosaConfig {
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>) {
        let config = self.clone().with_init(InitRosaWeights::Random);
        peft.add_adapter_with_masks("default", config, InitialMasks::Random(7))
            .unwrap();
    }
}
impl Perturbed for SftConfig {
    fn add_perturbed<M: Module>(&self, peft: &mut PeftModel<M, Self>) {
        peft.add_adapter("default", self.clone().with_init(InitDeltas::Random(0.5)))
            .unwrap();
    }
}

fn check<A: peft_core::Adapter, C: Perturbed<Adapter = A>>(label: &str, config: &C) {
    let dev = device();
    let original: Activation<A> = TinyModel::from_torch(&random_torch_weights(1, &dev), &dev);
    let base = packed_model::<A>(1, &dev);
    let base_out = run(&base, &dev);

    // The packed model equals its dequantized twin, and differs from the f32 original by NF4's
    // rounding only.
    let mut twin = base.clone();
    assert_eq!(hosts::unpack_linears::<_, A>(&mut twin).unwrap(), 13);
    assert!(
        rel_diff(&run(&twin, &dev), &base_out) < 1e-5,
        "{label}: packed == dequantized"
    );
    let nf4_error = rel_diff(&base_out, &run(&original, &dev));
    assert!(
        nf4_error > 0.0 && nf4_error < 0.2,
        "{label}: NF4 error {nf4_error}"
    );

    // Identity at default init.
    let peft = PeftModel::new(base.clone(), config.clone()).unwrap();
    assert!(
        rel_diff(&run(peft.model(), &dev), &base_out) < 1e-6,
        "{label}: identity at init"
    );

    // A non-trivial adapter.
    let mut peft = PeftModel::empty(base.clone());
    config.add_perturbed(&mut peft);
    peft.set_adapter(&["default"]).unwrap();
    let out = run(peft.model(), &dev);
    assert!(
        max_diff(&out, &base_out) > 1e-3,
        "{label}: adapter changes the output"
    );

    // Merged into the unpacked base: exact. Into the packed base: quantized again, so the
    // output moves by about NF4's own error, and the packed bases change.
    let mut full = peft.clone();
    assert_eq!(full.unpack_base().unwrap(), 13);
    let plain = full.merge_and_unload(true).unwrap();
    assert!(
        rel_diff(&run(&plain, &dev), &out) < 1e-5,
        "{label}: full-precision merge"
    );
    let mut merged = peft.clone();
    let before = packed_values(merged.model());
    merged.merge_adapter(None, true).unwrap();
    let after = packed_values(merged.model());
    // Each merged layer holds the full-precision merge quantized again (PEFT's 4-bit merge);
    // the other layers keep their blocks.
    let mut requantized = plain.clone();
    hosts::pack_linears::<_, A>(&mut requantized, NF4_DQ, |_| true).unwrap();
    let requantized = packed_values(&requantized);
    let changed: Vec<usize> = (0..after.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    assert_eq!(changed.len(), 6, "{label}: the targeted layers change");
    for &i in &changed {
        assert_eq!(
            after[i], requantized[i],
            "{label}: layer {i} = quantize(merged)"
        );
    }
    let drift = rel_diff(&run(merged.model(), &dev), &out);
    assert!(
        drift > 0.0 && drift < 4.0 * nf4_error,
        "{label}: packed merge drift {drift}"
    );

    // Save -> load into a fresh packed model.
    let dir = tempfile::tempdir().unwrap();
    peft.save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    dev.seed(999);
    let loaded = PeftModel::<Activation<A>, C>::from_pretrained(
        packed_model::<A>(1, &dev),
        dir.path(),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(
        rel_diff(&run(loaded.model(), &dev), &out) < 1e-5,
        "{label}: save/load"
    );

    // Training moves the adapters, never the packed base.
    let mut train = peft.clone();
    let mut optim = SgdConfig::new().init();
    let mut stepper = train.stepper(3).unwrap();
    let before = packed_values(train.model());
    for _ in 0..3 {
        let loss = run(train.model(), &dev).powi_scalar(2).mean().reshape([1]);
        stepper.train(&mut train, &mut optim, 1e-2, loss).unwrap();
    }
    assert_eq!(
        before,
        packed_values(train.model()),
        "{label}: packed base untouched"
    );
    assert!(
        max_diff(&run(train.model(), &dev), &out) > 1e-5,
        "{label}: adapters trained"
    );
}

#[test]
fn every_adapter_method_works_on_a_packed_base() {
    let targets = ModuleSelector::names(["q_proj", "v_proj", "down_proj"]);
    check("lora", &LoraConfig::new(4, 8.0, targets.clone()));
    check(
        "dora",
        &LoraConfig::new(4, 8.0, targets.clone()).with_dora(true),
    );
    check(
        "adalora",
        &AdaLoraConfig::new(targets.clone(), 10)
            .with_ranks(4, 2)
            .with_alpha(1.0),
    );
    check("rosa", &RosaConfig::new(4, 0.1, 8.0, targets.clone()));
    check("sft", &SftConfig::new(0.1, targets));
}

/// Packed layers show visitors their true shape (so targeting, SFT's density budget and
/// parameter counts see the same model as in f32) and refuse selective methods, which would
/// update the frozen packed base.
#[test]
fn packed_layers_count_as_their_f32_twins_and_refuse_selective_methods() {
    use peft_lora::LoraAdapter;
    use peft_selective::{Selection, SelectiveConfig, SelectiveError, SelectiveOptimizer};
    let dev = device();
    let dense: Activation<LoraAdapter> =
        TinyModel::from_torch(&random_torch_weights(1, &dev), &dev);
    let packed = packed_model::<LoraAdapter>(1, &dev);
    let counts = |m: &Activation<LoraAdapter>| -> Vec<(String, usize)> {
        hosts::parameters(m)
            .into_iter()
            .map(|(p, _, n)| (p, n))
            .collect()
    };
    assert_eq!(counts(&packed), counts(&dense));
    assert_eq!(hosts::packed_paths(&packed).len(), 13);
    assert!(hosts::packed_paths(&dense).is_empty());

    let targets = ModuleSelector::names(["q_proj", "v_proj", "down_proj"]);
    let sft = SftConfig::new(0.1, targets);
    let sft_dense: Activation<peft_sft::SftAdapter> =
        TinyModel::from_torch(&random_torch_weights(1, &dev), &dev);
    let sft_packed = packed_model::<peft_sft::SftAdapter>(1, &dev);
    let (a, total_a) = PeftModel::new(sft_dense, sft.clone())
        .unwrap()
        .trainable_parameters();
    let (b, total_b) = PeftModel::new(sft_packed, sft)
        .unwrap()
        .trainable_parameters();
    assert!(a > 0);
    assert_eq!(
        (a, total_a),
        (b, total_b),
        "SFT's budget over a packed base"
    );

    let config = SelectiveConfig::new(Selection::Pafi, Some(50));
    let Err(err) = SelectiveOptimizer::new(&packed, config.clone(), SgdConfig::new().build())
    else {
        panic!("a packed base refuses a selective method");
    };
    assert!(
        matches!(&err, SelectiveError::PackedBase { layers } if layers.len() == 13),
        "{err}"
    );
    assert!(err.to_string().contains("base = \"f32\""), "{err}");
    assert!(SelectiveOptimizer::new(&dense, config, SgdConfig::new().build()).is_ok());
}
