//! Group behaviour in one process: rendezvous errors, all_gather and barrier, shutdown (graceful
//! with calls in flight, with a timeout, local), untrusted bytes on the worker's port, and
//! injected faults.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use distrpc::{Error, FaultInjection, MessageKind, Rpc, RpcOptions};
use distrpc_testkit::{closed_by_peer, in_process, shutdown_all, wait_until};
use distrpc_wire::{Kind, OutFrame};

static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Answers only once the test opens the gate (bounded, so that a broken test cannot hang), so
/// that its callers certainly still have it in flight when they shut down.
#[distrpc::function]
fn gated_echo(i: u64) -> u64 {
    let (open, cv) = &GATE;
    let _ = cv.wait_timeout_while(open.lock().unwrap(), Duration::from_secs(30), |o| !*o);
    i
}

#[distrpc::function]
fn echo(i: u64) -> u64 {
    i
}

fn opts() -> RpcOptions {
    RpcOptions::default().rpc_timeout(Duration::from_secs(20))
}

#[test]
fn all_gather_and_barriers() {
    let rpcs = in_process(4, |_| opts()).unwrap();
    let handles: Vec<_> = rpcs
        .iter()
        .cloned()
        .map(|rpc| {
            thread::spawn(move || {
                let all = rpc.all_gather(&(rpc.rank() * 10)).unwrap();
                // A second round must not mix with the first.
                let again = rpc.all_gather(&format!("{}!", rpc.name())).unwrap();
                rpc.barrier(&["worker0", "worker1", "worker2", "worker3"])
                    .unwrap();
                if rpc.rank() < 2 {
                    let pair = rpc
                        .all_gather_among(
                            &rpc.rank(),
                            &["worker0", "worker1"],
                            Duration::from_secs(10),
                        )
                        .unwrap();
                    assert_eq!(pair.len(), 2);
                    rpc.barrier(&["worker1", "worker0"]).unwrap();
                }
                (all, again)
            })
        })
        .collect();
    for h in handles {
        let (all, again) = h.join().unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all["worker3"], 30);
        assert_eq!(again["worker2"], "worker2!");
    }
    // A member that is not in the group is an error, not a hang.
    let err = rpcs[0].barrier(&["worker0", "nobody"]).unwrap_err();
    assert!(matches!(err, Error::UnknownWorker(_)), "{err}");
    shutdown_all(rpcs).unwrap();
}

#[test]
fn graceful_shutdown_loses_no_call_in_flight() {
    let rpcs = in_process(3, |_| opts()).unwrap();
    let server_view = rpcs[0].clone();
    let mut it = rpcs.into_iter();
    let (w0, w1, w2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    // worker0 shuts down first, while the others still have calls in flight to it.
    let server = thread::spawn(move || {
        w0.shutdown().unwrap();
        w0
    });
    let callers: Vec<_> = [w1, w2]
        .into_iter()
        .map(|rpc| {
            thread::spawn(move || {
                let futs: Vec<_> = (0..20u64)
                    .map(|i| rpc.rpc_async("worker0", gated_echo, (i,)))
                    .collect();
                // Shut down without waiting on the futures: shutdown must wait for them.
                rpc.shutdown().unwrap();
                let done: Vec<bool> = futs.iter().map(|f| f.is_done()).collect();
                let values: Vec<u64> = futs.into_iter().map(|f| f.wait().unwrap()).collect();
                (done, values, rpc)
            })
        })
        .collect();
    // Every call has reached worker0 and waits there while everyone is shutting down; only now
    // may the calls finish.
    assert!(wait_until(Duration::from_secs(20), || {
        server_view.metrics()["agent.server_active_calls"] == 40
    }));
    assert!(
        !server.is_finished(),
        "worker0's shutdown must wait for the calls in flight"
    );
    *GATE.0.lock().unwrap() = true;
    GATE.1.notify_all();
    for c in callers {
        let (done, values, rpc) = c.join().unwrap();
        assert!(
            done.iter().all(|d| *d),
            "shutdown returned before its calls completed"
        );
        assert_eq!(values, (0..20).collect::<Vec<_>>());
        // After shutdown every call fails clearly.
        let err = rpc.rpc_sync("worker0", echo, (1,)).unwrap_err();
        assert!(matches!(err, Error::ShutDown { .. }), "{err}");
        assert!(!rpc.is_running());
        assert!(matches!(rpc.shutdown(), Err(Error::ShutDown { .. })));
    }
    let w0 = server.join().unwrap();
    assert!(matches!(
        w0.rpc_sync("worker1", echo, (1,)),
        Err(Error::ShutDown { .. })
    ));
}

#[test]
fn shutdown_timeout_fails_when_a_worker_never_comes() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    let started = Instant::now();
    let err = rpcs[0]
        .shutdown_timeout(Duration::from_millis(300))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        !rpcs[0].is_running(),
        "a failed graceful shutdown still stops locally"
    );
    // The other side sees its peer gone (at once, not after a timeout).
    let err = rpcs[1].rpc_sync("worker0", echo, (1,)).unwrap_err();
    assert!(
        matches!(&err, Error::PeerGone { worker, .. } if worker == "worker0")
            || matches!(err, Error::PeerGone { .. }),
        "{err}"
    );
    rpcs[1].shutdown_local();
}

