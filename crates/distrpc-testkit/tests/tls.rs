//! A group over mutual TLS (certificates made as `distrpc cert` makes them): calls, tensors,
//! remote references, nested calls and shutdown work, with and without an auth token inside;
//! a stranger — no TLS, or a certificate of another CA — is closed and cannot join; the group
//! keeps serving.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use distrpc::{DType, Error, RRef, Rpc, RpcOptions, Tensor, builtin};
use distrpc_secure::tls::generate;
use distrpc_testkit::{closed_by_peer, in_process, shutdown_all};
use distrpc_wire::{Kind, OutFrame};

#[distrpc::function]
fn echo(t: Tensor) -> Tensor {
    t
}

/// A nested call: worker `to` asks the next one for the sum of `t`.
#[distrpc::function]
fn sum_via(t: Tensor, to: String) -> Result<Tensor, Error> {
    let rpc = Rpc::current().unwrap();
    rpc.rpc_sync(to.as_str(), builtin::sum, (t,))
}

fn options(dir: &Path, rank: usize) -> RpcOptions {
    let file = |f: String| dir.join(f);
    RpcOptions::default()
        .rpc_timeout(Duration::from_secs(30))
        .tls(
            file("ca.pem".into()),
            file(format!("worker{rank}.pem")),
            file(format!("worker{rank}-key.pem")),
        )
}

fn certs(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), names).unwrap();
    dir
}

fn exercise(rpcs: &[Rpc]) {
    // A tensor large enough to span many TLS records, checked element by element.
    let data: Vec<f32> = (0..(1 << 21)).map(|i| i as f32).collect();
    let t = Tensor::from_vec(vec![1 << 21], data.clone()).unwrap();
    let back = rpcs[0].rpc_sync("worker1", echo, (t,)).unwrap();
    assert_eq!(back.as_slice::<f32>().unwrap(), &data[..]);
    let small = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    let s = rpcs[1]
        .rpc_sync("worker2", sum_via, (small.clone(), "worker0".to_string()))
        .unwrap();
    assert_eq!(s.as_slice::<f32>().unwrap(), &[6.0]);
    let r: RRef<Tensor> = rpcs[2].remote("worker0", builtin::ones, (vec![2, 2], DType::F64));
    assert_eq!(r.to_here().unwrap().as_slice::<f64>().unwrap(), &[1.0; 4]);
    let fs: Vec<_> = (0..50)
        .map(|i| rpcs[i % 3].rpc_async((i + 1) % 3, builtin::neg, (small.clone(),)))
        .collect();
    for f in fs {
        assert_eq!(
            f.wait().unwrap().as_slice::<f32>().unwrap(),
            &[-1.0, -2.0, -3.0]
        );
    }
}

#[test]
fn a_group_over_tls_works_and_shuts_down() {
    let dir = certs(&["worker0", "worker1", "worker2"]);
    let rpcs = in_process(3, |rank| options(dir.path(), rank)).unwrap();
    exercise(&rpcs);
    shutdown_all(rpcs).unwrap();
}

#[test]
fn tls_with_an_auth_token_inside_works() {
    let dir = certs(&["worker0", "worker1", "worker2"]);
    let rpcs = in_process(3, |rank| {
        options(dir.path(), rank).auth_token("a token inside the TLS")
    })
    .unwrap();
    exercise(&rpcs);
    shutdown_all(rpcs).unwrap();
}

#[test]
fn strangers_are_closed_and_cannot_join() {
    let dir = certs(&["worker0", "worker1", "worker2"]);
    let rpcs = in_process(2, |rank| options(dir.path(), rank)).unwrap();
    let addr = rpcs[1].listen_addr();

    // Plain bytes, a real hello: not TLS, closed.
    let payload = distrpc_wire::codec::encode_inline(&(0u32, "worker0")).unwrap();
    let hello = OutFrame::new(Kind::Hello, 0, &payload, &[])
        .unwrap()
        .to_vec();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello).unwrap();
    assert!(closed_by_peer(s), "plain TCP: closed");

    // Another CA's certificate: its worker cannot even join through the store.
    let other = certs(&["worker2"]);
    let first = Rpc::bind(
        "worker0",
        0,
        2,
        options(dir.path(), 0)
            .rpc_timeout(Duration::from_secs(2))
            .init_method("tcp://127.0.0.1:0"),
    )
    .unwrap();
    let method = format!("tcp://{}", first.store_addr().unwrap());
    let err = Rpc::init(
        "worker1",
        1,
        2,
        options(other.path(), 2)
            .rpc_timeout(Duration::from_secs(2))
            .init_method(method),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Rendezvous(m) if m.contains("TLS")),
        "another CA: {err}"
    );
    assert!(first.join().is_err(), "rank 0 saw nobody join");

    // The group serves on.
    let t = Tensor::from_slice(&[5i64]);
    let back = rpcs[0].rpc_sync("worker1", echo, (t,)).unwrap();
    assert_eq!(back.as_slice::<i64>().unwrap(), &[5]);
    shutdown_all(rpcs).unwrap();
}

#[test]
fn missing_or_bad_certificate_files_are_errors_at_init() {
    let err = Rpc::init(
        "w",
        0,
        1,
        RpcOptions::default()
            .tls(
                "/nonexistent/ca.pem",
                "/nonexistent/w.pem",
                "/nonexistent/w-key.pem",
            )
            .init_method("tcp://127.0.0.1:0"),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("/nonexistent/ca.pem")),
        "{err}"
    );
}
