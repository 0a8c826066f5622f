//! The relay against real RabbitMQ and real databases.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::amqp::TestBroker;
use common::{Backend, TestDb, settings, status_counts, write_messages};
use outbox_core::entity::published;
use outbox_core::{Relay, Shutdown, Status, Unroutable, headers};
use sea_orm::EntityTrait;
use uuid::Uuid;

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test(flavor = "multi_thread")] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
    };
}

on_every_backend!(
    every_message_arrives_with_dop_headers,
    unroutable_and_missing_exchange_fail_alone,
    queue_destinations_are_declared,
);

fn key() -> String {
    format!("relay.{}", Uuid::new_v4().simple())
}

async fn every_message_arrives_with_dop_headers(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let rk = key();
    let queue = broker.bound_queue("amq.topic", &format!("{rk}.v1")).await;

    let mut settings = settings(&t.url);
    settings.relay.batch_size = 64;
    let message = outbox_core::Message::new(
        &format!("/topic/{rk}"),
        serde_json::json!({"id": 1, "price": "1.50", "name": "café"}),
    )
    .unwrap()
    .with_version("v1")
    .unwrap()
    .with_header("tenant", "acme")
    .unwrap();
    let row = outbox_core::write(&t.db, message).await.unwrap();
    let ids = write_messages(&t.db, &format!("/topic/{rk}.v1"), 299).await;

    let report = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 300);

    let received = broker.take(&queue, 301, Duration::from_secs(3)).await;
    assert_eq!(received.len(), 300, "every row arrives exactly once");
    let first = &received[0];
    assert_eq!(first.routing_key, format!("{rk}.v1"));
    assert_eq!(
        first.body,
        serde_json::json!({"id": 1, "price": "1.50", "name": "café"})
    );
    assert_eq!(first.delivery_mode, Some(2), "persistent");
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.headers[headers::MSG_ID], row.id.to_string());
    assert_eq!(
        first.message_id.as_deref(),
        Some(row.id.to_string().as_str())
    );
    assert_eq!(
        first.headers[headers::MSG_DESTINATION],
        format!("/topic/{rk}.v1")
    );
    assert_eq!(first.headers[headers::MSG_TYPE], "Published");
    assert_eq!(first.headers["tenant"], "acme");
    assert!(first.headers[headers::MSG_SENT_TIME].ends_with('Z'));
    assert!(first.headers.contains_key(headers::CORRELATION_ID));

    // creation order is kept
    let order: Vec<i64> = received[1..]
        .iter()
        .map(|m| m.body["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, (0..299).collect::<Vec<_>>());
    let got: HashSet<String> = received
        .iter()
        .map(|m| m.headers[headers::MSG_ID].clone())
        .collect();
    assert!(ids.iter().all(|id| got.contains(&id.to_string())));

    assert_eq!(
        status_counts(&t.db).await.get(&Status::Succeeded.code()),
        Some(&300)
    );
    broker.delete_queue(&queue).await;
}

async fn unroutable_and_missing_exchange_fail_alone(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let rk = key();
    let queue = broker.bound_queue("amq.topic", &rk).await;

    let mut settings = settings(&t.url);
    settings.relay.max_retry_attempts = 3;
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.relay.wait_retry = Duration::ZERO;

    write_messages(&t.db, &format!("/topic/{rk}"), 10).await;
    let unroutable = write_messages(
        &t.db,
        &format!("/topic/nobody.listens.{}", Uuid::new_v4().simple()),
        1,
    )
    .await[0];
    let missing = write_messages(
        &t.db,
        &format!("/exchange/missing-{}/x", Uuid::new_v4().simple()),
        1,
    )
    .await[0];
    write_messages(&t.db, &format!("/topic/{rk}"), 10).await;

    let report = Relay::new(t.db.clone(), settings.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 20);
    assert_eq!(report.failed, 2);
    assert_eq!(
        report.retried, 4,
        "attempts 1 and 2 of each bad row were retried"
    );
    assert_eq!(
        broker.take(&queue, 21, Duration::from_secs(2)).await.len(),
        20
    );

    let row = published::Entity::find_by_id(unroutable)
        .one(&t.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.status, row.retry), (Status::Failed, 3));
    assert!(
        row.last_error.as_deref().unwrap().contains("unroutable"),
        "{:?}",
        row.last_error
    );
    let row = published::Entity::find_by_id(missing)
        .one(&t.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.status, row.retry), (Status::Failed, 3));
    assert!(
        row.last_error
            .as_deref()
            .unwrap()
            .contains("does not exist"),
        "{:?}",
        row.last_error
    );

    // With relay.unroutable = accept, an unroutable message counts as sent.
    settings.relay.unroutable = Unroutable::Accept;
    let accepted = write_messages(
        &t.db,
        &format!("/topic/nobody.{}", Uuid::new_v4().simple()),
        1,
    )
    .await[0];
    let report = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!((report.published, report.failed), (1, 0));
    let row = published::Entity::find_by_id(accepted)
        .one(&t.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, Status::Succeeded);
    broker.delete_queue(&queue).await;
}

