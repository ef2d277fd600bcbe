//! [`RRef<T>`]: a reference to a value that lives on one worker (its owner).

use std::any::Any;
use std::fmt;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::RRefService;
use super::creation::{Created, Inner};
use super::ledger::{ForkId, RRefId};
use crate::call::{Delivery, RpcFuture, TypedCall};
use crate::error::Error;
use crate::function::Method;
use crate::sync::lock;
use crate::worker::WorkerInfo;

/// A remote reference to a `T` owned by one worker (torch's `RRef`): made by
/// [`Rpc::remote`](crate::Rpc::remote) or [`RRef::new`], passed in the arguments and results of
/// calls (which forks it), read with [`to_here`](RRef::to_here), and used through
/// [methods](RRef::rpc_sync) that run on the owner. The value lives until no reference to it
/// remains anywhere.
///
/// ```
/// use distrpc::{RRef, Rpc, RpcOptions};
///
/// #[distrpc::function]
/// fn make_counter(start: i64) -> std::sync::atomic::AtomicI64 {
///     std::sync::atomic::AtomicI64::new(start)
/// }
/// #[distrpc::function(method)]
/// fn bump(counter: &std::sync::atomic::AtomicI64, by: i64) -> i64 {
///     counter.fetch_add(by, std::sync::atomic::Ordering::SeqCst) + by
/// }
///
/// let rpc = Rpc::init("w0", 0, 1, RpcOptions::default().init_method("tcp://127.0.0.1:0"))?;
/// let counter: RRef<std::sync::atomic::AtomicI64> = rpc.remote("w0", make_counter, (40,));
/// assert_eq!(counter.rpc_sync(bump, (2,))?, 42);              // runs on the owner
/// assert_eq!(counter.to_here()?.load(std::sync::atomic::Ordering::SeqCst), 42);
/// rpc.shutdown()?;
/// # Ok::<(), distrpc::Error>(())
/// ```
pub struct RRef<T> {
    pub(crate) inner: Arc<Inner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for RRef<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            _type: PhantomData,
        }
    }
}

impl<T> fmt::Display for RRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.inner.fork {
            None => write!(f, "OwnerRRef(rref_id={})", self.inner.id.0),
            Some(fork) => write!(
                f,
                "UserRRef(rref_id={}, fork_id={})",
                self.inner.id.0, fork.0
            ),
        }
    }
}

impl<T> fmt::Debug for RRef<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<T> RRef<T> {
    pub(crate) fn from_inner(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
            _type: PhantomData,
        }
    }

    /// `remote()`: the value `function` (a method of `target`, if given) makes on `to`.
    pub(crate) fn create<A: Serialize + ?Sized>(
        service: &Arc<RRefService>,
        to: u32,
        function: &str,
        args: &A,
        target: Option<RRefId>,
        timeout: Option<Duration>,
    ) -> Self
    where
        T: Send + Sync + 'static,
    {
        Self::from_inner(super::remote::remote(
            service, to, function, args, target, timeout,
        ))
    }

    /// A reference that never had a value: every use reports `error`.
    pub(crate) fn invalid(service: &Arc<RRefService>, error: Error) -> Self {
        Self::from_inner(super::remote::invalid(service, error))
    }

    /// The owner of the value.
    pub fn owner(&self) -> WorkerInfo {
        self.inner.service.client.transport.group.workers[self.inner.owner as usize].clone()
    }

    /// The owner's name.
    pub fn owner_name(&self) -> &str {
        self.inner.service.name_of(self.inner.owner)
    }

    /// Whether this worker owns the value.
    pub fn is_owner(&self) -> bool {
        self.inner.fork.is_none()
    }

    /// Whether the owner knows of this reference (always true on the owner).
    pub fn confirmed_by_owner(&self) -> bool {
        match self.inner.fork {
            None => true,
            Some(fork) => self.inner.service.ctx.ledger(|l| l.is_confirmed(fork)),
        }
    }

    /// The error to report instead of using this reference, if its creation failed.
    fn creation_error(&self) -> Option<Error> {
        let created = self.inner.creation.as_ref()?.get()?;
        creation_error(created, self.owner_name().to_string())
    }

    /// A use of this reference, issued by `issue`: not issued at all if the creation already
    /// failed, and failed early if the creation fails first (a use issued right after `remote()`
    /// cannot know yet whether the value will ever exist).
    pub(super) fn guarded<R: Send + 'static>(
        &self,
        issue: impl FnOnce() -> RpcFuture<R>,
    ) -> RpcFuture<R> {
        if let Some(e) = self.creation_error() {
            return RpcFuture::ready(Err(e));
        }
        let mut fut = issue();
        let Some(creation) = &self.inner.creation else {
            return fut;
        };
        let claim = fut.take_claim();
        let (out, done) = RpcFuture::pending();
        let done = Arc::new(Mutex::new(Some(done)));
        let first = done.clone();
        let owner = self.owner_name().to_string();
        creation.on_outcome(Box::new(move |outcome| {
            if let Some(e) = creation_error(outcome.clone(), owner)
                && let Some(d) = lock(&first).take()
            {
                d.complete(Err(e));
            }
        }));
        // The use's own result, unless the creation failed first (then it is dropped).
        fut.add_done_callback(move |result| {
            if let Some(d) = lock(&done).take() {
                d.complete(result);
            }
        });
        out.with_claim(claim)
    }
}

