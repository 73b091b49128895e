//! The packed 4-bit base: NF4 against bitsandbytes' own output bit for bit, the ggml block
//! decoders against the `ggml-quants` crate bit for bit, and the fused packed products against
//! "dequantize, then multiply" over random shapes and block tails.

use peft_kernels::quant::ggml::{GGML_BLOCK, GgmlBlock};
use peft_kernels::quant::nf4::{Absmax, DoubleQuant, NF4_BLOCK, Nf4, dynamic_code};
use peft_kernels::quant::{LowRank, PackedBytes, PackedFormat, PackedMatrix, QuantError};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use safetensors::SafeTensors;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/nf4.safetensors");

fn fixture() -> Vec<u8> {
    std::fs::read(FIXTURE).expect("fixtures/nf4.safetensors (make_nf4_fixtures.py)")
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name}"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn u8s(st: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name}"))
        .data()
        .to_vec()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const CASES: [(&str, bool); 5] = [
    ("aligned", false),
    ("tail", false),
    ("odd", false),
    ("aligned_dq", true),
    ("dq", true),
];

#[test]
fn nf4_quantize_and_dequantize_equal_bitsandbytes_bit_for_bit() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (name, double) in CASES {
        let x = f32s(&st, &format!("{name}.x"));
        let q = Nf4::quantize(&x, NF4_BLOCK, double).unwrap();
        assert_eq!(
            q.packed,
            u8s(&st, &format!("{name}.packed")),
            "{name}: packed codes"
        );
        let mut differing_blocks = vec![false; q.absmax.len()];
        match &q.absmax {
            Absmax::Plain(a) => {
                assert!(!double);
                assert_eq!(
                    bits(a),
                    bits(&f32s(&st, &format!("{name}.absmax"))),
                    "{name}: absmax"
                );
            }
            Absmax::Double(d) => {
                assert!(double);
                // bitsandbytes' codes, except where its bucketed search took a neighbour of the
                // nearest code value: there ours must be strictly nearer.
                let theirs = u8s(&st, &format!("{name}.qabsmax"));
                let maxima = block_maxima(&x);
                let code = dynamic_code();
                let mut differ = 0;
                for (i, (&ours, &bnb)) in d.codes.iter().zip(&theirs).enumerate() {
                    if ours != bnb {
                        differ += 1;
                        let z = (maxima[i] - d.offset) / d.scales[i / 256];
                        let dist = |c: u8| (z - code[c as usize]).abs();
                        assert!(
                            dist(ours) < dist(bnb),
                            "{name}: block {i}: code {ours} vs {bnb}"
                        );
                        assert_eq!(
                            i32::from(ours).abs_diff(i32::from(bnb)),
                            1,
                            "{name}: block {i}"
                        );
                    }
                }
                assert!(
                    differ * 100 <= theirs.len(),
                    "{name}: {differ} codes differ"
                );
                differing_blocks = d.codes.iter().zip(&theirs).map(|(a, b)| a != b).collect();
                assert_eq!(
                    bits(&d.scales),
                    bits(&f32s(&st, &format!("{name}.absmax2"))),
                    "{name}: second-level scales"
                );
                assert_eq!(
                    d.offset.to_bits(),
                    f32s(&st, &format!("{name}.offset"))[0].to_bits(),
                    "{name}: offset"
                );
            }
        }
        // Read back bit for bit, but for the blocks whose maximum took another 8-bit code.
        let ours = q.dequantize();
        let theirs = f32s(&st, &format!("{name}.dequant"));
        for (b, (o, t)) in ours
            .chunks(NF4_BLOCK)
            .zip(theirs.chunks(NF4_BLOCK))
            .enumerate()
        {
            if !differing_blocks[b] {
                assert_eq!(bits(o), bits(t), "{name}: values read back, block {b}");
            }
        }
    }
}

/// The absolute maximum of each block of 64.
fn block_maxima(x: &[f32]) -> Vec<f32> {
    x.chunks(NF4_BLOCK)
        .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect()
}

