//! The reliability suite: nothing is lost under faults. Real services, real
//! processes, bounded in time. Servers that are stopped, killed or restarted
//! are private ones of the test (a RabbitMQ node, a PostgreSQL cluster on a
//! free port): the machine's own services are never touched. Each test holds
//! `SERIAL` so the heavy drains do not compete for the two cores. Figures go
//! to stderr for docs/RELIABILITY.md.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::amqp::TestBroker;
use common::private::{Private, Server};
use common::{
    Backend, TestDb, cli, eventually, received_count, settings, signal, status_counts,
    write_messages,
};
use outbox_core::entity::{published, received};
use outbox_core::{Consumer, ConsumerReport, Payload, Relay, Settings, Status, shutdown_channel};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use uuid::Uuid;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A consumer that saves every message into its own database.
struct Inbox {
    db: TestDb,
    metrics: Arc<outbox_core::Metrics>,
    stop: outbox_core::ShutdownTrigger,
    task: JoinHandle<outbox_core::Result<ConsumerReport>>,
    queue: String,
}

impl Inbox {
    async fn start(destination: &str, tune: impl FnOnce(&mut Settings)) -> Inbox {
        Inbox::start_on(TestDb::new(Backend::Postgres).await, destination, tune).await
    }

    async fn start_on(db: TestDb, destination: &str, tune: impl FnOnce(&mut Settings)) -> Inbox {
        let mut settings = settings(&db.url);
        settings.consumer.prefetch = 100;
        settings.consumer.concurrency = 8;
        tune(&mut settings);
        let consumer = Consumer::new(
            db.db.clone(),
            settings,
            destination,
            None,
            |payload: Payload| async move {
                if payload.body().get("poison").is_some() {
                    return Err("poison message".into());
                }
                let txn = payload.begin().await?;
                Ok(payload.save(txn).await?)
            },
        )
        .unwrap();
        let metrics = Arc::new(outbox_core::Metrics::default());
        let consumer = consumer.with_metrics(Arc::clone(&metrics));
        let queue = consumer.queue().to_owned();
        consumer.declare().await.unwrap();
        let (stop, shutdown) = shutdown_channel();
        let task = tokio::spawn(consumer.run(shutdown));
        Inbox {
            db,
            metrics,
            stop,
            task,
            queue,
        }
    }

    async fn wait_for(&self, n: u64, limit: Duration) {
        eventually(limit, &format!("{n} messages in the inbox"), || async {
            received_count(&self.db.db).await >= n
        })
        .await;
    }

    async fn stop(self, broker: &TestBroker) -> (ConsumerReport, TestDb) {
        self.stop.trigger();
        let report = tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        broker.delete_queue(&self.queue).await;
        broker.delete_queue(&format!("DLQ.{}", self.queue)).await;
        (report, self.db)
    }
}

