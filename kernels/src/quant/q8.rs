//! Decoding-step products over ggml blocks with 8-bit activations, as llama.cpp computes them.
//!
//! A decoding step multiplies one activation row by every weight of the model. Unpacking each
//! 4-bit weight to f32 and multiplying it in floating point makes that step arithmetic-bound
//! (about 3x slower than llama.cpp on the same blocks). llama.cpp instead quantizes the activation
//! row once per product to blocks of 32 signed bytes with an f32 scale `d` and `s = d·Σq` (its
//! `Q8_1`), then takes integer dot products of the weight quants with the activation quants and
//! applies the float scales once per block:
//!
//! * `Q4_0`: `Σ (q−8)·d_w · p·d_x = d_w·d_x·Σ q·p − 8·d_w·s_x`
//! * `Q4_1`: `Σ (q·d_w + m) · p·d_x = d_w·d_x·Σ q·p + m·s_x`
//! * `Q8_0`: `Σ q·d_w · p·d_x = d_w·d_x·Σ q·p` (signed by signed)
//!
//! The integer sums run 32 products at a time: `vpdpbusd` (AVX-512 VNNI), `vpmaddubsw` +
//! `vpmaddwd` (AVX2), or a plain loop. The result differs from the f32 product by the activation's
//! rounding (at most `d_x/2` per value, `d_x = max|x|/127` over its block), which is why only
//! [`with_q8_activations`] scopes take this path: generation, where llama.cpp's numbers are the
//! reference. Training and loss evaluation keep f32 activations.

use std::cell::Cell;

use super::ggml::{GGML_BLOCK, GgmlBlock, f16_at};
use crate::cpu_body::CpuBody;

thread_local! {
    static Q8_ACTIVATIONS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with decoding-step products over `Q4_0` / `Q4_1` / `Q8_0` weights (at most a few input
/// rows) taking 8-bit activations on this thread (the thread that calls the backend's ops; the
/// product's own worker threads follow it). Nested scopes are allowed; the previous setting is
/// restored on return, also by a panic.
pub fn with_q8_activations<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            Q8_ACTIVATIONS.set(self.0);
        }
    }
    let _restore = Restore(Q8_ACTIVATIONS.replace(true));
    f()
}

/// Whether the calling thread is inside [`with_q8_activations`].
pub fn q8_activations() -> bool {
    Q8_ACTIVATIONS.get()
}

/// Whether the ggml format has an 8-bit-activation product.
pub const fn has_q8_product(kind: GgmlBlock) -> bool {
    matches!(kind, GgmlBlock::Q4_0 | GgmlBlock::Q4_1 | GgmlBlock::Q8_0)
}

/// Activation rows quantized to blocks of 32: `quants[b·32 + j]`, `d[b]`, `s[b] = d[b]·Σ quants`.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Rows {
    /// Signed quants, row after row.
    pub quants: Vec<i8>,
    /// Each block's scale `max|x| / 127` (0 for an all-zero block).
    pub d: Vec<f32>,
    /// Each block's `d · Σ quants`.
    pub s: Vec<f32>,
}

impl Q8Rows {
    /// Quantizes `x` (rows of whole blocks, one after the other) as ggml's `quantize_row_q8_1`:
    /// `d = max|x|/127`, `q = round(x/d)` (half away from zero).
    pub fn quantize(x: &[f32]) -> Q8Rows {
        assert_eq!(x.len() % GGML_BLOCK, 0, "rows of whole 32-value blocks");
        let blocks = x.len() / GGML_BLOCK;
        let mut out = Q8Rows {
            quants: vec![0; x.len()],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
        };
        for (b, (xs, qs)) in x
            .chunks_exact(GGML_BLOCK)
            .zip(out.quants.chunks_exact_mut(GGML_BLOCK))
            .enumerate()
        {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                *q = (v * id).round() as i8;
                sum += i32::from(*q);
            }
            out.d[b] = d;
            out.s[b] = d * sum as f32;
        }
        out
    }
}

