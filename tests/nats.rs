//! The relay to NATS JetStream, against real nats-servers: the machine's
//! (streams of each test's own) and private ones that are killed.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::nats::{PrivateNats, TestStream, nats_url};
use common::{Backend, TestDb, cli, eventually, settings, signal, status_counts, write_messages};
use outbox_core::entity::published;
use outbox_core::{Relay, Settings, Shutdown, Status, shutdown_channel};
use sea_orm::{ConnectionTrait, EntityTrait};
use uuid::Uuid;

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
    };
}

on_every_backend!(every_row_arrives_once_with_its_headers);

async fn every_row_arrives_once_with_its_headers(backend: Backend) {
    let t = TestDb::new(backend).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    settings.relay.batch_size = 64;

    let message = outbox_core::Message::new(
        "/topic/orders.created",
        serde_json::json!({"id": 1, "name": "café"}),
    )
    .unwrap()
    .with_version("v1")
    .unwrap()
    .with_header("tenant", "acme")
    .unwrap();
    let first = outbox_core::write(&t.db, message).await.unwrap();
    let mut ids = write_messages(&t.db, "/queue/summaries", 299).await;
    ids.push(first.id);

    let report = Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 300);

    let stored = stream.messages().await;
    assert_eq!(stored.len(), 300, "every row once in the stream");
    let by_id: BTreeMap<String, _> = stored
        .iter()
        .map(|m| (m.headers["dop-msg-id"].clone(), m))
        .collect();
    assert_eq!(
        by_id.keys().cloned().collect::<HashSet<_>>(),
        ids.iter().map(Uuid::to_string).collect::<HashSet<_>>(),
        "every row id once"
    );
    for (id, message) in &by_id {
        assert_eq!(
            message.headers.get("Nats-Msg-Id"),
            Some(id),
            "Nats-Msg-Id is the row id"
        );
    }
    let created = by_id[&first.id.to_string()];
    assert_eq!(
        created.subject,
        format!("{}.orders.created.v1", stream.prefix)
    );
    assert_eq!(created.headers["dop-msg-id"], first.id.to_string());
    assert_eq!(
        created.headers["dop-msg-destination"],
        "/topic/orders.created.v1"
    );
    assert_eq!(created.headers["dop-msg-type"], "Published");
    assert_eq!(created.headers["tenant"], "acme");
    assert!(created.headers.contains_key("dop-correlation-id"));
    let body: serde_json::Value = serde_json::from_slice(&created.body).unwrap();
    assert_eq!(body, serde_json::json!({"id": 1, "name": "café"}));
    let summary = by_id[&ids[0].to_string()];
    assert_eq!(summary.subject, format!("{}.summaries", stream.prefix));

    // Sent again (as after a crash before the marks): JetStream keeps one
    // copy, and its duplicate ack still marks the rows sent.
    t.db.execute_unprepared(&format!(
        "UPDATE published SET status = {} ",
        Status::Schedule as i32
    ))
    .await
    .unwrap();
    let again = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(again.published, 300, "duplicate acks count as delivered");
    assert_eq!(stream.count().await, 300, "no second copy in the stream");
}

/// A destination no stream captures is the message's fault: FAILED after its
/// attempts, with the reason, while 10,000 others go through.
#[tokio::test(flavor = "multi_thread")]
async fn a_subject_without_a_stream_fails_alone_while_others_flow() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    // The stream captures <prefix>.good.>; <prefix>.stray.x is nobody's.
    outbox_core::ensure_stream(&{
        let mut narrow = settings.clone();
        narrow.nats.stream_subjects = vec![format!("{}.good.>", stream.prefix)];
        narrow
    })
    .await
    .unwrap();
    settings.relay.max_retry_attempts = 2;
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.relay.wait_retry = Duration::ZERO;
    settings.relay.batch_size = 500;

    let stray = outbox_core::write(
        &t.db,
        outbox_core::Message::new("/topic/stray.x", serde_json::json!({"stray": true})).unwrap(),
    )
    .await
    .unwrap();
    write_messages(&t.db, "/topic/good.orders", 10_000).await;

    let report = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 10_000);
    assert_eq!(report.failed, 1);
    assert_eq!(stream.count().await, 10_000);
    let row = published::Entity::find_by_id(stray.id)
        .one(&t.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, Status::Failed);
    let error = row.last_error.unwrap_or_default();
    assert!(
        error.contains("no JetStream stream captures subject") && error.contains("stray.x"),
        "{error}"
    );
}

