//! NF4, the 4-bit NormalFloat code of QLoRA, in bitsandbytes' storage format.
//!
//! A tensor is read flat (row-major) in blocks of `block` values (the last block may be shorter).
//! Each block stores its absolute maximum `absmax` and, per value, the index of the nearest of the
//! 16 code-book values to `x / absmax`; two indices share a byte, the first in the high nibble
//! (an odd count leaves the last low nibble 0). Reading back is `NF4[index] · absmax`.
//!
//! With double quantization the block maxima are stored as 8-bit codes too: their mean is taken
//! off (`offset`), the rest is quantized in blocks of 256 to bitsandbytes' signed dynamic 8-bit
//! code ([`dynamic_code`]) with one f32 scale per block. Reading back is
//! `dynamic[q] · absmax2 + offset`.
//!
//! The rounding rules are bitsandbytes' CPU path (0.50), checked against its own output in
//! `kernels/tests/quant.rs` (fixtures written by `kernels/fixtures/make_nf4_fixtures.py`): the
//! 4-bit index is the number of code-book midpoints below `x · (1 / absmax)` (a value on a
//! midpoint goes down; the tail block divides instead), bit for bit. The 8-bit index of double
//! quantization is the code value nearest `v / absmax2` (the first code value read as -1 while
//! searching, as bitsandbytes does; its stored value, -0.99297, is what reading back uses).
//! bitsandbytes' CPU search (a bucketed table lookup) returns a neighbour of the nearest value for
//! about 0.2 % of inputs lying close to a midpoint between two codes; we keep the nearest one (a
//! smaller error on that block maximum), and the test checks every such difference is one.

use super::QuantError;

/// The 16 NF4 values (QLoRA, appendix E; bitsandbytes' `get_4bit_type("nf4")`), ascending.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// QLoRA's block size for the 4-bit codes.
pub const NF4_BLOCK: usize = 64;

/// bitsandbytes' block size for the second level of double quantization.
pub const DQ_BLOCK: usize = 256;

/// The block maxima of an NF4 tensor: plain f32, or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// One 8-bit code per block ([`DoubleQuant`]).
    Double(DoubleQuant),
}

/// Double-quantized block maxima: `dynamic_code()[codes[i]] · scales[i / 256] + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per first-level block.
    pub codes: Vec<u8>,
    /// One scale per [`DQ_BLOCK`] codes.
    pub scales: Vec<f32>,
    /// The mean of the first-level maxima, taken off before quantizing them.
    pub offset: f32,
}

impl Absmax {
    /// The number of first-level blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }

    /// Whether there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The maximum of block `i`, as reading back uses it.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[i],
            Absmax::Double(d) => d.get(i),
        }
    }

    /// Every block maximum, decoded.
    pub fn decoded(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// Bytes this takes in memory (what a packed weight's size counts).
    pub fn size_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Double(d) => d.codes.len() + 4 * d.scales.len() + 4,
        }
    }
}

impl DoubleQuant {
    /// The first-level maximum of block `i`.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        dynamic_code()[self.codes[i] as usize] * self.scales[i / DQ_BLOCK] + self.offset
    }

    /// Quantizes block maxima as bitsandbytes' `quantize_4bit(compress_statistics=True)` does.
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset = torch_mean(absmax);
        let code = dynamic_code();
        let mut codes = Vec::with_capacity(absmax.len());
        let mut scales = Vec::with_capacity(absmax.len().div_ceil(DQ_BLOCK));
        for block in absmax.chunks(DQ_BLOCK) {
            let centred: Vec<f32> = block.iter().map(|&a| a - offset).collect();
            let scale = centred.iter().fold(f32::MIN, |m, &v| m.max(v.abs()));
            scales.push(scale);
            codes.extend(centred.iter().map(|&v| nearest_dynamic(code, v / scale)));
        }
        DoubleQuant {
            codes,
            scales,
            offset,
        }
    }
}

