//! The Rust API's rough edges, filed down: each test names the edge it guards.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicI64, Ordering};

use distrpc::{Error, Rpc, RpcOptions};
use distrpc_testkit::{in_process, shutdown_all};

#[distrpc::function]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

#[distrpc::function]
async fn later(x: i64) -> Result<i64, Error> {
    Ok(x + 1)
}

#[distrpc::function(method)]
fn bump(counter: &AtomicI64, by: i64) -> i64 {
    counter.fetch_add(by, Ordering::SeqCst) + by
}

/// Regression: `#[distrpc::function]` replaced the function with its handle, so it could no
/// longer be called in its own process.
#[test]
fn a_remote_function_stays_callable_locally() {
    assert_eq!(add(2, 3), 5);
    let plain: fn(i64, i64) -> i64 = *add;
    assert_eq!(plain(4, 5), 9);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(later(1)).unwrap(), 2);
    let counter = AtomicI64::new(40);
    assert_eq!(bump(&counter, 2), 42);
    // And the same names are the remote handles.
    let rpcs = in_process(1, |_| RpcOptions::default()).unwrap();
    let rpc: &Rpc = &rpcs[0];
    assert_eq!(rpc.rpc_sync("worker0", add, (2, 3)).unwrap(), 5);
    assert_eq!(rpc.rpc_async("worker0", later, (1,)).wait().unwrap(), 2);
    let rref = rpc.rref(AtomicI64::new(40));
    assert_eq!(rref.rpc_sync(bump, (2,)).unwrap(), 42);
    drop(rref);
    shutdown_all(rpcs).unwrap();
}

/// Regression: registering a closure under a taken name silently replaced the first.
#[test]
fn a_name_is_registered_once() {
    let init = |options: RpcOptions| {
        let options = options.init_method("tcp://127.0.0.1:0");
        Rpc::init("worker0", 0, 1, options).unwrap_err().to_string()
    };
    let e = init(
        RpcOptions::default()
            .register("twice", |(x,): (i64,)| x)
            .register("twice", |(x,): (i64,)| x + 1),
    );
    assert!(
        e.contains("two functions are registered as \"twice\""),
        "{e}"
    );
    let e = init(RpcOptions::default().register("aten::add", |(x,): (i64,)| x));
    assert!(e.contains("aten::add") && e.contains("builtin"), "{e}");
    let e = init(RpcOptions::default().register("#distrpc/mine", |(x,): (i64,)| x));
    assert!(e.contains("distrpc's own"), "{e}");
}

/// Regressions: a completion callback needed `then` and a future to drop; `UnknownWorker` held
/// the name in quotes; `metrics()["missing"]` panicked.
#[test]
fn callbacks_errors_and_metrics_read_plainly() {
    let rpcs = in_process(1, |_| RpcOptions::default()).unwrap();
    let rpc = &rpcs[0];
    let (tx, rx) = std::sync::mpsc::channel();
    rpc.rpc_async("worker0", add, (2, 3))
        .add_done_callback(move |r| tx.send(r.unwrap()).unwrap());
    assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)), Ok(5));
    let err = rpc.rpc_sync("nobody", add, (1, 1)).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownWorker(w) if w == "nobody"),
        "{err:?}"
    );
    let m = rpc.metrics();
    assert_eq!(
        m["agent.num_idle_threads"],
        m.get("agent.num_idle_threads").unwrap()
    );
    assert_eq!((m["no.such.metric"], m.get("no.such.metric")), (0, None));
    shutdown_all(rpcs).unwrap();
}

#[distrpc::function]
fn new_counter(start: i64) -> AtomicI64 {
    AtomicI64::new(start)
}

#[distrpc::function(method)]
async fn bump_later(counter: &AtomicI64, by: i64) -> i64 {
    tokio::task::yield_now().await;
    counter.fetch_add(by, Ordering::SeqCst) + by
}

/// Regression: async methods were refused ("not supported yet").
#[test]
fn async_methods_run_on_the_owner() {
    let rpcs = in_process(2, |_| RpcOptions::default()).unwrap();
    // worker0 calls the method on a value worker1 owns.
    let counter = rpcs[0].remote("worker1", new_counter, (40,));
    assert_eq!(counter.rpc_sync(bump_later, (1,)).unwrap(), 41);
    assert_eq!(counter.rpc_async(bump_later, (1,)).wait().unwrap(), 42);
    assert_eq!(counter.remote(bump_later, (1,)).to_here().unwrap(), 43);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let local = AtomicI64::new(0);
    assert_eq!(rt.block_on(bump_later(&local, 5)), 5);
    drop(counter);
    shutdown_all(rpcs).unwrap();
}

/// A value that cannot be sent: no `Serialize` (a lock and a channel inside).
struct Model {
    weights: std::sync::Mutex<Vec<f32>>,
    _events: std::sync::mpsc::Sender<()>,
}

#[distrpc::function]
fn new_model(n: usize) -> Model {
    Model {
        weights: std::sync::Mutex::new(vec![1.0; n]),
        _events: std::sync::mpsc::channel().0,
    }
}

#[distrpc::function(method)]
fn scale(model: &Model, by: f32) -> f32 {
    let mut w = model.weights.lock().unwrap();
    w.iter_mut().for_each(|x| *x *= by);
    w.iter().sum()
}

/// Regression: a value needed `Serialize` to live behind a reference at all; now only where
/// it is sent (a result of `rpc_sync`, `to_here`), and those say why they cannot.
#[test]
fn a_value_that_cannot_be_sent_lives_behind_a_reference() {
    let rpcs = in_process(2, |_| RpcOptions::default()).unwrap();
    let model = rpcs[0].remote("worker1", new_model, (4,));
    assert_eq!(model.rpc_sync(scale, (2.0,)).unwrap(), 8.0);
    assert_eq!(model.remote(scale, (0.5,)).to_here().unwrap(), 4.0);
    assert!(model.local_value().is_err(), "not the owner");
    // (`rpc_sync(.., new_model, ..)` does not compile: `Model` is not `Deserialize`; a handle by
    // name gets as far as the callee.)
    let by_name = distrpc::Function::<(usize,), i64>::named(new_model.name().to_string());
    let e = rpcs[0].rpc_sync("worker1", &by_name, (1,)).unwrap_err();
    assert!(
        matches!(&e, Error::Remote(r) if r.message.contains("does not implement Serialize")),
        "{e}"
    );
    // On the owner, local_value lends it.
    let local = rpcs[1].remote("worker1", new_model, (3,));
    assert_eq!(
        local.local_value().unwrap().weights.lock().unwrap().len(),
        3
    );
    drop((model, local));
    shutdown_all(rpcs).unwrap();
}
