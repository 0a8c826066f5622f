//! The `outbox-cli` binary: errors, signals, status, failed rows, dead letters, metrics.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::amqp::TestBroker;
use common::{
    Backend, TestDb, cli, eventually, received_count, settings, signal, status_counts,
    write_messages,
};
use outbox_core::{Consumer, Payload, Relay, Shutdown, Status, shutdown_channel};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

async fn run(mut command: tokio::process::Command) -> (bool, String, String) {
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the command finishes")
        .expect("run outbox-cli");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_input_gives_a_clear_error_and_exit_1() {
    let t = TestDb::new(Backend::Sqlite).await;

    let mut command = cli(&t.url);
    command
        .env("OUTBOX_RELAY_BATCH_SIZE", "lots")
        .args(["publish", "--until-empty"]);
    let (ok, _, stderr) = run(command).await;
    assert!(!ok);
    assert!(
        stderr.contains("relay.batch_size")
            && stderr.contains("\"lots\"")
            && stderr.contains("whole number"),
        "{stderr}"
    );

    let mut command = cli(&t.url);
    command.args(["subscribe", "my_app::nope", "/topic/x"]);
    let (ok, _, stderr) = run(command).await;
    assert!(!ok);
    assert!(
        stderr.contains("no callback registered as `my_app::nope`")
            && stderr.contains("outbox_cli::callbacks::json_lines")
            && stderr.contains("add `use my_app as _;`"),
        "{stderr}"
    );

    let mut command = cli(&t.url);
    command.args(["subscribe", "outbox_cli::callbacks::json_lines", "/topik/x"]);
    let (ok, _, stderr) = run(command).await;
    assert!(!ok);
    assert!(
        stderr.contains("invalid destination `/topik/x`"),
        "{stderr}"
    );

    let mut command = cli(&t.url);
    command.env_remove("DATABASE_URL").args(["migrate"]);
    let (ok, _, stderr) = run(command).await;
    assert!(!ok);
    assert!(
        stderr.contains("missing setting `database.url`") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );

    let dir = std::env::temp_dir().join(format!("outbox-cfg-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("outbox.toml");
    std::fs::write(&file, "[relay]\nbatchsize = 5\n").unwrap();
    let mut command = cli(&t.url);
    command.arg("--config").arg(&file).args(["status"]);
    let (ok, _, stderr) = run(command).await;
    assert!(!ok);
    assert!(
        stderr.contains("unknown setting `relay.batchsize`") && stderr.contains("relay.batch_size"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn migrate_and_status_on_every_backend() {
    for backend in common::ALL_BACKENDS {
        let t = TestDb::new(backend).await;
        let mut command = cli(&t.url);
        command.arg("migrate");
        let (ok, _, stderr) = run(command).await;
        assert!(ok, "{backend:?}: {stderr}");
        write_messages(&t.db, "/topic/status.a", 3).await;
        write_messages(&t.db, "/topic/status.b", 2).await;

        let mut command = cli(&t.url);
        command.args(["status", "--json"]);
        let (ok, stdout, stderr) = run(command).await;
        assert!(ok, "{backend:?}: {stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(status["pending"], 5, "{backend:?}: {stdout}");
        assert_eq!(status["destinations"][0]["destination"], "/topic/status.a");
        assert_eq!(status["destinations"][0]["schedule"], 3);
        assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);

        let mut command = cli(&t.url);
        command.arg("status");
        let (ok, stdout, _) = run(command).await;
        assert!(
            ok && stdout.contains("/topic/status.b") && stdout.contains("oldest pending"),
            "{stdout}"
        );
    }
}

#[tokio::test]
async fn failed_rows_can_be_listed_retried_and_discarded() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let exchange = format!("late-{}", Uuid::new_v4().simple());
    write_messages(&t.db, &format!("/exchange/{exchange}/k"), 3).await;
    let mut settings = settings(&t.url);
    settings.relay.max_retry_attempts = 1;
    let report = Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.failed, 3);

    let mut command = cli(&t.url);
    command.args(["failed", "list", "--json"]);
    let (ok, stdout, _) = run(command).await;
    assert!(ok);
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert!(
        rows[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{}",
        rows[0]
    );
    let first = rows[0]["id"].as_str().unwrap().to_owned();
    let second = rows[1]["id"].as_str().unwrap().to_owned();

    let mut command = cli(&t.url);
    command.args(["failed", "show", &first]);
    let (ok, stdout, _) = run(command).await;
    assert!(
        ok && stdout.contains(&first) && stdout.contains("\"status\": \"failed\""),
        "{stdout}"
    );

    let mut command = cli(&t.url);
    command.args(["failed", "discard", &second]);
    let (ok, _, stderr) = run(command).await;
    assert!(
        ok && stderr.contains("FAILED message discarded"),
        "{stderr}"
    );

    // the exchange now exists: retried rows go through
    let channel = broker.connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let queue = broker.bound_queue(&exchange, "k").await;
    let mut command = cli(&t.url);
    command.args(["failed", "retry", "--all"]);
    let (ok, stdout, _) = run(command).await;
    assert!(
        ok && stdout.contains("2 row(s) scheduled again"),
        "{stdout}"
    );
    let report = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 2);
    assert_eq!(
        broker.take(&queue, 3, Duration::from_secs(2)).await.len(),
        2
    );
    assert_eq!(
        status_counts(&t.db).await.get(&Status::Succeeded.code()),
        Some(&2)
    );

    let mut command = cli(&t.url);
    command.args(["failed", "retry", &Uuid::new_v4().to_string()]);
    let (ok, _, stderr) = run(command).await;
    assert!(
        !ok && stderr.contains("no failed outbox row with id"),
        "{stderr}"
    );
    broker.delete_queue(&queue).await;
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_can_be_listed_and_replayed() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = format!("cli.dlq.{}", Uuid::new_v4().simple());
    let destination = format!("/topic/{rk}");
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = std::sync::Arc::clone(&refuse);
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &destination,
        None,
        move |payload: Payload| {
            let refuse = flag.load(std::sync::atomic::Ordering::SeqCst);
            async move {
                if refuse {
                    Ok(payload.nack("not today"))
                } else {
                    Ok(payload.save_alone().await?)
                }
            }
        },
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let (stop, shutdown) = shutdown_channel();
    let running = tokio::spawn(consumer.run(shutdown));
    for n in 0..5 {
        broker
            .send(
                "amq.topic",
                &rk,
                format!("{{\"n\": {n}}}").as_bytes(),
                &[("dop-msg-id", &format!("dlq-{n}"))],
            )
            .await;
    }
    let dlq = format!("DLQ.{rk}");
    eventually(Duration::from_secs(10), "five dead letters", || async {
        broker.message_count(&dlq).await == 5
    })
    .await;

    let mut command = cli(&t.url);
    command.args(["dlq", "list", &rk, "--json"]);
    let (ok, stdout, stderr) = run(command).await;
    assert!(ok, "{stderr}");
    let letters: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 5);
    assert_eq!(letters[0]["msg_id"], "dlq-0");
    assert_eq!(
        letters[0]["death"],
        format!("copied from {rk}"),
        "{}",
        letters[0]
    );
    assert_eq!(
        letters[0]["error"], "not today",
        "the reason travels with the dead letter: {}",
        letters[0]
    );
    assert_eq!(
        broker.message_count(&dlq).await,
        5,
        "listing leaves them in place"
    );

    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut command = cli(&t.url);
    command.args(["dlq", "replay", &rk]);
    let (ok, stdout, stderr) = run(command).await;
    assert!(
        ok && stdout.contains("replayed 5 dead letter(s)"),
        "{stdout} {stderr}"
    );
    eventually(
        Duration::from_secs(10),
        "replayed messages saved",
        || async { received_count(&t.db).await == 5 },
    )
    .await;
    assert_eq!(broker.message_count(&dlq).await, 0);

    let missing = format!("cli.nosuch.{}", Uuid::new_v4().simple());
    let mut command = cli(&t.url);
    command.args(["dlq", "replay", &missing]);
    let (ok, _, stderr) = run(command).await;
    assert!(
        !ok && stderr.contains(&format!("queue `DLQ.{missing}` does not exist")),
        "{stderr}"
    );

    stop.trigger();
    running.await.unwrap().unwrap();
    broker.delete_queue(&rk).await;
    broker.delete_queue(&dlq).await;
}

/// SIGTERM mid-drain: clean exit 0; a restart finishes; nothing is sent twice
/// (the in-flight batch is confirmed and marked, the pre-claimed one given back).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_drain_exits_cleanly_and_a_restart_finishes() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = format!("cli.term.{}", Uuid::new_v4().simple());
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let total = 30_000;
    write_messages(&t.db, &format!("/topic/{rk}"), total).await;

    let mut command = cli(&t.url);
    command
        .args(["publish", "--metrics-addr", "127.0.0.1:0"])
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    eventually(Duration::from_secs(30), "some rows sent", || async {
        status_counts(&t.db)
            .await
            .get(&Status::Succeeded.code())
            .copied()
            .unwrap_or(0)
            > 2_000
    })
    .await;
    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    let sent_before = status_counts(&t.db)
        .await
        .get(&Status::Succeeded.code())
        .copied()
        .unwrap_or(0);
    assert!(sent_before < total as u64, "stopped mid-drain");

    let mut command = cli(&t.url);
    command.args(["publish", "--until-empty"]);
    let (ok, _, stderr) = run(command).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        status_counts(&t.db).await.get(&Status::Succeeded.code()),
        Some(&(total as u64))
    );
    let received = broker.take(&queue, total + 1, Duration::from_secs(3)).await;
    let distinct: std::collections::HashSet<&str> = received
        .iter()
        .map(|m| m.headers["dop-msg-id"].as_str())
        .collect();
    assert_eq!(distinct.len(), total, "every message arrived");
    let duplicates = received.len() - total;
    eprintln!(
        "SIGTERM after {sent_before} of {total} sent; duplicates after restart: {duplicates}"
    );
    assert!(
        duplicates <= 200,
        "duplicates after SIGTERM: {duplicates} (at most one batch)"
    );
    broker.delete_queue(&queue).await;
}

/// `--metrics-addr` serves Prometheus text with the relay's counters.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_serves_prometheus_text() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = format!("cli.metrics.{}", Uuid::new_v4().simple());
    let queue = broker.bound_queue("amq.topic", &rk).await;
    write_messages(&t.db, &format!("/topic/{rk}"), 25).await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut command = cli(&t.url);
    command
        .args(["publish", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let fetch = || async move {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        socket.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    eventually(
        Duration::from_secs(20),
        "metrics show 25 published",
        || async {
            fetch()
                .await
                .is_some_and(|body| body.contains("outbox_published_total 25"))
        },
    )
    .await;
    let body = fetch().await.unwrap();
    assert!(
        body.contains("# TYPE outbox_publish_latency_seconds histogram"),
        "{body}"
    );
    assert!(
        body.contains("outbox_publish_latency_seconds_count 25"),
        "{body}"
    );
    assert!(body.contains("outbox_failed_total 0"), "{body}");
    signal(&child, "TERM");
    assert!(child.wait().await.unwrap().success());
    broker.delete_queue(&queue).await;
}
