//! Helpers shared by the integration tests.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

/// Every float parameter of `model` by module path, to check which ones a training run changed.
pub fn parameters<M: Module>(model: &M) -> BTreeMap<String, TensorData> {
    struct Collect(Vec<String>, BTreeMap<String, TensorData>);
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.push(name.into());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.1.insert(self.0.join("."), param.val().to_data());
        }
    }
    let mut c = Collect(Vec::new(), BTreeMap::new());
    model.visit(&mut c);
    c.1
}