#[test]
fn local_shutdown_fails_calls_on_both_sides() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    assert_eq!(rpcs[1].rpc_sync("worker0", echo, (5,)).unwrap(), 5);
    rpcs[0].shutdown_local();
    assert!(matches!(
        rpcs[0].rpc_sync("worker1", echo, (1,)),
        Err(Error::ShutDown { .. })
    ));
    let err = rpcs[1].rpc_sync("worker0", echo, (1,)).unwrap_err();
    assert!(
        matches!(&err, Error::PeerGone { worker, .. } if worker == "worker0"),
        "{err}"
    );
    rpcs[1].shutdown_local();
}

#[test]
fn init_errors_are_clear_and_never_hang() {
    for bad in ["", "a b", "dot.ted", &"x".repeat(128)] {
        let err = Rpc::init(bad, 0, 1, opts().init_method("tcp://127.0.0.1:0")).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
    }
    let err = Rpc::init("w", 3, 2, opts().init_method("tcp://127.0.0.1:0")).unwrap_err();
    assert!(err.to_string().contains("rank 3 is out of range"), "{err}");
    let err = Rpc::init("w", 0, 1, opts().init_method("udp://x")).unwrap_err();
    assert!(err.to_string().contains("init_method"), "{err}");

    // A store that never fills in: rank 1 never comes.
    let started = Instant::now();
    let err = Rpc::init(
        "lonely",
        0,
        2,
        opts()
            .rpc_timeout(Duration::from_millis(300))
            .init_method("tcp://127.0.0.1:0"),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Rendezvous(m) if m.contains("[\"1\"]")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15));

    // Two workers with one name: both fail.
    let first = Rpc::bind("dup", 0, 2, opts().init_method("tcp://127.0.0.1:0")).unwrap();
    let method = format!("tcp://{}", first.store_addr().unwrap());
    let second = thread::spawn(move || Rpc::init("dup", 1, 2, opts().init_method(method)));
    let e0 = first.join().unwrap_err();
    let e1 = second.join().unwrap().unwrap_err();
    for e in [e0, e1] {
        assert!(
            matches!(&e, Error::Rendezvous(m) if m.contains("\"dup\" is not unique")),
            "{e}"
        );
    }

    // Two workers with one rank: the second fails, naming the rank. A second rank 0 cannot even
    // host the store; a second rank 1 is caught by the claim counter.
    let short = || opts().rpc_timeout(Duration::from_millis(500));
    let first = Rpc::bind("a", 0, 3, short().init_method("tcp://127.0.0.1:0")).unwrap();
    let method = format!("tcp://{}", first.store_addr().unwrap());
    let err = Rpc::init("z", 0, 3, short().init_method(method.clone())).unwrap_err();
    assert!(
        matches!(&err, Error::Rendezvous(m) if m.contains("rank 0 cannot host the store")),
        "{err}"
    );
    let m = method.clone();
    let b = thread::spawn(move || Rpc::init("b", 1, 3, short().init_method(m)));
    let c = thread::spawn(move || Rpc::init("c", 1, 3, short().init_method(method)));
    let errors: Vec<String> = [b, c]
        .into_iter()
        .map(|h| h.join().unwrap().unwrap_err().to_string())
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("rank 1 was claimed by more than one worker")),
        "{errors:?}"
    );
    assert!(first.join().is_err());
}

