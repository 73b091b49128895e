//! GGUF's own 4- and 8-bit blocks (ggml `Q4_0`, `Q4_1`, `Q8_0`), read in place, and its 16-bit
//! types (`F16`, `BF16`) in blocks of 32 values, so that a 16-bit base stays at 16 bits.
//!
//! Each block holds 32 consecutive values of a row: an f16 scale `d` (and for Q4_1 an f16 minimum
//! `m`) followed by the quants. Q4_0 and Q4_1 store 16 bytes of nibbles: value `j < 16` is the low
//! nibble of byte `j`, value `j + 16` its high nibble; Q4_0 reads `(q - 8)·d`, Q4_1 `q·d + m`.
//! Q8_0 stores 32 signed bytes and reads `q·d`. These decoders equal the `ggml-quants` crate's
//! (which `peft-models` loads GGUF files with) bit for bit (`kernels/tests/quant.rs`).

use burn::tensor::{bf16, f16};

/// Values per block in all three formats.
pub const GGML_BLOCK: usize = 32;

/// The ggml block formats a packed weight can keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlBlock {
    /// `d`, 16 bytes of nibbles, `(q - 8)·d`: 18 bytes per 32 values (4.5 bits a value).
    Q4_0,
    /// `d`, `m`, 16 bytes of nibbles, `q·d + m`: 20 bytes per 32 values (5 bits a value).
    Q4_1,
    /// `d`, 32 signed bytes, `q·d`: 34 bytes per 32 values (8.5 bits a value).
    Q8_0,
    /// IEEE half precision, 32 values of 2 bytes (ggml's `F16`; no scale).
    F16,
    /// bfloat16, 32 values of 2 bytes (ggml's `BF16`: the top half of an f32).
    Bf16,
}

impl GgmlBlock {
    /// Bytes per block of [`GGML_BLOCK`] values.
    pub const fn block_bytes(self) -> usize {
        match self {
            GgmlBlock::Q4_0 => 18,
            GgmlBlock::Q4_1 => 20,
            GgmlBlock::Q8_0 => 34,
            GgmlBlock::F16 | GgmlBlock::Bf16 => 64,
        }
    }

    /// ggml's name of the format.
    pub const fn name(self) -> &'static str {
        match self {
            GgmlBlock::Q4_0 => "Q4_0",
            GgmlBlock::Q4_1 => "Q4_1",
            GgmlBlock::Q8_0 => "Q8_0",
            GgmlBlock::F16 => "F16",
            GgmlBlock::Bf16 => "BF16",
        }
    }

    /// Quantizes 32 values into one block as ggml does (`ggml-quants`' quantizers), appending
    /// its `block_bytes()` bytes to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        use ggml_quants::{Q4_0, Q4_1, Q8_0, Quantize};
        let v: &[f32; GGML_BLOCK] = values.try_into().expect("32 values per block");
        match self {
            GgmlBlock::Q4_0 => {
                let b = Q4_0::quantize(v);
                out.extend_from_slice(&b.delta.to_bits().to_le_bytes());
                out.extend_from_slice(&b.quants);
            }
            GgmlBlock::Q4_1 => {
                let b = Q4_1::quantize(v);
                out.extend_from_slice(&b.delta_min.delta.to_bits().to_le_bytes());
                out.extend_from_slice(&b.delta_min.min.to_bits().to_le_bytes());
                out.extend_from_slice(&b.quants);
            }
            GgmlBlock::Q8_0 => {
                let b = Q8_0::quantize(v);
                out.extend_from_slice(&b.delta.to_bits().to_le_bytes());
                out.extend(b.quants.iter().map(|&q| q as u8));
            }
            GgmlBlock::F16 => {
                out.extend(v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()));
            }
            GgmlBlock::Bf16 => {
                out.extend(v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()));
            }
        }
    }

    /// Decodes one block (`block_bytes()` bytes) into 32 values.
    #[inline(always)]
    pub fn decode(self, b: &[u8], out: &mut [f32]) {
        let out: &mut [f32; GGML_BLOCK] = out.try_into().expect("32 outputs per block");
        match self {
            GgmlBlock::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    out[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    out[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlBlock::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                for j in 0..16 {
                    out[j] = (qs[j] & 0x0F) as f32 * d + m;
                    out[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
            GgmlBlock::Q8_0 => {
                let d = f16_at(b, 0);
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = q as i8 as f32 * d;
                }
            }
            GgmlBlock::F16 => {
                for (o, v) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_le_bytes([v[0], v[1]]).to_f32();
                }
            }
            GgmlBlock::Bf16 => {
                for (o, v) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([v[0], v[1]]).to_f32();
                }
            }
        }
    }
}

/// The little-endian f16 at byte `at` of a block: its scale `d` at 0, `Q4_1`'s minimum `m` at 2.
#[inline(always)]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32_const()
}
