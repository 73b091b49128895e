//! Candidate scores for sparse reselection without a dense weight gradient.
//!
//! RigL-style growth (SFT / SpIEL-AG) needs the top-`k` entries of `|dW|`, where
//! `dW = dYᵀ · x` is the weight gradient of a linear layer `y = x · Wᵀ` (PyTorch orientation
//! `[out, in]`). [`grad_topk_probe`] adds a zero term to the layer's output whose backward pass
//! computes `dW` block by block (`block` rows of `[out, in]` at a time, each read to the host)
//! and keeps only a running top-`k`: memory `O(block · in + k)`, never the whole `[out, in]`
//! gradient, and no weight-shaped tensor in the autodiff graph or in the gradients. The result
//! goes to a [`ProbeSink`] instead of the gradients.
//!
//! The extension ([`ProbeBackend`]) has one op. Its forward is zeros on every backend (a default
//! body: `Flex`, `CubeBackend`, and the generated `Fusion` wrapper share it); only the
//! `Autodiff` implementation does work, in its backward pass, with the inner backend's float ops
//! (slice, transpose, matmul, read), so it runs on every device.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::backend::{
    Autodiff, Backend, Dispatch, TensorMetadata,
    autodiff::{
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    backend_extension,
    tensor::FloatTensor,
};
use burn::tensor::{DType, Shape, Slice, Tensor, read_sync};

/// The extension behind [`grad_topk_probe`]; use that function rather than this trait.
#[backend_extension(
    Flex: cfg(feature = "flex"),
    Cube: cfg(feature = "cube"),
    Fusion: cfg(feature = "cube"),
    Autodiff
)]
pub trait ProbeBackend: Backend {
    /// Zeros `[tokens, out]` (dtype of `x`). On `Autodiff`, its backward pass sends the top-`k`
    /// of `|dYᵀ · x|` to the sink with id `sink` (see [`grad_topk_probe`]).
    ///
    /// # Shapes
    /// - `x`: `[tokens, in]`; `anchor`: any; returns `[tokens, out]`.
    #[fusion(default)]
    fn grad_topk_probe(
        x: FloatTensor<Self>,
        anchor: FloatTensor<Self>,
        out: usize,
        k: usize,
        block: usize,
        sink: usize,
    ) -> FloatTensor<Self> {
        let _ = (anchor, k, block, sink);
        let tokens = x.shape()[0];
        Self::float_zeros(Shape::new([tokens, out]), &x.device(), x.dtype().into())
    }
}

#[cfg(feature = "flex")]
impl ProbeBackend for burn::backend::Flex {}

#[cfg(feature = "cube")]
impl ProbeBackend for burn_cubecl::CubeBackend {}

impl<B: ProbeBackend, C: CheckpointStrategy> ProbeBackend for Autodiff<B, C> {
    fn grad_topk_probe(
        x: FloatTensor<Self>,
        anchor: FloatTensor<Self>,
        out: usize,
        k: usize,
        block: usize,
        sink: usize,
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct ProbeBackward;

        impl<B: Backend> Backward<B, 1> for ProbeBackward {
            /// `x`, the anchor's shape and dtype, `k`, `block`, the sink id.
            type State = (FloatTensor<B>, Shape, DType, usize, usize, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_anchor] = ops.parents;
                let dy = grads.consume::<B>(&ops.node);
                let (x, anchor_shape, anchor_dtype, k, block, sink) = ops.state;
                let device = dy.device();
                fire::<B>(x, dy, k, block, sink);
                if let Some(node) = node_anchor {
                    let zeros = B::float_zeros(anchor_shape, &device, anchor_dtype.into());
                    grads.register::<B>(node.id, zeros);
                }
            }
        }

        // `x` is saved, not tracked: the probe's output is zero, so it sends nothing to `x`.
        let x = x.into_primitive();
        match ProbeBackward
            .prepare::<C>([anchor.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (shape, dtype) = (anchor.shape(), anchor.dtype());
                let zeros =
                    B::grad_topk_probe(x.clone(), anchor.into_primitive(), out, k, block, sink);
                prep.finish((x, shape, dtype, k, block, sink), zeros)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::grad_topk_probe(
                x,
                anchor.into_primitive(),
                out,
                k,
                block,
                sink,
            )),
        }
    }
}

/// What a [`ProbeSink`] collected: a candidate pool of flat indices into the `[out, in]` weight
/// gradient and the gradient there.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProbeResult {
    /// The pool: flat indices `o · in + i`, sorted. The top-`k` of `|dW|` of the first backward
    /// call (ties: lower index first; NaN counts as 0).
    pub indices: Vec<u64>,
    /// `Σ dW` at the pool, over the calls, in the order of `indices`.
    pub sum: Vec<f32>,
    /// `Σ dW²` at the pool, over the calls.
    pub sum_sq: Vec<f32>,
    /// The number of backward calls that reached the sink.
    pub count: usize,
}

type Slot = Arc<Mutex<Option<ProbeResult>>>;

