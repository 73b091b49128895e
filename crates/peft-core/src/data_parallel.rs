//! Data-parallel training: one replica of the tuned model per device, each on its shard of the
//! batch, whose gradients are reduced before any controller or optimizer sees them.
//!
//! Every replica owns its model, its [`Stepper`] (controllers) and its optimizer, as a worker of
//! burn-train's `DdpTrainingStrategy` does. One micro-batch ([`DataParallel::backward`]):
//! 1. each replica computes its shard's loss (the mean over its items) and its gradients;
//! 2. each replica's gradients are scaled by `w_i / W` (its share of the micro-batch's items,
//!    `W = Σ w_i`: tokens for a causal LM loss, examples for a per-example mean), then summed
//!    over the replicas: every replica ends with the gradient of the whole micro-batch's mean
//!    loss, the one a single device would compute;
//! 3. every replica's controllers see those reduced gradients in
//!    [`after_backward`](crate::Controller::after_backward) (RoSA's and SFT's statistics,
//!    AdaLoRA's importance, ID3's scores are all computed from them), and the replica
//!    accumulates them.
//!
//! [`DataParallel::step`] then runs every replica's stepper on its accumulated gradients:
//! the same gradients, parameters and controller state on every replica, so the same
//! decisions (masks, reselections, rank patterns, unmasked entries) and the same parameters.
//! Controllers are deterministic functions of what they see (no host clock, no per-replica
//! randomness), which is what makes this hold; the replicas never exchange controller state.
//!
//! The sum in step 2 is burn's ([`Reduction`]):
//! - [`Reduction::Collective`]: `burn::tensor::distributed::all_reduce` (sum) on every
//!   gradient, under a [`DistributedContext`] held by the [`DataParallel`]. burn 0.22.1
//!   implements it for CUDA devices only (NCCL); on flex, ndarray or wgpu devices burn panics.
//! - [`Reduction::Gather`]: the gradients are moved to the first device and summed there in
//!   replica order, then copied to every device (`Tensor::to_device`): the path of burn-train's
//!   `MultiDevice` (`OptimMainDevice`) strategy, which gathers gradients onto its main device.
//!   It runs on every backend, and with several replicas on the same device (the only
//!   multi-replica setting a CPU-only machine has: burn's flex device is a single device).
//!
//! Why not burn-train's `DdpTrainingStrategy` itself: it owns the loop, reduces inside autodiff
//! only on CUDA, and its workers would share the one stepper of a `Controlled` model; see
//! `docs/architecture.md`, "Data-parallel training".

use std::collections::HashSet;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::distributed::{
    CollectiveTensor, DistributedConfig, DistributedContext, ReduceOperation, all_reduce,
};
use burn::tensor::{Device, Tensor};

use crate::error::{PeftError, Result};
use crate::step::{Stepper, Tuned};

/// How the replicas' gradients are summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// burn's collective all-reduce (`burn::tensor::distributed`). In burn 0.22.1 only CUDA
    /// devices implement it (NCCL); every device must be distinct.
    Collective,
    /// Gather onto the first device, sum in replica order, copy back: every
    /// backend, replicas may share a device.
    #[default]
    Gather,
}

/// One replica: its device, tuned model, stepper and optimizer.
pub struct Replica<M: Module, T> {
    /// The replica's device (with autodiff).
    pub device: Device,
    /// The replica's tuned model.
    pub tuned: T,
    /// The replica's controllers.
    pub stepper: Stepper<M>,
    /// The replica's optimizer.
    pub optim: ModuleOptimizer,
    accumulated: Option<GradientsAccumulator<M>>,
}

/// Replicas of one tuned model trained on shards of each batch; see the [module](self) docs.
pub struct DataParallel<M: Module, T> {
    replicas: Vec<Replica<M, T>>,
    reduction: Reduction,
    /// Keeps burn's communication server up for [`Reduction::Collective`].
    _context: Option<DistributedContext>,
}

impl<M: Module, T> std::fmt::Debug for DataParallel<M, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("replicas", &self.replicas.len())
            .field("reduction", &self.reduction)
            .finish()
    }
}

/// One replica's loss for a micro-batch and the number of items it is the mean over.
pub type ShardLoss = (Tensor<1>, f64);

