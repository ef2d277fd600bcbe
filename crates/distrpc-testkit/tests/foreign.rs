//! What any front needs from the core (issue 9's Rust side): calls whose payload the caller
//! encoded itself, with a codec mark in the frame, handed on the callee to the front's foreign
//! handler for that codec.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use distrpc::server::foreign::{ForeignCall, ForeignHandler, ForeignReply};
use distrpc::{Codec, Error, RawCall, RemoteError, Rpc, RpcOptions, Tensor};
use distrpc_testkit::{in_process, shutdown_all};

#[distrpc::function]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

/// Stands in for the Python front: "unpickles" by reading the payload as text, answers from
/// another thread as a Python pool would.
struct FakeFront;

impl ForeignHandler for FakeFront {
    fn call(&self, call: ForeignCall, reply: ForeignReply) {
        std::thread::spawn(move || match &call.payload[..] {
            b"drop" => drop(reply),
            b"raise" => reply.err(RemoteError {
                worker: "worker1".into(),
                function: call.function.clone(),
                type_name: "ValueError".into(),
                message: "On WorkerInfo(id=1, name=worker1): bad value".into(),
                backtrace: None,
            }),
            payload => {
                // Echo the payload reversed, and every tensor doubled.
                let mut out = payload.to_vec();
                out.reverse();
                let tensors = call
                    .tensors
                    .iter()
                    .map(|t| distrpc::ops::add(t, t).unwrap())
                    .collect();
                reply.ok(out, tensors);
            }
        });
    }
}

fn pickled(payload: &[u8], tensors: Vec<Tensor>) -> RawCall {
    RawCall {
        codec: Codec::Pickle,
        function: "__main__.fn".into(),
        payload: payload.to_vec(),
        tensors,
    }
}

fn group() -> Vec<Rpc> {
    in_process(2, |rank| {
        let options = RpcOptions::default().rpc_timeout(Duration::from_secs(10));
        match rank {
            1 => options.foreign(Codec::Pickle, Arc::new(FakeFront)),
            _ => options,
        }
    })
    .unwrap()
}

#[test]
fn pickled_calls_go_to_the_front_and_back() {
    let rpcs = group();
    let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let reply = rpcs[0]
        .rpc_sync_raw("worker1", pickled(b"abc", vec![t.clone()]), None)
        .unwrap();
    assert_eq!(&reply.payload[..], b"cba");
    assert_eq!(
        reply.tensors[0].as_slice::<f32>().unwrap(),
        &[2.0, 4.0, 6.0]
    );
    let replies: Vec<_> = (0..16u8)
        .map(|i| rpcs[0].rpc_async_raw("worker1", pickled(&[i, 0], vec![]), None))
        .collect();
    for (i, r) in distrpc::wait_all(replies).unwrap().into_iter().enumerate() {
        assert_eq!(&r.payload[..], &[0, i as u8]);
    }
    // The front's exception, and a call it dropped.
    let e = rpcs[0].rpc_sync_raw("worker1", pickled(b"raise", vec![]), None);
    assert!(
        matches!(&e, Err(Error::Remote(r)) if r.type_name == "ValueError"),
        "{e:?}"
    );
    let e = rpcs[0]
        .rpc_sync_raw("worker1", pickled(b"drop", vec![]), None)
        .unwrap_err();
    assert!(e.to_string().contains("dropped the call"), "{e}");
    // Every foreign call is counted out (just after its reply leaves the callee).
    let idle = || rpcs[1].metrics()["agent.server_active_async_calls"] == 0;
    assert!(distrpc_testkit::wait_until(Duration::from_secs(10), idle));
    shutdown_all(rpcs).unwrap();
}

/// The rule: a pickled call sent to a worker with no Python front fails clearly.
#[test]
fn a_pickled_call_to_a_rust_worker_is_a_clear_error() {
    let rpcs = group();
    let e = rpcs[1]
        .rpc_sync_raw("worker0", pickled(b"abc", vec![]), None)
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedCodec { worker, codec, .. } if worker == "worker0" && codec == "Pickle"),
        "{e:?}"
    );
    // ... and the worker keeps serving.
    assert_eq!(rpcs[1].rpc_sync("worker0", add, (2, 3)).unwrap(), 5);
    shutdown_all(rpcs).unwrap();
}

