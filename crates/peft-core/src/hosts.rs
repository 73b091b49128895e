//! Finding adapter hosts in a model and working on them: inventory, attach, typed host access.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::rc::Rc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, Reparameterizer};
use burn::tensor::{Tensor, TensorData};

use crate::adapter::Adapter;
use crate::error::{PeftError, Result};
use crate::hook::for_each_host;
use crate::layer::{PeftEmbedding, PeftLinear};
use crate::reparam::WeightSlot;
use crate::slot::AdapterSlot;
use crate::target::{Candidate, LayerKind, TargetSpec};

/// How an adapter is attached to a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In a [`PeftLinear`] / [`PeftEmbedding`]: the adapter works on activations.
    Activation,
    /// On the weight of a plain `Linear` / `Embedding`, through [`WeightSlot`].
    Weight,
}

/// A layer that can take an adapter.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Its path and kind.
    pub candidate: Candidate,
    /// How an adapter would be attached.
    pub placement: Placement,
    /// `[rows, cols]` of its weight in burn orientation.
    pub shape: [usize; 2],
    /// Whether the weight already carries a reparameterization of this crate.
    pub has_weight_slot: bool,
    /// Whether the weight carries a reparameterization of another kind (e.g. burn's LoRA).
    pub foreign_reparam: Option<String>,
}

/// Every layer of `model` that could take an adapter, in traversal order.
pub fn layers<M: Module>(model: &M) -> Vec<Layer> {
    #[derive(Default)]
    struct Inventory {
        path: Vec<String>,
        containers: Vec<String>,
        found: Vec<Layer>,
        activation: HashSet<String>,
        slots: HashSet<String>,
        foreign: BTreeMap<String, String>,
    }
    impl ModuleVisitor for Inventory {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            let here = self.path.join(".");
            match (name, container_type) {
                ("peft", "Struct:PeftLinear" | "Struct:PeftEmbedding") => {
                    self.activation.insert(here);
                }
                ("peft", "Reparameterization") => {
                    self.slots.insert(here);
                }
                (other, "Reparameterization") => {
                    self.foreign.insert(here, other.to_string());
                }
                _ => {}
            }
            self.path.push(name.to_string());
            self.containers.push(container_type.to_string());
        }

        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
            self.containers.pop();
        }

        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D != 2 || self.path.last().map(String::as_str) != Some("weight") {
                return;
            }
            let kind = match self.containers.last().map(String::as_str) {
                Some("Struct:Linear") => LayerKind::Linear,
                Some("Struct:Embedding") => LayerKind::Embedding,
                _ => return,
            };
            let dims = param.lazy_shape();
            self.found.push(Layer {
                candidate: Candidate {
                    path: self.path[..self.path.len() - 1].join("."),
                    kind,
                },
                placement: Placement::Weight,
                shape: [dims[0], dims[1]],
                has_weight_slot: false,
                foreign_reparam: None,
            });
        }
    }
    let mut inventory = Inventory::default();
    model.visit(&mut inventory);
    let Inventory {
        mut found,
        activation,
        slots,
        foreign,
        ..
    } = inventory;
    for layer in &mut found {
        let path = &layer.candidate.path;
        let weight_path = join(path, "weight");
        if activation.contains(path) {
            layer.placement = Placement::Activation;
        }
        layer.has_weight_slot = slots.contains(&weight_path);
        layer.foreign_reparam = foreign.get(&weight_path).cloned();
    }
    found
}

fn join(path: &str, child: &str) -> String {
    if path.is_empty() {
        child.to_string()
    } else {
        format!("{path}.{child}")
    }
}

/// What a method needs to know to create an adapter for one layer.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    /// Path and kind of the layer.
    pub candidate: Candidate,
    /// The base weight, `[rows, cols]` in burn orientation.
    pub base: Tensor<2>,
    /// How the adapter is attached.
    pub placement: Placement,
}

/// A freshly created adapter, and optionally a new base weight (PiSSA-style inits change it).
pub struct Created<A> {
    /// The adapter.
    pub adapter: A,
    /// A replacement for the base weight.
    pub new_base: Option<Tensor<2>>,
}

