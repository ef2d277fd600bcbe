//! [`ValueScope`]: what a value crossing this worker is encoded and decoded inside of.
//!
//! Remote references fork when they are serialized and become new users when deserialized:
//! that needs the worker's reference state, which lives a layer up (`rref`). The reference
//! layer registers itself here, and every encode and decode of call arguments and results runs
//! inside it; without one (a worker being dropped), values are encoded plainly.

use std::future::Future;
use std::pin::Pin;

use crate::error::Failure;

/// A future of whether a handler may run.
pub(crate) type Settled = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send>>;

/// The context of values crossing this worker (implemented by the reference layer).
pub(crate) trait ValueScope: Send + Sync {
    /// Runs `f`, an encode of a value leaving this worker for worker `to`.
    fn encoding(&self, to: u32, f: &mut dyn FnMut());
    /// Runs `f`, a decode of a value that `from` sent.
    fn decoding(&self, from: u32, f: &mut dyn FnMut());
    /// After a decode of a handler's arguments on this thread: waits until what they carried
    /// may be used (references confirmed by their owners).
    fn settle(&self, function: &str) -> Result<(), Failure>;
    /// [`ValueScope::settle`] for async handlers; takes what it waits for at once.
    fn settle_async(&self, function: &str) -> Settled;
}

/// Runs `f` inside `scope.encoding` for worker `to`, if there is a scope.
pub(crate) fn encoding<R>(scope: Option<&dyn ValueScope>, to: u32, f: impl FnOnce() -> R) -> R {
    match scope {
        None => f(),
        Some(scope) => {
            let (mut f, mut out) = (Some(f), None);
            scope.encoding(to, &mut || out = f.take().map(|f| f()));
            match out {
                Some(out) => out,
                // `encoding` runs its closure exactly once; if it did not, run it here.
                None => f.map_or_else(|| unreachable!("ran once"), |f| f()),
            }
        }
    }
}

/// Runs `f` inside `scope.decoding(from)`, if there is a scope.
pub(crate) fn decoding<R>(scope: Option<&dyn ValueScope>, from: u32, f: impl FnOnce() -> R) -> R {
    match scope {
        None => f(),
        Some(scope) => {
            let (mut f, mut out) = (Some(f), None);
            scope.decoding(from, &mut || out = f.take().map(|f| f()));
            match out {
                Some(out) => out,
                None => f.map_or_else(|| unreachable!("ran once"), |f| f()),
            }
        }
    }
}
