//! Parity of the LLaMA decoder with Hugging Face `transformers` and PEFT 0.21.2, on the tiny
//! random models written by `fixtures/make_llama_fixtures.py`: logits equal to 1e-4 (max abs)
//! without and with PEFT adapters, on both attach paths (`PeftLinear`, activation space;
//! `burn::nn::Linear`, weight space), merged equal to unmerged, tied and untied heads, a
//! right-padded row, and clear errors for broken checkpoints and unsupported configs.
//!
//! Everything compared is loaded from the fixtures (no random initialisation).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{PeftLinear, hf};
use peft_lora::{LoadOptions, LoraAdapter, LoraModel};
use peft_models::llama::{Llama, LlamaConfig};
use peft_models::{LinearLayer, ModelError};

const TOL: f32 = 1e-4;

type Fast = Llama<PeftLinear<LoraAdapter>>;
type Plain = Llama<Linear>;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/llama")
        .join(path)
}

fn max_diff(a: &Tensor<3>, b: &Tensor<3>) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes");
    (a.clone() - b.clone()).abs().max().into_scalar::<f32>()
}

/// Assert `ours ≈ theirs` to [`TOL`] and print the difference (shown with `--nocapture`).
fn assert_close(label: &str, ours: &Tensor<3>, theirs: &Tensor<3>) {
    let d = max_diff(ours, theirs);
    println!("{label}: max |diff| = {d:.3e}");
    assert!(d <= TOL, "{label}: logits differ by {d} (> {TOL})");
}

/// The inputs and expected logits of one fixture folder.
struct Expected {
    tensors: BTreeMap<String, TensorData>,
    device: Device,
}

impl Expected {
    fn load(dir: &str) -> Self {
        Self {
            tensors: hf::read_tensors(&fixture(&format!("{dir}/expected.safetensors"))).unwrap(),
            device: Device::flex(),
        }
    }
    fn ids(&self) -> Tensor<2, Int> {
        Tensor::from_data(self.tensors["input_ids"].clone(), &self.device)
    }
    fn mask(&self) -> Tensor<2, Int> {
        Tensor::from_data(self.tensors["attention_mask"].clone(), &self.device)
    }
    fn logits(&self, key: &str) -> Tensor<3> {
        Tensor::from_data(self.tensors[key].clone(), &self.device)
    }
}

fn load<L: LinearLayer>(base: &str) -> (Llama<L>, LlamaConfig) {
    Llama::<L>::from_pretrained(&fixture(base), &Device::flex()).unwrap()
}

fn check_base<L: LinearLayer>(base: &str, path_label: &str) {
    let exp = Expected::load(base);
    let (model, _) = load::<L>(base);
    let label = format!("{base}/{path_label}");
    assert_close(
        &format!("{label} masked"),
        &model.forward(exp.ids(), Some(exp.mask())),
        &exp.logits("logits"),
    );
    assert_close(
        &format!("{label} no mask"),
        &model.forward(exp.ids(), None),
        &exp.logits("logits_nomask"),
    );
}

#[test]
fn base_logits_match_transformers() {
    for base in ["untied", "tied"] {
        check_base::<Linear>(base, "Linear");
        check_base::<PeftLinear<LoraAdapter>>(base, "PeftLinear");
    }
}

#[test]
fn config_is_read_as_transformers_wrote_it() {
    let (model, untied) = load::<Linear>("untied");
    assert_eq!(
        (untied.num_attention_heads, untied.num_key_value_heads),
        (4, 2)
    );
    assert_eq!((untied.head_dim, untied.rope_theta), (8, 10000.0));
    assert!(!untied.tie_word_embeddings && model.lm_head.is_some());
    let (model, tied) = load::<Linear>("tied");
    assert_eq!((tied.num_key_value_heads, tied.head_dim), (1, 16));
    assert_eq!(tied.rope_theta, 500.0);
    assert!(tied.attention_bias && tied.mlp_bias);
    assert!(tied.tie_word_embeddings && model.lm_head.is_none());
    let q = &model.model.layers[0].self_attn.q_proj;
    assert_eq!(q.weight.dims(), [32, 64]);
    assert!(q.bias.is_some());
}

