//! A worker's metrics, with torch's keys (`agent.*` of `get_metrics()`, the reference counts of
//! `_rref_context_get_debug_info()`) and distrpc's own.

use crate::node::Node;

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
        ]
    }
}
