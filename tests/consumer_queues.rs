//! How failures are kept, whatever the queue: `/amq/queue/` queues that we
//! do not declare, quorum queues that we do, and the dead-letter modes; and
//! the database errors that mean "try again", not "dead-letter".

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::amqp::TestBroker;
use common::{Backend, TestDb, eventually, received_count, settings};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use outbox_core::{Consumer, ConsumerReport, DeadLetterMode, Payload, QueueType, shutdown_channel};
use sea_orm::{ConnectionTrait, TransactionTrait};
use serde_json::json;
use tokio::task::JoinHandle;
use uuid::Uuid;

struct Running {
    trigger: outbox_core::ShutdownTrigger,
    task: JoinHandle<outbox_core::Result<ConsumerReport>>,
}

impl Running {
    fn start(consumer: Consumer) -> Running {
        let (trigger, shutdown) = shutdown_channel();
        Running {
            trigger,
            task: tokio::spawn(consumer.run(shutdown)),
        }
    }

    async fn stop(self) -> ConsumerReport {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("consumer stops")
            .expect("consumer task")
            .expect("consumer run")
    }
}

/// A callback that fails every message whose body says so.
async fn failing(payload: Payload) -> outbox_core::CallbackResult {
    if payload.body()["fail"] == json!(true) {
        return Err("refused by the test".into());
    }
    Ok(payload.save_alone().await?)
}

async fn declare_plain_queue(broker: &TestBroker, name: &str, arguments: FieldTable) {
    broker
        .channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await
        .expect("declare the user's queue");
}

/// An `/amq/queue/` queue without any dead-lettering: the consumer copies
/// the failure to `DLQ.<queue>` itself (the default), so nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn failures_from_an_amq_queue_without_dead_lettering_are_kept() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let queue = format!("amq.plain.{}", Uuid::new_v4().simple()).replacen("amq.", "user.", 1);
    declare_plain_queue(&broker, &queue, FieldTable::default()).await;
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &format!("/amq/queue/{queue}"),
        None,
        failing,
    )
    .unwrap();
    let running = Running::start(consumer);
    let dlq = format!("DLQ.{queue}");
    common::eventually(Duration::from_secs(10), "DLQ declared", || async {
        broker.queue(&dlq).await.is_some()
    })
    .await;
    broker
        .send("", &queue, br#"{"fail": true}"#, &[("dop-msg-id", "m-1")])
        .await;
    broker
        .send("", &queue, br#"{"fail": false}"#, &[("dop-msg-id", "m-2")])
        .await;
    eventually(
        Duration::from_secs(10),
        "one saved, one dead-lettered",
        || async { received_count(&t.db).await == 1 && broker.message_count(&dlq).await == 1 },
    )
    .await;
    let report = running.stop().await;
    assert_eq!((report.saved, report.dead_lettered), (1, 1));
    assert_eq!(
        broker.message_count(&queue).await,
        0,
        "acked after the copy"
    );
    let dead = broker.take(&dlq, 1, Duration::from_secs(2)).await;
    assert_eq!(dead[0].headers["dop-msg-id"], "m-1");
    assert!(dead[0].headers["x-outbox-error"].contains("refused by the test"));
    broker.delete_queue(&queue).await;
    broker.delete_queue(&dlq).await;
}

/// `consumer.dead_letter = "nack"` on an `/amq/queue/` queue that has a
/// dead-letter exchange: the broker routes the failure.
#[tokio::test(flavor = "multi_thread")]
async fn nack_mode_relies_on_the_queues_own_dead_lettering() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let queue = format!("user.dlx.{}", Uuid::new_v4().simple());
    let parking = format!("parking.{queue}");
    declare_plain_queue(&broker, &parking, FieldTable::default()).await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("")),
    );
    arguments.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(parking.as_str())),
    );
    declare_plain_queue(&broker, &queue, arguments).await;
    let mut settings = settings(&t.url);
    settings.consumer.dead_letter = DeadLetterMode::Nack;
    let consumer = Consumer::new(
        t.db.clone(),
        settings,
        &format!("/amq/queue/{queue}"),
        None,
        failing,
    )
    .unwrap();
    let running = Running::start(consumer);
    broker
        .send("", &queue, br#"{"fail": true}"#, &[("dop-msg-id", "n-1")])
        .await;
    eventually(
        Duration::from_secs(10),
        "dead-lettered by the broker",
        || async { broker.message_count(&parking).await == 1 },
    )
    .await;
    let report = running.stop().await;
    assert_eq!(report.dead_lettered, 1);
    let dead = broker.take(&parking, 1, Duration::from_secs(2)).await;
    assert_eq!(dead[0].headers["dop-msg-id"], "n-1");
    broker.delete_queue(&queue).await;
    broker.delete_queue(&parking).await;
    broker.delete_queue(&format!("DLQ.{queue}")).await;
}

