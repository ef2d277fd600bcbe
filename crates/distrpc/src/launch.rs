//! Starting a group of worker processes on this machine: what `distrpc launch` (and torchrun)
//! does, as a library, so that examples and tests start their own workers.
//!
//! Each process gets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`. With no
//! fixed port, the launcher binds the store's socket on port 0 itself and hands it to rank 0
//! (inherited descriptor, [`STORE_FD_ENV`](crate::STORE_FD_ENV)), so the port is known before
//! any worker starts and no other process can take it. Such a group — every rank started here —
//! is also given a fresh auth token (`DISTRPC_AUTH_TOKEN`), unless the environment has one: its
//! connections are closed to every process but its own ([`crate::RpcOptions::auth_token`]).
//! Each output line is prefixed with its rank. If a process fails, the others are stopped.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a stopped group has between `SIGTERM` and `SIGKILL` by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// Why a launched group failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// A process could not be started.
    #[error("cannot start rank {rank}: {source}")]
    Spawn {
        /// The rank.
        rank: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The store socket could not be prepared.
    #[error("cannot prepare the store socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A process exited with a failure; the others were stopped.
    #[error("rank {rank} failed ({status}); the other ranks were stopped")]
    Failed {
        /// The first rank that failed.
        rank: usize,
        /// How it ended.
        status: ExitStatus,
    },
}

/// A group of processes to start.
///
/// ```no_run
/// use distrpc::launch::Launch;
///
/// // Runs 4 copies of `./trainer --epochs 3`, ranks 0..4, on a free port.
/// Launch::new(4, "./trainer").arg("--epochs").arg("3").run()?;
/// # Ok::<(), distrpc::launch::LaunchError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Launch {
    nproc: usize,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    master_addr: String,
    master_port: Option<u16>,
    first_rank: usize,
    prefix: bool,
    capture: bool,
    grace: Duration,
}

impl Launch {
    /// `nproc` processes of `program`.
    pub fn new(nproc: usize, program: impl Into<OsString>) -> Self {
        Self {
            nproc,
            program: program.into(),
            args: Vec::new(),
            envs: Vec::new(),
            master_addr: "127.0.0.1".into(),
            master_port: None,
            first_rank: 0,
            prefix: true,
            capture: false,
            grace: DEFAULT_GRACE,
        }
    }

    /// Adds an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for every process.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// The address rank 0 hosts the store on (default `127.0.0.1`).
    pub fn master_addr(mut self, addr: impl Into<String>) -> Self {
        self.master_addr = addr.into();
        self
    }

    /// A fixed store port (default: a free one, handed to rank 0 as an open socket).
    pub fn master_port(mut self, port: u16) -> Self {
        self.master_port = Some(port).filter(|&p| p != 0);
        self
    }

    /// Starts the processes as ranks `first..first + nproc` of a group of `first + nproc`, for a
    /// caller that is itself ranks `0..first` (it then hosts the store: give its port with
    /// [`Launch::master_port`]).
    pub fn first_rank(mut self, first: usize) -> Self {
        self.first_rank = first;
        self
    }

    /// Hands every output line to the caller ([`Group::output`]) instead of printing it.
    pub fn capture_output(mut self, on: bool) -> Self {
        self.capture = on;
        self
    }

    /// Whether to prefix each output line with `[rank]` (default on).
    pub fn prefix_output(mut self, on: bool) -> Self {
        self.prefix = on;
        self
    }