/// The error every use of a reference reports after its creation ended as `created`.
fn creation_error(created: Created, owner: String) -> Option<Error> {
    match created {
        Created::Ok => None,
        Created::Remote(e) => Some(Error::Remote(e)),
        Created::Failed(reason) => Some(Error::RRefCreation { owner, reason }),
        Created::TimedOut(timeout) => Some(Error::RRefCreation {
            owner,
            reason: format!(
                "RRef creation via remote() timed out after {timeout:?}; the value may not exist on the owner"
            ),
        }),
        Created::Dropped => Some(Error::RRefCreation {
            owner,
            reason:
                "RRef creation via remote() timed out: its message was dropped (an injected fault)"
                    .into(),
        }),
        Created::OwnerGone(reason) => Some(Error::PeerGone {
            worker: owner,
            reason,
        }),
        Created::UnknownWorker(name) => Some(Error::UnknownWorker(name)),
    }
}

impl<T: Serialize + Send + Sync + 'static> RRef<T> {
    /// A reference owned by `rpc`'s worker to `value` (torch's `RRef(value)`); the same as
    /// [`Rpc::rref`](crate::Rpc::rref).
    pub fn new(rpc: &crate::Rpc, value: T) -> Self {
        rpc.rref(value)
    }
}

impl<T: DeserializeOwned + Send + 'static> RRef<T> {
    /// A copy of the value, fetched from the owner, within the default RPC timeout.
    pub fn to_here(&self) -> Result<T, Error> {
        self.to_here_timeout(self.inner.service.client.default_timeout())
    }

    /// [`RRef::to_here`] with its own timeout (zero: none).
    pub fn to_here_timeout(&self, timeout: Duration) -> Result<T, Error> {
        self.fetch(timeout, Delivery::Blocking).wait()
    }

    /// [`RRef::to_here`] without blocking: a future of the copy.
    pub fn to_here_async(&self) -> RpcFuture<T> {
        self.fetch(
            self.inner.service.client.default_timeout(),
            Delivery::Queued,
        )
    }

    fn fetch(&self, timeout: Duration, delivery: Delivery) -> RpcFuture<T> {
        self.guarded(|| {
            super::remote::fetch(
                &self.inner.service,
                self.inner.owner,
                self.inner.id,
                timeout,
                delivery,
            )
        })
    }
}

