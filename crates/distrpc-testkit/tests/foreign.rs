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
