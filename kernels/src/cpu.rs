//! Outputs written without being zeroed first, whole ([`fill_uninit`]) or in parallel blocks
//! ([`par_fill_uninit`], one rayon task per block): the allocation every CPU kernel that
//! writes each output element exactly once starts from (a `memset` of a large output costs as
//! much as a pass of the kernel).
#![allow(unsafe_code)] // Both helpers' contract is the caller's to keep.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A `len`-element vector written by `fill`, which gets it uninitialised.
///
/// # Safety
/// `fill` must initialise every element of the slice it is given.
///
/// ```
/// // SAFETY: the closure writes every element.
/// let v = unsafe { peft_kernels::cpu::fill_uninit(3, |s| s.iter_mut().for_each(|x| { x.write(1.0f32); })) };
/// assert_eq!(v, vec![1.0; 3]);
/// ```
pub unsafe fn fill_uninit<T>(len: usize, fill: impl FnOnce(&mut [MaybeUninit<T>])) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: `fill` initialised the `len` elements (the caller's contract).
    unsafe { out.set_len(len) };
    out
}

/// A `len`-element vector written in blocks of `block` elements (the last one may be shorter),
/// one rayon task each: `fill(i, chunk)` gets block `i` (elements `i·block..`) uninitialised.
///
/// # Safety
/// `fill` must initialise every element of each chunk it is given.
///
/// # Panics
/// When `block` is 0 and `len` is not.
///
/// ```
/// // SAFETY: the closure writes every element of its chunk.
/// let v = unsafe {
///     peft_kernels::cpu::par_fill_uninit(5, 2, |i, chunk| {
///         chunk.iter_mut().for_each(|x| { x.write(i); });
///     })
/// };
/// assert_eq!(v, vec![0, 0, 1, 1, 2]);
/// ```
pub unsafe fn par_fill_uninit<T: Send>(
    len: usize,
    block: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(i, chunk)| fill(i, chunk));
    // SAFETY: the chunks cover `0..len` and `fill` initialised each one whole (the caller's
    // contract).
    unsafe { out.set_len(len) };
    out
}