/// A front calls a Rust function by name with MessagePack arguments it encoded itself.
#[test]
fn a_front_calls_rust_functions_with_messagepack() {
    let rpcs = group();
    let call = RawCall {
        codec: Codec::MessagePack,
        function: add.name().to_string(),
        payload: rmp_serde::to_vec(&(40i64, 2i64)).unwrap(),
        tensors: vec![],
    };
    let reply = rpcs[1].rpc_sync_raw("worker0", call, None).unwrap();
    assert_eq!(rmp_serde::from_slice::<i64>(&reply.payload).unwrap(), 42);
    shutdown_all(rpcs).unwrap();
}

/// A front's object: text that methods append to.
struct Obj(std::sync::Mutex<String>);

impl distrpc::server::value::Value for Obj {
    fn encode(&self) -> Result<distrpc::server::value::Reply, String> {
        let text = self.0.lock().unwrap().clone();
        Ok(distrpc::server::value::Reply::new(
            text.into_bytes(),
            Vec::new(),
        ))
    }

    fn type_name(&self) -> &'static str {
        "Obj"
    }
}

/// Keeps what `remote()` creates as an `Obj`; a method call appends its payload to the value.
struct KeepingFront;

impl ForeignHandler for KeepingFront {
    fn call(&self, call: ForeignCall, reply: ForeignReply) {
        let text = String::from_utf8_lossy(&call.payload).to_string();
        match (call.this, call.keep) {
            (None, true) => reply.keep(Arc::new(Obj(std::sync::Mutex::new(text)))),
            (Some(this), keep) => {
                let this: Arc<dyn std::any::Any + Send + Sync> = this;
                let obj = this.downcast::<Obj>().unwrap();
                let mut s = obj.0.lock().unwrap();
                s.push_str(&text);
                let now = s.clone();
                drop(s);
                if keep {
                    reply.keep(Arc::new(Obj(std::sync::Mutex::new(now))));
                } else {
                    reply.ok(now.into_bytes(), vec![]);
                }
            }
            (None, false) => reply.ok(call.payload.to_vec(), vec![]),
        }
    }
}

/// References to values a front holds: created by `remote_raw`, changed by method calls on
/// the owner, fetched encoded, owned locally too, and freed when dropped.
#[test]
fn references_to_a_fronts_values() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .rpc_timeout(Duration::from_secs(10))
            .foreign(Codec::Pickle, Arc::new(KeepingFront))
    })
    .unwrap();
    let rref: distrpc::RRef<()> = rpcs[0].remote_raw("worker1", pickled(b"hello", vec![]), None);
    let r = rref
        .rpc_sync_raw(pickled(b", world", vec![]), None)
        .unwrap();
    assert_eq!(&r.payload[..], b"hello, world");
    assert_eq!(
        &rref.to_here_raw(None).unwrap().payload[..],
        b"hello, world"
    );
    let derived: distrpc::RRef<()> = rref.remote_raw(pickled(b"!", vec![]), None);
    assert_eq!(
        &derived.to_here_raw(None).unwrap().payload[..],
        b"hello, world!"
    );
    // Owned here: remote to self, and a local value.
    let mine: distrpc::RRef<()> = rpcs[1].remote_raw("worker1", pickled(b"own", vec![]), None);
    assert_eq!(&mine.to_here_raw(None).unwrap().payload[..], b"own");
    let local: distrpc::RRef<()> = rpcs[0].rref_value(Arc::new(Obj("local".to_string().into())));
    assert!(local.is_owner());
    assert_eq!(&local.to_here_raw(None).unwrap().payload[..], b"local");
    drop((rref, derived, mine, local));
    let freed = || distrpc_testkit::rref_leaks(&rpcs).is_empty();
    assert!(distrpc_testkit::wait_until(Duration::from_secs(10), freed));
    shutdown_all(rpcs).unwrap();
}

/// Stands in for a front's functions called by name with MessagePack: `front.mul` multiplies
/// its two arguments; any other name is unknown to it.
struct NamedFront;

impl ForeignHandler for NamedFront {
    fn call(&self, call: ForeignCall, reply: ForeignReply) {
        match call.function.as_str() {
            "front.mul" => {
                let (a, b): (i64, i64) = rmp_serde::from_slice(&call.payload).unwrap();
                reply.ok(rmp_serde::to_vec(&(a * b)).unwrap(), vec![]);
            }
            _ => reply.err(RemoteError {
                worker: String::new(),
                function: String::new(),
                type_name: "LookupError".into(),
                message: "no such function".into(),
                backtrace: None,
            }),
        }
    }
}