impl<T: Any + Send + Sync> RRef<T> {
    /// The value itself, on the owner (torch's `local_value()`); waits if it is still being
    /// created, within the default RPC timeout. Elsewhere an error names the owner to call it
    /// on.
    pub fn local_value(&self) -> Result<Arc<T>, Error> {
        let value = self.local_value_raw()?;
        crate::server::value::lend::<T>(value).map_err(|_| {
            Error::InvalidArgument(format!(
                "the value of {self} is not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

impl<T> RRef<T> {
    /// The value as the owner keeps it (for a front, which knows its concrete type); waits if
    /// it is still being created, within the default RPC timeout. Only on the owner.
    #[doc(hidden)]
    pub fn local_value_raw(&self) -> Result<Arc<dyn crate::server::value::Value>, Error> {
        if !self.is_owner() {
            return Err(Error::NotOwner {
                owner: self.owner_name().to_string(),
                operation: "local_value()",
            });
        }
        let service = &self.inner.service;
        let (fut, done) = RpcFuture::pending();
        let owner = service.name_of(service.me()).to_string();
        service.ctx.with_value(
            self.inner.id,
            Box::new(move |v| done.complete(v.map_err(|f| f.into_error(&owner)))),
        );
        let timeout = service.client.default_timeout();
        let started = std::time::Instant::now();
        fut.wait_within(timeout).unwrap_or_else(|| {
            Err(Error::Timeout {
                worker: service.name_of(service.me()).to_string(),
                function: "local_value()".into(),
                timeout,
                elapsed: started.elapsed(),
            })
        })
    }
}

impl<T> RRef<T> {
    /// Runs `method` on the owner with the value as its first argument and waits for the result.
    /// If the value is still being created, the call waits for it on the owner.
    pub fn rpc_sync<A, R, L>(&self, method: Method<T, A, R, L>, args: A) -> Result<R, Error>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.call_method(method, args, Delivery::Blocking).wait()
    }

    /// [`RRef::rpc_sync`] without waiting.
    pub fn rpc_async<A, R, L>(&self, method: Method<T, A, R, L>, args: A) -> RpcFuture<R>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.call_method(method, args, Delivery::Queued)
    }

    fn call_method<A, R, L>(
        &self,
        method: Method<T, A, R, L>,
        args: A,
        delivery: Delivery,
    ) -> RpcFuture<R>
    where
        A: Serialize,
        R: DeserializeOwned + Send + 'static,
    {
        self.guarded(|| {
            let prefix = RRefService::method_prefix(self.inner.id);
            let call = TypedCall {
                dest: self.inner.owner,
                prefix: &prefix,
                flags: crate::server::FLAG_METHOD,
                function: method.name(),
                timeout: None,
                internal: false,
                delivery,
            };
            self.inner.service.client.call_typed(call, &args)
        })
    }

    /// Runs `method` on the owner and keeps its result there, behind a new reference.
    pub fn remote<A, R, L>(&self, method: Method<T, A, R, L>, args: A) -> RRef<R>
    where
        A: Serialize,
        R: Send + Sync + 'static,
    {
        RRef::create(
            &self.inner.service,
            self.inner.owner,
            method.name(),
            &args,
            Some(self.inner.id),
            None,
        )
    }
}

/// An `RRef` on the wire: who owns it, which value, which new user, and who sent it.
#[derive(Serialize, Deserialize)]
pub(super) struct ForkData {
    owner: u32,
    rref: RRefId,
    fork: ForkId,
    parent: u32,
}

impl<T> RRef<T> {
    /// Forks this reference for a message: the ledger records the new user, which the
    /// receiver becomes with [`RRef::received`].
    pub(super) fn fork(&self, to: Option<u32>) -> Result<ForkData, String> {
        let service = &self.inner.service;
        let fork = service
            .ctx
            .ledger(|l| l.fork_sent(self.inner.id, self.inner.owner, self.inner.fork, to))
            .map_err(|e| e.to_string())?;
        Ok(ForkData {
            owner: self.inner.owner,
            rref: self.inner.id,
            fork,
            parent: service.me(),
        })
    }

    /// The reference `data` describes, received from worker `from`: a new user (confirmed by
    /// the owner before the function that received it runs), or the owner's own handle.
    pub(super) fn received(
        service: Arc<RRefService>,
        data: ForkData,
        from: u32,
    ) -> Result<Self, &'static str> {
        let group = &service.client.transport.group;
        if data.parent != from || group.workers.get(data.owner as usize).is_none() {
            return Err("an RRef with an unknown owner or a forged parent");
        }
        let effects = service
            .ctx
            .ledger(|l| l.fork_received(data.rref, data.owner, data.fork, data.parent));
        let is_owner = data.owner == service.me();
        if !is_owner {
            super::service::note_received(data.fork);
        }
        service.run_effects(effects);
        Ok(RRef::from_inner(Inner {
            service,
            id: data.rref,
            owner: data.owner,
            fork: (!is_owner).then_some(data.fork),
            creation: None,
        }))
    }
}

impl<T> Serialize for RRef<T> {
    /// Serializing an `RRef` forks it, so it is allowed only inside an RPC encode.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (service, to) = super::service::encoding_service().ok_or_else(|| {
            S::Error::custom("an RRef can be serialized only as part of an RPC call or result")
        })?;
        if !Arc::ptr_eq(&service, &self.inner.service) {
            return Err(S::Error::custom(
                "an RRef can be sent only by a worker of its own group",
            ));
        }
        self.fork(Some(to))
            .map_err(S::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for RRef<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (service, from) = super::service::decoding_context().ok_or_else(|| {
            D::Error::custom("an RRef can be deserialized only as part of an RPC call or result")
        })?;
        let data = ForkData::deserialize(deserializer)?;
        RRef::received(service, data, from).map_err(D::Error::custom)
    }
}
