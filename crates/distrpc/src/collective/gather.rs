//! `all_gather` and `barrier`, as in torch's `api.py`.
//!
//! ```text
//!  leader = lowest rank of the group; round id = "<hash of the ranks>#n" (n counts rounds)
//!  follower ── gather_to_leader(round, name, value) ──► leader   (inline handler)
//!  leader waits for every member, then
//!  leader ── broadcast_to_followers(round, all values) ──► each follower
//!  every member returns the same map name → value
//! ```
//!
//! Unlike torch, a member that is lost while the others wait fails the round at once with
//! [`Error::PeerGone`] instead of hanging until a timeout.

use crate::sync::{lock, wait_until};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_bytes::ByteBuf;

use crate::call::{Client, Delivery, RpcFuture, TypedCall};
use crate::error::Error;
use crate::server::handler::inline_handler;
use crate::server::registry::Registry;

const GATHER_FN: &str = "#distrpc/gather_to_leader";
const BROADCAST_FN: &str = "#distrpc/broadcast_to_followers";
/// How long a leader waits for members to report before it connects to those that have not.
const PROBE_AFTER: Duration = Duration::from_millis(100);
/// How long a leader that lost a member waits for the others to report, to tell them why the
/// round failed.
const LOSS_GRACE: Duration = Duration::from_secs(2);
/// How many rounds a member may report ahead of the leader, per group.
const MAX_AHEAD: u64 = 1024;
/// How many rounds a worker holds at once: a member cannot make it hold more.
const MAX_ROUNDS: usize = 4096;

#[derive(Default)]
struct Round {
    /// On a follower: the leader, whose answer alone it takes.
    leader: Option<u32>,
    objects: BTreeMap<String, ByteBuf>,
    done: bool,
    /// The leader's word that the round failed: the member lost, and why.
    failed: Option<(String, String)>,
}

#[derive(Default)]
struct State {
    sequence: HashMap<String, u64>,
    rounds: HashMap<String, Round>,
    /// Counts reported peer losses, so that waiters look for lost members only after one.
    losses: u64,
}

/// The gather state of one worker.
pub(crate) struct Gather {
    client: Arc<Client>,
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for Gather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gather")
    }
}

