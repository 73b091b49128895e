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
use peft_models::llama::{Llama, LlamaConfig, RopeScaling};
use peft_models::loss::{IGNORE_INDEX, causal_lm_loss};
use peft_models::{Checkpoint, LinearLayer, ModelError, Safetensors, TensorSource};

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
            json!({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}),
            "rope_type `yarn`",
        ),
        (
            "rope_scaling",
            json!({"type": "dynamic", "factor": 2.0}),
            "rope_type `dynamic`",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
            "low_freq_factor (a number) is required",
        ),
        (
            "rope_scaling",
            json!({"type": "linear"}),
            "factor (a number) is required",
        ),
        (
            "rope_parameters",
            json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                   "high_freq_factor": 1.0}),
            "must exceed low_freq_factor",
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

// ---------------------------------------------------------------------------------------------
// The sharded bf16 folder of `make_llama_generation_fixtures.py`: GQA, head_dim 16 != hidden /
// heads, attention biases, llama3 rotary scaling.

fn sharded_expected() -> BTreeMap<String, TensorData> {
    hf::read_tensors(&fixture("sharded_bf16/expected.safetensors")).unwrap()
}

fn tensor<const D: usize>(data: &TensorData) -> Tensor<D> {
    Tensor::from_data(data.clone(), &Device::flex())
}

fn int_tensor(data: &TensorData) -> Tensor<2, Int> {
    Tensor::from_data(data.clone(), &Device::flex())
}

fn check_sharded<L: LinearLayer>(label: &str) {
    let exp = sharded_expected();
    let (model, config) = load::<L>("sharded_bf16");
    assert_eq!(
        config.rope_scaling,
        RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 32,
        }
    );
    assert!(config.attention_bias && !config.mlp_bias);
    assert_eq!((config.num_key_value_heads, config.head_dim), (2, 16));
    let (ids, mask) = (
        int_tensor(&exp["input_ids"]),
        int_tensor(&exp["attention_mask"]),
    );
    assert_close(
        &format!("sharded bf16 {label} masked"),
        &model.forward(ids.clone(), Some(mask)),
        &tensor(&exp["logits"]),
    );
    assert_close(
        &format!("sharded bf16 {label} no mask"),
        &model.forward(ids, None),
        &tensor(&exp["logits_nomask"]),
    );
}

#[test]
fn sharded_bf16_folder_matches_transformers() {
    let dir = fixture("sharded_bf16");
    assert!(!dir.join("model.safetensors").exists());
    let source = Safetensors::open_dir(&dir).unwrap();
    assert_eq!(source.num_files(), 4, "one map per shard");
    assert!(source.origin().ends_with("model.safetensors.index.json"));
    assert_eq!(source.names().len(), 29);
    check_sharded::<Linear>("Linear");
    check_sharded::<PeftLinear<LoraAdapter>>("PeftLinear");
}

#[test]
fn safetensors_dtypes_are_converted_to_f32() {
    use safetensors::{Dtype, tensor::TensorView};
    let values = [1.5f32, -2.25, 0.0, 65504.0, 3.0e-5, -0.1];
    let f16: Vec<u8> = values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let bf16: Vec<u8> = values
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f32s: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let i64s: Vec<u8> = [1i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "half",
            TensorView::new(Dtype::F16, vec![2, 3], &f16).unwrap(),
        ),
        (
            "brain",
            TensorView::new(Dtype::BF16, vec![3, 2], &bf16).unwrap(),
        ),
        (
            "single",
            TensorView::new(Dtype::F32, vec![6], &f32s).unwrap(),
        ),
        ("ints", TensorView::new(Dtype::I64, vec![2], &i64s).unwrap()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let source = Safetensors::open(&file).unwrap();
    let read = |name: &str| -> Vec<f32> { source.read(name).unwrap().iter::<f32>().collect() };
    let expect = |convert: fn(f32) -> f32| values.iter().map(|v| convert(*v)).collect::<Vec<_>>();
    assert_eq!(read("half"), expect(|v| half::f16::from_f32(v).to_f32()));
    assert_eq!(read("brain"), expect(|v| half::bf16::from_f32(v).to_f32()));
    assert_eq!(read("single"), values.to_vec());
    assert_eq!(source.shape("brain"), Some(vec![3, 2]));
    assert_eq!(source.read("brain").unwrap().shape().to_vec(), vec![3, 2]);
    assert!(matches!(
        source.read("ints"),
        Err(ModelError::Peft(
            peft_core::PeftError::UnsupportedDtype { .. }
        ))
    ));
    assert!(matches!(
        source.read("nope"),
        Err(ModelError::MissingTensor { .. })
    ));
    // A damaged file is refused when opened, naming the file.
    std::fs::write(
        dir.path().join("bad.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json",
    )
    .unwrap();
    let err = Safetensors::open(&dir.path().join("bad.safetensors"))
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");
    // A shard named by the index but missing is NotFound.
    let scratch = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("sharded_bf16/model.safetensors.index.json"),
        scratch.path().join("model.safetensors.index.json"),
    )
    .unwrap();
    assert!(matches!(
        Safetensors::open_dir(scratch.path()),
        Err(ModelError::NotFound { .. })
    ));
    // A folder with no weights at all.
    assert!(matches!(
        Checkpoint::open_dir(dir.path().join("empty").as_path()),
        Err(ModelError::NotFound { .. })
    ));
}

fn assert_freqs(label: &str, ours: &[f32], theirs: &TensorData) {
    let theirs: Vec<f32> = theirs.iter::<f32>().collect();
    assert_eq!(ours.len(), theirs.len(), "{label}");
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-6 * b.abs(),
            "{label}: inv_freq[{i}] = {a}, transformers {b}"
        );
    }
}