/// Every outbox row id is in the inbox exactly once.
async fn assert_exactly_once(outbox: &TestDb, inbox: &TestDb, n: usize) {
    let sent: HashSet<String> = published::Entity::find()
        .all(&outbox.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    let rows = received::Entity::find().all(&inbox.db).await.unwrap();
    let ids: Vec<String> = rows.into_iter().filter_map(|r| r.msg_id).collect();
    let distinct: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(sent.len(), n);
    assert_eq!(ids.len(), n, "each message stored once");
    assert_eq!(distinct, sent, "every message arrived");
}

fn unique_topic() -> String {
    format!("/topic/reliability.{}", Uuid::new_v4().simple())
}

/// kill -9 of a relay in the middle of a 50,000-row drain, then a restart:
/// every message arrives at least once and the consumer stores each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_mid_drain() {
    let _serial = SERIAL.lock().await;
    let broker = TestBroker::connect().await;
    let outbox = TestDb::new(Backend::Postgres).await;
    let destination = unique_topic();
    let inbox = Inbox::start(&destination, |_| {}).await;
    let total = 50_000;
    write_messages(&outbox.db, &destination, total).await;

    let relay = |outbox: &TestDb| {
        let mut command = cli(&outbox.url);
        command
            .env("OUTBOX_RELAY_BATCH_SIZE", "500")
            .env("OUTBOX_RELAY_MAX_IN_FLIGHT", "1000")
            .env("OUTBOX_RELAY_CLAIM_LEASE", "3")
            .env("OUTBOX_BROKER_OPERATION_TIMEOUT", "2")
            .arg("publish")
            .stderr(Stdio::null());
        command.spawn().unwrap()
    };
    let started = Instant::now();
    let mut first = relay(&outbox);
    eventually(Duration::from_secs(60), "10,000 sent", || async {
        status_counts(&outbox.db)
            .await
            .get(&Status::Succeeded.code())
            .copied()
            .unwrap_or(0)
            >= 10_000
    })
    .await;
    signal(&first, "KILL");
    first.wait().await.unwrap();
    let sent_at_kill = status_counts(&outbox.db)
        .await
        .get(&Status::Succeeded.code())
        .copied()
        .unwrap_or(0);

    let mut second = relay(&outbox);
    eventually(Duration::from_secs(120), "every row sent", || async {
        status_counts(&outbox.db)
            .await
            .get(&Status::Succeeded.code())
            .copied()
            .unwrap_or(0)
            == total as u64
    })
    .await;
    signal(&second, "TERM");
    assert!(second.wait().await.unwrap().success());
    inbox.wait_for(total as u64, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await; // let stray duplicates land
    let (report, inbox_db) = inbox.stop(&broker).await;

    assert_exactly_once(&outbox, &inbox_db, total).await;
    eprintln!(
        "kill -9: {sent_at_kill} of {total} confirmed at the kill; duplicates delivered {}; end to end {elapsed:?}",
        report.duplicates
    );
    // What the killed relay had sent without marking: rows in flight plus the
    // round being marked, which the relay keeps under relay.max_in_flight.
    assert!(
        report.duplicates <= 1_000,
        "at most relay.max_in_flight (1,000) comes again: {}",
        report.duplicates
    );
}

/// Drain 20,000 rows into a consumer and run `outage` once a quarter is sent
/// and some are consumed: every row is stored once, and no attempt is burned.
/// `outbox` and the inbox live where `admin` says (a private cluster, for a
/// PostgreSQL outage); relay and consumer use `broker_url`.
async fn survives_an_outage<F, Fut>(what: &str, admin: Option<&str>, broker_url: &str, outage: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let new_db = || async {
        match admin {
            Some(admin) => TestDb::on_postgres(admin).await,
            None => TestDb::new(Backend::Postgres).await,
        }
    };
    let outbox = new_db().await;
    let destination = unique_topic();
    let url = broker_url.to_owned();
    let inbox = Inbox::start_on(new_db().await, &destination, |s| {
        s.consumer.concurrency = 2;
        s.broker.url = url;
    })
    .await;
    let total = 20_000;
    write_messages(&outbox.db, &destination, total).await;

    let (stop_relay, shutdown) = shutdown_channel();
    let mut relay_settings = settings(&outbox.url);
    relay_settings.broker.url = broker_url.to_owned();
    let relay = tokio::spawn(Relay::new(outbox.db.clone(), relay_settings).run(shutdown));
    eventually(
        Duration::from_secs(60),
        "a quarter sent and some consumed",
        || async {
            status_counts(&outbox.db)
                .await
                .get(&Status::Succeeded.code())
                .copied()
                .unwrap_or(0)
                >= 5_000
                && received_count(&inbox.db.db).await >= 1_000
        },
    )
    .await;
    let started = Instant::now();
    outage().await;
    eventually(Duration::from_secs(180), "every row sent", || async {
        status_counts(&outbox.db)
            .await
            .get(&Status::Succeeded.code())
            .copied()
            .unwrap_or(0)
            == total as u64
    })
    .await;
    inbox.wait_for(total as u64, Duration::from_secs(180)).await;
    let recovered = started.elapsed();
    stop_relay.trigger();
    let relay_report = relay.await.unwrap().unwrap();
    let broker = TestBroker::connect_to(broker_url).await;
    let (report, inbox_db) = inbox.stop(&broker).await;

    assert_exactly_once(&outbox, &inbox_db, total).await;
    let burned = published::Entity::find()
        .filter(published::Column::Retry.ne(0))
        .all(&outbox.db)
        .await
        .unwrap();
    assert!(
        burned.is_empty(),
        "an outage burns no attempts: {} rows have retry > 0",
        burned.len()
    );
    eprintln!(
        "{what}: all {total} delivered {recovered:?} after the outage began; relay confirmed {} (resent {}), consumer duplicates {}",
        relay_report.published,
        relay_report.published.saturating_sub(total as u64),
        report.duplicates
    );
}

/// A private RabbitMQ node stopped and started in the middle of a drain and of a consume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_restart_mid_drain_and_mid_consume() {
    let _serial = SERIAL.lock().await;
    let node = Private::start(Server::Rabbitmq, &[]).await;
    let url = node.amqp_url("guest", "guest");
    survives_an_outage("RabbitMQ restart", None, &url, || async {
        node.stop().await;
        node.up().await;
    })
    .await;
}

