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

/// Set by the `release` command of the `hosts` scenario: `gated_hang` may answer.
static RELEASED: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

/// Answers once the test releases it (bounded): a call to it stays in flight meanwhile.
#[distrpc::function]
fn gated_hang() -> u64 {
    println!("hanging");
    let (released, cv) = &RELEASED;
    let guard = released.lock().unwrap_or_else(|e| e.into_inner());
    let _ = cv.wait_timeout_while(guard, Duration::from_secs(120), |r| !*r);
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

/// A worker on a host of its own: its rank, `HOST_ADDR` (where it listens), the liveness
/// bound `LIVENESS_SECS`, and its options.
fn on_host() -> anyhow::Result<(usize, std::net::IpAddr, Duration, RpcOptions)> {
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let rank: usize = var("RANK")?.parse()?;
    let ip: std::net::IpAddr = var("HOST_ADDR")?.parse()?;
    let bound = Duration::from_secs(var("LIVENESS_SECS")?.parse()?);
    let options = RpcOptions::default()
        .listen_ip(ip)
        .liveness(bound)
        .rpc_timeout(Duration::from_secs(30));
    Ok((rank, ip, bound, options))
}

/// Two hosts (network namespaces the test made): rank 0 at `HOST_ADDR` hosts the store and
/// prints its port; rank 1 calls rank 0's `hang` with no timeout, and the test cuts the link.
/// Rank 1 must see the call fail with `PeerGone` within its liveness bound (`LIVENESS_SECS`).
fn liveness() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let (rank, ip, bound, options) = on_host()?;
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

/// A worker on a "host" of its own (a network namespace the test made), driven by commands on
/// its standard input, one per line, each answered with a line:
///
/// - `calls`: a call to every other worker and a remote reference from the next one, whose
///   delete is acknowledged before it answers (`calls ok` / `calls failed: …`);
/// - `call R`: one call to rank R (`call R ok` / `call R failed: …`);
/// - `hang R`: a call with no timeout to rank R that answers only when released, in the
///   background (`hang failed after N ms: …` once it fails);
/// - `release`: lets this worker's hanging calls answer;
/// - `shutdown`: a graceful shutdown, then the process ends (`shutdown ok` / `… failed: …`).
///
/// Security comes from the environment (`DISTRPC_AUTH_TOKEN`, `DISTRPC_TLS_*`).
fn hosts() -> anyhow::Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let world: usize = var("WORLD_SIZE")?.parse()?;
    let (rank, ip, _, options) = on_host()?;
    let name = format!("worker{rank}");
    let rpc = if rank == 0 {
        let pending = Rpc::bind(
            &name,
            0,
            world,
            options.init_method(format!("tcp://{ip}:0")),
        )?;
        println!(
            "store {}",
            pending.store_addr().context("no TCP store")?.port()
        );
        pending.join()?
    } else {
        let store = format!("tcp://{}:{}", var("MASTER_ADDR")?, var("MASTER_PORT")?);
        Rpc::init(&name, rank, world, options.init_method(store))?
    };
    println!("ready {}", rpc.listen_addr());
    for line in std::io::stdin().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["calls"] => {
                let result = (|| -> Result<(), Error> {
                    for to in (0..world).filter(|&r| r != rank) {
                        let got = rpc.rpc_sync(to, echo, (to as u64,))?;
                        if got != to as u64 {
                            return Err(Error::InvalidArgument(format!("{to} echoed {got}")));
                        }
                    }
                    let next = (rank + 1) % world;
                    let r: distrpc::RRef<Tensor> = rpc.remote(next, make_tensor, (3,));
                    let t = r.to_here()?;
                    if t.as_slice::<f64>()? != [1.5; 3] {
                        return Err(Error::InvalidArgument("wrong remote value".into()));
                    }
                    drop(r);
                    // The reference's delete goes with the next frame to its owner, or within
                    // the watch's bound: answered only once it has been acknowledged, so that
                    // nothing is in flight when the test cuts a link next.
                    let settled = distrpc_testkit::wait_until(Duration::from_secs(10), || {
                        rpc.metrics()["num_pending_futures"] == 0
                    });
                    if !settled {
                        return Err(Error::InvalidArgument("a control message hangs".into()));
                    }
                    Ok(())
                })();
                match result {
                    Ok(()) => println!("calls ok"),
                    Err(e) => println!("calls failed: {e}"),
                }
            }
            ["call", to] => {
                let to: usize = to.parse()?;
                match rpc.rpc_sync_timeout(to, echo, (5,), Duration::from_secs(30)) {
                    Ok(_) => println!("call {to} ok"),
                    Err(e) => println!("call {to} failed: {e}"),
                }
            }
            ["hang", to] => {
                let (to, rpc) = (to.parse::<usize>()?, rpc.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    match rpc.rpc_sync_timeout(to, gated_hang, (), Duration::ZERO) {
                        Ok(_) => println!("hang returned"),
                        Err(e) => {
                            let ms = started.elapsed().as_millis();
                            println!("hang failed after {ms} ms: {e}");
                        }
                    }
                });
            }
            ["release"] => {
                let (released, cv) = &RELEASED;
                *released.lock().unwrap_or_else(|e| e.into_inner()) = true;
                cv.notify_all();
                println!("released");
            }
            ["shutdown"] => {
                match rpc.shutdown() {
                    Ok(()) => println!("shutdown ok"),
                    Err(e) => println!("shutdown failed: {e}"),
                }
                return Ok(());
            }
            other => bail!("unknown command {other:?}"),
        }
    }
    Ok(())
}

/// A stranger on a host of its own: no token, no certificate. Connects to the worker at
/// `TARGET` with a real hello (the worker must close it), then tries to join the group through
/// the store at `STORE` (it must be refused). Prints what happened.
fn outsider() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let target: std::net::SocketAddr = var("TARGET")?.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(10))?;
    let payload = distrpc_wire::codec::encode_inline(&(0u32, "worker0"))?;
    s.write_all(
        &distrpc_wire::OutFrame::new(distrpc_wire::Kind::Hello, 0, &payload, &[])?.to_vec(),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 256];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    println!(
        "{}",
        if closed {
            "stranger closed"
        } else {
            "stranger kept"
        }
    );
    let store = format!("tcp://{}", var("STORE")?);
    let joined = Rpc::init(
        "worker1",
        1,
        3,
        RpcOptions::default()
            .rpc_timeout(Duration::from_secs(5))
            .init_method(store),
    );
    match joined {
        Ok(rpc) => {
            rpc.shutdown_local();
            println!("join accepted");
        }
        Err(e) => println!("join refused: {e}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    distrpc_testkit::init_tracing();
    match std::env::args().nth(1).as_deref() {
        Some("basic") => basic(),
        Some("peer_death") => peer_death(),
        Some("store_fd") => store_fd(),
        Some("liveness") => liveness(),
        Some("hosts") => hosts(),
        Some("outsider") => outsider(),
        Some("polyglot") => polyglot(),
        Some("serve") => serve(),
        other => bail!("unknown scenario {other:?}"),
    }
}