#[test]
fn nf4_reads_bitsandbytes_own_state_back_bit_for_bit() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (name, double) in CASES {
        let expected = f32s(&st, &format!("{name}.dequant"));
        let absmax = if double {
            Absmax::Double(DoubleQuant {
                codes: u8s(&st, &format!("{name}.qabsmax")),
                scales: f32s(&st, &format!("{name}.absmax2")),
                offset: f32s(&st, &format!("{name}.offset"))[0],
            })
        } else {
            Absmax::Plain(f32s(&st, &format!("{name}.absmax")))
        };
        let state = Nf4 {
            packed: u8s(&st, &format!("{name}.packed")),
            absmax,
            block: NF4_BLOCK,
            len: expected.len(),
        };
        assert_eq!(bits(&state.dequantize()), bits(&expected), "{name}");
    }
}

#[test]
fn the_dynamic_code_equals_bitsandbytes_table() {
    let bytes = fixture();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(bits(dynamic_code()), bits(&f32s(&st, "dq.code2")));
}

/// Random ggml blocks: a quantized random vector (what files hold) and, for the decoder's sake,
/// raw random bytes with finite scales.
fn random_blocks(kind: GgmlBlock, count: usize, rng: &mut StdRng) -> Vec<u8> {
    use ggml_quants::{Q4_0, Q4_1, Q8_0, Quantize};
    let mut out = Vec::with_capacity(count * kind.block_bytes());
    for i in 0..count {
        let start = out.len();
        if i % 2 == 0 {
            let mut v = [0f32; 32];
            let scale = rng.random_range(0.01f32..3.0);
            v.iter_mut()
                .for_each(|x| *x = rng.random_range(-1.0f32..1.0) * scale);
            match kind {
                GgmlBlock::Q4_0 => {
                    let b = Q4_0::quantize(&v);
                    out.extend_from_slice(&b.delta.to_bits().to_le_bytes());
                    out.extend_from_slice(&b.quants);
                }
                GgmlBlock::Q4_1 => {
                    let b = Q4_1::quantize(&v);
                    out.extend_from_slice(&b.delta_min.delta.to_bits().to_le_bytes());
                    out.extend_from_slice(&b.delta_min.min.to_bits().to_le_bytes());
                    out.extend_from_slice(&b.quants);
                }
                GgmlBlock::Q8_0 => {
                    let b = Q8_0::quantize(&v);
                    out.extend_from_slice(&b.delta.to_bits().to_le_bytes());
                    out.extend(b.quants.iter().map(|&q| q as u8));
                }
                GgmlBlock::F16 | GgmlBlock::Bf16 => kind.encode(&v, &mut out),
            }
        } else {
            let mut b: Vec<u8> = (0..kind.block_bytes()).map(|_| rng.random()).collect();
            // Finite f16 scales (and 16-bit values): clear the top exponent bit.
            b[1] &= 0b1011_1111;
            if kind == GgmlBlock::Q4_1 {
                b[3] &= 0b1011_1111;
            }
            if let GgmlBlock::F16 | GgmlBlock::Bf16 = kind {
                b.iter_mut()
                    .skip(1)
                    .step_by(2)
                    .for_each(|h| *h &= 0b1011_1111);
            }
            out.extend_from_slice(&b);
        }
        assert_eq!(out.len() - start, kind.block_bytes());
    }
    out
}

/// The blocks decoded by `ggml-quants` (what `peft-models` loads GGUF files with).
fn ggml_reference(kind: GgmlBlock, bytes: &[u8]) -> Vec<f32> {
    use ggml_quants::{DeltaMin, Q4_0, Q4_1, Q8_0, Quantize, f16};
    let half = |b: &[u8], at: usize| f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]));
    bytes
        .chunks_exact(kind.block_bytes())
        .flat_map(|b| match kind {
            GgmlBlock::Q4_0 => Q4_0 {
                delta: half(b, 0),
                quants: b[2..18].try_into().unwrap(),
            }
            .dequantize(),
            GgmlBlock::Q4_1 => Q4_1 {
                delta_min: DeltaMin {
                    delta: half(b, 0),
                    min: half(b, 2),
                },
                quants: b[4..20].try_into().unwrap(),
            }
            .dequantize(),
            GgmlBlock::Q8_0 => Q8_0 {
                delta: half(b, 0),
                quants: std::array::from_fn(|i| b[2 + i] as i8),
            }
            .dequantize(),
            // Not ggml-quants' formats: half's own conversions.
            GgmlBlock::F16 => std::array::from_fn(|i| half(b, 2 * i).to_f32()),
            GgmlBlock::Bf16 => std::array::from_fn(|i| {
                burn::tensor::bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32()
            }),
        })
        .collect()
}