#[test]
fn file_init_method() {
    let dir = tempfile::tempdir().unwrap();
    let method = format!("file://{}", dir.path().join("store").display());
    let handles: Vec<_> = (0..3)
        .map(|rank| {
            let m = method.clone();
            thread::spawn(move || Rpc::init(&format!("f{rank}"), rank, 3, opts().init_method(m)))
        })
        .collect();
    let rpcs: Vec<Rpc> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert_eq!(rpcs[2].rpc_sync("f0", echo, (9,)).unwrap(), 9);
    shutdown_all(rpcs).unwrap();
}

#[test]
fn malformed_frames_close_that_connection_and_the_worker_keeps_serving() {
    let rpcs = in_process(2, |_| opts().max_frame_bytes(1 << 20)).unwrap();
    let addr = rpcs[1].listen_addr();
    let hello = {
        let payload = distrpc_wire::codec::encode_inline(&(0u32, "worker0")).unwrap();
        OutFrame::new(Kind::Hello, 0, &payload, &[])
            .unwrap()
            .to_vec()
    };
    let call = OutFrame::new(Kind::Call, 1, b"\x00", &[]).unwrap().to_vec();
    let mut oversized = OutFrame::new(Kind::Call, 2, b"xx", &[]).unwrap().to_vec();
    oversized[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let mut bad_kind = call.clone();
    bad_kind[5] = 0xEE;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage instead of a hello",
            b"GET / HTTP/1.1\r\n\r\n".repeat(3),
        ),
        ("a call before the hello", call.clone()),
        ("a truncated hello", hello[..hello.len() - 3].to_vec()),
        ("an oversized frame", [hello.clone(), oversized].concat()),
        ("an unknown kind", [hello.clone(), bad_kind].concat()),
        ("a malformed call head", [hello.clone(), call].concat()),
        ("a hello from a stranger", {
            let p = distrpc_wire::codec::encode_inline(&(0u32, "mallory")).unwrap();
            OutFrame::new(Kind::Hello, 0, &p, &[]).unwrap().to_vec()
        }),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&bytes).unwrap();
        if what == "a truncated hello" {
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(
            closed_by_peer(s),
            "{what}: the worker must close the connection"
        );
        // The worker still serves its real peers.
        assert_eq!(
            rpcs[0].rpc_sync("worker1", echo, (7,)).unwrap(),
            7,
            "after {what}"
        );
    }
    shutdown_all(rpcs).unwrap();
}

/// Reads one whole frame (header, then body) from a raw socket.
fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 32];
    s.read_exact(&mut head).expect("a frame header");
    let body_len = u64::from_le_bytes(head[24..32].try_into().unwrap()) as usize;
    let mut body = vec![0u8; body_len];
    s.read_exact(&mut body).expect("a frame body");
    [head.to_vec(), body].concat()
}

