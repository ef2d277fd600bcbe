//! `remote()`, `RRef(value)` and `to_here()`: making references and reading their values.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::creation::{Created, Creation, Inner};
use super::ledger::{ForkId, RRefId};
use super::{RRefService, put_id};
use crate::call::payload::encode_call;
use crate::call::{Delivery, Outgoing, RawReply, RpcFuture};
use crate::error::Error;
use crate::server::FLAG_METHOD;
use crate::server::value::Value;
use distrpc_wire::{Codec, Frame, Tensor};

/// `remote()`: runs `function` (a method of `target`, if given) on `to` and keeps the result
/// there behind a new reference.
pub(crate) fn remote<A>(
    service: &Arc<RRefService>,
    to: u32,
    function: &str,
    args: &A,
    target: Option<RRefId>,
    timeout: Option<Duration>,
) -> Inner
where
    A: Serialize + ?Sized,
{
    let encode_args = |out: &mut Vec<u8>| crate::codec::encode(args, out);
    remote_encoded(
        service,
        to,
        Codec::MessagePack,
        function,
        encode_args,
        target,
        timeout,
    )
}

/// [`remote`] of a call whose arguments `encode_args` writes in `codec` (a front's pickle, or
/// MessagePack).
pub(crate) fn remote_encoded<E: std::fmt::Display>(
    service: &Arc<RRefService>,
    to: u32,
    codec: Codec,
    function: &str,
    encode_args: impl FnOnce(&mut Vec<u8>) -> Result<Vec<Tensor>, E>,
    target: Option<RRefId>,
    timeout: Option<Duration>,
) -> Inner {
    let ctx = &service.ctx;
    let id = RRefId(ctx.next_id());
    if to == service.me() {
        // The self case makes an owner reference directly (torch's `pyRemoteBuiltin`).
        let effects = ctx.ledger(|l| l.owner_created(id, None));
        service.run_effects(effects);
        ctx.expect_value(id);
        service.create_locally(id, codec, function, target, encode_args);
        return Inner {
            service: service.clone(),
            id,
            owner: to,
            fork: None,
            creation: None,
        };
    }
    let fork = ForkId(ctx.next_id());
    ctx.ledger(|l| l.user_created(id, fork, to));
    let creation = Arc::new(Creation::default());
    let rref = Inner {
        service: service.clone(),
        id,
        owner: to,
        fork: Some(fork),
        creation: Some(creation.clone()),
    };
    let mut prefix = Vec::with_capacity(36);
    for id in [id.0, fork.0].into_iter().chain(target.map(|t| t.0)) {
        put_id(&mut prefix, id);
    }
    let flags = codec.flags() | if target.is_some() { FLAG_METHOD } else { 0 };
    let encoded = service.encoding(to, || encode_call(&prefix, function, encode_args));
    let (payload, tensors) = match encoded {
        Ok(encoded) => encoded,
        Err(e) => {
            creation.set(Created::Failed(e.to_string()));
            let effects = ctx.ledger(|l| {
                l.user_abandoned(fork);
                Vec::new()
            });
            service.run_effects(effects);
            return rref;
        }
    };
    let s = service.clone();
    let out = Outgoing {
        flags,
        tensors,
        timeout,
        delivery: Delivery::Direct,
        ..Outgoing::new(to, distrpc_wire::Kind::RemoteCall, function, payload)
    };
    service.client.call(
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
            let effects = s.ctx.ledger(|l| match outcome {
                Created::OwnerGone(_) => {
                    l.user_abandoned(fork);
                    Vec::new()
                }
                _ => l.user_confirmed(fork),
            });
            creation.set(outcome);
            s.run_effects(effects);
        }),
    );
    rref
}

/// A reference owned here to `value` (torch's `RRef(value)`).
pub(crate) fn local<T: Serialize + Send + Sync + 'static>(
    service: &Arc<RRefService>,
    value: T,
) -> Inner {
    local_value(service, Arc::new(value))
}

/// A reference owned here to a value a front holds (a Python object).
pub(crate) fn local_value(service: &Arc<RRefService>, value: Arc<dyn Value>) -> Inner {
    let id = RRefId(service.ctx.next_id());
    let effects = service.ctx.ledger(|l| l.owner_created(id, None));
    service.run_effects(effects);
    service.ctx.set_value(id, Ok(value));
    Inner {
        service: service.clone(),
        id,
        owner: service.me(),
        fork: None,
        creation: None,
    }
}

/// A reference that never had a value (`remote()` to a worker that does not exist): every use
/// reports `error`. The ledger never hears of it.
pub(crate) fn invalid(service: &Arc<RRefService>, error: Error) -> Inner {
    let name = match error {
        Error::UnknownWorker(name) => name,
        other => other.to_string(),
    };
    Inner {
        service: service.clone(),
        id: RRefId(service.ctx.next_id()),
        owner: service.me(),
        fork: Some(ForkId(service.ctx.next_id())),
        creation: Some(Creation::done(Created::UnknownWorker(name))),
    }
}

/// `to_here()`: a copy of the value of `id`, owned by `owner`.
pub(crate) fn fetch<T: DeserializeOwned + Send + 'static>(
    service: &Arc<RRefService>,
    owner: u32,
    id: RRefId,
    timeout: Duration,
    delivery: Delivery,
) -> RpcFuture<T> {
    let s = service.clone();
    fetch_with(service, owner, id, timeout, delivery, move |frame| {
        s.decoding(owner, || {
            crate::codec::decode::<T>(&frame.payload, frame.tensors)
        })
        .map_err(|e| decode_error(s.name_of(owner), e))
    })
}

/// `to_here()` of the encoded value, as the owner encodes it (a front's pickle, say).
pub(crate) fn fetch_raw(
    service: &Arc<RRefService>,
    owner: u32,
    id: RRefId,
    timeout: Duration,
    delivery: Delivery,
) -> RpcFuture<RawReply> {
    fetch_with(service, owner, id, timeout, delivery, |frame| {
        Ok(RawReply::from(frame))
    })
}

/// The fetch of `id`'s value from `owner`, its reply read by `read`.
fn fetch_with<T: Send + 'static>(
    service: &Arc<RRefService>,
    owner: u32,
    id: RRefId,
    timeout: Duration,
    delivery: Delivery,
    read: impl FnOnce(Frame) -> Result<T, Error> + Send + 'static,
) -> RpcFuture<T> {
    // On the owner too the fetch is a call (to self): it gets the call's deadline.
    let (fut, done) = RpcFuture::pending();
    let mut payload = Vec::with_capacity(12);
    put_id(&mut payload, id.0);
    let out = Outgoing {
        timeout: Some(timeout),
        delivery,
        ..Outgoing::new(owner, distrpc_wire::Kind::RRefFetch, "to_here", payload)
    };
    let claim = service.client.call(
        out,
        Box::new(move |result| done.complete(result.and_then(read))),
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