#[test]
fn ggml_blocks_decode_as_ggml_quants_does_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(7);
    for kind in [
        GgmlBlock::Q4_0,
        GgmlBlock::Q4_1,
        GgmlBlock::Q8_0,
        GgmlBlock::F16,
        GgmlBlock::Bf16,
    ] {
        let (rows, cols) = (6, 4 * GGML_BLOCK);
        let bytes = random_blocks(kind, rows * cols / GGML_BLOCK, &mut rng);
        let expected = ggml_reference(kind, &bytes);
        let m = PackedMatrix::ggml(kind, bytes.into(), rows, cols).unwrap();
        assert_eq!(bits(&m.dequantize()), bits(&expected), "{}", kind.name());
    }
}

/// `x·Wᵀ + b` and `g·W` from the f32 matrix, accumulated in f64, with the scale each element's
/// rounding error is measured against (`Σ|a·b|`).
fn reference(
    a: &[f32],
    b: &[f32],
    (m, k, n): (usize, usize, usize),
    b_transposed: bool,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let bv = if b_transposed {
                    b[j * k + l]
                } else {
                    b[l * n + j]
                };
                let p = f64::from(a[i * k + l]) * f64::from(bv);
                out[i * n + j] += p;
                scale[i * n + j] += p.abs();
            }
        }
    }
    (out, scale)
}

fn assert_close(got: &[f32], (want, scale): &(Vec<f64>, Vec<f64>), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(
            err <= 1e-5 * (1.0 + s),
            "{what}: element {i}: {g} vs {w} (error {err:e})"
        );
    }
}