static SINKS: Mutex<BTreeMap<usize, Slot>> = Mutex::new(BTreeMap::new());
static NEXT_SINK: AtomicUsize = AtomicUsize::new(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the backward passes of [`grad_topk_probe`] deliver their result.
///
/// A sink is registered (under a unique id) while it lives and unregistered when dropped; a
/// backward pass that fires for a dropped sink computes nothing.
///
/// Several calls before a [`take`](Self::take) (the layer ran several times in the graph, or
/// several backward passes accumulate gradients for one optimizer step) follow the reference's
/// micro-batch rule (spec §3.5): the first call to fire chooses the pool (top-`k` of its `|dW|`)
/// and records `dW` there; every later call adds its `dW` at the pool positions (gathered
/// block by block, skipping blocks without pool entries) to `sum` and `sum_sq`, and increments
/// `count`.
#[derive(Debug)]
pub struct ProbeSink {
    id: usize,
    slot: Slot,
}

impl ProbeSink {
    /// A new, empty, registered sink.
    pub fn new() -> Self {
        let id = NEXT_SINK.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::default();
        lock(&SINKS).insert(id, slot.clone());
        Self { id, slot }
    }

    /// Its id, as passed to [`ProbeBackend::grad_topk_probe`].
    pub fn id(&self) -> usize {
        self.id
    }

    /// The result collected since the last `take`, if a backward pass reached the probe; the
    /// sink is empty afterwards.
    pub fn take(&self) -> Option<ProbeResult> {
        lock(&self.slot).take()
    }
}

impl Default for ProbeSink {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ProbeSink {
    fn drop(&mut self) {
        lock(&SINKS).remove(&self.id);
    }
}

/// A block size of `~4 MB` of `f32` per block for a weight with `inp` columns: `2²⁰ / inp` rows,
/// at least one.
pub fn default_probe_block(inp: usize) -> usize {
    ((1 << 20) / inp.max(1)).max(1)
}

/// `(score, index)` is better than another: higher score, then lower index.
fn better(a: (f32, u64), b: (f32, u64)) -> bool {
    a.0.total_cmp(&b.0).then_with(|| b.1.cmp(&a.1)).is_gt()
}

/// A running top-`k` by `|g|` with O(k) memory: candidates are appended, then cut back to the
/// best `k` (linear-time selection) whenever the buffer doubles.
struct TopK {
    k: usize,
    items: Vec<(f32, u64, f32)>,
    /// The `k`-th best so far, once `k` items were seen.
    threshold: Option<(f32, u64)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::new(),
            threshold: None,
        }
    }

    fn push(&mut self, index: u64, g: f32) {
        if self.k == 0 {
            return;
        }
        let score = if g.is_nan() { 0.0 } else { g.abs() };
        if self.threshold.is_some_and(|t| !better((score, index), t)) {
            return;
        }
        self.items.push((score, index, g));
        if self.items.len() >= 2 * self.k + 1024 {
            self.compact();
        }
    }

    fn compact(&mut self) {
        if self.items.len() < self.k {
            return;
        }
        let order = |a: &(f32, u64, f32), b: &(f32, u64, f32)| {
            b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1))
        };
        self.items.select_nth_unstable_by(self.k - 1, order);
        self.items.truncate(self.k);
        let worst = self.items[self.k - 1];
        self.threshold = Some((worst.0, worst.1));
    }

    /// The pool, sorted by index, with its gradients.
    fn finish(mut self) -> (Vec<u64>, Vec<f32>) {
        if self.k > 0 {
            self.compact();
        }
        self.items.sort_unstable_by_key(|e| e.1);
        self.items.into_iter().map(|(_, i, g)| (i, g)).unzip()
    }
}

/// Run one backward call of the probe: `dW = dyᵀ · x` in blocks of `block` rows, into `sink`.
fn fire<B: Backend>(x: FloatTensor<B>, dy: FloatTensor<B>, k: usize, block: usize, sink: usize) {
    let Some(slot) = lock(&SINKS).get(&sink).cloned() else {
        return;
    };
    let mut slot = lock(&slot);
    let (tokens, inp, out) = (x.shape()[0], x.shape()[1], dy.shape()[1]);
    let block = block.max(1);
    let dyt = B::float_transpose(dy);
    // `dW[o0..o1, :]` on the host.
    let rows = |o0: usize, o1: usize| -> Vec<f32> {
        if tokens == 0 {
            return vec![0.0; (o1 - o0) * inp];
        }
        let dyt = B::float_slice(dyt.clone(), &[Slice::from(o0..o1), Slice::from(0..tokens)]);
        let dw = B::float_matmul(dyt, x.clone());
        read_sync(B::float_into_data(dw))
            .expect("reading the probe's gradient block")
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data")
    };
    match slot.as_mut() {
        None => {
            let mut top = TopK::new(k.min(out * inp));
            for o0 in (0..out).step_by(block) {
                let o1 = (o0 + block).min(out);
                let base = (o0 * inp) as u64;
                for (j, g) in rows(o0, o1).into_iter().enumerate() {
                    top.push(base + j as u64, g);
                }
            }
            let (indices, sum) = top.finish();
            let sum_sq = sum.iter().map(|g| g * g).collect();
            *slot = Some(ProbeResult {
                indices,
                sum,
                sum_sq,
                count: 1,
            });
        }
        Some(pool) => {
            let mut p = 0;
            for o0 in (0..out).step_by(block) {
                let o1 = (o0 + block).min(out);
                let (lo, hi) = ((o0 * inp) as u64, (o1 * inp) as u64);
                let end = p + pool.indices[p..].partition_point(|&i| i < hi);
                if end > p {
                    let dw = rows(o0, o1);
                    for q in p..end {
                        let g = dw[(pool.indices[q] - lo) as usize];
                        pool.sum[q] += g;
                        pool.sum_sq[q] += g * g;
                    }
                }
                p = end;
            }
            pool.count += 1;
        }
    }
}

