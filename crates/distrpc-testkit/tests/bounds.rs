//! What a peer controls is bounded: a declared body costs memory only as its bytes come, and a
//! peer that stops reading makes callers wait and then fail (calls), or gets disconnected
//! (replies) — while the worker keeps serving everyone else. One test per process-wide RSS
//! reading would be disturbed by tests running beside it: this file's tests run one at a time.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Duration;

use distrpc::{Error, RpcOptions, Tensor};
use distrpc_testkit::in_process;
use distrpc_wire::{Kind, OutFrame};

/// One test at a time: they read this process's RSS.
static SERIAL: Mutex<()> = Mutex::new(());

#[distrpc::function]
fn echo(i: u64) -> u64 {
    i
}

#[distrpc::function]
fn numel(t: Tensor) -> u64 {
    t.numel() as u64
}

/// `n` bytes of result.
#[distrpc::function]
fn bytes_of(n: u64) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![7u8; n as usize])
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024.0
}

fn hello(rank: u32, name: &str) -> Vec<u8> {
    let payload = distrpc_wire::codec::encode_inline(&(rank, name)).unwrap();
    OutFrame::new(Kind::Hello, 0, &payload, &[])
        .unwrap()
        .to_vec()
}

fn call(id: u64, function: &str, args: &impl serde::Serialize) -> Vec<u8> {
    let mut payload = (function.len() as u16).to_le_bytes().to_vec();
    payload.extend_from_slice(function.as_bytes());
    payload.extend_from_slice(&distrpc_wire::codec::encode_inline(args).unwrap());
    OutFrame::new(Kind::Call, id, &payload, &[])
        .unwrap()
        .to_vec()
}

/// A body declared at 1 GiB that never comes costs the worker nothing like 1 GiB; the
/// connection is closed when the peer goes, and the worker serves on.
#[test]
fn a_declared_body_costs_memory_only_as_it_arrives() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rpcs = in_process(2, |_| RpcOptions::default().max_frame_bytes(2 << 30)).unwrap();
    let before = rss_mib();
    let mut header = OutFrame::new(Kind::Call, 9, b"xx", &[]).unwrap().to_vec();
    header[24..32].copy_from_slice(&(1u64 << 30).to_le_bytes());
    let mut s = TcpStream::connect(rpcs[1].listen_addr()).unwrap();
    s.write_all(
        &[
            hello(0, "worker0"),
            header[..32].to_vec(),
            vec![1u8; 1 << 20],
        ]
        .concat(),
    )
    .unwrap();
    // The worker has read the header and the first MiB once it answers a call made after.
    assert_eq!(rpcs[0].rpc_sync("worker1", echo, (1,)).unwrap(), 1);
    let grew = rss_mib() - before;
    assert!(
        grew < 256.0,
        "RSS grew by {grew:.0} MiB for a body that did not come"
    );
    drop(s);
    assert_eq!(rpcs[0].rpc_sync("worker1", echo, (2,)).unwrap(), 2);
    for rpc in &rpcs {
        rpc.shutdown_local();
    }
}

static HOOKED_WAITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts the waits distrpc runs inside the front's hook.
fn counting_hook(wait: &mut dyn FnMut()) {
    HOOKED_WAITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    wait();
}

