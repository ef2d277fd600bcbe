//! `all_gather` and `barrier`, as in torch's `api.py`.
//!
//! ```text
//!  leader = smallest name of the group; round id = "names#n" (n counts rounds per group)
//!  follower ── gather_to_leader(round, name, value) ──► leader   (inline handler)
//!  leader waits for every member, then
//!  leader ── broadcast_to_followers(round, all values) ──► each follower
//!  every member returns the same map name → value
//! ```
//!
//! Unlike torch, a member that is lost while the others wait fails the round at once with
//! [`Error::PeerGone`] instead of hanging until a timeout.

use crate::sync::lock;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;

use crate::agent::Agent;
use crate::error::Error;
use crate::function::{Registry, inline_handler};
use crate::worker::To;

const GATHER_FN: &str = "distrpc::gather_to_leader";
const BROADCAST_FN: &str = "distrpc::broadcast_to_followers";

#[derive(Default)]
struct Round {
    objects: BTreeMap<String, ByteBuf>,
    done: bool,
}

#[derive(Default)]
struct State {
    sequence: HashMap<String, u64>,
    rounds: HashMap<String, Round>,
}

/// The gather state of one worker.
#[derive(Default)]
pub(crate) struct Gather {
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for Gather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gather")
    }
}

impl Gather {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds the gather functions to a worker's registry.
    pub(crate) fn register(self: &Arc<Self>, registry: &mut Registry) {
        let g = self.clone();
        registry.insert(
            GATHER_FN,
            inline_handler(
                GATHER_FN,
                move |(round, name, obj): (String, String, ByteBuf)| g.gathered(&round, name, obj),
            ),
        );
        let g = self.clone();
        registry.insert(
            BROADCAST_FN,
            inline_handler(
                BROADCAST_FN,
                move |(round, objects): (String, BTreeMap<String, ByteBuf>)| {
                    let mut state = g.lock();
                    let r = state.rounds.entry(round).or_default();
                    r.objects = objects;
                    r.done = true;
                    drop(state);
                    g.changed.notify_all();
                    Ok(())
                },
            ),
        );
    }

    fn gathered(&self, round: &str, name: String, obj: ByteBuf) -> Result<(), String> {
        let mut state = self.lock();
        let r = state.rounds.entry(round.to_string()).or_default();
        if r.objects.contains_key(&name) {
            return Err(format!("{name} reported round {round} twice"));
        }
        r.objects.insert(name, obj);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Wakes waiters so they re-check their peers (called when a peer is lost).
    pub(crate) fn wake(&self) {
        let _state = self.lock();
        self.changed.notify_all();
    }
}

/// Gathers `value` from every worker in `names` (all workers if `None`) and returns them by
/// name. A zero `timeout` waits without limit; `None` uses the default RPC timeout.
pub(crate) fn all_gather<T: Serialize + DeserializeOwned>(
    agent: &Arc<Agent>,
    gather: &Gather,
    value: &T,
    names: Option<&[String]>,
    timeout: Option<Duration>,
) -> Result<BTreeMap<String, T>, Error> {
    let names: BTreeSet<String> = match names {
        Some(n) => n.iter().cloned().collect(),
        None => agent.workers.iter().map(|w| w.name.clone()).collect(),
    };
    let mut ranks = BTreeMap::new();
    for n in &names {
        ranks.insert(n.clone(), agent.resolve(&To::Name(n.clone()))?);
    }
    let me = agent.me.name.clone();
    if !names.contains(&me) {
        return Err(Error::InvalidArgument(format!(
            "all_gather among {names:?} called by {me}, who is not one of them"
        )));
    }
    let leader = names.first().cloned().unwrap_or_default();
    let key = names.iter().cloned().collect::<Vec<_>>().join(",");
    let round = {
        let mut state = gather.lock();
        let n = state.sequence.entry(key.clone()).or_default();
        let round = format!("{key}#{n}");
        *n += 1;
        round
    };
    let timeout = timeout.unwrap_or_else(|| agent.default_timeout());
    let started = Instant::now();
    let deadline = (!timeout.is_zero()).then(|| started + timeout);
    let obj = ByteBuf::from(
        crate::codec::encode_inline(value).map_err(|e| Error::Encode {
            function: "all_gather".into(),
            what: "arguments",
            message: e.to_string(),
        })?,
    );

    if me == leader {
        gather
            .gathered(&round, me.clone(), obj)
            .map_err(Error::InvalidArgument)?;
    } else {
        crate::rpc::call_typed::<_, ()>(
            agent,
            ranks[&leader],
            GATHER_FN,
            &(&round, &me, obj),
            Some(timeout),
            true,
        )
        .wait()?;
    }

    // Wait for the round to fill (leader) or for the broadcast (followers).
    let mut state = gather.lock();
    loop {
        let r = state.rounds.entry(round.clone()).or_default();
        let complete = if me == leader {
            r.objects.len() == names.len()
        } else {
            r.done
        };
        if complete {
            break;
        }
        let waiting_on: Vec<String> = if me == leader {
            names
                .iter()
                .filter(|n| !r.objects.contains_key(*n))
                .cloned()
                .collect()
        } else {
            vec![leader.clone()]
        };
        if !agent.is_running() {
            return Err(agent.shut_down_error());
        }
        if let Some((name, reason)) = waiting_on
            .iter()
            .find_map(|n| agent.gone(ranks[n]).map(|r| (n.clone(), r)))
        {
            state.rounds.remove(&round);
            return Err(Error::PeerGone {
                worker: name,
                reason,
            });
        }
        state = match deadline {
            None => gather
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    state.rounds.remove(&round);
                    return Err(Error::Timeout {
                        worker: waiting_on.join(", "),
                        function: format!("all_gather round {round}"),
                        timeout,
                        elapsed: started.elapsed(),
                    });
                }
                gather
                    .changed
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
    }
    let objects = state
        .rounds
        .remove(&round)
        .map(|r| r.objects)
        .unwrap_or_default();
    drop(state);

    if me == leader {
        let futures: Vec<_> = names
            .iter()
            .filter(|n| **n != leader)
            .map(|n| {
                let f = crate::rpc::call_typed::<_, ()>(
                    agent,
                    ranks[n],
                    BROADCAST_FN,
                    &(&round, &objects),
                    Some(timeout),
                    true,
                );
                (n.clone(), f)
            })
            .collect();
        let mut failed = Vec::new();
        for (name, f) in futures {
            if let Err(e) = f.wait() {
                failed.push((name, e));
            }
        }
        if !failed.is_empty() {
            tracing::error!(round = %round, followers = ?failed.iter().map(|(n, _)| n).collect::<Vec<_>>(), "all_gather broadcast failed");
            let (name, first) = failed.swap_remove(0);
            return Err(match first {
                e @ (Error::PeerGone { .. } | Error::Timeout { .. }) => e,
                other => Error::PeerGone {
                    worker: name,
                    reason: format!("all_gather broadcast failed: {other}"),
                },
            });
        }
    }

    objects
        .into_iter()
        .map(|(name, bytes)| {
            let v = crate::codec::decode_inline(&bytes).map_err(|e| Error::Decode {
                worker: name.clone(),
                function: "all_gather".into(),
                what: "result",
                message: e.to_string(),
            })?;
            Ok((name, v))
        })
        .collect()
}