/// Mutable access to one host during [`for_each`].
pub struct HostView<'a, A: Adapter> {
    /// Path of the layer (e.g. `layers.0.attn.q_proj`).
    pub path: String,
    /// What kind of layer it is.
    pub kind: LayerKind,
    /// How its adapters are attached.
    pub placement: Placement,
    /// Its adapters.
    pub slot: &'a mut AdapterSlot<A>,
    base: BaseRef<'a>,
}

#[allow(clippy::large_enum_variant)]
enum BaseRef<'a> {
    Param(&'a mut Param<Tensor<2>>),
    /// A base kept packed: read dequantized, written back quantized in its own format.
    Packed {
        weight: &'a Param<Tensor<2>>,
        packed: &'a mut peft_kernels::packed_linear::PackedWeight,
    },
    Sibling {
        current: Option<Tensor<2>>,
        out: &'a mut Option<Tensor<2>>,
    },
}

impl<A: Adapter> HostView<'_, A> {
    /// The current base weight (with merged adapters folded in), `[rows, cols]`.
    pub fn base_weight(&self) -> Tensor<2> {
        match &self.base {
            BaseRef::Param(p) => p.val(),
            BaseRef::Packed { weight, packed } => crate::layer::unpacked(packed, &weight.device()),
            BaseRef::Sibling { current, .. } => current
                .clone()
                .expect("a weight slot is always mapped right after its weight"),
        }
    }

    /// Replace the base weight, keeping its parameter id and trainability. A packed base is
    /// quantized again in its own format (which rounds the new values).
    ///
    /// # Errors
    /// A packed base whose new values its format cannot store (non-finite values).
    pub fn set_base_weight(&mut self, weight: Tensor<2>) -> Result<()> {
        match &mut self.base {
            BaseRef::Param(p) => {
                let require_grad = p.is_require_grad();
                let param = (*p).clone();
                **p = param.map(|_| weight.detach().set_require_grad(require_grad));
            }
            BaseRef::Packed { packed, .. } => {
                **packed = crate::layer::pack_weight(weight, packed.format())?;
            }
            BaseRef::Sibling { current, out } => {
                *current = Some(weight.clone());
                **out = Some(weight);
            }
        }
        Ok(())
    }

    /// Whether the base weight is kept packed (merging into it rounds).
    pub fn base_is_packed(&self) -> bool {
        matches!(self.base, BaseRef::Packed { .. })
    }

    /// The bytes a packed base takes (its blocks and scales), `None` for an f32 base.
    pub fn packed_bytes(&self) -> Option<usize> {
        match &self.base {
            BaseRef::Packed { packed, .. } => Some(packed.size_bytes()),
            _ => None,
        }
    }
}

