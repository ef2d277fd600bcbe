//! [`FaultInjection`]: torch's faulty agent, as an option of the client's send path. For tests
//! of failure handling (distrpc's own, and applications'): only the `fault-injection` feature
//! makes it public. A worker without faults pays one empty-map look-up per send.

// Without the feature the builder is unreachable: only an empty `FaultInjection` exists.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unreachable_pub))]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use distrpc_wire::Kind as MessageKind;

/// Faults to inject into a worker's outgoing messages, like torch's faulty agent: fail the
/// first `num_fail_sends` sends of each kind in `fail`, and delay every send of the kinds in
/// `delay`.
///
/// ```
/// # #[cfg(feature = "fault-injection")] {
/// use std::time::Duration;
/// use distrpc::{FaultInjection, MessageKind, RpcOptions};
///
/// let faults = FaultInjection::default()
///     .fail(MessageKind::Call, 2)
///     .delay(MessageKind::Call, Duration::from_millis(50));
/// let options = RpcOptions::default().faults(faults);
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct FaultInjection {
    fail: HashMap<MessageKind, u32>,
    delay: HashMap<MessageKind, Duration>,
    sent: Arc<Mutex<HashMap<MessageKind, u32>>>,
}

impl FaultInjection {
    /// Fails the first `count` sends of `kind`.
    pub fn fail(mut self, kind: MessageKind, count: u32) -> Self {
        self.fail.insert(kind, count);
        self
    }

    /// Delays every send of `kind` by `by`.
    pub fn delay(mut self, kind: MessageKind, by: Duration) -> Self {
        self.delay.insert(kind, by);
        self
    }

    /// Whether this send of `kind` should fail; counts it.
    pub(crate) fn should_fail(&self, kind: MessageKind) -> bool {
        let Some(&limit) = self.fail.get(&kind) else {
            return false;
        };
        let mut sent = crate::sync::lock(&self.sent);
        let n = sent.entry(kind).or_default();
        *n += 1;
        *n <= limit
    }

    /// How long to delay a send of `kind`.
    pub(crate) fn delay_of(&self, kind: MessageKind) -> Option<Duration> {
        self.delay.get(&kind).copied()
    }
}