/// The f32 mean as torch's vectorised CPU sum computes it for short vectors: eight running lane
/// sums over whole groups of eight, added in lane order, then the rest one by one, divided by the
/// count. (torch's rounding depends on its reduction order; this is its order on AVX2 for the
/// lengths the fixtures check. Another order moves the offset by an ulp, which every block
/// maximum then carries: the quantized codes are unaffected.)
fn torch_mean(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    let mut lanes = [0f32; 8];
    let mut groups = values.chunks_exact(8);
    for group in &mut groups {
        for (lane, &v) in lanes.iter_mut().zip(group) {
            *lane += v;
        }
    }
    let mut sum = lanes.iter().fold(0f32, |s, &l| s + l);
    for &v in groups.remainder() {
        sum += v;
    }
    sum / values.len() as f32
}

/// The index of the code value nearest `x` by bitsandbytes' CPU rule: the last value at or below
/// `x` (with the first read as -1), unless the next one is strictly nearer.
fn nearest_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let search = |i: usize| if i == 0 { -1.0 } else { code[i] };
    // The last index whose value is <= x (0 when x is below every value or NaN).
    let (mut lo, mut hi) = (0usize, 255usize);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if search(mid) <= x {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut idx = lo;
    if idx < 255 && (x - search(idx + 1)).abs() < (x - search(idx)).abs() {
        idx += 1;
    }
    idx as u8
}

/// bitsandbytes' signed dynamic 8-bit code (`create_dynamic_map(signed=True)`), ascending: for
/// each exponent `e` in 0..7, the midpoints of `linspace(0.1, 1, 2^e + 1)` times `10^(e - 6)`,
/// both signs, plus 0 and 1 (`2^e + 1` points for `e < 7`; the last exponent's midpoints once more
/// for the extra items, none with 8 bits). Built once in f32 the way torch builds it.
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    CODE.get_or_init(|| {
        const MAX_EXPONENT_BITS: i32 = 7;
        let mut data: Vec<f32> = Vec::with_capacity(256);
        for i in 0..MAX_EXPONENT_BITS {
            let items = (1usize << i) + 1;
            let bounds = linspace_f32(0.1, 1.0, items);
            // Python's `10 ** (i - 6)`, correctly rounded (`powi` is not), then f32 as torch
            // multiplies an f32 tensor by a Python float.
            let factor = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i as usize] as f32;
            let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
            data.extend(means.iter().map(|&m| factor * m));
            data.extend(means.iter().map(|&m| -factor * m));
        }
        data.push(0.0);
        data.push(1.0);
        assert_eq!(data.len(), 256, "the signed dynamic code has 256 values");
        data.sort_by(f32::total_cmp);
        data.try_into().expect("256 values")
    })
}

/// torch's f32 `linspace(start, end, steps)`: `start + i·step` for the first half and
/// `end - (steps - 1 - i)·step` for the rest, `step = (end - start) / (steps - 1)` in f32, each
/// point one fused multiply-add (torch's vectorised kernel).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The 15 midpoints between neighbouring NF4 values, in f32 as bitsandbytes computes them.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The NF4 index of a value already scaled into [-1, 1]: how many midpoints lie below it.
#[inline]
fn index_of(scaled: f32, mids: &[f32; 15]) -> u8 {
    mids.iter().filter(|&&m| m < scaled).count() as u8
}

/// An NF4 tensor in bitsandbytes' layout: `packed` holds `len.div_ceil(2)` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4 {
    /// The 4-bit indices, two a byte, the first in the high nibble.
    pub packed: Vec<u8>,
    /// One maximum per block.
    pub absmax: Absmax,
    /// Values per block.
    pub block: usize,
    /// The number of values.
    pub len: usize,
}