/// Run `f` on every host of adapter type `A` in `model`.
///
/// All or nothing: when `f` fails, `model` is unchanged and the first error is returned.
pub fn for_each<M, A, F>(model: &mut M, mut f: F) -> Result<()>
where
    M: Module,
    A: Adapter,
    F: FnMut(HostView<'_, A>) -> Result<()> + 'static,
{
    for_each_host(model, move |call, any| {
        if let Some(l) = any.downcast_mut::<PeftLinear<A>>() {
            let base = match &mut l.packed {
                Some(packed) => BaseRef::Packed {
                    weight: &l.weight,
                    packed,
                },
                None => BaseRef::Param(&mut l.weight),
            };
            f(HostView {
                path: call.path.clone(),
                kind: LayerKind::Linear,
                placement: Placement::Activation,
                slot: &mut l.adapters,
                base,
            })
        } else if let Some(e) = any.downcast_mut::<PeftEmbedding<A>>() {
            f(HostView {
                path: call.path.clone(),
                kind: LayerKind::Embedding,
                placement: Placement::Activation,
                slot: &mut e.adapters,
                base: BaseRef::Param(&mut e.weight),
            })
        } else if let Some(w) = any.downcast_mut::<WeightSlot<A>>() {
            let path = call
                .path
                .strip_suffix(".weight.peft")
                .unwrap_or(&call.path)
                .to_string();
            f(HostView {
                path,
                kind: w.kind,
                placement: Placement::Weight,
                slot: &mut w.adapters,
                base: BaseRef::Sibling {
                    current: call.sibling_base.clone(),
                    out: &mut call.new_base,
                },
            })
        } else {
            Ok(())
        }
    })
}

/// Keep the frozen base of every `PeftLinear<A>` of `model` whose path `select` accepts packed
/// in `format` ([`PeftLinear::pack`]); returns the paths packed, in traversal order. A base
/// already packed is left as it is.
///
/// All or nothing: when a layer cannot be packed, `model` is unchanged and the error names it.
pub fn pack_linears<M, A>(
    model: &mut M,
    format: peft_kernels::quant::PackedFormat,
    select: impl Fn(&str) -> bool + 'static,
) -> Result<Vec<String>>
where
    M: Module,
    A: Adapter,
{
    let packed = Rc::new(RefCell::new(Vec::new()));
    let sink = packed.clone();
    for_each_host(model, move |call, any| {
        if let Some(l) = any.downcast_mut::<PeftLinear<A>>()
            && l.packed.is_none()
            && select(&call.path)
        {
            *l = l
                .clone()
                .pack(format)
                .map_err(|e| PeftError::Unsupported(format!("packing `{}`: {e}", call.path)))?;
            sink.borrow_mut().push(call.path.clone());
        }
        Ok(())
    })?;
    Ok(packed.take())
}

/// The paths of the layers of `model` whose frozen base is kept packed (any adapter type), in
/// visiting order. Methods that update base weights (selective fine-tuning, full fine-tuning)
/// refuse such a model.
pub fn packed_paths<M: Module>(model: &M) -> Vec<String> {
    struct Find {
        path: Vec<String>,
        out: Vec<String>,
    }
    impl ModuleVisitor for Find {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            if container_type == crate::layer::PACKED_BASE {
                self.out.push(self.path.join("."));
            }
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
    }
    let mut find = Find {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut find);
    find.out
}

/// Give every `PeftLinear<A>` of `model` whose base is packed an f32 base again (the packed
/// values dequantized, [`PeftLinear::unpack`]): what a full-precision merge starts from. Returns
/// how many layers were unpacked.
pub fn unpack_linears<M, A>(model: &mut M) -> Result<usize>
where
    M: Module,
    A: Adapter,
{
    let count = Rc::new(RefCell::new(0usize));
    let sink = count.clone();
    for_each_host(model, move |_, any| {
        if let Some(l) = any.downcast_mut::<PeftLinear<A>>()
            && l.packed.is_some()
        {
            *l = l.clone().unpack();
            *sink.borrow_mut() += 1;
        }
        Ok(())
    })?;
    Ok(count.take())
}

/// Run `f` on every host and collect what it returns, in traversal order.
pub fn collect<M, A, T, F>(model: &M, mut f: F) -> Vec<T>
where
    M: Module,
    A: Adapter,
    T: 'static,
    F: FnMut(&HostView<'_, A>) -> Option<T> + 'static,
{
    let out = Rc::new(RefCell::new(Vec::new()));
    let sink = out.clone();
    let mut copy = model.clone();
    for_each(&mut copy, move |host: HostView<'_, A>| {
        if let Some(item) = f(&host) {
            sink.borrow_mut().push(item);
        }
        Ok(())
    })
    .expect("a read-only host pass cannot fail");
    drop(copy);
    Rc::try_unwrap(out)
        .map(RefCell::into_inner)
        .unwrap_or_else(|rc| rc.borrow_mut().drain(..).collect())
}

/// Attach an adapter named `name` to every layer `spec` selects.
///
/// Layers that are [`PeftLinear`] / [`PeftEmbedding`] get it in activation space; plain
/// `Linear` / `Embedding` layers get it in weight space through a [`WeightSlot`]. `create` builds
/// the adapter of each layer. Returns the paths of the adapted layers. All or nothing: on an
/// error the model is unchanged.
///
/// # Errors
/// No layer selected, a name already used, a weight that carries another reparameterization,
/// or an error from `create`.
pub fn attach<M, A, F>(
    model: &mut M,
    name: &str,
    spec: &TargetSpec,
    create: F,
) -> Result<Vec<String>>
where
    M: Module,
    A: Adapter,
    F: FnMut(&LayerInfo) -> Result<Created<A>> + 'static,
{
    validate_name(name)?;
    let layers = layers(model);
    let candidates: Vec<Candidate> = layers.iter().map(|l| l.candidate.clone()).collect();
    let selected: HashSet<String> = spec
        .select(&candidates)?
        .into_iter()
        .map(|c| c.path.clone())
        .collect();
    let mut fresh_weight = BTreeMap::new();
    for layer in layers
        .iter()
        .filter(|l| selected.contains(&l.candidate.path))
    {
        if let Some(other) = &layer.foreign_reparam {
            return Err(PeftError::Unsupported(format!(
                "`{}.weight` already carries a `{other}` reparameterization; burn allows one per parameter",
                layer.candidate.path
            )));
        }
        if layer.placement == Placement::Weight && !layer.has_weight_slot {
            fresh_weight.insert(join(&layer.candidate.path, "weight"), layer.candidate.kind);
        }
    }
    let create = Rc::new(RefCell::new(create));
    let mut next = model.clone();
    let hosted = Rc::new(RefCell::new(HashSet::new()));
    {
        let create = create.clone();
        let name = name.to_string();
        let selected = selected.clone();
        let hosted = hosted.clone();
        for_each(&mut next, move |mut host: HostView<'_, A>| {
            if !selected.contains(&host.path) {
                return Ok(());
            }
            hosted.borrow_mut().insert(host.path.clone());
            if host.slot.get(&name).is_some() {
                return Err(PeftError::DuplicateAdapter { name: name.clone() });
            }
            let info = LayerInfo {
                candidate: Candidate {
                    path: host.path.clone(),
                    kind: host.kind,
                },
                base: host.base_weight(),
                placement: host.placement,
            };
            let created = (create.borrow_mut())(&info)?;
            if !created.adapter.supports(host.kind) {
                return Err(PeftError::Unsupported(format!(
                    "this adapter cannot be attached to the {:?} layer `{}`",
                    host.kind, host.path
                )));
            }
            host.slot.insert(&name, created.adapter)?;
            if let Some(w) = created.new_base {
                host.set_base_weight(w)?;
            }
            Ok(())
        })?;
    }
    // A selected activation-space layer that is not a host of this adapter type (a
    // `PeftLinear<OtherAdapter>`) would otherwise be skipped in silence.
    if let Some(layer) = layers.iter().find(|l| {
        selected.contains(&l.candidate.path)
            && l.placement == Placement::Activation
            && !hosted.borrow().contains(&l.candidate.path)
    }) {
        return Err(PeftError::Unsupported(format!(
            "`{}` is a PeftLinear / PeftEmbedding of another adapter type: declare the model's \
             layers with this method's adapter (`PeftLinear<{}>`)",
            layer.candidate.path,
            std::any::type_name::<A>()
        )));
    }
    if !fresh_weight.is_empty() {
        let mut attacher = Attacher {
            name: name.to_string(),
            targets: fresh_weight,
            create: Box::new(move |info: &LayerInfo| (create.borrow_mut())(info)),
            error: None,
        };
        next = next.apply_reparameterization(&mut attacher);
        if let Some(e) = attacher.error {
            return Err(e);
        }
    }
    *model = next;
    let mut paths: Vec<String> = selected.into_iter().collect();
    paths.sort();
    Ok(paths)
}

