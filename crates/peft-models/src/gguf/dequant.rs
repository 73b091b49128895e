//! Dequantization of ggml blocks to f32, bit for bit as the Python `gguf` package
//! (`gguf.quants.dequantize`, ggml's reference).
//!
//! * Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the block decoders of `ggml-quants` 0.1.0 (checked bit for bit
//!   against the Python package by `tests/gguf.rs`).
//! * Q4_K, Q5_K, Q6_K: written here, because `ggml-quants` 0.1.0 leaves their `dequantize` as
//!   `todo!()` (it panics).
//! * F16: `half`, except NaNs: `half` (and x86's F16C instruction) set the quiet bit of a
//!   signalling NaN, numpy keeps the payload as it is, so NaNs are widened here.
//! * BF16: the 16 bits shifted into the top of an f32 (as numpy does; `half::bf16::to_f32` also
//!   quiets signalling NaNs).

use ggml_quants::{DeltaMin, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Quantize, f16};

use super::GgmlType;

/// Why blocks cannot be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantizeError {
    /// A type [`dequantize`] does not handle.
    #[error(
        "dequantizing ggml type {0} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are)"
    )]
    Unsupported(GgmlType),
    /// A byte length that is not a whole number of blocks.
    #[error("{len} bytes is not a whole number of {ggml_type} blocks of {type_size} bytes")]
    Length {
        /// The type.
        ggml_type: GgmlType,
        /// The byte length given.
        len: usize,
        /// Bytes per block.
        type_size: usize,
    },
}

/// Dequantize `bytes`, packed blocks of `ggml_type`, to f32 (`block_size` values per block, in
/// storage order).
///
/// # Errors
/// [`DequantizeError::Unsupported`] for a type other than F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
/// Q5_1, Q4_K, Q5_K and Q6_K; [`DequantizeError::Length`] when `bytes` is not a whole number of
/// blocks.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, DequantizeError> {
    let n = check(ggml_type, bytes)?;
    let mut out = vec![0.0f32; n];
    dequantize_into(ggml_type, bytes, &mut out)?;
    Ok(out)
}

/// The number of values in `bytes`, or why they cannot be dequantized.
fn check(ggml_type: GgmlType, bytes: &[u8]) -> Result<usize, DequantizeError> {
    decoder(ggml_type)?;
    let size = ggml_type.type_size();
    if !bytes.len().is_multiple_of(size) {
        return Err(DequantizeError::Length {
            ggml_type,
            len: bytes.len(),
            type_size: size,
        });
    }
    Ok(bytes.len() / size * ggml_type.block_size())
}

/// Dequantize whole blocks `bytes` into `out`, which must hold exactly their values.
pub(super) fn dequantize_into(
    ggml_type: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), DequantizeError> {
    let n = check(ggml_type, bytes)?;
    assert_eq!(out.len(), n, "output length");
    let decode = decoder(ggml_type)?;
    let (block, size) = (ggml_type.block_size(), ggml_type.type_size());
    for (b, o) in bytes.chunks_exact(size).zip(out.chunks_exact_mut(block)) {
        decode(b, o);
    }
    Ok(())
}

/// Decodes one block (its bytes) into its values.
type Decoder = fn(&[u8], &mut [f32]);

/// The decoder of one block of `ggml_type`.
fn decoder(ggml_type: GgmlType) -> Result<Decoder, DequantizeError> {
    Ok(match ggml_type {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        GgmlType::BF16 => {
            |b, o| o[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
        }
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        other => return Err(DequantizeError::Unsupported(other)),
    })
}

/// f16 → f32 as numpy's `astype(np.float32)`: exact for every value, NaN payloads kept.
fn f16_to_f32(bits: u16) -> f32 {
    if bits & 0x7c00 == 0x7c00 && bits & 0x03ff != 0 {
        let sign = u32::from(bits & 0x8000) << 16;
        f32::from_bits(sign | 0x7f80_0000 | (u32::from(bits & 0x03ff) << 13))
    } else {
        f16::from_bits(bits).to_f32()
    }
}

fn half(b: &[u8], at: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn half_f32(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn bytes<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn put(o: &mut [f32], v: [f32; 32]) {
    o.copy_from_slice(&v);
}

fn q8_0(b: &[u8], o: &mut [f32]) {
    let blk = Q8_0 {
        delta: half(b, 0),
        quants: bytes::<32>(&b[2..]).map(|x| x as i8),
    };
    put(o, blk.dequantize());
}

fn q4_0(b: &[u8], o: &mut [f32]) {
    let blk = Q4_0 {
        delta: half(b, 0),
        quants: bytes(&b[2..]),
    };
    put(o, blk.dequantize());
}

fn q4_1(b: &[u8], o: &mut [f32]) {
    let blk = Q4_1 {
        delta_min: DeltaMin {
            delta: half(b, 0),
            min: half(b, 2),
        },
        quants: bytes(&b[4..]),
    };
    put(o, blk.dequantize());
}

fn q5_0(b: &[u8], o: &mut [f32]) {
    let blk = Q5_0 {
        delta: half(b, 0),
        qh: bytes(&b[2..]),
        ql: bytes(&b[6..]),
    };
    put(o, blk.dequantize());
}

fn q5_1(b: &[u8], o: &mut [f32]) {
    let blk = Q5_1 {
        delta_min: DeltaMin {
            delta: half(b, 0),
            min: half(b, 2),
        },
        qh: bytes(&b[4..]),
        ql: bytes(&b[8..]),
    };
    put(o, blk.dequantize());
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) of a Q4_K/Q5_K super-block, from its 12
/// packed scale bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(sc), f32::from(m))
}

/// Q4_K: `d`, `dmin` (f16), 12 bytes of scales/minimums, 128 bytes of 4-bit values; eight
/// sub-blocks of 32, value = `d·sc·q − dmin·m`.
fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (half_f32(b, 0), half_f32(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, dm1, d2, dm2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let q = &qs[32 * g..32 * g + 32];
        let out = &mut o[64 * g..64 * g + 64];
        for l in 0..32 {
            out[l] = d1 * f32::from(q[l] & 0xf) - dm1;
            out[32 + l] = d2 * f32::from(q[l] >> 4) - dm2;
        }
    }
}

/// Q5_K: as Q4_K with a fifth bit per value from 32 bytes of high bits (bit `k` of `qh[l]` for
/// sub-block `k`).
fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (half_f32(b, 0), half_f32(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, dm1, d2, dm2) = (d * sc1, dmin * m1, d * sc2, dmin * m2);
        let q = &qs[32 * g..32 * g + 32];
        let out = &mut o[64 * g..64 * g + 64];
        for l in 0..32 {
            let lo = (q[l] & 0xf) | (((qh[l] >> (2 * g)) & 1) << 4);
            let hi = (q[l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4);
            out[l] = d1 * f32::from(lo) - dm1;
            out[32 + l] = d2 * f32::from(hi) - dm2;
        }
    }
}

/// Q6_K: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 signed 8-bit scales, `d` (f16);
/// sixteen sub-blocks of 16, value = `d·sc·(q − 32)`.
fn q6_k(b: &[u8], o: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = half_f32(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let out = &mut o[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let s = |k: usize| d * f32::from(sc[is + k] as i8);
            out[l] = s(0) * f32::from(q1);
            out[l + 32] = s(2) * f32::from(q2);
            out[l + 64] = s(4) * f32::from(q3);
            out[l + 96] = s(6) * f32::from(q4);
        }
    }
}
