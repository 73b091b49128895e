//! GGUF reading: dequantization against the Python `gguf` package bit for bit, every malformed
//! file case giving its own error, the Hugging Face name mapping and Q/K un-permutation, and
//! SmolLM2-135M-Instruct loaded from its Q4_1 GGUF file against Transformers' logits.
//!
//! Fixtures: `fixtures/gguf/*.safetensors`, written by `fixtures/make_gguf_fixtures.py` (see
//! `fixtures/gguf/README.md`). The small GGUF files are built here, byte by byte.

use std::path::{Path, PathBuf};

use burn::nn::Linear;
use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_core::PeftLinear;
use peft_kernels::quant::PackedMatrix;
use peft_kernels::quant::ggml::GgmlBlock;
use peft_lora::LoraAdapter;
use peft_models::BaseFormat;
use peft_models::ModelError;
use peft_models::TensorSource;
use peft_models::gguf::{
    DequantizeError, GgmlType, GgufError, GgufFile, GgufTensors, GgufValue, dequantize,
    llama_config, load_llama, load_llama_as,
};
use safetensors::SafeTensors;

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/gguf")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn u8s(st: &SafeTensors, name: &str) -> (Vec<u8>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    (t.data().to_vec(), t.shape().to_vec())
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn i64s(st: &SafeTensors, name: &str) -> (Vec<i64>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::I64, "{name}");
    let v = t
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (v, t.shape().to_vec())
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

