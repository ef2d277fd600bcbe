//! Foreign calls: calls whose arguments are encoded in a way Rust does not read — a Python
//! pickle (torch's `PythonUDF`) — handed whole to the handler a front registered for that codec
//! ([`RpcOptions::foreign`](crate::RpcOptions::foreign)). The core stays free of Python: it
//! moves bytes and tensors, counts the call, and sends whatever the front answers.
//!
//! ```text
//!  Call (codec mark ≠ MessagePack) ─► router ─► foreign handler of that codec
//!       (none: Error::UnsupportedCodec)          │  runs it where it likes (a Python pool)
//!                                                ▼
//!  caller ◄── Result / Exception ◄── ForeignReply::ok / err (dropped: an error too)
//! ```
//!
//! A front's thread waiting for its next call may read the connection the last one came in on
//! itself ([`Origin::serve`]): the next call from that peer then reaches the thread that runs
//! it with no hand-off from a reader's thread (one wake-up per call instead of two).

use std::sync::Arc;

use bytes::Bytes;
use distrpc_wire::{Codec, Tensor};

use super::value::{Reply, Value};
use super::{Completion, ReplyTo, Server};
use crate::call::activity::Counter;
use crate::error::{Failure, RemoteError};
pub use crate::sync::Doorbell;
pub use crate::transport::{IdleReaders, Origin};

/// Runs the calls of one codec; registered by a front (the Python binding) at init.
pub trait ForeignHandler: Send + Sync + 'static {
    /// Starts `call`; the answer goes to `reply`, now or later, from any thread. It must not
    /// block for long: hand the work to a thread of the front's own.
    fn call(&self, call: ForeignCall, reply: ForeignReply);
}

/// A call for a foreign handler.
pub struct ForeignCall {
    /// The name in the call head (for a pickled call, a display name: the function travels in
    /// the payload).
    pub function: String,
    /// The encoded arguments, as the caller sent them.
    pub payload: Bytes,
    /// The tensors beside them (slices of the receive buffer, 64-byte aligned).
    pub tensors: Vec<Tensor>,
    /// The calling worker's rank.
    pub from: u32,
    /// For a call on a reference's value (`rref.rpc_sync().method()`): that value, as the front
    /// kept it ([`ForeignReply::keep`]).
    pub this: Option<Arc<dyn Value>>,
    /// Whether the result is to be kept on this worker behind a reference (`remote()`): the
    /// front should answer with [`ForeignReply::keep`], so that the value stays an object of
    /// its own rather than its encoding.
    pub keep: bool,
}

impl ForeignCall {
    /// The call of `function` from worker `from`, as it arrived (not yet on a value).
    pub(crate) fn arrived(
        function: &str,
        payload: Bytes,
        tensors: Vec<Tensor>,
        from: u32,
        keep: bool,
    ) -> Self {
        Self {
            function: function.to_string(),
            payload,
            tensors,
            from,
            this: None,
            keep,
        }
    }
}

impl std::fmt::Debug for ForeignCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignCall")
            .field("function", &self.function)
            .field("payload_len", &self.payload.len())
            .field("tensors", &self.tensors.len())
            .field("from", &self.from)
            .field("method", &self.this.is_some())
            .field("keep", &self.keep)
            .finish()
    }
}

/// Where a foreign call's answer goes: exactly once, [`ForeignReply::ok`] or
/// [`ForeignReply::err`]; dropped without either, the caller gets an error that says so.
pub struct ForeignReply {
    server: Arc<Server>,
    reply_to: ReplyTo,
    id: u64,
    function: Arc<str>,
    /// `None` once answered.
    completion: Option<Completion>,
}

impl std::fmt::Debug for ForeignReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignReply")
            .field("id", &self.id)
            .field("function", &self.function)
            .finish()
    }
}

impl ForeignReply {
    /// The connection the call came in on; `None` for a call to this worker itself.
    pub fn origin(&self) -> Option<Origin> {
        self.reply_to.origin(&self.server.client.transport)
    }

