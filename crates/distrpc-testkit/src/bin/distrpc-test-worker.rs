//! A worker process for distrpc's multi-process tests, started by the launcher with `RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` set. The first argument names the scenario.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use distrpc::{DType, Error, Rpc, RpcOptions, Tensor, builtin};

#[distrpc::function]
fn echo(i: u64) -> u64 {
    i
}

#[distrpc::function]
fn scaled_sum(t: Tensor, by: f64) -> Result<f64, distrpc::TensorError> {
    Ok(t.as_slice::<f64>()?.iter().sum::<f64>() * by)
}

/// A value to keep behind a remote reference.
#[distrpc::function]
fn make_tensor(n: usize) -> Tensor {
    Tensor::from_slice(&vec![1.5f64; n])
}

/// Ends this process while the caller waits for the reply: a crash, as far as peers can tell.
#[distrpc::function]
fn crash() -> u64 {
    std::process::exit(3)
}

/// Answers only after a minute: a call to it stays in flight.
#[distrpc::function]
fn hang() -> u64 {
    println!("hanging");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::thread::sleep(Duration::from_secs(60));
    0
}

/// Called from Python by name (issue 9, polyglot): every MessagePack kind, checked and echoed.
#[distrpc::function(name = "polyglot.describe")]
fn describe(
    text: String,
    data: serde_bytes::ByteBuf,
    items: Vec<i64>,
    table: std::collections::BTreeMap<String, f64>,
    nothing: Option<i64>,
    flag: bool,
) -> (String, serde_bytes::ByteBuf, i64, f64, bool, bool) {
    let mut reversed = data.into_vec();
    reversed.reverse();
    (
        text.to_uppercase(),
        serde_bytes::ByteBuf::from(reversed),
        items.iter().sum(),
        table.values().sum(),
        nothing.is_none(),
        !flag,
    )
}

/// A tensor doubled, its dtype and shape kept.
#[distrpc::function(name = "polyglot.double")]
fn double(t: Tensor) -> Result<Tensor, distrpc::TensorError> {
    distrpc::ops::add(&t, &t)
}

/// A tensor's element count (what the bandwidth benchmarks call).
#[distrpc::function(name = "polyglot.numel")]
fn numel(t: Tensor) -> usize {
    t.shape().iter().product()
}

/// Fails with Rust's error type for text that is not a number.
#[distrpc::function(name = "polyglot.parse")]
fn parse(text: String) -> Result<i64, std::num::ParseIntError> {
    text.parse()
}

/// What a Python function registered as `py.stats` returns (a dict, read as a struct).
#[derive(serde::Deserialize, Debug, PartialEq)]
struct Stats {
    n: u64,
    mean: f64,
}

/// A Rust worker in a group of Python workers (`python/tests/test_polyglot.py`): it calls the
/// Python functions registered by name on every other worker through typed handles, checks
/// what comes back, serves the Python workers' calls, and shuts down with them.
fn polyglot() -> anyhow::Result<()> {
    let rpc = join_python_group(Duration::from_secs(30))?;
    let mul = distrpc::Function::<(i64, i64), i64>::named("py.mul");
    let py_double = distrpc::Function::<(Tensor,), Tensor>::named("py.double");
    let stats = distrpc::Function::<(Vec<f64>,), Stats>::named("py.stats");
    let raises = distrpc::Function::<(String,), i64>::named("py.raises");
    let missing = distrpc::Function::<(), i64>::named("py.missing");
    for peer in rpc.worker_infos().to_vec() {
        if peer.name == rpc.name() {
            continue;
        }
        ensure!(rpc.rpc_sync(&peer, &mul, (6, 7))? == 42);
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape(vec![2, 2])?;
        let twice = rpc.rpc_async(&peer, &py_double, (t,)).wait()?;
        ensure!(twice.shape() == [2, 2], "shape {:?}", twice.shape());
        ensure!(twice.as_slice::<f32>()? == [2.0, 4.0, 6.0, 8.0]);
        let s = rpc.rpc_sync(&peer, &stats, (vec![1.0, 2.0, 6.0],))?;
        ensure!(s == Stats { n: 3, mean: 3.0 }, "{s:?}");
        match rpc.rpc_sync(&peer, &raises, ("boom".into(),)) {
            Err(Error::Remote(e)) if e.type_name == "ValueError" && e.message.contains("boom") => {}
            other => bail!("py.raises on {}: {other:?}", peer.name),
        }
        match rpc.rpc_sync(&peer, &missing, ()) {
            Err(Error::Remote(e))
                if e.type_name == "LookupError" && e.message.contains("py.missing") => {}
            other => bail!("py.missing on {}: {other:?}", peer.name),
        }
        println!("{}: called {}", rpc.name(), peer.name);
    }
    rpc.shutdown()?;
    Ok(())
}

