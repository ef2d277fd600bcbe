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

/// A typed handle to a remotely callable function: `A` is the tuple of its arguments, `R` what
/// it returns (the `Ok` type, for a function that returns `Result`).
///
/// ```
/// use distrpc::Function;
///
/// // A handle to a closure registered on the callee under "double".
/// let double: Function<(i64,), i64> = Function::named("double");
/// assert_eq!(double.name(), "double");
/// ```
pub struct Function<A, R> {
    name: Cow<'static, str>,
    _types: PhantomData<fn(A) -> R>,
}

impl<A, R> Function<A, R> {
    /// A handle to the function registered under `name` (used by `#[distrpc::function]`).
    pub const fn new(name: &'static str) -> Self {
        Self {
            name: Cow::Borrowed(name),
            _types: PhantomData,
        }
    }

    /// A handle to the function registered under `name`, for closures registered at init.
    pub fn named(name: impl Into<Cow<'static, str>>) -> Self {
        Self {
            name: name.into(),
            _types: PhantomData,
        }
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<A, R> Clone for Function<A, R> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            _types: PhantomData,
        }
    }
}

impl<A, R> fmt::Debug for Function<A, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Function({})", self.name)
    }
}

/// A handle to a method: a function whose first parameter is `&T`, run on the owner of a remote
/// reference to a `T` with the referenced value as that parameter (see `RRef::rpc_sync`).
/// `#[distrpc::function]` makes one when the first parameter is a reference.
pub struct Method<T, A, R> {
    name: &'static str,
    _types: PhantomData<fn(&T, A) -> R>,
}

impl<T, A, R> Method<T, A, R> {
    /// A handle to the method registered under `name` (used by `#[distrpc::function]`).
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            _types: PhantomData,
        }
    }

    /// The registered name.
    pub fn name(&self) -> &str {
        self.name
    }
}

impl<T, A, R> Clone for Method<T, A, R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, A, R> Copy for Method<T, A, R> {}

impl<T, A, R> fmt::Debug for Method<T, A, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Method({})", self.name)
    }
}
