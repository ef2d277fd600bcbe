//! Handlers: how the callee runs a function. A typed Rust function becomes a [`Handler`] that
//! decodes its arguments (inside the value scope, so references in them fork), waits until
//! those references are confirmed, runs the function catching panics, and keeps its value.
//! `#[distrpc::function]` and `RpcOptions::register` make them; the registry holds them.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use super::value::Reply;
use super::value::{Keep, Value, kept, lend};
use crate::call::scope::{self, ValueScope};
use crate::error::{Failure, RemoteError};
use crate::tensor::Tensor;

/// What a handler receives: the encoded arguments and the tensors beside them, and for a method
/// the referenced value.
#[doc(hidden)]
pub struct Request {
    pub(crate) payload: Bytes,
    pub(crate) tensors: Vec<Tensor>,
    pub(crate) this: Option<Arc<dyn Value>>,
    /// The scope the arguments are decoded in, and the worker that sent them: remote
    /// references in the arguments become forks of theirs.
    pub(crate) scope: Option<(Arc<dyn ValueScope>, u32)>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("payload_len", &self.payload.len())
            .field("tensors", &self.tensors.len())
            .field("method", &self.this.is_some())
            .finish()
    }
}

/// What a handler produces: the value, or why there is none.
pub(crate) type Produced = Result<Arc<dyn Value>, Failure>;
type BoxFuture = Pin<Box<dyn Future<Output = Produced> + Send>>;

/// How the callee runs a function (opaque outside distrpc).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct Handler(pub(crate) HandlerKind);

#[derive(Clone)]
pub(crate) enum HandlerKind {
    /// On the worker thread pool; may block. Once it has shown itself quick (see [`Speed`]), it
    /// runs inline on the connection's reader instead.
    Sync(Arc<dyn Fn(Request) -> Produced + Send + Sync>, Arc<Speed>),
    /// As a task on the runtime; holds no thread while it waits (torch's `@async_execution`).
    Async(Arc<dyn Fn(Request) -> BoxFuture + Send + Sync>),
    /// Inline on the connection's reader; must never block (distrpc's own control functions).
    Inline(Arc<dyn Fn(Request) -> Produced + Send + Sync>),
}

impl Handler {
    /// Marks a sync function as quick and never blocking: once it has shown itself quick, it
    /// runs on the connection's reader (see [`Speed`]). Other handlers are returned unchanged.
    pub fn inline(self) -> Self {
        match self.0 {
            HandlerKind::Sync(f, _) => Handler(HandlerKind::Sync(
                f,
                Arc::new(Speed {
                    inline: true,
                    ..Speed::default()
                }),
            )),
            other => Handler(other),
        }
    }
}

impl fmt::Debug for HandlerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandlerKind::Sync(..) => "Sync",
            HandlerKind::Async(_) => "Async",
            HandlerKind::Inline(_) => "Inline",
        })
    }
}

/// How quick a sync function has been. A function marked `inline` (`#[distrpc::function(inline)]`,
/// [`Handler::inline`]) runs on the connection's reader (no hand-off to the pool, one wake-up
/// less per call) only after its last [`Speed::TRUSTED`] runs each took less than
/// [`Speed::QUICK`] and never blocked; one slow or blocking run sends it back to the pool until
/// it has shown itself quick again. An unmarked function always runs on the pool: a function
/// that sleeps on a lock or computes for long must never hold up the reader, and only its
/// author can promise it does not.
#[derive(Debug, Default)]
pub(crate) struct Speed {
    /// Marked `inline`: may run on the reader once quick.
    inline: bool,
    quick_runs: AtomicU32,
}

impl Speed {
    const QUICK: Duration = Duration::from_micros(50);
    const TRUSTED: u32 = 16;

    /// Whether the function may run inline.
    pub(crate) fn trusted(&self) -> bool {
        self.inline && self.quick_runs.load(Ordering::Relaxed) >= Self::TRUSTED
    }

