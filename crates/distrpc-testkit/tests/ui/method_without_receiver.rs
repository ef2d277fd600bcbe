// A method's first parameter is the referenced value.
#[distrpc::function(method)]
fn bump(by: i64) -> i64 {
    by
}

fn main() {}