/// Joins the group of Python workers the tests started (`DISTRPC_INIT_METHOD`, with `RANK`
/// and `WORLD_SIZE`) as `worker{RANK}`.
fn join_python_group(timeout: Duration) -> anyhow::Result<Rpc> {
    let init = std::env::var("DISTRPC_INIT_METHOD").context("DISTRPC_INIT_METHOD")?;
    let options = RpcOptions::default().init_method(init).rpc_timeout(timeout);
    Ok(Rpc::init(&name()?, None, None, options)?)
}

/// Joins the group (`DISTRPC_INIT_METHOD`) and serves until every worker shuts down: a Rust
/// callee for other workers' measurements.
fn serve() -> anyhow::Result<()> {
    let rpc = join_python_group(Duration::from_secs(60))?;
    rpc.shutdown()?;
    Ok(())
}

fn name() -> anyhow::Result<String> {
    Ok(format!("worker{}", std::env::var("RANK").context("RANK")?))
}

/// Every worker calls every other with a tensor and a builtin, then all shut down together.
fn basic() -> anyhow::Result<()> {
    let rpc = Rpc::init(&name()?, None, None, RpcOptions::default())?;
    for peer in rpc.worker_infos().to_vec() {
        let t = Tensor::from_slice(&[1.0f64, 2.0, 3.0]);
        let s = rpc.rpc_sync(&peer, scaled_sum, (t, 2.0))?;
        ensure!(s == 12.0, "scaled_sum on {} gave {s}", peer.name);
        let ones = rpc.rpc_sync(&peer, builtin::ones, (vec![3], DType::I64))?;
        let two = rpc
            .rpc_async(&peer, builtin::add, (ones.clone(), ones))
            .wait()?;
        ensure!(two.as_slice::<i64>()? == [2, 2, 2]);
    }
    let gathered = rpc.all_gather(&rpc.rank())?;
    ensure!(gathered.len() == rpc.world_size());
    println!("{} ok: {} peers", rpc.name(), rpc.world_size());
    rpc.shutdown()?;
    Ok(())
}

/// Rank 0 dies while rank 1 waits on it; rank 1 must learn at once, rank 2 keeps working.
fn peer_death() -> anyhow::Result<()> {
    let rpc = Rpc::init(&name()?, None, None, RpcOptions::default())?;
    let survivors = ["worker1", "worker2"];
    match rpc.rank() {
        0 => {
            // Serve until rank 1's call ends the process. Bounded: a broken test cannot hang.
            rpc.barrier(&["worker0", "worker1"])?;
            std::thread::sleep(Duration::from_secs(60));
            bail!("rank 0 was never asked to crash")
        }
        1 => {
            rpc.barrier(&["worker0", "worker1"])?;
            // A value owned by worker0, which is about to die.
            let owned: distrpc::RRef<Tensor> = rpc.remote("worker0", make_tensor, (3,));
            ensure!(owned.to_here()?.as_slice::<f64>()? == [1.5; 3]);
            let started = Instant::now();
            // No timeout: only failure detection can end this call.
            let err = rpc
                .rpc_sync_timeout("worker0", crash, (), Duration::ZERO)
                .expect_err("worker0 cannot answer: it exits");
            let took = started.elapsed();
            ensure!(
                matches!(&err, Error::PeerGone { worker, .. } if worker == "worker0"),
                "expected worker0 to be reported gone, got: {err}"
            );
            println!("pending call failed after {took:?}: {err}");
            ensure!(took < Duration::from_secs(10), "detection took {took:?}");
            let again = rpc
                .rpc_sync("worker0", echo, (1,))
                .expect_err("worker0 is dead");
            ensure!(
                matches!(again, Error::PeerGone { .. }),
                "later call: {again}"
            );
            ensure!(
                rpc.rpc_sync("worker2", echo, (5,))? == 5,
                "survivor must still answer"
            );
            rpc.barrier(&survivors)?;
        }
        _ => {
            rpc.barrier(&survivors)?;
        }
    }
    rpc.shutdown_local();
    Ok(())
}

