//! Which worker a handler runs for: set on the thread (sync handlers) or task (async ones)
//! while it runs, so that `Rpc::current()` can find the user's handle for nested calls and
//! remote errors can name the worker. The handle is opaque here (`dyn Any`): the API layer
//! above puts it in and takes it out, the server only carries it.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, Weak};

/// The worker a handler runs for.
#[derive(Debug)]
pub(crate) struct Current {
    /// The user's handle (the API layer's, downcast there).
    pub(crate) api: Weak<dyn Any + Send + Sync>,
    /// The worker's name.
    pub(crate) name: String,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Current>>> = const { RefCell::new(None) };
}

tokio::task_local! {
    static CURRENT_TASK: Arc<Current>;
}

/// Runs `f` with `current` as the current worker on this thread.
pub(crate) fn with_current<R>(current: &Arc<Current>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<Current>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = previous);
        }
    }
    let previous = CURRENT.with(|c| c.borrow_mut().replace(current.clone()));
    let _restore = Restore(previous);
    f()
}

/// `fut` with `current` as the current worker while it runs.
pub(crate) fn scope_current<F: Future>(
    current: Arc<Current>,
    fut: F,
) -> impl Future<Output = F::Output> {
    CURRENT_TASK.scope(current, fut)
}

/// The worker whose handler runs on this thread or task.
pub(crate) fn current() -> Option<Arc<Current>> {
    CURRENT
        .with(|c| c.borrow().clone())
        .or_else(|| CURRENT_TASK.try_with(Arc::clone).ok())
}

/// The name of the worker whose handler runs on this thread or task.
pub(crate) fn worker_name() -> Option<String> {
    current().map(|c| c.name.clone())
}
