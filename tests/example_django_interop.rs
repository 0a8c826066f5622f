//! Runs `examples/django_interop.sh` (the Rust service and the Python django-outbox-pattern
//! service exchanging events both ways) and fails unless it exits 0 within the time limit.
//!
//! The script builds and runs the example itself (`cargo build`/`cargo run`), sets up the Python
//! side with `tests/interop/setup.sh`, and prints its story; its output is shown as is.

mod common;

use std::process::Command;
use std::time::Duration;

use common::script::{remove_cargo_test_variables, wait_with_limit};

/// Generous: the script may have to build the example and create the Python virtualenv.
const LIMIT: Duration = Duration::from_secs(600);

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/django_interop.sh");
    let mut command = Command::new("bash");
    command.arg(script);
    remove_cargo_test_variables(&mut command);
    let mut child = command
        .spawn()
        .expect("start bash examples/django_interop.sh");
    let Some(status) = wait_with_limit(&mut child, LIMIT) else {
        panic!("examples/django_interop.sh did not finish within {LIMIT:?}");
    };
    assert!(
        status.success(),
        "examples/django_interop.sh failed ({status})"
    );
}
