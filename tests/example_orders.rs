//! Runs `examples/orders/run.sh` (the order service and the shipment service, each with its own
//! PostgreSQL database, over one RabbitMQ) and checks that it exits 0 within the time limit and
//! tells the expected story.
//!
//! The script starts the services it needs, builds the examples itself (`cargo build`), and
//! cleans up its processes and queues on any exit. Its output is shown with `--nocapture`, and
//! always when the test fails.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::script::{remove_cargo_test_variables, wait_with_limit};

/// Generous: the script may have to build the examples (and, on a fresh machine, install services).
const LIMIT: Duration = Duration::from_secs(300);

#[test]
fn orders_example_runs_end_to_end() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut command = Command::new("bash");
    command
        .arg("examples/orders/run.sh")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    remove_cargo_test_variables(&mut command);
    let mut child = command.spawn().expect("start bash examples/orders/run.sh");
    let output = Arc::new(Mutex::new(String::new()));
    let readers = [
        echo_lines(child.stdout.take(), Arc::clone(&output)),
        echo_lines(child.stderr.take(), Arc::clone(&output)),
    ];
    let finished = wait_with_limit(&mut child, LIMIT);
    if finished.is_some() {
        // After a timeout, something the script started may still hold the pipes: don't wait.
        for reader in readers {
            let _ = reader.join();
        }
    }
    let output = output.lock().expect("output lock").clone();
    let status = finished.unwrap_or_else(|| {
        panic!("examples/orders/run.sh did not finish within {LIMIT:?}; its output:\n{output}")
    });
    assert!(
        status.success(),
        "examples/orders/run.sh failed ({status}); its output:\n{output}"
    );
    for expected in [
        "[orders] placing 3 orders",
        "order 2 line 4 cancelled (3 x TEA-3)",
        "[orders]   the relay sent it again",
        "message already received; acking without running the callback",
        "order_service publish stopped on SIGTERM, exit status 0",
        "shipment_service subscribe (created) stopped on SIGTERM, exit status 0",
        "shipment_service subscribe (line_cancelled) stopped on SIGTERM, exit status 0",
        "saved=3 duplicates=1 dead_lettered=0",
        "shipment log (4 entries):",
        "cancelled and taken out of the shipment, 1 item(s) left to ship: 1 x MUG-7",
        "shipments (3):",
        "order 2 for grace: 1 x MUG-7, 3 x TEA-3 (cancelled)",
        "messages processed (rows in `received`): 4",
        "delivered twice and processed once",
    ] {
        assert!(
            output.contains(expected),
            "the output of examples/orders/run.sh lacks {expected:?}:\n{output}"
        );
    }
}

/// Print each line as it comes (captured by the test harness unless `--nocapture`) and keep it.
fn echo_lines(
    stream: Option<impl Read + Send + 'static>,
    output: Arc<Mutex<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(stream) = stream else { return };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            println!("{line}");
            let mut output = output.lock().expect("output lock");
            output.push_str(&line);
            output.push('\n');
        }
    })
}