/// More rows in flight than async-nats' PubAck slots (5,000 by default, and
/// it waits for a free one without reading acks) must not hang the relay.
#[tokio::test(flavor = "multi_thread")]
async fn a_window_larger_than_the_ack_limit_does_not_hang() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    settings.relay.batch_size = 2_000;
    settings.relay.max_in_flight = 20_000;
    settings.nats.publish_window = 6_000;
    write_messages(&t.db, "/topic/wide", 20_000).await;

    let report = tokio::time::timeout(
        Duration::from_secs(120),
        Relay::new(t.db.clone(), settings).run_until_empty(Shutdown::never()),
    )
    .await
    .expect("the relay finishes instead of hanging")
    .unwrap();
    assert_eq!(report.published, 20_000);
    assert_eq!(stream.count().await, 20_000);
}

/// The server killed (-9) and restarted mid-drain: every row arrives, once
/// (the stream drops re-sent ids), and the outage costs no row an attempt.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_mid_drain_loses_nothing_and_counts_no_attempt() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut server = PrivateNats::start().await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&server.url(), &mut settings).await;
    settings.broker.maximum_backoff = Duration::from_millis(500);
    settings.broker.operation_timeout = Duration::from_secs(5);
    settings.relay.claim_lease = Duration::from_secs(30);
    settings.relay.batch_size = 500;
    settings.relay.max_in_flight = 2_000;
    let ids = write_messages(&t.db, "/topic/restart", 30_000).await;

    let (stop, shutdown) = shutdown_channel();
    let relay = tokio::spawn(Relay::new(t.db.clone(), settings).run(shutdown));
    eventually(
        Duration::from_secs(60),
        "some rows in the stream",
        || async { stream.count().await >= 3_000 },
    )
    .await;
    server.kill().await;
    let before = status_counts(&t.db)
        .await
        .get(&(Status::Succeeded as i32))
        .copied()
        .unwrap_or(0);
    assert!(
        before < 30_000,
        "the server went down mid-drain ({before} rows sent)"
    );
    server.up().await;
    eventually(Duration::from_secs(120), "every row sent", || async {
        status_counts(&t.db).await.get(&(Status::Succeeded as i32)) == Some(&30_000)
    })
    .await;
    stop.trigger();
    relay.await.unwrap().unwrap();

    let stored = stream.messages().await;
    let distinct: HashSet<&str> = stored
        .iter()
        .map(|m| m.headers["dop-msg-id"].as_str())
        .collect();
    assert_eq!(distinct.len(), ids.len(), "every id in the stream");
    assert_eq!(stored.len(), ids.len(), "no id twice in the stream");
    let rows = published::Entity::find().all(&t.db).await.unwrap();
    let retries: i64 = rows.iter().map(|row| i64::from(row.retry)).sum();
    assert_eq!(retries, 0, "an outage counts no attempt");
}

