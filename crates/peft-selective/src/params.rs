//! Reading and writing a model's float parameters by path, flattened, without autodiff.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

/// One float parameter of a model.
pub(crate) struct ParamInfo {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub require_grad: bool,
}

/// Every float parameter of `model`, in visiting order.
pub(crate) fn inventory<M: Module>(model: &M) -> Vec<ParamInfo> {
    struct Inv {
        path: Vec<String>,
        out: Vec<ParamInfo>,
    }
    impl ModuleVisitor for Inv {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.out.push(ParamInfo {
                path: self.path.join("."),
                id: param.id,
                shape: param.lazy_shape().to_vec(),
                require_grad: param.is_require_grad(),
            });
        }
    }
    let mut v = Inv {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Paths of the running statistics (`running_mean`, `running_var`) of every BatchNorm module of
/// `model`: the toolkit's `bn_metadata`, state a summary keeps besides the chosen entries.
pub(crate) fn batch_norm_stats<M: Module>(model: &M) -> Vec<String> {
    struct Bn {
        path: Vec<String>,
        containers: Vec<bool>,
        out: Vec<String>,
    }
    impl ModuleVisitor for Bn {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.push(name.to_string());
            self.containers.push(container_type.contains("BatchNorm"));
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
            self.containers.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(name) = self.path.last() else { return };
            // `enter_module` names the field with the type of the struct that holds it.
            if self.containers.last() == Some(&true)
                && !param.is_require_grad()
                && (name == "running_mean" || name == "running_var")
            {
                self.out.push(self.path.join("."));
            }
        }
    }
    let mut v = Bn {
        path: Vec::new(),
        containers: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut v);
    v.out
}

/// The current value (and gradient) of one tracked parameter, flattened and detached.
pub(crate) struct Snapshot {
    pub value: Tensor<1>,
    pub grad: Option<Tensor<1>>,
    pub shape: Vec<usize>,
}

/// Snapshots of the parameters named in `lookup` (path -> slot), one slot each.
pub(crate) fn snapshots<M: Module>(
    model: &M,
    lookup: &HashMap<String, usize>,
    grads: Option<&GradientsParams>,
) -> Vec<Option<Snapshot>> {
    struct Collect<'a> {
        path: Vec<String>,
        lookup: &'a HashMap<String, usize>,
        grads: Option<&'a GradientsParams>,
        out: Vec<Option<Snapshot>>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let Some(&slot) = self.lookup.get(&self.path.join(".")) else {
                return;
            };
            let base: Tensor<D> = (**param).clone();
            let shape = base.dims().to_vec();
            let numel = shape.iter().product::<usize>();
            let value = base.inner().reshape([numel]);
            let grad = self
                .grads
                .and_then(|g| g.get::<D>(param.id))
                .map(|g| g.inner().reshape([numel]));
            self.out[slot] = Some(Snapshot { value, grad, shape });
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        lookup,
        grads,
        out: (0..lookup.len()).map(|_| None).collect(),
    };
    model.visit(&mut c);
    c.out
}

/// Replace the parameters named in `lookup` whose slot in `values` is `Some` with those flat
/// values (reshaped), keeping ids, autodiff and `require_grad`.
pub(crate) fn write<M: Module>(
    model: M,
    lookup: &HashMap<String, usize>,
    values: Vec<Option<Tensor<1>>>,
) -> M {
    struct Write<'a> {
        path: Vec<String>,
        lookup: &'a HashMap<String, usize>,
        values: Vec<Option<Tensor<1>>>,
    }
    impl ModuleMapper for Write<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let Some(&slot) = self.lookup.get(&self.path.join(".")) else {
                return param;
            };
            let Some(flat) = self.values[slot].take() else {
                return param;
            };
            let (id, old, mapper) = param.consume();
            let autodiff = old.is_autodiff();
            let require_grad = old.is_require_grad();
            let mut new: Tensor<D> = flat.reshape(old.dims());
            if autodiff {
                new = Tensor::from_inner(new);
            }
            if require_grad {
                new = new.require_grad();
            }
            Param::from_mapped_value(id, new, mapper)
        }
    }
    model.map(&mut Write {
        path: Vec::new(),
        lookup,
        values,
    })
}