/// `out[k·n + i] = row r0 + k · activation row i` for `count` weight rows of `per_row` blocks,
/// against the `n = x.d.len() / per_row` quantized activation rows.
pub fn rows_q8(
    kind: GgmlBlock,
    bytes: &[u8],
    r0: usize,
    count: usize,
    per_row: usize,
    x: &Q8Rows,
    out: &mut [f32],
) {
    assert!(has_q8_product(kind), "{} has no 8-bit product", kind.name());
    let bb = kind.block_bytes();
    let n = x.d.len() / per_row.max(1);
    assert_eq!(
        x.quants.len(),
        x.d.len() * GGML_BLOCK,
        "whole activation blocks"
    );
    assert_eq!(out.len(), count * n, "out holds count x n dots");
    assert!(
        bytes.len() >= (r0 + count) * per_row * bb,
        "rows inside the bytes"
    );
    let rows = &bytes[r0 * per_row * bb..(r0 + count) * per_row * bb];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each body runs only where `CpuBody::current` (the detected CPU, or a narrower
        // forced body) and runtime detection say its instructions exist; the slices' lengths
        // were checked above (`rows` holds `count` rows of `per_row` blocks, `x` holds `n` rows
        // of `per_row` blocks of 32 quants).
        #[allow(unsafe_code)]
        match (CpuBody::current(), x86::features()) {
            (
                CpuBody::Avx512,
                x86::Features {
                    vnni: true,
                    f16c: true,
                },
            ) => {
                return unsafe { x86::rows_vnni(kind, rows, per_row, x, out) };
            }
            (CpuBody::Avx512 | CpuBody::Avx2, x86::Features { f16c: true, .. }) => {
                return unsafe { x86::rows_avx2(kind, rows, per_row, x, out) };
            }
            _ => {}
        }
    }
    rows_portable(kind, rows, per_row, x, out);
}

/// The plain-Rust body (and the reference the SIMD bodies are tested against).
fn rows_portable(kind: GgmlBlock, rows: &[u8], per_row: usize, x: &Q8Rows, out: &mut [f32]) {
    let bb = kind.block_bytes();
    let n = x.d.len() / per_row.max(1);
    for (k, row) in rows.chunks_exact(per_row * bb).enumerate() {
        for i in 0..n {
            out[k * n + i] = row_dot_portable(kind, row, &x.row(i, per_row));
        }
    }
}

impl Q8Rows {
    /// Activation row `i` of rows of `per_row` blocks.
    fn row(&self, i: usize, per_row: usize) -> XBlocks<'_> {
        let blocks = i * per_row..(i + 1) * per_row;
        XBlocks {
            quants: &self.quants[blocks.start * GGML_BLOCK..blocks.end * GGML_BLOCK],
            d: &self.d[blocks.clone()],
            s: &self.s[blocks],
        }
    }
}

/// One activation row's blocks.
struct XBlocks<'a> {
    quants: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

/// A block's float term besides `d_w·d_x·Σq·p`, from its scale `d`, (`Q4_1`) minimum `m` and the
/// activation block's `s`: `−8·d·s` (`Q4_0`), `m·s` (`Q4_1`), none (`Q8_0`).
#[inline(always)]
fn offset(kind: GgmlBlock, d: f32, m: f32, s: f32) -> f32 {
    match kind {
        GgmlBlock::Q4_0 => -8.0 * d * s,
        GgmlBlock::Q4_1 => m * s,
        _ => 0.0,
    }
}

/// Where a block's quants start.
#[inline(always)]
const fn quants_at(kind: GgmlBlock) -> usize {
    match kind {
        GgmlBlock::Q4_1 => 4,
        _ => 2,
    }
}

