//! [`Activity`]: how many calls and messages are in flight on one worker, in both directions:
//! what shutdown waits on and what the metrics report.

use crate::sync::{lock, wait_until};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// The counts at one moment.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Counts {
    /// Calls this worker's user code is waiting on (torch's `client_active_calls`).
    pub(crate) client: usize,
    /// distrpc's own calls (gather, barrier) in flight.
    pub(crate) client_internal: usize,
    /// Sync and inline handlers queued or running.
    pub(crate) server: usize,
    /// Async handlers running.
    pub(crate) server_async: usize,
    /// Reference control messages not yet acknowledged (torch's `num_pending_futures`).
    pub(crate) control: usize,
}

impl Counts {
    /// Calls and control messages this worker sent and waits for.
    pub(crate) fn outgoing(&self) -> usize {
        self.client + self.control
    }

    /// Handlers queued or running here.
    pub(crate) fn incoming(&self) -> usize {
        self.server + self.server_async
    }
}

/// Which count changes.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    Client,
    ClientInternal,
    Server,
    ServerAsync,
    Control,
}

/// The counts of one worker, and a condition to wait for them to drain.
#[derive(Default, Debug)]
pub(crate) struct Activity {
    state: Mutex<State>,
    changed: Condvar,
}

/// What the lock guards: the counts, and how many threads wait for them to drain (a
/// notification is a system call even with no one to wake: made only for a waiter).
#[derive(Default, Debug)]
struct State {
    counts: Counts,
    waiting: usize,
}

impl Activity {
    /// The counts now.
    pub(crate) fn counts(&self) -> Counts {
        lock(&self.state).counts
    }

    /// Adds `delta` to one count; wakes the waiters, if any, when the side it counts drains.
    pub(crate) fn add(&self, counter: Counter, delta: isize) {
        let mut state = lock(&self.state);
        let waiting = state.waiting;
        let c = &mut state.counts;
        let n = match counter {
            Counter::Client => &mut c.client,
            Counter::ClientInternal => &mut c.client_internal,
            Counter::Server => &mut c.server,
            Counter::ServerAsync => &mut c.server_async,
            Counter::Control => &mut c.control,
        };
        *n = n.saturating_add_signed(delta);
        let drained = match counter {
            Counter::Server | Counter::ServerAsync => c.incoming() == 0,
            _ => c.outgoing() == 0,
        };
        if drained && waiting > 0 {
            self.changed.notify_all();
        }
    }

    /// Waits until `drained` holds of the counts, or `deadline` passes (`None`: no limit).
    /// Returns the counts as they were when it gave up, or `Ok` once drained.
    pub(crate) fn wait(
        &self,
        drained: impl Fn(&Counts) -> bool,
        deadline: Option<Instant>,
    ) -> Result<(), Counts> {
        let mut state = lock(&self.state);
        while !drained(&state.counts) {
            state.waiting += 1;
            let woke = wait_until(&self.changed, state, deadline);
            let timed_out = woke.is_err();
            state = woke.unwrap_or_else(|s| s);
            state.waiting -= 1;
            if timed_out {
                return Err(state.counts);
            }
        }
        Ok(())
    }
}
