//! Every path that used to hang a worker or a caller, each with the test that caught it.

use std::thread;
use std::time::Duration;

use distrpc::{Error, Rpc, RpcOptions};
use distrpc_testkit::{in_process, shutdown_all};

/// Calls itself through the next worker `depth` times, alternating, from sync handlers.
#[distrpc::function]
fn ping_pong(depth: u32) -> Result<u32, Error> {
    if depth == 0 {
        return Ok(0);
    }
    let rpc = Rpc::current().ok_or(Error::InvalidArgument("no current rpc".into()))?;
    let next = (rpc.rank() + 1) % rpc.world_size() as u32;
    Ok(rpc.rpc_sync(next, ping_pong, (depth - 1,))? + 1)
}

/// A sync handler's nested `rpc_sync` reads its own reply, and with it the next nested request
/// of the chain: the pool must count that handler as blocked before it reads, or the request
/// waits for the one thread, which waits for it. Regression: with one thread it hung.
#[test]
fn nested_calls_on_a_one_thread_pool_complete() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .num_worker_threads(1)
            .rpc_timeout(Duration::from_secs(20))
    })
    .unwrap();
    for _ in 0..3 {
        assert_eq!(rpcs[0].rpc_sync("worker1", ping_pong, (8,)).unwrap(), 8);
    }
    let chains: Vec<_> = (0..4)
        .map(|_| {
            let rpc = rpcs[0].clone();
            thread::spawn(move || rpc.rpc_sync("worker1", ping_pong, (10,)))
        })
        .collect();
    for chain in chains {
        assert_eq!(chain.join().unwrap().unwrap(), 10);
    }
    shutdown_all(rpcs).unwrap();
}