/// A zero term whose backward pass sends the top-`k` candidate scores of a linear layer's weight
/// gradient to `sink`, computed block by block: no dense weight-shaped gradient is formed.
///
/// Add the result to the output of `y = x · Wᵀ` (`x` the layer's input flattened to 2-D). In the
/// backward pass, with `dY` the gradient reaching the result, the op computes
/// `dW = dYᵀ · x` (PyTorch orientation `[out, in]`) `block` rows at a time, reads each block to
/// the host and keeps a running top-`k` of `|dW|`; memory `O(block · in + k)`. See
/// [`ProbeSink`] for what the sink collects (and for several calls before a
/// [`take`](ProbeSink::take)). `anchor` is the op's only tracked input: the op runs its backward
/// pass only when `anchor` requires a gradient (e.g. a `Param`), and gives it a zero gradient.
/// `x` is saved, not differentiated (the term is zero, so its gradient with respect to `x` is
/// zero). Without autodiff, or when `anchor` does not require a gradient, nothing is sent.
///
/// # Arguments
/// - `x`: the layer's input, `[tokens, in]` (any strides).
/// - `anchor`: a small tensor that requires a gradient, any shape (e.g. `[1]`).
/// - `out`: the layer's output width.
/// - `k`: the pool size (capped at `out · in`).
/// - `block`: rows of `dW` per block (`0` counts as `1`); see [`default_probe_block`].
/// - `sink`: where the result goes.
///
/// # Shapes
/// Returns zeros `[tokens, out]`, on `x`'s device, in its dtype.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use sparse_kernels::{ProbeSink, grad_topk_probe};
///
/// let device = Device::flex().autodiff();
/// let x = Tensor::<2>::from_floats([[1.0, -2.0, 3.0]], &device);
/// let anchor = Tensor::<1>::zeros([1], &device).require_grad();
/// let sink = ProbeSink::new();
/// let y = grad_topk_probe(x, anchor, 2, 2, 1, &sink); // out = 2, k = 2, one row per block
/// let dy = Tensor::<2>::from_floats([[1.0, 0.5]], &device);
/// (y * dy).sum().backward();
/// // dW = dYᵀ·x = [[1, -2, 3], [0.5, -1, 1.5]]: the two largest |dW| are at 2 and 1.
/// let pool = sink.take().unwrap();
/// assert_eq!(pool.indices, vec![1, 2]);
/// assert_eq!(pool.sum, vec![-2.0, 3.0]);
/// ```
pub fn grad_topk_probe(
    x: Tensor<2>,
    anchor: Tensor<1>,
    out: usize,
    k: usize,
    block: usize,
    sink: &ProbeSink,
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as ProbeBackend>::grad_topk_probe(
        x.into_dispatch(),
        anchor.into_dispatch(),
        out,
        k,
        block,
        sink.id(),
    ))
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tensor};

    /// The dropped sink's own slot stays empty after a backward pass that targets it, and the
    /// registry no longer holds its id.
    #[test]
    fn a_backward_pass_for_a_dropped_sink_delivers_nothing() {
        let device = Device::flex().autodiff();
        let sink = ProbeSink::new();
        let (id, slot) = (sink.id(), sink.slot.clone());
        let x = Tensor::<2>::from_floats([[1.0, 2.0]], &device);
        let anchor = Tensor::<1>::zeros([1], &device).require_grad();
        let y = grad_topk_probe(x.clone(), anchor.clone(), 3, 2, 1, &sink);
        drop(sink);
        assert!(!lock(&SINKS).contains_key(&id), "dropped sinks unregister");
        let grads = y.sum().backward();
        assert!(anchor.grad(&grads).is_some());
        assert!(lock(&slot).is_none(), "the dropped sink received a result");

        // The same graph with the sink alive delivers, so the check above can fail.
        let live = ProbeSink::new();
        let y = grad_topk_probe(x, anchor, 3, 2, 1, &live);
        y.sum().backward();
        assert!(live.take().is_some());
    }
}
