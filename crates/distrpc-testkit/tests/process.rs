//! Workers in separate processes, started through the launcher as `distrpc launch` would.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use distrpc::launch::Launch;

const WORKER: &str = env!("CARGO_BIN_EXE_distrpc-test-worker");
const BOUND: Option<Duration> = Some(Duration::from_secs(120));

#[test]
fn four_processes_call_each_other_and_shut_down_together() {
    // env:// rendezvous; rank 0 hosts the store on a socket the launcher bound on port 0.
    let group = Launch::new(4, WORKER).arg("basic").spawn().unwrap();
    group.wait_timeout(BOUND).expect("every rank must succeed");
}

#[test]
fn a_dead_peer_fails_the_calls_waiting_on_it_at_once() {
    let group = Launch::new(3, WORKER).arg("peer_death").spawn().unwrap();
    let statuses = group.wait_all(BOUND);
    let codes: Vec<Option<i32>> = statuses.iter().map(|s| s.and_then(|s| s.code())).collect();
    assert_eq!(
        codes,
        vec![Some(3), Some(0), Some(0)],
        "rank 0 crashes, the survivors succeed"
    );
}

/// Regression: rank 0 left the store socket inheritable and its variable set, so a process it
/// started got both (and one that was itself a distrpc rank 0 would take the socket).
#[test]
fn rank_0s_children_inherit_neither_the_store_socket_nor_its_variable() {
    let group = Launch::new(1, WORKER).arg("store_fd").spawn().unwrap();
    group.wait_timeout(BOUND).expect("rank 0's check must pass");
}

/// Regression: a rank's output could only go to the launcher's own stdout and stderr.
#[test]
fn the_caller_can_take_each_ranks_output() {
    let mut group = Launch::new(2, "sh")
        .args(["-c", "echo out $RANK; echo err $RANK >&2"])
        .capture_output(true)
        .spawn()
        .unwrap();
    let lines = group.output().unwrap();
    group.wait_timeout(BOUND).unwrap();
    let mut got: Vec<_> = lines.iter().map(|l| (l.rank, l.stderr, l.line)).collect();
    got.sort();
    let want = [
        (0, false, "out 0"),
        (0, true, "err 0"),
        (1, false, "out 1"),
        (1, true, "err 1"),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(r, e, l)| (*r, *e, l.to_string()))
        .collect();
    assert_eq!(got, want);
}
