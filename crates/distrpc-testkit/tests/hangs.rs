//! Every path that used to hang a worker or a caller, each with the test that caught it.
#![allow(clippy::unwrap_used)]

use std::thread;
use std::time::Duration;

use distrpc::{Error, Rpc, RpcOptions};
use distrpc_testkit::{in_process, shutdown_all};

/// Calls itself through the next worker `depth` times, alternating, from sync handlers.
#[distrpc::function]
fn ping_pong(depth: u32) -> Result<u32, Error> {
    if depth == 0 {
        return Ok(0);
    }
    let rpc = Rpc::current().ok_or(Error::InvalidArgument("no current rpc".into()))?;
    let next = (rpc.rank() + 1) % rpc.world_size() as u32;
    Ok(rpc.rpc_sync(next, ping_pong, (depth - 1,))? + 1)
}

/// A sync handler's nested `rpc_sync` reads its own reply, and with it the next nested request
/// of the chain: the pool must count that handler as blocked before it reads, or the request
/// waits for the one thread, which waits for it. Regression: with one thread it hung.
#[test]
fn nested_calls_on_a_one_thread_pool_complete() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .num_worker_threads(1)
            .rpc_timeout(Duration::from_secs(20))
    })
    .unwrap();
    for _ in 0..3 {
        assert_eq!(rpcs[0].rpc_sync("worker1", ping_pong, (8,)).unwrap(), 8);
    }
    let chains: Vec<_> = (0..4)
        .map(|_| {
            let rpc = rpcs[0].clone();
            thread::spawn(move || rpc.rpc_sync("worker1", ping_pong, (10,)))
        })
        .collect();
    for chain in chains {
        assert_eq!(chain.join().unwrap().unwrap(), 10);
    }
    shutdown_all(rpcs).unwrap();
}

/// An `i64` whose `Deserialize` panics on 13: user code that runs where the reply is read.
#[derive(Debug, PartialEq)]
struct Touchy(i64);

impl<'de> serde::Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        assert_ne!(v, 13, "unlucky");
        Ok(Touchy(v))
    }
}

fn echo_group() -> Vec<Rpc> {
    in_process(2, |_| {
        RpcOptions::default()
            .rpc_timeout(Duration::from_secs(10))
            .register("echo", |(x,): (i64,)| x)
    })
    .unwrap()
}

static RELEASED: (std::sync::Mutex<i64>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// Returns `n` once the test has released `n` (bounded).
#[distrpc::function]
fn held(n: i64) -> i64 {
    let (released, cv) = &RELEASED;
    let guard = released.lock().unwrap();
    let _ = cv
        .wait_timeout_while(guard, Duration::from_secs(30), |r| *r < n)
        .unwrap();
    n
}

fn release(n: i64) {
    let (released, cv) = &RELEASED;
    *released.lock().unwrap() = n;
    cv.notify_all();
}

/// A `then` callback and a result's `Deserialize` run on the thread that reads the reply (the
/// connection's reader task, or a caller reading its own). Regression: a panic there killed the
/// reader task, and every later call on that connection hung until its timeout.
#[test]
fn a_panic_where_a_reply_is_read_fails_that_call_only() {
    let rpcs = echo_group();
    let echo: distrpc::Function<(i64,), i64> = distrpc::Function::named("echo");
    let touchy: distrpc::Function<(i64,), Touchy> = distrpc::Function::named("echo");
    for round in 0..3 {
        // Held on the callee until the callback is attached, so that it runs where the reply
        // is read, not at once on this thread.
        let f = rpcs[0]
            .rpc_async("worker1", held, (round + 1,))
            .then(|_| -> Result<i64, Error> { panic!("in a callback") });
        release(round + 1);
        assert!(matches!(f.wait(), Err(Error::Abandoned(_))));
        let r = rpcs[0].rpc_async("worker1", &touchy, (13,)).wait();
        assert!(matches!(r, Err(Error::Abandoned(_))), "{r:?}");
        let r = rpcs[0].rpc_sync("worker1", &touchy, (13,));
        assert!(matches!(r, Err(Error::Abandoned(_))), "{r:?}");
        // The connection still serves, through its reader task and through claims.
        let queued = rpcs[0].rpc_async("worker1", &echo, (round + 1,)).wait();
        assert_eq!(queued.unwrap(), round + 1);
        let r = rpcs[0].rpc_sync("worker1", &touchy, (round + 1,)).unwrap();
        assert_eq!(r, Touchy(round + 1));
    }
    shutdown_all(rpcs).unwrap();
}

/// The arguments' `Deserialize` is user code on the callee: a panic in it is the caller's
/// remote error, and the callee keeps serving.
#[test]
fn a_panic_decoding_arguments_is_a_remote_error() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .num_worker_threads(1)
            .rpc_timeout(Duration::from_secs(10))
            .register("touchy", |(x,): (Touchy,)| x.0)
    })
    .unwrap();
    let touchy: distrpc::Function<(i64,), i64> = distrpc::Function::named("touchy");
    for _ in 0..3 {
        let r = rpcs[0].rpc_sync("worker1", &touchy, (13,));
        assert!(
            matches!(&r, Err(Error::Remote(e)) if e.message.contains("unlucky")),
            "{r:?}"
        );
        assert_eq!(rpcs[0].rpc_sync("worker1", &touchy, (7,)).unwrap(), 7);
    }
    shutdown_all(rpcs).unwrap();
}

