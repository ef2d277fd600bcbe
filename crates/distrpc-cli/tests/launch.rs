//! The `distrpc launch` command, with plain shell commands as workers.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Instant;

const DISTRPC: &str = env!("CARGO_BIN_EXE_distrpc");

/// Runs `distrpc ARGS`, requires success, and returns its standard output.
fn distrpc_ok(args: &[&str]) -> String {
    let out = Command::new(DISTRPC).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sets_the_environment_and_prefixes_output() {
    let out = Command::new(DISTRPC)
        .args(["launch", "--nproc", "3", "--", "sh", "-c"])
        .arg("echo rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK addr=$MASTER_ADDR port=$MASTER_PORT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    for r in 0..3 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("[{r}] ")))
            .unwrap_or_else(|| panic!("no line from rank {r} in {stdout}"));
        assert!(
            line.contains(&format!("rank={r} world=3 local={r} addr=127.0.0.1 port=")),
            "{line}"
        );
        let port: u16 = line.rsplit('=').next().unwrap().parse().unwrap();
        assert_ne!(port, 0, "a free port is chosen and passed on");
    }
}

#[test]
fn one_failure_stops_the_others_and_fails_the_launch() {
    let started = Instant::now();
    // Rank 1 fails at once; the others would run for a minute if not stopped.
    let out = Command::new(DISTRPC)
        .args(["launch", "--nproc", "3", "--", "sh", "-c"])
        .arg("if [ \"$RANK\" = 1 ]; then echo failing; exit 7; fi; exec sleep 60")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed().as_secs() < 50,
        "the other ranks were not stopped"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 1 failed"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("[1] failing"));
}

/// A failing rank stops whole ranks: rank 0's shell and the `sleep` it started, which holds
/// the output pipe. Regression: only the shell was killed, and the launcher waited 50 s for
/// the orphaned `sleep` to close its output.
#[test]
fn one_failure_stops_every_process_of_the_other_ranks() {
    let started = Instant::now();
    let out = Command::new(DISTRPC)
        .args(["launch", "--nproc", "2", "--", "sh", "-c"])
        .arg("if [ \"$RANK\" = 1 ]; then exit 3; else sleep 50; fi")
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("rank 1 failed"), "{stderr}");
    assert!(
        took.as_secs() < 20,
        "the launch took {took:?}: a rank's child outlived it"
    );
}

#[test]
fn bench_quick_prints_every_workload_as_json() {
    let stdout = distrpc_ok(&["bench", "--quick"]);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    let has = |workload: &str, field: &str| {
        lines.iter().any(|l| {
            l.contains(&format!("\"workload\": \"{workload}\""))
                && l.contains(&format!("\"{field}\": "))
        })
    };
    for (workload, field) in [
        ("latency", "p50_us"),
        ("latency_busy", "p99_us"),
        ("echo", "p90_us"),
        ("remote", "p50_us"),
        ("throughput", "calls_per_s"),
        ("bandwidth", "gb_per_s"),
        ("scaling", "shutdown_ms"),
        ("scaling", "all_to_all_ms"),
        ("memory", "rss_mib_after_init"),
        ("raw_pingpong", "p50_us"),
        ("raw_pingpong_busy", "p50_us"),
        ("raw_echo", "msgs_per_s"),
        ("raw_bandwidth", "gb_per_s"),
        ("tls", "tls_over_plain"),
    ] {
        assert!(
            has(workload, field),
            "no {workload} line with {field} in:\n{stdout}"
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"throughput\""))
            .count(),
        3,
        "one line per window"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("\"workload\": \"bandwidth\""))
            .count(),
        4,
        "one line per size"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("\"scaling\"")).count(),
        6,
        "3 process and 3 in-process groups"
    );
}

#[test]
fn bench_runs_only_the_workloads_named() {
    let stdout = distrpc_ok(&["bench", "--quick", "latency", "raw"]);
    assert!(stdout.contains("\"workload\": \"latency\""));
    assert!(!stdout.contains("\"workload\": \"echo\""));
    let bad = Command::new(DISTRPC)
        .args(["bench", "nonsense"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown workload"));
}

#[test]
fn plot_draws_a_png_from_a_run_and_rejects_junk() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run.jsonl");
    std::fs::write(
        &run,
        concat!(
            "{\"workload\": \"latency\", \"calls\": 10, \"p50_us\": 90.0, \"p90_us\": 120.0, \"p99_us\": 200.0}\n",
            "{\"workload\": \"raw_pingpong\", \"calls\": 10, \"p50_us\": 70.0, \"p90_us\": 80.0, \"p99_us\": 100.0}\n",
            "{\"workload\": \"bandwidth\", \"bytes\": 4096, \"gb_per_s\": 0.03}\n",
            "{\"workload\": \"bandwidth\", \"bytes\": 16777216, \"gb_per_s\": 3.0}\n",
            "{\"workload\": \"raw_bandwidth\", \"bytes\": 1073741824, \"gb_per_s\": 4.0}\n",
        ),
    )
    .unwrap();
    let png = dir.path().join("out.png");
    let out = Command::new(DISTRPC)
        .arg("plot")
        .arg(&run)
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");

    let junk = dir.path().join("junk.jsonl");
    std::fs::write(
        &junk,
        "not json at all\n{\"workload\": \"nothing we draw\"}\n",
    )
    .unwrap();
    let out = Command::new(DISTRPC)
        .arg("plot")
        .arg(&junk)
        .arg(&png)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no latency or bandwidth"));
}

/// `distrpc cert` makes a CA and a certificate per name, and reuses the CA when run again
/// (a worker added later joins the same group).
#[test]
fn cert_makes_a_group_ca_and_worker_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let run = |names: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_distrpc"))
            .arg("cert")
            .arg(dir.path())
            .args(names)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = run(&["worker0", "worker1"]);
    assert!(printed.contains("worker1: DISTRPC_TLS_CA="), "{printed}");
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    run(&["worker2"]);
    assert_eq!(
        std::fs::read(dir.path().join("ca.pem")).unwrap(),
        ca,
        "the CA is reused"
    );
    for f in [
        "worker0.pem",
        "worker0-key.pem",
        "worker1.pem",
        "worker2-key.pem",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
}
