//! SpMM and SDDMM against the dense matmul of the same shape, measured in the same run.
//!
//! `cargo bench -p sparse-kernels` (add `--features x86-v4` for flex's AVX-512 gemm in the dense
//! baseline). Shapes: LLaMA-like weights `S = [out, in]` of 4096x4096 and 4096x11008 with 512 and
//! 2048 tokens, BERT-like 384x1536 with 2048 tokens; densities 0.1 %, 0.5 %, 1 %, 5 %.
//! - SpMM: the adapter forward `y = x·Sᵀ` (`sparse_linear`), vs dense `x·W`, `W = [in, out]`.
//! - SDDMM: the adapter gradient `dS = (dYᵀ·X)` on S's entries (`sddmm(S, dYᵀ, Xᵀ)`), vs the
//!   dense weight gradient `dYᵀ·X`.
//!
//! After criterion's report, a table of medians (from the same samples criterion took) and
//! ratios `dense / sparse` is printed.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor, TensorData};
use criterion::Criterion;
use sparse_kernels::{CsrLayout, CsrStructure, sddmm, sparse_linear};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn unit(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 31) as f32
    }
}

fn random(rng: &mut Lcg, shape: [usize; 2], device: &Device) -> Tensor<2> {
    let data: Vec<f32> = (0..shape[0] * shape[1]).map(|_| rng.unit() - 0.5).collect();
    Tensor::from_data(TensorData::new(data, shape), device)
}

fn structure(rng: &mut Lcg, rows: usize, cols: usize, density: f64) -> CsrStructure {
    let threshold = (density * (1u64 << 31) as f64) as u32;
    let mask: Vec<bool> = (0..rows * cols).map(|_| rng.next() < threshold).collect();
    CsrStructure::from_mask(rows, cols, &mask).unwrap()
}

/// Per-iteration times of every sample criterion takes, by case.
static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

fn timed<O>(c: &mut Criterion, group: &str, id: &str, mut f: impl FnMut() -> O) {
    let key = format!("{group}/{id}");
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(f());
            }
            let elapsed = start.elapsed();
            SAMPLES
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .push(elapsed.as_secs_f64() / iters as f64);
            elapsed
        })
    });
    g.finish();
}

fn median(key: &str) -> f64 {
    let mut v = SAMPLES
        .lock()
        .unwrap()
        .get(key)
        .cloned()
        .unwrap_or_default();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

const DENSITIES: [f64; 4] = [0.001, 0.005, 0.01, 0.05];

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let device = Device::flex();
    let mut rng = Lcg(0x5eed);
    // (name, out, in, tokens)
    let shapes = [
        ("llama-4096x4096", 4096, 4096, 512),
        ("llama-4096x4096", 4096, 4096, 2048),
        ("llama-4096x11008", 4096, 11008, 512),
        ("bert-384x1536", 384, 1536, 2048),
    ];
    let mut rows = Vec::new();
    for (name, out, inp, tokens) in shapes {
        let group = format!("{name}-t{tokens}");
        let x = random(&mut rng, [tokens, inp], &device);
        let dy = random(&mut rng, [tokens, out], &device);
        let w = random(&mut rng, [inp, out], &device);
        timed(&mut c, &group, "dense-forward", || {
            x.clone().matmul(w.clone())
        });
        timed(&mut c, &group, "dense-weight-grad", || {
            dy.clone().transpose().matmul(x.clone())
        });
        for density in DENSITIES {
            let s = structure(&mut rng, out, inp, density);
            let nnz = s.nnz();
            let layout = CsrLayout::new(s, &device);
            let values = Tensor::<1>::from_data(
                TensorData::new(
                    (0..nnz).map(|_| rng.unit() - 0.5).collect::<Vec<f32>>(),
                    [nnz],
                ),
                &device,
            );
            let pct = density * 100.0;
            timed(&mut c, &group, &format!("spmm-{pct}%"), || {
                sparse_linear(x.clone(), &layout, values.clone())
            });
            timed(&mut c, &group, &format!("sddmm-{pct}%"), || {
                sddmm(&layout, dy.clone().transpose(), x.clone().transpose())
            });
            rows.push((group.clone(), out, inp, tokens, density, nnz));
        }
    }
    c.final_summary();

    println!();
    println!(
        "| shape (S = out x in) | tokens | density | nnz | dense fwd ms | SpMM ms | dense/SpMM | dense dW ms | SDDMM ms | dense/SDDMM | SpMM ns/(nnz·token) | SDDMM ns/(nnz·token) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (group, out, inp, tokens, density, nnz) in rows {
        let pct = density * 100.0;
        let fwd = median(&format!("{group}/dense-forward"));
        let dw = median(&format!("{group}/dense-weight-grad"));
        let sp = median(&format!("{group}/spmm-{pct}%"));
        let sd = median(&format!("{group}/sddmm-{pct}%"));
        let work = (nnz * tokens) as f64;
        println!(
            "| {out}x{inp} | {tokens} | {pct}% | {nnz} | {:.2} | {:.3} | {:.1}x | {:.2} | {:.3} | {:.1}x | {:.3} | {:.3} |",
            fwd * 1e3,
            sp * 1e3,
            fwd / sp,
            dw * 1e3,
            sd * 1e3,
            dw / sd,
            sp * 1e9 / work,
            sd * 1e9 / work,
        );
    }
}
