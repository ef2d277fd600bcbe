//! [`Value`]: what a handler produced — encoded as the reply of a call, or kept by the owner
//! behind a remote reference. A value needs `Serialize` only to be sent: one that is not (a
//! model holding a lock, a channel, a file) can still live behind a reference, used through
//! its methods; fetching it (`to_here`) is then an error that says why.
//!
//! `#[distrpc::function]` picks how to keep its function's result at compile time, by
//! autoref specialization on the concrete type: [`Keeper`] finds [`KeepSerialized`] for a
//! `Serialize` type and falls back to [`KeepOpaque`] for any other.

use std::any::Any;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Serialize;

use distrpc_wire::Tensor;

use crate::error::Failure;

/// An encoded value: payload and tensor table.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Reply {
    pub(crate) payload: Vec<u8>,
    pub(crate) tensors: Vec<Tensor>,
}

impl Reply {
    /// An encoded value (for a front's `Value::encode`).
    pub fn new(payload: Vec<u8>, tensors: Vec<Tensor>) -> Self {
        Self { payload, tensors }
    }
}

/// A reply, or why there is none.
pub(crate) type Outcome = Result<Reply, Failure>;

/// A value a function produced (see the module docs).
#[doc(hidden)]
pub trait Value: Any + Send + Sync {
    /// The value as a reply: MessagePack payload and tensor table.
    fn encode(&self) -> Result<Reply, String>;
    /// The concrete type's name, for error messages.
    fn type_name(&self) -> &'static str;
}

impl<T: Serialize + Send + Sync + 'static> Value for T {
    fn encode(&self) -> Result<Reply, String> {
        let mut payload = Vec::new();
        let tensors = crate::codec::encode(self, &mut payload).map_err(|e| e.to_string())?;
        Ok(Reply { payload, tensors })
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

/// A value that cannot be sent (it is not `Serialize`), kept as an `Arc` of its own so that
/// methods and `local_value` get it as they get any other.
#[doc(hidden)]
#[derive(Debug)]
pub struct Opaque<T>(Arc<T>);

impl<T: Send + Sync + 'static> Value for Opaque<T> {
    fn encode(&self) -> Result<Reply, String> {
        Err(format!(
            "a {} cannot be sent: it does not implement Serialize (call its methods on its owner instead)",
            std::any::type_name::<T>()
        ))
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }
}

/// How a handler keeps what its function returned.
pub type Keep<R> = fn(R) -> Arc<dyn Value>;

/// Keeps a value that can be sent.
pub(crate) fn kept<R: Serialize + Send + Sync + 'static>(value: R) -> Arc<dyn Value> {
    Arc::new(value)
}

/// Keeps a value that cannot be sent.
fn kept_opaque<R: Send + Sync + 'static>(value: R) -> Arc<dyn Value> {
    Arc::new(Opaque(Arc::new(value)))
}

/// The value behind `value` as a `T`, whether it can be sent or not; `Err` names the type it
/// really is.
pub(crate) fn lend<T: Any + Send + Sync>(value: Arc<dyn Value>) -> Result<Arc<T>, &'static str> {
    let type_name = value.type_name();
    let any: Arc<dyn Any + Send + Sync> = value;
    match any.downcast::<T>() {
        Ok(t) => Ok(t),
        Err(any) => any
            .downcast::<Opaque<T>>()
            .map(|o| o.0.clone())
            .map_err(|_| type_name),
    }
}

/// Chooses how to keep a `T` (see the module docs): `(&&Keeper::<T>::new()).keeper()`.
#[doc(hidden)]
#[derive(Debug)]
pub struct Keeper<T>(PhantomData<fn(T)>);

impl<T> Keeper<T> {
    /// The chooser for `T`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

/// Picked for a `Serialize` type: its value can be sent.
#[doc(hidden)]
pub trait KeepSerialized<T> {
    /// How to keep a `T`.
    fn keeper(&self) -> Keep<T>;
}

impl<T: Serialize + Send + Sync + 'static> KeepSerialized<T> for &Keeper<T> {
    fn keeper(&self) -> Keep<T> {
        kept::<T>
    }
}

/// Picked for any other type: its value lives on its owner only.
#[doc(hidden)]
pub trait KeepOpaque<T> {
    /// How to keep a `T`.
    fn keeper(&self) -> Keep<T>;
}

impl<T: Send + Sync + 'static> KeepOpaque<T> for Keeper<T> {
    fn keeper(&self) -> Keep<T> {
        kept_opaque::<T>
    }
}
