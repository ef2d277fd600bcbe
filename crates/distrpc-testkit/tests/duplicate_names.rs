//! Two functions under one name (a binary of its own: every worker in it fails to init).

#![allow(clippy::unwrap_used)]

use distrpc::{Rpc, RpcOptions};

#[distrpc::function(name = "shared::name")]
fn first() -> i64 {
    1
}

#[distrpc::function(name = "shared::name")]
fn second() -> i64 {
    2
}

fn init(options: RpcOptions) -> String {
    let options = options.init_method("tcp://127.0.0.1:0");
    Rpc::init("worker0", 0, 1, options).unwrap_err().to_string()
}

/// Regression: the second registration silently replaced the first.
#[test]
fn two_functions_under_one_name_fail_init_naming_both() {
    let e = init(RpcOptions::default());
    assert!(e.contains("\"shared::name\""), "{e}");
    assert!(e.contains("duplicate_names::first"), "{e}");
    assert!(e.contains("duplicate_names::second"), "{e}");
    assert_eq!((first(), second()), (1, 2), "both stay callable locally");
}
