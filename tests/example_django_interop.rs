//! Runs `examples/django_interop.sh` (the Rust service and the Python django-outbox-pattern
//! service exchanging events both ways) and fails unless it exits 0 within the time limit.
//!
//! The script builds and runs the example itself (`cargo build`/`cargo run`), sets up the Python
//! side with `tests/interop/setup.sh`, and prints its story; its output is shown as is.

use std::process::Command;
use std::time::{Duration, Instant};

/// Generous: the script may have to build the example and create the Python virtualenv.
const LIMIT: Duration = Duration::from_secs(600);

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/django_interop.sh");
    let mut command = Command::new("bash");
    command.arg(script);
    // The script runs cargo. Without the variables cargo set for this test, that inner cargo
    // sees the environment of an ordinary build: build scripts that watch one of them (ring
    // watches CARGO_MANIFEST_DIR) would otherwise be rebuilt here and again by the next build.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_BIN_NAME",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let mut child = command
        .spawn()
        .expect("start bash examples/django_interop.sh");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break status;
        }
        if started.elapsed() > LIMIT {
            // SIGTERM lets the script's EXIT trap stop the Python and Rust processes it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(15));
            let _ = child.kill();
            let _ = child.wait();
            panic!("examples/django_interop.sh did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "examples/django_interop.sh failed ({status})"
    );
}
