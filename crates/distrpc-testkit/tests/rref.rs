//! Remote references across workers in one process: creation, methods on the owner, passing
//! references in every direction, deletion, failures and injected faults, and a stress test.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

use distrpc::{Error, FaultInjection, Function, MessageKind, RRef, Rpc, RpcOptions, Tensor};
use distrpc_testkit::{in_process, rref_leaks, shutdown_all, wait_until};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Default)]
struct Counter {
    value: AtomicI64,
}

#[distrpc::function]
fn make_counter(start: i64) -> Counter {
    Counter {
        value: AtomicI64::new(start),
    }
}

#[distrpc::function]
fn fail_make(reason: String) -> Result<Counter, String> {
    Err(reason)
}

/// A method: runs on the owner with the value; mutates it through an atomic.
#[distrpc::function(method)]
fn add_to(c: &Counter, by: i64) -> i64 {
    c.value.fetch_add(by, Ordering::SeqCst) + by
}

#[distrpc::function(method)]
fn value_of(c: &Counter) -> i64 {
    c.value.load(Ordering::SeqCst)
}

#[distrpc::function(method)]
fn scaled(c: &Counter, by: f32) -> Tensor {
    Tensor::from_slice(&[c.value.load(Ordering::SeqCst) as f32 * by])
}

/// Uses a reference it was given: its method runs on the owner.
#[distrpc::function]
fn read_through(r: RRef<Counter>) -> Result<i64, Error> {
    r.rpc_sync(value_of, ())
}

/// Fetches the value of a reference it was given.
#[distrpc::function]
fn fetch_through(r: RRef<Counter>) -> Result<i64, Error> {
    Ok(r.to_here()?.value.load(Ordering::SeqCst))
}

/// Passes a reference it was given on to another worker.
#[distrpc::function]
fn pass_on(r: RRef<Counter>, to: String) -> Result<i64, Error> {
    let rpc = Rpc::current().ok_or(Error::InvalidArgument("no current rpc".into()))?;
    rpc.rpc_sync(to, read_through, (r,))
}

/// Whether the reference it was given was already confirmed when the function started.
#[distrpc::function]
fn confirmed_on_entry(r: RRef<Counter>) -> bool {
    r.confirmed_by_owner()
}

#[distrpc::function]
async fn confirmed_on_entry_async(r: RRef<Counter>) -> bool {
    r.confirmed_by_owner()
}

#[distrpc::function]
fn is_owner_here(r: RRef<Counter>) -> bool {
    r.is_owner()
}

/// Returns a reference to a value it owns (owner → user through a result).
#[distrpc::function]
fn own_one(start: i64) -> Result<RRef<Counter>, Error> {
    let rpc = Rpc::current().ok_or(Error::InvalidArgument("no current rpc".into()))?;
    Ok(rpc.rref(Counter {
        value: AtomicI64::new(start),
    }))
}

static GATE: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// Blocks until the gate opens (bounded).
#[distrpc::function]
fn make_after_gate() -> Counter {
    let (open, cv) = &GATE;
    let _ = cv.wait_timeout_while(open.lock().unwrap(), Duration::from_secs(20), |o| !*o);
    Counter::default()
}

fn opts() -> RpcOptions {
    RpcOptions::default().rpc_timeout(Duration::from_secs(20))
}

/// Waits (bounded) until no reference and no value is left on any worker; fails listing them.
fn assert_freed_within(rpcs: &[Rpc], bound: Duration) {
    assert!(
        wait_until(bound, || rref_leaks(rpcs).is_empty()),
        "references left behind: {:?}",
        rref_leaks(rpcs)
    );
}

fn assert_no_leaks(rpcs: &[Rpc]) {
    let leaks = rref_leaks(rpcs);
    assert!(leaks.is_empty(), "references left behind: {leaks:?}");
}