/// A private RabbitMQ node killed with SIGKILL mid-drain, then started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_killed_mid_drain() {
    let _serial = SERIAL.lock().await;
    let node = Private::start(Server::Rabbitmq, &[]).await;
    let url = node.amqp_url("guest", "guest");
    survives_an_outage("RabbitMQ kill -9", None, &url, || async {
        node.kill().await;
        node.up().await;
    })
    .await;
}

/// A private PostgreSQL cluster (the relay's and the consumer's database)
/// restarted mid-drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restart_mid_drain() {
    let _serial = SERIAL.lock().await;
    let cluster = Private::start(Server::Postgres, &["-c", "max_connections=60"]).await;
    let admin = cluster.postgres_url("postgres");
    survives_an_outage(
        "PostgreSQL restart",
        Some(&admin),
        &common::amqp_url(),
        || async {
            cluster.stop().await;
            // The outage itself: two seconds without a database.
            tokio::time::sleep(Duration::from_secs(2)).await;
            cluster.up().await;
        },
    )
    .await;
}

/// A poison message (the callback always fails) goes to the DLQ; the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_message_goes_to_the_dlq_and_the_rest_flows() {
    let _serial = SERIAL.lock().await;
    let broker = TestBroker::connect().await;
    let outbox = TestDb::new(Backend::Postgres).await;
    let destination = unique_topic();
    let inbox = Inbox::start(&destination, |_| {}).await;
    write_messages(&outbox.db, &destination, 500).await;
    outbox_core::write(
        &outbox.db,
        outbox_core::Message::new(&destination, serde_json::json!({"poison": true})).unwrap(),
    )
    .await
    .unwrap();
    write_messages(&outbox.db, &destination, 499).await;
    let report = Relay::new(outbox.db.clone(), settings(&outbox.url))
        .run_until_empty(outbox_core::Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 1_000);
    inbox.wait_for(999, Duration::from_secs(60)).await;
    let dlq = format!("DLQ.{}", inbox.queue);
    eventually(Duration::from_secs(10), "poison in the DLQ", || async {
        broker.message_count(&dlq).await == 1
    })
    .await;
    let dead = broker.take(&dlq, 1, Duration::from_secs(2)).await;
    assert_eq!(dead[0].body, serde_json::json!({"poison": true}));
    let (report, inbox_db) = inbox.stop(&broker).await;
    assert_eq!((report.saved, report.dead_lettered), (999, 1));
    assert_eq!(received_count(&inbox_db.db).await, 999);
}

