//! Calls between workers in one process: sync and async, to self and others, nested, typed
//! errors, timeouts and tensors.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use distrpc::{DType, Error, Function, Rpc, RpcOptions, Tensor, To, builtin, wait_all};
use distrpc_testkit::{in_process, shutdown_all};
use serde::{Deserialize, Serialize};

#[distrpc::function]
fn add_i64(a: i64, b: i64) -> i64 {
    a + b
}

#[distrpc::function]
fn whoami() -> String {
    Rpc::current()
        .map(|r| r.name().to_string())
        .unwrap_or_default()
}

/// A plain error type with a recognisable type name.
#[derive(Debug)]
struct Oops;

impl std::fmt::Display for Oops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the function said no")
    }
}

#[distrpc::function]
fn refuse(x: i64) -> Result<i64, Oops> {
    if x < 0 { Err(Oops) } else { Ok(x) }
}

#[distrpc::function]
fn explode(message: String) -> i64 {
    panic!("{message}")
}

/// Calls itself through the other worker `depth` times, alternating, from sync handlers.
/// Marked `inline` (quick at depth 0), though it blocks at any other depth: the reader it runs
/// on then hands off.
#[distrpc::function(inline)]
fn ping_pong(depth: u32) -> Result<u32, Error> {
    if depth == 0 {
        return Ok(0);
    }
    let rpc = Rpc::current().ok_or(Error::InvalidArgument("no current rpc".into()))?;
    let next = (rpc.rank() + 1) % rpc.world_size() as u32;
    Ok(rpc.rpc_sync(next, ping_pong, (depth - 1,))? + 1)
}

static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Blocks until the test opens the gate (bounded so that a broken test cannot hang).
#[distrpc::function]
fn wait_for_gate() -> bool {
    let (open, cv) = &GATE;
    let guard = open.lock().unwrap();
    let (guard, _) = cv
        .wait_timeout_while(guard, Duration::from_secs(30), |open| !*open)
        .unwrap();
    *guard
}

fn open_gate() {
    let (open, cv) = &GATE;
    *open.lock().unwrap() = true;
    cv.notify_all();
}

const ASYNC_CALLS: usize = 24;
static ASYNC_BARRIER: std::sync::LazyLock<tokio::sync::Barrier> =
    std::sync::LazyLock::new(|| tokio::sync::Barrier::new(ASYNC_CALLS));

/// Returns only once `ASYNC_CALLS` calls wait here at the same time: possible only if waiting
/// holds no handler thread.
#[distrpc::function]
async fn meet_async(i: usize) -> usize {
    ASYNC_BARRIER.wait().await;
    i
}