/// A caller blocked in `rpc_sync` reads its reply itself; when what comes back is not a frame,
/// the call fails at once (no timeout is set) naming the peer, the connection closes, and the
/// worker keeps serving.
#[test]
fn a_malformed_reply_read_by_the_waiting_caller_fails_the_call_at_once() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    // A fake "worker0" connects to worker1 first, so that worker1's calls to worker0 go to it.
    let mut fake = TcpStream::connect(rpcs[1].listen_addr()).unwrap();
    let hello = {
        let payload = distrpc_wire::codec::encode_inline(&(0u32, "worker0")).unwrap();
        OutFrame::new(Kind::Hello, 0, &payload, &[])
            .unwrap()
            .to_vec()
    };
    // A call of an unknown function: its answer shows that worker1 took the connection in.
    let call = OutFrame::new(Kind::Call, 1, b"\x04\x00nope", &[])
        .unwrap()
        .to_vec();
    fake.write_all(&[hello, call].concat()).unwrap();
    let answer = read_frame(&mut fake);
    assert_eq!(
        answer[5],
        Kind::Exception as u8,
        "worker1 answers the unknown call"
    );

    let caller = {
        let rpc = rpcs[1].clone();
        thread::spawn(move || {
            let started = Instant::now();
            let r = rpc.rpc_sync_timeout("worker0", echo, (1,), Duration::ZERO);
            (r, started.elapsed())
        })
    };
    let request = read_frame(&mut fake);
    assert_eq!(
        request[5],
        Kind::Call as u8,
        "worker1's call came to the fake"
    );
    fake.write_all(&[b'X'; 64]).unwrap();
    let (result, took) = caller.join().unwrap();
    let err = result.expect_err("a malformed reply cannot be a result");
    assert!(
        matches!(&err, Error::PeerGone { worker, reason } if worker == "worker0" && reason.contains("malformed")),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the call failed only after {took:?}"
    );
    assert!(closed_by_peer(fake), "worker1 must close the connection");
    // worker1 still serves worker0 (which opens its own connection).
    assert_eq!(rpcs[0].rpc_sync("worker1", echo, (7,)).unwrap(), 7);
    for rpc in &rpcs {
        rpc.shutdown_local();
    }
}

#[test]
fn injected_send_failures_and_delays() {
    let rpcs = in_process(2, |rank| {
        let faults = if rank == 0 {
            FaultInjection::default()
                .fail(MessageKind::Call, 2)
                .delay(MessageKind::Call, Duration::from_millis(30))
        } else {
            FaultInjection::default()
        };
        opts().faults(faults)
    })
    .unwrap();
    for _ in 0..2 {
        let err = rpcs[0].rpc_sync("worker1", echo, (1,)).unwrap_err();
        assert!(
            matches!(&err, Error::Injected { worker, kind: MessageKind::Call } if worker == "worker1"),
            "{err}"
        );
    }
    let started = Instant::now();
    assert_eq!(rpcs[0].rpc_sync("worker1", echo, (3,)).unwrap(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(30),
        "the delay was not applied"
    );
    // A delayed call still times out when the delay exceeds its timeout.
    let err = rpcs[0]
        .rpc_sync_timeout("worker1", echo, (4,), Duration::from_millis(10))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    shutdown_all(rpcs).unwrap();
}

#[test]
fn metrics_use_torch_keys() {
    let rpcs = in_process(2, |_| opts().num_worker_threads(3)).unwrap();
    let m = rpcs[0].metrics();
    for key in [
        "agent.thread_pool_size",
        "agent.num_idle_threads",
        "agent.client_active_calls",
        "agent.server_active_calls",
        "agent.server_active_async_calls",
        "num_owner_rrefs",
        "num_pending_users",
        "num_forks",
        "num_pending_futures",
    ] {
        assert!(m.contains_key(key), "missing {key}");
    }
    assert_eq!(m["agent.thread_pool_size"], 3);
    assert_eq!(m["agent.client_active_calls"], 0);
    shutdown_all(rpcs).unwrap();
}

#[test]
fn sixteen_workers_in_one_process_all_to_all() {
    let rpcs = in_process(16, |_| opts().num_worker_threads(2)).unwrap();
    let handles: Vec<_> = rpcs
        .iter()
        .cloned()
        .map(|rpc| {
            thread::spawn(move || {
                let futs: Vec<_> = rpc
                    .worker_infos()
                    .iter()
                    .map(|w| rpc.rpc_async(w, echo, (u64::from(w.id),)))
                    .collect();
                let got = distrpc::wait_all(futs).unwrap();
                assert_eq!(got, (0..16).collect::<Vec<u64>>());
                rpc.all_gather(&rpc.rank()).unwrap().len()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 16);
    }
    shutdown_all(rpcs).unwrap();
}