impl Gather {
    /// The gather state of `client`'s worker; rounds waiting on a member wake when the
    /// transport loses a peer.
    pub(crate) fn new(client: Arc<Client>) -> Arc<Self> {
        let gather = Arc::new(Self {
            client,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let weak = Arc::downgrade(&gather);
        gather.client.transport.on_loss(Box::new(move |_| {
            if let Some(g) = weak.upgrade() {
                g.wake();
            }
        }));
        gather
    }

    /// One of distrpc's own calls to `dest`, which shutdown does not wait for.
    fn call<A: Serialize + ?Sized>(
        &self,
        dest: u32,
        function: &str,
        args: &A,
        timeout: Duration,
    ) -> RpcFuture<()> {
        let call = TypedCall {
            dest,
            prefix: &[],
            flags: 0,
            function,
            timeout: Some(timeout),
            internal: true,
            // Queued: hundreds of followers are written by their writer tasks, in parallel.
            delivery: Delivery::Queued,
        };
        self.client.call_typed(call, args)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Adds the gather functions to a worker's registry.
    pub(crate) fn register(self: &Arc<Self>, registry: &mut Registry) {
        let g = self.clone();
        registry.insert_internal(
            GATHER_FN,
            inline_handler(
                GATHER_FN,
                move |caller, (round, name, obj): (String, String, ByteBuf)| {
                    // A member reports for itself only.
                    let sender = caller.map(|c| g.client.transport.name_of(c));
                    if sender != Some(name.as_str()) {
                        return Err(format!("{sender:?} reported for {name}"));
                    }
                    g.check_ahead(&round)?;
                    g.gathered(&round, name, obj)
                },
            ),
        );
        let g = self.clone();
        registry.insert_internal(
            BROADCAST_FN,
            inline_handler(
                BROADCAST_FN,
                move |caller, (round, encoded): (String, ByteBuf)| {
                    let mut state = g.lock();
                    // Only for a round this worker reported in, from that round's leader.
                    let r = match state.rounds.get_mut(&round) {
                        Some(r) if r.leader.is_some() && r.leader == caller => r,
                        _ => {
                            return Err(format!(
                                "no round {round} awaits an answer from {caller:?}"
                            ));
                        }
                    };
                    let answer: Result<BTreeMap<String, ByteBuf>, (String, String)> =
                        crate::codec::decode_inline(&encoded).map_err(|e| e.to_string())?;
                    match answer {
                        Ok(objects) => r.objects = objects,
                        Err(lost) => r.failed = Some(lost),
                    }
                    r.done = true;
                    drop(state);
                    g.changed.notify_all();
                    Ok(())
                },
            ),
        );
    }

    /// Refuses a reported round that is over, or too far ahead of this worker's rounds (or
    /// one more than the worker holds): what members report stays bounded.
    fn check_ahead(&self, round: &str) -> Result<(), String> {
        let state = self.lock();
        if state.rounds.contains_key(round) {
            return Ok(());
        }
        let (key, n) = round
            .rsplit_once('#')
            .and_then(|(k, n)| Some((k, n.parse::<u64>().ok()?)))
            .ok_or_else(|| format!("{round:?} is not a round"))?;
        let next = state.sequence.get(key).copied().unwrap_or(0);
        if n + 1 < next {
            return Err(format!("round {round} is over"));
        }
        if n >= next + MAX_AHEAD || state.rounds.len() >= MAX_ROUNDS {
            return Err(format!(
                "round {round} is too far ahead of this worker's rounds"
            ));
        }
        Ok(())
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

    /// Wakes waiters so they re-check their peers (when a peer is lost, and at shutdown).
    pub(crate) fn wake(&self) {
        self.lock().losses += 1;
        self.changed.notify_all();
    }
}

/// What the leader sends back once every member has reported.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Answer {
    /// Every member's value (all_gather).
    All,
    /// Nothing: the round is a barrier, and each member gets an empty map.
    Nothing,
    /// The sum of the members' `u64` values, under the key `"sum"` (shutdown's count of calls
    /// still in flight): one number per member instead of the whole table.
    Sum,
}

/// A short, stable name for a group: FNV-1a over its members' ranks. Rounds of different
/// groups must not mix, and the key travels in every message of a round, so it must not grow
/// with the group.
fn group_key(ranks: &[u32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for rank in ranks {
        for b in rank.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Gathers `value` from every worker in `names` (all workers if `None`) and returns them by
/// name. A zero `timeout` waits without limit; `None` uses the default RPC timeout.
pub(crate) fn all_gather<T: Serialize + DeserializeOwned>(
    gather: &Gather,
    value: &T,
    names: Option<&[&str]>,
    timeout: Option<Duration>,
) -> Result<BTreeMap<String, T>, Error> {
    let obj = encode(value, "arguments")?;
    gather_round(gather, obj, names, timeout, Answer::All)?
        .into_iter()
        .map(|(name, bytes)| {
            let value = decode(&name, &bytes, "result")?;
            Ok((name, value))
        })
        .collect()
}

/// Blocks until every worker in `names` (all if `None`) has called it.
pub(crate) fn barrier(
    gather: &Gather,
    names: Option<&[&str]>,
    timeout: Option<Duration>,
) -> Result<(), Error> {
    gather_round(gather, Vec::new(), names, timeout, Answer::Nothing).map(|_| ())
}

/// The sum of `value` over every worker.
pub(crate) fn sum(gather: &Gather, value: u64, timeout: Option<Duration>) -> Result<u64, Error> {
    let obj = encode(&value, "arguments")?;
    let answer = gather_round(gather, obj, None, timeout, Answer::Sum)?;
    let sum = answer.get("sum").map_or(&[][..], |b| &b[..]);
    decode("the leader", sum, "result")
}

/// Encodes a value of a round (`what`: "arguments" or "result", for the error).
fn encode<T: Serialize + ?Sized>(value: &T, what: &'static str) -> Result<Vec<u8>, Error> {
    crate::codec::encode_inline(value).map_err(|e| Error::Encode {
        function: "all_gather".into(),
        what,
        message: e.to_string(),
    })
}

/// Decodes a value of a round that `worker` sent.
fn decode<T: DeserializeOwned>(worker: &str, bytes: &[u8], what: &'static str) -> Result<T, Error> {
    crate::codec::decode_inline(bytes).map_err(|e| Error::Decode {
        worker: worker.to_string(),
        function: "all_gather".into(),
        what,
        message: e.to_string(),
    })
}

/// One round: every member sends its encoded value to the leader, which answers each with
/// what `answer` asks for.
fn gather_round(
    gather: &Gather,
    obj: Vec<u8>,
    names: Option<&[&str]>,
    timeout: Option<Duration>,
    answer: Answer,
) -> Result<BTreeMap<String, ByteBuf>, Error> {
    // The members in rank order (the leader is the first): found with one look-up per name and
    // a bitmap, no sort, so that a barrier of hundreds costs each of them little.
    let client = &gather.client;
    let transport = &client.transport;
    let world = &transport.group.workers;
    let ranks: Vec<u32> = match names {
        None => (0..world.len() as u32).collect(),
        Some(n) => {
            let mut member = vec![false; world.len()];
            for name in n {
                let rank = transport
                    .rank_of(name)
                    .ok_or_else(|| Error::UnknownWorker(name.to_string()))?;
                member[rank as usize] = true;
            }
            (0u32..)
                .zip(member)
                .filter(|(_, m)| *m)
                .map(|(r, _)| r)
                .collect()
        }
    };
    let members: Vec<&str> = ranks
        .iter()
        .map(|&r| world[r as usize].name.as_str())
        .collect();
    let me = transport.me.name.as_str();
    if ranks.binary_search(&transport.me.id).is_err() {
        return Err(Error::InvalidArgument(format!(
            "all_gather among {members:?} called by {me}, who is not one of them"
        )));
    }
    // The same group has the same rounds however it was named.
    let key = group_key(&ranks);
    let (leader, leader_rank) = (members[0], ranks[0]);
    let round = {
        let mut state = gather.lock();
        let n = state.sequence.entry(key.clone()).or_default();
        let round = format!("{key}#{n}");
        *n += 1;
        round
    };
    let timeout = timeout.unwrap_or_else(|| client.default_timeout());
    let started = Instant::now();
    let deadline = (!timeout.is_zero()).then(|| started + timeout);
    let obj = ByteBuf::from(obj);

    if me == leader {
        gather
            .gathered(&round, me.to_string(), obj)
            .map_err(Error::InvalidArgument)?;
    } else {
        // The leader's answer is taken for this round, from it alone.
        gather
            .lock()
            .rounds
            .entry(round.clone())
            .or_default()
            .leader = Some(leader_rank);
        let reported = gather
            .call(leader_rank, GATHER_FN, &(&round, me, obj), timeout)
            .wait();
        if let Err(e) = reported {
            gather.lock().rounds.remove(&round);
            return Err(e);
        }
    }

    // Wait for the round to fill (leader) or for the answer (followers). Whether a member was
    // lost is looked at only when a loss was reported: each arrival costs O(1).
    let missing = |r: &Round| -> Vec<usize> {
        if me == leader {
            (0..members.len())
                .filter(|&i| !r.objects.contains_key(members[i]))
                .collect()
        } else {
            vec![0]
        }
    };
    let mut state = gather.lock();
    let mut losses_seen = None;
    let mut probe_at = (me == leader).then(|| Instant::now() + PROBE_AFTER);
    loop {
        let r = state.rounds.entry(round.clone()).or_default();
        if let Some((worker, reason)) = r.failed.take() {
            state.rounds.remove(&round);
            return Err(Error::PeerGone { worker, reason });
        }
        let complete = if me == leader {
            r.objects.len() >= members.len()
        } else {
            r.done
        };
        if complete {
            break;
        }
        if !client.is_running() {
            return Err(client.shut_down_error());
        }
        if losses_seen != Some(state.losses) {
            losses_seen = Some(state.losses);
            let r = state.rounds.entry(round.clone()).or_default();
            let lost = missing(r)
                .into_iter()
                .find_map(|i| transport.gone(ranks[i]).map(|reason| (members[i], reason)));
            if let Some((name, reason)) = lost {
                if me == leader {
                    // The round fails. The members still alive hear why from the leader — if
                    // they report within a grace period — rather than that it left.
                    let grace = Some(Instant::now() + LOSS_GRACE);
                    loop {
                        let r = state.rounds.entry(round.clone()).or_default();
                        let alive_missing = missing(r)
                            .into_iter()
                            .any(|i| transport.gone(ranks[i]).is_none());
                        if !alive_missing {
                            break;
                        }
                        match wait_until(&gather.changed, state, grace) {
                            Ok(s) => state = s,
                            Err(s) => {
                                state = s;
                                break;
                            }
                        }
                    }
                }
                let r = state.rounds.remove(&round).unwrap_or_default();
                drop(state);
                if me == leader {
                    // The members that reported learn why the round failed, rather than that
                    // the leader left it: the leader waits (bounded) until they have heard,
                    // since it may close its connections next, and a follower can see one
                    // connection close before it reads this on another.
                    let answer: Result<(), (&str, &str)> = Err((name, &reason));
                    let encoded = ByteBuf::from(encode(&answer, "result")?);
                    let told: Vec<_> = (1..members.len())
                        .filter(|&i| r.objects.contains_key(members[i]))
                        .map(|i| {
                            let args = (&round, &encoded);
                            gather.call(ranks[i], BROADCAST_FN, &args, LOSS_GRACE)
                        })
                        .collect();
                    for heard in told {
                        let _ = heard.wait();
                    }
                }
                return Err(Error::PeerGone {
                    worker: name.to_string(),
                    reason,
                });
            }
        }
        // A member that is gone is noticed only through a connection to it. If some have not
        // reported after a moment, the leader connects to them (the broadcast needs those
        // connections anyway), so that one that died before anyone connected to it fails the
        // round instead of leaving it waiting. Not at once: members connect to the leader as
        // they report, and dialling them meanwhile would open a second connection to each.
        let probe = probe_at.filter(|p| deadline.is_none_or(|d| *p < d));
        state = match wait_until(&gather.changed, state, probe.or(deadline)) {
            Ok(s) => s,
            Err(s) if probe.is_some() => {
                probe_at = None;
                let r = s.rounds.get(&round);
                let silent: Vec<u32> = r
                    .map(|r| missing(r).into_iter().map(|i| ranks[i]).collect())
                    .unwrap_or_default();
                drop(s);
                for rank in silent {
                    let _ = transport.connection(rank);
                }
                gather.lock()
            }
            Err(mut state) => {
                let r = state.rounds.remove(&round).unwrap_or_default();
                let waiting_on: Vec<&str> = missing(&r).into_iter().map(|i| members[i]).collect();
                return Err(Error::Timeout {
                    worker: waiting_on.join(", "),
                    function: format!("all_gather round {round}"),
                    timeout,
                    elapsed: started.elapsed(),
                });
            }
        };
    }
    let objects = state
        .rounds
        .remove(&round)
        .map(|r| r.objects)
        .unwrap_or_default();
    drop(state);
    if me != leader {
        return Ok(objects);
    }

    let objects = match answer {
        Answer::All => objects,
        Answer::Nothing => BTreeMap::new(),
        Answer::Sum => {
            let mut sum = 0u64;
            for (name, bytes) in &objects {
                sum = sum.saturating_add(decode::<u64>(name, bytes, "arguments")?);
            }
            BTreeMap::from([("sum".to_string(), ByteBuf::from(encode(&sum, "result")?))])
        }
    };
    // Encoded once, sent to every follower.
    let answer: Result<&BTreeMap<String, ByteBuf>, ()> = Ok(&objects);
    let encoded = ByteBuf::from(encode(&answer, "result")?);
    let futures: Vec<_> = (1..members.len())
        .map(|i| {
            let f = gather.call(ranks[i], BROADCAST_FN, &(&round, &encoded), timeout);
            (members[i], f)
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
                worker: name.to_string(),
                reason: format!("all_gather broadcast failed: {other}"),
            },
        });
    }
    Ok(objects)
}