/// Tries a blocking call from inside an async handler, which runs on a runtime thread.
#[distrpc::function]
async fn block_inside_async() -> String {
    match Rpc::current() {
        Some(rpc) => match rpc.rpc_sync("worker0", add_i64, (1, 1)) {
            Err(e @ Error::WouldBlock) => e.to_string(),
            other => format!("unexpected: {other:?}"),
        },
        None => "no current rpc".into(),
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Batch {
    inputs: Vec<Tensor>,
    named: BTreeMap<String, Tensor>,
    pair: (Tensor, u32),
}

/// Returns the batch with every tensor doubled, and whether each received tensor was 64-byte
/// aligned (it is a slice of the receive buffer, not a copy).
#[distrpc::function]
fn double_batch(b: Batch) -> Result<(Batch, bool), distrpc::TensorError> {
    let mut aligned = true;
    let mut double = |t: &Tensor| {
        aligned &= (t.data().as_ptr() as usize).is_multiple_of(64);
        distrpc::ops::add(t, t)
    };
    let out = Batch {
        inputs: b.inputs.iter().map(&mut double).collect::<Result<_, _>>()?,
        named: b
            .named
            .iter()
            .map(|(k, v)| Ok((k.clone(), double(v)?)))
            .collect::<Result<_, distrpc::TensorError>>()?,
        pair: (double(&b.pair.0)?, b.pair.1),
    };
    Ok((out, aligned))
}

fn two() -> Vec<Rpc> {
    in_process(2, |_| {
        RpcOptions::default().rpc_timeout(Duration::from_secs(20))
    })
    .unwrap()
}

#[test]
fn sync_async_self_and_every_kind_of_destination() {
    let rpcs = two();
    let (w0, w1) = (&rpcs[0], &rpcs[1]);
    assert_eq!(w0.rpc_sync("worker1", add_i64, (2, 3)).unwrap(), 5);
    assert_eq!(w0.rpc_sync(1u32, add_i64, (2, 4)).unwrap(), 6);
    let info = w0.worker_info_of("worker1").unwrap();
    assert_eq!(info.id, 1);
    assert_eq!(w0.rpc_sync(&info, whoami, ()).unwrap(), "worker1");
    // A call to self works and runs on self.
    assert_eq!(w0.rpc_sync("worker0", whoami, ()).unwrap(), "worker0");
    // Async: await-able, wait-able, chainable.
    let fut = w1
        .rpc_async(0, add_i64, (40, 2))
        .then(|r| r.map(|v| v * 10));
    assert_eq!(fut.wait().unwrap(), 420);
    let futs: Vec<_> = (0..50).map(|i| w1.rpc_async(0, add_i64, (i, i))).collect();
    assert_eq!(
        wait_all(futs).unwrap(),
        (0..50).map(|i| 2 * i).collect::<Vec<_>>()
    );
    assert_eq!(w0.worker_infos().len(), 2);
    assert_eq!(w1.worker_info().name, "worker1");
    shutdown_all(rpcs).unwrap();
}

#[test]
fn builtin_tensor_ops_run_remotely() {
    let rpcs = two();
    let w0 = &rpcs[0];
    let ones = w0
        .rpc_sync("worker1", builtin::ones, (vec![2, 3], DType::F64))
        .unwrap();
    assert_eq!(ones.shape(), &[2, 3]);
    let twos = w0
        .rpc_sync("worker1", builtin::add, (ones.clone(), ones.clone()))
        .unwrap();
    let prod = w0
        .rpc_sync(
            "worker1",
            builtin::matmul,
            (twos.clone(), ones.reshape(vec![3, 2]).unwrap()),
        )
        .unwrap();
    assert_eq!(prod.as_slice::<f64>().unwrap(), &[6.0; 4]);
    let s = w0.rpc_sync("worker1", builtin::sum, (prod,)).unwrap();
    assert_eq!(s.as_slice::<f64>().unwrap(), &[24.0]);
    for dtype in [DType::F32, DType::F64, DType::I64] {
        let z = w0
            .rpc_sync("worker1", builtin::zeros, (vec![4], dtype))
            .unwrap();
        let n = w0.rpc_sync("worker1", builtin::neg, (z.clone(),)).unwrap();
        let d = w0
            .rpc_sync("worker1", builtin::sub, (n, z.clone()))
            .unwrap();
        let m = w0
            .rpc_sync("worker1", builtin::mul, (d, z.clone()))
            .unwrap();
        assert_eq!(m.dtype(), dtype);
        assert_eq!(m.shape(), &[4]);
    }
    let q = w0
        .rpc_sync(
            "worker1",
            builtin::div,
            (
                Tensor::from_slice(&[1i64, 3]),
                Tensor::from_slice(&[2i64, 2]),
            ),
        )
        .unwrap();
    assert_eq!(q.as_slice::<f32>().unwrap(), &[0.5, 1.5]);
    let r = w0
        .rpc_sync("worker1", builtin::rand, (vec![100], DType::F32))
        .unwrap();
    assert!(
        r.as_slice::<f32>()
            .unwrap()
            .iter()
            .all(|x| (0.0..1.0).contains(x))
    );
    // A bad op is the callee's error, named.
    let err = w0
        .rpc_sync(
            "worker1",
            builtin::add,
            (Tensor::from_slice(&[1f32]), Tensor::from_slice(&[1f64])),
        )
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote(e) if e.function == "aten::add" && e.message.contains("dtypes differ")),
        "{err}"
    );
    shutdown_all(rpcs).unwrap();
}

