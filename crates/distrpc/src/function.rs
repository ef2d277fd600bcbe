//! Functions that can be called remotely: the caller's typed handles ([`Function`],
//! [`Method`]). The callee's side (handlers and the registry) is the server's.
//!
//! A function is found on the callee by a stable name, as torch finds a pickled Python function
//! by its module path. `#[distrpc::function]` registers a Rust function under
//! `module_path!()::name` in every process built with it (through `inventory`) and defines a
//! [`Function`] constant of the same name for callers. Closures can be registered at init with
//! [`RpcOptions::register`](crate::RpcOptions::register) and called through
//! [`Function::named`].

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

/// The local function of a handle that has none (a closure registered by name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocal;

/// A typed handle to a remotely callable function: `A` is the tuple of its arguments, `R` what
/// it returns (the `Ok` type, for a function that returns `Result`), `L` the function itself
/// when the handle was made by `#[distrpc::function]`: the handle derefs to it, so the function
/// stays callable locally under its own name (`add(1, 2)`; `*add` is the plain `fn`).
///
/// ```
/// use distrpc::Function;
///
/// // A handle to a closure registered on the callee under "double".
/// let double: Function<(i64,), i64> = Function::named("double");
/// assert_eq!(double.name(), "double");
///
/// #[distrpc::function]
/// fn add(a: i64, b: i64) -> i64 {
///     a + b
/// }
/// assert_eq!(add(2, 3), 5);                      // a plain local call
/// assert!(add.name().ends_with("::add"));        // the handle for rpc_sync / rpc_async
/// ```
pub struct Function<A, R, L = NoLocal> {
    name: Cow<'static, str>,
    local: L,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R> Function<A, R> {
    /// A handle to the function registered under `name`.
    pub const fn new(name: &'static str) -> Self {
        Self::with_local(name, NoLocal)
    }

    /// A handle to the function registered under `name`, for closures registered at init.
    pub fn named(name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            local: NoLocal,
            _types: PhantomData,
        }
    }
}

impl<A, R, L> Function<A, R, L> {
    /// A handle to the function registered under `name` that is also `local` here (used by
    /// `#[distrpc::function]`).
    pub const fn with_local(name: &'static str, local: L) -> Self {
        Self {
            name: Cow::Borrowed(name),
            local,
            _types: PhantomData,
        }
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<A, R, L> std::ops::Deref for Function<A, R, L> {
    type Target = L;

    /// The function itself, for local calls.
    fn deref(&self) -> &L {
        &self.local
    }
}

impl<A, R, L: Clone> Clone for Function<A, R, L> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            local: self.local.clone(),
            _types: PhantomData,
        }
    }
}

impl<A, R, L> fmt::Debug for Function<A, R, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Function({})", self.name)
    }
}

/// A handle to a method: a function marked `#[distrpc::function(method)]`, whose first
/// parameter is `&T`, run on the owner of a remote reference to a `T` with the referenced value
/// as that parameter (see `RRef::rpc_sync`). Like [`Function`], it derefs to the function.
pub struct Method<T, A, R, L = NoLocal> {
    name: &'static str,
    local: L,
    _types: PhantomData<fn(&T, A) -> R>,
}

impl<T, A, R> Method<T, A, R> {
    /// A handle to the method registered under `name`.
    pub const fn new(name: &'static str) -> Self {
        Self::with_local(name, NoLocal)
    }
}

impl<T, A, R, L> Method<T, A, R, L> {
    /// A handle to the method registered under `name` that is also `local` here (used by
    /// `#[distrpc::function(method)]`).
    pub const fn with_local(name: &'static str, local: L) -> Self {
        Self {
            name,
            local,
            _types: PhantomData,
        }
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        self.name
    }
}

impl<T, A, R, L> std::ops::Deref for Method<T, A, R, L> {
    type Target = L;

    /// The method itself, for local calls.
    fn deref(&self) -> &L {
        &self.local
    }
}

impl<T, A, R, L: Clone> Clone for Method<T, A, R, L> {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            local: self.local.clone(),
            _types: PhantomData,
        }
    }
}

impl<T, A, R, L: Copy> Copy for Method<T, A, R, L> {}

impl<T, A, R, L> fmt::Debug for Method<T, A, R, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Method({})", self.name)
    }
}
