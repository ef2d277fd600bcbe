//! Remote references (torch's `RRef`): values that live on one worker (the owner) and are used
//! from others through user references, with distributed reference counting.
//!
//! - [`ledger`]: the protocol's bookkeeping, a state machine without I/O, unit-tested flow by
//!   flow (its module docs draw the fork protocol).
//! - `context`: the owner's values and waiting for confirmations.
//! - [`RRef`]: the user's handle; `remote()`, `to_here()`, methods, forks through serde.
//!
//! An `RRef` inside the arguments or result of a call is forked when it is serialized (only
//! possible inside an RPC encode) and becomes a new user reference (or an owner handle, on the
//! owner) when it is deserialized. A callee's function runs only once every reference in its
//! arguments is confirmed by its owner.

pub(crate) mod context;
mod handle;
pub mod ledger;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use handle::RRef;
pub use ledger::{Control, Effect, ForkId, GlobalId, Ledger, LedgerError, LedgerInfo, RRefId};

use crate::agent::{Agent, Delivery, Outgoing, encode_call};
use crate::error::{Error, Failure};
use crate::future::RpcFuture;
use handle::{Created, Creation, Inner};

thread_local! {
    /// The agent encoding a message on this thread (RRefs fork only inside one).
    static ENCODING: RefCell<Option<Arc<Agent>>> = const { RefCell::new(None) };
    /// The agent decoding a message on this thread, and the worker that sent it.
    static DECODING: RefCell<Option<(Arc<Agent>, u32)>> = const { RefCell::new(None) };
    /// User references created by the decode that just ran on this thread, not yet confirmed.
    static RECEIVED: RefCell<Vec<ForkId>> = const { RefCell::new(Vec::new()) };
}

fn scoped<T: Clone + 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<Option<T>>>,
    value: T,
    f: impl FnOnce() -> R,
) -> R {
    struct Restore<T: 'static>(
        &'static std::thread::LocalKey<RefCell<Option<T>>>,
        Option<T>,
    );
    impl<T: 'static> Drop for Restore<T> {
        fn drop(&mut self) {
            let previous = self.1.take();
            self.0.with(|c| *c.borrow_mut() = previous);
        }
    }
    let previous = key.with(|c| c.borrow_mut().replace(value));
    let _restore = Restore(key, previous);
    f()
}

/// Runs `f` (an encode) with `agent` as the encoding agent.
pub(crate) fn encoding<R>(agent: &Arc<Agent>, f: impl FnOnce() -> R) -> R {
    scoped(&ENCODING, agent.clone(), f)
}

/// Runs `f` (a decode of a message from `from`) with `agent` as the decoding agent.
pub(crate) fn decoding<R>(agent: &Arc<Agent>, from: u32, f: impl FnOnce() -> R) -> R {
    scoped(&DECODING, (agent.clone(), from), f)
}

pub(crate) fn encoding_agent() -> Option<Arc<Agent>> {
    ENCODING.with(|c| c.borrow().clone())
}

pub(crate) fn decoding_context() -> Option<(Arc<Agent>, u32)> {
    DECODING.with(|c| c.borrow().clone())
}

pub(crate) fn note_received(fork: ForkId) {
    RECEIVED.with(|r| r.borrow_mut().push(fork));
}

fn take_received() -> Vec<ForkId> {
    RECEIVED.with(|r| std::mem::take(&mut *r.borrow_mut()))
}

/// The references the decode that just ran on this thread received and that must be confirmed
/// before the handler runs, with the agent to wait on (`None`: nothing to wait for).
fn to_confirm(agent: Option<&Arc<Agent>>) -> Option<(&Arc<Agent>, Vec<ForkId>)> {
    let forks = take_received();
    agent.filter(|_| !forks.is_empty()).map(|a| (a, forks))
}

fn all_confirmed(function: &str, missing: &[ForkId]) -> Result<(), Failure> {
    if missing.is_empty() {
        return Ok(());
    }
    Err(Failure::Other(format!(
        "{} reference(s) in the arguments of {function} were not confirmed by their owners in time",
        missing.len()
    )))
}

