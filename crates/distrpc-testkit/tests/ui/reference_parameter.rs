// A remote function's parameters arrive by value.
#[distrpc::function]
fn greet(name: &str) -> String {
    format!("hello {name}")
}

fn main() {}
