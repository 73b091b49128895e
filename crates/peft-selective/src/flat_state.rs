//! The wrapped optimizer's state as one flat vector over the chosen entries: growing it when
//! entries are unmasked and measuring it. A leaf module: the optimizer, its checkpoints and
//! its summaries all build on it.

use burn::optim::{Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, TensorData};

use crate::error::{Result, SelectiveError};

/// The name prefix of the state's tensors (also in checkpoint files).
pub(crate) const PREFIX: &str = "state";

/// Insert zero state for new entries: parameter `i`'s segment grows from `old[i]` to `new[i]`
/// entries, the new ones after the old ones.
pub(crate) fn grow<O: Optimizer>(
    state: O::State<1>,
    old: &[usize],
    new: &[usize],
    device: &Device,
) -> Result<O::State<1>> {
    let mut sink = StateSink::default();
    state.state_flatten(PREFIX, &mut sink);
    let k_old: usize = old.iter().sum();
    let k_new: usize = new.iter().sum();
    let mut src = StateSource::new(sink.scalars.into_iter().collect());
    for (name, data) in sink.tensors {
        let shape = data.shape().to_vec();
        if shape != [k_old] {
            return Err(SelectiveError::UnsupportedOptimizerState { name, shape });
        }
        let dtype = data.dtype();
        let values: Vec<f32> = data.iter::<f32>().collect();
        let mut out = Vec::with_capacity(k_new);
        let mut at = 0;
        for (&o, &n) in old.iter().zip(new) {
            out.extend_from_slice(&values[at..at + o]);
            out.resize(out.len() + (n - o), 0.0);
            at += o;
        }
        src.insert_tensor(name, TensorData::new(out, [k_new]).convert_dtype(dtype));
    }
    O::State::<1>::state_unflatten(PREFIX, &mut src, device).ok_or_else(|| {
        SelectiveError::UnsupportedOptimizerState {
            name: PREFIX.into(),
            shape: vec![k_new],
        }
    })
}

/// Values and bytes held by a state.
pub(crate) fn size<O: Optimizer>(state: &O::State<1>) -> (usize, usize) {
    let mut sink = StateSink::default();
    state.state_flatten(PREFIX, &mut sink);
    sink.tensors.iter().fold((0, 0), |(n, b), (_, d)| {
        (n + d.num_elements(), b + d.as_bytes().len())
    })
}