/// kill -9 of the relay mid-drain of 50,000 rows, then a second relay: the
/// rows the first sent without marking go again, and JetStream keeps one copy
/// of each (`Nats-Msg-Id`): every id once in the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_drain_leaves_no_duplicate_in_the_stream() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    let total = 50_000;
    write_messages(&t.db, "/topic/killed", total).await;
    let sent = || async {
        status_counts(&t.db)
            .await
            .get(&(Status::Succeeded as i32))
            .copied()
            .unwrap_or(0)
    };
    let relay = || {
        let mut command = cli(&t.url);
        command
            .env("AMQP_URL", nats_url())
            .env("OUTBOX_NATS_STREAM", &stream.name)
            .env("OUTBOX_NATS_SUBJECT_PREFIX", &stream.prefix)
            .env("OUTBOX_RELAY_BATCH_SIZE", "500")
            .env("OUTBOX_RELAY_MAX_IN_FLIGHT", "2000")
            .env("OUTBOX_RELAY_CLAIM_LEASE", "3")
            .env("OUTBOX_BROKER_OPERATION_TIMEOUT", "2")
            .arg("publish")
            .stderr(std::process::Stdio::null());
        command.spawn().unwrap()
    };
    let mut first = relay();
    eventually(Duration::from_secs(60), "10,000 sent", || async {
        sent().await >= 10_000
    })
    .await;
    signal(&first, "KILL");
    first.wait().await.unwrap();
    let at_kill = sent().await;
    let in_stream_at_kill = stream.count().await;
    assert!(at_kill < total as u64, "killed mid-drain");

    let mut second = relay();
    eventually(Duration::from_secs(120), "every row sent", || async {
        sent().await == total as u64
    })
    .await;
    signal(&second, "TERM");
    assert!(second.wait().await.unwrap().success());

    let stored = stream.messages().await;
    let distinct: HashSet<&str> = stored
        .iter()
        .map(|m| m.headers["dop-msg-id"].as_str())
        .collect();
    eprintln!(
        "relay kill -9: {at_kill} rows marked and {in_stream_at_kill} in the stream at the kill; {} stream entries after",
        stored.len()
    );
    assert_eq!(distinct.len(), total, "every id in the stream");
    assert_eq!(stored.len(), total, "zero duplicate stream entries");
}

// ---- the consumer over JetStream ----

struct Running {
    trigger: outbox_core::ShutdownTrigger,
    task: tokio::task::JoinHandle<outbox_core::ConsumerReport>,
}

impl Running {
    fn start(consumer: outbox_core::Consumer) -> Running {
        let (trigger, shutdown) = shutdown_channel();
        Running {
            trigger,
            task: tokio::spawn(async move { consumer.run(shutdown).await.expect("consumer run") }),
        }
    }

    async fn stop(self) -> outbox_core::ConsumerReport {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("consumer stops")
            .expect("consumer task")
    }
}