fn check_blocks(st: &SafeTensors, key: &str, ty: GgmlType) {
    let (raw, shape) = u8s(st, &format!("{key}.raw"));
    assert_eq!(shape[1], ty.type_size(), "{key}: block bytes");
    let expected = f32s(st, &format!("{key}.deq"));
    assert!(shape[0] >= 8, "{key}: {} blocks", shape[0]);
    // Block by block, so a mismatch names its block.
    for (b, (block, want)) in raw
        .chunks_exact(ty.type_size())
        .zip(expected.chunks_exact(ty.block_size()))
        .enumerate()
    {
        let got = dequantize(ty, block).unwrap();
        assert_eq!(got.len(), ty.block_size());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{key} block {b} element {i}: {g:e} ({:#010x}) vs Python gguf {w:e} ({:#010x})",
                g.to_bits(),
                w.to_bits()
            );
        }
    }
    // All blocks at once gives the same.
    let all = dequantize(ty, &raw).unwrap();
    assert!(
        all.iter()
            .zip(&expected)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

#[test]
fn dequantize_matches_python_gguf_bit_for_bit() {
    let bytes = fixture("dequant.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for ty in TYPES {
        check_blocks(&st, ty.name(), ty);
    }
    // The fixtures hold the awkward values: NaNs (signalling ones too), infinities, subnormals.
    let f16 = f32s(&st, "F16.deq");
    assert!(f16.iter().any(|v| v.is_nan()) && f16.iter().any(|v| v.is_infinite()));
    assert!(
        f16.iter().any(|v| v.to_bits() == 0x7f80_2000),
        "a signalling NaN kept as is"
    );
}

#[test]
fn dequantize_real_smollm2_blocks_bit_for_bit() {
    let bytes = fixture("dequant.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    check_blocks(&st, "smollm2.Q4_1", GgmlType::Q4_1);
    check_blocks(&st, "smollm2.Q8_0", GgmlType::Q8_0);
}

#[test]
fn dequantize_errors_name_the_type() {
    for ty in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::IQ4_NL,
        GgmlType::I32,
        GgmlType::Q8_K,
    ] {
        let err = dequantize(ty, &vec![0; ty.type_size()]).unwrap_err();
        assert_eq!(err, DequantizeError::Unsupported(ty));
        assert!(err.to_string().contains(ty.name()), "{err}");
    }
    // Through a file: the packed bytes are there, dequantizing names the tensor and the type.
    let g = small().tensor(T {
        name: "k2".into(),
        dims: vec![256],
        ty: GgmlType::Q2_K.id(),
        data: vec![7; 84],
        offset: None,
    });
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(g.write(dir.path(), "q2k.gguf")).unwrap();
    assert_eq!(f.tensor_bytes("k2").unwrap(), &[7; 84][..]);
    let err = f.dequantize("k2").unwrap_err();
    assert!(
        matches!(&err, GgufError::Dequantize { tensor, source: DequantizeError::Unsupported(GgmlType::Q2_K), .. } if tensor == "k2"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("Q2_K") && err.to_string().contains("k2"),
        "{err}"
    );
    let err = dequantize(GgmlType::Q4_K, &[0; 145]).unwrap_err();
    assert!(
        matches!(
            err,
            DequantizeError::Length {
                len: 145,
                type_size: 144,
                ..
            }
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A tiny GGUF writer
// ---------------------------------------------------------------------------------------------

/// A metadata value as written: type number and encoded bytes.
#[derive(Clone)]
struct Kv(u32, Vec<u8>);

fn s(v: &str) -> Vec<u8> {
    let mut b = (v.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(v.as_bytes());
    b
}

fn kv_u32(v: u32) -> Kv {
    Kv(4, v.to_le_bytes().to_vec())
}
fn kv_f32(v: f32) -> Kv {
    Kv(6, v.to_le_bytes().to_vec())
}
fn kv_str(v: &str) -> Kv {
    Kv(8, s(v))
}
fn kv_array(elem: u32, items: &[Vec<u8>]) -> Kv {
    let mut b = elem.to_le_bytes().to_vec();
    b.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for i in items {
        b.extend_from_slice(i);
    }
    Kv(9, b)
}

#[derive(Clone)]
struct T {
    name: String,
    dims: Vec<u64>,
    ty: u32,
    data: Vec<u8>,
    /// Written instead of the computed offset.
    offset: Option<u64>,
}

fn t_f32(name: &str, dims: &[u64], values: &[f32]) -> T {
    T {
        name: name.into(),
        dims: dims.to_vec(),
        ty: 0,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        offset: None,
    }
}

#[derive(Clone)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    /// Written instead of the real counts.
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
    kvs: Vec<(String, Kv)>,
    tensors: Vec<T>,
    alignment: u64,
}

impl Gguf {
    fn new() -> Self {
        Self {
            magic: *b"GGUF",
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs: Vec::new(),
            tensors: Vec::new(),
            alignment: 32,
        }
    }

    fn kv(mut self, key: &str, v: Kv) -> Self {
        self.kvs.push((key.into(), v));
        self
    }

    fn tensor(mut self, t: T) -> Self {
        self.tensors.push(t);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let pad = |b: &mut Vec<u8>| {
            while !(b.len() as u64).is_multiple_of(self.alignment) {
                b.push(0);
            }
        };
        let mut b = self.magic.to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        let n_t = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        b.extend_from_slice(&n_t.to_le_bytes());
        let n_kv = self.kv_count.unwrap_or(self.kvs.len() as u64);
        b.extend_from_slice(&n_kv.to_le_bytes());
        for (k, Kv(ty, v)) in &self.kvs {
            b.extend_from_slice(&s(k));
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(v);
        }
        let mut data = Vec::new();
        for t in &self.tensors {
            b.extend_from_slice(&s(&t.name));
            b.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.ty.to_le_bytes());
            b.extend_from_slice(&t.offset.unwrap_or(data.len() as u64).to_le_bytes());
            data.extend_from_slice(&t.data);
            pad(&mut data);
        }
        if !self.tensors.is_empty() {
            pad(&mut b);
        }
        b.extend_from_slice(&data);
        b
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write(dir, name, &self.bytes())
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A small valid file: a few metadata types and three tensors (F32, Q8_0, F16).
fn small() -> Gguf {
    let q8: Vec<u8> = (0..2u8)
        .flat_map(|b| {
            let mut blk = half_bits(0.5 + f32::from(b)).to_le_bytes().to_vec();
            blk.extend((0..32).map(|i: u8| i.wrapping_mul(7).wrapping_sub(100)));
            blk
        })
        .collect();
    Gguf::new()
        .kv("general.architecture", kv_str("test"))
        .kv("test.count", kv_u32(7))
        .kv("test.eps", kv_f32(1e-5))
        .kv("test.flag", Kv(7, vec![1]))
        .kv("test.neg", Kv(5, (-3i32).to_le_bytes().to_vec()))
        .kv("test.big", Kv(10, u64::MAX.to_le_bytes().to_vec()))
        .kv("test.f64", Kv(12, 2.5f64.to_le_bytes().to_vec()))
        .kv("test.words", kv_array(8, &[s("a"), s("bc"), s("")]))
        .kv("test.ints", kv_array(3, &[(-2i16).to_le_bytes().to_vec()]))
        .kv(
            "test.nested",
            kv_array(9, &[kv_array(0, &[vec![1], vec![2]]).1]),
        )
        .tensor(t_f32("a", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
        .tensor(T {
            name: "q".into(),
            dims: vec![32, 2],
            ty: 8,
            data: q8,
            offset: None,
        })
        .tensor(T {
            name: "h".into(),
            dims: vec![2],
            ty: 1,
            data: [half_bits(1.5), half_bits(-2.0)]
                .iter()
                .flat_map(|h| h.to_le_bytes())
                .collect(),
            offset: None,
        })
}

fn half_bits(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

fn open_err(g: &Gguf) -> GgufError {
    let dir = tempfile::tempdir().unwrap();
    let path = g.write(dir.path(), "bad.gguf");
    GgufFile::open(&path).expect_err("a malformed file must not open")
}

fn open_bytes_err(bytes: &[u8]) -> GgufError {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.gguf", bytes);
    let err = GgufFile::open(&path).expect_err("a malformed file must not open");
    assert!(
        err.to_string().contains("bad.gguf"),
        "error names the file: {err}"
    );
    err
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

#[test]
fn reads_metadata_and_tensors_of_versions_2_and_3() {
    let dir = tempfile::tempdir().unwrap();
    for version in [2, 3] {
        for alignment in [32u64, 64] {
            let mut g = small();
            g.version = version;
            if alignment != 32 {
                g = g.kv("general.alignment", kv_u32(alignment as u32));
                g.alignment = alignment;
            }
            let path = g.write(dir.path(), &format!("v{version}_{alignment}.gguf"));
            let f = GgufFile::open(&path).unwrap();
            assert_eq!(f.version(), version);
            assert_eq!(f.alignment(), alignment);
            assert_eq!(f.data_offset() % alignment, 0);
            let m = f.metadata();
            assert_eq!(m["general.architecture"], GgufValue::String("test".into()));
            assert_eq!(m["test.flag"], GgufValue::Bool(true));
            assert_eq!(
                m["test.words"],
                GgufValue::Array(vec![
                    GgufValue::String("a".into()),
                    GgufValue::String("bc".into()),
                    GgufValue::String(String::new())
                ])
            );
            assert_eq!(m["test.ints"], GgufValue::Array(vec![GgufValue::I16(-2)]));
            assert_eq!(
                m["test.nested"],
                GgufValue::Array(vec![GgufValue::Array(vec![
                    GgufValue::U8(1),
                    GgufValue::U8(2)
                ])])
            );
            assert_eq!(f.get_usize("test.count").unwrap(), 7);
            assert_eq!(f.get_u64("test.big").unwrap(), u64::MAX);
            assert_eq!(f.get_f64("test.eps").unwrap(), f64::from(1e-5f32));
            assert_eq!(f.get_f64("test.f64").unwrap(), 2.5);
            assert!(f.get_bool("test.flag").unwrap());
            assert_eq!(f.get_str("general.architecture").unwrap(), "test");
            assert_eq!(f.get_array("test.words").unwrap().len(), 3);

            let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["a", "q", "h"]);
            let a = f.tensor_info("a").unwrap();
            assert_eq!(
                (a.ggml_type, a.dims.clone(), a.shape()),
                (GgmlType::F32, vec![3, 2], vec![2, 3])
            );
            assert_eq!(f.dequantize("a").unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
            let q = f.tensor_info("q").unwrap();
            assert_eq!(
                (q.ggml_type, q.n_elements(), q.n_bytes()),
                (GgmlType::Q8_0, 64, 68)
            );
            assert_eq!(q.offset % alignment, 0);
            let raw = f.tensor_bytes("q").unwrap();
            assert_eq!(raw.len(), 68);
            assert_eq!(raw, &small().tensors[1].data[..]);
            let deq = f.dequantize("q").unwrap();
            assert_eq!(deq[1], (7i8.wrapping_sub(100)) as f32 * 0.5);
            assert_eq!(deq[33], (7i8.wrapping_sub(100)) as f32 * 1.5);
            assert_eq!(f.dequantize("h").unwrap(), [1.5, -2.0]);
            assert!(matches!(
                f.tensor_bytes("nope"),
                Err(GgufError::MissingTensor { name, .. }) if name == "nope"
            ));
        }
    }
}

#[test]
fn typed_getters_name_the_key_and_the_expected_type() {
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(small().write(dir.path(), "s.gguf")).unwrap();
    let cases: [(GgufError, &str, &str); 5] = [
        (
            f.get_u64("test.neg").unwrap_err(),
            "test.neg",
            "non-negative integer",
        ),
        (
            f.get_f64("test.count").unwrap_err(),
            "test.count",
            "a float",
        ),
        (
            f.get_str("test.words").unwrap_err(),
            "test.words",
            "a string",
        ),
        (f.get_bool("test.eps").unwrap_err(), "test.eps", "a boolean"),
        (
            f.get_array("general.architecture").unwrap_err(),
            "general.architecture",
            "an array",
        ),
    ];
    for (err, key, expected) in cases {
        assert!(matches!(err, GgufError::WrongValueType { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(key) && msg.contains(expected) && msg.contains("s.gguf"),
            "{msg}"
        );
    }
    assert!(
        f.get_u64("test.neg")
            .unwrap_err()
            .to_string()
            .contains("INT32 -3")
    );
    let err = f.get_usize("no.such.key").unwrap_err();
    assert!(
        matches!(&err, GgufError::MissingKey { key, .. } if key == "no.such.key"),
        "{err:?}"
    );
}

#[test]
fn bad_magic_and_unsupported_versions() {
    let mut g = small();
    g.magic = *b"GGML";
    let err = open_err(&g);
    assert!(
        matches!(&err, GgufError::BadMagic { found, .. } if found == b"GGML"),
        "{err:?}"
    );
    assert!(matches!(open_bytes_err(b"GG"), GgufError::BadMagic { .. }));
    assert!(matches!(open_bytes_err(b""), GgufError::BadMagic { .. }));
    for version in [1, 4, 3u32.swap_bytes()] {
        let mut g = small();
        g.version = version;
        let err = open_err(&g);
        assert!(
            matches!(err, GgufError::UnsupportedVersion { version: v, .. } if v == version),
            "{err:?}"
        );
    }
}

#[test]
fn truncated_files() {
    let bytes = small().bytes();
    // Inside the version, the tensor count, the key/value count, a key, a string array, a
    // tensor info. (A file cut so short that the counts of the header claim more than its
    // whole length is `AbsurdCount`; every cut here leaves room for them.)
    let at = |pat: &[u8]| bytes.windows(pat.len()).position(|w| w == pat).unwrap();
    // Tensor `a`'s info: name length 1, "a", 2 dimensions, 3 and 2 (after the metadata).
    let info_start = at(b"\x01\0\0\0\0\0\0\0a\x02\0\0\0\x03\0\0\0\0\0\0\0\x02");
    let words = at(b"test.words");
    let nested = at(b"test.nested");
    for cut in [
        6,
        10,
        20,
        words + 4,
        words + 30,
        nested + 20,
        info_start + 12,
        info_start + 20,
    ] {
        let err = open_bytes_err(&bytes[..cut]);
        assert!(
            matches!(err, GgufError::Truncated { .. }),
            "cut at {cut}: {err:?}"
        );
    }
    // A cut inside a fixed-size field is `Truncated`, naming what was read.
    let err = open_bytes_err(&bytes[..20]);
    assert!(
        matches!(&err, GgufError::Truncated { what, .. } if what.contains("key/value count")),
        "{err:?}"
    );
    let err = open_bytes_err(&bytes[..info_start + 20]);
    assert!(
        matches!(&err, GgufError::Truncated { what, .. } if what.contains("`a`")),
        "{err:?}"
    );
}

#[test]
fn tensor_data_past_the_end_of_the_file() {
    let bytes = small().bytes();
    // Cut inside the last tensor's data.
    let err = open_bytes_err(&bytes[..bytes.len() - 30]);
    assert!(
        matches!(&err, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "h"),
        "{err:?}"
    );
    // An offset far past the end, and one that overflows.
    for offset in [1 << 20, u64::MAX - 31] {
        let mut g = small();
        g.tensors[0].offset = Some(offset);
        let err = open_err(&g);
        assert!(
            matches!(&err, GgufError::TensorOutOfBounds { tensor, .. } if tensor == "a"),
            "{err:?}"
        );
    }
    // Dimensions whose byte size runs past the end.
    let mut g = small();
    g.tensors[0].dims = vec![3, 1 << 40];
    assert!(matches!(open_err(&g), GgufError::TensorOutOfBounds { .. }));
    // Dimensions whose product overflows.
    g.tensors[0].dims = vec![1 << 32, 1 << 32, 1 << 32];
    assert!(matches!(open_err(&g), GgufError::BadTensorShape { .. }));
    // A misaligned offset.
    let mut g = small();
    g.tensors[1].offset = Some(4);
    let err = open_err(&g);
    assert!(err.to_string().contains("alignment"), "{err}");
}

#[test]
fn unknown_tensor_type() {
    for id in [4, 31, 99, u32::MAX] {
        let mut g = small();
        g.tensors[0].ty = id;
        let err = open_err(&g);
        assert!(
            matches!(&err, GgufError::UnknownTensorType { tensor, type_id, .. } if tensor == "a" && *type_id == id),
            "{err:?}"
        );
    }
}

#[test]
fn element_count_not_a_whole_number_of_blocks() {
    let mut g = small();
    g.tensors[1].dims = vec![33, 2]; // Q8_0 rows of 33
    let err = open_err(&g);
    assert!(
        matches!(&err, GgufError::BadTensorShape { tensor, .. } if tensor == "q"),
        "{err:?}"
    );
    assert!(err.to_string().contains("block size 32"), "{err}");
    let mut g = small();
    g.tensors[0].dims = vec![1, 1, 1, 1, 6];
    assert!(matches!(open_err(&g), GgufError::BadTensorShape { .. }));
}

#[test]
fn absurd_counts_and_lengths() {
    let what = |g: &Gguf| match open_err(g) {
        GgufError::AbsurdCount { what, .. } => what,
        other => panic!("expected AbsurdCount, got {other:?}"),
    };
    let mut g = small();
    g.tensor_count = Some(u64::MAX);
    assert!(what(&g).contains("tensor count"));
    let mut g = small();
    g.tensor_count = Some(1 << 40);
    assert!(what(&g).contains("tensor count"));
    let mut g = small();
    g.kv_count = Some(u64::MAX / 2);
    assert!(what(&g).contains("key/value count"));
    // An array claiming more elements than the file has bytes.
    let mut long = kv_array(4, &[]);
    long.1[4..12].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let g = small().kv("test.long", long);
    assert!(what(&g).contains("test.long"));
    // A string value and a key with absurd lengths.
    let g = small().kv("test.s", Kv(8, u64::MAX.to_le_bytes().to_vec()));
    assert!(what(&g).contains("test.s"));
    let mut bytes = small().bytes();
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes()); // the first key's length
    assert!(matches!(
        open_bytes_err(&bytes),
        GgufError::AbsurdCount { .. }
    ));
}

#[test]
fn duplicate_names_and_other_format_errors() {
    let mut g = small();
    g.tensors[2].name = "a".into();
    let err = open_err(&g);
    assert!(
        matches!(&err, GgufError::DuplicateTensor { name, .. } if name == "a"),
        "{err:?}"
    );
    let g = small().kv("test.count", kv_u32(8));
    assert!(matches!(open_err(&g), GgufError::DuplicateKey { key, .. } if key == "test.count"));
    let g = small().kv("test.weird", Kv(13, vec![0; 8]));
    assert!(matches!(
        open_err(&g),
        GgufError::UnknownValueType { key, type_id: 13, .. } if key == "test.weird"
    ));
    let g = small().kv("test.b", Kv(7, vec![2]));
    assert!(matches!(open_err(&g), GgufError::Format { .. }));
    let mut bad = s("xx");
    bad[8] = 0xff;
    let g = small().kv("test.u", Kv(8, bad));
    assert!(open_err(&g).to_string().contains("UTF-8"));
    let g = small().kv("general.alignment", kv_u32(24));
    assert!(open_err(&g).to_string().contains("power of two"));
    // Arrays nested too deep.
    let mut v = kv_array(0, &[vec![1]]);
    for _ in 0..20 {
        v = kv_array(9, &[v.1]);
    }
    let g = small().kv("test.deep", v);
    assert!(open_err(&g).to_string().contains("nested"));
}

// ---------------------------------------------------------------------------------------------
// Names, layout and the LLaMA config
// ---------------------------------------------------------------------------------------------

/// A tiny `llama` file: hidden 8, 2 heads, 1 KV head (head_dim 4), 1 layer, vocab 5, F32.
fn tiny_llama(untied: bool) -> Gguf {
    let ramp = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
    let mut g = Gguf::new()
        .kv("general.architecture", kv_str("llama"))
        .kv("llama.context_length", kv_u32(64))
        .kv("llama.embedding_length", kv_u32(8))
        .kv("llama.block_count", kv_u32(1))
        .kv("llama.feed_forward_length", kv_u32(12))
        .kv("llama.attention.head_count", kv_u32(2))
        .kv("llama.attention.head_count_kv", kv_u32(1))
        .kv("llama.attention.layer_norm_rms_epsilon", kv_f32(1e-5))
        .kv("llama.rope.freq_base", kv_f32(500.0))
        .kv("llama.rope.dimension_count", kv_u32(4))
        .kv(
            "tokenizer.ggml.tokens",
            kv_array(8, &["a", "b", "c", "d", "e"].map(s)),
        )
        .tensor(t_f32("token_embd.weight", &[8, 5], &ramp(40, 0.7)))
        .tensor(t_f32("blk.0.attn_norm.weight", &[8], &ramp(8, 1.1)))
        .tensor(t_f32(
            "blk.0.attn_q.weight",
            &[8, 8],
            &(0..64).map(|v| v as f32).collect::<Vec<_>>(),
        ))
        .tensor(t_f32(
            "blk.0.attn_k.weight",
            &[8, 4],
            &(0..32).map(|v| v as f32).collect::<Vec<_>>(),
        ))
        .tensor(t_f32("blk.0.attn_v.weight", &[8, 4], &ramp(32, 0.3)))
        .tensor(t_f32("blk.0.attn_output.weight", &[8, 8], &ramp(64, 0.2)))
        .tensor(t_f32("blk.0.ffn_gate.weight", &[8, 12], &ramp(96, 0.5)))
        .tensor(t_f32("blk.0.ffn_up.weight", &[8, 12], &ramp(96, 0.9)))
        .tensor(t_f32("blk.0.ffn_down.weight", &[12, 8], &ramp(96, 1.3)))
        .tensor(t_f32("blk.0.ffn_norm.weight", &[8], &ramp(8, 0.4)))
        .tensor(t_f32("output_norm.weight", &[8], &ramp(8, 0.8)));
    if untied {
        g = g.tensor(t_f32("output.weight", &[8, 5], &ramp(40, 0.35)));
    }
    g
}

#[test]
fn tensor_source_maps_names_reverses_dims_and_unpermutes_q_k() {
    let dir = tempfile::tempdir().unwrap();
    let src =
        GgufTensors::new(GgufFile::open(tiny_llama(true).write(dir.path(), "l.gguf")).unwrap())
            .unwrap();
    let names = src.names();
    for n in [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    assert_eq!(names.len(), 12);
    assert_eq!(
        src.shape("model.layers.0.mlp.down_proj.weight"),
        Some(vec![8, 12])
    );
    assert_eq!(
        src.shape("model.layers.0.mlp.up_proj.weight"),
        Some(vec![12, 8])
    );
    assert_eq!(src.shape("blk.0.ffn_up.weight"), None);

    // Q: 2 heads of 4 rows; GGUF row 2i + j of a head is Hugging Face row j·2 + i.
    let q = src.read("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape().to_vec(), vec![8, 8]);
    let q = q.try_to_vec::<f32>().unwrap();
    let row = |v: &[f32], r: usize| v[r * 8];
    let q_rows: Vec<f32> = (0..8).map(|r| row(&q, r) / 8.0).collect();
    assert_eq!(q_rows, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    // K has one KV head of 4 rows.
    let k = src
        .read("model.layers.0.self_attn.k_proj.weight")
        .unwrap()
        .try_to_vec::<f32>()
        .unwrap();
    let k_rows: Vec<f32> = (0..4).map(|r| row(&k, r) / 8.0).collect();
    assert_eq!(k_rows, [0.0, 2.0, 1.0, 3.0]);
    // Other tensors keep their rows.
    let v = src.read("model.layers.0.self_attn.v_proj.weight").unwrap();
    let gguf_v = src.file().dequantize("blk.0.attn_v.weight").unwrap();
    assert_eq!(v.try_to_vec::<f32>().unwrap(), gguf_v);
    let err = src
        .read("model.layers.1.self_attn.q_proj.weight")
        .unwrap_err();
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
}

#[test]
fn llama_config_from_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let f = GgufFile::open(tiny_llama(false).write(dir.path(), "tied.gguf")).unwrap();
    let c = llama_config(&f).unwrap();
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (5, 8, 12, 1)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (2, 1, 4)
    );
    assert_eq!((c.rope_theta, c.max_position_embeddings), (500.0, 64));
    assert_eq!(c.rms_norm_eps, f64::from(1e-5f32));
    assert!(c.tie_word_embeddings && !c.attention_bias && !c.mlp_bias);
    let f = GgufFile::open(tiny_llama(true).write(dir.path(), "untied.gguf")).unwrap();
    assert!(!llama_config(&f).unwrap().tie_word_embeddings);

    let mut g = tiny_llama(false);
    g.kvs[0].1 = kv_str("gpt2");
    let f = GgufFile::open(g.write(dir.path(), "gpt2.gguf")).unwrap();
    let err = llama_config(&f).unwrap_err();
    assert!(err.to_string().contains("`gpt2`"), "{err}");
    let g = tiny_llama(false);
    let mut g2 = g.clone();
    g2.kvs.retain(|(k, _)| k != "llama.block_count");
    let f = GgufFile::open(g2.write(dir.path(), "nolayers.gguf")).unwrap();
    let err = llama_config(&f).unwrap_err();
    assert!(err.to_string().contains("llama.block_count"), "{err}");
}

#[test]
fn load_tiny_llama_tied_and_untied() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    for untied in [false, true] {
        let path = tiny_llama(untied).write(dir.path(), "m.gguf");
        let (model, config) = load_llama::<Linear>(&path, &device).unwrap();
        assert_eq!(model.lm_head.is_some(), untied);
        assert_eq!(config.vocab_size, 5);
        let ids = Tensor::<2, Int>::from_ints([[0, 3, 4, 1]], &device);
        let logits = model.forward(ids, None);
        assert_eq!(logits.dims(), [1, 4, 5]);
        let v = logits.into_data().try_to_vec::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        // The q_proj weight is the un-permuted one (burn stores the transpose).
        let q = model.model.layers[0]
            .self_attn
            .q_proj
            .weight
            .val()
            .transpose();
        let q = q.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(q[8], 16.0, "row 1 of q_proj is GGUF row 2");
    }
}

/// A ggml-block tensor (`dims` in GGUF order: the row length first) of `values`.
fn t_blocks(name: &str, dims: &[u64], block: GgmlBlock, values: &[f32]) -> T {
    let mut data = Vec::new();
    for chunk in values.chunks_exact(32) {
        block.encode(chunk, &mut data);
    }
    let ty = match block {
        GgmlBlock::Q4_0 => 2,
        GgmlBlock::Q4_1 => 3,
        GgmlBlock::Q8_0 => 8,
        GgmlBlock::F16 => 1,
        GgmlBlock::Bf16 => 30,
    };
    T {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
        data,
        offset: None,
    }
}

/// A one-layer LLaMA of hidden size 32 (two heads of 16, one key/value head), its projections
/// in `Q8_0` except Q and K (`Q4_1`, rows interleaved as llama.cpp writes them), down in `F16`,
/// the tied token table in `Q8_0`, norms in f32.
fn tiny_packed_llama() -> Gguf {
    let ramp = |n: usize, k: f32| {
        (0..n)
            .map(|i| (i as f32 * k).sin() * 0.3)
            .collect::<Vec<_>>()
    };
    Gguf::new()
        .kv("general.architecture", kv_str("llama"))
        .kv("llama.context_length", kv_u32(64))
        .kv("llama.embedding_length", kv_u32(32))
        .kv("llama.block_count", kv_u32(1))
        .kv("llama.feed_forward_length", kv_u32(64))
        .kv("llama.attention.head_count", kv_u32(2))
        .kv("llama.attention.head_count_kv", kv_u32(1))
        .kv("llama.attention.layer_norm_rms_epsilon", kv_f32(1e-5))
        .kv(
            "tokenizer.ggml.tokens",
            kv_array(8, &["a", "b", "c", "d", "e"].map(s)),
        )
        .tensor(t_blocks(
            "token_embd.weight",
            &[32, 5],
            GgmlBlock::Q8_0,
            &ramp(160, 0.7),
        ))
        .tensor(t_f32("blk.0.attn_norm.weight", &[32], &ramp(32, 1.1)))
        .tensor(t_blocks(
            "blk.0.attn_q.weight",
            &[32, 32],
            GgmlBlock::Q4_1,
            &ramp(1024, 0.13),
        ))
        .tensor(t_blocks(
            "blk.0.attn_k.weight",
            &[32, 16],
            GgmlBlock::Q4_1,
            &ramp(512, 0.29),
        ))
        .tensor(t_blocks(
            "blk.0.attn_v.weight",
            &[32, 16],
            GgmlBlock::Q8_0,
            &ramp(512, 0.31),
        ))
        .tensor(t_blocks(
            "blk.0.attn_output.weight",
            &[32, 32],
            GgmlBlock::Q8_0,
            &ramp(1024, 0.2),
        ))
        .tensor(t_blocks(
            "blk.0.ffn_gate.weight",
            &[32, 64],
            GgmlBlock::Q8_0,
            &ramp(2048, 0.5),
        ))
        .tensor(t_blocks(
            "blk.0.ffn_up.weight",
            &[32, 64],
            GgmlBlock::Q8_0,
            &ramp(2048, 0.9),
        ))
        .tensor(t_blocks(
            "blk.0.ffn_down.weight",
            &[64, 32],
            GgmlBlock::F16,
            &ramp(2048, 1.3),
        ))
        .tensor(t_f32("blk.0.ffn_norm.weight", &[32], &ramp(32, 0.4)))
        .tensor(t_f32("output_norm.weight", &[32], &ramp(32, 0.8)))
}

fn rel_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

#[test]
fn a_gguf_base_kept_packed_equals_the_dequantized_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_packed_llama().write(dir.path(), "p.gguf");
    let device = Device::flex();
    let ids = || Tensor::<2, Int>::from_ints([[0, 3, 4, 1, 2]], &device);
    let (dense, _) = load_llama::<Linear>(&path, &device).unwrap();
    let want = dense.forward(ids(), None);

    let (packed, _) =
        load_llama_as::<PeftLinear<LoraAdapter>>(&path, BaseFormat::Gguf, &device).unwrap();
    let attn = &packed.model.layers[0].self_attn;
    let formats: Vec<&str> = [&attn.q_proj, &attn.k_proj, &attn.v_proj]
        .iter()
        .chain([&packed.model.layers[0].mlp.down_proj].iter())
        .map(|l| l.packed.as_ref().expect("packed").format().name())
        .collect();
    assert_eq!(formats, ["Q4_1", "Q4_1", "Q8_0", "F16"]);
    assert_eq!(
        packed.model.packed_embed.as_ref().unwrap().format().name(),
        "Q8_0"
    );
    // Q and K rows are put back in Hugging Face's order, as the f32 path does.
    for (p, d) in [
        (&attn.q_proj, &dense.model.layers[0].self_attn.q_proj),
        (&attn.k_proj, &dense.model.layers[0].self_attn.k_proj),
    ] {
        let got = p.packed.as_ref().unwrap().dequantize();
        let want = d
            .weight
            .val()
            .transpose()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }
    let got = packed.forward(ids(), None);
    assert!(rel_diff(got, want.clone()) < 1e-5, "packed forward");

    // A plain `Linear` model dequantizes the blocks (the table stays packed): the same model.
    let (plain, _) = load_llama_as::<Linear>(&path, BaseFormat::Gguf, &device).unwrap();
    assert_eq!(
        plain.model.layers[0].self_attn.q_proj.weight.dims(),
        [32, 32]
    );
    assert!(
        rel_diff(plain.forward(ids(), None), want.clone()) < 1e-5,
        "plain forward"
    );

    // NF4 (double-quantized) linears, bf16 table: each layer equal to the NF4 quantization of
    // its f32 weight, and the packed model equal to its dequantized twin (`Linear` layers).
    let (nf4, _) =
        load_llama_as::<PeftLinear<LoraAdapter>>(&path, BaseFormat::Nf4 { double: true }, &device)
            .unwrap();
    let q = nf4.model.layers[0]
        .self_attn
        .q_proj
        .packed
        .as_ref()
        .unwrap();
    assert_eq!(q.format().name(), "nf4-dq");
    let w = dense.model.layers[0]
        .self_attn
        .q_proj
        .weight
        .val()
        .transpose();
    let w = w.into_data().try_to_vec::<f32>().unwrap();
    let reference = PackedMatrix::nf4(&w, 32, 32, true).unwrap().dequantize();
    assert_eq!(q.dequantize(), reference);
    assert_eq!(
        nf4.model.packed_embed.as_ref().unwrap().format().name(),
        "BF16"
    );
    let got = nf4.forward(ids(), None);
    let (twin, _) =
        load_llama_as::<Linear>(&path, BaseFormat::Nf4 { double: true }, &device).unwrap();
    assert!(
        rel_diff(got.clone(), twin.forward(ids(), None)) < 1e-5,
        "NF4 packed == dequantized"
    );
    assert!(rel_diff(got, want) > 1e-3, "NF4 rounds");
}

#[test]
fn a_gguf_base_needs_a_gguf_file_and_keepable_blocks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama/untied");
    let err = peft_models::llama::Llama::<PeftLinear<LoraAdapter>>::from_pretrained_as(
        &dir,
        BaseFormat::Gguf,
        &Device::flex(),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::Packing { .. }), "{err}");
    assert!(err.to_string().contains("needs a GGUF model"), "{err}");
    // Names parse back, and an unknown one lists them.
    for name in BaseFormat::NAMES {
        assert_eq!(name.parse::<BaseFormat>().unwrap().name(), name);
    }
    let bad = "int4".parse::<BaseFormat>().unwrap_err();
    assert!(bad.contains("nf4-dq") && bad.contains("int4"), "{bad}");
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 against Transformers
// ---------------------------------------------------------------------------------------------

#[test]
fn smollm2_from_gguf_matches_transformers_logits() {
    let path = peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"));
    let bytes = fixture("logits.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ids, shape) = i64s(&st, "input_ids");
    let (mask, _) = i64s(&st, "attention_mask");
    let (argmax, _) = i64s(&st, "argmax");
    let (cols, _) = i64s(&st, "cols");
    let (top_idx, top_shape) = i64s(&st, "top_idx");
    let want_cols = f32s(&st, "logits_cols");
    let want_top = f32s(&st, "top_val");
    let (batch, seq) = (shape[0], shape[1]);
    assert!(mask.contains(&0), "the batch is padded");

    let device = Device::flex();
    let rss_before = peak_rss_kib();
    let (model, config) = load_llama::<Linear>(&path, &device).unwrap();
    // Informational (the process's peak resident set, shared with the other tests when they run
    // in parallel): loading should peak near the f32 weights (135M · 4 bytes ≈ 540 MB).
    println!(
        "peak RSS before loading {rss_before:?} KiB, after {:?} KiB",
        peak_rss_kib()
    );
    assert_eq!(
        (
            config.vocab_size,
            config.hidden_size,
            config.num_hidden_layers
        ),
        (49152, 576, 30)
    );
    assert_eq!(
        (config.num_attention_heads, config.num_key_value_heads),
        (9, 3)
    );
    assert!(config.tie_word_embeddings);
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
    let mask_t = Tensor::<2, Int>::from_data(TensorData::new(mask.clone(), [batch, seq]), &device);
    let logits = model.forward(ids_t, Some(mask_t));
    let vocab = config.vocab_size;
    let logits = logits.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(logits.len(), batch * seq * vocab);

    let (n_cols, top) = (cols.len(), top_shape[2]);
    let mut worst = 0.0f32;
    let mut checked = 0;
    for b in 0..batch {
        for t in 0..seq {
            if mask[b * seq + t] == 0 {
                continue;
            }
            checked += 1;
            let row = &logits[(b * seq + t) * vocab..][..vocab];
            let got_argmax = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (i, &v)| if v > acc.1 { (i, v) } else { acc },
                )
                .0;
            assert_eq!(
                got_argmax as i64,
                argmax[b * seq + t],
                "argmax at ({b}, {t})"
            );
            let p = b * seq + t;
            for (k, &c) in cols.iter().enumerate() {
                let d = (row[c as usize] - want_cols[p * n_cols + k]).abs();
                worst = worst.max(d);
            }
            for k in 0..top {
                let c = top_idx[p * top + k] as usize;
                let d = (row[c] - want_top[p * top + k]).abs();
                worst = worst.max(d);
            }
        }
    }
    println!("SmolLM2 GGUF logits: max |diff| {worst:.2e} over {checked} positions");
    assert!(checked > seq, "both rows checked");
    assert!(worst < 2e-3, "max |logit diff| {worst}");
}

/// The process's peak resident set size (`VmHWM`), where `/proc` has it.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