fn random(len: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

fn packed(format: PackedFormat, rows: usize, cols: usize, rng: &mut StdRng) -> PackedMatrix {
    match format {
        PackedFormat::Nf4 { double } => {
            let w = random(rows * cols, 0.2, rng);
            PackedMatrix::nf4(&w, rows, cols, double).unwrap()
        }
        PackedFormat::Ggml(kind) => {
            let bytes = random_blocks(kind, rows * cols / GGML_BLOCK, rng);
            PackedMatrix::ggml(kind, bytes.into(), rows, cols).unwrap()
        }
    }
}

const FORMATS: [PackedFormat; 7] = [
    PackedFormat::Nf4 { double: false },
    PackedFormat::Nf4 { double: true },
    PackedFormat::Ggml(GgmlBlock::Q4_0),
    PackedFormat::Ggml(GgmlBlock::Q4_1),
    PackedFormat::Ggml(GgmlBlock::Q8_0),
    PackedFormat::Ggml(GgmlBlock::F16),
    PackedFormat::Ggml(GgmlBlock::Bf16),
];

#[test]
fn packed_products_equal_dequantize_then_multiply_over_random_shapes() {
    let mut rng = StdRng::seed_from_u64(2026);
    for format in FORMATS {
        // Random small shapes (NF4 rows of any length, padded; ggml rows of whole blocks), then
        // shapes spanning several row tiles and column stripes.
        let mut shapes: Vec<(usize, usize, usize)> = (0..12)
            .map(|_| {
                let rows = rng.random_range(1..70);
                let cols = match format {
                    PackedFormat::Nf4 { .. } => rng.random_range(1..200),
                    PackedFormat::Ggml(_) => GGML_BLOCK * rng.random_range(1..6),
                };
                (rng.random_range(1..9), rows, cols)
            })
            .collect();
        shapes.extend([(5, 300, 640), (3, 1100, 96), (17, 40, 2048)]);
        for (n, rows, cols) in shapes {
            let w = packed(format, rows, cols, &mut rng);
            let dense = w.dequantize();
            let what = format!("{} [{rows}, {cols}] n {n}", format.name());
            let x = random(n * cols, 1.0, &mut rng);
            let bias = random(rows, 1.0, &mut rng);
            let (mut want, scale) = reference(&x, &dense, (n, cols, rows), true);
            assert_close(
                &w.forward(&x, n, None),
                &(want.clone(), scale.clone()),
                &format!("{what} forward"),
            );
            for (i, v) in want.iter_mut().enumerate() {
                *v += f64::from(bias[i % rows]);
            }
            assert_close(
                &w.forward(&x, n, Some(&bias)),
                &(want.clone(), scale.clone()),
                &format!("{what} forward + bias"),
            );
            // Plus a low-rank term `h·b` (`b`: `[r, rows]`), added tile by tile.
            let r = rng.random_range(1..20);
            let (h, b) = (
                random(n * r, 1.0, &mut rng),
                random(r * rows, 1.0, &mut rng),
            );
            let low = reference(&h, &b, (n, r, rows), false);
            let add = |(mut v, mut s): (Vec<f64>, Vec<f64>), (lv, ls): &(Vec<f64>, Vec<f64>)| {
                v.iter_mut().zip(lv).for_each(|(v, l)| *v += l);
                s.iter_mut().zip(ls).for_each(|(s, l)| *s += l);
                (v, s)
            };
            let low_rank = LowRank {
                h: &h,
                b: &b,
                rank: r,
            };
            assert_close(
                &w.forward_low_rank(&x, n, Some(&bias), Some(low_rank)),
                &add((want, scale), &low),
                &format!("{what} forward + bias + low rank {r}"),
            );
            let g = random(n * rows, 1.0, &mut rng);
            let want = reference(&g, &dense, (n, rows, cols), false);
            assert_close(
                &w.input_grad(&g, n),
                &want,
                &format!("{what} input gradient"),
            );
            // Plus `h·aᵀ` (`a`: `[cols, r]`), added stripe by stripe.
            let a = random(cols * r, 1.0, &mut rng);
            let low = reference(&h, &a, (n, r, cols), true);
            let low_rank = LowRank {
                h: &h,
                b: &a,
                rank: r,
            };
            assert_close(
                &w.input_grad_low_rank(&g, n, Some(low_rank)),
                &add(want, &low),
                &format!("{what} input gradient + low rank {r}"),
            );
        }
    }
}

#[test]
fn quantizing_in_a_ggml_format_equals_ggml_quants_and_reads_back_within_a_step() {
    let mut rng = StdRng::seed_from_u64(6);
    let (rows, cols) = (5, 96);
    let w = random(rows * cols, 1.0, &mut rng);
    for kind in [GgmlBlock::Q4_0, GgmlBlock::Q4_1, GgmlBlock::Q8_0] {
        let m = PackedMatrix::quantize(&w, rows, cols, PackedFormat::Ggml(kind)).unwrap();
        let back = m.dequantize();
        // Each block equals ggml-quants' own quantize-then-dequantize of the same 32 values.
        let mut bytes = Vec::new();
        for block in w.chunks_exact(GGML_BLOCK) {
            kind.encode(block, &mut bytes);
        }
        assert_eq!(
            bits(&back),
            bits(&ggml_reference(kind, &bytes)),
            "{}",
            kind.name()
        );
        let step = if kind == GgmlBlock::Q8_0 {
            1.0 / 127.0
        } else {
            2.0 / 15.0
        };
        for (i, (a, b)) in w.iter().zip(&back).enumerate() {
            assert!(
                (a - b).abs() <= step * 1.01,
                "{} value {i}: {a} vs {b}",
                kind.name()
            );
        }
    }
    let err = PackedMatrix::quantize(
        &w[..rows * 40],
        rows,
        40,
        PackedFormat::Ggml(GgmlBlock::Q4_1),
    );
    assert!(matches!(
        err,
        Err(QuantError::RowNotBlocked { cols: 40, .. })
    ));
}

#[test]
fn nf4_rows_are_padded_to_whole_blocks_and_read_back_per_row() {
    let mut rng = StdRng::seed_from_u64(3);
    let (rows, cols) = (3, 100);
    let w = random(rows * cols, 1.0, &mut rng);
    let m = PackedMatrix::nf4(&w, rows, cols, false).unwrap();
    // Each row is quantized on its own, as if it were a tensor of its own padded with zeros.
    let back = m.dequantize();
    for r in 0..rows {
        let mut row = w[r * cols..(r + 1) * cols].to_vec();
        row.resize(128, 0.0);
        let alone = Nf4::quantize(&row, NF4_BLOCK, false).unwrap().dequantize();
        assert_eq!(
            bits(&back[r * cols..(r + 1) * cols]),
            bits(&alone[..cols]),
            "row {r}"
        );
    }
    // 4 bits a value plus an f32 maximum per block of 64: 4.5 bits a stored value.
    assert_eq!(m.size_bytes(), rows * 128 / 2 + rows * 2 * 4);
}

#[test]
fn packed_sizes_are_the_formats_bits_per_weight() {
    let mut rng = StdRng::seed_from_u64(4);
    let (rows, cols) = (256, 1024);
    let bits_per = |m: &PackedMatrix| m.size_bytes() as f64 * 8.0 / (rows * cols) as f64;
    let w = random(rows * cols, 1.0, &mut rng);
    assert_eq!(
        bits_per(&PackedMatrix::nf4(&w, rows, cols, false).unwrap()),
        4.5
    );
    let dq = bits_per(&PackedMatrix::nf4(&w, rows, cols, true).unwrap());
    assert!(
        dq > 4.12 && dq < 4.13,
        "NF4 with double quantization: {dq} bits"
    );
    for (kind, want) in [
        (GgmlBlock::Q4_0, 4.5),
        (GgmlBlock::Q4_1, 5.0),
        (GgmlBlock::Q8_0, 8.5),
    ] {
        assert_eq!(
            bits_per(&packed(PackedFormat::Ggml(kind), rows, cols, &mut rng)),
            want
        );
    }
}

#[test]
fn permuting_rows_moves_whole_rows_in_every_format() {
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, cols) = (12, 320);
    let order: Vec<usize> = vec![3, 0, 11, 1, 2, 10, 4, 9, 5, 8, 6, 7];
    for format in FORMATS {
        let m = packed(format, rows, cols, &mut rng);
        let before = m.dequantize();
        let after = m.permute_rows(&order).unwrap().dequantize();
        for (i, &r) in order.iter().enumerate() {
            assert_eq!(
                bits(&after[i * cols..(i + 1) * cols]),
                bits(&before[r * cols..(r + 1) * cols]),
                "{} row {i}",
                format.name()
            );
        }
        assert!(matches!(
            m.permute_rows(&[0; 12]),
            Err(QuantError::NotAPermutation { rows: 12 })
        ));
    }
}

