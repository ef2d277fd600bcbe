//! [`Node`]: one worker's layers, built bottom-up and wired together: transport, client,
//! server, references, gather. The user API (`Rpc`) holds one; shutdown and metrics are its
//! methods.

use std::sync::Arc;
use std::time::Duration;

use distrpc_wire::Limits;

use crate::call::{Client, FaultInjection};
use crate::collective::Gather;
use crate::rendezvous::Group;
use crate::rref::RRefService;
use crate::runtime::Tasks;
use crate::server::Server;
use crate::server::registry::Registry;
use crate::transport::Transport;

/// How one worker runs: what rendezvous produced and the options that shape the layers.
pub(crate) struct NodeConfig {
    pub(crate) rank: u32,
    pub(crate) group: Arc<Group>,
    pub(crate) registry: Registry,
    pub(crate) num_worker_threads: usize,
    pub(crate) rpc_timeout: Duration,
    pub(crate) limits: Limits,
    pub(crate) faults: FaultInjection,
    pub(crate) spin: crate::transport::Spin,
    pub(crate) liveness: Duration,
    pub(crate) foreign: crate::server::Foreign,
    pub(crate) security: distrpc_secure::Security,
    pub(crate) queue: crate::transport::QueueBound,
}

/// The layers of one worker.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) transport: Arc<Transport>,
    pub(crate) client: Arc<Client>,
    pub(crate) server: Arc<Server>,
    pub(crate) rrefs: Arc<RRefService>,
    pub(crate) gather: Arc<Gather>,
}

impl Node {
    /// Builds the layers on the runtime `rt`; the node serves once given a listener.
    pub(crate) fn new(config: NodeConfig, rt: tokio::runtime::Handle) -> Self {
        let NodeConfig {
            rank,
            group,
            mut registry,
            num_worker_threads,
            rpc_timeout,
            limits,
            faults,
            spin,
            liveness,
            foreign,
            security,
            queue,
        } = config;
        let me = group.workers[rank as usize].clone();
        let sockets = crate::transport::SocketOptions {
            security,
            queue,
            spin,
            liveness,
        };
        let transport = Transport::new(me, group, limits, sockets, Tasks::new(rt));
        let client = Client::new(transport.clone(), rpc_timeout, faults);
        let gather = Gather::new(client.clone());
        gather.register(&mut registry);
        let server = Server::new(client.clone(), registry, foreign, num_worker_threads);
        let rrefs = RRefService::new(server.clone());
        Self {
            transport,
            client,
            server,
            rrefs,
            gather,
        }
    }
}