/// The durable's unacked and undelivered counts.
/// `dlq list` shows a durable's dead letters in place, with why they
/// failed; `dlq replay` sends them back to their subject, where the
/// consumer runs them (now fixed) once each, and removes them.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_and_replayed() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    settings.consumer.batch_size = 1;
    let fixed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (is_fixed, counter) = (fixed.clone(), runs.clone());
    let consumer = outbox_core::Consumer::new(
        t.db.clone(),
        settings.clone(),
        "/topic/orders.created",
        Some("billing"),
        move |payload: outbox_core::Payload| {
            let (is_fixed, counter) = (is_fixed.clone(), counter.clone());
            async move {
                if payload.body()["bad"] == true {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if !is_fixed.load(std::sync::atomic::Ordering::SeqCst) {
                        return Ok(payload.nack("bad order"));
                    }
                }
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let running = Running::start(consumer);
    let mut bad = Vec::new();
    for n in 0..3 {
        let row = outbox_core::write(
            &t.db,
            outbox_core::Message::new(
                "/topic/orders.created",
                serde_json::json!({ "bad": true, "n": n }),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        bad.push(row.id.to_string());
    }
    write_messages(&t.db, "/topic/orders.created", 20).await;
    Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(120),
        "20 received rows and 3 dead letters",
        || async {
            common::received_count(&t.db).await == 20
                && outbox_core::dead_letters(&settings, "billing", 10)
                    .await
                    .unwrap()
                    .len()
                    == 3
        },
    )
    .await;

    let dlq = |args: &[&str]| {
        let mut command = cli(&t.url);
        command
            .env("AMQP_URL", nats_url())
            .env("OUTBOX_NATS_STREAM", &stream.name)
            .env("OUTBOX_NATS_SUBJECT_PREFIX", &stream.prefix)
            .arg("dlq")
            .args(args);
        command
    };
    let listed = dlq(&["list", "billing"]).output().await.unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8(listed.stdout).unwrap();
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    for (line, id) in lines.iter().zip(&bad) {
        assert!(line.starts_with(id.as_str()), "oldest first: {line}");
        assert!(line.contains("error: bad order"), "{line}");
        assert!(line.contains("copied from billing"), "{line}");
    }
    // Listing took nothing.
    assert_eq!(
        outbox_core::dead_letters(&settings, "billing", 10)
            .await
            .unwrap()
            .len(),
        3
    );

    fixed.store(true, std::sync::atomic::Ordering::SeqCst);
    let replayed = dlq(&["replay", "billing"]).output().await.unwrap();
    assert!(replayed.status.success(), "{replayed:?}");
    assert!(
        String::from_utf8_lossy(&replayed.stdout).contains("replayed 3 dead letter(s) of billing"),
        "{replayed:?}"
    );
    eventually(Duration::from_secs(120), "23 received rows", || async {
        common::received_count(&t.db).await == 23
    })
    .await;
    running.stop().await;
    assert!(
        outbox_core::dead_letters(&settings, "billing", 10)
            .await
            .unwrap()
            .is_empty(),
        "replayed dead letters are removed"
    );
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        6,
        "each bad order ran once failing and once replayed"
    );
}

async fn durable_backlog(url: &str, stream: &str, durable: &str) -> (usize, u64) {
    let jetstream = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer(durable)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_ack_pending, info.num_pending)
}

/// Relay rows to JetStream, consume them with `#[callback]`-style code: one
/// `received` row each, every delivery acked; a message id seen before is
/// acked without running the callback; a nack goes to the dead-letter subject.
#[tokio::test(flavor = "multi_thread")]
async fn the_consumer_saves_once_acks_and_dead_letters() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    // One transaction per message, so every run is counted once (with group
    // commit, a nack makes its batch's other messages run again alone).
    settings.consumer.batch_size = 1;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = runs.clone();
    let consumer = outbox_core::Consumer::new(
        t.db.clone(),
        settings.clone(),
        "/topic/orders.created",
        Some("shipping"),
        move |payload: outbox_core::Payload| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if payload.body()["bad"] == true {
                    return Ok(payload.nack("bad order"));
                }
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    let declared = consumer.declare().await.unwrap();
    assert_eq!(declared.queue, "shipping");
    assert_eq!(
        declared.dead_letter_queue,
        format!("DLQ.{}.shipping", stream.name)
    );
    let running = Running::start(consumer);

    write_messages(&t.db, "/topic/orders.created", 500).await;
    let bad = outbox_core::write(
        &t.db,
        outbox_core::Message::new("/topic/orders.created", serde_json::json!({"bad": true}))
            .unwrap(),
    )
    .await
    .unwrap();
    Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    eventually(Duration::from_secs(180), "500 received rows", || async {
        common::received_count(&t.db).await == 500
    })
    .await;

    // The same message id again, as a second JetStream message (another
    // Nats-Msg-Id, so JetStream keeps both): acked, not run, not stored.
    let again = stream.messages().await.into_iter().next().unwrap();
    let client = async_nats::connect(&stream.url).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in &again.headers {
        if name != "Nats-Msg-Id" {
            headers.insert(name.as_str(), value.as_str());
        }
    }
    async_nats::jetstream::new(client)
        .publish_with_headers(again.subject.clone(), headers, again.body.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(120), "everything acked", || async {
        durable_backlog(&stream.url, &stream.name, "shipping").await == (0, 0)
    })
    .await;
    let report = running.stop().await;
    assert_eq!(common::received_count(&t.db).await, 500);
    assert_eq!(report.duplicates, 1, "{report:?}");
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        501,
        "500 saved and one nacked; the duplicate did not run"
    );

    // The nacked one is in DLQ.<stream>.shipping with why.
    let dlq = async_nats::jetstream::new(async_nats::connect(&stream.url).await.unwrap());
    let dead = dlq
        .get_stream(format!("{}_DLQ", stream.name))
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&format!("DLQ.{}.shipping", stream.name))
        .await
        .unwrap();
    let dead_headers = dead.headers;
    assert_eq!(
        dead_headers.get("dop-msg-id").map(|v| v.as_str()),
        Some(bad.id.to_string().as_str())
    );
    let why = dead_headers
        .get("x-outbox-error")
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    assert!(why.contains("bad order"), "{why}");
}

