//! burn-train integration: run the PEFT step inside `Learner`'s optimizer step.
//!
//! burn-train calls [`TrainStep::optimize`] on the model after every backward pass. Wrapping the
//! model in [`Controlled`] makes that call run the [`Stepper`]: controllers before and after the
//! optimizer, in the documented order, so a `Learner` cannot skip them. Build it from the
//! `PeftModel` with [`PeftModel::controlled`](crate::PeftModel::controlled): the method's
//! controllers come with it and the missing-controller check runs once, there.
//!
//! A controller that ends the run ([`Stepper::should_stop`]: RoSA's
//! `terminate_after_mask_generation`, once the masks are saved) stops it through the same
//! [`Interrupter`], as the reference exits the process.
//!
//! `optimize` has no error channel: a controller error aborts that step (the model is left as
//! it was), is kept for [`Controlled::error`], later steps do nothing, and the training run is
//! stopped through the burn-train [`Interrupter`] given with
//! [`with_interrupter`](Controlled::with_interrupter). It never panics.
//!
//! **Checkpoints.** The controllers' state is part of the model's record: [`Module::into_record`]
//! of a `Controlled` adds it (the [`Stepper::save_state`] folder, packed into two integer
//! tensors under `peft_state.`), and [`Module::try_load_record`] restores it, prepares the model
//! for the next step (RoSA's masks, SFT's delta positions: the structure a freshly built model
//! lacks) and only then loads the parameters. The record is a training checkpoint: the frozen
//! base parameters are neither recorded nor loaded (the model built for the resume has them, as
//! PEFT's checkpoints hold only the adapters). So burn-train's own checkpointing
//! (`SupervisedTraining::with_default_checkpointers`) saves everything a resume needs, and
//! `SupervisedTraining::checkpoint(epoch)` resumes where the run stopped. A state that does not
//! fit the stepper (another method or config) is an error: returned by `try_load_record`, or,
//! once an interrupter is set (burn-train's `load_model` panics on an error), kept for
//! [`Controlled::error`] with the run stopped and nothing loaded.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::module::{
    Content, Devices, DisplaySettings, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper,
    ModuleVisitor, Param, ParamId,
};
use burn::optim::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::store::{ModuleRecord, RecordError};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn::train::{InferenceStep, Interrupter, TrainOutput, TrainStep};

use crate::error::{PeftError, Result};
use crate::method::Method;
use crate::model::PeftModel;
use crate::step::{Stepper, Tuned};

/// A model for burn-train's `Learner` whose optimizer step runs PEFT controllers.
///
/// Its parameters are the wrapped model's, under the path prefix `model.`. Clones share the
/// stepper (the step counter and controller state), as the learner clones the model every step.
#[derive(Clone, Debug)]
pub struct Controlled<M: Module> {
    /// The wrapped model.
    pub model: M,
    stepper: SharedStepper<M>,
}

impl<M: Module> Controlled<M> {
    fn with(self, f: impl FnOnce(M) -> M) -> Self {
        Self {
            model: f(self.model),
            stepper: self.stepper,
        }
    }
}

