//! Workers on separate "hosts": network namespaces on one bridge, made by the test (it needs
//! root and `ip`, as CI has; elsewhere the tests say SKIPPED) and removed after it
//! ([`distrpc_testkit::netns`]).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use distrpc_testkit::netns::{Lan, Proc, available};

const WORKER: &str = env!("CARGO_BIN_EXE_distrpc-test-worker");
/// The liveness bound of the tests' workers: short enough to see a partition quickly, long
/// enough that a loaded CI machine answering late is not taken for one.
const LIVENESS_SECS: u64 = 6;
const LINE: Duration = Duration::from_secs(60);

fn skipped() -> bool {
    if available() {
        return false;
    }
    eprintln!("SKIPPED: network namespaces need root and `ip` (CI has both)");
    true
}

/// A peer whose host vanishes — the link between cut, so no FIN or RST ever arrives — fails
/// the call waiting on it (one with no timeout) within the liveness bound. Regression: such a
/// call waited forever.
#[test]
fn a_vanished_host_fails_calls_within_the_liveness_bound() {
    if skipped() {
        return;
    }
    let lan = Lan::new(2).unwrap();
    let bound = LIVENESS_SECS.to_string();
    let w0 = lan.spawn(
        0,
        WORKER,
        &["liveness"],
        &[
            ("RANK", "0".into()),
            ("HOST_ADDR", lan.addr(0).into()),
            ("LIVENESS_SECS", bound.clone()),
        ],
    );
    let port = w0.expect("store ", LINE)["store ".len()..].to_string();
    let w1 = lan.spawn(
        1,
        WORKER,
        &["liveness"],
        &[
            ("RANK", "1".into()),
            ("HOST_ADDR", lan.addr(1).into()),
            ("MASTER_ADDR", lan.addr(0).into()),
            ("MASTER_PORT", port),
            ("LIVENESS_SECS", bound),
        ],
    );
    w1.expect("calling", LINE);
    // The call is in flight (running on worker0) before the link goes.
    w0.expect("hanging", LINE);
    lan.cut(1).unwrap();
    let failed = w1.expect("failed after", LINE);
    assert!(w1.wait(), "worker1: {failed}");
}

/// A group of three hosts (a fourth holds a stranger), secured by `security(rank)`'s
/// environment: calls and references across hosts; the stranger is closed and cannot join; a
/// partition fails the call waiting on the cut host within the liveness bound (it has no
/// timeout) while the others keep working, and once the link is back a new call reaches the
/// host again; then the group shuts down together.
fn three_hosts(security: impl Fn(usize) -> Vec<(&'static str, String)>) {
    let lan = Lan::new(4).unwrap();
    let env = |rank: usize, store: Option<&str>| {
        let mut env = vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "3".to_string()),
            ("HOST_ADDR", lan.addr(rank).to_string()),
            ("LIVENESS_SECS", LIVENESS_SECS.to_string()),
        ];
        if let Some(port) = store {
            env.push(("MASTER_ADDR", lan.addr(0).to_string()));
            env.push(("MASTER_PORT", port.to_string()));
        }
        env.extend(security(rank));
        env
    };
    let mut w0 = lan.spawn(0, WORKER, &["hosts"], &env(0, None));
    let port = w0.expect("store ", LINE)["store ".len()..].to_string();
    let mut w1 = lan.spawn(1, WORKER, &["hosts"], &env(1, Some(&port)));
    let mut w2 = lan.spawn(2, WORKER, &["hosts"], &env(2, Some(&port)));
    let w1_addr = w1.expect("ready ", LINE)["ready ".len()..].to_string();
    for w in [&w0, &w2] {
        w.expect("ready ", LINE);
    }
    let all_call = |ws: [&mut Proc; 3]| {
        for w in ws {
            w.send("calls");
            assert_eq!(w.expect("calls", LINE), "calls ok");
        }
    };
    all_call([&mut w0, &mut w1, &mut w2]);

    // A stranger on a fourth host, without the group's token or certificate.
    let stranger = lan.spawn(
        3,
        WORKER,
        &["outsider"],
        &[
            ("TARGET", w1_addr),
            ("STORE", format!("{}:{port}", lan.addr(0))),
        ],
    );
    assert_eq!(stranger.expect("stranger", LINE), "stranger closed");
    let join = stranger.expect("join", LINE);
    assert!(join.starts_with("join refused"), "{join}");
    assert!(stranger.wait());
    all_call([&mut w0, &mut w1, &mut w2]);

    // A partition: host 2's link goes down while worker1 waits on a call to it.
    w1.send("hang 2");
    w2.expect("hanging", LINE);
    lan.cut(2).unwrap();
    let failed = w1.expect("hang ", LINE);
    let ms: u64 = failed
        .strip_prefix("hang failed after ")
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{failed}"));
    assert!(
        ms < 3 * LIVENESS_SECS * 1000,
        "the call failed only after {ms} ms: {failed}"
    );
    assert!(failed.contains("worker2"), "{failed}");
    w1.send("call 0");
    assert_eq!(w1.expect("call 0", LINE), "call 0 ok");
    w0.send("call 1");
    assert_eq!(w0.expect("call 1", LINE), "call 1 ok");

    // The link comes back: a new call reaches host 2 again.
    lan.heal(2).unwrap();
    w1.send("call 2");
    assert_eq!(w1.expect("call 2", LINE), "call 2 ok");
    w2.send("release");
    w2.expect("released", LINE);
    // A connection of host 2's that its peer dropped during the partition (the peer's
    // liveness watch fired first) is found dead only when host 2 next uses it: that call fails
    // at once, naming the peer, and the next call dials anew.
    for to in [0, 1] {
        w2.send(&format!("call {to}"));
        let first = w2.expect(&format!("call {to}"), LINE);
        assert!(
            first.ends_with("ok") || first.contains(&format!("worker{to} is gone")),
            "{first}"
        );
    }
    all_call([&mut w0, &mut w1, &mut w2]);

    for w in [&mut w0, &mut w1, &mut w2] {
        w.send("shutdown");
    }
    for w in [&w0, &w1, &w2] {
        assert_eq!(w.expect("shutdown", LINE), "shutdown ok");
    }
}

#[test]
fn three_hosts_with_an_auth_token() {
    if skipped() {
        return;
    }
    three_hosts(|_| vec![("DISTRPC_AUTH_TOKEN", "the three hosts' token".to_string())]);
}

#[test]
fn three_hosts_over_tls() {
    if skipped() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    distrpc::secure::tls::generate(dir.path(), &["worker0", "worker1", "worker2"]).unwrap();
    let path = |f: String| dir.path().join(f).display().to_string();
    three_hosts(|rank| {
        vec![
            ("DISTRPC_TLS_CA", path("ca.pem".into())),
            ("DISTRPC_TLS_CERT", path(format!("worker{rank}.pem"))),
            ("DISTRPC_TLS_KEY", path(format!("worker{rank}-key.pem"))),
        ]
    });
}
