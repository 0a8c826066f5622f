//! The consumer against real RabbitMQ and real databases.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::amqp::TestBroker;
use common::{Backend, TestDb, eventually, received_count, settings};
use outbox_core::entity::{published, received};
use outbox_core::{
    CallbackResult, Consumer, ConsumerReport, Message, Metrics, Payload, Relay, Settings, Shutdown,
    callback, find_callback, headers, registered_callbacks, shutdown_channel,
};
use sea_orm::{ConnectionTrait, EntityTrait, TransactionTrait};
use serde_json::json;
use tokio::task::JoinHandle;
use uuid::Uuid;

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
    };
}

on_every_backend!(
    save_writes_one_row_and_acks,
    same_message_id_twice_is_saved_once,
    errors_panics_and_nacks_go_to_the_dlq,
);

struct Running {
    trigger: outbox_core::ShutdownTrigger,
    task: JoinHandle<ConsumerReport>,
}

impl Running {
    async fn stop(self) -> ConsumerReport {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("consumer stops")
            .expect("consumer task")
    }
}

fn start(consumer: Consumer) -> Running {
    let (trigger, shutdown) = shutdown_channel();
    Running {
        trigger,
        task: tokio::spawn(async move { consumer.run(shutdown).await.expect("consumer run") }),
    }
}

/// A destination and queue unique to one test.
fn unique() -> (String, String) {
    let rk = format!("consumer.{}", Uuid::new_v4().simple());
    (format!("/topic/{rk}"), rk)
}

async fn cleanup(broker: &TestBroker, queue: &str) {
    broker.delete_queue(queue).await;
    broker.delete_queue(&format!("DLQ.{queue}")).await;
}

/// Wait until the consumer is attached to its queue. The queue alone is not
/// enough: it is bound after it is declared, and a message sent in between
/// is unroutable and dropped. The consumer attaches after the binding.
async fn declared(broker: &TestBroker, queue: &str) {
    eventually(Duration::from_secs(10), "consumer attached", || async {
        broker
            .queue(queue)
            .await
            .is_some_and(|queue| queue.consumer_count() > 0)
    })
    .await;
}

async fn save_writes_one_row_and_acks(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &destination,
        None,
        move |payload: Payload| {
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                assert_eq!(payload.body()["order"], 7);
                let txn = payload.begin().await?;
                Ok(payload.save(txn).await?)
            }
        },
    )
    .unwrap();
    assert_eq!(
        consumer.queue(),
        rk,
        "queue defaults to the text after the last /"
    );
    let running = start(consumer);
    declared(&broker, &rk).await;

    let id = Uuid::new_v4().to_string();
    broker
        .send(
            "amq.topic",
            &rk,
            br#"{"order": 7}"#,
            &[(headers::MSG_ID, &id)],
        )
        .await;
    eventually(Duration::from_secs(10), "row saved", || async {
        received_count(&t.db).await == 1
    })
    .await;
    let report = running.stop().await;

    assert_eq!(report.saved, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let rows = received::Entity::find().all(&t.db).await.unwrap();
    assert_eq!(rows[0].msg_id.as_deref(), Some(id.as_str()));
    assert_eq!(rows[0].body, Some(json!({"order": 7})));
    let stored = rows[0].headers.as_ref().unwrap();
    assert_eq!(stored[headers::MSG_ID], id.as_str());
    assert_eq!(stored["destination"], destination.as_str());
    assert_eq!(broker.message_count(&rk).await, 0, "acked");
    assert_eq!(broker.message_count(&format!("DLQ.{rk}")).await, 0);
    cleanup(&broker, &rk).await;
}

async fn same_message_id_twice_is_saved_once(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &destination,
        None,
        move |payload: Payload| {
            let seen = Arc::clone(&seen);
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    let metrics = Arc::new(Metrics::default());
    let running = start(consumer.with_metrics(Arc::clone(&metrics)));
    declared(&broker, &rk).await;

    let id = Uuid::new_v4().to_string();
    // cap-msg-id wins over dop-msg-id, which wins over message_id
    broker
        .send("amq.topic", &rk, b"{}", &[(headers::MSG_ID, &id)])
        .await;
    broker
        .send(
            "amq.topic",
            &rk,
            b"{}",
            &[(headers::MSG_ID, "other"), (headers::CAP_MSG_ID, &id)],
        )
        .await;
    // An empty queue is not enough: with prefetch 1 the second message may
    // still wait in the consumer's buffer, and a stop would requeue it.
    eventually(Duration::from_secs(10), "both handled", || async {
        Metrics::get(&metrics.consumed) == 2
    })
    .await;
    let report = running.stop().await;

    assert_eq!(received_count(&t.db).await, 1);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the duplicate never reaches the callback"
    );
    assert_eq!((report.saved, report.duplicates), (1, 1));
    assert_eq!(
        broker.message_count(&format!("DLQ.{rk}")).await,
        0,
        "a duplicate is acked, not dead-lettered"
    );
    cleanup(&broker, &rk).await;
}