#[test]
fn rope_scaling_matches_transformers() {
    let exp = sharded_expected();
    let config = LlamaConfig::from_dir(&fixture("sharded_bf16")).unwrap();
    let llama3 = config
        .rope_scaling
        .inv_freq(config.rope_theta, config.head_dim);
    assert_freqs("llama3", &llama3, &exp["inv_freq_llama3"]);
    let plain = RopeScaling::None.inv_freq(config.rope_theta, config.head_dim);
    assert!(plain[0] == llama3[0] && plain[1] != llama3[1] && plain[7] != llama3[7]);

    // Linear scaling, written the Transformers 4 way (`rope_scaling` with `type`).
    let mut json = hf::read_json(&fixture("sharded_bf16/config.json")).unwrap();
    json.remove("rope_parameters");
    json.insert("rope_theta".into(), serde_json::json!(10000.0));
    json.insert(
        "rope_scaling".into(),
        serde_json::json!({"type": "linear", "factor": 2.5}),
    );
    let linear = parse(&json).unwrap();
    assert_eq!(linear.rope_scaling, RopeScaling::Linear { factor: 2.5 });
    assert_freqs(
        "linear",
        &linear
            .rope_scaling
            .inv_freq(linear.rope_theta, linear.head_dim),
        &exp["inv_freq_linear"],
    );
    // A top-level original_max_position_embeddings wins over the parameters' (Transformers'
    // standardize_rope_params); without either, max_position_embeddings is used.
    let mut json = hf::read_json(&fixture("sharded_bf16/config.json")).unwrap();
    json.insert(
        "original_max_position_embeddings".into(),
        serde_json::json!(16),
    );
    let original = |c: LlamaConfig| match c.rope_scaling {
        RopeScaling::Llama3 {
            original_max_position_embeddings,
            ..
        } => original_max_position_embeddings,
        other => panic!("{other:?}"),
    };
    assert_eq!(original(parse(&json).unwrap()), 16);
    json.remove("original_max_position_embeddings");
    json["rope_parameters"]
        .as_object_mut()
        .unwrap()
        .remove("original_max_position_embeddings");
    assert_eq!(original(parse(&json).unwrap()), 128);
}

