//! [`Registry`]: the callee's table of functions, by name.

use std::collections::HashMap;
use std::sync::Arc;

use super::handler::Handler;

/// A function registered at compile time by `#[distrpc::function]`.
#[doc(hidden)]
#[derive(Debug)]
pub struct Registration {
    /// The stable name.
    pub name: &'static str,
    /// Builds the handler.
    pub handler: fn() -> Handler,
}

inventory::collect!(Registration);

/// The callee's table of functions: compile-time registrations, builtins, and closures added
/// at init.
#[derive(Default, Clone, Debug)]
pub(crate) struct Registry {
    /// Keyed by `Arc<str>`: a call clones its function's name by reference count, not by copy.
    handlers: HashMap<Arc<str>, Handler>,
}

impl Registry {
    /// Every function registered with `#[distrpc::function]` in this binary, and the builtins.
    pub(crate) fn with_registered() -> Self {
        let mut handlers = HashMap::new();
        for r in inventory::iter::<Registration> {
            handlers.insert(Arc::from(r.name), (r.handler)());
        }
        Self { handlers }
    }

    pub(crate) fn insert(&mut self, name: impl AsRef<str>, handler: Handler) {
        self.handlers.insert(Arc::from(name.as_ref()), handler);
    }

    /// The handler of `name`, and the registered name (shared, not copied).
    pub(crate) fn get(&self, name: &str) -> Option<(&Arc<str>, &Handler)> {
        self.handlers.get_key_value(name)
    }

    pub(crate) fn len(&self) -> usize {
        self.handlers.len()
    }
}
