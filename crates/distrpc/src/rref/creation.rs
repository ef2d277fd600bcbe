//! What a handle on a reference holds ([`Inner`]), and how the `remote()` that created a user
//! reference ended ([`Creation`]).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::RRefService;
use super::ledger::{ForkId, RRefId};
use crate::error::RemoteError;
use crate::sync::lock;

/// How the `remote()` call that created a user reference ended.
#[derive(Debug, Clone)]
pub(crate) enum Created {
    Ok,
    /// The function failed on the owner: every use reports its error.
    Remote(RemoteError),
    /// The creation failed otherwise (unknown function, bad arguments, ...).
    Failed(String),
    TimedOut(Duration),
    /// The remote call was dropped by an injected fault: reported as a creation timeout, as
    /// torch does (the value may or may not exist).
    Dropped,
    OwnerGone(String),
    /// `remote()` named no worker of the group.
    UnknownWorker(String),
}

type OnOutcome = Box<dyn FnOnce(&Created) + Send>;

/// The outcome of the creating `remote()` call, once known, and who waits for it.
#[derive(Default)]
pub(crate) struct Creation {
    state: Mutex<(Option<Created>, Vec<OnOutcome>)>,
}

impl fmt::Debug for Creation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Creation")
            .field("outcome", &self.get())
            .finish()
    }
}

impl Creation {
    pub(crate) fn done(outcome: Created) -> Arc<Self> {
        let c = Arc::new(Self::default());
        c.set(outcome);
        c
    }

    /// Records the outcome (the first one counts) and tells everyone waiting for it.
    pub(crate) fn set(&self, outcome: Created) {
        let waiting = {
            let mut s = lock(&self.state);
            if s.0.is_some() {
                return;
            }
            s.0 = Some(outcome.clone());
            std::mem::take(&mut s.1)
        };
        for w in waiting {
            w(&outcome);
        }
    }

    pub(crate) fn get(&self) -> Option<Created> {
        lock(&self.state).0.clone()
    }

    /// Calls `f` with the outcome, now or once it is known.
    pub(crate) fn on_outcome(&self, f: OnOutcome) {
        let mut s = lock(&self.state);
        match &s.0 {
            Some(outcome) => {
                let outcome = outcome.clone();
                drop(s);
                f(&outcome);
            }
            None => s.1.push(f),
        }
    }
}

/// One local handle on a reference: dropping the last clone tells the ledger.
pub(crate) struct Inner {
    pub(crate) service: Arc<RRefService>,
    pub(crate) id: RRefId,
    pub(crate) owner: u32,
    /// `None` for the owner's own handle.
    pub(crate) fork: Option<ForkId>,
    pub(crate) creation: Option<Arc<Creation>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Never blocks: the delete is sent by a task, retried until the owner acknowledges it.
        let effects = self.service.ctx.ledger(|l| match self.fork {
            Some(fork) => l.user_dropped(fork),
            None => l.owner_handle_dropped(self.id),
        });
        self.service.run_effects(effects);
    }
}