/// Malformed input: clear errors, no crash loop, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_input_is_handled() {
    let _serial = SERIAL.lock().await;
    let broker = TestBroker::connect().await;
    let outbox = TestDb::new(Backend::Postgres).await;
    let destination = unique_topic();
    let rk = destination.trim_start_matches("/topic/").to_owned();
    let inbox = Inbox::start(&destination, |_| {}).await;

    // A 10 MiB body and a message to an exchange that does not exist.
    let big = "x".repeat(10 * 1024 * 1024);
    outbox_core::write(
        &outbox.db,
        outbox_core::Message::new(&destination, serde_json::json!({"big": big})).unwrap(),
    )
    .await
    .unwrap();
    let lost = outbox_core::write(
        &outbox.db,
        outbox_core::Message::new("/exchange/no-such-exchange/x", serde_json::json!({})).unwrap(),
    )
    .await
    .unwrap();
    write_messages(&outbox.db, &destination, 10).await;
    let mut relay_settings = settings(&outbox.url);
    relay_settings.relay.max_retry_attempts = 3;
    relay_settings.relay.pause_for_retry = Duration::ZERO;
    let report = Relay::new(outbox.db.clone(), relay_settings)
        .run_until_empty(outbox_core::Shutdown::never())
        .await
        .unwrap();
    assert_eq!(
        (report.published, report.failed),
        (11, 1),
        "the bad exchange fails alone, after its attempts"
    );
    let failed = published::Entity::find_by_id(lost.id)
        .one(&outbox.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status, Status::Failed);
    assert!(
        failed
            .last_error
            .unwrap()
            .contains("exchange `no-such-exchange` does not exist")
    );

    // Straight to the queue: not JSON, and no id at all.
    broker.send("amq.topic", &rk, b"\xff not json {", &[]).await;
    inbox.wait_for(12, Duration::from_secs(60)).await;
    let rows = received::Entity::find().all(&inbox.db.db).await.unwrap();
    let big_row = rows
        .iter()
        .find(|r| r.body.as_ref().is_some_and(|b| b.get("big").is_some()))
        .expect("10 MiB body stored");
    assert_eq!(
        big_row.body.as_ref().unwrap()["big"]
            .as_str()
            .unwrap()
            .len(),
        10 * 1024 * 1024
    );
    let raw = rows
        .iter()
        .find(|r| r.msg_id.is_none())
        .expect("the id-less message is processed");
    assert!(
        raw.body
            .as_ref()
            .unwrap()
            .as_str()
            .unwrap()
            .contains("not json")
    );
    let (report, _) = inbox.stop(&broker).await;
    assert_eq!(report.dead_lettered, 0);

    // Invalid settings: the relay refuses to start, at once, with the reason.
    let mut command = cli(&outbox.url);
    command
        .env("OUTBOX_RELAY_WAITING_TIME", "-1")
        .arg("publish");
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(10), command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(!output.status.success() && started.elapsed() < Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("relay.waiting_time") && stderr.contains("more than 0"),
        "{stderr}"
    );

    // Consumer with an unusable destination: refused before connecting.
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let err = Consumer::new(
        outbox.db.clone(),
        settings(&outbox.url),
        "/nowhere/x",
        None,
        move |p: Payload| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move { Ok(p.nack("unused")) }
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown destination prefix"));
}

/// The consumer's database goes away for longer than its retries: what is
/// in flight goes back to the queue (never to the DLQ), the consumer waits
/// for the database, and every message is stored once when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumer_waits_out_a_database_outage() {
    let _serial = SERIAL.lock().await;
    let cluster = Private::start(Server::Postgres, &["-c", "max_connections=40"]).await;
    let inbox_db = TestDb::on_postgres(&cluster.postgres_url("postgres")).await;
    let outbox = TestDb::new(Backend::Postgres).await;
    let destination = unique_topic();
    let inbox = Inbox::start_on(inbox_db, &destination, |s| {
        s.consumer.max_retry_attempts = 1;
        s.consumer.retry_wait = Duration::from_millis(100);
    })
    .await;
    let total = 5_000;
    write_messages(&outbox.db, &destination, total).await;
    let (stop_relay, shutdown) = shutdown_channel();
    let relay = tokio::spawn(Relay::new(outbox.db.clone(), settings(&outbox.url)).run(shutdown));
    inbox.wait_for(500, Duration::from_secs(60)).await;
    cluster.stop().await;
    // The outage lasts until it outlasted the consumer's retries (100 ms,
    // once, after the pool's wait for a connection): something was given back.
    eventually(
        Duration::from_secs(120),
        "the consumer giving messages back",
        || async { outbox_core::Metrics::get(&inbox.metrics.requeued) > 0 },
    )
    .await;
    cluster.up().await;
    inbox.wait_for(total as u64, Duration::from_secs(180)).await;
    stop_relay.trigger();
    relay.await.unwrap().unwrap();
    let broker = TestBroker::connect().await;
    let dlq = format!("DLQ.{}", inbox.queue);
    let dead = broker.message_count(&dlq).await;
    let (report, inbox_db) = inbox.stop(&broker).await;
    assert_eq!(dead, 0, "an outage dead-letters nothing");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert!(
        report.requeued > 0,
        "messages in flight went back to the queue: {report:?}"
    );
    assert_exactly_once(&outbox, &inbox_db, total).await;
    eprintln!(
        "database outage: {} messages requeued, none dead-lettered",
        report.requeued
    );
}
