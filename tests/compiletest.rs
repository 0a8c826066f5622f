//! trybuild: how `#[derive(Publish)]` rejects bad input. Only failing cases
//! here, so trybuild checks its project instead of building it (a build
//! compiles every dependency again in its own target directory); what the
//! derive accepts is `derive_pass.rs`, compiled with the suite.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("ui/fail/*.rs");
}
