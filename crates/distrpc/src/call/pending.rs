//! [`PendingTable`]: the calls waiting for a reply, their deadlines, and the timer task.
//!
//! Every pending call leaves the table exactly once, through [`PendingTable::take`]: by its
//! reply, its timeout, the loss of its connection, a failed send, or shutdown. So every future
//! completes.

use crate::sync::lock;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distrpc_wire::Frame;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::activity::{Activity, Counter};
use crate::error::Error;
use crate::runtime::Tasks;

/// Receives the reply frame of a call, or why there is none.
pub(crate) type Done = Box<dyn FnOnce(Result<Frame, Error>) + Send>;

/// One call waiting for its reply.
pub(crate) struct Pending {
    /// The connection it was sent on.
    pub(crate) conn: u64,
    pub(crate) peer: u32,
    pub(crate) function: String,
    pub(crate) started: std::time::Instant,
    pub(crate) deadline: Option<(Instant, Duration)>,
    /// distrpc's own call (gather, barrier), which shutdown does not wait for.
    pub(crate) internal: bool,
    pub(crate) done: Done,
    /// Its count in the worker's activity, set by [`PendingTable::register`]; `None` before.
    pub(crate) counted: Option<Counted>,
}

/// A pending call's count in its worker's activity, released once the call is completed — its
/// callback has run, its result is wherever the callback puts it — or dropped: graceful
/// shutdown, which waits for the count to reach zero, then finds every result delivered.
pub(crate) struct Counted(Arc<Activity>, Counter);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.add(self.1, -1);
    }
}

/// The deadlines of pending calls, and when the timer task will next wake up.
#[derive(Debug, Default)]
struct Deadlines {
    set: BTreeSet<(Instant, u64)>,
    /// The deadline the timer sleeps until (`None`: it sleeps until woken).
    armed: Option<Instant>,
}

/// The calls of one worker waiting for replies.
#[derive(Debug)]
pub(crate) struct PendingTable {
    calls: Mutex<HashMap<u64, Pending>>,
    deadlines: Mutex<Deadlines>,
    deadline_changed: Notify,
    activity: Arc<Activity>,
}

impl Pending {
    /// Hands the call its result. What runs here is user code too (`then` callbacks, a
    /// result's `Deserialize`), on whichever thread read the reply: a panic in it is caught,
    /// so that the reader keeps serving; the future it was to complete fails instead.
    pub(crate) fn complete(self, result: Result<Frame, Error>) {
        let Pending {
            function,
            done,
            counted,
            ..
        } = self;
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(result)))
        {
            let message = crate::error::panic_message(&*panic);
            tracing::error!(%function, %message, "completing a call panicked");
        }
        drop(counted);
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("peer", &self.peer)
            .field("function", &self.function)
            .finish()
    }
}

impl PendingTable {
    pub(crate) fn new(activity: Arc<Activity>) -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(HashMap::new()),
            deadlines: Mutex::new(Deadlines::default()),
            deadline_changed: Notify::new(),
            activity,
        })
    }

    /// Adds a call (counted until it is completed, see [`Counted`]).
    pub(crate) fn register(&self, id: u64, mut pending: Pending) {
        let counter = counter(pending.internal);
        self.activity.add(counter, 1);
        pending.counted = Some(Counted(self.activity.clone(), counter));
        if let Some((at, _)) = pending.deadline {
            let mut deadlines = lock(&self.deadlines);
            deadlines.set.insert((at, id));
            // Wake the timer only if it would sleep past this deadline: not for the common
            // call whose deadline comes after that of the call before it.
            let sooner = deadlines.armed.is_none_or(|armed| at < armed);
            if sooner {
                deadlines.armed = Some(at);
            }
            drop(deadlines);
            if sooner {
                self.deadline_changed.notify_one();
            }
        }
        lock(&self.calls).insert(id, pending);
    }

    /// Removes a pending call, if it is still pending (and, given `conn`, was sent on that
    /// connection), keeping the counts and deadlines in step.
    pub(crate) fn take(&self, id: u64, conn: Option<u64>) -> Option<Pending> {
        let p = {
            let mut calls = lock(&self.calls);
            match calls.get(&id) {
                Some(p) if conn.is_none_or(|c| c == p.conn) => calls.remove(&id),
                _ => None,
            }
        }?;
        if let Some((at, _)) = p.deadline {
            lock(&self.deadlines).set.remove(&(at, id));
        }
        Some(p)
    }

    /// Fails call `id`, if still pending, with the error `error` makes of it.
    pub(crate) fn fail(&self, id: u64, error: impl FnOnce(&Pending) -> Error) {
        if let Some(p) = self.take(id, None) {
            let e = error(&p);
            p.complete(Err(e));
        }
    }

    /// Fails every call that `keep` selects.
    pub(crate) fn fail_where(
        &self,
        select: impl Fn(&Pending) -> bool,
        error: impl Fn(&Pending) -> Error,
    ) {
        let ids: Vec<u64> = lock(&self.calls)
            .iter()
            .filter(|(_, p)| select(p))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.fail(id, &error);
        }
    }

    /// Starts the task that fails calls whose deadline passed, with the error `timeout` makes.
    pub(crate) fn start_timer(
        self: &Arc<Self>,
        tasks: &Tasks,
        timeout: impl Fn(&Pending) -> Error + Send + 'static,
    ) {
        let (table, t) = (self.clone(), tasks.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = t.cancelled() => {}
                _ = table.run_timer(timeout) => {}
            }
        });
    }

    async fn run_timer(&self, timeout: impl Fn(&Pending) -> Error) {
        loop {
            let next = {
                let mut deadlines = lock(&self.deadlines);
                deadlines.armed = deadlines.set.first().map(|(t, _)| *t);
                deadlines.armed
            };
            let changed = self.deadline_changed.notified();
            tokio::select! {
                _ = changed => {}
                _ = async {
                    match next {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
            }
            let now = Instant::now();
            let expired: Vec<u64> = {
                let mut deadlines = lock(&self.deadlines);
                let mut ids = Vec::new();
                while let Some(&(t, id)) = deadlines.set.first() {
                    if t > now {
                        break;
                    }
                    deadlines.set.pop_first();
                    ids.push(id);
                }
                ids
            };
            for id in expired {
                self.fail(id, &timeout);
            }
        }
    }
}

fn counter(internal: bool) -> Counter {
    if internal {
        Counter::ClientInternal
    } else {
        Counter::Client
    }
}