impl<M: Module> Module for Controlled<M> {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.model.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        self.with(|m| m.fork(device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.with(|m| m.to_device(device))
    }

    fn train(self) -> Self {
        self.with(Module::train)
    }

    fn valid(&self) -> Self {
        let model = self.model.valid();
        self.clone().with(|_| model)
    }

    fn materialize(self) -> Self {
        self.with(Module::materialize)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module("model", "Struct:Controlled");
        self.model.visit(visitor);
        visitor.exit_module("model", "Struct:Controlled");
    }

    fn map<Mp: ModuleMapper>(self, mapper: &mut Mp) -> Self {
        mapper.enter_module("model", "Struct:Controlled");
        let this = self.with(|m| m.map(mapper));
        mapper.exit_module("model", "Struct:Controlled");
        this
    }

    /// The model's parameters and the controllers' state (see the module docs).
    fn into_record(self) -> ModuleRecord {
        let device = self.model.devices().into_iter().next();
        let packed = self.stepper.lock().stepper.pack_state();
        let state = match (packed, device) {
            (Ok(bytes), Some(device)) => Some(StateRecord::new(&bytes, &device)),
            (Err(e), _) => {
                self.stepper.fail(e);
                None
            }
            (Ok(_), None) => None,
        };
        Recorded {
            model: self.model,
            state,
        }
        .into_record()
    }

    /// Restore the controllers' state, prepare the model for it, then load the parameters
    /// (see the module docs).
    fn try_load_record(self, record: ModuleRecord) -> Result<Self, RecordError> {
        let Some(device) = self.model.devices().into_iter().next() else {
            return Ok(self);
        };
        match self.load(record, &device) {
            Ok(model) => Ok(Self {
                model,
                stepper: self.stepper,
            }),
            Err(e) => {
                let mut shared = self.stepper.lock();
                let Some(interrupter) = shared.interrupter.clone() else {
                    return Err(e);
                };
                interrupter.stop(Some(&e.to_string()));
                shared.error = Some(PeftError::Unsupported(e.to_string()));
                drop(shared);
                Ok(self)
            }
        }
    }
}

impl<M: Module> Controlled<M> {
    /// The model of `record`: the stepper restored from its state, the model prepared for it,
    /// then its parameters loaded. After an error the stepper may hold the record's state:
    /// the run cannot go on (see the module docs).
    fn load(&self, record: ModuleRecord, device: &Device) -> Result<M, RecordError> {
        let bytes = StateRecord::read(&record, device)?;
        let prepared = self
            .stepper
            .lock()
            .stepper
            .restore_packed(self.model.clone(), &bytes, device)
            .map_err(|e| RecordError::Validation(format!("PEFT controller state: {e}")))?;
        let loaded = Recorded {
            model: prepared,
            state: Some(StateRecord::zeros(bytes.len().div_ceil(4), device)),
        }
        .try_load_record(record)?;
        Ok(loaded.model)
    }
}

/// The controllers' state in a record: its length in bytes, and the bytes four to an `i32`
/// (little-endian).
#[derive(Module, Debug)]
struct StateRecord {
    len: Param<Tensor<1, Int>>,
    bytes: Param<Tensor<1, Int>>,
}

/// The record layout of a [`Controlled`] model: `model.*` and `peft_state.*` (without a state
/// when it could not be written).
///
/// A training checkpoint: the frozen base parameters are neither recorded nor loaded. No
/// optimizer or controller changes them, so the model built for the resume has them already (a
/// checkpoint of a 135M-parameter model is then the size of its adapters, not 0.5 GB), and its
/// own copies keep the layout they were built with (a transposed view of a file's `[out, in]`
/// weight, which the products read as such: a record would bring them back contiguous, summing
/// in another order and at another speed). Adapter parameters (under `peft`) are always
/// recorded: a controller may set them while they are frozen (RoSA's restart).
#[derive(Clone, Debug)]
struct Recorded<M> {
    model: M,
    state: Option<StateRecord>,
}

impl<M: Module> Recorded<M> {
    fn with(self, f: impl FnOnce(M) -> M) -> Self {
        Self {
            model: f(self.model),
            ..self
        }
    }
}

/// Whether `param` at `path` is a base parameter known to be frozen (on a device without
/// autodiff nothing is known to be trainable: no).
fn frozen_base<const D: usize>(path: &[String], param: &Param<Tensor<D>>) -> bool {
    param.is_autodiff() && !param.is_require_grad() && !path.iter().any(|p| p == "peft")
}

/// Passes the trainable and adapter parameters on to the record's collector and skips the
/// frozen base parameters (see [`Recorded`]).
struct SkipFrozenBase<'a, V> {
    inner: &'a mut V,
    path: Vec<String>,
}

