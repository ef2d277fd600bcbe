//! The `distrpc` command.
//!
//! - `distrpc launch --nproc N [--master-addr A] [--master-port P] -- CMD ARGS...` starts N
//!   processes the way torchrun does (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//!   `MASTER_PORT`), prefixes their output with their rank, and if one fails stops the others
//!   and exits non-zero.
//! - `distrpc bench [--quick] [WORKLOAD...]` measures distrpc against the machine's raw limits
//!   and prints one JSON line per workload.
//! - `distrpc plot RUN.jsonl OUT.png` draws the latency and bandwidth picture of a saved run.
//! - `distrpc cert DIR NAME...` makes a group's TLS certificates: a CA (kept and reused in
//!   `DIR`) and one certificate and key per worker name.

mod bench;
mod plot;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use distrpc::launch::{Launch, LaunchError};

#[derive(Parser, Debug)]
#[command(
    name = "distrpc",
    version,
    about = "Distributed RPC with remote references"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start N worker processes on this machine (torchrun's convention).
    Launch {
        /// Number of processes.
        #[arg(long)]
        nproc: usize,
        /// Address rank 0 hosts the rendezvous store on.
        #[arg(long, default_value = "127.0.0.1")]
        master_addr: String,
        /// Store port; 0 (the default) picks a free one and hands it to rank 0 as an open socket.
        #[arg(long, default_value_t = 0)]
        master_port: u16,
        /// Seconds a stopped rank has between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = distrpc::launch::DEFAULT_GRACE.as_secs_f64())]
        grace: f64,
        /// The command to run, and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// Measure distrpc and the raw limits of this machine; one JSON line per workload.
    Bench(bench::BenchArgs),
    /// Draw the latency and bandwidth picture of one saved `distrpc bench` run.
    Plot {
        /// The run's JSON lines (`distrpc bench > run.jsonl`).
        input: std::path::PathBuf,
        /// The PNG to write.
        output: std::path::PathBuf,
    },
    /// Make a group's TLS certificates in DIR: a CA (`ca.pem`, `ca-key.pem`; reused if there)
    /// and, for each NAME, `NAME.pem` and `NAME-key.pem` (keys readable by their owner only).
    /// Give each worker the CA's certificate and its own pair (`RpcOptions::tls`, or
    /// `DISTRPC_TLS_CA`, `DISTRPC_TLS_CERT`, `DISTRPC_TLS_KEY`).
    Cert {
        /// Where the certificates go.
        dir: std::path::PathBuf,
        /// The workers' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Internal: a worker process of `distrpc bench`.
    #[command(hide = true, name = "__bench-worker")]
    BenchWorker { workload: String, scale: String },
    /// Internal: the other end of the raw TCP baselines.
    #[command(hide = true, name = "__raw-echo")]
    RawEcho { mode: String, size: usize },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Launch {
            nproc,
            master_addr,
            master_port,
            grace,
            command,
        } => launch(nproc, master_addr, master_port, grace, command),
        Command::Bench(args) => bench::run(args),
        Command::Plot { input, output } => plot::run(&input, &output),
        Command::Cert { dir, names } => cert(&dir, &names),
        Command::BenchWorker { workload, scale } if workload == "scaling" => {
            bench::scaling_worker(&scale)
        }
        Command::BenchWorker { workload, scale } => bench::worker(&workload, &scale),
        Command::RawEcho { mode, size } => bench::raw_echo_server(&mode, size),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("distrpc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cert(dir: &std::path::Path, names: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    distrpc_secure::tls::generate(dir, &names)?;
    for name in &names {
        println!(
            "{name}: DISTRPC_TLS_CA={ca} DISTRPC_TLS_CERT={cert} DISTRPC_TLS_KEY={key}",
            ca = dir.join("ca.pem").display(),
            cert = dir.join(format!("{name}.pem")).display(),
            key = dir.join(format!("{name}-key.pem")).display(),
        );
    }
    Ok(())
}

fn launch(
    nproc: usize,
    master_addr: String,
    master_port: u16,
    grace: f64,
    command: Vec<OsString>,
) -> anyhow::Result<()> {
    anyhow::ensure!(nproc > 0, "--nproc must be at least 1");
    let grace = std::time::Duration::try_from_secs_f64(grace)
        .map_err(|e| anyhow::anyhow!("--grace {grace}: {e}"))?;
    let mut parts = command.into_iter();
    let program = parts
        .next()
        .ok_or_else(|| anyhow::anyhow!("no command given after --"))?;
    let launch = Launch::new(nproc, program)
        .args(parts)
        .master_addr(master_addr)
        .master_port(master_port)
        .grace(grace);
    match launch.run() {
        Ok(()) => Ok(()),
        Err(e @ LaunchError::Failed { .. }) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}
