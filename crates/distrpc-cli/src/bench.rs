//! `distrpc bench`: distrpc's figures next to the raw limits of this machine, measured in the
//! same run, because this machine is shared and noisy and only ratios within one run mean much.
//!
//! Every workload that needs two processes starts them with the launcher (`__bench-worker`);
//! rank 1 measures and prints one JSON line per figure. The raw baselines use plain blocking
//! sockets between this process and a child (`__raw-echo`), with no async runtime.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use distrpc::launch::Launch;
use distrpc::{RRef, Rpc, RpcOptions, Tensor};

/// Arguments of `distrpc bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Run every workload briefly (a smoke test, not a measurement).
    #[arg(long)]
    quick: bool,
    /// Timed calls per latency workload (default 20 000; 300 with --quick). Two runs under
    /// `valgrind --tool=callgrind --trace-children=yes` with different counts give the
    /// instructions per call.
    #[arg(long)]
    calls: Option<usize>,
    /// Only this tensor size in `bandwidth`, in bytes (default: 4 KiB, 1, 16 and 128 MiB);
    /// `python -m distrpc.bench --rust` runs one size per block.
    #[arg(long)]
    bytes: Option<usize>,
    /// Workloads to run (default: all): latency, latency_busy, latency_pool, echo, throughput,
    /// bandwidth, remote, scaling, memory, raw, tls (latency and bandwidth over mutual TLS, as
    /// ratios to plain TCP measured in the same run).
    workloads: Vec<String>,
}

const WORKLOADS: &[&str] = &[
    "latency",
    "latency_busy",
    "latency_pool",
    "echo",
    "throughput",
    "bandwidth",
    "remote",
    "scaling",
    "memory",
    "raw",
    "tls",
];

/// How long the latency option spins before parking, in `latency_busy`.
const BUSY_POLL: Duration = Duration::from_micros(200);
const WINDOWS: [usize; 3] = [1, 16, 128];
const SIZES: [usize; 4] = [4 << 10, 1 << 20, 16 << 20, 128 << 20];

#[distrpc::function(inline)]
fn noop() {}

/// A no-op run on the worker pool, not on the reader (`latency_pool`): the hop a call to a
/// Python function always makes, measured for Rust.
#[distrpc::function]
fn noop_pool() {}

#[distrpc::function(inline)]
fn echo(t: Tensor) -> Tensor {
    t
}

#[distrpc::function(inline)]
fn small_tensor() -> Tensor {
    Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
}

#[distrpc::function(inline)]
fn numel(t: Tensor) -> u64 {
    t.numel() as u64
}

/// How much each workload does.
#[derive(Clone, Copy, Debug)]
struct Scale {
    calls: usize,
    seconds: f64,
    quick: bool,
    /// The one tensor size of `bandwidth`; 0 for all of [`SIZES`].
    bytes: usize,
}

impl Scale {
    fn arg(self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.calls, self.seconds, self.quick, self.bytes
        )
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        let mut it = s.split(':');
        let (Some(c), Some(sec), Some(q), Some(b)) = (it.next(), it.next(), it.next(), it.next())
        else {
            bail!("bad scale {s:?}");
        };
        Ok(Self {
            calls: c.parse()?,
            seconds: sec.parse()?,
            quick: q.parse()?,
            bytes: b.parse()?,
        })
    }
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<()> {
    let chosen: Vec<&str> = if args.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        args.workloads.iter().map(String::as_str).collect()
    };
    for w in &chosen {
        if !WORKLOADS.contains(w) {
            bail!("unknown workload {w:?}; known: {}", WORKLOADS.join(", "));
        }
    }
    raise_fd_limit();
    let scale = if args.quick {
        Scale {
            calls: 300,
            seconds: 0.2,
            quick: true,
            bytes: 0,
        }
    } else {
        Scale {
            calls: 20_000,
            seconds: 3.0,
            quick: false,
            bytes: 0,
        }
    };
    let scale = Scale {
        calls: args.calls.unwrap_or(scale.calls),
        bytes: args.bytes.unwrap_or(0),
        ..scale
    };
    for w in chosen {
        match w {
            "raw" => raw(scale)?,
            "tls" => tls(scale)?,
            "scaling" => scaling(scale)?,
            two_process => {
                Launch::new(2, exe()?)
                    .args(["__bench-worker", two_process, &scale.arg()])
                    .prefix_output(false)
                    .run()?;
            }
        }
    }
    Ok(())
}

fn exe() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the distrpc executable")
}