impl<V: ModuleVisitor> ModuleVisitor for SkipFrozenBase<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.into());
        self.inner.enter_module(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.pop();
        self.inner.exit_module(name, container_type);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !frozen_base(&self.path, param) {
            self.inner.visit_float(param);
        }
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        self.inner.visit_int(param);
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, burn::tensor::Bool>>) {
        self.inner.visit_bool(param);
    }

    fn visit_flag(&mut self, flag: &Param<burn::module::Flag>) {
        self.inner.visit_flag(flag);
    }
}

/// Passes the trainable and adapter parameters on to the record's mapper and keeps the
/// frozen base parameters (see [`Recorded`]).
struct KeepFrozenBase<'a, Mp> {
    inner: &'a mut Mp,
    path: Vec<String>,
}

impl<Mp: ModuleMapper> ModuleMapper for KeepFrozenBase<'_, Mp> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.push(name.into());
        self.inner.enter_module(name, container_type);
    }

    fn exit_module(&mut self, name: &str, container_type: &str) {
        self.path.pop();
        self.inner.exit_module(name, container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if frozen_base(&self.path, &param) {
            return param;
        }
        self.inner.map_float(param)
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        self.inner.map_int(param)
    }

    fn map_bool<const D: usize>(
        &mut self,
        param: Param<Tensor<D, burn::tensor::Bool>>,
    ) -> Param<Tensor<D, burn::tensor::Bool>> {
        self.inner.map_bool(param)
    }

    fn map_flag(&mut self, flag: Param<burn::module::Flag>) -> Param<burn::module::Flag> {
        self.inner.map_flag(flag)
    }
}

impl<M: Module> Module for Recorded<M> {
    fn collect_devices(&self, devices: Devices) -> Devices {
        self.model.collect_devices(devices)
    }

    fn fork(self, device: &Device) -> Self {
        self.with(|m| m.fork(device))
    }

    fn to_device(self, device: &Device) -> Self {
        self.with(|m| m.to_device(device))
    }

    fn train(self) -> Self {
        self.with(Module::train)
    }

    fn valid(&self) -> Self {
        self.clone().with(|m| m.valid())
    }

    fn materialize(self) -> Self {
        self.with(Module::materialize)
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.enter_module("model", "Struct:Controlled");
        self.model.visit(&mut SkipFrozenBase {
            inner: &mut *visitor,
            path: Vec::new(),
        });
        visitor.exit_module("model", "Struct:Controlled");
        if let Some(state) = &self.state {
            visitor.enter_module("peft_state", "Struct:StateRecord");
            state.visit(visitor);
            visitor.exit_module("peft_state", "Struct:StateRecord");
        }
    }

    fn map<Mp: ModuleMapper>(self, mapper: &mut Mp) -> Self {
        mapper.enter_module("model", "Struct:Controlled");
        let model = self.model.map(&mut KeepFrozenBase {
            inner: &mut *mapper,
            path: Vec::new(),
        });
        mapper.exit_module("model", "Struct:Controlled");
        let state = self.state.map(|state| {
            mapper.enter_module("peft_state", "Struct:StateRecord");
            let state = state.map(mapper);
            mapper.exit_module("peft_state", "Struct:StateRecord");
            state
        });
        Self { model, state }
    }
}

/// Reads `peft_state.len` alone.
#[derive(Module, Debug)]
struct LenProbe {
    peft_state: LenOnly,
}

#[derive(Module, Debug)]
struct LenOnly {
    len: Param<Tensor<1, Int>>,
}

/// Reads `peft_state.*` alone.
#[derive(Module, Debug)]
struct StateProbe {
    peft_state: StateRecord,
}

fn int_param(values: Vec<i32>, device: &Device) -> Param<Tensor<1, Int>> {
    let n = values.len();
    Param::initialized(
        ParamId::new(),
        Tensor::<1, Int>::from_data(TensorData::new(values, [n]), device),
    )
}