/// Group commit over JetStream with a batch callback: called once per batch
/// of several messages, it nacks the bad one (→ `DLQ.<stream>.<durable>`,
/// no `received` row) and saves the others in the batch's one transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_callback_runs_per_batch_over_jetstream() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    settings.consumer.batch_size = 50;
    settings.consumer.batch_wait = Duration::from_millis(200);
    let sizes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = sizes.clone();
    let callback = move |batch: outbox_core::Batch| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(batch.len());
            let txn = batch.begin().await?;
            for payload in batch.payloads() {
                if payload.body()["bad"] == true {
                    batch.nack(payload, "bad order")?;
                }
            }
            Ok(batch.save(txn).await?)
        }
    };
    let consumer = outbox_core::Consumer::new(
        t.db.clone(),
        settings.clone(),
        "/topic/orders.created",
        Some("batched"),
        outbox_core::Handler::batch(callback),
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let running = Running::start(consumer);
    write_messages(&t.db, "/topic/orders.created", 199).await;
    let bad = outbox_core::write(
        &t.db,
        outbox_core::Message::new("/topic/orders.created", serde_json::json!({"bad": true}))
            .unwrap(),
    )
    .await
    .unwrap();
    Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "everything acked", || async {
        durable_backlog(&stream.url, &stream.name, "batched").await == (0, 0)
    })
    .await;
    let report = running.stop().await;
    assert_eq!(common::received_count(&t.db).await, 199);
    assert_eq!((report.saved, report.dead_lettered), (199, 1), "{report:?}");
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(
        sizes.iter().sum::<usize>(),
        200,
        "each message in one call: {sizes:?}"
    );
    assert!(
        sizes.iter().any(|size| *size > 1),
        "calls took batches, not single messages: {sizes:?}"
    );
    let dead = async_nats::jetstream::new(async_nats::connect(&stream.url).await.unwrap())
        .get_stream(format!("{}_DLQ", stream.name))
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&format!("DLQ.{}.batched", stream.name))
        .await
        .unwrap();
    assert_eq!(
        dead.headers.get("dop-msg-id").map(|v| v.as_str()),
        Some(bad.id.to_string().as_str())
    );
}

/// The server killed (-9) and restarted while the consumer works: every
/// message is consumed, each stored once.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_restart_mid_consume_consumes_everything_once() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut server = PrivateNats::start().await;
    let mut settings = settings(&t.url);
    let _stream = TestStream::create(&server.url(), &mut settings).await;
    settings.broker.maximum_backoff = Duration::from_millis(500);
    settings.broker.operation_timeout = Duration::from_secs(5);
    let total = 5_000;
    write_messages(&t.db, "/topic/restart.consume", total).await;
    Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();

    let consumer = outbox_core::Consumer::new(
        t.db.clone(),
        settings.clone(),
        "/topic/restart.consume",
        Some("restart"),
        |payload: outbox_core::Payload| async move { Ok(payload.save_alone().await?) },
    )
    .unwrap();
    let running = Running::start(consumer);
    eventually(Duration::from_secs(60), "some consumed", || async {
        common::received_count(&t.db).await >= 500
    })
    .await;
    server.kill().await;
    let at_kill = common::received_count(&t.db).await;
    assert!(
        at_kill < total as u64,
        "the server went down mid-consume ({at_kill})"
    );
    server.up().await;
    eventually(
        Duration::from_secs(120),
        "every message consumed",
        || async { common::received_count(&t.db).await == total as u64 },
    )
    .await;
    running.stop().await;
    assert_eq!(
        common::received_count(&t.db).await,
        total as u64,
        "each once"
    );
}