#[test]
fn remote_to_here_and_what_a_reference_knows() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    let w0 = &rpcs[0];
    let r: RRef<Counter> = w0.remote("worker1", make_counter, (5,));
    assert!(
        r.to_string()
            .starts_with("UserRRef(rref_id=GloballyUniqueId(created_on=0, "),
        "{r}"
    );
    assert!(r.to_string().contains("fork_id="), "{r}");
    assert_eq!(r.owner_name(), "worker1");
    assert_eq!(r.owner().id, 1);
    assert!(!r.is_owner());
    assert_eq!(r.to_here().unwrap().value.load(Ordering::SeqCst), 5);
    assert!(
        r.confirmed_by_owner(),
        "the owner acknowledged before it answered the fetch"
    );
    let err = r.local_value().unwrap_err();
    assert!(
        matches!(&err, Error::NotOwner { owner, .. } if owner == "worker1"),
        "{err}"
    );

    // To self: an owner reference, created directly.
    let mine: RRef<Counter> = w0.remote("worker0", make_counter, (7,));
    assert!(mine.is_owner() && mine.confirmed_by_owner());
    assert!(mine.to_string().starts_with("OwnerRRef(rref_id="), "{mine}");
    assert_eq!(mine.local_value().unwrap().value.load(Ordering::SeqCst), 7);
    assert_eq!(mine.to_here().unwrap().value.load(Ordering::SeqCst), 7);
    // A local value made into a reference.
    let local = w0.rref(Counter {
        value: AtomicI64::new(9),
    });
    assert_eq!(local.rpc_sync(add_to, (1,)).unwrap(), 10);
    drop((r, mine, local));
    let handles = rpcs.clone();
    shutdown_all(rpcs).unwrap();
    assert_no_leaks(&handles);
}

#[test]
fn methods_run_on_the_owner_and_wait_there_for_the_value() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    let w0 = &rpcs[0];
    // Issued back to back: the calls reach the owner before (or while) it creates the value, and
    // wait for it there.
    let r: RRef<Counter> = w0.remote("worker1", make_counter, (0,));
    let futs: Vec<_> = (0..10).map(|_| r.rpc_async(add_to, (1,))).collect();
    let mut seen = distrpc::wait_all(futs).unwrap();
    seen.sort();
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    assert_eq!(r.to_here().unwrap().value.load(Ordering::SeqCst), 10);
    // A method's result kept on the owner, behind a new reference.
    let t: RRef<Tensor> = r.remote(scaled, (0.5,));
    assert_eq!(t.owner_name(), "worker1");
    assert_eq!(t.to_here().unwrap().as_slice::<f32>().unwrap(), &[5.0]);
    drop((r, t));
    let handles = rpcs.clone();
    shutdown_all(rpcs).unwrap();
    assert_no_leaks(&handles);
}

#[test]
fn references_passed_in_every_direction() {
    let rpcs = in_process(3, |_| opts()).unwrap();
    let (w0, w1) = (&rpcs[0], &rpcs[1]);
    let r: RRef<Counter> = w0.remote("worker2", make_counter, (3,));
    // user → user: worker1 gets a fork and uses it (its method runs on worker2).
    assert_eq!(
        w0.rpc_sync("worker1", read_through, (r.clone(),)).unwrap(),
        3
    );
    assert_eq!(
        w0.rpc_sync("worker1", fetch_through, (r.clone(),)).unwrap(),
        3
    );
    // user → owner: worker2 receives its own value.
    assert!(w0.rpc_sync("worker2", is_owner_here, (r.clone(),)).unwrap());
    // user → self.
    assert_eq!(
        w0.rpc_sync("worker0", read_through, (r.clone(),)).unwrap(),
        3
    );
    // A chain: worker0 → worker1 → worker0 (worker1 passes its fork on).
    assert_eq!(
        w0.rpc_sync("worker1", pass_on, (r.clone(), "worker0".to_string()))
            .unwrap(),
        3
    );
    // owner → user through a result: worker2 returns a reference to a value it owns.
    let theirs: RRef<Counter> = w1.rpc_sync("worker2", own_one, (11,)).unwrap();
    assert_eq!(theirs.owner_name(), "worker2");
    assert!(
        theirs.confirmed_by_owner(),
        "a fork from the owner is confirmed on arrival"
    );
    assert_eq!(theirs.rpc_sync(add_to, (1,)).unwrap(), 12);
    // owner → user as an argument: worker2's owner reference sent to worker1.
    let owned_by_0 = w0.rref(Counter {
        value: AtomicI64::new(100),
    });
    assert_eq!(
        w0.rpc_sync("worker1", read_through, (owned_by_0.clone(),))
            .unwrap(),
        100
    );
    // Outside an RPC an RRef does not serialize.
    let err = rmp_serde::to_vec(&r).unwrap_err();
    assert!(err.to_string().contains("only as part of an RPC"), "{err}");
    drop((r, theirs, owned_by_0));
    let handles = rpcs.clone();
    shutdown_all(rpcs).unwrap();
    assert_no_leaks(&handles);
}