    /// How long stopping the group waits after `SIGTERM` before it sends `SIGKILL` (torchrun's
    /// way); default [`DEFAULT_GRACE`].
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Starts every process.
    pub fn spawn(&self) -> Result<Group, LaunchError> {
        let store = match self.master_port {
            Some(_) => None,
            // Rank 0 is not among our processes: whoever is hosts the store.
            None if self.first_rank > 0 => None,
            None => Some(
                std::net::TcpListener::bind((self.master_addr.as_str(), 0))
                    .map_err(LaunchError::Socket)?,
            ),
        };
        let port = match (&store, self.master_port) {
            (Some(l), _) => l.local_addr().map_err(LaunchError::Socket)?.port(),
            (None, Some(p)) => p,
            (None, None) => 0,
        };
        // Only a group started whole here can make up its own token: ranks launched elsewhere
        // would not know it.
        let inherited =
            |key: &str| std::env::var_os(key).is_some() || self.envs.iter().any(|(k, _)| k == key);
        let token = (store.is_some()
            && !inherited(distrpc_secure::auth::TOKEN_ENV)
            && !inherited(distrpc_secure::auth::TOKEN_FILE_ENV))
        .then(distrpc_secure::Secret::generate_token);
        let (events_tx, events) = mpsc::channel();
        let (lines_tx, lines) = match self.capture {
            true => {
                let (tx, rx) = mpsc::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let mut group = Group {
            lines,
            grace: self.grace,
            first_rank: self.first_rank,
            pids: Vec::new(),
            exited: Vec::new(),
            pumps: Vec::new(),
            events,
        };
        for index in 0..self.nproc {
            let rank = self.first_rank + index;
            let mut cmd = Command::new(&self.program);
            // Each rank leads a process group of its own: stopping a rank stops whatever it
            // started too (a shell's children would otherwise outlive it, holding its output).
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            cmd.args(&self.args)
                .envs(self.envs.iter().map(|(k, v)| (k, v)))
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", (self.first_rank + self.nproc).to_string())
                .env("MASTER_ADDR", &self.master_addr)
                .env("MASTER_PORT", port.to_string())
                .env_remove(crate::STORE_FD_ENV)
                .envs(token.iter().map(|t| (distrpc_secure::auth::TOKEN_ENV, t)))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let inherit = match (&store, index) {
                (Some(listener), 0) => {
                    cmd.env(crate::STORE_FD_ENV, listener.as_raw_fd().to_string());
                    Some(socket2::SockRef::from(listener))
                }
                _ => None,
            };
            // Only rank 0 may inherit the store socket: clear close-on-exec just for its spawn.
            if let Some(s) = &inherit {
                s.set_cloexec(false).map_err(LaunchError::Socket)?;
            }
            let spawned = cmd.spawn();
            if let Some(s) = &inherit {
                s.set_cloexec(true).map_err(LaunchError::Socket)?;
            }
            let mut child = match spawned {
                Ok(c) => c,
                Err(source) => {
                    group.kill_all();
                    return Err(LaunchError::Spawn { rank, source });
                }
            };
            let sink = |stderr| match &lines_tx {
                Some(tx) => Sink::Caller {
                    tx: tx.clone(),
                    rank,
                    stderr,
                },
                None => Sink::Print {
                    prefix: self.prefix.then(|| format!("[{rank}] ")),
                    stderr,
                },
            };
            if let Some(out) = child.stdout.take() {
                group.pumps.push(pump(out, sink(false)));
            }
            if let Some(err) = child.stderr.take() {
                group.pumps.push(pump(err, sink(true)));
            }
            group.pids.push(child.id());
            let exited = Arc::new(AtomicBool::new(false));
            group.exited.push(exited.clone());
            let tx = events_tx.clone();
            // The waiter owns the child; the group kills by pid until the waiter reaps it.
            std::thread::spawn(move || {
                let status = child.wait().ok();
                exited.store(true, Ordering::Release);
                let _ = tx.send((index, status));
            });
        }
        Ok(group)
    }

    /// Starts every process and waits for all of them; if one fails, stops the others.
    pub fn run(&self) -> Result<(), LaunchError> {
        self.spawn()?.wait()
    }
}

/// One line a rank printed, as [`Launch::capture_output`] hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// The rank that printed it.
    pub rank: usize,
    /// Whether it went to standard error.
    pub stderr: bool,
    /// The line, without its newline (lossily decoded as UTF-8).
    pub line: String,
}

/// Where a rank's output goes.
enum Sink {
    /// To this process's stdout or stderr, each line prefixed.
    Print {
        prefix: Option<String>,
        stderr: bool,
    },
    /// To the caller, line by line.
    Caller {
        tx: mpsc::Sender<OutputLine>,
        rank: usize,
        stderr: bool,
    },
}

fn pump<R: Read + Send + 'static>(src: R, sink: Sink) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut line = Vec::new();
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            match &sink {
                Sink::Print { prefix, stderr } => {
                    let mut out: Box<dyn Write> = if *stderr {
                        Box::new(std::io::stderr().lock())
                    } else {
                        Box::new(std::io::stdout().lock())
                    };
                    let _ = out.write_all(prefix.as_deref().unwrap_or("").as_bytes());
                    let _ = out.write_all(&line);
                    if line.last() != Some(&b'\n') {
                        let _ = out.write_all(b"\n");
                    }
                }
                Sink::Caller { tx, rank, stderr } => {
                    let text = String::from_utf8_lossy(&line);
                    let _ = tx.send(OutputLine {
                        rank: *rank,
                        stderr: *stderr,
                        line: text.trim_end_matches(['\n', '\r']).to_string(),
                    });
                }
            }
            line.clear();
        }
    })
}

