//! "Hosts" for multi-host tests: network namespaces on one bridge, made by the test (it needs
//! root and `ip`, as CI has) and removed when dropped. Every address lives inside the
//! namespaces; the machine's own network is not touched.
//!
//! ```text
//!   host 0 ─ veth ─┐
//!   host 1 ─ veth ─┼─ bridge (in a switch namespace of its own)
//!   host 2 ─ veth ─┘
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process may make network namespaces (it runs as root and has `ip`).
pub fn available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    root && Command::new("ip").arg("-V").output().is_ok()
}

/// Hosts on one bridge; see the module docs.
#[derive(Debug)]
pub struct Lan {
    tag: String,
    switch: String,
    hosts: Vec<String>,
    addrs: Vec<String>,
}

impl Lan {
    /// `n` hosts, with addresses `10.233.X.1`, `10.233.X.2`, … (X from this process's id).
    ///
    /// # Errors
    /// If a namespace, link or address cannot be made (what was made is removed).
    pub fn new(n: usize) -> Result<Self, String> {
        let pid = std::process::id();
        let tag = format!("{pid}{}", next_lan());
        let net = pid % 250 + 1;
        let mut lan = Lan {
            switch: format!("drpc{tag}s"),
            hosts: Vec::new(),
            addrs: Vec::new(),
            tag,
        };
        ip(&["netns", "add", &lan.switch])?;
        ip(&["-n", &lan.switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan.switch, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let host = format!("drpc{}h{i}", lan.tag);
            ip(&["netns", "add", &host])?;
            lan.hosts.push(host.clone());
            let (near, far) = (lan.veth(i), format!("s{}h{i}", lan.tag));
            ip(&["link", "add", &near, "type", "veth", "peer", "name", &far])?;
            ip(&["link", "set", &near, "netns", &host])?;
            ip(&["link", "set", &far, "netns", &lan.switch])?;
            ip(&["-n", &lan.switch, "link", "set", &far, "master", "br0"])?;
            ip(&["-n", &lan.switch, "link", "set", &far, "up"])?;
            let addr = format!("10.233.{net}.{}", i + 1);
            ip(&[
                "-n",
                &host,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &near,
            ])?;
            ip(&["-n", &host, "link", "set", "lo", "up"])?;
            ip(&["-n", &host, "link", "set", &near, "up"])?;
            lan.addrs.push(addr);
        }
        Ok(lan)
    }

    fn veth(&self, i: usize) -> String {
        format!("v{}h{i}", self.tag)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> &str {
        &self.addrs[i]
    }

    /// Takes host `i`'s link down: it is cut off from the others, with no FIN or RST on any
    /// connection.
    ///
    /// # Errors
    /// If `ip` fails.
    pub fn cut(&self, i: usize) -> Result<(), String> {
        ip(&["-n", &self.hosts[i], "link", "set", &self.veth(i), "down"])
    }

    /// Brings host `i`'s link back up.
    ///
    /// # Errors
    /// If `ip` fails.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        ip(&["-n", &self.hosts[i], "link", "set", &self.veth(i), "up"])
    }

    /// Runs `program args` on host `i` with `envs`, its output as lines and its input open.
    ///
    /// # Panics
    /// If it cannot be started.
    pub fn spawn(&self, i: usize, program: &str, args: &[&str], envs: &[(&str, String)]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.hosts[i], program])
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ip netns exec");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let label = format!("host{i}");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("{label}> {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            stdin,
            lines,
        }
    }
}

fn next_lan() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Deleting a namespace deletes its ends of the veth pairs, and with them the others.
        for ns in self.hosts.iter().chain([&self.switch]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// A process on a host: its lines, its input; killed when dropped (a failing test leaves no
/// process behind).
#[derive(Debug)]
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    /// Sends one command line.
    ///
    /// # Panics
    /// If the process's input is closed.
    pub fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{command}").expect("the process reads its input");
        stdin.flush().expect("flush");
    }

    /// The next line starting with `prefix` (others are skipped), waiting at most `bound`.
    ///
    /// # Panics
    /// If none comes in time.
    pub fn expect(&self, prefix: &str, bound: Duration) -> String {
        let deadline = std::time::Instant::now() + bound;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line starting with {prefix:?} within {bound:?}: {e}"),
            }
        }
    }

    /// Waits for the process to end; whether it succeeded.
    pub fn wait(mut self) -> bool {
        drop(self.stdin.take());
        self.child.wait().is_ok_and(|s| s.success())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