/// A peer that never reads: calls to it queue up to the bound, then wait — inside the
/// front's wait hook (where the Python binding lets its interpreter lock go) — then fail
/// naming the peer; the queue (and RSS) stays bounded, and the worker keeps serving the
/// others.
#[test]
fn calls_to_a_peer_that_stops_reading_wait_then_fail() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert!(distrpc::set_wait_hook(counting_hook));
    let options = |_| {
        RpcOptions::default()
            .max_queued_bytes(4 << 20)
            .send_stall(Duration::from_millis(500))
    };
    let rpcs = in_process(3, options).unwrap();
    // A fake "worker0" connects to worker1 first, so that worker1's calls to worker0 go to it;
    // it then reads nothing. Its call shows that worker1 took the connection in.
    let mut fake = TcpStream::connect(rpcs[1].listen_addr()).unwrap();
    fake.write_all(&[hello(0, "worker0"), call(1, "nope", &(0u8,))].concat())
        .unwrap();
    let mut head = [0u8; 32];
    fake.read_exact(&mut head).unwrap();
    assert_eq!(
        head[5],
        Kind::Exception as u8,
        "worker1 answers the unknown call"
    );
    let body = u64::from_le_bytes(head[24..32].try_into().unwrap());
    std::io::copy(&mut (&mut fake).take(body), &mut std::io::sink()).unwrap();

    let tensor = Tensor::from_slice(&vec![1.0f32; 1 << 18]); // 1 MiB
    let mut futures = Vec::new();
    let err = loop {
        assert!(
            futures.len() < 1000,
            "1 GB accepted for a peer that reads nothing"
        );
        let f = rpcs[1].rpc_async_timeout("worker0", numel, (tensor.clone(),), Duration::ZERO);
        match f.wait_timeout(Duration::ZERO) {
            Ok(Err(e)) => break e,
            Ok(Ok(n)) => panic!("the fake answered {n}"),
            Err(pending) => futures.push(pending),
        }
    };
    assert!(
        matches!(&err, Error::SendFailed { worker, reason } if worker == "worker0" && reason.contains("has read none")),
        "{err}"
    );
    assert!(
        HOOKED_WAITS.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no wait in the hook"
    );
    // worker1 serves worker2, both ways.
    assert_eq!(rpcs[2].rpc_sync("worker1", echo, (5,)).unwrap(), 5);
    assert_eq!(rpcs[1].rpc_sync("worker2", echo, (6,)).unwrap(), 6);
    drop(fake);
    for rpc in &rpcs {
        rpc.shutdown_local();
    }
}

/// A peer that sends calls and never reads their results: the results queue up to four times
/// the bound, then the worker drops the connection instead of holding more (and, as any lost
/// peer, dials worker0 again for its next call: the real one answers).
#[test]
fn a_peer_that_never_reads_its_results_is_disconnected() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rpcs = in_process(2, |_| RpcOptions::default().max_queued_bytes(4 << 20)).unwrap();
    let before = rss_mib();
    let mut fake = TcpStream::connect(rpcs[1].listen_addr()).unwrap();
    fake.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    fake.write_all(&hello(0, "worker0")).unwrap();
    // Results of 1 MiB each, 2 GB in all: without the bound the worker would hold them all.
    let calls: Vec<u8> = (1..=2000u64)
        .flat_map(|id| call(id, "bounds::bytes_of", &(1u64 << 20,)))
        .collect();
    let _ = fake.write_all(&calls); // it may be cut off before the last
    // Once the worker drops the connection, the fake's writes meet a reset (a write that
    // times out instead means the connection is still open, and full).
    let end = (0..1_000_000u64)
        .map(|id| fake.write_all(&call(10_000 + id, "bounds::echo", &(1u64,))))
        .find_map(Result::err)
        .map(|e| e.kind());
    assert!(
        matches!(
            end,
            Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ),
        "the connection was not dropped: {end:?}"
    );
    let grew = rss_mib() - before;
    assert!(grew < 256.0, "RSS grew by {grew:.0} MiB");
    drop(fake);
    // worker1 still serves (the real worker0 opens a connection of its own).
    assert_eq!(rpcs[0].rpc_sync("worker1", echo, (3,)).unwrap(), 3);
    for rpc in &rpcs {
        rpc.shutdown_local();
    }
}

/// Reads one whole frame from the fake: its kind and body.
fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 32];
    s.read_exact(&mut head).unwrap();
    let mut body = vec![0u8; u64::from_le_bytes(head[24..32].try_into().unwrap()) as usize];
    s.read_exact(&mut body).unwrap();
    (head[5], body)
}