#[test]
fn a_function_runs_only_once_the_references_it_was_given_are_confirmed() {
    // worker1's fork requests take a while to leave: the function must wait for the owner's ack.
    let rpcs = in_process(3, |rank| {
        let faults = if rank == 1 {
            FaultInjection::default()
                .delay(MessageKind::RRefForkRequest, Duration::from_millis(100))
        } else {
            FaultInjection::default()
        };
        opts().faults(faults)
    })
    .unwrap();
    let r: RRef<Counter> = rpcs[0].remote("worker2", make_counter, (0,));
    assert!(
        rpcs[0]
            .rpc_sync("worker1", confirmed_on_entry, (r.clone(),))
            .unwrap()
    );
    assert!(
        rpcs[0]
            .rpc_sync("worker1", confirmed_on_entry_async, (r.clone(),))
            .unwrap()
    );
    drop(r);
    let handles = rpcs.clone();
    shutdown_all(rpcs).unwrap();
    assert_no_leaks(&handles);
}

#[test]
fn dropping_the_last_reference_frees_the_value_on_the_owner() {
    let rpcs = in_process(3, |_| opts()).unwrap();
    let r: RRef<Counter> = rpcs[0].remote("worker1", make_counter, (1,));
    assert_eq!(
        rpcs[0]
            .rpc_sync("worker2", read_through, (r.clone(),))
            .unwrap(),
        1
    );
    assert_eq!(r.to_here().unwrap().value.load(Ordering::SeqCst), 1);
    assert_eq!(rpcs[1].metrics()["num_owner_values"], 1);
    drop(r);
    // The owner learns of the delete (sent without blocking) and drops the value.
    assert_freed_within(&rpcs, Duration::from_secs(10));
    shutdown_all(rpcs).unwrap();
}

#[test]
fn creation_failures_surface_when_the_reference_is_used() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    let w0 = &rpcs[0];
    let failed: RRef<Counter> = w0.remote("worker1", fail_make, ("no counter today".to_string(),));
    let err = failed.to_here().unwrap_err();
    assert!(
        matches!(&err, Error::Remote(e) if e.message == "no counter today" && e.worker == "worker1"),
        "{err}"
    );
    let err = failed.rpc_sync(value_of, ()).unwrap_err();
    assert!(
        matches!(&err, Error::Remote(e) if e.message == "no counter today"),
        "{err}"
    );

    let missing: Function<(i64,), Counter> = Function::named("no::such::maker");
    let err = w0.remote("worker1", &missing, (1,)).to_here().unwrap_err();
    assert!(err.to_string().contains("no::such::maker"), "{err}");

    let err = w0
        .remote("nobody", make_counter, (1,))
        .to_here()
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownWorker(w) if w.contains("nobody")),
        "{err}"
    );

    // Not confirmed in time: the creation-timeout error, on every use.
    let slow: RRef<Counter> =
        w0.remote_timeout("worker1", make_after_gate, (), Duration::from_millis(100));
    let err = slow.to_here().unwrap_err();
    assert!(
        matches!(&err, Error::RRefCreation { reason, .. } if reason.contains("timed out")),
        "{err}"
    );
    *GATE.0.lock().unwrap() = true;
    GATE.1.notify_all();
    drop((failed, slow));
    let handles = rpcs.clone();
    shutdown_all(rpcs).unwrap();
    assert_no_leaks(&handles);
}