impl StateRecord {
    fn new(bytes: &[u8], device: &Device) -> Self {
        let words = bytes
            .chunks(4)
            .map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                i32::from_le_bytes(w)
            })
            .collect();
        // i32 holds the length: a state is far below 2 GiB (it is O(trainable parameters)).
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        Self {
            len: int_param(vec![len], device),
            bytes: int_param(words, device),
        }
    }

    fn zeros(words: usize, device: &Device) -> Self {
        Self {
            len: int_param(vec![-1], device),
            bytes: int_param(vec![0; words], device),
        }
    }

    /// The state bytes in `record`.
    fn read(record: &ModuleRecord, device: &Device) -> Result<Vec<u8>, RecordError> {
        let words = state_words(record, device)?;
        let probe = StateProbe {
            peft_state: Self::zeros(words, device),
        }
        .try_load_record(record.clone().allow_partial(true).allow_unused(true))?;
        let len = first_int(&probe.peft_state.len);
        let mut bytes: Vec<u8> = probe
            .peft_state
            .bytes
            .val()
            .into_data()
            .iter::<i64>()
            .flat_map(|w| (w as i32).to_le_bytes())
            .collect();
        bytes.truncate(usize::try_from(len).unwrap_or(0));
        Ok(bytes)
    }
}

fn first_int(p: &Param<Tensor<1, Int>>) -> i64 {
    p.val().into_data().iter::<i64>().next().unwrap_or(-1)
}

/// The number of `i32` words of the state in `record`, or an error naming what is missing.
fn state_words(record: &ModuleRecord, device: &Device) -> Result<usize, RecordError> {
    let probe = LenProbe {
        peft_state: LenOnly {
            len: int_param(vec![-1], device),
        },
    }
    .try_load_record(record.clone().allow_partial(true).allow_unused(true))?;
    let len = first_int(&probe.peft_state.len);
    usize::try_from(len).map(|n| n.div_ceil(4)).map_err(|_| {
        RecordError::Validation(
            "the record has no PEFT controller state (`peft_state`): it was not written by a \
             `Controlled` model"
                .into(),
        )
    })
}

impl<M: Module + ModuleDisplay> ModuleDisplayDefault for Controlled<M> {
    fn content(&self, content: Content) -> Option<Content> {
        content.add("model", &self.model).optional()
    }
}

impl<M: Module + ModuleDisplay> ModuleDisplay for Controlled<M> {}

impl<M: Module + ModuleDisplay> std::fmt::Display for Controlled<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.format(DisplaySettings::new()))
    }
}

/// A [`Stepper`] shared between clones of a [`Controlled`] model, with the first controller
/// error and the interrupter to stop the run with.
pub struct SharedStepper<M>(Arc<Mutex<Shared<M>>>);

struct Shared<M> {
    stepper: Stepper<M>,
    error: Option<PeftError>,
    interrupter: Option<Interrupter>,
}

impl<M> SharedStepper<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<M>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keep `e` (the first error wins) and stop the run.
    fn fail(&self, e: PeftError) {
        let mut shared = self.lock();
        if let Some(i) = &shared.interrupter {
            i.stop(Some(&format!("PEFT controller failed: {e}")));
        }
        shared.error.get_or_insert(e);
    }
}

/// A folder of its own under the system's temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("burn-peft-state-{}-{n}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| PeftError::io(&path, e))?;
        }
        std::fs::create_dir_all(&path).map_err(|e| PeftError::io(&path, e))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const PACK_MAGIC: &[u8] = b"burn-peft-state-1\n";

/// Every file under `dir` (sorted relative paths): `u32` path length, path, `u64` length, bytes.
fn pack(dir: &Path) -> Result<Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
        let entries = std::fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| PeftError::io(dir, e))?.path();
            if path.is_dir() {
                walk(root, &path, files)?;
            } else {
                files.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort();
    let mut out = PACK_MAGIC.to_vec();
    for rel in files {
        let name = rel.to_string_lossy().replace('\\', "/");
        let path = dir.join(&rel);
        let data = std::fs::read(&path).map_err(|e| PeftError::io(&path, e))?;
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((data.len() as u64).to_le_bytes());
        out.extend(data);
    }
    Ok(out)
}