/// Gather rounds take a member's report only from that member, an answer only from the
/// round's leader, and no round far ahead: a member cannot fill another's slot, end a round
/// it does not lead, or make the worker hold rounds without bound.
#[test]
fn gather_messages_are_taken_only_from_the_worker_they_concern() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // worker3 is a fake (its connection to worker1 is this socket), and stays out of the
    // group's own rounds.
    let rpcs = in_process(4, |_| RpcOptions::default()).unwrap();
    let mut fake = TcpStream::connect(rpcs[1].listen_addr()).unwrap();
    fake.write_all(&hello(3, "worker3")).unwrap();
    let obj = serde_bytes::ByteBuf::from(vec![1u8]);
    let cases = [
        (
            call(1, "#distrpc/gather_to_leader", &("k#0", "worker2", &obj)),
            "reported for worker2",
        ),
        (
            call(2, "#distrpc/gather_to_leader", &("k#5000", "worker3", &obj)),
            "too far ahead",
        ),
        (
            call(3, "#distrpc/broadcast_to_followers", &("k#0", &obj)),
            "no round k#0 awaits",
        ),
    ];
    for (request, refusal) in cases {
        fake.write_all(&request).unwrap();
        let (kind, body) = read_frame(&mut fake);
        assert_eq!(kind, Kind::Exception as u8, "{refusal}");
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains(refusal), "{refusal}: {text}");
    }
    // The group's own rounds still work.
    let members = ["worker0", "worker1", "worker2"];
    let handles: Vec<_> = rpcs[..3]
        .iter()
        .cloned()
        .map(|rpc| {
            std::thread::spawn(move || {
                rpc.all_gather_among(&rpc.rank(), &members, Duration::from_secs(30))
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().len(), 3);
    }
    for rpc in &rpcs {
        rpc.shutdown_local();
    }
}

static GATE: (Mutex<bool>, std::sync::Condvar) = (Mutex::new(false), std::sync::Condvar::new());

/// Answers once the test opens the gate (bounded).
#[distrpc::function]
fn gated(_padding: serde_bytes::ByteBuf) -> u64 {
    let (open, cv) = &GATE;
    let open = open.lock().unwrap_or_else(|e| e.into_inner());
    let _ = cv.wait_timeout_while(open, Duration::from_secs(60), |o| !*o);
    1
}

/// A peer that sends calls faster than they are answered: the worker takes at most
/// `max_calls_in` of them and stops reading the connection — the peer's writes block (TCP
/// pushes back) — instead of queueing them all; once they are answered, it reads on, and
/// every call is answered.
#[test]
fn a_peer_flooding_calls_is_pushed_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    *GATE.0.lock().unwrap() = false;
    let rpcs = in_process(2, |_| RpcOptions::default().max_calls_in(64)).unwrap();
    let mut fake = TcpStream::connect(rpcs[1].listen_addr()).unwrap();
    fake.write_all(&hello(0, "worker0")).unwrap();
    // 20 000 calls of 1 KiB: far more than the socket buffers hold.
    let padding = serde_bytes::ByteBuf::from(vec![0u8; 1024]);
    let calls = 20_000u64;
    let flood: Vec<u8> = (1..=calls)
        .flat_map(|id| call(id, "bounds::gated", &(&padding,)))
        .collect();
    // Written without blocking: the worker stops reading, so the socket stays full.
    fake.set_nonblocking(true).unwrap();
    let mut written = 0;
    let pushed_back = loop {
        match fake.write(&flood[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Still full after a while: the worker is not reading.
                if !writable_within(&fake, 2000) {
                    break true;
                }
            }
            Err(e) => panic!("{e}"),
        }
        if written == flood.len() {
            break false;
        }
    };
    assert!(pushed_back, "the worker read all {calls} calls");
    let active = rpcs[1].metrics()["agent.server_active_calls"];
    assert!(active <= 64, "{active} calls taken, more than the bound");
    // Answered, the calls make room: the rest is read and answered too.
    *GATE.0.lock().unwrap() = true;
    GATE.1.notify_all();
    fake.set_nonblocking(false).unwrap();
    let reader = {
        let mut r = fake.try_clone().unwrap();
        std::thread::spawn(move || {
            (0..calls)
                .map(|_| read_frame(&mut r).0)
                .filter(|&k| k == Kind::Result as u8)
                .count() as u64
        })
    };
    fake.write_all(&flood[written..]).unwrap();
    assert_eq!(reader.join().unwrap(), calls, "every call answered");
    for rpc in &rpcs {
        rpc.shutdown_local();
    }
}

/// Whether `s` becomes writable within `ms` milliseconds.
fn writable_within(s: &TcpStream, ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for an open socket.
    unsafe { libc::poll(&mut fd, 1, ms) > 0 }
}
