//! Fixtures for distrpc's tests: groups of workers in one process, and the worker binary that
//! multi-process tests start (`distrpc-test-worker`).

pub mod netns;

use std::sync::Once;
use std::thread;

use distrpc::{Error, Rpc, RpcOptions};

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

/// Starts `n` workers named `worker0..` in this process, rank 0 hosting the store on a free
/// loopback port; `options(rank)` gives each worker's options (its init method is overridden).
pub fn in_process(n: usize, options: impl Fn(usize) -> RpcOptions) -> Result<Vec<Rpc>, Error> {
    init_tracing();
    let first = Rpc::bind("worker0", 0, n, options(0).init_method("tcp://127.0.0.1:0"))?;
    let addr = first
        .store_addr()
        .ok_or_else(|| Error::InvalidArgument("rank 0 has no TCP store".into()))?;
    let method = format!("tcp://{addr}");
    let joins: Vec<_> = (1..n)
        .map(|rank| {
            let opts = options(rank).init_method(method.clone());
            thread::spawn(move || Rpc::init(&format!("worker{rank}"), rank, n, opts))
        })
        .collect();
    let mut rpcs = vec![first.join()?];
    for j in joins {
        rpcs.push(
            j.join()
                .map_err(|_| Error::InvalidArgument("init thread panicked".into()))??,
        );
    }
    Ok(rpcs)
}

/// Shuts every worker down gracefully, each from its own thread, as separate processes would.
pub fn shutdown_all(rpcs: Vec<Rpc>) -> Result<(), Error> {
    let handles: Vec<_> = rpcs
        .into_iter()
        .map(|rpc| {
            let name = rpc.name().to_string();
            (name, thread::spawn(move || rpc.shutdown()))
        })
        .collect();
    let mut failures = Vec::new();
    for (name, h) in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(_) => failures.push(format!("{name}: shutdown panicked")),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "shutdown failed: {}",
            failures.join("; ")
        )))
    }
}

/// Waits until `condition` holds, checking every millisecond, for at most `bound`; returns
/// whether it held. For conditions on other workers that send no notification (the owner's
/// count of values after a delete, say). Never a substitute for a condition that can be waited on.
pub fn wait_until(bound: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The reference counters of every worker that must be zero once every reference is gone:
/// `(worker, key, value)` for each non-zero one.
pub fn rref_leaks(rpcs: &[Rpc]) -> Vec<(String, String, i64)> {
    let keys = [
        "num_owner_rrefs",
        "num_owner_values",
        "num_user_rrefs",
        "num_pending_users",
        "num_forks",
        "num_pending_futures",
    ];
    rpcs.iter()
        .flat_map(|r| {
            let m = r.metrics();
            keys.iter()
                .filter_map(|k| {
                    m.get(k)
                        .filter(|v| *v != 0)
                        .map(|v| (r.name().to_string(), k.to_string(), v))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Reads from `s` until the worker at the other end closes it (what it sends first is
/// skipped); whether it did within 10 seconds.
pub fn closed_by_peer(mut s: std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("a read timeout");
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}
