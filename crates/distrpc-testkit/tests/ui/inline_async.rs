// `inline` is for sync functions.
#[distrpc::function(inline)]
async fn later(x: i64) -> i64 {
    x
}

fn main() {}