#[test]
fn module_paths_are_hugging_face_paths() {
    let (model, _) = load::<Linear>("untied");
    let paths: Vec<String> = peft_core::hosts::layers(&model)
        .into_iter()
        .map(|l| l.candidate.path)
        .collect();
    for p in [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
        "model.layers.1.mlp.gate_proj",
        "model.layers.0.mlp.down_proj",
        "lm_head",
    ] {
        assert!(paths.iter().any(|x| x == p), "{p} not in {paths:?}");
    }
    let mut names = Vec::new();
    struct Names<'a>(&'a mut Vec<String>, Vec<String>);
    impl burn::module::ModuleVisitor for Names<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.1.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.1.pop();
        }
        fn visit_float<const D: usize>(&mut self, _: &burn::module::Param<Tensor<D>>) {
            self.0.push(self.1.join("."));
        }
    }
    model.visit(&mut Names(&mut names, Vec::new()));
    let expected: Vec<String> = hf::read_tensors(&fixture("untied/model.safetensors"))
        .unwrap()
        .into_keys()
        .collect();
    names.sort();
    assert_eq!(
        names, expected,
        "every parameter has its checkpoint key as path"
    );
}

/// Under causal attention, right padding changes only the padded positions: the real tokens of
/// the padded row equal the same tokens run alone, the unpadded row equals itself run alone, and
/// the padded positions (which attend to the real tokens only, as in Transformers) differ from
/// an unmasked run.
#[test]
fn padding_mask_hides_padding_keys_only() {
    let exp = Expected::load("untied");
    let (model, _) = load::<PeftLinear<LoraAdapter>>("untied");
    let masked = model.forward(exp.ids(), Some(exp.mask()));
    let unmasked = model.forward(exp.ids(), None);
    let seq = exp.ids().dims()[1];
    let real = exp.mask().slice([1..2, 0..seq]).sum().into_scalar::<i64>() as usize;
    assert!(real < seq, "row 1 of the fixture is padded");
    let alone = model.forward(exp.ids().slice([1..2, 0..real]), None);
    assert_close(
        "padded row vs the row alone",
        &masked.clone().slice([1..2, 0..real]),
        &alone,
    );
    let row0 = model.forward(exp.ids().slice([0..1, 0..seq]), None);
    assert_close("unpadded row", &masked.clone().slice([0..1, 0..seq]), &row0);
    let pad = |t: &Tensor<3>| t.clone().slice([1..2, real..seq]);
    let moved = max_diff(&pad(&masked), &pad(&unmasked));
    assert!(
        moved > 0.1,
        "the mask changes the padded positions ({moved})"
    );
    assert_close(
        "padded positions vs transformers",
        &pad(&masked),
        &pad(&exp.logits("logits")),
    );
}

/// `(base, adapter, number of adapted layers, scaling)`.
const ADAPTERS: &[(&str, &str, usize, f64)] = &[
    ("untied", "lora_qv", 4, 2.0),
    ("untied", "rslora_all_linear", 14, 3.0),
    ("tied", "rslora_all_linear", 14, 3.0),
];

fn check_adapter<L: LinearLayer>(base: &str, adapter: &str, layers: usize, scale: f64, path: &str)
where
    Llama<L>: Clone,
{
    let label = format!("{base}/{adapter}/{path}");
    let exp = Expected::load(base);
    let expected = Expected::load(&format!("{base}/{adapter}")).logits("logits");
    let (model, _) = load::<L>(base);
    let peft = LoraModel::from_pretrained(
        model,
        &fixture(&format!("{base}/{adapter}")),
        &LoadOptions::default(),
    )
    .unwrap();
    let entry = &peft.adapters()["default"];
    assert_eq!(entry.layers.len(), layers, "{label}: adapted layers");
    assert!(entry.layers.iter().all(|l| l.starts_with("model.layers.")));
    let scalings: Vec<f64> =
        peft_core::hosts::collect(peft.model(), |h: &peft_core::HostView<'_, LoraAdapter>| {
            h.slot.get("default").map(|a| a.scale)
        });
    assert_eq!(scalings.len(), layers, "{label}");
    assert!(
        scalings.iter().all(|s| (s - scale).abs() < 1e-12),
        "{label}: {scalings:?}"
    );

    let out = peft.model().forward(exp.ids(), Some(exp.mask()));
    assert_close(&format!("{label} adapter"), &out, &expected);
    let base_logits = exp.logits("logits");
    assert!(
        max_diff(&out, &base_logits) > 0.1,
        "{label}: adapter has an effect"
    );

    let merged = peft.merge_and_unload(true).unwrap();
    let merged_out = merged.forward(exp.ids(), Some(exp.mask()));
    assert_close(&format!("{label} merged vs unmerged"), &merged_out, &out);
    assert_close(&format!("{label} merged vs PEFT"), &merged_out, &expected);
}