/// Adapter names must be usable as a path segment.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('.') || name.contains('/') {
        return Err(PeftError::InvalidConfig {
            field: "adapter_name".into(),
            reason: format!("`{name}` must be non-empty and contain no `.` or `/`"),
        });
    }
    Ok(())
}

type CreateFn<A> = Box<dyn FnMut(&LayerInfo) -> Result<Created<A>>>;

struct Attacher<A: Adapter> {
    name: String,
    targets: BTreeMap<String, LayerKind>,
    create: CreateFn<A>,
    error: Option<PeftError>,
}

impl<A: Adapter> Reparameterizer for &mut Attacher<A> {
    type Reparam = WeightSlot<A>;

    fn reparameterize<const D: usize>(
        &mut self,
        path: &str,
        param: Param<Tensor<D>>,
    ) -> (Param<Tensor<D>>, Option<WeightSlot<A>>) {
        let Some(kind) = self.targets.get(path).copied() else {
            return (param, None);
        };
        if D != 2 || self.error.is_some() {
            return (param, None);
        }
        let dims = param.lazy_shape();
        let base: Tensor<2> = param.val().reshape([dims[0], dims[1]]);
        let layer_path = path.strip_suffix(".weight").unwrap_or(path).to_string();
        let info = LayerInfo {
            candidate: Candidate {
                path: layer_path,
                kind,
            },
            base,
            placement: Placement::Weight,
        };
        match (self.create)(&info) {
            Err(e) => {
                self.error = Some(e);
                (param, None)
            }
            Ok(created) => {
                let mut adapters = AdapterSlot::default();
                adapters
                    .insert(&self.name, created.adapter)
                    .expect("a fresh slot has no adapter");
                let param = match created.new_base {
                    Some(w) => param.map(|old| w.reshape(old.dims()).detach()),
                    None => param,
                };
                (
                    param.set_require_grad(false),
                    Some(WeightSlot { adapters, kind }),
                )
            }
        }
    }
}

