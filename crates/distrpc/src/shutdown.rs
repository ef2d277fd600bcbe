//! Shutdown, graceful and local (torch's `shutdown(graceful=True/False)`).
//!
//! ```text
//!  graceful: barrier of all workers ─► delete every user reference still held
//!            ─► loop { sum over the group of calls + control messages in flight; 0 ⇒ done;
//!                      else wait until ours drain } ─► local
//!  local:    refuse new calls ─► let started handlers reply (bounded) ─► close connections
//!            ─► fail pending calls ─► close the pool ─► flush writers, stop tasks
//! ```

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::node::Node;
use crate::rref::{ForkId, RRefId};

/// How long local shutdown waits for handlers to reply and writers to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

impl Node {
    /// Graceful shutdown within `timeout` (zero: none): see the module docs. Returns the user
    /// references the application still held (for the leak check). Stops locally in any case.
    pub(crate) fn shutdown_graceful(
        &self,
        timeout: Duration,
    ) -> Result<Vec<(RRefId, ForkId)>, Error> {
        let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
        let left = || -> Result<Duration, Error> {
            match deadline {
                None => Ok(Duration::ZERO),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        Err(Error::Timeout {
                            worker: "the group".into(),
                            function: "shutdown".into(),
                            timeout,
                            elapsed: timeout,
                        })
                    } else {
                        Ok(left)
                    }
                }
            }
        };
        let gather = &self.gather;
        let rrefs = &self.rrefs;
        let activity = &self.client.activity;
        let result = (|| {
            crate::collective::barrier(gather, None, Some(left()?))?;
            // Every user reference still held is deleted now; the loop below waits for the
            // deletes (and their confirmations) like any other call in flight.
            let (held, effects) = rrefs.ctx.ledger(|l| (l.held_users(), l.delete_all_users()));
            rrefs.run_effects(effects);
            loop {
                let active = activity.counts().outgoing() as u64;
                if crate::collective::sum(gather, active, Some(left()?))? == 0 {
                    return Ok::<_, Error>(held);
                }
                let _ = activity.wait(|c| c.outgoing() == 0, deadline);
            }
        })();
        self.shutdown_local();
        result
    }

    /// Stops this worker at once: no more calls in or out, every pending call fails, queued
    /// frames are flushed (bounded), then every task ends.
    pub(crate) fn shutdown_local(&self) {
        if !self.client.stop() {
            return;
        }
        if !crate::runtime::on_runtime_thread() {
            self.server.drain(Instant::now() + FLUSH_TIMEOUT);
        }
        self.transport.close_all();
        self.client.fail_all();
        self.server.close();
        self.transport.stop(FLUSH_TIMEOUT);
        self.gather.wake();
    }
}