static GATE: (std::sync::Mutex<bool>, std::sync::Condvar) =
    (std::sync::Mutex::new(false), std::sync::Condvar::new());

/// Returns `x` once the test opens the gate (bounded, so that a broken test cannot hang).
#[distrpc::function]
fn after_gate(x: i64) -> i64 {
    let (open, cv) = &GATE;
    let guard = open.lock().unwrap();
    let _ = cv
        .wait_timeout_while(guard, Duration::from_secs(30), |open| !*open)
        .unwrap();
    x
}

/// On the owner, `to_here` and `local_value` of a value still being created wait for it —
/// within their timeouts. Regression: the owner's own fetch ignored its timeout, and
/// `local_value` had none.
#[test]
fn the_owner_waits_for_its_value_within_a_timeout() {
    let rpcs = in_process(1, |_| RpcOptions::default()).unwrap();
    let rpc = &rpcs[0];
    let rref = rpc.remote("worker0", after_gate, (42,));
    let r = rref.to_here_timeout(Duration::from_millis(200));
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    rpc.set_rpc_timeout(Duration::from_millis(200));
    let r = rref.local_value();
    assert!(matches!(&r, Err(Error::Timeout { function, .. }) if function == "local_value()"));
    rpc.set_rpc_timeout(Duration::from_secs(20));
    let (open, cv) = &GATE;
    *open.lock().unwrap() = true;
    cv.notify_all();
    assert_eq!(*rref.local_value().unwrap(), 42);
    assert_eq!(rref.to_here().unwrap(), 42);
    drop(rref);
    shutdown_all(rpcs).unwrap();
}

/// Calls of each generation that started, and the generations released.
static BURST: (std::sync::Mutex<([usize; 4], usize)>, std::sync::Condvar) = (
    std::sync::Mutex::new(([0; 4], 0)),
    std::sync::Condvar::new(),
);

/// Counts itself as started in `generation`, then waits until the test releases it (bounded).
#[distrpc::function]
fn slow_in_burst(generation: usize) -> usize {
    let (state, cv) = &BURST;
    let mut s = state.lock().unwrap();
    s.0[generation] += 1;
    cv.notify_all();
    let _ = cv
        .wait_timeout_while(s, Duration::from_secs(30), |s| s.1 <= generation)
        .unwrap();
    generation
}

/// Waits until `n` calls of `generation` have started; false if they did not within 10 s.
fn started(generation: usize, n: usize) -> bool {
    let (state, cv) = &BURST;
    let s = state.lock().unwrap();
    let (s, _) = cv
        .wait_timeout_while(s, Duration::from_secs(10), |s| s.0[generation] < n)
        .unwrap();
    s.0[generation] >= n
}

fn release_generation(generation: usize) {
    let (state, cv) = &BURST;
    state.lock().unwrap().1 = generation + 1;
    cv.notify_all();
}

/// A burst of slow calls that arrives while some pool threads are idle gets a thread each (up
/// to the pool's size), and a quick call behind them is answered at once. Regression: the pool
/// only woke idle threads while it counted some, and a woken thread stopped counting as idle
/// only once it ran: the burst ran two at a time.
#[test]
fn a_burst_of_slow_calls_starts_at_once() {
    let rpcs = in_process(2, |_| {
        RpcOptions::default()
            .num_worker_threads(16)
            .rpc_timeout(Duration::from_secs(40))
    })
    .unwrap();
    // Two threads, then idle.
    let warm: Vec<_> = (0..2)
        .map(|_| rpcs[0].rpc_async("worker1", slow_in_burst, (0,)))
        .collect();
    assert!(started(0, 2));
    release_generation(0);
    distrpc::wait_all(warm).unwrap();
    let burst: Vec<_> = (0..8)
        .map(|_| rpcs[0].rpc_async("worker1", slow_in_burst, (1,)))
        .collect();
    let all_started = started(1, 8);
    let quick = rpcs[0].rpc_sync_timeout("worker1", ping_pong, (0,), Duration::from_secs(5));
    release_generation(1);
    assert!(all_started, "the burst did not start at once");
    assert_eq!(quick.unwrap(), 0);
    assert_eq!(distrpc::wait_all(burst).unwrap(), vec![1; 8]);
    shutdown_all(rpcs).unwrap();
}

/// How `hog` holds its thread until the test lets it go.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq)]
enum Hold {
    /// Returns at once (to warm the function up: quick runs).
    Not,
    /// Blocks on a `std::sync::Mutex` the test holds.
    Mutex,
    /// Blocks on a `std::sync::Condvar` until released.
    Wait,
    /// Computes until released.
    Compute,
}

