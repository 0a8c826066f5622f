//! One bad message never stops the others, against a real RabbitMQ: each
//! poison row fails alone after its attempts, with the broker's reason,
//! while 10,000 good rows beside it all arrive and the relay keeps going.
//!
//! The broker-refused cases run on a private RabbitMQ node of this test
//! binary (a 1 MiB `max_message_size`, a user without write permission on
//! one exchange); rows no relay can send run on every database against the
//! machine's RabbitMQ.

mod common;

use std::time::Duration;

use common::amqp::TestBroker;
use common::private::{Private, Server};
use common::{Backend, TestDb, insert_raw_row, settings, write_messages};
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use outbox_core::entity::published;
use outbox_core::{Message, Relay, Shutdown, Status, headers};
use sea_orm::EntityTrait;
use tokio::sync::OnceCell;
use uuid::Uuid;

const GOOD: usize = 10_000;
const MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// The private node, shared by this binary's tests.
async fn node() -> &'static Private {
    static NODE: OnceCell<Private> = OnceCell::const_new();
    NODE.get_or_init(|| async {
        let node = Private::start(
            Server::Rabbitmq,
            &[&format!("max_message_size = {MAX_MESSAGE_SIZE}")],
        )
        .await;
        node.ctl(&["add_user", "limited", "limited-pass"]).await;
        node.ctl(&[
            "set_permissions",
            "-p",
            "/",
            "limited",
            ".*",
            "^(?!forbidden).*",
            ".*",
        ])
        .await;
        let admin = TestBroker::connect_to(&node.amqp_url("guest", "guest")).await;
        admin
            .channel
            .exchange_declare(
                "forbidden.x".into(),
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare forbidden.x");
        node
    })
    .await
}