/// The first drain through an authenticated connection: `ensure_stream`
/// creates the stream, ten rows are relayed, the stream holds ten.
async fn creates_the_stream_and_relays_ten(db: &sea_orm::DatabaseConnection, settings: &Settings) {
    let (change, _) = outbox_core::ensure_stream(settings).await.unwrap();
    assert_eq!(change, outbox_core::StreamChange::Created);
    write_messages(db, "/topic/orders", 10).await;
    let report = Relay::new(db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 10);
    let stream = outbox_core::stream_info(settings).await.unwrap().unwrap();
    assert_eq!(stream.messages, 10);
}

/// A relay the server refuses: it stops with `BrokerRefused`; what it says.
async fn refused(db: &sea_orm::DatabaseConnection, settings: Settings) -> String {
    let err = Relay::new(db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap_err();
    let said = outbox_core::report(&err);
    assert!(
        matches!(err, outbox_core::Error::BrokerRefused { .. }),
        "{said}"
    );
    said
}

/// `nats://user:password@host` authenticates (async-nats itself ignores
/// credentials in the URL); a wrong password stops the relay with the fix,
/// and neither password appears in what it says.
#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_url_work_and_a_wrong_password_is_refused_with_the_fix() {
    const PASSWORD: &str = "Nk7Pa55w0rdMarker";
    let t = TestDb::new(Backend::Sqlite).await;
    let server = PrivateNats::start_with_user("app", PASSWORD).await;
    let mut settings = settings(&t.url);
    settings.broker.url = format!("nats://app:{PASSWORD}@127.0.0.1:{}", server.port);
    settings.nats.stream = "AUTH".to_owned();
    settings.nats.subject_prefix = "auth".to_owned();
    creates_the_stream_and_relays_ten(&t.db, &settings).await;

    write_messages(&t.db, "/topic/orders", 1).await;
    settings.broker.url = format!("nats://app:WrongPa55@127.0.0.1:{}", server.port);
    let said = refused(&t.db, settings).await;
    assert!(said.contains("check the user and password"), "{said}");
    assert!(
        !said.contains(PASSWORD) && !said.contains("WrongPa55"),
        "{said}"
    );
}

/// A server that requires TLS with a private CA and an NKey user: the relay
/// connects with `tls://`, `nats.tls_ca_file` and `nats.nkey_seed_file` and
/// sends; without the CA, or with another NKey, it stops with the fix, and
/// no seed appears in what it says.
#[tokio::test(flavor = "multi_thread")]
async fn tls_with_a_private_ca_and_an_nkey_user() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let public = user.public_key();
    let server = PrivateNats::start_with_config(|dir| {
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=outbox test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        format!(
            "tls {{\n  cert_file: \"{0}/server.pem\"\n  key_file: \"{0}/server.key\"\n}}\n\
             authorization {{\n  users: [ {{ nkey: \"{public}\" }} ]\n}}\n",
            dir.display()
        )
    })
    .await;
    std::fs::write(server.dir().join("user.nk"), &seed).unwrap();
    let t = TestDb::new(Backend::Sqlite).await;
    let mut settings = settings(&t.url);
    settings.broker.url = format!("tls://127.0.0.1:{}", server.port);
    settings.nats.tls_ca_file = Some(server.dir().join("ca.pem"));
    settings.nats.nkey_seed_file = Some(server.dir().join("user.nk"));
    settings.nats.stream = "TLS".to_owned();
    settings.nats.subject_prefix = "tls".to_owned();
    creates_the_stream_and_relays_ten(&t.db, &settings).await;

    write_messages(&t.db, "/topic/orders", 1).await;
    let mut untrusted = settings.clone();
    untrusted.nats.tls_ca_file = None;
    let said = refused(&t.db, untrusted).await;
    assert!(said.contains("nats.tls_ca_file"), "{said}");

    let other = nkeys::KeyPair::new_user().seed().unwrap();
    std::fs::write(server.dir().join("other.nk"), &other).unwrap();
    let mut stranger = settings.clone();
    stranger.nats.nkey_seed_file = Some(server.dir().join("other.nk"));
    let said = refused(&t.db, stranger).await;
    assert!(said.contains("nats.nkey_seed_file"), "{said}");
    assert!(!said.contains(&seed) && !said.contains(&other), "{said}");
}