/// Rank 0 takes the store socket the launcher handed it; its own children inherit neither the
/// socket nor the variable naming it.
fn store_fd() -> anyhow::Result<()> {
    let fd = std::env::var(distrpc::STORE_FD_ENV).context("the launcher passed no store socket")?;
    let rpc = Rpc::init(&name()?, None, None, RpcOptions::default())?;
    ensure!(
        std::env::var_os(distrpc::STORE_FD_ENV).is_none(),
        "the variable is still set after init"
    );
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "if [ -e /proc/self/fd/{fd} ]; then echo inherited; else echo clean; fi; echo ${{{}:-unset}}",
            distrpc::STORE_FD_ENV
        ))
        .output()?;
    let out = String::from_utf8_lossy(&child.stdout);
    ensure!(
        out.split_whitespace().eq(["clean", "unset"]),
        "a child of rank 0 saw: {out}"
    );
    println!(
        "store fd {fd} taken; children see: {}",
        out.trim().replace('\n', " ")
    );
    rpc.shutdown()?;
    Ok(())
}

/// Two hosts (network namespaces the test made): rank 0 at `HOST_ADDR` hosts the store and
/// prints its port; rank 1 calls rank 0's `hang` with no timeout, and the test cuts the link.
/// Rank 1 must see the call fail with `PeerGone` within its liveness bound (`LIVENESS_SECS`).
fn liveness() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let rank: usize = var("RANK")?.parse()?;
    let ip: std::net::IpAddr = var("HOST_ADDR")?.parse()?;
    let bound = Duration::from_secs(var("LIVENESS_SECS")?.parse()?);
    let options = RpcOptions::default()
        .listen_ip(ip)
        .liveness(bound)
        .rpc_timeout(Duration::from_secs(30));
    if rank == 0 {
        let pending = Rpc::bind(
            "worker0",
            0,
            2,
            options.init_method(format!("tcp://{ip}:0")),
        )?;
        let port = pending.store_addr().context("no TCP store")?.port();
        println!("store {port}");
        std::io::Write::flush(&mut std::io::stdout())?;
        let _rpc = pending.join()?;
        // Serve until the test ends this process (bounded).
        std::thread::sleep(Duration::from_secs(120));
        bail!("rank 0 was never stopped");
    }
    let store = format!("tcp://{}:{}", var("MASTER_ADDR")?, var("MASTER_PORT")?);
    let rpc = Rpc::init("worker1", 1, 2, options.init_method(store))?;
    println!("calling");
    let started = Instant::now();
    let err = rpc
        .rpc_sync_timeout("worker0", hang, (), Duration::ZERO)
        .expect_err("worker0 cannot answer: the link is cut");
    let took = started.elapsed();
    println!("failed after {took:?}: {err}");
    ensure!(
        matches!(&err, Error::PeerGone { worker, .. } if worker == "worker0"),
        "expected worker0 to be reported gone, got: {err}"
    );
    ensure!(
        took < bound * 3,
        "detection took {took:?} with a bound of {bound:?}"
    );
    rpc.shutdown_local();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    distrpc_testkit::init_tracing();
    match std::env::args().nth(1).as_deref() {
        Some("basic") => basic(),
        Some("peer_death") => peer_death(),
        Some("store_fd") => store_fd(),
        Some("liveness") => liveness(),
        Some("polyglot") => polyglot(),
        Some("serve") => serve(),
        other => bail!("unknown scenario {other:?}"),
    }
}