async fn errors_panics_and_nacks_go_to_the_dlq(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &destination,
        None,
        |payload: Payload| async move {
            match payload.body()["do"].as_str() {
                Some("error") => {
                    // writes inside the callback's transaction roll back with it
                    let txn = payload.begin().await?;
                    outbox_core::write(&txn, Message::new("/topic/never", json!({}))?).await?;
                    Err("the callback refused".into())
                }
                Some("panic") => panic!("callback blew up"),
                Some("nack") => Ok(payload.nack("not for us")),
                _ => Ok(payload.save_alone().await?),
            }
        },
    )
    .unwrap();
    let running = start(consumer);
    declared(&broker, &rk).await;

    for action in ["error", "panic", "nack", "fine"] {
        let body = json!({ "do": action }).to_string();
        broker
            .send(
                "amq.topic",
                &rk,
                body.as_bytes(),
                &[(headers::MSG_ID, &Uuid::new_v4().to_string())],
            )
            .await;
    }
    broker
        .send(
            "amq.topic",
            &rk,
            b"not json at all",
            &[(headers::MSG_ID, &Uuid::new_v4().to_string())],
        )
        .await;
    let dlq = format!("DLQ.{rk}");
    eventually(
        Duration::from_secs(10),
        "three messages dead-lettered",
        || async { broker.message_count(&dlq).await == 3 },
    )
    .await;
    eventually(Duration::from_secs(10), "two saved", || async {
        received_count(&t.db).await == 2
    })
    .await;
    let report = running.stop().await;

    assert_eq!((report.saved, report.dead_lettered), (2, 3));
    assert_eq!(
        published::Entity::find().all(&t.db).await.unwrap().len(),
        0,
        "the failed callback's write rolled back"
    );
    let rows = received::Entity::find().all(&t.db).await.unwrap();
    assert!(
        rows.iter()
            .any(|r| r.body == Some(json!("not json at all"))),
        "a non-JSON body is kept as a string"
    );
    let dead = broker.take(&dlq, 3, Duration::from_secs(2)).await;
    let actions: Vec<&str> = dead
        .iter()
        .map(|m| m.body["do"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["error", "panic", "nack"]);
    // Each dead letter says why it failed.
    let errors: Vec<&str> = dead
        .iter()
        .map(|m| m.headers["x-outbox-error"].as_str())
        .collect();
    assert!(errors[0].contains("the callback refused"), "{errors:?}");
    assert!(errors[1].contains("callback blew up"), "{errors:?}");
    assert_eq!(errors[2], "not for us");
    assert!(dead.iter().all(|m| m.headers["x-outbox-queue"] == rk));
    cleanup(&broker, &rk).await;
}

/// Events a callback writes inherit the message's correlation id.
#[tokio::test(flavor = "multi_thread")]
async fn correlation_id_propagates_into_emitted_rows() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &destination,
        None,
        |payload: Payload| async move {
            assert_eq!(
                outbox_core::correlation_id().as_deref(),
                Some(payload.correlation_id())
            );
            let txn = payload.begin().await?;
            outbox_core::write(
                &txn,
                Message::new("/topic/shipments", json!({"for": payload.body()["order"]}))?,
            )
            .await?;
            Ok(payload.save(txn).await?)
        },
    )
    .unwrap();
    let running = start(consumer);
    declared(&broker, &rk).await;
    broker
        .send(
            "amq.topic",
            &rk,
            br#"{"order": 1}"#,
            &[
                (headers::MSG_ID, "m-1"),
                (headers::CORRELATION_ID, "trace-abc"),
            ],
        )
        .await;
    eventually(Duration::from_secs(10), "saved", || async {
        received_count(&t.db).await == 1
    })
    .await;
    running.stop().await;

    let rows = published::Entity::find().all(&t.db).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].headers[headers::CORRELATION_ID], "trace-abc");
    cleanup(&broker, &rk).await;
}