/// Decoding with the key/value cache (a prefill, then one token at a time) gives the logits of
/// a full forward over the whole sequence, on GQA with llama3 rotary (sharded) and on a single
/// key/value head with a tied head and biases (tied), for a batch of two.
#[test]
fn cached_decoding_equals_full_forward() {
    for base in ["sharded_bf16", "tied"] {
        let (model, config) = load::<PeftLinear<LoraAdapter>>(base);
        let device = Device::flex();
        let seq = 11;
        let data: Vec<i64> = (0..2 * seq)
            .map(|i| ((i * 37 + 5) % config.vocab_size) as i64)
            .collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(data, [2, seq]), &device);
        let full = model.forward(ids.clone(), None);
        let mut cache = model.new_cache(2, 16);
        let prefill = 4;
        let first = model
            .forward_cached(ids.clone().slice([0..2, 0..prefill]), &mut cache)
            .unwrap();
        assert_close(
            &format!("{base} prefill"),
            &first,
            &full.clone().slice([0..2, 0..prefill]),
        );
        for t in prefill..seq {
            let step = ids.clone().slice([0..2, t..t + 1]);
            let logits = if t % 2 == 0 {
                model.forward_cached(step, &mut cache).unwrap()
            } else {
                let last = model.forward_cached_last(step, &mut cache).unwrap();
                last.unsqueeze_dim(1)
            };
            assert_close(
                &format!("{base} step {t}"),
                &logits,
                &full.clone().slice([0..2, t..t + 1]),
            );
        }
        assert_eq!((cache.len(), cache.capacity()), (seq, 16));
        // A cleared cache starts again at position 0 (a two-token prefill this time).
        cache.clear();
        let again = model
            .forward_cached(ids.clone().slice([0..2, 0..2]), &mut cache)
            .unwrap();
        assert_close(
            &format!("{base} after clear"),
            &again,
            &full.slice([0..2, 0..2]),
        );
        assert!(matches!(
            model.forward_cached(ids.slice([0..1, 0..1]), &mut cache),
            Err(ModelError::CacheBatch {
                expected: 2,
                found: 1
            })
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// The causal-LM loss against Transformers' `ForCausalLMLoss` and the model's `labels=` loss.

#[test]
fn causal_lm_loss_matches_transformers() {
    let exp = sharded_expected();
    let loss = causal_lm_loss(tensor(&exp["ce_logits"]), int_tensor(&exp["ce_labels"])).unwrap();
    let ours = loss.into_scalar::<f32>();
    let theirs = exp["ce_loss"].iter::<f32>().next().unwrap();
    println!("ce loss: ours {ours}, transformers {theirs}");
    assert!(
        (ours - theirs).abs() <= 1e-5 * theirs.abs(),
        "{ours} vs {theirs}"
    );

    // The model's loss with prompt and padding labels masked.
    let (model, _) = load::<Linear>("sharded_bf16");
    let logits = model.forward(
        int_tensor(&exp["input_ids"]),
        Some(int_tensor(&exp["attention_mask"])),
    );
    let ours = causal_lm_loss(logits, int_tensor(&exp["loss_labels"]))
        .unwrap()
        .into_scalar::<f32>();
    let theirs = exp["model_loss"].iter::<f32>().next().unwrap();
    println!("model loss: ours {ours}, transformers {theirs}");
    assert!((ours - theirs).abs() <= 1e-4, "{ours} vs {theirs}");
    // The same loss with the head and the loss fused (this model's head is untied).
    let fused = model
        .causal_lm_loss(
            int_tensor(&exp["input_ids"]),
            Some(int_tensor(&exp["attention_mask"])),
            int_tensor(&exp["loss_labels"]),
        )
        .unwrap()
        .into_scalar::<f32>();
    println!("model loss, fused head: {fused}");
    assert!((fused - theirs).abs() <= 1e-4, "{fused} vs {theirs}");
}

/// `Llama::causal_lm_loss` (head and loss fused) against the loss of `Llama::forward`'s
/// logits: the value and the gradients of the token table (tied: it is the head too), the
/// untied head and a projection, with prompt labels ignored.
#[test]
fn fused_head_loss_equals_the_logits_path() {
    for base in ["tied", "untied"] {
        let device = Device::flex().autodiff();
        let (model, _) = Llama::<Linear>::from_pretrained(&fixture(base), &device).unwrap();
        let exp = Expected::load(base);
        let on = |t: Tensor<2, Int>| Tensor::<2, Int>::from_data(t.into_data(), &device);
        let (ids, mask) = (on(exp.ids()), on(exp.mask()));
        let mut labels: Vec<i64> = ids.clone().into_data().iter::<i64>().collect();
        labels[1] = IGNORE_INDEX;
        labels[2] = IGNORE_INDEX;
        let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, ids.dims()), &device);
        let fused = model
            .causal_lm_loss(ids.clone(), Some(mask.clone()), labels.clone())
            .unwrap();
        let logits = causal_lm_loss(model.forward(ids, Some(mask)), labels).unwrap();
        let (a, b) = (
            fused.clone().into_scalar::<f32>(),
            logits.clone().into_scalar::<f32>(),
        );
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{base}: {a} vs {b}");
        let (g1, g2) = (fused.backward(), logits.backward());
        let mut params = vec![
            ("embed_tokens", model.model.embed_tokens.weight.val()),
            (
                "q_proj",
                model.model.layers[0].self_attn.q_proj.weight.val(),
            ),
        ];
        if let Some(head) = &model.lm_head {
            params.push(("lm_head", head.weight.val()));
        }
        for (name, p) in params {
            let (x, y) = (p.grad(&g1).unwrap(), p.grad(&g2).unwrap());
            let scale = y.clone().abs().max().into_scalar::<f32>();
            let diff = (x - y).abs().max().into_scalar::<f32>();
            assert!(
                diff <= 1e-4 * scale,
                "{base} {name}: {diff} (largest {scale})"
            );
        }
    }
}

#[test]
fn causal_lm_loss_gradient_matches_torch() {
    let exp = sharded_expected();
    let device = Device::flex().autodiff();
    let logits = Tensor::<3>::from_data(exp["ce_logits"].clone(), &device).require_grad();
    let labels = Tensor::<2, Int>::from_data(exp["ce_labels"].clone(), &device);
    let loss = causal_lm_loss(logits.clone(), labels).unwrap();
    let grads = loss.backward();
    let grad = logits.grad(&grads).unwrap();
    let theirs = tensor::<3>(&exp["ce_grad"]);
    let diff = (grad.clone().inner() - theirs)
        .abs()
        .max()
        .into_scalar::<f32>();
    println!("loss gradient: max |diff| = {diff:.3e}");
    assert!(diff < 1e-6, "{diff}");
    // Ignored positions and the last position (which predicts nothing) get no gradient.
    let g = grad.inner();
    let zero_rows = [
        (0usize, 0usize),
        (1, 2),
        (1, 3),
        (2, 4),
        (0, 5),
        (1, 5),
        (2, 5),
    ];
    for (b, t) in zero_rows {
        let row = g
            .clone()
            .slice([b..b + 1, t..t + 1])
            .abs()
            .max()
            .into_scalar::<f32>();
        assert_eq!(row, 0.0, "row ({b}, {t})");
    }
}

#[test]
fn causal_lm_loss_is_stable_and_checks_its_inputs() {
    let device = Device::flex();
    // Logits of 1e4 would overflow exp() without the max subtraction.
    let logits = Tensor::<3>::from_floats([[[1.0e4, 0.0, -1.0e4], [0.0, 1.0e4, 0.0]]], &device);
    // Position 0 predicts label 1 of the row; the last position predicts nothing.
    let labels = Tensor::<2, Int>::from_ints([[7, 0]], &device);
    let loss = causal_lm_loss(logits.clone(), labels)
        .unwrap()
        .into_scalar::<f32>();
    assert!(loss.is_finite() && loss.abs() < 1e-6, "{loss}");
    let labels = Tensor::<2, Int>::from_ints([[0, 2]], &device);
    let loss = causal_lm_loss(logits.clone(), labels)
        .unwrap()
        .into_scalar::<f32>();
    assert!((loss - 2.0e4).abs() < 1.0, "{loss}");
    let err = |labels: Tensor<2, Int>| causal_lm_loss(logits.clone(), labels).unwrap_err();
    assert!(matches!(
        err(Tensor::from_ints([[0, IGNORE_INDEX]], &device)),
        ModelError::InvalidInput { .. }
    ));
    assert!(matches!(
        err(Tensor::from_ints([[0, 3]], &device)),
        ModelError::TokenOutOfVocab {
            id: 3,
            vocab_size: 3
        }
    ));
    assert!(matches!(
        err(Tensor::from_ints([[0, 1, 2]], &device)),
        ModelError::InvalidInput { .. }
    ));
}

/// Compares every float parameter's gradient in two `GradientsParams`.
struct SameGrads<'a> {
    ours: &'a burn::optim::GradientsParams,
    theirs: &'a burn::optim::GradientsParams,
    what: String,
    compared: usize,
}

