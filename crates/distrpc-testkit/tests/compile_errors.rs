//! What `#[distrpc::function]` refuses, and the message it gives (each case in `tests/ui`).

#[test]
fn misuses_of_the_attribute_are_clear_compile_errors() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
