//! A group with an auth token: its members call each other; a stranger — without the token,
//! or with another — is closed before anything it sends is parsed, cannot join through the
//! store, and the group keeps serving.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use distrpc::{Error, Rpc, RpcOptions};
use distrpc_secure::{Secret, auth};
use distrpc_testkit::{closed_by_peer, in_process, shutdown_all};
use distrpc_wire::{Kind, OutFrame};

const TOKEN: &str = "the group's shared secret";

#[distrpc::function]
fn echo(i: u64) -> u64 {
    i
}

fn opts() -> RpcOptions {
    RpcOptions::default()
        .rpc_timeout(Duration::from_secs(20))
        .auth_token(TOKEN)
}

fn hello(rank: u32, name: &str) -> Vec<u8> {
    let payload = distrpc_wire::codec::encode_inline(&(rank, name)).unwrap();
    OutFrame::new(Kind::Hello, 0, &payload, &[])
        .unwrap()
        .to_vec()
}

/// Runs the dialer's half of the handshake over a blocking socket, through a small runtime.
fn dial(s: TcpStream, secret: &Secret) -> Result<TcpStream, distrpc_secure::AuthError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        s.set_nonblocking(true).unwrap();
        let mut stream = tokio::net::TcpStream::from_std(s).unwrap();
        auth::dial(&mut stream, secret).await?;
        let s = stream.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        Ok(s)
    })
}

#[test]
fn members_call_each_other_and_strangers_are_closed() {
    let rpcs = in_process(2, |_| opts()).unwrap();
    assert_eq!(rpcs[0].rpc_sync("worker1", echo, (1,)).unwrap(), 1);
    assert_eq!(rpcs[1].rpc_sync("worker0", echo, (2,)).unwrap(), 2);
    let addr = rpcs[1].listen_addr();

    // A real hello, and a call after it, from someone without the token.
    let call = OutFrame::new(Kind::Call, 1, b"\x00", &[]).unwrap().to_vec();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&[hello(0, "worker0"), call].concat()).unwrap();
    assert!(closed_by_peer(s), "no token: closed");

    // Someone with another group's token: the worker's proof does not check out for it, and
    // the worker closes the connection once it gets no proof back.
    let other = Secret::new("another group's secret").unwrap();
    let err = dial(TcpStream::connect(addr).unwrap(), &other).unwrap_err();
    assert!(matches!(err, distrpc_secure::AuthError::Rejected), "{err}");

    // The same token: admitted, and then it is a worker like any other (the hello is checked).
    let secret = Secret::new(TOKEN).unwrap();
    let mut s = dial(TcpStream::connect(addr).unwrap(), &secret).unwrap();
    s.write_all(&hello(0, "mallory")).unwrap();
    assert!(
        closed_by_peer(s),
        "an unknown name after the handshake: closed"
    );

    for i in 0..3 {
        assert_eq!(rpcs[0].rpc_sync("worker1", echo, (i,)).unwrap(), i);
    }
    shutdown_all(rpcs).unwrap();
}

#[test]
fn a_worker_without_the_token_cannot_join() {
    let short = || opts().rpc_timeout(Duration::from_secs(2));
    let first = Rpc::bind("w0", 0, 2, short().init_method("tcp://127.0.0.1:0")).unwrap();
    let method = format!("tcp://{}", first.store_addr().unwrap());
    let waiting = thread::spawn(move || first.join());

    let err = Rpc::init(
        "w1",
        1,
        2,
        RpcOptions::default()
            .rpc_timeout(Duration::from_secs(2))
            .auth_token("another group's secret")
            .init_method(method.clone()),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Rendezvous(m) if m.contains("auth")),
        "another token: {err}"
    );
    let err = Rpc::init(
        "w1",
        1,
        2,
        RpcOptions::default()
            .rpc_timeout(Duration::from_secs(2))
            .init_method(method),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Rendezvous(m) if m.contains("set the group's auth token")),
        "no token: {err}"
    );

    // Rank 0 saw nobody join.
    let err = waiting.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, Error::Rendezvous(m) if m.contains("[\"1\"]")),
        "{err}"
    );
}

#[test]
fn a_short_token_is_refused_at_init() {
    let err = Rpc::init(
        "w",
        0,
        1,
        RpcOptions::default()
            .auth_token("short")
            .init_method("tcp://127.0.0.1:0"),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("at least 16 bytes")),
        "{err}"
    );
}