/// Two deliveries of one id in flight at once, in separate transactions
/// (batch size 1, two lanes): the second's inbox insert waits on the unique
/// index while the first callback runs, then skips; its callback never runs
/// and it is acked as a duplicate, not dead-lettered.
#[tokio::test(flavor = "multi_thread")]
async fn unique_constraint_race_is_an_ack() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let mut settings = settings(&t.url);
    settings.consumer.prefetch = 2;
    settings.consumer.concurrency = 2;
    settings.consumer.batch_size = 1;
    let calls = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let consumer = Consumer::new(t.db.clone(), settings, &destination, None, {
        let calls = Arc::clone(&calls);
        let gate = Arc::clone(&gate);
        move |payload: Payload| {
            let calls = Arc::clone(&calls);
            let gate = Arc::clone(&gate);
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let txn = payload.begin().await?;
                gate.notified().await;
                Ok(payload.save(txn).await?)
            }
        }
    })
    .unwrap();
    let running = start(consumer);
    declared(&broker, &rk).await;
    for _ in 0..2 {
        broker
            .send("amq.topic", &rk, b"{}", &[(headers::MSG_ID, "same")])
            .await;
    }
    eventually(
        Duration::from_secs(10),
        "the second delivery waiting on the first's inbox row",
        || async {
            let waiting: i64 =
                t.db.query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get("", "count")
                .unwrap();
            waiting == 1
        },
    )
    .await;
    gate.notify_one();
    eventually(Duration::from_secs(10), "both acked", || async {
        broker.message_count(&rk).await == 0 && received_count(&t.db).await == 1
    })
    .await;
    let report = running.stop().await;
    assert_eq!(
        (report.saved, report.duplicates, report.dead_lettered),
        (1, 1, 0)
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the duplicate's callback ran"
    );
    assert_eq!(broker.message_count(&format!("DLQ.{rk}")).await, 0);
    cleanup(&broker, &rk).await;
}

