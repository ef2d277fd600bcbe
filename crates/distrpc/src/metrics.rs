//! A worker's metrics, with torch's keys (`agent.*` of `get_metrics()`, the reference counts of
//! `_rref_context_get_debug_info()`) and distrpc's own.

use std::collections::BTreeMap;

use crate::node::Node;

/// A worker's metrics at one moment, by key ([`Rpc::metrics`](crate::Rpc::metrics)). Indexing by
/// a key reads its value, and a key this worker does not report reads 0 (as torch's
/// `metrics.get(key, 0)`), so that code written for another version never panics on one;
/// [`Metrics::get`] tells the two apart. It derefs to the map for iteration.
///
/// ```
/// use distrpc::{Rpc, RpcOptions};
///
/// let rpc = Rpc::init("w0", 0, 1, RpcOptions::default().init_method("tcp://127.0.0.1:0"))?;
/// let m = rpc.metrics();
/// assert_eq!(m["agent.thread_pool_size"], 16);
/// assert_eq!(m["no.such.key"], 0);
/// assert_eq!(m.get("no.such.key"), None);
/// rpc.shutdown()?;
/// # Ok::<(), distrpc::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metrics(pub(crate) BTreeMap<String, i64>);

impl Metrics {
    /// The value of `key`, if this worker reports it.
    pub fn get(&self, key: &str) -> Option<i64> {
        self.0.get(key).copied()
    }
}

impl std::ops::Index<&str> for Metrics {
    type Output = i64;

    fn index(&self, key: &str) -> &i64 {
        self.0.get(key).unwrap_or(&0)
    }
}

impl std::ops::Deref for Metrics {
    type Target = BTreeMap<String, i64>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Node {
    /// Every metric, by key.
    pub(crate) fn metrics(&self) -> Vec<(&'static str, i64)> {
        let c = self.client.activity.counts();
        let info = self.rrefs.ctx.info();
        let pool = self.server.pool();
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let m = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        vec![
            ("agent.thread_pool_size", n(pool.size())),
            ("agent.num_idle_threads", n(pool.idle())),
            ("agent.client_active_calls", n(c.client)),
            ("agent.server_active_calls", n(c.server)),
            ("agent.server_active_async_calls", n(c.server_async)),
            ("agent.num_functions", n(self.server.num_functions())),
            ("num_owner_rrefs", n(info.num_owner_rrefs)),
            ("num_pending_users", n(info.num_pending_users)),
            ("num_forks", n(info.num_forks)),
            ("num_pending_futures", n(c.control)),
            ("num_user_rrefs", n(info.num_users)),
            ("num_owner_values", n(self.rrefs.ctx.num_values())),
            ("agent.inline_handler_runs", m(self.server.inline_runs())),
            ("agent.reader_hand_offs", m(self.transport.hand_offs())),
            (
                "agent.frames_read_waiting",
                m(self.transport.read_waiting()),
            ),
            (
                "agent.claims_taken_back",
                m(self.transport.watch.taken_back()),
            ),
        ]
    }
}