    /// Answers with the encoded result (same codec as the call) and its tensors.
    pub fn ok(mut self, payload: Vec<u8>, tensors: Vec<Tensor>) {
        let value: Arc<dyn Value> = Arc::new(Encoded { payload, tensors });
        self.finish(Ok(value));
    }

    /// Answers with a value the front holds (a Python object): kept as it is behind a reference
    /// (`remote()`), or encoded by its [`Value::encode`] for a plain call.
    pub fn keep(mut self, value: Arc<dyn Value>) {
        self.finish(Ok(value));
    }

    /// Answers with the error the function raised. An empty `worker` or `function` is filled
    /// in with this worker's name and the call's function.
    pub fn err(mut self, mut error: RemoteError) {
        if error.worker.is_empty() {
            error.worker = self.server.client.transport.me.name.clone();
        }
        if error.function.is_empty() {
            error.function = self.function.to_string();
        }
        self.finish(Err(Failure::Remote(error)));
    }

    fn finish(&mut self, out: super::handler::Produced) {
        if let Some(completion) = self.completion.take() {
            let function = self.function.clone();
            self.server
                .deliver(&self.reply_to, self.id, &function, out, completion);
            self.server.client.activity.add(Counter::ServerAsync, -1);
        }
    }
}

impl Drop for ForeignReply {
    fn drop(&mut self) {
        let reason = format!(
            "the foreign handler of {} dropped the call without answering",
            self.function
        );
        self.finish(Err(Failure::Other(reason)));
    }
}

/// A result a front encoded itself: sent as it is.
struct Encoded {
    payload: Vec<u8>,
    tensors: Vec<Tensor>,
}

impl Value for Encoded {
    fn encode(&self) -> Result<Reply, String> {
        Ok(Reply {
            payload: self.payload.clone(),
            tensors: self.tensors.clone(),
        })
    }

    fn type_name(&self) -> &'static str {
        "an encoded foreign value"
    }
}

impl Server {
    /// Whether a call of `name` in `codec` (`None`: a mark this build does not know) goes to
    /// a front rather than to the registry: every call Rust cannot read, and a MessagePack call
    /// to a name Rust lacks when a front takes MessagePack calls (a function of the front's own,
    /// Python's `@distrpc.function(name=...)`). Plain calls, `remote()` and method calls alike.
    pub(crate) fn for_front(&self, codec: Option<Codec>, name: &str) -> bool {
        match codec {
            Some(Codec::MessagePack) => {
                self.foreign.contains_key(&Codec::MessagePack) && self.registry.get(name).is_none()
            }
            _ => true,
        }
    }

    /// A call whose arguments are in `codec` (`None`: a mark this build does not know): to the
    /// foreign handler registered for it, or an error that names what is missing.
    pub(crate) fn on_foreign_call(
        self: &Arc<Self>,
        reply_to: ReplyTo,
        id: u64,
        codec: Option<Codec>,
        call: ForeignCall,
        completion: Completion,
    ) {
        if !self.client.is_running() {
            return self.deliver(
                &reply_to,
                id,
                &call.function,
                Err(Failure::ShutDown),
                completion,
            );
        }
        let handler = codec.and_then(|c| self.foreign.get(&c));
        let Some(handler) = handler else {
            let failure = Failure::Codec {
                function: call.function.clone(),
                codec: codec.map_or_else(|| "unknown".into(), |c| format!("{c:?}")),
            };
            return self.deliver(&reply_to, id, &call.function, Err(failure), completion);
        };
        self.client.activity.add(Counter::ServerAsync, 1);
        let reply = ForeignReply {
            server: self.clone(),
            reply_to,
            id,
            function: Arc::from(call.function.as_str()),
            completion: Some(completion),
        };
        // A panic in the front's handler drops `reply` on the way out, which answers the call.
        let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handler.call(call, reply);
        }));
        if let Err(panic) = started {
            let message = crate::error::panic_message(&*panic);
            tracing::error!(%message, "a foreign handler panicked");
        }
    }
}
