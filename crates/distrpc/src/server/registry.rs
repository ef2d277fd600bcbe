//! [`Registry`]: the callee's table of functions, by name.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::handler::Handler;
use crate::error::Error;

/// Names under this prefix (no Rust path can start so) are distrpc's own (gather, barrier): no
/// application function may take one.
pub(crate) const RESERVED: &str = "#distrpc/";

/// A function registered at compile time by `#[distrpc::function]`.
#[doc(hidden)]
#[derive(Debug)]
pub struct Registration {
    /// The stable name.
    pub name: &'static str,
    /// Where it was defined (`module::function`), for the error when two take one name.
    pub origin: &'static str,
    /// Builds the handler.
    pub handler: fn() -> Handler,
}

inventory::collect!(Registration);

/// The callee's table of functions: compile-time registrations, builtins, and closures added
/// at init. A name is taken once: a second function under it is an error that names both.
#[derive(Default, Clone, Debug)]
pub(crate) struct Registry {
    /// Keyed by `Arc<str>`: a call clones its function's name by reference count, not by copy.
    handlers: HashMap<Arc<str>, (Handler, Cow<'static, str>)>,
}

impl Registry {
    /// Every function registered with `#[distrpc::function]` in this binary, and the builtins.
    pub(crate) fn with_registered() -> Result<Self, Error> {
        let mut registry = Self::default();
        for r in inventory::iter::<Registration> {
            registry.insert(r.name, r.origin, (r.handler)())?;
        }
        Ok(registry)
    }

    /// Adds `handler` under `name`, defined at `origin`; fails if the name is taken (naming
    /// both) or reserved.
    pub(crate) fn insert(
        &mut self,
        name: &str,
        origin: impl Into<Cow<'static, str>>,
        handler: Handler,
    ) -> Result<(), Error> {
        let origin = origin.into();
        if name.starts_with(RESERVED) {
            return Err(Error::InvalidArgument(format!(
                "{origin} is registered as {name:?}, but names under {RESERVED:?} are distrpc's own"
            )));
        }
        self.insert_unique(name, origin, handler)
    }

    /// [`Registry::insert`] for distrpc's own functions, in the reserved names.
    pub(crate) fn insert_internal(&mut self, name: &'static str, handler: Handler) {
        // The reserved names are distrpc's alone, each registered once per worker.
        let _ = self.insert_unique(name, Cow::Borrowed("distrpc"), handler);
    }

    fn insert_unique(
        &mut self,
        name: &str,
        origin: Cow<'static, str>,
        handler: Handler,
    ) -> Result<(), Error> {
        if let Some((_, first)) = self.handlers.get(name) {
            return Err(Error::InvalidArgument(format!(
                "two functions are registered as {name:?}: {first} and {origin}"
            )));
        }
        self.handlers.insert(Arc::from(name), (handler, origin));
        Ok(())
    }

    /// The handler of `name`, and the registered name (shared, not copied).
    pub(crate) fn get(&self, name: &str) -> Option<(&Arc<str>, &Handler)> {
        self.handlers.get_key_value(name).map(|(k, (h, _))| (k, h))
    }

    pub(crate) fn len(&self) -> usize {
        self.handlers.len()
    }
}