/// A started group of processes.
#[derive(Debug)]
pub struct Group {
    /// Output lines, when captured.
    lines: Option<mpsc::Receiver<OutputLine>>,
    grace: Duration,
    first_rank: usize,
    /// By index: the process of rank `first_rank + index`.
    pids: Vec<u32>,
    exited: Vec<Arc<AtomicBool>>,
    pumps: Vec<JoinHandle<()>>,
    events: mpsc::Receiver<(usize, Option<ExitStatus>)>,
}

impl Group {
    /// The ranks' output lines as they come, when the launch captured them
    /// ([`Launch::capture_output`]); the channel ends once every rank's output has closed.
    pub fn output(&mut self) -> Option<mpsc::Receiver<OutputLine>> {
        self.lines.take()
    }

    /// The process ids, in rank order.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Kills the process of `rank` (SIGKILL), unless it has already exited.
    /// Kills rank `rank` (`SIGKILL`) with every process it started (its process group).
    pub fn kill(&mut self, rank: usize) -> std::io::Result<()> {
        let index = rank.wrapping_sub(self.first_rank);
        if index >= self.pids.len() {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        self.signal(index, libc::SIGKILL)
    }

    /// Sends `signal` to the process group of the rank at `index`. A group outlives its leader
    /// while the leader's children run, which is why it is signalled even after the leader
    /// exited; its id cannot be taken by a new process while any member lives.
    fn signal(&self, index: usize, signal: libc::c_int) -> std::io::Result<()> {
        let pid = self.pids.get(index).copied().unwrap_or(0);
        let pgid = i32::try_from(pid)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names a group.
        if unsafe { libc::kill(-pgid, signal) } == 0 {
            return Ok(());
        }
        match std::io::Error::last_os_error() {
            // Nobody left in the group.
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            e => Err(e),
        }
    }

    /// Stops every rank as torchrun does: `SIGTERM` to each rank's process group, up to the
    /// grace period for them to exit, then `SIGKILL` to every group.
    fn stop_all(&mut self) {
        for index in 0..self.pids.len() {
            let _ = self.signal(index, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + self.grace;
        while !self.exited.iter().all(|e| e.load(Ordering::Acquire)) {
            if self.next_exit(Some(deadline)).is_none() {
                break;
            }
        }
        self.kill_all();
    }

    fn next_exit(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Option<(usize, Option<ExitStatus>)> {
        match deadline {
            None => self.events.recv().ok(),
            Some(d) => self
                .events
                .recv_timeout(d.saturating_duration_since(std::time::Instant::now()))
                .ok(),
        }
    }

    fn kill_all(&mut self) {
        for index in 0..self.pids.len() {
            let _ = self.kill(self.first_rank + index);
        }
    }

    /// Waits for every process; on the first failure stops the rest and reports it.
    pub fn wait(self) -> Result<(), LaunchError> {
        self.wait_timeout(None)
    }

    /// [`Group::wait`], stopping everything if the group runs longer than `timeout`.
    pub fn wait_timeout(mut self, timeout: Option<Duration>) -> Result<(), LaunchError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut failure = None;
        let mut exited = vec![false; self.pids.len()];
        for _ in 0..self.pids.len() {
            match self.next_exit(deadline) {
                Some((index, Some(status))) if status.success() => exited[index] = true,
                // A process that could not be waited on counts as failed with exit code 1.
                Some((index, status)) => {
                    failure = Some((index, status.unwrap_or(ExitStatus::from_raw(1 << 8))));
                    break;
                }
                // Out of time: the first rank still running is reported as killed.
                None => {
                    let running = exited.iter().position(|e| !e).unwrap_or(0);
                    failure = Some((running, ExitStatus::from_raw(libc::SIGKILL)));
                    break;
                }
            }
        }
        if failure.is_some() {
            self.stop_all();
        }
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
        match failure {
            Some((index, status)) => Err(LaunchError::Failed {
                rank: self.first_rank + index,
                status,
            }),
            None => Ok(()),
        }
    }
}

impl Group {
    /// Waits for every process to exit, whatever the others do, and returns each exit status in
    /// rank order (`None` for a process still running when `timeout` ran out; it is then killed).
    pub fn wait_all(mut self, timeout: Option<Duration>) -> Vec<Option<ExitStatus>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut statuses = vec![None; self.pids.len()];
        for _ in 0..self.pids.len() {
            match self.next_exit(deadline) {
                Some((index, status)) => statuses[index] = status,
                None => break,
            }
        }
        self.kill_all();
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
        statuses
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // A group dropped early (a failing test) must not leave processes behind.
        self.kill_all();
    }
}