async fn queue_destinations_are_declared(backend: Backend) {
    let t = TestDb::new(backend).await;
    let broker = TestBroker::connect().await;
    let queue = format!("relay.q.{}", Uuid::new_v4().simple());
    write_messages(&t.db, &format!("/queue/{queue}"), 3).await;
    write_messages(&t.db, &queue, 2).await; // a bare name is a queue too

    let report = Relay::new(t.db.clone(), settings(&t.url))
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 5);
    assert_eq!(
        broker.take(&queue, 6, Duration::from_secs(2)).await.len(),
        5
    );
    broker.delete_queue(&queue).await;
}

/// Two relays on one database: every row arrives once, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_never_send_twice() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = key();
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let ids = write_messages(&t.db, &format!("/topic/{rk}"), 20_000).await;

    let mut settings = settings(&t.url);
    settings.relay.batch_size = 500;
    let a = Relay::new(common::connect(&t.url).await, settings.clone());
    let b = Relay::new(common::connect(&t.url).await, settings);
    let (a, b) = tokio::join!(
        a.run_until_empty(Shutdown::never()),
        b.run_until_empty(Shutdown::never())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.published + b.published, 20_000);
    assert!(
        a.published > 0 && b.published > 0,
        "both relays took part: {a:?} {b:?}"
    );

    let received = broker.take(&queue, 20_001, Duration::from_secs(3)).await;
    let distinct: HashSet<&str> = received
        .iter()
        .map(|m| m.headers[headers::MSG_ID].as_str())
        .collect();
    assert_eq!(received.len(), 20_000, "no duplicates, nothing missing");
    assert_eq!(distinct.len(), 20_000);
    assert!(
        ids.iter()
            .all(|id| distinct.contains(id.to_string().as_str()))
    );
    broker.delete_queue(&queue).await;
}

/// The direct-send API: confirmed, with dop-* headers, and an error when nobody can receive it.
#[tokio::test(flavor = "multi_thread")]
async fn direct_send_is_confirmed_or_refused() {
    let broker = TestBroker::connect().await;
    let rk = key();
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let settings = common::settings("sqlite::memory:");
    let mut direct = outbox_core::Broker::connect(&settings, "direct-send-test")
        .await
        .unwrap();

    let message = outbox_core::Message::new(
        &format!("/topic/{rk}"),
        serde_json::json!({"hello": "world"}),
    )
    .unwrap();
    let id = outbox_core::with_correlation_id("corr-1", direct.send(&message))
        .await
        .unwrap();
    let received = broker.take(&queue, 1, Duration::from_secs(3)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].headers[headers::MSG_ID], id.to_string());
    assert_eq!(received[0].headers[headers::CORRELATION_ID], "corr-1");
    assert_eq!(received[0].body, serde_json::json!({"hello": "world"}));

    let nowhere = outbox_core::Message::new(
        &format!("/topic/nobody.{}", Uuid::new_v4().simple()),
        serde_json::json!({}),
    )
    .unwrap();
    let err = direct.send(&nowhere).await.unwrap_err().to_string();
    assert!(
        err.contains("not delivered") && err.contains("unroutable"),
        "{err}"
    );
    broker.delete_queue(&queue).await;
    direct.close().await;
}