impl<M: Module + 'static, T: Tuned<M> + Clone> DataParallel<M, T> {
    /// Replicas of `tuned` on `devices` (one each, in order; a device may repeat with
    /// [`Reduction::Gather`]), each with the stepper `tuned.stepper(total_steps)` gives and the
    /// optimizer `optim()` gives. Every replica starts from the same parameters (`tuned`'s,
    /// copied).
    ///
    /// # Errors
    /// No device; a repeated device with [`Reduction::Collective`]; a stepper's error.
    pub fn new(
        tuned: T,
        devices: &[Device],
        total_steps: usize,
        optim: impl Fn() -> ModuleOptimizer,
        reduction: Reduction,
    ) -> Result<Self> {
        let bad = |reason: &str| PeftError::InvalidConfig {
            field: "devices".into(),
            reason: reason.into(),
        };
        if devices.is_empty() {
            return Err(bad("data-parallel training needs at least one device"));
        }
        let context = match reduction {
            Reduction::Gather => None,
            Reduction::Collective => {
                let distinct: HashSet<String> = devices.iter().map(|d| format!("{d:?}")).collect();
                if distinct.len() != devices.len() {
                    return Err(bad(
                        "burn's collective all-reduce needs distinct devices; use the gather \
                         reduction to run several replicas on one device",
                    ));
                }
                Some(DistributedContext::init(
                    devices.to_vec(),
                    DistributedConfig {
                        all_reduce_op: ReduceOperation::Sum,
                    },
                ))
            }
        };
        let mut replicas = Vec::with_capacity(devices.len());
        for device in devices {
            let mut tuned = tuned.clone();
            let model = tuned.tuned_model().clone().fork(device);
            tuned.set_tuned_model(model);
            let mut stepper = tuned.stepper(total_steps)?;
            stepper.check(&tuned)?;
            let model = stepper.data_parallel(tuned.tuned_model().clone())?;
            tuned.set_tuned_model(model);
            replicas.push(Replica {
                device: device.clone(),
                tuned,
                stepper,
                optim: optim(),
                accumulated: None,
            });
        }
        Ok(Self {
            replicas,
            reduction,
            _context: context,
        })
    }

    /// The replicas, in device order.
    pub fn replicas(&self) -> &[Replica<M, T>] {
        &self.replicas
    }

    /// The replicas, to load optimizer records or adjust them between steps (keep them equal).
    pub fn replicas_mut(&mut self) -> &mut [Replica<M, T>] {
        &mut self.replicas
    }

    /// The first replica's tuned model: every replica holds the same parameters, so this is
    /// the one to save.
    pub fn tuned(&self) -> &T {
        &self.replicas[0].tuned
    }

    /// The first replica's tuned model, by value (the end of a run).
    pub fn into_tuned(mut self) -> T {
        self.replicas.swap_remove(0).tuned
    }

    /// The number of replicas.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether there is no replica (never: [`new`](Self::new) refuses it).
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// The index of the next optimizer step.
    pub fn step_index(&self) -> usize {
        self.replicas[0].stepper.step_index()
    }

    /// Whether a controller asks to stop the run.
    pub fn should_stop(&self) -> bool {
        self.replicas[0].stepper.should_stop()
    }

    /// One micro-batch on every replica: `loss(i, model)` is replica `i`'s loss on its shard
    /// (the mean over its items, on its device) and the number of items `w_i` the mean is over.
    /// The gradients are reduced to those of the whole micro-batch's mean
    /// (`Σ w_i · grad_i / Σ w_i`), reported to every replica's controllers and accumulated
    /// for [`step`](Self::step). Returns the micro-batch's mean loss, `Σ w_i · loss_i / Σ w_i`.
    ///
    /// # Errors
    /// `loss`'s error, weights that do not sum to a positive number, or a controller's error.
    pub fn backward(
        &mut self,
        mut loss: impl FnMut(usize, &M) -> Result<ShardLoss>,
    ) -> Result<f64> {
        let mut shards = Vec::with_capacity(self.replicas.len());
        for (i, r) in self.replicas.iter().enumerate() {
            let model = r.tuned.tuned_model();
            let (l, w) = loss(i, model)?;
            let value = l.clone().into_scalar::<f64>();
            shards.push((GradientsParams::from_grads(l.backward(), model), w, value));
        }
        let total: f64 = shards.iter().map(|s| s.1).sum();
        if !(total > 0.0 && total.is_finite()) || shards.iter().any(|s| s.1 < 0.0) {
            return Err(PeftError::InvalidConfig {
                field: "shard weights".into(),
                reason: format!(
                    "the replicas' item counts must be non-negative with a positive sum, got {:?}",
                    shards.iter().map(|s| s.1).collect::<Vec<_>>()
                ),
            });
        }
        let mean = shards.iter().map(|s| s.1 * s.2).sum::<f64>() / total;
        let grads: Vec<GradientsParams> = shards
            .into_iter()
            .zip(&self.replicas)
            .map(|((mut g, w, _), r)| {
                let factor = w / total;
                if factor != 1.0 {
                    scale_grads(r.tuned.tuned_model(), &mut g, factor);
                }
                g
            })
            .collect();
        let reduced = self.reduce(grads)?;
        for (r, g) in self.replicas.iter_mut().zip(reduced) {
            r.stepper.after_backward(r.tuned.tuned_model(), &g)?;
            r.accumulated
                .get_or_insert_with(GradientsAccumulator::new)
                .accumulate(r.tuned.tuned_model(), g);
        }
        Ok(mean)
    }

    /// The optimizer step of every replica on its accumulated (reduced) gradients: controllers,
    /// optimizer, config updates ([`Stepper::train_grads`]).
    ///
    /// # Errors
    /// No micro-batch since the last step, or a controller's error (controllers are
    /// deterministic, so every replica fails alike; the replicas stepped before the failing
    /// one are not rolled back).
    pub fn step(&mut self, lr: impl Into<ModuleLearningRate>) -> Result<()> {
        let lr = lr.into();
        for r in &mut self.replicas {
            let Some(mut acc) = r.accumulated.take() else {
                return Err(PeftError::Unsupported(
                    "DataParallel::step without a micro-batch: call `backward` first".into(),
                ));
            };
            r.stepper
                .train_grads(&mut r.tuned, &mut r.optim, lr.clone(), acc.grads())?;
        }
        Ok(())
    }

    /// Save the controllers' state (the first replica's: all are equal) into `dir`, as
    /// [`Stepper::save_state`].
    ///
    /// # Errors
    /// I/O errors.
    pub fn save_state(&self, dir: &Path) -> Result<()> {
        self.replicas[0].stepper.save_state(dir)
    }

    /// Resume every replica from a state written by [`save_state`](Self::save_state) (or by a
    /// single-device [`Stepper::save_state`]: the state does not depend on the replica count),
    /// as [`Stepper::resume`] on each replica's device.
    ///
    /// # Errors
    /// As [`Stepper::resume`].
    pub fn resume(&mut self, dir: &Path) -> Result<()> {
        for r in &mut self.replicas {
            r.accumulated = None;
            r.stepper.resume(&mut r.tuned, dir, &r.device)?;
        }
        Ok(())
    }

    /// Sum the replicas' gradients, parameter by parameter. Parameters are matched by their
    /// position in the module tree, not by id: a controller's `prepare` may give each replica's
    /// probes ids of their own.
    fn reduce(&self, mut grads: Vec<GradientsParams>) -> Result<Vec<GradientsParams>> {
        let ids: Vec<Vec<(ParamId, usize)>> = self
            .replicas
            .iter()
            .map(|r| {
                let mut ids = Vec::new();
                r.tuned.tuned_model().visit(&mut Ids(&mut ids));
                ids
            })
            .collect();
        let devices: Vec<Device> = self.replicas.iter().map(|r| r.device.clone()).collect();
        let ranks = |ids: &[(ParamId, usize)]| ids.iter().map(|p| p.1).collect::<Vec<_>>();
        if ids.iter().any(|r| ranks(r) != ranks(&ids[0])) {
            return Err(PeftError::Unsupported(
                "the replicas' models have different parameters; build them from one model".into(),
            ));
        }
        let mut seen = HashSet::new();
        for k in 0..ids[0].len() {
            if !seen.insert(ids[0][k].0) {
                continue;
            }
            let at: Vec<ParamId> = ids.iter().map(|r| r[k].0).collect();
            reduce_param(&mut grads, &at, ids[0][k].1, &devices, self.reduction)?;
        }
        Ok(grads)
    }
}

