//! Running the example scripts (`bash examples/…sh`) from a test.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// The scripts run cargo. Without the variables cargo set for this test, that inner cargo sees
/// the environment of an ordinary build: build scripts that watch one of them (ring watches
/// CARGO_MANIFEST_DIR) would otherwise be rebuilt here and again by the next build.
pub fn remove_cargo_test_variables(command: &mut Command) {
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
}

/// The exit status, or `None` after `limit`: then the script gets SIGTERM (its EXIT trap stops
/// the processes it started and deletes its queues) and, 20 s later, SIGKILL.
pub fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            return Some(status);
        }
        if started.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let grace = Instant::now();
            while grace.elapsed() < Duration::from_secs(20) {
                if child.try_wait().ok().flatten().is_some() {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