/// Many in-process workers need many sockets: lift the soft limit to the hard one.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit get a valid pointer to an rlimit they fill or read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Times `op` `calls` times after a warm-up of a tenth as many (at least 100).
fn time_calls(
    calls: usize,
    mut op: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    for _ in 0..(calls / 10).max(100) {
        op()?;
    }
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        op()?;
        samples.push(t.elapsed());
    }
    Ok(samples)
}

fn percentiles_json(workload: &str, samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1));
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    format!(
        "{{\"workload\": \"{workload}\", \"calls\": {}, \"p50_us\": {:.1}, \"p90_us\": {:.1}, \"p99_us\": {:.1}}}",
        samples.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99)
    )
}

/// Resident set size of this process, in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A worker process of a two-process workload: rank 0 serves, rank 1 measures.
pub(crate) fn worker(workload: &str, scale: &str) -> anyhow::Result<()> {
    let scale = Scale::parse(scale)?;
    let rank: usize = std::env::var("RANK").context("RANK")?.parse()?;
    let mut options = RpcOptions::default();
    if workload == "latency_busy" {
        options = options.busy_poll(BUSY_POLL);
    }
    let rpc = Rpc::init(&format!("bench{rank}"), None, None, options)?;
    if rank == 1 {
        measure(&rpc, workload, scale)?;
    }
    rpc.shutdown()?;
    Ok(())
}

fn measure(rpc: &Rpc, workload: &str, scale: Scale) -> anyhow::Result<()> {
    match workload {
        "latency" | "latency_busy" => {
            let mut s = time_calls(scale.calls, || Ok(rpc.rpc_sync(0, noop, ())?))?;
            println!("{}", percentiles_json(workload, &mut s));
        }
        "latency_pool" => {
            let mut s = time_calls(scale.calls, || Ok(rpc.rpc_sync(0, noop_pool, ())?))?;
            println!("{}", percentiles_json(workload, &mut s));
        }
        "echo" => {
            let t = Tensor::from_slice(&[1.0f32]);
            let mut s = time_calls(scale.calls, || {
                rpc.rpc_sync(0, echo, (t.clone(),))?;
                Ok(())
            })?;
            println!("{}", percentiles_json(workload, &mut s));
        }
        "remote" => {
            let mut s = time_calls(scale.calls, || {
                let r: RRef<Tensor> = rpc.remote(0, small_tensor, ());
                r.to_here()?;
                Ok(())
            })?;
            println!("{}", percentiles_json(workload, &mut s));
        }
        "throughput" => {
            for window in WINDOWS {
                let rate = throughput(rpc, window, scale.seconds)?;
                println!(
                    "{{\"workload\": \"throughput\", \"window\": {window}, \"calls_per_s\": {rate:.0}}}"
                );
            }
        }
        "bandwidth" => {
            let one = [scale.bytes];
            for &bytes in if scale.bytes == 0 {
                &SIZES[..]
            } else {
                &one[..]
            } {
                let gbps = bandwidth(rpc, bytes, scale)?;
                println!(
                    "{{\"workload\": \"bandwidth\", \"bytes\": {bytes}, \"gb_per_s\": {gbps:.3}}}"
                );
            }
        }
        "tls_probe" => {
            let mut s = time_calls(scale.calls, || Ok(rpc.rpc_sync(0, noop, ())?))?;
            println!("{}", percentiles_json("latency", &mut s));
            for bytes in [1 << 20, 16 << 20] {
                let gbps = bandwidth(rpc, bytes, scale)?;
                println!(
                    "{{\"workload\": \"bandwidth\", \"bytes\": {bytes}, \"gb_per_s\": {gbps:.3}}}"
                );
            }
        }
        "memory" => {
            let after_init = rss_mib();
            time_calls(scale.calls, || Ok(rpc.rpc_sync(0, noop, ())?))?;
            throughput(rpc, 128, scale.seconds)?;
            bandwidth(rpc, 16 << 20, scale)?;
            println!(
                "{{\"workload\": \"memory\", \"rss_mib_after_init\": {after_init:.1}, \"rss_mib_after_workloads\": {:.1}}}",
                rss_mib()
            );
        }
        other => bail!("unknown bench workload {other:?}"),
    }
    Ok(())
}