#[test]
fn tensors_nested_anywhere_arrive_aligned() {
    let rpcs = two();
    let batch = Batch {
        inputs: vec![
            Tensor::from_slice(&[1.0f32, 2.0, 3.0]),
            Tensor::scalar(7i64),
        ],
        named: [(
            "w".to_string(),
            Tensor::from_vec(vec![2, 2], vec![1.0f64, 2.0, 3.0, 4.0]).unwrap(),
        )]
        .into(),
        pair: (Tensor::from_slice(&[5i32; 33]), 9),
    };
    let (out, aligned) = rpcs[0]
        .rpc_sync("worker1", double_batch, (batch.clone(),))
        .unwrap();
    assert!(
        aligned,
        "received tensors must be 64-byte aligned slices of the frame"
    );
    assert_eq!(out.inputs[0].as_slice::<f32>().unwrap(), &[2.0, 4.0, 6.0]);
    assert_eq!(out.inputs[1].as_slice::<i64>().unwrap(), &[14]);
    assert_eq!(
        out.named["w"].as_slice::<f64>().unwrap(),
        &[2.0, 4.0, 6.0, 8.0]
    );
    assert_eq!(out.pair.0.as_slice::<i32>().unwrap(), &[10; 33]);
    assert_eq!(out.pair.1, 9);
    // A large tensor, and back through ndarray without a copy.
    let big = Tensor::from(ndarray::Array2::<f32>::ones((512, 1024)));
    let sum = rpcs[1].rpc_sync("worker0", builtin::sum, (big,)).unwrap();
    assert_eq!(sum.as_slice::<f32>().unwrap(), &[524288.0]);
    shutdown_all(rpcs).unwrap();
}

#[test]
fn failures_come_back_as_typed_errors_and_the_callee_keeps_serving() {
    let rpcs = two();
    let w0 = &rpcs[0];
    let err = w0.rpc_sync("worker1", refuse, (-1,)).unwrap_err();
    match &err {
        Error::Remote(e) => {
            assert_eq!(e.worker, "worker1");
            assert!(e.function.ends_with("::refuse"), "{}", e.function);
            assert!(e.type_name.ends_with("Oops"), "{}", e.type_name);
            assert_eq!(e.message, "the function said no");
        }
        other => panic!("expected a remote error, got {other}"),
    }
    let err = w0
        .rpc_sync("worker1", explode, ("kaboom".to_string(),))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Remote(e) if e.type_name == "panic" && e.message == "kaboom" && e.worker == "worker1"),
        "{err}"
    );
    // Still serving after the panic.
    assert_eq!(w0.rpc_sync("worker1", refuse, (3,)).unwrap(), 3);

    let missing: Function<(i64,), i64> = Function::named("no::such::function");
    let err = w0.rpc_sync("worker1", &missing, (1,)).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownFunction { worker, function } if worker == "worker1" && function == "no::such::function"),
        "{err}"
    );

    let wrong: Function<(String, bool), i64> = Function::named(add_i64.name().to_string());
    let err = w0
        .rpc_sync("worker1", &wrong, ("x".into(), true))
        .unwrap_err();
    assert!(
        matches!(&err, Error::Decode { function, what: "arguments", .. } if function.ends_with("add_i64")),
        "{err}"
    );
    let wrong_ret: Function<(i64, i64), String> = Function::named(add_i64.name().to_string());
    let err = w0.rpc_sync("worker1", &wrong_ret, (1, 2)).unwrap_err();
    assert!(
        matches!(&err, Error::Decode { what: "result", .. }),
        "{err}"
    );

    let err = w0.rpc_sync("nobody", add_i64, (1, 1)).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownWorker(w) if w.contains("nobody")),
        "{err}"
    );
    let err = w0.rpc_sync(To::Rank(7), add_i64, (1, 1)).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownWorker(w) if w.contains("rank 7")),
        "{err}"
    );
    assert!(w0.worker_info_of("nobody").is_err());
    shutdown_all(rpcs).unwrap();
}