static HOG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Whether the hogs are let go (and its condvar, which wakes the waiting ones).
static HOG_RELEASED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
static HOG_WAKE: std::sync::Condvar = std::sync::Condvar::new();

fn hogs_released() -> bool {
    *HOG_RELEASED.lock().unwrap()
}

fn release_hogs(released: bool) {
    *HOG_RELEASED.lock().unwrap() = released;
    HOG_WAKE.notify_all();
}

/// A sync function that is quick until it is not: it blocks in ways distrpc cannot see.
#[distrpc::function]
fn hog(hold: Hold) -> Hold {
    let bound = Duration::from_secs(30);
    match hold {
        Hold::Not => {}
        Hold::Mutex => drop(HOG_LOCK.lock()),
        Hold::Wait => {
            let released = HOG_RELEASED.lock().unwrap();
            drop(HOG_WAKE.wait_timeout_while(released, bound, |r| !*r));
        }
        Hold::Compute => {
            let deadline = std::time::Instant::now() + bound;
            let mut x = 1u64;
            while !hogs_released() && std::time::Instant::now() < deadline {
                for i in 0..10_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
            }
        }
    }
    hold
}

/// While a sync function blocks — on a contended mutex, on a condvar, computing — other calls on
/// the same connection are answered and timeouts fire. Regression: a function that had been
/// quick ran on the connection's reader, and blocking there in a way distrpc cannot see held
/// every other reply behind it. Sync functions now run on the pool unless marked `inline`.
#[test]
fn a_blocking_sync_function_holds_up_no_other_call() {
    let rpcs = echo_group();
    let echo: distrpc::Function<(i64,), i64> = distrpc::Function::named("echo");
    for hold in [Hold::Mutex, Hold::Wait, Hold::Compute] {
        // Quick runs first: under the old scheme these made it trusted to run on the reader.
        for _ in 0..64 {
            assert_eq!(
                rpcs[0].rpc_sync("worker1", hog, (Hold::Not,)).unwrap(),
                Hold::Not
            );
        }
        release_hogs(false);
        let guard = HOG_LOCK.lock().unwrap();
        let hogging = rpcs[0].rpc_async("worker1", hog, (hold,));
        for i in 0..5 {
            let r = rpcs[0].rpc_sync_timeout("worker1", &echo, (i,), Duration::from_secs(5));
            assert_eq!(r.unwrap(), i, "a call behind {hold:?} was held up");
        }
        let short = Duration::from_millis(50);
        let r = rpcs[0].rpc_sync_timeout("worker1", hog, (Hold::Wait,), short);
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert!(!hogging.is_done(), "the hog returned before it was let go");
        drop(guard);
        release_hogs(true);
        assert_eq!(hogging.wait().unwrap(), hold);
    }
    shutdown_all(rpcs).unwrap();
}

/// Workers started with different world sizes fail at init, naming the disagreement.
/// Regression: both waited for the whole timeout and then blamed ranks that never came.
#[test]
fn workers_that_disagree_on_the_world_size_fail_at_init() {
    let options = || RpcOptions::default().rpc_timeout(Duration::from_secs(30));
    // Either may be first to join (and so set the world size): rounds try both orders.
    for _ in 0..8 {
        let first = Rpc::bind("worker0", 0, 2, options().init_method("tcp://127.0.0.1:0")).unwrap();
        let store = format!("tcp://{}", first.store_addr().unwrap());
        let stray = thread::spawn(move || Rpc::init("worker3", 3, 4, options().init_method(store)));
        let started = std::time::Instant::now();
        let first = first.join();
        let stray = stray.join().unwrap();
        for r in [first.map(|_| ()), stray.map(|_| ())] {
            let e = r
                .expect_err("a group that disagrees on its size formed")
                .to_string();
            assert!(e.contains("disagree on the world size"), "{e}");
            assert!(
                e.contains("was given 2") && e.contains("was given 4"),
                "{e}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "init waited for its timeout"
        );
    }
}

/// A member that stopped before anyone ever connected to it: the others' graceful shutdown
/// (no timeout) fails naming it. Regression: with no connection to lose, nobody noticed, and
/// the shutdown barrier waited forever.
#[test]
fn shutdown_names_a_member_that_died_unseen() {
    let mut rpcs = in_process(3, |_| RpcOptions::default()).unwrap();
    rpcs.pop().unwrap().shutdown_local();
    let (tx, rx) = std::sync::mpsc::channel();
    for rpc in rpcs {
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send((rpc.name().to_string(), rpc.shutdown()));
        });
    }
    for _ in 0..2 {
        let (name, r) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("shutdown hung");
        let e = r
            .expect_err("shutdown succeeded without worker2")
            .to_string();
        assert!(e.contains("worker2"), "{name}: {e}");
    }
}