/// lapin attaches a returned message to whichever confirm completes next;
/// under load RabbitMQ acks many messages at once. Returns must still be
/// matched to the right rows: interleave unroutable messages with good ones.
#[tokio::test(flavor = "multi_thread")]
async fn returns_are_matched_to_their_own_messages() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = key();
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let nowhere = format!("/topic/nobody.{}", Uuid::new_v4().simple());
    let mut unroutable = HashSet::new();
    let mut good = HashSet::new();
    for n in 0..3_000 {
        let destination = if n % 7 == 3 {
            nowhere.clone()
        } else {
            format!("/topic/{rk}")
        };
        let row = outbox_core::write(
            &t.db,
            outbox_core::Message::new(&destination, serde_json::json!({"n": n})).unwrap(),
        )
        .await
        .unwrap();
        if n % 7 == 3 {
            unroutable.insert(row.id)
        } else {
            good.insert(row.id)
        };
    }
    let mut settings = settings(&t.url);
    settings.relay.max_retry_attempts = 1;
    settings.relay.batch_size = 500;
    let report = Relay::new(t.db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(
        (report.published, report.failed),
        (good.len() as u64, unroutable.len() as u64)
    );
    for row in published::Entity::find().all(&t.db).await.unwrap() {
        let expected = if unroutable.contains(&row.id) {
            Status::Failed
        } else {
            Status::Succeeded
        };
        assert_eq!(row.status, expected, "row {} ({})", row.id, row.destination);
    }
    let received = broker
        .take(&queue, good.len() + 1, Duration::from_secs(3))
        .await;
    let got: HashSet<Uuid> = received
        .iter()
        .map(|m| m.headers[headers::MSG_ID].parse().unwrap())
        .collect();
    assert_eq!(got, good);
    broker.delete_queue(&queue).await;
}

/// The README's SQL for other writers works as written (on PostgreSQL, with
/// a routing key of this test's own): the row goes out with its id as
/// `dop-msg-id` and `message_id`, and every `dop-*` header filled in.
#[tokio::test]
async fn the_readme_sql_insert_is_relayed() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("read README.md");
    let sql: String = readme
        .split("```sql\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```sql block")
        .to_owned();
    assert!(sql.contains("orders.created.v1"), "{sql}");
    let t = TestDb::new(Backend::Postgres).await;
    let broker = TestBroker::connect().await;
    let rk = key();
    let queue = broker.bound_queue("amq.topic", &rk).await;
    use sea_orm::ConnectionTrait as _;
    t.db.execute_unprepared(&sql.replace("orders.created.v1", &rk))
        .await
        .expect("the README's INSERT runs");
    let row = published::Entity::find().one(&t.db).await.unwrap().unwrap();

    let report = Relay::new(t.db.clone(), settings(&t.url))
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!(report.published, 1);
    let received = broker.take(&queue, 1, Duration::from_secs(3)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].message_id.as_deref(),
        Some(row.id.to_string().as_str())
    );
    assert_eq!(received[0].headers[headers::MSG_ID], row.id.to_string());
    for header in [
        headers::CORRELATION_ID,
        headers::MSG_DESTINATION,
        headers::MSG_TYPE,
    ] {
        assert!(
            received[0].headers.contains_key(header),
            "{header}: {:?}",
            received[0].headers
        );
    }
    assert_eq!(received[0].body, serde_json::json!({"id": 1}));
    broker.delete_queue(&queue).await;
}
