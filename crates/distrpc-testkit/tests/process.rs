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

/// What each rank of a group launched with `sh -c script` printed, in rank order.
fn printed(launch: Launch) -> Vec<String> {
    let mut group = launch.capture_output(true).spawn().unwrap();
    let lines = group.output().unwrap();
    group.wait_timeout(BOUND).unwrap();
    let mut got: Vec<_> = lines.iter().map(|l| (l.rank, l.line)).collect();
    got.sort();
    got.into_iter().map(|(_, l)| l).collect()
}

/// A group the launcher starts whole (it hosts the store's socket) gets one fresh auth token
/// for all its ranks; one whose other ranks start elsewhere (a fixed port) gets none, nor does
/// one whose environment already has a token.
#[test]
fn a_group_launched_whole_shares_a_fresh_auth_token() {
    let script = "echo ${DISTRPC_AUTH_TOKEN:-none}";
    let tokens = printed(Launch::new(2, "sh").args(["-c", script]));
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0].len(), 64, "{tokens:?}");
    assert_eq!(tokens[0], tokens[1], "one token for the group");
    let again = printed(Launch::new(1, "sh").args(["-c", script]));
    assert_ne!(again[0], tokens[0], "a fresh token per group");

    let fixed_port = printed(Launch::new(1, "sh").args(["-c", script]).master_port(1));
    assert_eq!(fixed_port, ["none"]);
    let given = printed(
        Launch::new(1, "sh")
            .args(["-c", script])
            .env("DISTRPC_AUTH_TOKEN", "the user's own token"),
    );
    assert_eq!(given, ["the user's own token"]);
}
