//! The live side of remote references on one worker: the owner's values, the ledger behind a
//! lock, and waiting for confirmations. The service drives it and carries out the ledger's effects.

use crate::sync::{lock, wait_until};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::ledger::{Effect, ForkId, GlobalId, Ledger, LedgerInfo, RRefId};
use crate::error::Failure;
use crate::server::value::Value;

/// Called with the owner's value once it exists (or with why it never will).
pub(crate) type Waiter = Box<dyn FnOnce(Result<Arc<dyn Value>, Failure>) + Send>;

enum Slot {
    /// Referenced before its value exists: a fetch or method call that overtook the creation.
    Pending(Vec<Waiter>),
    Ready(Arc<dyn Value>),
    Failed(Failure),
}

/// One worker's remote-reference state.
pub(crate) struct Context {
    ledger: Mutex<Ledger>,
    slots: Mutex<HashMap<RRefId, Slot>>,
    /// Notified (with `confirmed_async`) whenever a user reference is confirmed.
    confirmed: Condvar,
    /// Threads waiting on `confirmed` (counted under the ledger's lock): a notification is a
    /// system call even with no one to wake, and every `remote()`'s confirmation makes one.
    confirm_waiters: AtomicUsize,
    confirmed_async: Notify,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("info", &self.info())
            .finish()
    }
}

impl Context {
    pub(crate) fn new(me: u32) -> Self {
        Self {
            ledger: Mutex::new(Ledger::new(me)),
            slots: Mutex::new(HashMap::new()),
            confirmed: Condvar::new(),
            confirm_waiters: AtomicUsize::new(0),
            confirmed_async: Notify::new(),
        }
    }

