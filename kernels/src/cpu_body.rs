//! Which compiled body the dispatching CPU kernels run: the widest one this CPU supports, or a
//! narrower one forced for a test, so that every body is tested on every machine that has it
//! (an AVX-512 machine runs the AVX-512, AVX2 and portable bodies). [`multiversion!`](crate::multiversion) compiles a
//! loop once per body and runs the current one.
//!
//! ```
//! use peft_kernels::cpu_body::{CpuBody, for_each_cpu_body};
//!
//! let mut seen = Vec::new();
//! for_each_cpu_body(|body| seen.push(body));
//! assert_eq!(seen.last(), Some(&CpuBody::Portable));
//! assert_eq!(CpuBody::current(), seen[0]);
//! ```

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

/// A compiled body of the CPU kernels, from the narrowest to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuBody {
    /// The baseline x86-64 (or any other architecture) code.
    Portable,
    /// Compiled for AVX2 and FMA.
    Avx2,
    /// Compiled for (or written in) AVX-512F.
    Avx512,
}

/// The forced body plus one (0: none forced); read by every dispatch, so rayon's worker threads
/// see it too.
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Serialises [`with_cpu_body`] calls (tests run in parallel threads).
static FORCING: Mutex<()> = Mutex::new(());

const BODIES: [CpuBody; 3] = [CpuBody::Portable, CpuBody::Avx2, CpuBody::Avx512];

impl CpuBody {
    /// The widest body this CPU can run.
    pub fn detected() -> CpuBody {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return CpuBody::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return CpuBody::Avx2;
            }
        }
        CpuBody::Portable
    }

    /// The body the kernels run now: [`detected`](Self::detected), or the forced one. Never
    /// wider than the CPU supports, so a kernel may call the body it names.
    pub fn current() -> CpuBody {
        let detected = Self::detected();
        match FORCED.load(Ordering::Relaxed) {
            0 => detected,
            forced => BODIES[usize::from(forced - 1)].min(detected),
        }
    }

    /// Every body this CPU can run, the widest first.
    pub fn supported() -> Vec<CpuBody> {
        let detected = Self::detected();
        BODIES
            .into_iter()
            .rev()
            .filter(|b| *b <= detected)
            .collect()
    }
}

thread_local! {
    /// Whether this thread is inside [`with_cpu_body`] (a nested call would wait on itself).
    static FORCING_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every dispatching kernel limited to `body`, process-wide (worker threads
/// included); calls from several threads run one at a time.
///
/// # Panics
/// When this CPU cannot run `body`, or when called inside `f` (not reentrant).
pub fn with_cpu_body<R>(body: CpuBody, f: impl FnOnce() -> R) -> R {
    assert!(
        body <= CpuBody::detected(),
        "this CPU cannot run the {body:?} body"
    );
    assert!(
        !FORCING_HERE.get(),
        "with_cpu_body is not reentrant: force one body at a time"
    );
    let _serial = FORCING.lock().unwrap_or_else(|e| e.into_inner());
    /// Clears the forced body when `f` returns or panics.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            FORCED.store(0, Ordering::Relaxed);
            FORCING_HERE.set(false);
        }
    }
    let index = BODIES.iter().position(|b| *b == body).unwrap_or(0);
    FORCED.store(index as u8 + 1, Ordering::Relaxed);
    FORCING_HERE.set(true);
    let _reset = Reset;
    f()
}

/// Runs `check` once per body this CPU supports (widest first), each under
/// [`with_cpu_body`], and prints which body each run used.
pub fn for_each_cpu_body(mut check: impl FnMut(CpuBody)) {
    for body in CpuBody::supported() {
        println!("CPU kernels: {body:?} body");
        with_cpu_body(body, || check(body));
    }
}

/// Defines each `fn` compiled three times, for AVX-512 (with AVX2 and FMA), for AVX2+FMA and
/// for the baseline, and running the one [`CpuBody::current`] names (x86-64; the baseline
/// elsewhere). The bodies are plain safe Rust that the compiler vectorises for each target.
///
/// ```
/// peft_kernels::multiversion! {
///     pub fn dot(a: &[f32], b: &[f32]) -> f32 {
///         a.iter().zip(b).map(|(x, y)| x * y).sum()
///     }
/// }
/// let mut seen = Vec::new();
/// peft_kernels::cpu_body::for_each_cpu_body(|_| seen.push(dot(&[1.0, 2.0], &[3.0, 4.0])));
/// assert!(seen.iter().all(|d| *d == 11.0));
/// ```
#[macro_export]
macro_rules! multiversion {
    ($($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block)*) => {$(
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            match $crate::cpu_body::CpuBody::current() {
                // SAFETY: `current` is never wider than the CPU's detected features, and
                // `avx512` only requires AVX-512F, AVX2 and FMA.
                $crate::cpu_body::CpuBody::Avx512 => return unsafe { avx512($($arg),*) },
                // SAFETY: as above; `avx2` only requires AVX2 and FMA.
                $crate::cpu_body::CpuBody::Avx2 => return unsafe { avx2($($arg),*) },
                $crate::cpu_body::CpuBody::Portable => {}
            }
            generic($($arg),*)
        }
    )*};
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forcing the detected body changes nothing for the other tests of this binary.
    #[test]
    #[should_panic(expected = "not reentrant")]
    fn a_nested_call_panics_instead_of_waiting_on_itself() {
        let body = CpuBody::detected();
        with_cpu_body(body, || with_cpu_body(body, || ()));
    }

    #[test]
    fn the_forced_body_is_current_until_the_call_returns() {
        let widest = CpuBody::detected();
        let seen = with_cpu_body(widest, CpuBody::current);
        assert_eq!((seen, CpuBody::current()), (widest, widest));
        assert_eq!(CpuBody::supported().last(), Some(&CpuBody::Portable));
    }
}
