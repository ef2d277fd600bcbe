//! References for fronts: values a front encodes itself (a Python object, pickled on demand),
//! created, fetched and called on with [`RawCall`]s. The same protocol as every reference; only
//! the encoding is the front's.

use std::sync::Arc;
use std::time::Duration;

use super::handle::RRef;
use super::service::RRefService;
use crate::call::{Delivery, RawCall, RawReply, RpcFuture};
use crate::error::Error;
use crate::server::FLAG_METHOD;
use crate::server::value::Value;

impl<T> RRef<T> {
    /// A copy of the value as its owner encodes it (for a front's value, its `Value::encode`),
    /// within `timeout` (`None`: the default).
    pub fn to_here_raw(&self, timeout: Option<Duration>) -> Result<RawReply, Error> {
        self.to_here_raw_future(timeout).wait()
    }

    /// [`RRef::to_here_raw`] as a future that the calling thread is about to wait on (as
    /// [`Rpc::rpc_sync_raw_future`](crate::Rpc::rpc_sync_raw_future)): the waiting thread
    /// reads its own reply.
    pub fn to_here_raw_future(&self, timeout: Option<Duration>) -> RpcFuture<RawReply> {
        let service = &self.inner.service;
        let timeout = timeout.unwrap_or_else(|| service.client.default_timeout());
        let (owner, id) = (self.inner.owner, self.inner.id);
        self.guarded(|| super::remote::fetch_raw(service, owner, id, timeout, Delivery::Blocking))
    }

    /// Runs `call` on the owner with the value as its subject (`rref.rpc_sync().method()`):
    /// the owner's foreign handler gets the value beside the call. Waits for the reply.
    pub fn rpc_sync_raw(
        &self,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> Result<RawReply, Error> {
        self.rpc_sync_raw_future(call, timeout).wait()
    }

    /// [`RRef::rpc_sync_raw`] as a future that the calling thread is about to wait on (see
    /// [`RRef::to_here_raw_future`]).
    pub fn rpc_sync_raw_future(
        &self,
        call: RawCall,
        timeout: Option<Duration>,
    ) -> RpcFuture<RawReply> {
        self.method_raw(call, timeout, Delivery::Blocking)
    }

    /// [`RRef::rpc_sync_raw_future`] for a caller with other work to do before it waits: the
    /// call goes now, and the thread that waits for it reads the reply itself, as an
    /// `rpc_sync`'s caller does — unless the reply came first — without holding the connection
    /// in between.
    pub fn rpc_start_raw(&self, call: RawCall, timeout: Option<Duration>) -> RpcFuture<RawReply> {
        self.method_raw(call, timeout, Delivery::Started)
    }

    /// [`RRef::rpc_sync_raw`] without waiting.
    pub fn rpc_async_raw(&self, call: RawCall, timeout: Option<Duration>) -> RpcFuture<RawReply> {
        self.method_raw(call, timeout, Delivery::Queued)
    }

    fn method_raw(
        &self,
        call: RawCall,
        timeout: Option<Duration>,
        delivery: Delivery,
    ) -> RpcFuture<RawReply> {
        self.guarded(|| {
            let prefix = RRefService::method_prefix(self.inner.id);
            let client = &self.inner.service.client;
            client.call_raw_on(
                self.inner.owner,
                &prefix,
                FLAG_METHOD,
                call,
                timeout,
                delivery,
            )
        })
    }

    /// Forks this reference for a message to worker `to` that a front encodes itself (a
    /// pickle): the bytes to put in it, from which the receiver rebuilds its own reference with
    /// [`Rpc::rref_from_fork`](crate::Rpc::rref_from_fork). Without `to`, the worker the
    /// message being encoded goes to, if distrpc encodes one on this thread (a value fetched
    /// with `to_here`); the owner then takes a delete of the fork from any worker.
    pub fn fork_raw(&self, to: Option<u32>) -> Result<Vec<u8>, Error> {
        let to = to.or_else(|| super::service::encoding_service().map(|(_, to)| to));
        let data = self.fork(to).map_err(Error::InvalidArgument)?;
        crate::codec::encode_inline(&data).map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    /// Waits until the owner has confirmed this reference (a received fork), at most
    /// `timeout` (zero: no limit); whether it is. A front calls it before running a function
    /// that received the reference, as handlers do.
    pub fn wait_confirmed(&self, timeout: Duration) -> bool {
        match self.inner.fork {
            None => true,
            Some(fork) => {
                let service = &self.inner.service;
                let wait = || {
                    let _blocked = crate::pool::enter_blocking();
                    service.ctx.wait_confirmed(&[fork], timeout)
                };
                crate::runtime::blocking(wait)
                    .unwrap_or_else(wait)
                    .is_empty()
            }
        }
    }

    /// Runs `call` on the owner with the value as its subject and keeps the result there,
    /// behind a new reference (`rref.remote().method()`).
    pub fn remote_raw<U>(&self, call: RawCall, timeout: Option<Duration>) -> RRef<U> {
        raw_remote(
            &self.inner.service,
            self.inner.owner,
            call,
            Some(self),
            timeout,
        )
    }
}

/// `remote()` of a [`RawCall`] (on the value of `target`, if given).
pub(crate) fn raw_remote<T, U>(
    service: &Arc<RRefService>,
    to: u32,
    call: RawCall,
    target: Option<&RRef<T>>,
    timeout: Option<Duration>,
) -> RRef<U> {
    let RawCall {
        codec,
        function,
        payload,
        tensors,
    } = call;
    let encode_args = move |out: &mut Vec<u8>| {
        out.extend_from_slice(&payload);
        Ok::<_, std::convert::Infallible>(tensors)
    };
    let target = target.map(|t| t.inner.id);
    RRef::from_inner(super::remote::remote_encoded(
        service,
        to,
        codec,
        &function,
        encode_args,
        target,
        timeout.or_else(|| Some(service.client.default_timeout())),
    ))
}

/// The reference a front received as `bytes` (made by [`RRef::fork_raw`]) from `from`.
pub(crate) fn from_fork<T>(
    service: &Arc<RRefService>,
    bytes: &[u8],
    from: u32,
) -> Result<RRef<T>, Error> {
    let data: super::handle::ForkData =
        crate::codec::decode_inline(bytes).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    // The front waits for confirmation itself (`RRef::wait_confirmed`): nothing to settle.
    let rref =
        RRef::received(service.clone(), data, from).map_err(|e| Error::InvalidArgument(e.into()));
    super::service::take_received_forks();
    rref
}

/// A reference owned here to a value a front holds.
pub(crate) fn local<T>(service: &Arc<RRefService>, value: Arc<dyn Value>) -> RRef<T> {
    RRef::from_inner(super::remote::local_value(service, value))
}