impl burn::module::ModuleVisitor for SameGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        match (self.ours.get::<D>(param.id), self.theirs.get::<D>(param.id)) {
            (Some(a), Some(b)) => {
                let scale = b.clone().abs().max().into_scalar::<f32>();
                let diff = (a - b).abs().max().into_scalar::<f32>();
                assert!(
                    diff <= 1e-5 * scale + 1e-9,
                    "{}: parameter {}: {diff} (largest {scale})",
                    self.what,
                    param.id
                );
                self.compared += 1;
            }
            (None, None) => {}
            (a, _) => panic!(
                "{}: parameter {} has a gradient on one side only (checkpointed: {})",
                self.what,
                param.id,
                a.is_some()
            ),
        }
    }
}

fn labels_ignoring_the_prompt(ids: &Tensor<2, Int>, device: &Device) -> Tensor<2, Int> {
    let mut labels: Vec<i64> = ids.clone().into_data().iter::<i64>().collect();
    labels[1] = IGNORE_INDEX;
    labels[2] = IGNORE_INDEX;
    Tensor::<2, Int>::from_data(TensorData::new(labels, ids.dims()), device)
}

/// Gradient checkpointing gives the loss and the gradients of the plain backward pass: full
/// fine-tuning of the tied and untied models (every parameter, the tied table getting both the
/// head's and the lookups' gradients), padding and ignored labels, a gradient-accumulation
/// scale; and LoRA with dropout, against a plain pass that reseeds the generator per layer as
/// the checkpointed one does (so a mask drawn differently in the recomputed pass would show).
#[test]
fn checkpointed_gradients_equal_the_plain_backward() {
    use burn::optim::GradientsParams;
    use peft_core::ModuleSelector;
    use peft_lora::LoraConfig;
    use peft_models::llama::Rotary;

    let device = Device::flex().autodiff();
    let on = |t: Tensor<2, Int>| Tensor::<2, Int>::from_data(t.into_data(), &device);
    for base in ["tied", "untied"] {
        let (model, _) = Llama::<Linear>::from_pretrained(&fixture(base), &device).unwrap();
        let exp = Expected::load(base);
        let (ids, mask) = (on(exp.ids()), on(exp.mask()));
        let labels = labels_ignoring_the_prompt(&ids, &device);
        let plain = model
            .causal_lm_loss(ids.clone(), Some(mask.clone()), labels.clone())
            .unwrap();
        let value = plain.clone().into_scalar::<f64>();
        let plain = GradientsParams::from_grads((plain * 0.5).backward(), &model);
        let (ckpt_value, ckpt) = model
            .causal_lm_loss_checkpointed(ids, Some(mask), labels, 0.5, 7)
            .unwrap();
        assert!(
            (ckpt_value - value).abs() <= 1e-6 * value.abs(),
            "{base}: loss"
        );
        let mut same = SameGrads {
            ours: &ckpt,
            theirs: &plain,
            what: format!("{base}, full fine-tuning"),
            compared: 0,
        };
        model.visit(&mut same);
        // Every parameter trains: the plain pass has a gradient for each.
        assert_eq!(
            same.compared,
            plain.len(),
            "{base}: every gradient compared"
        );
        assert!(plain.len() > 10, "{base}: {} gradients", plain.len());
    }

    // LoRA with dropout on every projection of the untied model.
    let (model, _) =
        Llama::<PeftLinear<LoraAdapter>>::from_pretrained(&fixture("untied"), &device).unwrap();
    let config = LoraConfig::new(
        4,
        8.0,
        ModuleSelector::names(["q_proj", "v_proj", "down_proj"]),
    )
    .with_dropout(0.3);
    let model = LoraModel::new(model, config).unwrap().into_model();
    let exp = Expected::load("untied");
    let (ids, mask) = (on(exp.ids()), on(exp.mask()));
    let labels = labels_ignoring_the_prompt(&ids, &device);
    let seed = 11u64;
    // The plain pass, reseeding before each layer as the checkpointed pass does.
    let [_, seq] = ids.dims();
    let padding = mask.clone().equal_elem(0);
    let rotary = Rotary::from_inv_freq(&model.model.inv_freq(), 0, seq, &device);
    let mut x = model.model.embed(ids.clone());
    for (i, layer) in model.model.layers.iter().enumerate() {
        device.seed(seed + i as u64);
        x = layer.forward(x, &rotary, Some(&padding));
    }
    let logits = model
        .lm_head
        .as_ref()
        .unwrap()
        .forward(model.model.norm.forward(x));
    let plain = causal_lm_loss(logits, labels.clone()).unwrap();
    let plain = GradientsParams::from_grads(plain.backward(), &model);
    let run = |seed| {
        model
            .causal_lm_loss_checkpointed(ids.clone(), Some(mask.clone()), labels.clone(), 1.0, seed)
            .unwrap()
            .1
    };
    let ckpt = run(seed);
    let mut same = SameGrads {
        ours: &ckpt,
        theirs: &plain,
        what: "LoRA with dropout".into(),
        compared: 0,
    };
    model.visit(&mut same);
    assert!(
        same.compared >= 3 * 2,
        "the adapters' factors were compared"
    );
    // Another seed draws other masks: some gradient differs.
    let other = run(seed + 100);
    let lora_b = model.model.layers[0]
        .self_attn
        .q_proj
        .adapters
        .get("default")
        .unwrap()
        .lora_b
        .clone();
    let (a, b) = (
        other.get::<2>(lora_b.id).unwrap(),
        ckpt.get::<2>(lora_b.id).unwrap(),
    );
    assert!(
        (a - b).abs().max().into_scalar::<f32>() > 1e-6,
        "the seed sets the masks"
    );
}