/// Decentralised auth, as `nsc` sets it up: a server trusting an operator
/// (memory resolver with one account allowed JetStream) and a `.creds` file
/// holding a user JWT and its seed: `ensure_stream` and the drain both
/// authenticate with `nats.credentials_file` alone. A user
/// of an account the server does not know, and a file that is no `.creds`,
/// stop it with the setting named and no seed in what it says.
#[tokio::test(flavor = "multi_thread")]
async fn a_creds_file_with_a_user_jwt_authenticates() {
    let operator = common::nats::Operator::new();
    let server = PrivateNats::start_with_config(|_| operator.server_config()).await;
    let (creds, seed) = operator.user_creds();
    std::fs::write(server.dir().join("user.creds"), &creds).unwrap();
    let t = TestDb::new(Backend::Sqlite).await;
    let mut settings = settings(&t.url);
    settings.broker.url = server.url();
    settings.nats.credentials_file = Some(server.dir().join("user.creds"));
    settings.nats.stream = "CREDS".to_owned();
    settings.nats.subject_prefix = "creds".to_owned();
    creates_the_stream_and_relays_ten(&t.db, &settings).await;

    write_messages(&t.db, "/topic/orders", 1).await;
    let (foreign, foreign_seed) = operator.stranger_creds();
    std::fs::write(server.dir().join("stranger.creds"), &foreign).unwrap();
    let mut stranger = settings.clone();
    stranger.nats.credentials_file = Some(server.dir().join("stranger.creds"));
    let said = refused(&t.db, stranger).await;
    assert!(said.contains("nats.credentials_file"), "{said}");
    assert!(
        !said.contains(&seed) && !said.contains(&foreign_seed),
        "{said}"
    );

    // The seed alone, where the JWT and seed should be.
    std::fs::write(server.dir().join("seed-only.creds"), &seed).unwrap();
    let mut mistaken = settings.clone();
    mistaken.nats.credentials_file = Some(server.dir().join("seed-only.creds"));
    let err = Relay::new(t.db.clone(), mistaken)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap_err();
    let said = outbox_core::report(&err);
    assert!(said.contains("nats.credentials_file"), "{said}");
    assert!(!said.contains(&seed), "{said}");
}

/// A callback slower than the durable's ack wait (2 s here) is not
/// delivered again while it runs: the consumer marks what it holds in
/// progress. (Without that, JetStream redelivers after 2 s and the inbox
/// counts a duplicate.)
#[tokio::test(flavor = "multi_thread")]
async fn a_callback_slower_than_the_ack_wait_is_not_delivered_again() {
    let t = TestDb::new(Backend::Postgres).await;
    let mut settings = settings(&t.url);
    let stream = TestStream::create(&nats_url(), &mut settings).await;
    settings.broker.operation_timeout = Duration::from_secs(2);
    settings.consumer.batch_size = 1;
    // All three pulled at once: two wait behind the slow one.
    settings.consumer.prefetch = 16;
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = runs.clone();
    let consumer = outbox_core::Consumer::new(
        t.db.clone(),
        settings.clone(),
        "/topic/orders.slow",
        Some("slow"),
        move |payload: outbox_core::Payload| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // The work itself takes three ack waits.
                tokio::time::sleep(Duration::from_secs(6)).await;
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let running = Running::start(consumer);
    write_messages(&t.db, "/topic/orders.slow", 3).await;
    Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    eventually(Duration::from_secs(120), "3 received rows", || async {
        common::received_count(&t.db).await == 3
    })
    .await;
    eventually(Duration::from_secs(60), "everything acked", || async {
        durable_backlog(&stream.url, &stream.name, "slow").await == (0, 0)
    })
    .await;
    let report = running.stop().await;
    assert_eq!(
        report.duplicates, 0,
        "delivered again while running: {report:?}"
    );
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
}