    /// Runs `f` on the ledger.
    pub(crate) fn ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut lock(&self.ledger))
    }

    pub(crate) fn next_id(&self) -> GlobalId {
        self.ledger(Ledger::next_id)
    }

    pub(crate) fn info(&self) -> LedgerInfo {
        self.ledger(|l| l.info())
    }

    /// Number of values held (ready, pending or failed).
    pub(crate) fn num_values(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Calls `waiter` with the value of `rref` now, or once it is set.
    pub(crate) fn with_value(&self, rref: RRefId, waiter: Waiter) {
        let mut slots = lock(&self.slots);
        match slots
            .entry(rref)
            .or_insert_with(|| Slot::Pending(Vec::new()))
        {
            Slot::Pending(waiters) => waiters.push(waiter),
            Slot::Ready(v) => {
                let v = v.clone();
                drop(slots);
                waiter(Ok(v));
            }
            Slot::Failed(f) => {
                let f = f.clone();
                drop(slots);
                waiter(Err(f));
            }
        }
    }

    /// Marks `rref` as about to be created here (so fetches wait for it).
    pub(crate) fn expect_value(&self, rref: RRefId) {
        lock(&self.slots)
            .entry(rref)
            .or_insert_with(|| Slot::Pending(Vec::new()));
    }

    /// Sets the value of `rref` (or its failure) and wakes everyone waiting for it. A value whose
    /// every reference went away before it was set is dropped at once.
    pub(crate) fn set_value(&self, rref: RRefId, value: Result<Arc<dyn Value>, Failure>) {
        let waiters = {
            let mut slots = lock(&self.slots);
            let slot = match &value {
                Ok(v) => Slot::Ready(v.clone()),
                Err(f) => Slot::Failed(f.clone()),
            };
            match slots.insert(rref, slot) {
                Some(Slot::Pending(w)) => w,
                // The value was dropped (every reference deleted) before it was created.
                None if !self.ledger(|l| l.owns(rref)) => {
                    slots.remove(&rref);
                    Vec::new()
                }
                _ => Vec::new(),
            }
        };
        for w in waiters {
            w(value.clone());
        }
    }

    /// Applies the effects that concern this worker's own state, returning the messages to send.
    pub(crate) fn apply(&self, effects: Vec<Effect>) -> Vec<(u32, super::ledger::Control)> {
        let mut sends = Vec::new();
        for e in effects {
            match e {
                Effect::Send { to, msg } => sends.push((to, msg)),
                Effect::DropValue(rref) => {
                    // Waiters of a value that never came learn it is gone — outside the lock:
                    // a waiter may set or wait for another value.
                    let slot = lock(&self.slots).remove(&rref);
                    if let Some(Slot::Pending(waiters)) = slot {
                        for w in waiters {
                            w(Err(Failure::Other(format!("{} was deleted", rref.0))));
                        }
                    }
                }
                Effect::Confirmed(_) => {
                    // A waiter counts itself under the ledger's lock before it sleeps, and the
                    // change was made under that lock before this: none is missed.
                    if self.confirm_waiters.load(Ordering::Acquire) > 0 {
                        // Take the ledger lock so a waiter cannot check and sleep between the
                        // change and this notification.
                        drop(lock(&self.ledger));
                        self.confirmed.notify_all();
                    }
                    self.confirmed_async.notify_waiters();
                }
            }
        }
        sends
    }

    /// Waits until every fork in `forks` is confirmed, or `timeout` passes (zero: no limit).
    /// Returns the forks still unconfirmed.
    pub(crate) fn wait_confirmed(&self, forks: &[ForkId], timeout: Duration) -> Vec<ForkId> {
        let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
        let mut ledger = lock(&self.ledger);
        loop {
            let missing: Vec<ForkId> = forks
                .iter()
                .copied()
                .filter(|f| !ledger.is_confirmed(*f) && ledger.is_user(*f))
                .collect();
            if missing.is_empty() {
                return missing;
            }
            self.confirm_waiters.fetch_add(1, Ordering::AcqRel);
            let woke = wait_until(&self.confirmed, ledger, deadline);
            self.confirm_waiters.fetch_sub(1, Ordering::AcqRel);
            ledger = match woke {
                Ok(l) => l,
                Err(_) => return missing,
            };
        }
    }

    /// [`Context::wait_confirmed`] for async code.
    pub(crate) async fn wait_confirmed_async(
        &self,
        forks: &[ForkId],
        timeout: Duration,
    ) -> Vec<ForkId> {
        let deadline = (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout);
        loop {
            let notified = self.confirmed_async.notified();
            let missing: Vec<ForkId> = self.ledger(|l| {
                forks
                    .iter()
                    .copied()
                    .filter(|f| !l.is_confirmed(*f) && l.is_user(*f))
                    .collect()
            });
            if missing.is_empty() {
                return missing;
            }
            match deadline {
                None => notified.await,
                Some(d) => {
                    if tokio::time::timeout_at(d, notified).await.is_err() {
                        return missing;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A method call (`rref.remote(method)`) waiting for a value that is deleted before it is
    /// created: its waiter sets the value of the reference it creates. Regression: the waiter
    /// ran under the slots lock and deadlocked on it.
    #[test]
    fn a_waiter_of_a_dropped_value_may_set_another() {
        let ctx = Arc::new(Context::new(0));
        let (pending, created) = (RRefId(ctx.next_id()), RRefId(ctx.next_id()));
        ctx.expect_value(pending);
        ctx.ledger(|l| l.owner_created(created, None));
        let c = ctx.clone();
        ctx.with_value(
            pending,
            Box::new(move |value| c.set_value(created, value.map(|v| v as Arc<dyn Value>))),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let c = ctx.clone();
        std::thread::spawn(move || {
            let sends = c.apply(vec![Effect::DropValue(pending)]);
            let _ = tx.send(sends.len());
        });
        let sent = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(sent, Ok(0), "applying DropValue deadlocked");
        let (tx, rx) = std::sync::mpsc::channel();
        ctx.with_value(
            created,
            Box::new(move |v| tx.send(v.is_err()).unwrap_or(())),
        );
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(true));
    }
}