    /// Records one run.
    pub(crate) fn record(&self, took: Duration, blocked: bool) {
        if !self.inline {
            return;
        }
        if blocked || took >= Self::QUICK {
            self.quick_runs.store(0, Ordering::Relaxed);
        } else if self.quick_runs.load(Ordering::Relaxed) < Self::TRUSTED {
            self.quick_runs.fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub(crate) fn remote_error(function: &str, type_name: &str, message: String) -> Failure {
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    Failure::Remote(RemoteError {
        worker: super::current::worker_name().unwrap_or_default(),
        function: function.to_string(),
        type_name: type_name.to_string(),
        message,
        backtrace,
    })
}

fn decode_args<A: DeserializeOwned>(function: &str, req: Request) -> Result<A, Failure> {
    let (scope, from) = match &req.scope {
        Some((scope, from)) => (Some(&**scope), *from),
        None => (None, 0),
    };
    let decoded = scope::decoding(scope, from, || {
        crate::codec::decode(&req.payload, req.tensors)
    });
    decoded.map_err(|e| Failure::Decode {
        function: function.to_string(),
        message: e.to_string(),
    })
}

fn produce<R, E>(function: &str, result: Result<R, E>, keep: Keep<R>) -> Produced
where
    E: fmt::Display,
{
    match result {
        Ok(value) => Ok(keep(value)),
        Err(e) => Err(remote_error(
            function,
            std::any::type_name::<E>(),
            e.to_string(),
        )),
    }
}

/// Wraps a blocking function as a handler: decode, run (catching panics), keep the value.
#[doc(hidden)]
pub fn sync_handler<A, R, E, F>(name: &'static str, f: F, keep: Keep<R>) -> Handler
where
    A: DeserializeOwned,
    R: 'static,
    E: fmt::Display,
    F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
{
    Handler(HandlerKind::Sync(
        Arc::new(move |req| run_sync(name, &f, req, keep)),
        Arc::default(),
    ))
}

/// A blocking handler under a name chosen at init, for a closure whose result can be sent.
pub(crate) fn named_sync_handler<A, R, E, F>(name: Arc<str>, f: F) -> Handler
where
    A: DeserializeOwned,
    R: Serialize + Send + Sync + 'static,
    E: fmt::Display,
    F: Fn(A) -> Result<R, E> + Send + Sync + 'static,
{
    Handler(HandlerKind::Sync(
        Arc::new(move |req| run_sync(&name, &f, req, kept::<R>)),
        Arc::default(),
    ))
}

fn run_sync<A, R, E, F>(name: &str, f: &F, req: Request, keep: Keep<R>) -> Produced
where
    A: DeserializeOwned,
    E: fmt::Display,
    F: Fn(A) -> Result<R, E>,
{
    // The arguments' `Deserialize` is user code too: it panics inside the guard.
    let run = || {
        let scope = req.scope.as_ref().map(|(s, _)| s.clone());
        let args = decode_args::<A>(name, req)?;
        if let Some(scope) = scope {
            scope.settle(name)?;
        }
        Ok(f(args))
    };
    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(result)) => produce(name, result, keep),
        Ok(Err(failure)) => Err(failure),
        Err(panic) => Err(remote_error(
            name,
            "panic",
            crate::error::panic_message(&*panic),
        )),
    }
}

/// The value a method is called on, taken from its request.
fn take_this<T: Any + Send + Sync>(name: &str, req: &mut Request) -> Result<Arc<T>, Failure> {
    let this = req.this.take().ok_or_else(|| {
        Failure::Other(format!(
            "{name} is a method: call it through a remote reference"
        ))
    })?;
    lend::<T>(this).map_err(|type_name| Failure::Decode {
        function: name.to_string(),
        message: format!(
            "the referenced value is a {type_name}, the method takes a {}",
            std::any::type_name::<T>()
        ),
    })
}

/// Wraps a blocking method (first parameter `&T`) as a handler.
#[doc(hidden)]
pub fn method_handler<T, A, R, E, F>(name: &'static str, f: F, keep: Keep<R>) -> Handler
where
    T: Any + Send + Sync,
    A: DeserializeOwned,
    R: 'static,
    E: fmt::Display,
    F: Fn(&T, A) -> Result<R, E> + Send + Sync + 'static,
{
    let run = move |mut req: Request| {
        let this = take_this::<T>(name, &mut req)?;
        run_sync(name, &|args| f(&this, args), req, keep)
    };
    Handler(HandlerKind::Sync(Arc::new(run), Arc::default()))
}

/// Decodes an async handler's arguments (inside its panic guard), waits until the references
/// in them are confirmed, then runs `call` on them, catching a panic.
async fn run_async<A, R, E, Fut>(
    name: &'static str,
    req: Request,
    call: impl FnOnce(A) -> Fut,
    keep: Keep<R>,
) -> Produced
where
    A: DeserializeOwned,
    E: fmt::Display,
    Fut: Future<Output = Result<R, E>>,
{
    let scope = req.scope.as_ref().map(|(s, _)| s.clone());
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| decode_args::<A>(name, req)));
    let args = match decoded {
        Ok(args) => args?,
        Err(panic) => {
            let message = crate::error::panic_message(&*panic);
            return Err(remote_error(name, "panic", message));
        }
    };
    if let Some(scope) = scope {
        scope.settle_async(name).await?;
    }
    match AssertUnwindSafe(call(args)).catch_unwind().await {
        Ok(result) => produce(name, result, keep),
        Err(panic) => Err(remote_error(
            name,
            "panic",
            crate::error::panic_message(&*panic),
        )),
    }
}

/// Wraps an async function as a handler that runs as a task.
#[doc(hidden)]
pub fn async_handler<A, R, E, F, Fut>(name: &'static str, f: F, keep: Keep<R>) -> Handler
where
    A: DeserializeOwned + Send + 'static,
    R: 'static,
    E: fmt::Display + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let f = Arc::new(f);
    Handler(HandlerKind::Async(Arc::new(move |req| {
        let f = f.clone();
        Box::pin(run_async(name, req, move |args| f(args), keep))
    })))
}

/// Wraps an async method as a handler that runs as a task; the task owns the value (an `Arc`)
/// while the method borrows it.
#[doc(hidden)]
pub fn async_method_handler<T, A, R, E, F, Fut>(name: &'static str, f: F, keep: Keep<R>) -> Handler
where
    T: Any + Send + Sync,
    A: DeserializeOwned + Send + 'static,
    R: 'static,
    E: fmt::Display + 'static,
    F: Fn(Arc<T>, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
{
    let f = Arc::new(f);
    Handler(HandlerKind::Async(Arc::new(move |mut req| {
        let f = f.clone();
        let this = take_this::<T>(name, &mut req);
        Box::pin(async move {
            let this = this?;
            run_async(name, req, move |args| f(this, args), keep).await
        })
    })))
}

/// An inline handler for distrpc's own control functions, told which worker called (`None`
/// for a call with no sender, which only this worker can make).
pub(crate) fn inline_handler<A, R, F>(name: &'static str, f: F) -> Handler
where
    A: DeserializeOwned,
    R: Serialize + Send + Sync + 'static,
    F: Fn(Option<u32>, A) -> Result<R, String> + Send + Sync + 'static,
{
    Handler(HandlerKind::Inline(Arc::new(move |req| {
        let caller = req.scope.as_ref().map(|(_, from)| *from);
        run_sync(name, &|args| f(caller, args), req, kept::<R>)
    })))
}