/// `consumer.queue_type = "quorum"`: both queues are quorum queues with
/// at-least-once dead-lettering and a delivery limit, the same on every run;
/// a failure reaches `DLQ.<queue>` (here through the queue's own
/// dead-lettering, `nack` mode), a success is saved.
#[tokio::test(flavor = "multi_thread")]
async fn quorum_queues_are_declared_and_dead_letter() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = format!("quorum.{}", Uuid::new_v4().simple());
    let mut settings = settings(&t.url);
    settings.consumer.queue_type = QueueType::Quorum;
    settings.consumer.delivery_limit = 5;
    settings.consumer.dead_letter = DeadLetterMode::Nack;
    let new = || {
        Consumer::new(
            t.db.clone(),
            settings.clone(),
            &format!("/topic/{rk}"),
            None,
            failing,
        )
        .unwrap()
    };
    new().declare().await.unwrap();
    // Declared again, identically: no PRECONDITION_FAILED.
    new().declare().await.unwrap();
    let listed = list_queues(&rk).await;
    assert!(listed.contains(&format!("{rk}\tquorum")), "{listed}");
    assert!(listed.contains(&format!("DLQ.{rk}\tquorum")), "{listed}");
    let arguments = list_arguments(&rk).await;
    assert!(
        arguments.contains("x-dead-letter-strategy") && arguments.contains("at-least-once"),
        "{arguments}"
    );
    assert!(arguments.contains("x-delivery-limit"), "{arguments}");
    assert!(!arguments.contains("x-queue-mode"), "{arguments}");

    let running = Running::start(new());
    broker
        .send(
            "amq.topic",
            &rk,
            br#"{"fail": true}"#,
            &[("dop-msg-id", "q-1")],
        )
        .await;
    broker
        .send(
            "amq.topic",
            &rk,
            br#"{"fail": false}"#,
            &[("dop-msg-id", "q-2")],
        )
        .await;
    let dlq = format!("DLQ.{rk}");
    eventually(
        Duration::from_secs(20),
        "one saved, one dead-lettered",
        || async { received_count(&t.db).await == 1 && broker.message_count(&dlq).await == 1 },
    )
    .await;
    let report = running.stop().await;
    assert_eq!((report.saved, report.dead_lettered), (1, 1));
    broker.delete_queue(&rk).await;
    broker.delete_queue(&dlq).await;

    // A quorum queue cannot be exclusive: refused before connecting.
    let mut exclusive = settings.clone();
    exclusive.consumer.exclusive_queue = true;
    let err = Consumer::new(t.db.clone(), exclusive, "/topic/x", None, failing)
        .unwrap()
        .declare()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("quorum queues cannot be exclusive"), "{err}");
}

async fn list_queues(filter: &str) -> String {
    rabbitmqctl_lines(
        &["list_queues", "-q", "--no-table-headers", "name", "type"],
        filter,
    )
    .await
}

async fn list_arguments(filter: &str) -> String {
    rabbitmqctl_lines(
        &[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "arguments",
        ],
        filter,
    )
    .await
}

/// The lines of `rabbitmqctl <args>` that contain `filter`.
async fn rabbitmqctl_lines(args: &[&str], filter: &str) -> String {
    common::amqp::rabbitmqctl(args)
        .await
        .lines()
        .filter(|line| line.contains(filter))
        .collect::<Vec<_>>()
        .join("\n")
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
    };
}

on_every_backend!(a_lost_lock_race_is_retried_not_dead_lettered);

/// Each database's "try again" errors — PostgreSQL lock_not_available
/// (55P03), MariaDB lock wait timeout (1205), SQLite busy — are transient:
/// the callback runs again and the message is saved, not dead-lettered.
async fn a_lost_lock_race_is_retried_not_dead_lettered(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.db.execute_unprepared("CREATE TABLE lockers (id integer PRIMARY KEY, note varchar(20))")
        .await
        .unwrap();
    t.db.execute_unprepared("INSERT INTO lockers (id, note) VALUES (1, 'free')")
        .await
        .unwrap();
    let broker = TestBroker::connect().await;
    let rk = format!("locks.{}", Uuid::new_v4().simple());
    // Another session holds the row (and on SQLite the database's write
    // lock) that the callback's first attempts run into.
    let holder = common::connect(&t.url).await;
    let lock = holder.begin().await.unwrap();
    lock.execute_unprepared("UPDATE lockers SET note = 'held' WHERE id = 1")
        .await
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&attempts);
    let mut settings = settings(&t.url);
    settings.consumer.max_retry_attempts = 5;
    settings.consumer.retry_wait = Duration::from_millis(200);
    let consumer = Consumer::new(
        t.db.clone(),
        settings,
        &format!("/topic/{rk}"),
        None,
        move |payload: Payload| {
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                let txn = payload.begin().await?;
                let quick = match txn.get_database_backend() {
                    sea_orm::DbBackend::Postgres => "SET LOCAL lock_timeout = '300ms'",
                    sea_orm::DbBackend::MySql => "SET SESSION innodb_lock_wait_timeout = 1",
                    _ => "SELECT 1",
                };
                txn.execute_unprepared(quick).await?;
                txn.execute_unprepared("UPDATE lockers SET note = 'mine' WHERE id = 1")
                    .await?;
                Ok(payload.save(txn).await?)
            }
        },
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let running = Running::start(consumer);
    broker
        .send("amq.topic", &rk, b"{}", &[("dop-msg-id", "lock-1")])
        .await;
    eventually(
        Duration::from_secs(30),
        "the first attempt ran into the lock",
        || async { attempts.load(Ordering::SeqCst) >= 1 },
    )
    .await;
    // Let the first attempt time out on the lock, then release it.
    eventually(Duration::from_secs(30), "a retry", || async {
        attempts.load(Ordering::SeqCst) >= 2
    })
    .await;
    lock.rollback().await.unwrap();
    eventually(Duration::from_secs(30), "saved", || async {
        received_count(&t.db).await == 1
    })
    .await;
    let report = running.stop().await;
    assert_eq!((report.saved, report.dead_lettered), (1, 0), "{report:?}");
    broker.delete_queue(&rk).await;
    broker.delete_queue(&format!("DLQ.{rk}")).await;
}