#[test]
fn timeouts_default_override_and_none() {
    let rpcs = two();
    let w0 = &rpcs[0];
    assert_eq!(w0.rpc_timeout(), Duration::from_secs(20));
    let started = Instant::now();
    let err = w0
        .rpc_sync_timeout("worker1", wait_for_gate, (), Duration::from_millis(150))
        .unwrap_err();
    match &err {
        Error::Timeout {
            worker,
            timeout,
            elapsed,
            ..
        } => {
            assert_eq!(worker, "worker1");
            assert_eq!(*timeout, Duration::from_millis(150));
            assert!(*elapsed >= Duration::from_millis(150));
        }
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(err.to_string().contains("ran for"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    // The default applies when no override is given.
    w0.set_rpc_timeout(Duration::from_millis(100));
    assert_eq!(w0.rpc_timeout(), Duration::from_millis(100));
    assert!(
        w0.rpc_sync("worker1", wait_for_gate, ())
            .unwrap_err()
            .is_timeout()
    );
    // Zero means no timeout: this call outlives the 100 ms default and succeeds once released.
    let pending = w0.rpc_async_timeout("worker1", wait_for_gate, (), Duration::ZERO);
    let metrics_seen = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Wait on the condition (the callee is running the handler), not on a sleep.
            if rpcs[1].metrics()["agent.server_active_calls"] >= 1 || Instant::now() > deadline {
                break rpcs[1].metrics()["agent.server_active_calls"];
            }
            thread::yield_now();
        }
    };
    assert!(metrics_seen >= 1);
    assert!(!pending.is_done());
    open_gate();
    assert!(pending.wait().unwrap());
    w0.set_rpc_timeout(Duration::from_secs(20));
    shutdown_all(rpcs).unwrap();
}

#[test]
fn nested_calls_deeper_than_the_pool_do_not_deadlock() {
    // Two handler threads per worker, sixteen chains of depth six in flight at once: every
    // chain holds a blocked handler on each hop, far more than the pools' threads.
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .num_worker_threads(2)
            .rpc_timeout(Duration::from_secs(30))
    })
    .unwrap();
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let rpc = rpcs[0].clone();
            thread::spawn(move || rpc.rpc_sync("worker1", ping_pong, (6,)))
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), 6);
    }
    assert_eq!(rpcs[0].metrics()["agent.thread_pool_size"], 2);
    shutdown_all(rpcs).unwrap();
}

/// Holds a pool thread until the test lets it go: the test's own gate, so that the tests
/// sharing [`GATE`] cannot open it.
struct Hold {
    /// (held, released)
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

static HOLD: Hold = Hold {
    state: Mutex::new((false, false)),
    changed: Condvar::new(),
};

impl Hold {
    fn reset(&self) {
        *self.state.lock().unwrap() = (false, false);
    }

    /// Marks the pool thread held, then waits (bounded) until released.
    fn hold(&self) -> bool {
        let mut state = self.state.lock().unwrap();
        state.0 = true;
        self.changed.notify_all();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(30), |s| !s.1)
            .unwrap();
        state.1
    }

    /// Waits (bounded) until a pool thread is held.
    fn wait_held(&self) -> bool {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(30), |s| !s.0)
            .unwrap();
        state.0
    }

    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

#[distrpc::function]
fn hold_the_pool() -> bool {
    HOLD.hold()
}

/// A function quick enough to run inline on the connection's reader may still block: here it
/// turns into a chain of nested calls over the same connection, which needs the reader it runs
/// on. The reader hands off to a new task and the chain completes.
#[test]
fn a_quick_function_that_blocks_hands_its_reader_off() {
    // worker1 has one handler thread. While it is free it reads worker1's connection itself;
    // while the test holds it, calls are read by the connection's reader task, where a trusted
    // quick function runs inline.
    let rpcs = in_process(2, |rank| {
        let options = RpcOptions::default().rpc_timeout(Duration::from_secs(30));
        if rank == 1 {
            options.num_worker_threads(1)
        } else {
            options
        }
    })
    .unwrap();
    let hand_offs = |rpcs: &[Rpc]| -> i64 {
        rpcs.iter()
            .map(|r| r.metrics()["agent.reader_hand_offs"])
            .sum()
    };
    // Rounds until one chain started inline (bounded): a run slowed by a busy machine sends
    // the function back to the pool for a while, and then the chain waits for the held thread.
    for _ in 0..10 {
        // Depth 0 returns at once: after a few quick runs on the pool it is trusted inline.
        for _ in 0..64 {
            assert_eq!(rpcs[0].rpc_sync("worker1", ping_pong, (0,)).unwrap(), 0);
        }
        HOLD.reset();
        let held = rpcs[0].rpc_async("worker1", hold_the_pool, ());
        assert!(HOLD.wait_held(), "worker1's handler thread was never held");
        let inline_runs = rpcs[1].metrics()["agent.inline_handler_runs"];
        let chain = rpcs[0].rpc_sync_timeout("worker1", ping_pong, (5,), Duration::from_secs(5));
        HOLD.release();
        assert!(held.wait().unwrap());
        match chain {
            Ok(depth) => {
                // Worker1's only handler thread was held: its three links ran inline.
                assert_eq!(depth, 5);
                assert!(rpcs[1].metrics()["agent.inline_handler_runs"] >= inline_runs + 3);
                break;
            }
            Err(e) => assert!(e.is_timeout(), "{e}"),
        }
    }
    assert!(
        hand_offs(&rpcs) > 0,
        "no inline run blocked: the test did not test the hand-off"
    );
    shutdown_all(rpcs).unwrap();
}