/// Before a handler runs: waits until every reference its arguments carried is confirmed.
pub(crate) fn wait_for_received_rrefs(
    function: &str,
    agent: Option<&Arc<Agent>>,
) -> Result<(), Failure> {
    let Some((agent, forks)) = to_confirm(agent) else {
        return Ok(());
    };
    let wait = || {
        let _blocked = crate::pool::enter_blocking();
        agent.rrefs.wait_confirmed(&forks, agent.default_timeout())
    };
    // Elsewhere on the runtime (distrpc's own inline functions) the wait is short: it runs here.
    let missing = crate::runtime::blocking(wait).unwrap_or_else(wait);
    all_confirmed(function, &missing)
}

/// [`wait_for_received_rrefs`] for async handlers.
pub(crate) async fn wait_for_received_rrefs_async(
    function: &str,
    agent: Option<&Arc<Agent>>,
) -> Result<(), Failure> {
    let Some((agent, forks)) = to_confirm(agent) else {
        return Ok(());
    };
    let missing = agent
        .rrefs
        .wait_confirmed_async(&forks, agent.default_timeout())
        .await;
    all_confirmed(function, &missing)
}

/// Writes a global id (12 bytes: rank, counter).
pub(crate) fn put_id(out: &mut Vec<u8>, id: GlobalId) {
    out.put_u32_le(id.created_on);
    out.put_u64_le(id.local_id);
}

/// Reads a global id written by [`put_id`].
pub(crate) fn get_id(buf: &mut &[u8]) -> Option<GlobalId> {
    if buf.len() < 12 {
        return None;
    }
    Some(GlobalId {
        created_on: buf.get_u32_le(),
        local_id: buf.get_u64_le(),
    })
}

/// `remote()`: runs `function` (a method of `target`, if given) on `to` and keeps the result
/// there behind a new reference.
pub(crate) fn remote<A, R>(
    agent: &Arc<Agent>,
    to: u32,
    function: &str,
    args: &A,
    target: Option<RRefId>,
    timeout: Option<Duration>,
) -> RRef<R>
where
    A: Serialize + ?Sized,
    R: Send + Sync + 'static,
{
    let id = RRefId(agent.rrefs.next_id());
    if to == agent.me.id {
        // The self case makes an owner reference directly (torch's `pyRemoteBuiltin`).
        let effects = agent.rrefs.ledger(|l| l.owner_created(id, None));
        agent.run_effects(effects);
        agent.rrefs.expect_value(id);
        match encode_call(agent, &[], None, function, args) {
            Ok((payload, tensors, _)) => {
                agent.create_locally(id, function, payload, tensors, target)
            }
            Err(e) => agent
                .rrefs
                .set_value(id, Err(Failure::Other(e.to_string()))),
        }
        return RRef::from_inner(Inner {
            agent: agent.clone(),
            id,
            owner: to,
            fork: None,
            creation: None,
        });
    }
    let fork = ForkId(agent.rrefs.next_id());
    agent.rrefs.ledger(|l| l.user_created(id, fork, to));
    let creation = Arc::new(Creation::default());
    let rref = RRef::from_inner(Inner {
        agent: agent.clone(),
        id,
        owner: to,
        fork: Some(fork),
        creation: Some(creation.clone()),
    });
    let (payload, tensors, flags) =
        match encode_call(agent, &[id.0, fork.0], target, function, args) {
            Ok(encoded) => encoded,
            Err(e) => {
                creation.set(Created::Failed(e.to_string()));
                let effects = agent.rrefs.ledger(|l| {
                    l.user_abandoned(fork);
                    Vec::new()
                });
                agent.run_effects(effects);
                return rref;
            }
        };
    let a = agent.clone();
    let out = Outgoing {
        flags,
        tensors,
        timeout,
        delivery: Delivery::Direct,
        ..Outgoing::new(to, distrpc_wire::Kind::RemoteCall, function, payload)
    };
    agent.call(
        out,
        Box::new(move |result| {
            let outcome = match result {
                Ok(_) => Created::Ok,
                Err(Error::Remote(e)) => Created::Remote(e),
                Err(Error::Timeout { timeout, .. }) => Created::TimedOut(timeout),
                Err(Error::Injected { .. }) => Created::Dropped,
                Err(Error::PeerGone { reason, .. }) => Created::OwnerGone(reason),
                Err(Error::ShutDown { .. }) => Created::OwnerGone("this worker shut down".into()),
                Err(e) => Created::Failed(e.to_string()),
            };
            // Whatever happened, the owner may have (or later get) the value: treat the user as
            // confirmed so that dropping it tells the owner, unless the owner is gone.
            let effects = a.rrefs.ledger(|l| match outcome {
                Created::OwnerGone(_) => {
                    l.user_abandoned(fork);
                    Vec::new()
                }
                _ => l.user_confirmed(fork),
            });
            creation.set(outcome);
            a.run_effects(effects);
        }),
    );
    rref
}