/// Rust calls a front's function through a typed handle; names Rust registered still run in
/// Rust on a worker whose front takes MessagePack calls.
#[test]
fn rust_calls_a_fronts_function_by_name() {
    let rpcs = in_process(2, |rank| {
        let options = RpcOptions::default().rpc_timeout(Duration::from_secs(10));
        match rank {
            1 => options.foreign(Codec::MessagePack, Arc::new(NamedFront)),
            _ => options,
        }
    })
    .unwrap();
    let mul = distrpc::Function::<(i64, i64), i64>::named("front.mul");
    assert_eq!(rpcs[0].rpc_sync("worker1", &mul, (6, 7)).unwrap(), 42);
    assert_eq!(rpcs[0].rpc_sync("worker1", add, (6, 7)).unwrap(), 13);
    let missing = distrpc::Function::<(i64,), i64>::named("front.missing");
    let e = rpcs[0].rpc_sync("worker1", &missing, (1,)).unwrap_err();
    // The worker and function the front left empty are filled in.
    assert!(
        matches!(&e, Error::Remote(r) if r.type_name == "LookupError"
            && r.worker == "worker1" && r.function == "front.missing"),
        "{e:?}"
    );
    // `remote()` by name reaches the front too: the value it answers is kept on worker1.
    let product: distrpc::RRef<i64> = rpcs[0].remote("worker1", &mul, (6, 7));
    assert_eq!(product.to_here().unwrap(), 42);
    // Without a MessagePack front, an unknown name is the usual error naming it.
    let e = rpcs[1].rpc_sync("worker0", &mul, (6, 7)).unwrap_err();
    assert!(e.to_string().contains("front.mul"), "{e}");
    shutdown_all(rpcs).unwrap();
}

/// A front that queues its calls, noting which thread handled each (the connection's reader
/// task, or a thread of the front's own that read the connection while it waited).
#[derive(Default)]
struct Inbox {
    calls: std::sync::Mutex<Vec<(ForeignReply, std::thread::ThreadId)>>,
}