#[test]
fn peft_adapters_match_on_the_activation_space_path() {
    for &(base, adapter, layers, scale) in ADAPTERS {
        check_adapter::<PeftLinear<LoraAdapter>>(base, adapter, layers, scale, "PeftLinear");
    }
}

#[test]
fn peft_adapters_match_on_the_weight_space_path() {
    for &(base, adapter, layers, scale) in ADAPTERS {
        check_adapter::<Linear>(base, adapter, layers, scale, "Linear");
    }
}

/// A scratch copy of a fixture folder with its checkpoint rewritten by `edit`.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str, base: &str, edit: impl FnOnce(&mut BTreeMap<String, TensorData>)) -> Self {
        let dir =
            std::env::temp_dir().join(format!("peft-models-llama-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fixture(base).join("config.json"), dir.join("config.json")).unwrap();
        let mut tensors = hf::read_tensors(&fixture(base).join("model.safetensors")).unwrap();
        edit(&mut tensors);
        hf::write_tensors(&dir.join("model.safetensors"), &tensors).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn tied_head_ignores_a_saved_lm_head() {
    // Some tied checkpoints also store `lm_head.weight`; Transformers ties it to the embedding.
    let scratch = Scratch::new("tied-with-head", "tied", |t| {
        let shape = t["model.embed_tokens.weight"].shape().to_vec();
        let n = shape.iter().product();
        t.insert(
            "lm_head.weight".into(),
            TensorData::new(vec![0.0f32; n], shape),
        );
    });
    let exp = Expected::load("tied");
    let (model, _) = Fast::from_pretrained(&scratch.0, &Device::flex()).unwrap();
    assert!(model.lm_head.is_none());
    assert_close(
        "tied with a saved lm_head",
        &model.forward(exp.ids(), Some(exp.mask())),
        &exp.logits("logits"),
    );
}

#[test]
fn missing_tensors_are_named() {
    for (name, base, key) in [
        ("no-up", "untied", "model.layers.1.mlp.up_proj.weight"),
        ("no-head", "untied", "lm_head.weight"),
        ("no-bias", "tied", "model.layers.0.self_attn.o_proj.bias"),
        ("no-norm", "tied", "model.norm.weight"),
    ] {
        let scratch = Scratch::new(name, base, |t| {
            t.remove(key).unwrap();
        });
        match Plain::from_pretrained(&scratch.0, &Device::flex()) {
            Err(ModelError::MissingTensor { key: k, .. }) => assert_eq!(k, key),
            other => panic!(
                "{name}: expected MissingTensor, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    let scratch = Scratch::new("bad-shape", "untied", |t| {
        t.insert(
            "model.layers.0.self_attn.k_proj.weight".into(),
            TensorData::new(vec![0.0f32; 32 * 32], [32, 32]),
        );
    });
    let err = Plain::from_pretrained(&scratch.0, &Device::flex())
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&err, ModelError::BadTensor { key, expected, .. }
            if key == "model.layers.0.self_attn.k_proj.weight" && expected == &[16, 32]),
        "{err}"
    );
    let err = Plain::from_pretrained(&fixture("does-not-exist"), &Device::flex())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
}

fn untied_json() -> serde_json::Map<String, serde_json::Value> {
    hf::read_json(&fixture("untied/config.json")).unwrap()
}

fn parse(json: &serde_json::Map<String, serde_json::Value>) -> peft_models::Result<LlamaConfig> {
    LlamaConfig::from_json(
        &serde_json::to_string(json).unwrap(),
        Path::new("config.json"),
    )
}

#[test]
fn unsupported_configs_are_refused_with_the_reason() {
    use serde_json::json;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("hidden_act", json!("gelu"), "hidden_act `gelu`"),
        (
            "rope_parameters",
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
            "rope_type `llama3`",
        ),
        (
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
            "rope_type `linear`",
        ),
        ("partial_rotary_factor", json!(0.5), "partial_rotary_factor"),
        (
            "num_key_value_heads",
            json!(3),
            "multiple of num_key_value_heads",
        ),
        ("head_dim", json!(7), "even"),
        ("vocab_size", json!(0), "vocab_size must be positive"),
        ("num_hidden_layers", json!("two"), "invalid type"),
    ];
    for (field, value, message) in cases {
        let mut json = untied_json();
        json.insert(field.into(), value);
        match parse(&json) {
            Err(ModelError::Config { message: m, .. }) => {
                assert!(m.contains(message), "{field}: `{m}` lacks `{message}`")
            }
            other => panic!("{field}: expected a config error, got {other:?}"),
        }
    }
    // A config with an unsupported value fails from_pretrained before any tensor is read.
    let dir = std::env::temp_dir().join(format!("peft-models-llama-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut json = untied_json();
    json.insert("hidden_act".into(), json!("relu"));
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    let err = Plain::from_pretrained(&dir, &Device::flex())
        .map(|_| ())
        .unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        matches!(&err, ModelError::Config { file, .. } if file.ends_with("config.json")),
        "{err}"
    );
}

#[test]
fn transformers_4_configs_are_read_too() {
    use serde_json::json;
    // Transformers 4 writes `rope_theta` at the top and `rope_scaling: null`; older configs
    // lack `num_key_value_heads` and `head_dim`.
    let mut json = untied_json();
    json.remove("rope_parameters");
    json.remove("head_dim");
    json.remove("num_key_value_heads");
    json.insert("rope_theta".into(), json!(250.0));
    json.insert("rope_scaling".into(), json!(null));
    let c = parse(&json).unwrap();
    assert_eq!(
        (c.rope_theta, c.head_dim, c.num_key_value_heads),
        (250.0, 8, 4)
    );
    // A "default" rope_scaling is the plain rotary embedding.
    json.insert("rope_scaling".into(), json!({"rope_type": "default"}));
    assert_eq!(parse(&json).unwrap().rope_theta, 250.0);
    // Neither field: 10000.
    json.remove("rope_theta");
    json.remove("rope_scaling");
    assert_eq!(parse(&json).unwrap().rope_theta, 10000.0);
}

/// Random initialisation gives the right structure (no values are compared).
#[test]
fn new_builds_the_configured_structure() {
    let device = Device::flex();
    let mut config = LlamaConfig::new(40, 16, 24, 3, 4);
    config.num_key_value_heads = 2;
    let untied = Plain::new(&config, &device);
    assert_eq!(untied.model.layers.len(), 3);
    assert_eq!(
        untied.model.layers[0].self_attn.k_proj.weight.dims(),
        [16, 8]
    );
    let ids = Tensor::<2, Int>::from_ints([[1, 2, 3], [4, 5, 6]], &device);
    assert_eq!(untied.forward(ids.clone(), None).dims(), [2, 3, 40]);
    config.tie_word_embeddings = true;
    config.attention_bias = true;
    let tied = Fast::new(&config, &device);
    assert!(tied.lm_head.is_none());
    assert!(tied.model.layers[0].self_attn.o_proj.bias.is_some());
    assert_eq!(tied.forward(ids, None).dims(), [2, 3, 40]);
}

#[test]
#[should_panic(expected = "multiple of num_key_value_heads")]
fn new_refuses_an_inconsistent_config() {
    let mut config = LlamaConfig::new(40, 16, 24, 1, 4);
    config.num_key_value_heads = 3;
    let _ = Plain::new(&config, &Device::flex());
}
