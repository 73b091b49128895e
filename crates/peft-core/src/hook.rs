//! Reaching every adapter host inside a user's model, whatever its type.
//!
//! burn's module traversal (`Module::map`) only exposes leaf parameters to a
//! [`ModuleMapper`]. The adapter hosts of this crate ([`PeftLinear`](crate::PeftLinear),
//! [`PeftEmbedding`](crate::PeftEmbedding) and the weight-space
//! [`WeightSlot`](crate::WeightSlot)) implement `Module::map` themselves and, when a host pass
//! installed by [`for_each_host`] is running on the current thread, hand themselves to its
//! callback before mapping their children. This gives typed, mutable access to every host of
//! any burn model with no change to the model's code, and keeps models plain values (no shared
//! state between clones).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;

use crate::error::Result;

/// What a host learns about its position during a host pass.
pub(crate) struct HostCall {
    /// Dotted path of the host module itself.
    pub path: String,
    /// For a weight slot: the base weight mapped just before it, if it is its sibling.
    pub sibling_base: Option<Tensor<2>>,
    /// For a weight slot: a replacement for that base weight.
    pub new_base: Option<Tensor<2>>,
}

type Callback = Box<dyn FnMut(&mut HostCall, &mut dyn Any) -> Result<()>>;

struct Context {
    path: Vec<String>,
    callback: Option<Callback>,
    error: Option<crate::error::PeftError>,
    last_float: Option<(String, Box<dyn Any>)>,
    replacements: HashMap<String, Tensor<2>>,
}

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Called by hosts at the start of their `Module::map`.
pub(crate) fn visit_host<H: Any>(host: &mut H) {
    let taken = CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        let ctx = c.as_mut()?;
        if ctx.error.is_some() {
            return None;
        }
        let path = ctx.path.join(".");
        let sibling_base = ctx
            .last_float
            .take()
            .filter(|(p, _)| {
                path.strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            })
            .and_then(|(_, t)| t.downcast::<Param<Tensor<2>>>().ok())
            .map(|p| p.val());
        Some((ctx.callback.take()?, path, sibling_base))
    });
    let Some((mut callback, path, sibling_base)) = taken else {
        return;
    };
    let mut call = HostCall {
        path,
        sibling_base,
        new_base: None,
    };
    let outcome = callback(&mut call, host);
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        let ctx = c.as_mut().expect("host pass context");
        ctx.callback = Some(callback);
        match outcome {
            Err(e) => ctx.error = Some(e),
            Ok(()) => {
                if let Some(w) = call.new_base {
                    let base_path = call
                        .path
                        .rsplit_once('.')
                        .map(|(head, _)| head.to_string())
                        .unwrap_or_default();
                    ctx.replacements.insert(base_path, w);
                }
            }
        }
    });
}

struct Tracker {
    replace: bool,
}

impl Tracker {
    fn with_ctx<T>(f: impl FnOnce(&mut Context) -> T) -> T {
        CONTEXT.with(|c| f(c.borrow_mut().as_mut().expect("host pass context")))
    }
}

impl ModuleMapper for Tracker {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        Self::with_ctx(|c| c.path.push(name.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        Self::with_ctx(|c| {
            c.path.pop();
        });
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D != 2 {
            return param;
        }
        let replace = self.replace;
        let replacement = Self::with_ctx(|c| {
            let path = c.path.join(".");
            if replace {
                c.replacements.remove(&path)
            } else {
                c.last_float = Some((path, Box::new(param.clone())));
                None
            }
        });
        match replacement {
            Some(w) => {
                let require_grad = param.is_require_grad();
                param.map(|old| {
                    let dims = old.dims();
                    w.reshape(dims).detach().set_require_grad(require_grad)
                })
            }
            None => param,
        }
    }
}

/// Run `callback` on every adapter host of `model`, in traversal order.
///
/// The callback gets the host's path and the host as `&mut dyn Any`; the crate's typed helpers
/// ([`crate::hosts`]) downcast it. The model is only replaced when every call succeeded: on an
/// error, `model` is left exactly as it was and the first error is returned.
pub(crate) fn for_each_host<M, F>(model: &mut M, callback: F) -> Result<()>
where
    M: Module,
    F: FnMut(&mut HostCall, &mut dyn Any) -> Result<()> + 'static,
{
    let previous = CONTEXT.with(|c| {
        c.borrow_mut().replace(Context {
            path: Vec::new(),
            callback: Some(Box::new(callback)),
            error: None,
            last_float: None,
            replacements: HashMap::new(),
        })
    });
    assert!(previous.is_none(), "host passes cannot be nested");
    let mapped = model.clone().map(&mut Tracker { replace: false });
    let (error, pending) = CONTEXT.with(|c| {
        let ctx = c.borrow_mut().take().expect("host pass context");
        (ctx.error, ctx.replacements)
    });
    if let Some(e) = error {
        return Err(e);
    }
    let mapped = if pending.is_empty() {
        mapped
    } else {
        CONTEXT.with(|c| {
            *c.borrow_mut() = Some(Context {
                path: Vec::new(),
                callback: None,
                error: None,
                last_float: None,
                replacements: pending,
            })
        });
        let mapped = mapped.map(&mut Tracker { replace: true });
        CONTEXT.with(|c| c.borrow_mut().take());
        mapped
    };
    *model = mapped;
    Ok(())
}