/// Shutdown during a slow callback: it completes and is acked.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_waits_for_the_callback_in_flight() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let started = Arc::new(tokio::sync::Notify::new());
    let signal = Arc::clone(&started);
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        &destination,
        None,
        move |payload: Payload| {
            let signal = Arc::clone(&signal);
            async move {
                signal.notify_one();
                tokio::time::sleep(Duration::from_secs(2)).await;
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    let running = start(consumer);
    declared(&broker, &rk).await;
    broker
        .send("amq.topic", &rk, b"{}", &[(headers::MSG_ID, "slow")])
        .await;
    started.notified().await;
    let report = running.stop().await;
    assert_eq!(report.saved, 1);
    assert_eq!(received_count(&t.db).await, 1);
    assert_eq!(broker.message_count(&rk).await, 0, "acked before exit");
    cleanup(&broker, &rk).await;
}

/// A transient database error runs the callback again instead of dead-lettering.
#[tokio::test(flavor = "multi_thread")]
async fn transient_database_errors_are_retried() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let mut settings: Settings = settings(&t.url);
    settings.consumer.retry_wait = Duration::from_millis(50);
    let calls = Arc::new(AtomicU32::new(0));
    let seen = Arc::clone(&calls);
    let consumer = Consumer::new(
        t.db.clone(),
        settings,
        &destination,
        None,
        move |payload: Payload| {
            let seen = Arc::clone(&seen);
            async move {
                if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                    let lost = sea_orm::DbErr::Conn(sea_orm::RuntimeErr::Internal(
                        "server closed the connection".into(),
                    ));
                    return Err(Box::new(outbox_core::Error::from(lost)) as outbox_core::BoxError);
                }
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    let running = start(consumer);
    declared(&broker, &rk).await;
    broker
        .send("amq.topic", &rk, b"{}", &[(headers::MSG_ID, "flaky")])
        .await;
    eventually(Duration::from_secs(10), "saved", || async {
        received_count(&t.db).await == 1
    })
    .await;
    let report = running.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!((report.saved, report.dead_lettered), (1, 0));
    cleanup(&broker, &rk).await;
}

#[callback]
async fn registered_handler(payload: Payload) -> CallbackResult {
    let txn = payload.begin().await?;
    Ok(payload.save(txn).await?)
}

/// `#[callback]` registers under the full path; the relay's output is consumed end to end.
#[tokio::test(flavor = "multi_thread")]
async fn registered_callback_consumes_what_the_relay_sends() {
    assert!(
        registered_callbacks().contains(&"consumer::registered_handler"),
        "{:?}",
        registered_callbacks()
    );
    let err = find_callback("consumer::nope").unwrap_err().to_string();
    assert!(err.contains("consumer::registered_handler"), "{err}");

    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let handler = find_callback("consumer::registered_handler").unwrap();
    let running = start(
        Consumer::new(
            t.db.clone(),
            settings(&t.url),
            &format!("{destination}.v1"),
            Some(&rk),
            handler,
        )
        .unwrap(),
    );
    declared(&broker, &rk).await;

    let txn = t.db.begin().await.unwrap();
    for n in 0..20 {
        outbox_core::write(
            &txn,
            Message::new(&destination, json!({"n": n}))
                .unwrap()
                .with_version("v1")
                .unwrap(),
        )
        .await
        .unwrap();
    }
    txn.commit().await.unwrap();
    let sent = Relay::new(t.db.clone(), settings(&t.url))
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(sent.published, 20);
    eventually(Duration::from_secs(10), "all consumed", || async {
        received_count(&t.db).await == 20
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.saved, 20);
    let outbox_ids: std::collections::HashSet<String> = published::Entity::find()
        .all(&t.db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id.to_string())
        .collect();
    let inbox_ids: std::collections::HashSet<String> = received::Entity::find()
        .all(&t.db)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.msg_id)
        .collect();
    assert_eq!(outbox_ids, inbox_ids, "dedup key = the outbox row id");
    cleanup(&broker, &rk).await;
}

/// Acks go out in bulk (`multiple`), but never for a delivery still being
/// handled: a fast message finished behind a slow one is acked on its own,
/// while the slow one stays unacknowledged until its callback returns.
#[tokio::test(flavor = "multi_thread")]
async fn bulk_acks_never_cover_a_message_in_flight() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let (destination, rk) = unique();
    let mut settings = settings(&t.url);
    settings.consumer.prefetch = 10;
    settings.consumer.concurrency = 4;
    // One message per transaction: in a batch the fast ones would wait for
    // the slow one's commit (group commit), which is not what this tests.
    settings.consumer.batch_size = 1;
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::clone(&release);
    let consumer = Consumer::new(
        t.db.clone(),
        settings,
        &destination,
        None,
        move |payload: Payload| {
            let gate = Arc::clone(&gate);
            async move {
                if payload.body()["slow"] == true {
                    gate.notified().await;
                }
                Ok(payload.save_alone().await?)
            }
        },
    )
    .unwrap();
    let running = start(consumer);
    declared(&broker, &rk).await;
    broker
        .send(
            "amq.topic",
            &rk,
            br#"{"slow": true}"#,
            &[(headers::MSG_ID, "slow")],
        )
        .await;
    for n in 0..3 {
        broker
            .send(
                "amq.topic",
                &rk,
                br#"{"slow": false}"#,
                &[(headers::MSG_ID, &format!("fast-{n}"))],
            )
            .await;
    }
    // Generous limits: each look at the queue is a rabbitmqctl run, seconds
    // long on a busy machine.
    eventually(Duration::from_secs(60), "the fast ones saved", || async {
        received_count(&t.db).await == 3
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "only the slow one unacknowledged",
        || async { unacked(&rk).await == 1 },
    )
    .await;
    release.notify_one();
    eventually(Duration::from_secs(60), "all acked", || async {
        unacked(&rk).await == 0 && received_count(&t.db).await == 4
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.saved, 4);
    cleanup(&broker, &rk).await;
}

/// Deliveries of `queue` sent to a consumer and not yet acknowledged.
async fn unacked(queue: &str) -> u64 {
    common::amqp::rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages_unacknowledged",
    ])
    .await
    .lines()
    .find_map(|line| {
        let mut parts = line.split_whitespace();
        (parts.next() == Some(queue)).then(|| parts.next().and_then(|n| n.parse().ok()))?
    })
    .unwrap_or(u64::MAX)
}
