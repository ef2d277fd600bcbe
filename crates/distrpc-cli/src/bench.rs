//! `distrpc bench`: distrpc's figures next to the raw limits of this machine, measured in the
//! same run, because this machine is shared and noisy and only ratios within one run mean much.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use distrpc::launch::Launch;
use distrpc::{RRef, Rpc, RpcOptions, Tensor};

/// Arguments of `distrpc bench`.
#[derive(clap::Args, Debug)]
pub(crate) struct BenchArgs {
    /// Run every workload briefly (a smoke test, not a measurement).
    #[arg(long)]
    quick: bool,
    /// Workloads to run (default: all): latency, echo, remote, raw.
    workloads: Vec<String>,
}

const WORKLOADS: &[&str] = &["latency", "echo", "remote", "raw"];

#[distrpc::function]
fn noop() {}

#[distrpc::function]
fn echo(t: Tensor) -> Tensor {
    t
}

#[distrpc::function]
fn small_tensor() -> Tensor {
    Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
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
    let calls = if args.quick { 200 } else { 20_000 };
    for w in chosen {
        match w {
            "raw" => raw_pingpong(calls)?,
            two_process => two_processes(two_process, calls)?,
        }
    }
    Ok(())
}

fn exe() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the distrpc executable")
}

/// Two worker processes; rank 1 times `calls` operations against rank 0 after a warm-up and
/// prints the JSON line.
fn two_processes(workload: &str, calls: usize) -> anyhow::Result<()> {
    Launch::new(2, exe()?)
        .args(["__bench-worker", workload, &calls.to_string()])
        .prefix_output(false)
        .run()?;
    Ok(())
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

pub(crate) fn worker(workload: &str, calls: usize) -> anyhow::Result<()> {
    let rank: usize = std::env::var("RANK").context("RANK")?.parse()?;
    let rpc = Rpc::init(&format!("bench{rank}"), None, None, RpcOptions::default())?;
    if rank == 1 {
        let mut samples = match workload {
            "latency" => time_calls(calls, || Ok(rpc.rpc_sync(0, noop, ())?))?,
            "echo" => {
                let t = Tensor::from_slice(&[1.0f32]);
                time_calls(calls, || {
                    rpc.rpc_sync(0, echo, (t.clone(),))?;
                    Ok(())
                })?
            }
            "remote" => time_calls(calls, || {
                let r: RRef<Tensor> = rpc.remote(0, small_tensor, ());
                r.to_here()?;
                Ok(())
            })?,
            other => bail!("unknown bench workload {other:?}"),
        };
        println!("{}", percentiles_json(workload, calls, &mut samples));
    }
    rpc.shutdown()?;
    Ok(())
}

fn percentiles_json(workload: &str, n: usize, samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1));
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    format!(
        "{{\"workload\": \"{workload}\", \"calls\": {n}, \"p50_us\": {:.1}, \"p90_us\": {:.1}, \"p99_us\": {:.1}}}",
        pct(0.50),
        pct(0.90),
        pct(0.99)
    )
}

/// The raw limit: an 8-byte ping-pong over blocking TCP between this process and a child.
fn raw_pingpong(calls: usize) -> anyhow::Result<()> {
    let mut child = Command::new(exe()?)
        .args(["__raw-echo", "8"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut out = BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("PORT ")
        .context("no port from the echo server")?
        .parse()?;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 8];
    let mut samples = Vec::with_capacity(calls);
    for i in 0..(calls + (calls / 10).max(100)) {
        let t = Instant::now();
        s.write_all(&(i as u64).to_le_bytes())?;
        s.read_exact(&mut buf)?;
        if i >= (calls / 10).max(100) {
            samples.push(t.elapsed());
        }
    }
    drop(s);
    child.wait()?;
    println!("{}", percentiles_json("raw_pingpong", calls, &mut samples));
    Ok(())
}

pub(crate) fn raw_echo_server(size: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("PORT {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; size];
    while s.read_exact(&mut buf).is_ok() {
        s.write_all(&buf)?;
    }
    Ok(())
}