impl Nf4 {
    /// Quantizes `values` (read flat) as `quantize_4bit(x, blocksize=block, quant_type="nf4",
    /// compress_statistics=double)` does. Non-finite values are refused.
    pub fn quantize(values: &[f32], block: usize, double: bool) -> Result<Self, QuantError> {
        if block == 0 || !block.is_multiple_of(2) {
            return Err(QuantError::BlockSize { block });
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite { at });
        }
        let mids = midpoints();
        let full = values.len() / block * block;
        let mut absmax = Vec::with_capacity(values.len().div_ceil(block));
        let mut indices = Vec::with_capacity(values.len() + 1);
        for (b, chunk) in values.chunks(block).enumerate() {
            let max = chunk.iter().fold(0f32, |m, &v| m.max(v.abs()));
            // bitsandbytes keeps a full block's maximum as it is (0 for a block of zeros) and
            // clamps only the divisor; a tail block's maximum is stored clamped.
            let divisor = max.max(1e-38);
            if b * block < full {
                absmax.push(max);
                let inv = 1.0 / divisor;
                indices.extend(
                    chunk
                        .iter()
                        .map(|&v| index_of((v * inv).clamp(-1.0, 1.0), &mids)),
                );
            } else {
                absmax.push(divisor);
                indices.extend(
                    chunk
                        .iter()
                        .map(|&v| index_of((v / divisor).clamp(-1.0, 1.0), &mids)),
                );
            }
        }
        if indices.len() % 2 != 0 {
            // bitsandbytes pads the scaled values with one 0.0, whose index is NF4's zero.
            indices.push(index_of(0.0, &mids));
        }
        let packed = indices
            .chunks_exact(2)
            .map(|p| (p[0] << 4) | p[1])
            .collect();
        let absmax = if double {
            Absmax::Double(DoubleQuant::quantize(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Nf4 {
            packed,
            absmax,
            block,
            len: values.len(),
        })
    }

    /// Reads every value back (`dequantize_4bit`).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        for (b, chunk) in out.chunks_mut(self.block).enumerate() {
            decode_into(&self.packed, b * self.block, self.absmax.get(b), chunk);
        }
        out
    }
}

/// Decodes `out.len()` values starting at flat position `first` (even) of `packed`, scaled by
/// `absmax`.
#[inline]
pub fn decode_into(packed: &[u8], first: usize, absmax: f32, out: &mut [f32]) {
    debug_assert!(first.is_multiple_of(2));
    let bytes = &packed[first / 2..(first + out.len()).div_ceil(2)];
    let mut pairs = out.chunks_exact_mut(2);
    for (pair, &byte) in (&mut pairs).zip(bytes) {
        pair[0] = NF4_CODE[(byte >> 4) as usize] * absmax;
        pair[1] = NF4_CODE[(byte & 0x0F) as usize] * absmax;
    }
    if let [last] = pairs.into_remainder() {
        *last = NF4_CODE[(bytes[bytes.len() - 1] >> 4) as usize] * absmax;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dynamic_code_is_sorted_with_zero_and_one_and_both_signs() {
        let code = dynamic_code();
        assert!(code.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(code[255], 1.0);
        assert!(code.contains(&0.0));
        assert_eq!(code.iter().filter(|&&v| v < 0.0).count(), 127);
    }

    #[test]
    fn nearest_dynamic_takes_the_nearer_neighbour_and_clamps_the_ends() {
        let code = dynamic_code();
        for i in 1..255usize {
            assert_eq!(nearest_dynamic(code, code[i]), i as u8, "exact value {i}");
        }
        assert_eq!(nearest_dynamic(code, -2.0), 0);
        assert_eq!(nearest_dynamic(code, 2.0), 255);
        let (a, b) = (code[200], code[201]);
        assert_eq!(nearest_dynamic(code, a + (b - a) * 0.4), 200);
        assert_eq!(nearest_dynamic(code, a + (b - a) * 0.6), 201);
    }

    #[test]
    fn every_code_value_quantizes_to_itself_and_an_odd_count_round_trips() {
        let values: Vec<f32> = NF4_CODE
            .iter()
            .chain([0.5f32, -0.25, 0.9].iter())
            .copied()
            .collect();
        let q = Nf4::quantize(&values, 64, false).unwrap();
        assert_eq!(q.packed.len(), 10);
        let back = q.dequantize();
        assert_eq!(&back[..16], &NF4_CODE);
        assert_eq!(back.len(), values.len());
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(matches!(
            Nf4::quantize(&[1.0], 63, false),
            Err(QuantError::BlockSize { .. })
        ));
        assert!(matches!(
            Nf4::quantize(&[1.0, f32::NAN], 64, false),
            Err(QuantError::NonFinite { at: 1 })
        ));
    }
}