/// A reference owned here to `value` (torch's `RRef(value)`).
pub(crate) fn local<T: Serialize + Send + Sync + 'static>(agent: &Arc<Agent>, value: T) -> RRef<T> {
    let id = RRefId(agent.rrefs.next_id());
    let effects = agent.rrefs.ledger(|l| l.owner_created(id, None));
    agent.run_effects(effects);
    agent.rrefs.set_value(id, Ok(Arc::new(value)));
    RRef::from_inner(Inner {
        agent: agent.clone(),
        id,
        owner: agent.me.id,
        fork: None,
        creation: None,
    })
}

/// A reference that never had a value (`remote()` to a worker that does not exist): every use
/// reports `error`. The ledger never hears of it.
pub(crate) fn invalid<R>(agent: &Arc<Agent>, error: Error) -> RRef<R> {
    let name = match error {
        Error::UnknownWorker(name) => name,
        other => other.to_string(),
    };
    RRef::from_inner(Inner {
        agent: agent.clone(),
        id: RRefId(agent.rrefs.next_id()),
        owner: agent.me.id,
        fork: Some(ForkId(agent.rrefs.next_id())),
        creation: Some(Creation::done(Created::UnknownWorker(name))),
    })
}

/// `to_here()`: a copy of the value of `id`, owned by `owner`.
pub(crate) fn fetch<T: DeserializeOwned + Send + 'static>(
    agent: &Arc<Agent>,
    owner: u32,
    id: RRefId,
    timeout: Duration,
    delivery: Delivery,
) -> RpcFuture<T> {
    let (fut, done) = RpcFuture::pending();
    if owner == agent.me.id {
        let a = agent.clone();
        agent.rrefs.with_value(
            id,
            Box::new(move |value| {
                let me = a.me.id;
                let result = value.map_err(|f| f.into_error(&a.me.name)).and_then(|v| {
                    let reply = encoding(&a, || v.encode()).map_err(|m| Error::Encode {
                        function: "to_here".into(),
                        what: "result",
                        message: m,
                    })?;
                    decoding(&a, me, || {
                        crate::codec::decode::<T>(&reply.payload, reply.tensors)
                    })
                    .map_err(|e| decode_error(&a.me.name, e))
                });
                done.complete(result);
            }),
        );
        return fut;
    }
    let mut payload = Vec::with_capacity(12);
    put_id(&mut payload, id.0);
    let a = agent.clone();
    let out = Outgoing {
        timeout: Some(timeout),
        delivery,
        ..Outgoing::new(owner, distrpc_wire::Kind::RRefFetch, "to_here", payload)
    };
    let claim = agent.call(
        out,
        Box::new(move |result| {
            done.complete(result.and_then(|frame| {
                decoding(&a, owner, || {
                    crate::codec::decode::<T>(&frame.payload, frame.tensors)
                })
                .map_err(|e| decode_error(a.name_of(owner), e))
            }));
        }),
    );
    fut.with_claim(claim)
}

fn decode_error(worker: &str, e: crate::codec::CodecError) -> Error {
    Error::Decode {
        worker: worker.to_string(),
        function: "to_here".into(),
        what: "result",
        message: e.to_string(),
    }
}