/// One weight row (its bytes) dotted with one quantized activation row, in plain Rust.
fn row_dot_portable(kind: GgmlBlock, row: &[u8], x: &XBlocks<'_>) -> f32 {
    let bb = kind.block_bytes();
    let q0 = quants_at(kind);
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let p = &x.quants[b * GGML_BLOCK..(b + 1) * GGML_BLOCK];
        let isum: i32 = match kind {
            GgmlBlock::Q8_0 => blk[q0..q0 + GGML_BLOCK]
                .iter()
                .zip(p)
                .map(|(&q, &p)| i32::from(q as i8) * i32::from(p))
                .sum(),
            _ => (0..16)
                .map(|j| {
                    let q = blk[q0 + j];
                    i32::from(q & 0x0F) * i32::from(p[j]) + i32::from(q >> 4) * i32::from(p[j + 16])
                })
                .sum(),
        };
        let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
        acc += d * x.d[b] * isum as f32 + offset(kind, d, m, x.s[b]);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GGML_BLOCK, GgmlBlock, Q8Rows, XBlocks, offset, quants_at};

    /// The instructions the bodies need beyond their `CpuBody`.
    pub(super) struct Features {
        pub vnni: bool,
        pub f16c: bool,
    }

    pub(super) fn features() -> Features {
        Features {
            vnni: is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"),
            f16c: is_x86_feature_detected!("f16c"),
        }
    }

    /// The 32 weight quants of a block as unsigned bytes in value order, and the activation
    /// quants signed to match (`Q8_0`'s signed weights: `|w|` and `p·sign(w)`).
    #[inline(always)]
    unsafe fn operands(kind: GgmlBlock, blk: *const u8, p: *const i8) -> (__m256i, __m256i) {
        unsafe {
            let p = _mm256_loadu_si256(p.cast());
            if let GgmlBlock::Q8_0 = kind {
                let w = _mm256_loadu_si256(blk.cast());
                (_mm256_sign_epi8(w, w), _mm256_sign_epi8(p, w))
            } else {
                let packed = _mm_loadu_si128(blk.cast());
                let low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
                let high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
                (_mm256_set_m128i(high, low), p)
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }

    /// A block's f16 scale and (`Q4_1`) minimum as f32 (F16C).
    #[inline(always)]
    unsafe fn scales(blk: *const u8) -> (f32, f32) {
        unsafe {
            let halves = _mm_cvtsi32_si128(blk.cast::<i32>().read_unaligned());
            let f = _mm_cvtph_ps(halves);
            (_mm_cvtss_f32(f), _mm_cvtss_f32(_mm_movehdup_ps(f)))
        }
    }

    /// Every row against every activation row: per block, the 32-product integer sum
    /// `isum(w, p)` (eight lanes) scaled by `d_w·d_x` into eight float lanes, and the block's
    /// scalar offset (`−8·d_w·s_x` or `m·s_x`). Two blocks a step with two accumulators, so
    /// consecutive blocks do not wait for each other's sums.
    #[inline(always)]
    unsafe fn rows_with(
        kind: GgmlBlock,
        rows: &[u8],
        per_row: usize,
        x: &Q8Rows,
        out: &mut [f32],
        isum: impl Fn(__m256i, __m256i) -> __m256i,
    ) {
        let bb = kind.block_bytes();
        let q0 = quants_at(kind);
        let n = x.d.len() / per_row.max(1);
        let block = |blk: *const u8, xs: &XBlocks<'_>, b: usize, acc: __m256, extra: f32| unsafe {
            let (w, p) = operands(kind, blk.add(q0), xs.quants.as_ptr().add(b * GGML_BLOCK));
            let (d, m) = scales(blk);
            let scale = _mm256_set1_ps(d * xs.d[b]);
            let acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum(w, p)), acc);
            (acc, extra + offset(kind, d, m, xs.s[b]))
        };
        for (k, row) in rows.chunks_exact(per_row * bb).enumerate() {
            let base = row.as_ptr();
            for i in 0..n {
                let xs = x.row(i, per_row);
                unsafe {
                    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    let (mut e0, mut e1) = (0f32, 0f32);
                    let mut b = 0;
                    while b + 1 < per_row {
                        (a0, e0) = block(base.add(b * bb), &xs, b, a0, e0);
                        (a1, e1) = block(base.add((b + 1) * bb), &xs, b + 1, a1, e1);
                        b += 2;
                    }
                    if b < per_row {
                        (a0, e0) = block(base.add(b * bb), &xs, b, a0, e0);
                    }
                    out[k * n + i] = hsum(_mm256_add_ps(a0, a1)) + (e0 + e1);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2(
        kind: GgmlBlock,
        rows: &[u8],
        per_row: usize,
        x: &Q8Rows,
        out: &mut [f32],
    ) {
        // `vpmaddubsw` sums adjacent u8·i8 pairs into i16 without saturating (|w| ≤ 128, |p| ≤ 127:
        // at most 2·128·127 = 32,512), `vpmaddwd` adds pairs of those into i32.
        unsafe {
            rows_with(kind, rows, per_row, x, out, |w, p| {
                _mm256_madd_epi16(_mm256_maddubs_epi16(w, p), _mm256_set1_epi16(1))
            })
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn rows_vnni(
        kind: GgmlBlock,
        rows: &[u8],
        per_row: usize,
        x: &Q8Rows,
        out: &mut [f32],
    ) {
        unsafe {
            rows_with(kind, rows, per_row, x, out, |w, p| {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, p)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantizing_rounds_half_away_from_zero_and_keeps_the_block_sum() {
        let mut x = vec![0f32; 64];
        x[0] = 127.0;
        x[1] = 0.5;
        x[2] = -0.5;
        x[3] = -127.0;
        let q = Q8Rows::quantize(&x);
        assert_eq!(&q.quants[..4], &[127, 1, -1, -127]);
        assert_eq!((q.d[0], q.s[0]), (1.0, 0.0));
        assert_eq!((q.d[1], q.s[1]), (0.0, 0.0), "an all-zero block");
        assert!(q.quants[32..].iter().all(|&v| v == 0));
    }

    #[test]
    fn the_scope_is_restored_after_a_panic() {
        assert!(!q8_activations());
        let inner = std::panic::catch_unwind(|| {
            with_q8_activations(|| {
                assert!(q8_activations());
                panic!("inside");
            })
        });
        assert!(inner.is_err());
        assert!(!q8_activations());
    }
}