/// Sum one parameter's gradient (`ids[r]` in replica `r`) over the replicas, in place.
fn reduce_param(
    grads: &mut [GradientsParams],
    ids: &[ParamId],
    rank: usize,
    devices: &[Device],
    reduction: Reduction,
) -> Result<()> {
    macro_rules! reduce {
        ($d:literal) => {{
            let taken: Vec<Option<Tensor<$d>>> = grads
                .iter_mut()
                .zip(ids)
                .map(|(g, id)| g.remove(*id))
                .collect();
            let present = taken.iter().filter(|t| t.is_some()).count();
            if present == 0 {
                return Ok(());
            }
            if present != taken.len() {
                return Err(PeftError::Unsupported(format!(
                    "a parameter has a gradient on {present} of {} replicas: the replicas \
                     diverged",
                    taken.len()
                )));
            }
            let taken = taken.into_iter().flatten();
            match reduction {
                Reduction::Gather => {
                    let mut sum: Option<Tensor<$d>> = None;
                    for t in taken {
                        let t = t.to_device(&devices[0]);
                        sum = Some(match sum {
                            None => t,
                            Some(s) => s + t,
                        });
                    }
                    let sum = sum.expect("at least one replica");
                    for ((g, id), device) in grads.iter_mut().zip(ids).zip(devices) {
                        g.register(*id, sum.clone().to_device(device));
                    }
                }
                Reduction::Collective => {
                    let pending: Vec<CollectiveTensor<$d>> = taken
                        .map(|t| all_reduce(t, ReduceOperation::Sum, devices.to_vec()))
                        .collect();
                    for ((g, id), t) in grads.iter_mut().zip(ids).zip(pending) {
                        g.register(*id, t.resolve());
                    }
                }
            }
        }};
    }
    match rank {
        1 => reduce!(1),
        2 => reduce!(2),
        3 => reduce!(3),
        4 => reduce!(4),
        5 => reduce!(5),
        _ => reduce!(6),
    }
    Ok(())
}

/// Every float parameter's id and rank, in visiting order.
struct Ids<'a>(&'a mut Vec<(ParamId, usize)>);

impl ModuleVisitor for Ids<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, D));
    }
}

/// Multiply every gradient of `model`'s parameters in `grads` by `factor` (once per id).
fn scale_grads<M: Module>(model: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
        seen: HashSet<ParamId>,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.seen.insert(param.id)
                && let Some(g) = self.grads.remove::<D>(param.id)
            {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale {
        grads,
        factor,
        seen: HashSet::new(),
    });
}