/// Write the files of a [`pack`] into `dir`.
fn unpack(bytes: &[u8], dir: &Path) -> Result<()> {
    let bad = |reason: &str| PeftError::InvalidConfig {
        field: "peft_state".into(),
        reason: format!("malformed controller state in the record: {reason}"),
    };
    let rest = bytes
        .strip_prefix(PACK_MAGIC)
        .ok_or_else(|| bad("no header"))?;
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8]> {
        let end = at.checked_add(n).ok_or_else(|| bad("length"))?;
        let part = rest.get(at..end).ok_or_else(|| bad("truncated"))?;
        at += n;
        Ok(part)
    };
    let mut left = rest.len();
    while left > 0 {
        let n = u32::from_le_bytes(take(4)?.try_into().map_err(|_| bad("length"))?) as usize;
        let name = std::str::from_utf8(take(n)?).map_err(|_| bad("file name"))?;
        let len = u64::from_le_bytes(take(8)?.try_into().map_err(|_| bad("length"))?);
        let len = usize::try_from(len).map_err(|_| bad("length"))?;
        let data = take(len)?;
        if name
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(bad("file name"));
        }
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| PeftError::io(parent, e))?;
        }
        std::fs::write(&path, data).map_err(|e| PeftError::io(&path, e))?;
        left -= 4 + n + 8 + len;
    }
    Ok(())
}

impl<M: Module> Stepper<M> {
    /// [`save_state`](Stepper::save_state) as bytes.
    fn pack_state(&self) -> Result<Vec<u8>> {
        let dir = TempDir::new()?;
        self.save_state(&dir.0)?;
        pack(&dir.0)
    }

    /// [`restore`](Stepper::restore) from [`pack_state`](Self::pack_state)'s bytes.
    fn restore_packed(&mut self, model: M, bytes: &[u8], device: &Device) -> Result<M> {
        let dir = TempDir::new()?;
        unpack(bytes, &dir.0)?;
        self.restore(model, &dir.0, device)
    }
}

impl<M> Clone for SharedStepper<M> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<M> std::fmt::Debug for SharedStepper<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.lock().stepper.fmt(f)
    }
}

impl<M: Module> Controlled<M> {
    /// Wrap `model`; `stepper` holds the method's controllers.
    pub fn new(model: M, stepper: Stepper<M>) -> Self {
        Self {
            model,
            stepper: SharedStepper(Arc::new(Mutex::new(Shared {
                stepper,
                error: None,
                interrupter: None,
            }))),
        }
    }

    /// Stop the training run through `interrupter` (burn-train's
    /// `SupervisedTraining::interrupter()`) when a controller fails.
    #[must_use]
    pub fn with_interrupter(self, interrupter: Interrupter) -> Self {
        self.stepper.lock().interrupter = Some(interrupter);
        self
    }

    /// The index of the next optimizer step.
    pub fn step_index(&self) -> usize {
        self.stepper.lock().stepper.step_index()
    }

    /// The controller error that stopped the optimizer steps, if any (taken: a second call
    /// returns `None`).
    pub fn error(&self) -> Option<PeftError> {
        self.stepper.lock().error.take()
    }

    /// Run `f` on the stepper (save or load its state for a checkpoint, read its step index).
    pub fn with_stepper<T>(&self, f: impl FnOnce(&mut Stepper<M>) -> T) -> T {
        f(&mut self.stepper.lock().stepper)
    }

    /// The wrapped model.
    pub fn into_inner(self) -> M {
        self.model
    }
}

impl<M: Module + TrainStep> TrainStep for Controlled<M> {
    type Input = M::Input;
    type Output = M::Output;