impl Inbox {
    fn len(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    fn take(&self) -> (ForeignReply, std::thread::ThreadId) {
        assert!(distrpc_testkit::wait_until(Duration::from_secs(10), || {
            self.len() > 0
        }));
        self.calls.lock().unwrap().remove(0)
    }
}

struct Queueing(Arc<Inbox>);

impl ForeignHandler for Queueing {
    fn call(&self, _call: ForeignCall, reply: ForeignReply) {
        let me = std::thread::current().id();
        self.0.calls.lock().unwrap().push((reply, me));
    }
}

/// Two workers, worker1 with a front that queues its calls in the returned inbox, after one
/// call from worker0 was answered: and the connection it came in on.
fn after_one_call() -> (Vec<Rpc>, Arc<Inbox>, distrpc::server::foreign::Origin) {
    let inbox = Arc::new(Inbox::default());
    let front = Arc::new(Queueing(inbox.clone()));
    let rpcs = in_process(2, move |rank| {
        let options = RpcOptions::default().rpc_timeout(Duration::from_secs(10));
        match rank {
            1 => options.foreign(Codec::Pickle, front.clone()),
            _ => options,
        }
    })
    .unwrap();
    let first = rpcs[0].rpc_async_raw("worker1", pickled(b"1", vec![]), None);
    let (reply, _) = inbox.take();
    let origin = reply.origin().expect("a call from a peer has an origin");
    reply.ok(b"one".to_vec(), vec![]);
    assert_eq!(&first.wait().unwrap().payload[..], b"one");
    (rpcs, inbox, origin)
}

/// `Origin::serve`: a thread waiting for the front's next call reads the connection the last
/// one came in on, and the peer's next call is handled on that thread; its doorbell wakes it
/// for work that came some other way; a blocking caller takes the connection over from it;
/// afterwards the reader task reads the connection again.
#[test]
fn a_thread_waiting_for_calls_reads_the_last_callers_connection_itself() {
    use distrpc::server::foreign::Doorbell;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (rpcs, inbox, origin) = after_one_call();

    // The next call is sent once the waiting thread holds the connection (its readiness check
    // runs first right after it took it), so no one else can have read it.
    let bell = Arc::new(Doorbell::new().unwrap());
    let sent = AtomicBool::new(false);
    let second = std::sync::Mutex::new(None);
    let waiter = std::thread::current().id();
    let ready = || {
        if !sent.swap(true, Ordering::SeqCst) {
            let fut = rpcs[0].rpc_async_raw("worker1", pickled(b"2", vec![]), None);
            *second.lock().unwrap() = Some(fut);
        }
        inbox.len() > 0
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    assert!(
        origin.serve(&ready, until, &bell),
        "the connection was free to read"
    );
    let (reply, handled_on) = inbox.take();
    assert_eq!(
        handled_on, waiter,
        "the call was read by the waiting thread"
    );
    reply.ok(b"two".to_vec(), vec![]);
    let second = second.lock().unwrap().take().unwrap();
    assert_eq!(&second.wait().unwrap().payload[..], b"two");

    // The doorbell ends a wait that nothing on the connection ends. (Rung by another thread
    // started from the readiness check, which runs once the waiting thread has cleared the
    // bell: a ring before that clear would be lost, and the wait would run to its deadline.)
    let rung = AtomicBool::new(false);
    std::thread::scope(|s| {
        let ringing = AtomicBool::new(false);
        let ready = || {
            if !ringing.swap(true, Ordering::SeqCst) {
                s.spawn(|| {
                    rung.store(true, Ordering::SeqCst);
                    bell.ring();
                });
            }
            false
        };
        let until = std::time::Instant::now() + Duration::from_secs(30);
        assert!(origin.serve(&ready, until, &bell));
        assert!(
            std::time::Instant::now() < until,
            "the doorbell, not the deadline, ended the wait"
        );
    });
    assert!(rung.load(Ordering::SeqCst));
    bell.clear();

    // A caller of this worker blocking on the peer takes the connection over from a thread
    // that only waits for work: the waiting thread stops (before its deadline), the call works.
    let (claimed_tx, claimed_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let waiting = s.spawn(|| {
            let until = std::time::Instant::now() + Duration::from_secs(30);
            let ready = || {
                let _ = claimed_tx.send(());
                false
            };
            assert!(origin.serve(&ready, until, &bell));
            std::time::Instant::now() < until
        });
        claimed_rx.recv().unwrap();
        assert_eq!(rpcs[1].rpc_sync("worker0", add, (1, 2)).unwrap(), 3);
        assert!(
            waiting.join().unwrap(),
            "the caller's takeover ended the wait"
        );
    });
    bell.clear();

    // The connection a caller's replies come on, for a thread waiting for them: only an open
    // one to another worker (nothing is dialed).
    assert!(rpcs[0].connection_to("worker1").is_some());
    assert!(
        rpcs[0].connection_to("worker0").is_none(),
        "no connection to itself"
    );
    assert!(rpcs[0].connection_to("nobody").is_none());

    // Reading is back with the reader task: a call arriving now is handled there (sent from
    // the caller's thread, the connection being idle).
    let third = rpcs[0].rpc_async_raw_direct("worker1", pickled(b"3", vec![]), None);
    let (reply, handled_on) = inbox.take();
    assert_ne!(handled_on, waiter);
    reply.ok(b"three".to_vec(), vec![]);
    assert_eq!(&third.wait().unwrap().payload[..], b"three");
    shutdown_all(rpcs).unwrap();
}

/// A thread that read a call itself keeps the connection while it runs it (the peer's next
/// frames wait for it), and the watch takes the connection back from a thread whose call runs
/// long: a call arriving meanwhile is read by the reader task and handled on another thread.
#[test]
fn a_connection_kept_by_a_thread_running_a_long_call_is_taken_back() {
    use distrpc::server::foreign::Origin;

    let (rpcs, inbox, origin) = after_one_call();

    // This thread reads the second call itself ...
    let (reply_two, second) = read_and_keep_the_next_call(&rpcs, &inbox, &origin);

    // ... and "runs" it without coming back: the third call must still be handled.
    let taken_back = |r: &distrpc::Rpc| r.metrics()["agent.claims_taken_back"];
    let before = taken_back(&rpcs[1]);
    // (Sent from another thread: both workers live in this process, and a call out from
    // the thread that kept the connection would let it go.)
    let third = std::thread::scope(|s| {
        s.spawn(|| rpcs[0].rpc_async_raw("worker1", pickled(b"3", vec![]), None))
            .join()
            .unwrap()
    });
    let (reply_three, handled_on) = inbox.take();
    assert_ne!(handled_on, std::thread::current().id());
    assert!(taken_back(&rpcs[1]) > before, "the watch took it back");
    reply_three.ok(b"three".to_vec(), vec![]);
    assert_eq!(&third.wait().unwrap().payload[..], b"three");

    // The thread's call ends: its kept claim is no longer its own, and letting it go is
    // harmless; the connection still works.
    reply_two.ok(b"two".to_vec(), vec![]);
    assert_eq!(&second.wait().unwrap().payload[..], b"two");
    Origin::let_go();
    assert!(!Origin::keeps());
    let fourth = rpcs[0].rpc_async_raw("worker1", pickled(b"4", vec![]), None);
    let (reply, _) = inbox.take();
    reply.ok(b"four".to_vec(), vec![]);
    assert_eq!(&fourth.wait().unwrap().payload[..], b"four");
    shutdown_all(rpcs).unwrap();
}

/// Sends worker1 a call once this thread holds `origin`'s connection (its readiness check runs
/// first right after it took it, so no one else can read the call), reads it here, and checks
/// that this thread keeps the connection while it "runs" the call: the call and its future.
fn read_and_keep_the_next_call(
    rpcs: &[Rpc],
    inbox: &Inbox,
    origin: &distrpc::server::foreign::Origin,
) -> (ForeignReply, distrpc::RpcFuture<distrpc::RawReply>) {
    use distrpc::server::foreign::{Doorbell, Origin};
    use std::sync::atomic::{AtomicBool, Ordering};

    let bell = Arc::new(Doorbell::new().unwrap());
    let sent = AtomicBool::new(false);
    let next = std::sync::Mutex::new(None);
    let ready = || {
        if !sent.swap(true, Ordering::SeqCst) {
            let fut = rpcs[0].rpc_async_raw("worker1", pickled(b"2", vec![]), None);
            *next.lock().unwrap() = Some(fut);
        }
        inbox.len() > 0
    };
    let until = std::time::Instant::now() + Duration::from_secs(30);
    assert!(origin.serve(&ready, until, &bell));
    let (reply, handled_on) = inbox.take();
    assert_eq!(handled_on, std::thread::current().id());
    assert!(
        Origin::keeps(),
        "a quick connection is kept while its call runs"
    );
    let fut = next.lock().unwrap().take().unwrap();
    (reply, fut)
}

/// A thread that kept a connection while running a call lets it go as soon as it calls out:
/// it may wait for the answer in any way (a Python future's `wait`), and what comes on the
/// connection — that answer, say — must not wait for it.
#[test]
fn a_thread_that_calls_out_lets_its_kept_connection_go() {
    use distrpc::server::foreign::Origin;

    let (rpcs, inbox, origin) = after_one_call();
    let (reply, fut) = read_and_keep_the_next_call(&rpcs, &inbox, &origin);
    let out = rpcs[1].rpc_async("worker0", add, (1, 2));
    assert!(!Origin::keeps(), "calling out let it go");
    assert_eq!(out.wait().unwrap(), 3);
    reply.ok(b"two".to_vec(), vec![]);
    assert_eq!(&fut.wait().unwrap().payload[..], b"two");
    shutdown_all(rpcs).unwrap();
}

/// `Rpc::rpc_async_raw_answered_later` (a context's release): the callee's answer waits for
/// its next frame to the caller — it arrives before (with) the answer to a call made after —
/// or goes at the watch's tick when no other frame comes.
#[test]
fn an_answer_sent_later_comes_with_the_next_frame_or_at_the_watchs_tick() {
    let (rpcs, inbox, _) = after_one_call();
    let later = rpcs[0].rpc_async_raw_answered_later("worker1", pickled(b"later", vec![]), None);
    let (reply, _) = inbox.take();
    reply.ok(b"L".to_vec(), vec![]);
    let now = rpcs[0].rpc_async_raw("worker1", pickled(b"now", vec![]), None);
    let (reply, _) = inbox.take();
    reply.ok(b"N".to_vec(), vec![]);
    assert_eq!(&now.wait().unwrap().payload[..], b"N");
    // Read before the answer written after it, on the same connection: done by now.
    let later = later
        .wait_timeout(Duration::ZERO)
        .unwrap_or_else(|_| panic!("the answer sent later came after the next frame"));
    assert_eq!(&later.unwrap().payload[..], b"L");

    // Alone: the watch sends it.
    let alone = rpcs[0].rpc_async_raw_answered_later("worker1", pickled(b"alone", vec![]), None);
    let (reply, _) = inbox.take();
    reply.ok(b"A".to_vec(), vec![]);
    let alone = alone
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("an answer sent later never came"));
    assert_eq!(&alone.unwrap().payload[..], b"A");
    shutdown_all(rpcs).unwrap();
}