#[test]
fn dropped_and_delayed_messages_still_free_everything() {
    // Every control message kind fails its first sends and is delayed on every worker.
    let faults = || {
        FaultInjection::default()
            .fail(MessageKind::RRefForkRequest, 2)
            .fail(MessageKind::RRefChildAccept, 2)
            .fail(MessageKind::RRefUserDelete, 2)
            .delay(MessageKind::RRefForkRequest, Duration::from_millis(20))
            .delay(MessageKind::RRefUserDelete, Duration::from_millis(20))
    };
    let rpcs = in_process(3, |_| opts().faults(faults())).unwrap();
    let r: RRef<Counter> = rpcs[0].remote("worker2", make_counter, (4,));
    for to in ["worker1", "worker2", "worker0"] {
        assert_eq!(rpcs[0].rpc_sync(to, read_through, (r.clone(),)).unwrap(), 4);
    }
    assert_eq!(
        rpcs[0]
            .rpc_sync("worker1", pass_on, (r.clone(), "worker2".to_string()))
            .unwrap(),
        4
    );
    drop(r);
    assert_freed_within(&rpcs, Duration::from_secs(20));
    shutdown_all(rpcs).unwrap();
}

#[test]
fn a_dropped_or_delayed_remote_is_a_creation_timeout() {
    let rpcs = in_process(2, |rank| {
        let faults = if rank == 0 {
            FaultInjection::default().fail(MessageKind::RemoteCall, 1)
        } else {
            FaultInjection::default().delay(MessageKind::RemoteCall, Duration::from_millis(300))
        };
        opts().faults(faults)
    })
    .unwrap();
    let dropped: RRef<Counter> = rpcs[0].remote("worker1", make_counter, (1,));
    let err = dropped.to_here().unwrap_err();
    assert!(
        matches!(&err, Error::RRefCreation { reason, .. } if reason.contains("timed out")),
        "{err}"
    );
    let delayed: RRef<Counter> =
        rpcs[1].remote_timeout("worker0", make_counter, (1,), Duration::from_millis(50));
    let err = delayed.to_here().unwrap_err();
    assert!(
        matches!(&err, Error::RRefCreation { reason, .. } if reason.contains("timed out")),
        "{err}"
    );
    drop((dropped, delayed));
    // The delayed creation still arrives later; its value is freed when it does.
    assert_freed_within(&rpcs, Duration::from_secs(10));
    shutdown_all(rpcs).unwrap();
}

#[test]
fn references_held_at_shutdown_are_deleted_and_reported_when_asked() {
    let rpcs = in_process(2, |rank| opts().check_rref_leaks(rank == 0)).unwrap();
    let kept: RRef<Counter> = rpcs[0].remote("worker1", make_counter, (1,));
    let also: RRef<Counter> = rpcs[1].remote("worker0", make_counter, (2,));
    assert_eq!(kept.to_here().unwrap().value.load(Ordering::SeqCst), 1);
    assert_eq!(also.to_here().unwrap().value.load(Ordering::SeqCst), 2);
    let handles = rpcs.clone();
    let err = shutdown_all(rpcs).unwrap_err().to_string();
    // worker0 checks leaks and reports the reference it still held; worker1 does not check.
    assert!(
        err.contains("worker0: leaking RRefs on worker0") && err.contains("UserRRef(rref_id="),
        "{err}"
    );
    assert!(!err.contains("worker1:"), "{err}");
    // Either way the references were deleted: nothing is left on the owners.
    assert_no_leaks(&handles);
    // A reference used after shutdown fails clearly.
    let e = kept.to_here().unwrap_err();
    assert!(matches!(e, Error::ShutDown { .. }), "{e}");
    let e = also.rpc_sync(value_of, ()).unwrap_err();
    assert!(matches!(e, Error::ShutDown { .. }), "{e}");
}

