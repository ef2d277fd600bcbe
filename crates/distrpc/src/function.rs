//! Functions that can be called remotely: typed handles ([`Function`]), and the registry that
//! maps names to handlers on the callee.
//!
//! A function is found on the callee by a stable name, as torch finds a pickled Python function
//! by its module path. `#[distrpc::function]` registers a Rust function under
//! `module_path!()::name` in every process built with it (through `inventory`) and defines a
//! [`Function`] constant of the same name for callers. Closures can be registered at init with
//! [`RpcOptions::register`](crate::RpcOptions::register) and called through
//! [`Function::named`].

use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Failure, RemoteError};
use crate::tensor::Tensor;

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

/// What a handler receives: the encoded arguments and the tensors beside them.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) payload: Bytes,
    pub(crate) tensors: Vec<Tensor>,
}

/// What a handler produces: the encoded result and its tensors.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    pub(crate) payload: Vec<u8>,
    pub(crate) tensors: Vec<Tensor>,
}

pub(crate) type Outcome = Result<Reply, Failure>;
type BoxFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// How the callee runs a function (opaque outside distrpc).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Handler(pub(crate) HandlerKind);

#[derive(Clone)]
pub(crate) enum HandlerKind {
    /// On the worker thread pool; may block.
    Sync(Arc<dyn Fn(Request) -> Outcome + Send + Sync>),
    /// As a task on the runtime; holds no thread while it waits (torch's `@async_execution`).
    Async(Arc<dyn Fn(Request) -> BoxFuture + Send + Sync>),
    /// Inline on the connection's reader; must never block (distrpc's own control functions).
    Inline(Arc<dyn Fn(Request) -> Outcome + Send + Sync>),
}

impl fmt::Debug for HandlerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandlerKind::Sync(_) => "Sync",
            HandlerKind::Async(_) => "Async",
            HandlerKind::Inline(_) => "Inline",
        })
    }
}

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

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_string())
}

pub(crate) fn remote_error(function: &str, type_name: &str, message: String) -> Failure {
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    Failure::Remote(RemoteError {
        worker: crate::rpc::current_worker_name().unwrap_or_default(),
        function: function.to_string(),
        type_name: type_name.to_string(),
        message,
        backtrace,
    })
}

fn decode_args<A: DeserializeOwned>(function: &str, req: Request) -> Result<A, Failure> {
    crate::codec::decode(&req.payload, req.tensors).map_err(|e| Failure::Decode {
        function: function.to_string(),
        message: e.to_string(),
    })
}

fn encode_result<R: Serialize, E: fmt::Display>(function: &str, result: Result<R, E>) -> Outcome {
    match result {
        Ok(value) => {
            let mut payload = Vec::new();
            let tensors = crate::codec::encode(&value, &mut payload).map_err(|e| {
                remote_error(
                    function,
                    "distrpc::EncodeError",
                    format!("cannot encode result: {e}"),
                )
            })?;
            Ok(Reply { payload, tensors })
        }
        Err(e) => Err(remote_error(
            function,
            std::any::type_name::<E>(),
            e.to_string(),
        )),
    }
}

/// Wraps a blocking function as a handler: decode, run (catching panics), encode.
#[doc(hidden)]
pub fn sync_handler<A, R, E, F>(name: &'static str, f: F) -> Handler
where
    A: DeserializeOwned,
    R: Serialize,
    E: fmt::Display,
    F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
{
    Handler(HandlerKind::Sync(Arc::new(move |req| {
        run_sync(name, &f, req)
    })))
}

fn run_sync<A, R, E, F>(name: &str, f: &F, req: Request) -> Outcome
where
    A: DeserializeOwned,
    R: Serialize,
    E: fmt::Display,
    F: Fn(A) -> Result<R, E>,
{
    let args = decode_args::<A>(name, req)?;
    match std::panic::catch_unwind(AssertUnwindSafe(|| f(args))) {
        Ok(result) => encode_result(name, result),
        Err(panic) => Err(remote_error(name, "panic", panic_message(&*panic))),
    }
}

/// Wraps an async function as a handler that runs as a task.
#[doc(hidden)]
pub fn async_handler<A, R, E, F, Fut>(name: &'static str, f: F) -> Handler
where
    A: DeserializeOwned + Send + 'static,
    R: Serialize,
    E: fmt::Display,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let f = Arc::new(f);
    Handler(HandlerKind::Async(Arc::new(move |req| {
        let f = f.clone();
        Box::pin(async move {
            let args = decode_args::<A>(name, req)?;
            match AssertUnwindSafe(f(args)).catch_unwind().await {
                Ok(result) => encode_result(name, result),
                Err(panic) => Err(remote_error(name, "panic", panic_message(&*panic))),
            }
        })
    })))
}

/// The callee's table of functions: compile-time registrations, builtins, and closures added
/// at init.
#[derive(Default, Clone, Debug)]
pub(crate) struct Registry {
    handlers: HashMap<Cow<'static, str>, Handler>,
}

impl Registry {
    /// Every function registered with `#[distrpc::function]` in this binary, and the builtins.
    pub(crate) fn with_registered() -> Self {
        let mut handlers = HashMap::new();
        for r in inventory::iter::<Registration> {
            handlers.insert(Cow::Borrowed(r.name), (r.handler)());
        }
        Self { handlers }
    }

    pub(crate) fn insert(&mut self, name: impl Into<Cow<'static, str>>, handler: Handler) {
        self.handlers.insert(name.into(), handler);
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Handler> {
        self.handlers.get(name)
    }

    pub(crate) fn len(&self) -> usize {
        self.handlers.len()
    }
}

/// A closure registered at init, before it is given its name.
pub(crate) fn closure_handler<A, R, E, F>(name: Arc<str>, f: F) -> Handler
where
    A: DeserializeOwned,
    R: Serialize,
    E: fmt::Display,
    F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
{
    Handler(HandlerKind::Sync(Arc::new(move |req| {
        run_sync(&name, &f, req)
    })))
}

/// An inline handler for distrpc's own control functions.
pub(crate) fn inline_handler<A, R, F>(name: &'static str, f: F) -> Handler
where
    A: DeserializeOwned,
    R: Serialize,
    F: Fn(A) -> Result<R, String> + Send + Sync + 'static,
{
    Handler(HandlerKind::Inline(Arc::new(move |req| {
        run_sync(name, &f, req)
    })))
}