/// No-op `rpc_async` calls with `window` in flight for `seconds`: calls per second.
fn throughput(rpc: &Rpc, window: usize, seconds: f64) -> anyhow::Result<f64> {
    let mut inflight = VecDeque::with_capacity(window);
    let run = |inflight: &mut VecDeque<_>, until: Instant| -> anyhow::Result<u64> {
        let mut done = 0u64;
        while Instant::now() < until {
            while inflight.len() < window {
                inflight.push_back(rpc.rpc_async(0, noop, ()));
            }
            if let Some(f) = inflight.pop_front() {
                distrpc::RpcFuture::wait(f)?;
                done += 1;
            }
        }
        while let Some(f) = inflight.pop_front() {
            f.wait()?;
            done += 1;
        }
        Ok(done)
    };
    run(
        &mut inflight,
        Instant::now() + Duration::from_secs_f64(seconds / 10.0),
    )?;
    let started = Instant::now();
    let done = run(&mut inflight, started + Duration::from_secs_f64(seconds))?;
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

/// One f32 tensor of `bytes` sent to a function that returns its element count: GB/s.
fn bandwidth(rpc: &Rpc, bytes: usize, scale: Scale) -> anyhow::Result<f64> {
    let t = Tensor::from_vec(vec![bytes / 4], vec![1.0f32; bytes / 4])?;
    let reps = ((if scale.quick { 64 << 20 } else { 2usize << 30 }) / bytes).clamp(2, 20_000);
    rpc.rpc_sync(0, numel, (t.clone(),))?;
    let started = Instant::now();
    for _ in 0..reps {
        let n = rpc.rpc_sync(0, numel, (t.clone(),))?;
        ensure!(n as usize == bytes / 4, "the callee saw {n} elements");
    }
    Ok((bytes * reps) as f64 / started.elapsed().as_secs_f64() / 1e9)
}

/// Groups of 2, 4 and 8 processes (init, all-to-all, shutdown), and of 8, 64 and 256 workers in
/// this process (init, barrier, shutdown).
fn scaling(scale: Scale) -> anyhow::Result<()> {
    for n in [2, 4, 8] {
        Launch::new(n, exe()?)
            .args(["__bench-worker", "scaling", &scale.arg()])
            .prefix_output(false)
            .run()?;
    }
    let sizes: &[usize] = if scale.quick {
        &[8, 32, 64]
    } else {
        &[8, 64, 256]
    };
    for &n in sizes {
        let (init, barrier, shutdown) = in_process_group(n)?;
        println!(
            "{{\"workload\": \"scaling\", \"workers\": {n}, \"in_process\": true, \"init_ms\": {:.1}, \"barrier_ms\": {:.1}, \"shutdown_ms\": {:.1}}}",
            init.as_secs_f64() * 1e3,
            barrier.as_secs_f64() * 1e3,
            shutdown.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// A scaling run in one of `WORLD_SIZE` processes; rank 0 prints the figures.
pub(crate) fn scaling_worker(scale: &str) -> anyhow::Result<()> {
    let scale = Scale::parse(scale)?;
    let rank: usize = std::env::var("RANK").context("RANK")?.parse()?;
    let started = Instant::now();
    let rpc = Rpc::init(&format!("bench{rank}"), None, None, RpcOptions::default())?;
    let init = started.elapsed().as_secs_f64() * 1e3;
    let slowest_init = rpc.all_gather(&init)?.values().copied().fold(0.0, f64::max);
    let names: Vec<String> = rpc.worker_infos().iter().map(|w| w.name.clone()).collect();
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let calls = if scale.quick { 20 } else { 200 };
    rpc.barrier(&all)?;
    let t = Instant::now();
    let futs: Vec<_> = (0..calls)
        .flat_map(|_| {
            rpc.worker_infos()
                .iter()
                .filter(|w| w.id != rpc.rank())
                .map(|w| rpc.rpc_async(w, noop, ()))
                .collect::<Vec<_>>()
        })
        .collect();
    distrpc::wait_all(futs)?;
    rpc.barrier(&all)?;
    let all_to_all = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    rpc.shutdown()?;
    let shutdown = t.elapsed().as_secs_f64() * 1e3;
    if rank == 0 {
        println!(
            "{{\"workload\": \"scaling\", \"workers\": {}, \"in_process\": false, \"init_ms\": {slowest_init:.1}, \"all_to_all_ms\": {all_to_all:.1}, \"shutdown_ms\": {shutdown:.1}}}",
            names.len()
        );
    }
    Ok(())
}

/// `n` workers in this process: wall time of init, of one barrier, and of graceful shutdown.
fn in_process_group(n: usize) -> anyhow::Result<(Duration, Duration, Duration)> {
    let started = Instant::now();
    let first = Rpc::bind(
        "w0",
        0,
        n,
        RpcOptions::default().init_method("tcp://127.0.0.1:0"),
    )?;
    let method = format!("tcp://{}", first.store_addr().context("no store")?);
    let joins: Vec<_> = (1..n)
        .map(|r| {
            let m = method.clone();
            std::thread::spawn(move || {
                Rpc::init(&format!("w{r}"), r, n, RpcOptions::default().init_method(m))
            })
        })
        .collect();
    let mut rpcs = vec![first.join()?];
    for j in joins {
        rpcs.push(
            j.join()
                .map_err(|_| anyhow::anyhow!("init thread panicked"))??,
        );
    }
    let init = started.elapsed();
    // Shared, not copied per thread: the harness itself must not do quadratic work.
    let names: Arc<Vec<String>> = Arc::new(rpcs.iter().map(|r| r.name().to_string()).collect());
    let t = Instant::now();
    let barriers: Vec<_> = rpcs
        .iter()
        .cloned()
        .map(|r| {
            let names = names.clone();
            std::thread::spawn(move || {
                let all: Vec<&str> = names.iter().map(String::as_str).collect();
                r.barrier(&all)
            })
        })
        .collect();
    for b in barriers {
        b.join()
            .map_err(|_| anyhow::anyhow!("barrier thread panicked"))??;
    }
    let barrier = t.elapsed();
    let t = Instant::now();
    let downs: Vec<_> = rpcs
        .into_iter()
        .map(|r| std::thread::spawn(move || r.shutdown()))
        .collect();
    for d in downs {
        d.join()
            .map_err(|_| anyhow::anyhow!("shutdown thread panicked"))??;
    }
    Ok((init, barrier, t.elapsed()))
}

/// Latency and bandwidth over mutual TLS (certificates made for the run) against plain TCP,
/// the two taking turns (plain, TLS, plain, TLS): each figure with `"tls": true|false`, then
/// the medians' ratios, TLS over plain.
fn tls(scale: Scale) -> anyhow::Result<()> {
    use distrpc_secure::tls::{CA_ENV, CERT_ENV, KEY_ENV, generate};
    let dir = std::env::temp_dir().join(format!("distrpc-bench-tls-{}", std::process::id()));
    generate(&dir, &["bench"])?;
    let rounds = if scale.quick { 1 } else { 2 };
    let mut figures: Vec<(bool, String, f64)> = Vec::new();
    let run = (|| -> anyhow::Result<()> {
        for _ in 0..rounds {
            for on in [false, true] {
                let mut launch = Launch::new(2, exe()?)
                    .args(["__bench-worker", "tls_probe", &scale.arg()])
                    .prefix_output(false)
                    .capture_output(true);
                if on {
                    launch = launch
                        .env(CA_ENV, dir.join("ca.pem"))
                        .env(CERT_ENV, dir.join("bench.pem"))
                        .env(KEY_ENV, dir.join("bench-key.pem"));
                }
                let mut group = launch.spawn()?;
                let lines = group
                    .output()
                    .ok_or_else(|| anyhow::anyhow!("no output captured"))?;
                group.wait_timeout(Some(Duration::from_secs(600)))?;
                for line in lines.iter().filter(|l| !l.stderr) {
                    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&line.line) else {
                        eprintln!("{}", line.line);
                        continue;
                    };
                    let key = match (v.get("bytes"), v.get("p50_us"), v.get("gb_per_s")) {
                        (Some(b), _, Some(g)) => g.as_f64().map(|g| (format!("bandwidth {b}"), g)),
                        (None, Some(p), _) => p.as_f64().map(|p| ("latency p50".to_string(), p)),
                        _ => None,
                    };
                    if let Some((k, x)) = key {
                        figures.push((on, k, x));
                    }
                    // One workload, "tls": its figures say which they are.
                    v["figure"] = v["workload"].clone();
                    v["workload"] = serde_json::Value::from("tls");
                    v["tls"] = serde_json::Value::Bool(on);
                    println!("{v}");
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    run?;
    let median = |on: bool, key: &str| {
        let mut xs: Vec<f64> = figures
            .iter()
            .filter(|(o, k, _)| *o == on && k == key)
            .map(|f| f.2)
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied()
    };
    let keys: std::collections::BTreeSet<&String> = figures.iter().map(|f| &f.1).collect();
    for key in keys {
        if let (Some(tls), Some(plain)) = (median(true, key), median(false, key)) {
            println!(
                "{{\"workload\": \"tls\", \"figure\": \"{key}\", \"plain\": {plain}, \"tls\": {tls}, \"tls_over_plain\": {:.3}}}",
                tls / plain
            );
        }
    }
    Ok(())
}

/// The raw limits, with plain blocking sockets and no async runtime.
fn raw(scale: Scale) -> anyhow::Result<()> {
    // 8-byte ping-pong, blocking.
    let (mut child, mut s) = raw_peer("echo", 8)?;
    let mut samples = time_calls(scale.calls, || pingpong(&mut s, false))?;
    println!("{}", percentiles_json("raw_pingpong", &mut samples));
    finish(&mut child, s)?;
    // 8-byte ping-pong, both sides busy-polling non-blocking sockets.
    let (mut child, mut s) = raw_peer("echo-busy", 8)?;
    s.set_nonblocking(true)?;
    let mut samples = time_calls(scale.calls, || pingpong(&mut s, true))?;
    println!("{}", percentiles_json("raw_pingpong_busy", &mut samples));
    s.set_nonblocking(false)?;
    finish(&mut child, s)?;
    // Pipelined 16-byte echo with a window of messages in flight.
    for window in WINDOWS {
        let (mut child, mut s) = raw_peer("echo", 16)?;
        let rate = raw_echo(&mut s, window, scale.seconds)?;
        println!("{{\"workload\": \"raw_echo\", \"window\": {window}, \"msgs_per_s\": {rate:.0}}}");
        finish(&mut child, s)?;
    }
    // One stream, as fast as it goes.
    let (mut child, mut s) = raw_peer("sink", 0)?;
    let total: usize = if scale.quick { 256 << 20 } else { 8 << 30 };
    let chunk = vec![7u8; 1 << 20];
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&chunk)?;
        sent += chunk.len();
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    ensure!(
        u64::from_le_bytes(ack) as usize == total,
        "the sink did not get every byte"
    );
    let gbps = total as f64 / started.elapsed().as_secs_f64() / 1e9;
    println!("{{\"workload\": \"raw_bandwidth\", \"bytes\": {total}, \"gb_per_s\": {gbps:.3}}}");
    child.wait()?;
    Ok(())
}

fn pingpong(s: &mut TcpStream, busy: bool) -> anyhow::Result<()> {
    let msg = [1u8; 8];
    let mut buf = [0u8; 8];
    if busy {
        spin_write(s, &msg)?;
        spin_read(s, &mut buf)?;
    } else {
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
    }
    Ok(())
}

fn spin_read(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn spin_write(s: &mut TcpStream, buf: &[u8]) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < buf.len() {
        match s.write(&buf[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn raw_echo(s: &mut TcpStream, window: usize, seconds: f64) -> anyhow::Result<f64> {
    let msg = [3u8; 16];
    let mut buf = [0u8; 16];
    for _ in 0..window {
        s.write_all(&msg)?;
    }
    let warm = Instant::now() + Duration::from_secs_f64(seconds / 10.0);
    while Instant::now() < warm {
        s.read_exact(&mut buf)?;
        s.write_all(&msg)?;
    }
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let mut done = 0u64;
    while Instant::now() < until {
        s.read_exact(&mut buf)?;
        s.write_all(&msg)?;
        done += 1;
    }
    let rate = done as f64 / started.elapsed().as_secs_f64();
    for _ in 0..window {
        s.read_exact(&mut buf)?;
    }
    Ok(rate)
}

/// Starts `distrpc __raw-echo MODE SIZE` and connects to it.
fn raw_peer(mode: &str, size: usize) -> anyhow::Result<(Child, TcpStream)> {
    let mut child = Command::new(exe()?)
        .args(["__raw-echo", mode, &size.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .context("no port from the raw peer")?
        .parse()?;
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    Ok((child, s))
}

fn finish(child: &mut Child, s: TcpStream) -> anyhow::Result<()> {
    drop(s);
    child.wait()?;
    Ok(())
}

/// The other end of the raw baselines: echoes fixed-size messages (blocking, or busy-polling a
/// non-blocking socket), or swallows a stream and answers with its length.
pub(crate) fn raw_echo_server(mode: &str, size: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("PORT {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    match mode {
        "echo" => {
            let mut buf = vec![0u8; size];
            while s.read_exact(&mut buf).is_ok() {
                s.write_all(&buf)?;
            }
        }
        "echo-busy" => {
            s.set_nonblocking(true)?;
            let mut buf = vec![0u8; size];
            while spin_read(&mut s, &mut buf).is_ok() {
                spin_write(&mut s, &buf)?;
            }
        }
        "sink" => {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => break,
                    n => total += n as u64,
                }
            }
            s.write_all(&total.to_le_bytes())?;
        }
        other => bail!("unknown raw mode {other:?}"),
    }
    Ok(())
}