#[test]
fn async_functions_hold_no_thread_while_they_wait() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .num_worker_threads(1)
            .rpc_timeout(Duration::from_secs(30))
    })
    .unwrap();
    let futs: Vec<_> = (0..ASYNC_CALLS)
        .map(|i| rpcs[0].rpc_async("worker1", meet_async, (i,)))
        .collect();
    assert_eq!(
        wait_all(futs).unwrap(),
        (0..ASYNC_CALLS).collect::<Vec<_>>()
    );
    shutdown_all(rpcs).unwrap();
}

#[test]
fn blocking_on_a_runtime_thread_is_an_error_not_a_deadlock() {
    let rpcs = two();
    let msg = rpcs[0].rpc_sync("worker1", block_inside_async, ()).unwrap();
    assert!(msg.contains("would deadlock"), "{msg}");
    shutdown_all(rpcs).unwrap();
}

#[test]
fn many_threads_share_one_rpc() {
    let rpcs = in_process(3, |_| RpcOptions::default()).unwrap();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let rpc = rpcs[0].clone();
            thread::spawn(move || {
                for i in 0..200i64 {
                    let to = 1 + (i as u32 % 2);
                    assert_eq!(rpc.rpc_sync(to, add_i64, (t, i)).unwrap(), t + i);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    shutdown_all(rpcs).unwrap();
}

/// A blocked caller reads the connection itself while it waits (its claim), then hands it back
/// to the reader task: replies to other callers, pipelined replies and requests from the other
/// side that arrive meanwhile must all be handled: with callers spinning for their replies (the
/// default), sleeping at once, and in the busy-poll mode.
#[test]
fn callers_reading_their_own_replies_lose_nothing() {
    let us = Duration::from_micros;
    for (busy, spin) in [(us(0), us(200)), (us(0), us(0)), (us(50), us(0))] {
        let rpcs = in_process(2, |_| {
            RpcOptions::default()
                .busy_poll(busy)
                .spin_wait(spin)
                .rpc_timeout(Duration::from_secs(30))
        })
        .unwrap();
        let mut handles = Vec::new();
        for (me, other) in [(0usize, 1u32), (1, 0)] {
            for t in 0..3i64 {
                let rpc = rpcs[me].clone();
                handles.push(thread::spawn(move || {
                    for i in 0..300i64 {
                        assert_eq!(rpc.rpc_sync(other, add_i64, (t, i)).unwrap(), t + i);
                    }
                }));
            }
            let rpc = rpcs[me].clone();
            handles.push(thread::spawn(move || {
                for round in 0..20i64 {
                    let futs: Vec<_> = (0..64i64)
                        .map(|i| rpc.rpc_async(other, add_i64, (round, i)))
                        .collect();
                    let want: Vec<i64> = (0..64).map(|i| round + i).collect();
                    assert_eq!(wait_all(futs).unwrap(), want);
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        shutdown_all(rpcs).unwrap();
    }
}

/// A reply that lands while another caller holds the claim, after that caller's last read, must
/// still be read: here no later traffic would rescue it.
#[test]
fn a_reply_landing_during_a_claim_is_not_stranded() {
    let rpcs = in_process(2, |_| RpcOptions::default()).unwrap();
    for round in 0..2000i64 {
        let later = rpcs[0].rpc_async_timeout(1, add_i64, (round, 1), Duration::from_secs(5));
        assert_eq!(rpcs[0].rpc_sync(1, add_i64, (round, 2)).unwrap(), round + 2);
        assert_eq!(later.wait().unwrap(), round + 1, "round {round}");
    }
    shutdown_all(rpcs).unwrap();
}

/// While a large body arrives, the reader asks the socket to wake it only for big pieces
/// (`SO_RCVLOWAT`); once the body is in, small frames must wake it again at once. Large and
/// small calls alternate, both ways, from blocked callers and pipelines.
#[test]
fn small_calls_after_large_tensors_are_not_held_back() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default().rpc_timeout(Duration::from_secs(30))
    })
    .unwrap();
    let big = Tensor::from_vec(vec![3 << 18], vec![1.5f32; 3 << 18]).unwrap(); // 3 MiB
    for round in 0..3i64 {
        for (me, other) in [(0usize, 1u32), (1, 0)] {
            let neg = rpcs[me]
                .rpc_sync(other, builtin::neg, (big.clone(),))
                .unwrap();
            assert_eq!(neg.as_slice::<f32>().unwrap()[(3 << 18) - 1], -1.5);
            for i in 0..20i64 {
                assert_eq!(
                    rpcs[me].rpc_sync(other, add_i64, (round, i)).unwrap(),
                    round + i
                );
            }
            let futs: Vec<_> = (0..20i64)
                .map(|i| rpcs[me].rpc_async(other, add_i64, (round, i)))
                .collect();
            let want: Vec<i64> = (0..20).map(|i| round + i).collect();
            assert_eq!(wait_all(futs).unwrap(), want);
        }
    }
    shutdown_all(rpcs).unwrap();
}

#[test]
fn closures_registered_at_init() {
    let rpcs = in_process(2, |rank| {
        RpcOptions::default()
            .register("triple", move |(x,): (i64,)| x * 3 + rank as i64)
            .register_fallible("checked_div", |(a, b): (i64, i64)| {
                a.checked_div(b).ok_or("division by zero")
            })
    })
    .unwrap();
    let triple: Function<(i64,), i64> = Function::named("triple");
    assert_eq!(rpcs[0].rpc_sync(1, &triple, (5,)).unwrap(), 16);
    let div: Function<(i64, i64), i64> = Function::named("checked_div");
    assert_eq!(rpcs[0].rpc_sync(1, &div, (9, 3)).unwrap(), 3);
    let err = rpcs[0].rpc_sync(1, &div, (9, 0)).unwrap_err();
    assert!(
        matches!(&err, Error::Remote(e) if e.message == "division by zero"),
        "{err}"
    );
    shutdown_all(rpcs).unwrap();
}

#[test]
fn futures_are_awaitable_in_async_code() {
    let rpcs = two();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rpc = rpcs[0].clone();
    let sum = rt.block_on(async move {
        let a = rpc.rpc_async(1, add_i64, (1, 2)).await?;
        let b = rpc.rpc_async(1, add_i64, (a, 10)).await?;
        Ok::<_, Error>(b)
    });
    assert_eq!(sum.unwrap(), 13);
    drop(rt);
    shutdown_all(rpcs).unwrap();
}

/// The pool's idle thread reads the connection the latest job's call came in on: the caller's
/// next calls are read by it (counted by `agent.frames_read_waiting`), and every one is
/// answered. Bounded: a busy machine may let the reader task read some calls first.
#[test]
fn the_pools_idle_thread_reads_the_next_calls_itself() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default().rpc_timeout(Duration::from_secs(30))
    })
    .unwrap();
    let read_waiting = |r: &Rpc| r.metrics()["agent.frames_read_waiting"];
    let before = read_waiting(&rpcs[1]);
    let mut calls = 0i64;
    while read_waiting(&rpcs[1]) == before && calls < 20_000 {
        assert_eq!(
            rpcs[0].rpc_sync("worker1", add_i64, (calls, 1)).unwrap(),
            calls + 1
        );
        calls += 1;
    }
    assert!(
        read_waiting(&rpcs[1]) > before,
        "after {calls} calls, no frame was read by a waiting pool thread"
    );
    shutdown_all(rpcs).unwrap();
}
