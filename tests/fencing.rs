//! Leases and fencing on the in-memory transport with a manual clock: a
//! relay whose confirms are slower than its lease loses its rows to another
//! relay, and nothing it writes afterwards touches them.

mod common;

use std::time::Duration;

use common::{Backend, TestDb, write_messages};
use outbox_core::entity::published;
use outbox_core::{Clock, MemoryBroker, PublishFault, Relay, Settings, Shutdown, Status};
use sea_orm::{ConnectionTrait, EntityTrait, Statement};

const ROWS: usize = 50;

fn settings(url: &str) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = Some(url.to_owned());
    settings.relay.batch_size = ROWS as u32;
    settings.relay.max_in_flight = ROWS as u32;
    settings.relay.claim_lease = Duration::from_secs(60);
    settings.relay.listen = false;
    settings.relay.waiting_time = Duration::from_millis(20);
    settings.broker.operation_timeout = Duration::from_secs(10);
    settings
}

async fn audit(db: &sea_orm::DatabaseConnection) {
    for statement in [
        "CREATE TABLE outbox_audit (id blob, old_status int, new_status int)",
        "CREATE TRIGGER outbox_audit AFTER UPDATE ON published BEGIN \
           INSERT INTO outbox_audit VALUES (OLD.id, OLD.status, NEW.status); END",
    ] {
        db.execute_unprepared(statement).await.unwrap();
    }
}

async fn transitions(db: &sea_orm::DatabaseConnection, from: i32, to: i32) -> Vec<i64> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            format!(
                "SELECT COUNT(*) AS n FROM outbox_audit WHERE old_status = {from} AND new_status = {to} GROUP BY id"
            ),
        ))
        .await
        .unwrap();
    rows.iter()
        .map(|r| r.try_get::<i64>("", "n").unwrap())
        .collect()
}

/// Relay A stalls after claiming (a long pause, a slow confirm) until its
/// lease has run out; relay B claims the rows, sends and marks them. When A
/// goes on, its confirms mark nothing: each row is marked sent once, and no
/// sent row moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_lost_its_lease_changes_nothing() {
    let t = TestDb::new(Backend::Sqlite).await;
    audit(&t.db).await;
    write_messages(&t.db, "/topic/fencing", ROWS).await;
    // A broker each: A's stalls inside its own script.
    let (broker_a, broker_b) = (MemoryBroker::new(), MemoryBroker::new());
    for broker in [&broker_a, &broker_b] {
        broker.bind("fencing", "/topic/fencing").unwrap();
    }
    let clock = Clock::manual();
    let (stalled, stall) = std::sync::mpsc::channel::<()>();
    let (resume, wait) = std::sync::mpsc::channel::<()>();
    let late = clock.clone();
    let mut sends = 0;
    // A's last send stalls A's task past its lease, with the rest of its
    // claim sent and unconfirmed; everything else goes through.
    broker_a.script_publishes(move |_| {
        sends += 1;
        if sends == ROWS {
            late.advance(Duration::from_secs(61));
            let _ = stalled.send(());
            let _ = wait.recv();
        }
        PublishFault::Deliver
    });
    let relay = |name: &str, broker: &MemoryBroker| {
        Relay::new(t.db.clone(), settings(&t.url))
            .with_transport(broker.clone())
            .with_clock(clock.clone())
            .with_name(name)
    };
    let a = tokio::spawn(relay("relay-a", &broker_a).run_until_empty(Shutdown::never()));
    tokio::task::spawn_blocking(move || stall.recv())
        .await
        .unwrap()
        .unwrap();

    let b = relay("relay-b", &broker_b)
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    // A's first claim is one row (row sizes are unknown before a claim); its
    // mark may or may not have landed before the stall. The stalled claim is B's.
    assert!(
        b.published >= ROWS as u64 - 1,
        "relay B took the expired claim: {b:?}"
    );
    resume.send(()).unwrap();
    let a = a.await.unwrap().unwrap();
    assert_eq!(
        a.published + b.published,
        ROWS as u64,
        "relay A's late confirms mark nothing of B's rows: {a:?} {b:?}"
    );

    let rows = published::Entity::find().all(&t.db).await.unwrap();
    assert!(
        rows.iter()
            .all(|r| r.status == Status::Succeeded && r.claim_token.is_none())
    );
    let sent = transitions(&t.db, 1, 2).await;
    assert_eq!(sent.len(), ROWS);
    assert!(
        sent.iter().all(|n| *n == 1),
        "each row marked sent once: {sent:?}"
    );
    assert!(
        transitions(&t.db, 2, 1).await.is_empty(),
        "no sent row moved back"
    );
    assert_eq!(
        broker_a.confirmed().len(),
        ROWS,
        "A's sends were confirmed, late"
    );
    assert_eq!(broker_b.confirmed().len(), ROWS);
}

/// Rows no relay holds or that are due, as of the manual clock.
async fn claimable(t: &TestDb, clock: &Clock) -> i64 {
    t.db.query_one_raw(Statement::from_sql_and_values(
        t.db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM published WHERE status = 1 AND next_attempt_at <= ?",
        vec![clock.now().into()],
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}

/// Confirms slower than the lease: the relay renews its claims while they
/// are out, so no other relay could take the rows and nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_confirms_are_slow() {
    let t = TestDb::new(Backend::Sqlite).await;
    write_messages(&t.db, "/topic/renew", ROWS).await;
    let broker = MemoryBroker::new();
    broker.bind("renew", "/topic/renew").unwrap();
    let clock = Clock::manual();
    broker.script_publishes(|_| PublishFault::Hold);
    let a = tokio::spawn(
        Relay::new(t.db.clone(), settings(&t.url))
            .with_transport(broker.clone())
            .with_clock(clock.clone())
            .run_until_empty(Shutdown::never()),
    );
    common::eventually(Duration::from_secs(10), "every row sent", || async {
        broker.publishes().len() == ROWS
    })
    .await;
    // 40 s, then 40 s more, with the confirms out: the first lease (60 s)
    // would be over; each time the relay renews before it is.
    for _ in 0..2 {
        clock.advance(Duration::from_secs(40));
        common::eventually(Duration::from_secs(10), "leases renewed", || async {
            claimable(&t, &clock).await == 0
                && claimable_at(&t, &clock, Duration::from_secs(50)).await == 0
        })
        .await;
    }
    assert_eq!(
        broker.publishes().values().sum::<u32>(),
        ROWS as u32,
        "nothing sent twice"
    );
    broker.release_held();
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.published, ROWS as u64);
}

/// Rows claimable `ahead` from now.
async fn claimable_at(t: &TestDb, clock: &Clock, ahead: Duration) -> i64 {
    let at = clock.now() + chrono::Duration::from_std(ahead).unwrap();
    t.db.query_one_raw(Statement::from_sql_and_values(
        t.db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM published WHERE status = 1 AND next_attempt_at <= ?",
        vec![at.into()],
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}