/// References each worker holds in the stress test, by worker name.
static HELD: LazyLock<Mutex<HashMap<String, Vec<RRef<Counter>>>>> = LazyLock::new(Default::default);

/// Keeps a reference it was sent, checking first that its value is readable.
#[distrpc::function]
fn keep(r: RRef<Counter>, expected: i64) -> Result<(), Error> {
    let rpc = Rpc::current().ok_or(Error::InvalidArgument("no current rpc".into()))?;
    let v = r.rpc_sync(value_of, ())?;
    if v != expected {
        return Err(Error::InvalidArgument(format!(
            "read {v}, expected {expected}"
        )));
    }
    HELD.lock()
        .unwrap()
        .entry(rpc.name().to_string())
        .or_default()
        .push(r);
    Ok(())
}

/// splitmix64, so that the stress test is reproducible from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

fn stress(seed: u64, faults: impl Fn() -> FaultInjection) {
    let rpcs = in_process(4, |_| opts().faults(faults())).unwrap();
    let names: Vec<String> = rpcs.iter().map(|r| r.name().to_string()).collect();
    let mut rng = Rng(seed);
    let take = |name: &str, i: usize| {
        HELD.lock()
            .unwrap()
            .get(name)
            .and_then(|v| v.get(i % v.len().max(1)).cloned())
    };
    for step in 0..3000 {
        let w = rng.next(4);
        let held = HELD.lock().unwrap().get(&names[w]).map_or(0, Vec::len);
        match rng.next(10) {
            // Create a value on a random owner and hold it here.
            0..=2 => {
                let owner = rng.next(4);
                let r: RRef<Counter> = rpcs[w].remote(owner, make_counter, (step,));
                HELD.lock()
                    .unwrap()
                    .entry(names[w].clone())
                    .or_default()
                    .push(r);
            }
            // Pass one along: the receiver reads it before keeping it.
            3..=6 if held > 0 => {
                let r = take(&names[w], rng.next(held)).unwrap();
                let expected = r.rpc_sync(value_of, ()).unwrap();
                let to = rng.next(4);
                rpcs[w].rpc_sync(to, keep, (r, expected)).unwrap();
            }
            // Drop one.
            7..=8 if held > 0 => {
                let i = rng.next(held);
                let r = HELD
                    .lock()
                    .unwrap()
                    .get_mut(&names[w])
                    .unwrap()
                    .swap_remove(i);
                drop(r);
            }
            // Read one: a value must never be missing while a reference to it is alive.
            _ if held > 0 => {
                let r = take(&names[w], rng.next(held)).unwrap();
                r.to_here()
                    .unwrap_or_else(|e| panic!("step {step}: {r} unreadable: {e}"));
            }
            _ => {}
        }
    }
    for name in &names {
        HELD.lock().unwrap().remove(name);
    }
    assert_freed_within(&rpcs, Duration::from_secs(30));
    shutdown_all(rpcs).unwrap();
}

/// The stress test runs one at a time: it shares `HELD` between its workers.
static STRESS: Mutex<()> = Mutex::new(());

#[test]
fn stress_without_faults() {
    let _one = STRESS.lock().unwrap_or_else(|e| e.into_inner());
    stress(7, FaultInjection::default);
}

#[test]
fn stress_with_dropped_and_delayed_control_messages() {
    let _one = STRESS.lock().unwrap_or_else(|e| e.into_inner());
    stress(11, || {
        FaultInjection::default()
            .fail(MessageKind::RRefForkRequest, 3)
            .fail(MessageKind::RRefChildAccept, 3)
            .fail(MessageKind::RRefUserDelete, 3)
            .delay(MessageKind::RRefChildAccept, Duration::from_millis(5))
            .delay(MessageKind::RRefUserDelete, Duration::from_millis(5))
    });
}