/// `GOOD` rows to a bound queue with `bad` in the middle, relayed with
/// `user` on the private node: the bad row is FAILED after 3 attempts with
/// `reason` in its error, the good ones all arrive, the relay never stops.
async fn fails_alone(bad: Message, user: (&str, &str), reason: &str) {
    let node = node().await;
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect_to(&node.amqp_url("guest", "guest")).await;
    let rk = format!("poison.{}", Uuid::new_v4().simple());
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let destination = format!("/topic/{rk}");
    write_messages(&t.db, &destination, GOOD / 2).await;
    let bad = outbox_core::write(&t.db, bad).await.unwrap();
    write_messages(&t.db, &destination, GOOD / 2).await;

    let mut settings = settings(&t.url);
    settings.broker.url = node.amqp_url(user.0, user.1);
    settings.relay.max_retry_attempts = 3;
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.relay.wait_retry = Duration::ZERO;
    let report = tokio::time::timeout(
        Duration::from_secs(300),
        Relay::new(t.db.clone(), settings).run_until_empty(Shutdown::never()),
    )
    .await
    .expect("the relay finishes")
    .expect("the relay never stops on a bad message");

    assert_eq!(
        (report.published, report.failed, report.unsent),
        (GOOD as u64, 1, 0),
        "{report:?}"
    );
    let row = published::Entity::find_by_id(bad.id)
        .one(&t.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.status, row.retry), (Status::Failed, 3));
    let error = row.last_error.unwrap_or_default();
    assert!(error.contains(reason), "{error}");
    // The messages in flight on the channel the bad one closed are sent
    // again (their confirms were lost with it): every good row arrives, some
    // twice, never more than what was in flight.
    let arrived = broker.message_count(&queue).await as usize;
    let ids: std::collections::BTreeSet<String> = broker
        .take(&queue, arrived, Duration::from_secs(5))
        .await
        .into_iter()
        .filter_map(|m| m.message_id)
        .collect();
    assert_eq!(ids.len(), GOOD, "distinct good rows arrived");
    assert!(!ids.contains(&bad.id.to_string()), "the bad row arrived");
    assert!(
        arrived - GOOD <= 2000,
        "{} resent, more than relay.max_in_flight",
        arrived - GOOD
    );
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_amq_exchange_fails_alone() {
    fails_alone(
        Message::new("/exchange/amq.nosuch/rk", serde_json::json!({"n": -1})).unwrap(),
        ("guest", "guest"),
        "amq.nosuch",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_over_the_broker_limit_fails_alone() {
    let big = "x".repeat(2 * MAX_MESSAGE_SIZE);
    fails_alone(
        Message::new(
            &format!("/topic/poison.big.{}", Uuid::new_v4().simple()),
            serde_json::json!({ "big": big }),
        )
        .unwrap(),
        ("guest", "guest"),
        "max",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_destination_the_user_may_not_write_fails_alone() {
    fails_alone(
        Message::new("/exchange/forbidden.x/rk", serde_json::json!({"n": -1})).unwrap(),
        ("limited", "limited-pass"),
        "forbidden.x",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_with_a_reserved_name_fails_alone() {
    fails_alone(
        Message::new("/queue/amq.x", serde_json::json!({"n": -1})).unwrap(),
        ("guest", "guest"),
        "amq.x",
    )
    .await;
}

/// Over-long header names and correlation ids are refused where data enters.
#[tokio::test]
async fn long_header_names_and_correlation_ids_are_refused_at_write_time() {
    let long = "h".repeat(300);
    let err = Message::new("/topic/x", serde_json::json!({}))
        .unwrap()
        .with_header(long.as_str(), "v")
        .unwrap_err()
        .to_string();
    assert!(err.contains("300 bytes") && err.contains("255"), "{err}");
    let err = Message::new("/topic/x", serde_json::json!({}))
        .unwrap()
        .with_header(headers::CORRELATION_ID, long.as_str())
        .unwrap_err()
        .to_string();
    assert!(err.contains("correlation id is 300 bytes"), "{err}");

    let t = TestDb::new(Backend::Sqlite).await;
    let err = outbox_core::with_correlation_id(long.clone(), async {
        outbox_core::write(
            &t.db,
            Message::new("/topic/x", serde_json::json!({})).unwrap(),
        )
        .await
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("correlation id is 300 bytes"), "{err}");
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
    };
}

on_every_backend!(rows_written_by_sql_that_cannot_be_sent_fail_alone);

/// Rows another tool wrote: over-long header names and correlation ids, no
/// `dop-msg-id` (and unroutable), and on SQLite a body that is not JSON and a
/// text id. Each ends FAILED (none SUCCEEDED), nothing panics, the good rows
/// around them arrive.
async fn rows_written_by_sql_that_cannot_be_sent_fail_alone(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let rk = format!("poison.sql.{}", Uuid::new_v4().simple());
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let destination = format!("/topic/{rk}");
    write_messages(&t.db, &destination, 500).await;
    let long = "h".repeat(300);
    let mut bad = vec![
        (
            Uuid::new_v4(),
            destination.clone(),
            "{}".to_owned(),
            format!("{{\"{long}\": \"v\"}}"),
            "300 bytes",
        ),
        (
            Uuid::new_v4(),
            destination.clone(),
            "{}".to_owned(),
            format!("{{\"{}\": \"{long}\"}}", headers::CORRELATION_ID),
            "correlation id is 300 bytes",
        ),
        (
            Uuid::new_v4(),
            format!("/topic/nobody.{}", Uuid::new_v4().simple()),
            "{\"n\": 1}".to_owned(),
            "{}".to_owned(),
            "unroutable",
        ),
    ];
    if backend == Backend::Sqlite {
        bad.push((
            Uuid::new_v4(),
            destination.clone(),
            "not json {".to_owned(),
            "{}".to_owned(),
            "not JSON",
        ));
    }
    for (id, destination, body, headers, _) in &bad {
        insert_raw_row(&t.db, (*id).into(), destination, body, headers).await;
    }
    if backend == Backend::Sqlite {
        insert_raw_row(
            &t.db,
            Uuid::new_v4().to_string().into(),
            &destination,
            "{}",
            "{}",
        )
        .await;
    }
    write_messages(&t.db, &destination, 500).await;

    let mut settings = settings(&t.url);
    settings.relay.max_retry_attempts = 3;
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.relay.wait_retry = Duration::ZERO;
    let report = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .expect("the relay keeps going");
    assert_eq!(report.published, 1_000, "{report:?}");
    let expected_failed = bad.len() as u64 + u64::from(backend == Backend::Sqlite);
    assert_eq!(report.failed, expected_failed, "{report:?}");
    for (id, _, _, _, reason) in &bad {
        // Read without the entity: a body that is not JSON does not decode.
        let (status, _, error) = row_state(&t.db, *id).await;
        assert_eq!(status, Status::Failed.code(), "{reason}");
        assert!(
            error.as_deref().unwrap_or("").contains(reason),
            "{reason}: {error:?}"
        );
    }
    // The unroutable row had no dop-msg-id; the relay stamped its row id,
    // so its return was matched to it: FAILED after 3 attempts, never SUCCEEDED.
    assert_eq!(row_state(&t.db, bad[2].0).await.1, 3);
    let received = broker.take(&queue, 1_001, Duration::from_secs(3)).await;
    assert_eq!(received.len(), 1_000);
    assert!(
        received
            .iter()
            .all(|m| m.message_id.as_deref() == m.headers.get(headers::MSG_ID).map(String::as_str))
    );
    broker.delete_queue(&queue).await;
}

async fn row_state(db: &sea_orm::DatabaseConnection, id: Uuid) -> (i32, i32, Option<String>) {
    use sea_orm::{ConnectionTrait, Statement};
    let backend = db.get_database_backend();
    let sql = match backend {
        sea_orm::DbBackend::Postgres => {
            "SELECT status, retry, last_error FROM published WHERE id = $1"
        }
        _ => "SELECT status, retry, last_error FROM published WHERE id = ?",
    };
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            backend,
            sql,
            vec![id.into()],
        ))
        .await
        .unwrap()
        .expect("the row exists");
    (
        row.try_get("", "status").unwrap(),
        row.try_get("", "retry").unwrap(),
        row.try_get("", "last_error").unwrap(),
    )
}
