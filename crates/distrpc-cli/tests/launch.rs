//! The `distrpc launch` command, with plain shell commands as workers.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Instant;

const DISTRPC: &str = env!("CARGO_BIN_EXE_distrpc");

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

#[test]
fn bench_quick_prints_json_lines() {
    let out = Command::new(DISTRPC)
        .args(["bench", "--quick"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for workload in ["latency", "echo", "remote", "raw_pingpong"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("\"workload\": \"{workload}\"")))
            .unwrap_or_else(|| panic!("no {workload} line in {stdout}"));
        assert!(
            line.contains("\"p50_us\": ") && line.starts_with('{') && line.ends_with('}'),
            "{line}"
        );
    }
}