/// Set `require_grad` of every float parameter for which `decide(path)` says so.
///
/// `path` is the parameter's full dotted path (`layers.0.q.weight`,
/// `layers.0.q.peft.default.lora_a`, `layers.0.q.weight.peft.default.lora_a`).
pub fn set_trainable<M, F>(model: M, decide: F) -> M
where
    M: Module,
    F: Fn(&str) -> Option<bool>,
{
    struct Trainability<F> {
        path: Vec<String>,
        decide: F,
    }
    impl<F: Fn(&str) -> Option<bool>> ModuleMapper for Trainability<F> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            match (self.decide)(&self.path.join(".")) {
                Some(flag) => param.set_require_grad(flag),
                None => param,
            }
        }
    }
    model.map(&mut Trainability {
        path: Vec::new(),
        decide,
    })
}

/// Every float parameter's path with its trainability and element count.
pub fn parameters<M: Module>(model: &M) -> Vec<(String, bool, usize)> {
    struct Params {
        path: Vec<String>,
        out: Vec<(String, bool, usize)>,
    }
    impl ModuleVisitor for Params {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push((
                self.path.join("."),
                param.is_require_grad(),
                param.lazy_shape().num_elements(),
            ));
        }
    }
    let mut v = Params {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// The values of the float parameters whose path `select` accepts, by path.
pub fn read_params<M, F>(model: &M, select: F) -> BTreeMap<String, TensorData>
where
    M: Module,
    F: Fn(&str) -> bool,
{
    struct Read<F> {
        path: Vec<String>,
        select: F,
        out: BTreeMap<String, TensorData>,
    }
    impl<F: Fn(&str) -> bool> ModuleVisitor for Read<F> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let path = self.path.join(".");
            if (self.select)(&path) {
                self.out.insert(path, param.val().into_data());
            }
        }
    }
    let mut r = Read {
        path: Vec::new(),
        select,
        out: BTreeMap::new(),
    };
    model.visit(&mut r);
    r.out
}

/// Replace the values of the float parameters named in `values` (same shapes), keeping their
/// ids and trainability. Returns the paths that were not found.
pub fn write_params<M: Module>(model: M, values: BTreeMap<String, TensorData>) -> (M, Vec<String>) {
    struct Write {
        path: Vec<String>,
        values: BTreeMap<String, TensorData>,
    }
    impl ModuleMapper for Write {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(data) = self.values.remove(&self.path.join(".")) else {
                return param;
            };
            let require_grad = param.is_require_grad();
            let device = param.lazy_device();
            param.map(|_| {
                Tensor::<D>::from_data(data, &device)
                    .detach()
                    .set_require_grad(require_grad)
            })
        }
    }
    let mut w = Write {
        path: Vec::new(),
        values,
    };
    let model = model.map(&mut w);
    (model, w.values.into_keys().collect())
}