    /// The wrapped model's step; its gradients are reported to the controllers as one
    /// micro-batch ([`Stepper::after_backward`]), so with burn-train's gradient accumulation
    /// every backward pass is seen, as the reference's hooks see them. A controller error is
    /// handled as in [`optimize`](Self::optimize).
    fn step(&self, item: Self::Input) -> TrainOutput<Self::Output> {
        let output = self.model.step(item);
        let mut shared = self.stepper.lock();
        let reported = match shared.error {
            None => shared.stepper.after_backward(&self.model, &output.grads),
            Some(_) => Ok(()),
        };
        drop(shared);
        if let Err(e) = reported {
            self.stepper.fail(e);
        }
        output
    }

    /// Controllers and optimizer, in order. A controller error leaves the model as it was,
    /// is kept for [`Controlled::error`] and stops the run (see the module docs).
    fn optimize(
        self,
        optim: &mut ModuleOptimizer,
        lr_module: ModuleLearningRate,
        grads: GradientsParams,
    ) -> Self {
        let mut shared = self.stepper.lock();
        if shared.error.is_some() {
            drop(shared);
            return self;
        }
        let model = match shared
            .stepper
            .optimize(self.model.clone(), optim, lr_module, grads)
        {
            Ok(model) => {
                // A controller's own end of the run (RoSA's
                // `terminate_after_mask_generation`, once the masks are saved).
                if shared.stepper.should_stop()
                    && let Some(i) = &shared.interrupter
                {
                    i.stop(Some(
                        "a PEFT controller ended the run (e.g. RoSA's \
                                 terminate_after_mask_generation: the masks are saved)",
                    ));
                }
                model
            }
            Err(e) => {
                if let Some(i) = &shared.interrupter {
                    i.stop(Some(&format!("PEFT controller failed: {e}")));
                }
                shared.error = Some(e);
                self.model.clone()
            }
        };
        drop(shared);
        Self {
            model,
            stepper: self.stepper,
        }
    }
}

impl<M: Module + InferenceStep> InferenceStep for Controlled<M> {
    type Input = M::Input;
    type Output = M::Output;

    fn step(&self, item: Self::Input) -> Self::Output {
        self.model.step(item)
    }
}

/// The model for burn-train's `Learner` of any trained model (a `PeftModel`, peft-selective's
/// `SelectiveModel`): its controllers ([`Tuned::stepper`]`(total_steps)`) in the optimizer step,
/// checked once here.
///
/// # Errors
/// As [`Tuned::stepper`], or a missing controller.
pub fn controlled<M: Module, T: Tuned<M>>(
    tuned: &mut T,
    total_steps: usize,
) -> Result<Controlled<M>> {
    let mut stepper = tuned.stepper(total_steps)?;
    stepper.check(tuned)?;
    Ok(Controlled::new(tuned.tuned_model().clone(), stepper))
}

/// Take the trained model back from a [`Controlled`] (after burn-train's `launch`), with the
/// controllers' decisions written into the configs (AdaLoRA's rank pattern), as
/// [`Stepper::train`] does after each step.
pub fn set_controlled<M: Module, T: Tuned<M>>(tuned: &mut T, trained: Controlled<M>) {
    trained.with_stepper(|s| tuned.update_configs(s.controllers()));
    tuned.set_tuned_model(trained.into_inner());
}

impl<M: Module, C: Method> PeftModel<M, C> {
    /// The model for burn-train's `Learner`, with the method's controllers in its optimizer
    /// step ([`stepper`](Self::stepper)`(total_steps)`), checked once here.
    ///
    /// # Errors
    /// As [`stepper`](Self::stepper).
    pub fn controlled(&mut self, total_steps: usize) -> Result<Controlled<M>> {
        controlled(self, total_steps)
    }

    /// Take the trained model back from a [`Controlled`] (after burn-train's `launch`), with
    /// the controllers' decisions written into the configs (AdaLoRA's rank pattern), as
    /// [`Stepper::train`] does after each step.
    pub fn set_controlled(&mut self, trained: Controlled<M>) {
        set_controlled(self, trained);
    }
}
