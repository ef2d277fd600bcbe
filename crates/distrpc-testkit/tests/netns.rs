//! Workers on separate "hosts": network namespaces joined by a veth pair, made by the test
//! (it needs root and `ip`, as CI has) and removed after it.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WORKER: &str = env!("CARGO_BIN_EXE_distrpc-test-worker");

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

/// Two namespaces, `a` and `b`, each with one end of a veth pair; removed on drop.
struct Hosts {
    a: String,
    b: String,
    addr_a: String,
    addr_b: String,
}

impl Hosts {
    fn new() -> Result<Self, String> {
        let pid = std::process::id();
        let net = pid % 250 + 1;
        let hosts = Hosts {
            a: format!("drpc{pid}a"),
            b: format!("drpc{pid}b"),
            addr_a: format!("10.231.{net}.1"),
            addr_b: format!("10.231.{net}.2"),
        };
        ip(&["netns", "add", &hosts.a])?;
        ip(&["netns", "add", &hosts.b])?;
        let (va, vb) = (format!("v{pid}a"), format!("v{pid}b"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &hosts.a])?;
        ip(&["link", "set", &vb, "netns", &hosts.b])?;
        for (ns, dev, addr) in [
            (&hosts.a, &va, &hosts.addr_a),
            (&hosts.b, &vb, &hosts.addr_b),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(hosts)
    }

    /// Cuts the link from `b`'s side: `a` is unreachable from `b` and the reverse, with no
    /// FIN or RST on any connection.
    fn cut(&self) -> Result<(), String> {
        ip(&[
            "-n",
            &self.b,
            "link",
            "set",
            &format!("v{}b", std::process::id()),
            "down",
        ])
    }

    fn spawn(&self, ns: &str, envs: &[(&str, String)]) -> (Child, mpsc::Receiver<String>) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, WORKER, "liveness"])
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        (child, child_lines(stdout))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// The lines a child prints, as they come.
fn child_lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("> {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line starting with `prefix`.
fn expect_line(lines: &mpsc::Receiver<String>, prefix: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.starts_with(prefix) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line starting with {prefix:?}: {e}"),
        }
    }
}

/// Kills the child when dropped (a failing test must not leave workers behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A peer whose host vanishes — the link between cut, so no FIN or RST ever arrives — fails
/// the call waiting on it (one with no timeout) within the liveness bound. Regression: such a
/// call waited forever.
#[test]
fn a_vanished_host_fails_calls_within_the_liveness_bound() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if !is_root {
        eprintln!("SKIPPED: network namespaces need root (CI runs as root)");
        return;
    }
    let hosts = Hosts::new().unwrap();
    let bound = "3".to_string();
    let (w0, lines0) = hosts.spawn(
        &hosts.a,
        &[
            ("RANK", "0".into()),
            ("HOST_ADDR", hosts.addr_a.clone()),
            ("LIVENESS_SECS", bound.clone()),
        ],
    );
    let _w0 = Reaped(w0);
    let port = expect_line(&lines0, "store ")["store ".len()..].to_string();
    let (w1, lines1) = hosts.spawn(
        &hosts.b,
        &[
            ("RANK", "1".into()),
            ("HOST_ADDR", hosts.addr_b.clone()),
            ("MASTER_ADDR", hosts.addr_a.clone()),
            ("MASTER_PORT", port),
            ("LIVENESS_SECS", bound),
        ],
    );
    let mut w1 = Reaped(w1);
    expect_line(&lines1, "calling");
    // The call is in flight (running on worker0) before the link goes.
    expect_line(&lines0, "hanging");
    hosts.cut().unwrap();
    let failed = expect_line(&lines1, "failed after");
    let status = w1.0.wait().unwrap();
    assert!(status.success(), "worker1: {failed}");
}