#[test]
fn malformed_packed_tensors_are_refused_with_their_shape() {
    let err = PackedMatrix::ggml(GgmlBlock::Q4_1, vec![0u8; 39].into(), 2, 32).unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::ByteLength {
                expected: 40,
                found: 39,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[2, 32]"), "{err}");
    let err = PackedMatrix::ggml(GgmlBlock::Q8_0, vec![0u8; 34].into(), 1, 33).unwrap_err();
    assert!(
        matches!(err, QuantError::RowNotBlocked { cols: 33, .. }),
        "{err}"
    );
    let err = PackedMatrix::nf4(&[0.0; 5], 2, 3, false).unwrap_err();
    assert!(
        matches!(err, QuantError::ValueCount { found: 5, .. }),
        "{err}"
    );
    let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(vec![0u8; 8]);
    assert!(matches!(
        PackedBytes::new(owner, 4..12),
        Err(QuantError::ByteRange { len: 8, .. })
    ));
}

#[test]
fn sixteen_bit_blocks_round_to_nearest_and_gather_rows_decodes_only_the_rows_asked() {
    let mut rng = StdRng::seed_from_u64(16);
    let (rows, cols) = (7, 3 * GGML_BLOCK);
    let w = random(rows * cols, 2.0, &mut rng);
    for kind in [GgmlBlock::F16, GgmlBlock::Bf16] {
        let m = PackedMatrix::quantize(&w, rows, cols, PackedFormat::Ggml(kind)).unwrap();
        assert_eq!(m.size_bytes(), rows * cols * 2, "{}", kind.name());
        let want: Vec<f32> = w
            .iter()
            .map(|&v| match kind {
                GgmlBlock::F16 => burn::tensor::f16::from_f32(v).to_f32(),
                _ => burn::tensor::bf16::from_f32(v).to_f32(),
            })
            .collect();
        assert_eq!(bits(&m.dequantize()), bits(&want), "{}", kind.name());
    }
    for format in FORMATS {
        let cols = if matches!(format, PackedFormat::Nf4 { .. }) {
            100
        } else {
            cols
        };
        let m = packed(format, rows, cols, &mut rng);
        let all = m.dequantize();
        let ids = [6, 0, 3, 3];
        let got = m.gather_rows(&ids);
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&r| all[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        assert_eq!(bits(&got), bits(&want), "{}", format.name());
    }
}

/// Decoding steps inside `with_q8_activations` take llama.cpp's arithmetic: the activation row
/// quantized to 8-bit blocks (`Q8Rows`), integer block dots, float scales per block. Every CPU
/// body equals "dequantize both, then multiply" in f64 to 1e-5, and the result stays within the
/// activation rounding's bound of the f32 product (and, to show the path is taken, further from
/// it than the f32 path's 1e-5); outside the scope the same call keeps f32 activations.
#[test]
fn decoding_steps_in_a_q8_scope_take_8_bit_activations_on_every_cpu_body() {
    use peft_kernels::cpu_body::for_each_cpu_body;
    use peft_kernels::quant::q8::{Q8Rows, q8_activations, with_q8_activations};
    let mut rng = StdRng::seed_from_u64(88);
    for kind in [GgmlBlock::Q4_0, GgmlBlock::Q4_1, GgmlBlock::Q8_0] {
        for (n, rows, blocks) in [
            (1, 1, 1),
            (1, 300, 18),
            (2, 70, 5),
            (4, 129, 48),
            (3, 64, 3),
        ] {
            let cols = blocks * GGML_BLOCK;
            let w = packed(PackedFormat::Ggml(kind), rows, cols, &mut rng);
            let dense = w.dequantize();
            let x = random(n * cols, 2.0, &mut rng);
            let bias = random(rows, 1.0, &mut rng);
            let q = Q8Rows::quantize(&x);
            let xq: Vec<f32> = q
                .quants
                .iter()
                .enumerate()
                .map(|(j, &v)| f32::from(v) * q.d[j / GGML_BLOCK])
                .collect();
            let (mut want, scale) = reference(&xq, &dense, (n, cols, rows), true);
            for (i, v) in want.iter_mut().enumerate() {
                *v += f64::from(bias[i % rows]);
            }
            let (mut exact, _) = reference(&x, &dense, (n, cols, rows), true);
            for (i, v) in exact.iter_mut().enumerate() {
                *v += f64::from(bias[i % rows]);
            }
            // |x − x_q| ≤ d/2 per value: the bound of each output's distance from the f32 product.
            let bound: Vec<f64> = (0..n * rows)
                .map(|o| {
                    let (i, r) = (o / rows, o % rows);
                    (0..cols)
                        .map(|c| {
                            f64::from(q.d[(i * cols + c) / GGML_BLOCK]) / 2.0
                                * f64::from(dense[r * cols + c]).abs()
                        })
                        .sum::<f64>()
                })
                .collect();
            let what = format!("{} [{rows}, {cols}] n {n}", kind.name());
            let outside = w.forward(&x, n, Some(&bias));
            assert_close(
                &outside,
                &(exact.clone(), scale.clone()),
                &format!("{what} f32 path"),
            );
            let mut farthest = 0f64;
            for_each_cpu_body(|body| {
                let got = with_q8_activations(|| {
                    assert!(q8_activations());
                    w.forward(&x, n, Some(&bias))
                });
                assert_close(
                    &got,
                    &(want.clone(), scale.clone()),
                    &format!("{what} {body:?}"),
                );
                for (o, (&g, &e)) in got.iter().zip(&exact).enumerate() {
                    let err = (f64::from(g) - e).abs();
                    assert!(
                        err <= bound[o] * 1.001 + 1e-5 * (1.0 + scale[o]),
                        "{what}: {o}"
                    );
                    farthest = farthest.max(err / (1.0 + scale[o]));
                }
            });
            if rows * blocks > 100 {
                assert!(farthest > 1e-5, "{what}: the 8-bit path was not taken");
            }
            assert!(!q8_activations());
        }
    }
}
