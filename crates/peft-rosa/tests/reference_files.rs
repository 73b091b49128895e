//! Files laid out as peft-rosa writes them (`fixtures/reference_layout`, made by
//! `fixtures/make_reference_layout.py` from the reference's key layout): `int32` offsets,
//! `int16` indices, `bf16`/`f16` values and factors, and an embedding's transposed CSR
//! (`rosa_spa.tr_*`, which the reference always writes for embeddings) load, and the loaded
//! model computes the reference's output.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::{PeftEmbedding, PeftLinear};
use peft_rosa::{LoadOptions, RosaAdapter, RosaModel, SaveOptions};

#[derive(Module, Debug)]
struct Net {
    emb: PeftEmbedding<RosaAdapter>,
    proj: PeftLinear<RosaAdapter>,
}

impl Net {
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.proj.forward(self.emb.forward(ids))
    }
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference_layout")
}

fn expected() -> BTreeMap<String, TensorData> {
    peft_core::hf::read_tensors(&fixture().join("expected.safetensors")).unwrap()
}

/// The base model of the fixture (PyTorch `[out, in]` weights, transposed into burn's layout).
fn base(device: &Device) -> Net {
    let t = expected();
    let float = |k: &str| Tensor::<2>::from_data(t[k].clone(), device);
    let mut emb: Embedding = EmbeddingConfig::new(10, 6).init(device);
    emb.weight = Param::from_tensor(float("emb.weight")).set_require_grad(false);
    let mut proj: Linear = LinearConfig::new(6, 5).init(device);
    proj.weight = Param::from_tensor(float("proj.weight").transpose()).set_require_grad(false);
    proj.bias = Some(Param::from_tensor(Tensor::<1>::from_data(
        t["proj.bias"].clone(),
        device,
    )));
    Net {
        emb: emb.into(),
        proj: proj.into(),
    }
}

fn floats(t: Tensor<3>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

#[test]
fn a_file_as_the_reference_writes_it_loads_and_computes_its_output() {
    let device = Device::flex();
    let t = expected();
    // The layout under test, as the script wrote it.
    let raw = std::fs::read(fixture().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&raw).unwrap();
    let dtype = |k: &str| st.tensor(&format!("base_model.model.{k}")).unwrap().dtype();
    use safetensors::Dtype;
    assert_eq!(dtype("emb.rosa_spa.row_offs"), Dtype::I32);
    assert_eq!(dtype("emb.rosa_spa.col_idx"), Dtype::I16);
    assert_eq!(dtype("emb.rosa_spa.tr_row_idx"), Dtype::I16);
    assert_eq!(dtype("emb.rosa_spa.values"), Dtype::BF16);
    assert_eq!(dtype("proj.rosa_spa.values"), Dtype::F16);

    let model = RosaModel::from_pretrained(base(&device), &fixture(), &LoadOptions::default())
        .expect("peft-rosa's layout loads");
    let ids = Tensor::<2, Int>::from_data(t["input_ids"].clone(), &device);
    let got = floats(model.model().forward(ids.clone()));
    let want: Vec<f32> = t["output"].clone().convert::<f32>().try_to_vec().unwrap();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "output[{i}]: {g} vs {w}"
        );
    }

    // Saved again in our layout (int64 indices, f32 values, no transposed CSR), it loads to
    // the same model.
    let dir = tempfile::tempdir().unwrap();
    model
        .save_pretrained(dir.path(), &SaveOptions::default())
        .unwrap();
    let ours = peft_core::hf::read_tensors(&dir.path().join("adapter_model.safetensors")).unwrap();
    assert!(!ours.keys().any(|k| k.contains("tr_")));
    assert_eq!(
        ours["base_model.model.emb.rosa_spa.col_idx"].dtype(),
        burn::tensor::DType::I64
    );
    let again =
        RosaModel::from_pretrained(base(&device), dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(floats(again.model().forward(ids)), got);
}
