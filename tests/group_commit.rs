//! Group commit against real RabbitMQ on every database: a batch's callbacks
//! share one transaction, what fails fails alone, a failed commit gives the
//! batch back, duplicates cost nothing, shutdown never half-acks.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::amqp::TestBroker;
use common::{Backend, TestDb, eventually, received_count, settings};
use outbox_core::entity::received;
use outbox_core::{
    Batch, BatchResult, Consumer, ConsumerReport, Handler, Payload, Settings, ShutdownTrigger,
    callback, find_callback, headers, shutdown_channel,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement, Value};
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
    a_failing_callback_fails_alone_and_the_rest_save_once,
    duplicates_inside_and_across_batches_are_saved_once,
    shutdown_mid_batch_finishes_the_batch,
    shutdown_timeout_mid_batch_gives_the_whole_batch_back,
    a_constraint_violation_rolls_back_its_received_row,
    a_batch_callback_writes_set_based_and_nacks_one,
    a_failing_batch_callback_runs_each_message_alone,
);

mod killed {
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres() {
        super::a_failed_commit_redelivers_the_batch(super::Backend::Postgres).await
    }
    #[tokio::test(flavor = "multi_thread")]
    async fn mariadb() {
        super::a_failed_commit_redelivers_the_batch(super::Backend::MariaDb).await
    }
}

struct Running {
    trigger: ShutdownTrigger,
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

/// A queue of its own with `ids` waiting in it, and a consumer for it that
/// batches `batch` at a time (waiting up to a second to fill one, so the
/// batches are exactly what the test sends).
struct Setup {
    t: TestDb,
    broker: TestBroker,
    rk: String,
    destination: String,
}

impl Setup {
    async fn new(backend: Backend) -> Setup {
        let t = TestDb::new(backend).await;
        t.db.execute_unprepared("CREATE TABLE notes (k VARCHAR(100) PRIMARY KEY)")
            .await
            .unwrap();
        let rk = format!("batch.{}", Uuid::new_v4().simple());
        Setup {
            destination: format!("/topic/{rk}"),
            t,
            broker: TestBroker::connect().await,
            rk,
        }
    }

    fn settings(&self, batch: usize) -> Settings {
        let mut settings = settings(&self.t.url);
        settings.consumer.batch_size = batch;
        settings.consumer.batch_wait = Duration::from_secs(1);
        settings.consumer.retry_wait = Duration::from_millis(50);
        settings
    }

    async fn send(&self, ids: &[&str]) {
        for id in ids {
            self.broker
                .send("amq.topic", &self.rk, b"{}", &[(headers::MSG_ID, id)])
                .await;
        }
    }

    fn start(&self, consumer: Consumer) -> Running {
        let (trigger, shutdown) = shutdown_channel();
        Running {
            trigger,
            task: tokio::spawn(async move { consumer.run(shutdown).await.expect("consumer run") }),
        }
    }

    async fn received_ids(&self) -> BTreeSet<String> {
        received::Entity::find()
            .all(&self.t.db)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|row| row.msg_id)
            .collect()
    }

    async fn notes(&self) -> BTreeSet<String> {
        let rows = self
            .t
            .db
            .query_all_raw(Statement::from_string(
                self.t.db.get_database_backend(),
                "SELECT k FROM notes",
            ))
            .await
            .unwrap();
        rows.iter()
            .map(|row| row.try_get::<String>("", "k").unwrap())
            .collect()
    }

    async fn dead_letters(&self, expected: usize) -> BTreeSet<String> {
        self.broker
            .take(
                &format!("DLQ.{}", self.rk),
                expected,
                Duration::from_millis(300),
            )
            .await
            .into_iter()
            .map(|m| m.headers[headers::MSG_ID].clone())
            .collect()
    }

    async fn cleanup(self) {
        self.broker.delete_queue(&self.rk).await;
        self.broker.delete_queue(&format!("DLQ.{}", self.rk)).await;
    }
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i:02}")).collect()
}

fn refs(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

/// The callback's own write, through whatever connection it is given.
async fn note(conn: &impl ConnectionTrait, key: &str) -> Result<(), sea_orm::DbErr> {
    let sql = match conn.get_database_backend() {
        DbBackend::Postgres => "INSERT INTO notes (k) VALUES ($1)",
        _ => "INSERT INTO notes (k) VALUES (?)",
    };
    conn.execute_raw(Statement::from_sql_and_values(
        conn.get_database_backend(),
        sql,
        [Value::from(key.to_owned())],
    ))
    .await
    .map(|_| ())
}

/// A batch of 20 where one callback fails and one nacks: those two go to
/// `DLQ.<queue>`, the 18 others are saved once (their own write with them)
/// and acked.
async fn a_failing_callback_fails_alone_and_the_rest_save_once(backend: Backend) {
    let s = Setup::new(backend).await;
    let consumer = Consumer::new(
        s.t.db.clone(),
        s.settings(20),
        &s.destination,
        None,
        |payload: Payload| async move {
            let id = payload.msg_id().unwrap().to_owned();
            let txn = payload.begin().await?;
            note(&txn, &id).await?;
            match id.as_str() {
                "m03" => Err("m03 always fails".into()),
                "m07" => Ok(payload.nack("m07 is refused")),
                _ => Ok(payload.save(txn).await?),
            }
        },
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(20);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(20), "queue drained", || async {
        s.broker.message_count(&s.rk).await == 0 && received_count(&s.t.db).await == 18
    })
    .await;
    let report = running.stop().await;
    let good: BTreeSet<String> = all
        .iter()
        .filter(|id| *id != "m03" && *id != "m07")
        .cloned()
        .collect();
    assert_eq!(s.received_ids().await, good);
    assert_eq!(
        s.notes().await,
        good,
        "the failed ones' own writes rolled back"
    );
    assert_eq!(
        s.dead_letters(2).await,
        BTreeSet::from(["m03".to_owned(), "m07".to_owned()])
    );
    assert_eq!(
        (report.saved, report.dead_lettered, report.requeued),
        (18, 2, 0)
    );
    s.cleanup().await;
}

/// Ids repeated inside one batch and again in a later one: one row each,
/// each callback run once, the rest acked as duplicates.
async fn duplicates_inside_and_across_batches_are_saved_once(backend: Backend) {
    let s = Setup::new(backend).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let consumer = Consumer::new(s.t.db.clone(), s.settings(5), &s.destination, None, {
        let calls = Arc::clone(&calls);
        move |payload: Payload| {
            let calls = Arc::clone(&calls);
            async move {
                calls
                    .lock()
                    .unwrap()
                    .push(payload.msg_id().unwrap().to_owned());
                let txn = payload.begin().await?;
                note(&txn, payload.msg_id().unwrap()).await?;
                Ok(payload.save(txn).await?)
            }
        }
    })
    .unwrap();
    consumer.declare().await.unwrap();
    s.send(&["a", "b", "a", "c", "b"]).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(20), "first batch handled", || async {
        s.broker.message_count(&s.rk).await == 0 && received_count(&s.t.db).await == 3
    })
    .await;
    s.send(&["c", "a", "b"]).await;
    let report = running.stop().await;
    // stop() waits for what was taken; anything not yet taken stays queued
    let left = s.broker.message_count(&s.rk).await;
    assert_eq!(
        report.saved + report.duplicates + u64::from(left),
        8,
        "{report:?}"
    );
    assert_eq!(report.saved, 3, "{report:?}");
    let mut calls = calls.lock().unwrap().clone();
    calls.sort();
    assert_eq!(calls, ["a", "b", "c"], "a duplicate reached the callback");
    assert_eq!(
        s.received_ids().await,
        BTreeSet::from(["a", "b", "c"].map(str::to_owned))
    );
    assert_eq!(s.notes().await.len(), 3);
    assert_eq!(report.dead_lettered, 0);
    s.cleanup().await;
}

/// Shutdown while a batch's callbacks run: the batch completes, commits and
/// is acked; nothing stays in the queue, nothing is half done.
async fn shutdown_mid_batch_finishes_the_batch(backend: Backend) {
    let s = Setup::new(backend).await;
    let started = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Notify::new());
    let consumer = Consumer::new(s.t.db.clone(), s.settings(10), &s.destination, None, {
        let (started, gate) = (Arc::clone(&started), Arc::clone(&gate));
        move |payload: Payload| {
            let (started, gate) = (Arc::clone(&started), Arc::clone(&gate));
            async move {
                let txn = payload.begin().await?;
                note(&txn, payload.msg_id().unwrap()).await?;
                if payload.msg_id() == Some("m04") {
                    started.notify_one();
                    gate.notified().await;
                }
                Ok(payload.save(txn).await?)
            }
        }
    })
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(10);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    started.notified().await;
    running.trigger.trigger();
    gate.notify_one();
    let report = running.stop().await;
    assert_eq!((report.saved, report.requeued), (10, 0), "{report:?}");
    assert_eq!(s.received_ids().await.len(), 10);
    assert_eq!(s.notes().await.len(), 10);
    eventually(
        Duration::from_secs(10),
        "nothing left in the queue",
        || async { s.broker.message_count(&s.rk).await == 0 },
    )
    .await;
    s.cleanup().await;
}

/// Shutdown whose timeout runs out mid-batch: the transaction rolls back and
/// every delivery of the batch goes back to the queue, none acked; the next
/// run saves each once.
async fn shutdown_timeout_mid_batch_gives_the_whole_batch_back(backend: Backend) {
    let s = Setup::new(backend).await;
    let started = Arc::new(tokio::sync::Notify::new());
    let hang = Arc::new(AtomicBool::new(true));
    let callback = {
        let (started, hang) = (Arc::clone(&started), Arc::clone(&hang));
        move |payload: Payload| {
            let (started, hang) = (Arc::clone(&started), Arc::clone(&hang));
            async move {
                let txn = payload.begin().await?;
                note(&txn, payload.msg_id().unwrap()).await?;
                if payload.msg_id() == Some("m04") && hang.load(Ordering::SeqCst) {
                    started.notify_one();
                    std::future::pending::<()>().await;
                }
                Ok(payload.save(txn).await?)
            }
        }
    };
    let mut settings = s.settings(10);
    settings.consumer.shutdown_timeout = Some(Duration::from_millis(200));
    let consumer = Consumer::new(
        s.t.db.clone(),
        settings.clone(),
        &s.destination,
        None,
        callback.clone(),
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(10);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    started.notified().await;
    let report = running.stop().await;
    assert_eq!((report.saved, report.dead_lettered), (0, 0), "{report:?}");
    assert_eq!(
        received_count(&s.t.db).await,
        0,
        "part of the batch committed"
    );
    assert!(s.notes().await.is_empty());
    eventually(
        Duration::from_secs(10),
        "all ten back in the queue",
        || async { s.broker.message_count(&s.rk).await == 10 },
    )
    .await;

    hang.store(false, Ordering::SeqCst);
    let again = Consumer::new(s.t.db.clone(), settings, &s.destination, None, callback).unwrap();
    let running = s.start(again);
    eventually(Duration::from_secs(20), "all ten saved", || async {
        received_count(&s.t.db).await == 10 && s.broker.message_count(&s.rk).await == 0
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.saved, 10, "{report:?}");
    assert_eq!(s.notes().await.len(), 10);
    s.cleanup().await;
}

/// The received row and the callback's writes are one transaction: a write
/// that violates a constraint fails that message alone, with no received
/// row; a callback that writes and then nacks leaves neither.
async fn a_constraint_violation_rolls_back_its_received_row(backend: Backend) {
    let s = Setup::new(backend).await;
    let consumer = Consumer::new(
        s.t.db.clone(),
        s.settings(4),
        &s.destination,
        None,
        |payload: Payload| async move {
            let id = payload.msg_id().unwrap().to_owned();
            let txn = payload.begin().await?;
            // m1 and m2 write the same key: the second violates it
            let key = if id == "m2" { "m1" } else { id.as_str() };
            note(&txn, key).await?;
            if id == "m4" {
                return Ok(payload.nack("wrote, then refused"));
            }
            Ok(payload.save(txn).await?)
        },
    )
    .unwrap();
    consumer.declare().await.unwrap();
    s.send(&["m1", "m2", "m3", "m4"]).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(20), "queue drained", || async {
        s.broker.message_count(&s.rk).await == 0 && received_count(&s.t.db).await == 2
    })
    .await;
    let report = running.stop().await;
    assert_eq!(
        s.received_ids().await,
        BTreeSet::from(["m1", "m3"].map(str::to_owned))
    );
    assert_eq!(
        s.notes().await,
        BTreeSet::from(["m1", "m3"].map(str::to_owned))
    );
    assert_eq!(
        s.dead_letters(2).await,
        BTreeSet::from(["m2", "m4"].map(str::to_owned))
    );
    assert_eq!((report.saved, report.dead_lettered), (2, 2), "{report:?}");
    s.cleanup().await;
}

/// The batch's connection is killed after its last callback, so its commit
/// fails: every delivery goes back to the queue, and in the end each is
/// stored exactly once.
async fn a_failed_commit_redelivers_the_batch(backend: Backend) {
    let s = Setup::new(backend).await;
    let killed = Arc::new(AtomicBool::new(false));
    let db = s.t.db.clone();
    let consumer = Consumer::new(s.t.db.clone(), s.settings(10), &s.destination, None, {
        let killed = Arc::clone(&killed);
        move |payload: Payload| {
            let (killed, db) = (Arc::clone(&killed), db.clone());
            async move {
                let txn = payload.begin().await?;
                note(&txn, payload.msg_id().unwrap()).await?;
                if payload.msg_id() == Some("m09") && !killed.swap(true, Ordering::SeqCst) {
                    kill_own_connection(&txn, &db).await;
                }
                Ok(payload.save(txn).await?)
            }
        }
    })
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(10);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(30), "all ten saved", || async {
        received_count(&s.t.db).await == 10 && s.broker.message_count(&s.rk).await == 0
    })
    .await;
    let report = running.stop().await;
    assert!(killed.load(Ordering::SeqCst));
    assert_eq!(report.requeued, 10, "the whole batch went back: {report:?}");
    assert_eq!(report.saved, 10, "{report:?}");
    assert_eq!(s.received_ids().await.len(), 10);
    assert_eq!(s.notes().await.len(), 10);
    assert_eq!(report.dead_lettered, 0);
    s.cleanup().await;
}

/// End the session behind `txn` from another connection.
async fn kill_own_connection(txn: &impl ConnectionTrait, db: &DatabaseConnection) {
    let backend = txn.get_database_backend();
    let (whoami, kill) = match backend {
        DbBackend::Postgres => (
            "SELECT pg_backend_pid()::bigint AS id",
            "SELECT pg_terminate_backend($1::int)",
        ),
        _ => (
            "SELECT CAST(CONNECTION_ID() AS SIGNED) AS id",
            "KILL CONNECTION ?",
        ),
    };
    let id: i64 = txn
        .query_one_raw(Statement::from_string(backend, whoami))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "id")
        .unwrap();
    db.execute_raw(Statement::from_sql_and_values(
        backend,
        kill,
        [Value::from(id)],
    ))
    .await
    .unwrap();
}

/// On PostgreSQL the batch is visibly one transaction: its callbacks see one
/// transaction id and its rows carry one `xmin`; with `batch_size = 1`
/// every message has its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_one_transaction() {
    for (batch, expected) in [(10, 1), (1, 10)] {
        let s = Setup::new(Backend::Postgres).await;
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let consumer = Consumer::new(s.t.db.clone(), s.settings(batch), &s.destination, None, {
            let seen = Arc::clone(&seen);
            move |payload: Payload| {
                let seen = Arc::clone(&seen);
                async move {
                    let txn = payload.begin().await?;
                    let row = txn
                        .query_one_raw(Statement::from_string(
                            DbBackend::Postgres,
                            "SELECT txid_current()::bigint AS id",
                        ))
                        .await?
                        .unwrap();
                    seen.lock().unwrap().insert(row.try_get::<i64>("", "id")?);
                    Ok(payload.save(txn).await?)
                }
            }
        })
        .unwrap();
        consumer.declare().await.unwrap();
        let all = ids(10);
        s.send(&refs(&all)).await;
        let running = s.start(consumer);
        eventually(Duration::from_secs(20), "all ten saved", || async {
            received_count(&s.t.db).await == 10
        })
        .await;
        running.stop().await;
        assert_eq!(seen.lock().unwrap().len(), expected, "batch_size {batch}");
        let xmins: i64 =
            s.t.db
                .query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT count(DISTINCT xmin::text)::bigint AS n FROM received",
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get("", "n")
                .unwrap();
        assert_eq!(xmins, expected as i64, "batch_size {batch}");
        s.cleanup().await;
    }
}

/// Every key in one statement: what a batch callback is for.
async fn notes_at_once(conn: &impl ConnectionTrait, keys: &[String]) -> Result<(), sea_orm::DbErr> {
    if keys.is_empty() {
        return Ok(());
    }
    let backend = conn.get_database_backend();
    let places: Vec<String> = (1..=keys.len())
        .map(|i| match backend {
            DbBackend::Postgres => format!("(${i})"),
            _ => "(?)".to_owned(),
        })
        .collect();
    conn.execute_raw(Statement::from_sql_and_values(
        backend,
        format!("INSERT INTO notes (k) VALUES {}", places.join(", ")),
        keys.iter().map(|k| Value::from(k.clone())),
    ))
    .await
    .map(|_| ())
}

/// A batch callback gets the batch's 20 new messages in one call, writes
/// their rows in one statement, nacks one: that one goes to `DLQ.<queue>`
/// with nothing of it stored, the 19 others are saved once with their rows.
/// A later delivery of a saved id is acked without reaching the callback.
async fn a_batch_callback_writes_set_based_and_nacks_one(backend: Backend) {
    let s = Setup::new(backend).await;
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let callback = {
        let sizes = Arc::clone(&sizes);
        move |batch: Batch| {
            let sizes = Arc::clone(&sizes);
            async move {
                sizes.lock().unwrap().push(batch.len());
                let txn = batch.begin().await?;
                let mut keys = Vec::new();
                for payload in batch.payloads() {
                    let id = payload.msg_id().unwrap().to_owned();
                    if id == "m07" {
                        batch.nack(payload, "m07 is refused")?;
                    } else {
                        keys.push(id);
                    }
                }
                notes_at_once(&txn, &keys).await?;
                Ok(batch.save(txn).await?)
            }
        }
    };
    let consumer = Consumer::new(
        s.t.db.clone(),
        s.settings(20),
        &s.destination,
        None,
        Handler::batch(callback),
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(20);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(20), "queue drained", || async {
        s.broker.message_count(&s.rk).await == 0 && received_count(&s.t.db).await == 19
    })
    .await;
    s.send(&["m01"]).await;
    eventually(Duration::from_secs(20), "the repeat acked", || async {
        s.broker.message_count(&s.rk).await == 0
    })
    .await;
    let report = running.stop().await;
    let good: BTreeSet<String> = all.iter().filter(|id| *id != "m07").cloned().collect();
    assert_eq!(
        s.received_ids().await,
        good,
        "the nacked one left no received row"
    );
    assert_eq!(s.notes().await, good);
    assert_eq!(s.dead_letters(1).await, BTreeSet::from(["m07".to_owned()]));
    assert_eq!(
        (report.saved, report.dead_lettered, report.duplicates),
        (19, 1, 1),
        "{report:?}"
    );
    assert_eq!(
        *sizes.lock().unwrap(),
        [20],
        "one call for the batch, none for the repeat"
    );
    s.cleanup().await;
}

/// A batch callback that fails (a constraint its set-based write violates)
/// or panics because of one message rolls the batch back; each message then
/// runs in a batch of its own, where only the culprits fail: m03 (its key is
/// taken) and m05 (it panics) go to `DLQ.<queue>`, the 8 others are saved.
async fn a_failing_batch_callback_runs_each_message_alone(backend: Backend) {
    let s = Setup::new(backend).await;
    note(&s.t.db, "m03").await.unwrap();
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let callback = {
        let sizes = Arc::clone(&sizes);
        move |batch: Batch| {
            let sizes = Arc::clone(&sizes);
            async move {
                sizes.lock().unwrap().push(batch.len());
                let txn = batch.begin().await?;
                let keys: Vec<String> = batch
                    .payloads()
                    .iter()
                    .map(|p| p.msg_id().unwrap().to_owned())
                    .collect();
                notes_at_once(&txn, &keys).await?;
                assert!(!keys.contains(&"m05".to_owned()), "m05 breaks the callback");
                Ok(batch.save(txn).await?)
            }
        }
    };
    let consumer = Consumer::new(
        s.t.db.clone(),
        s.settings(10),
        &s.destination,
        None,
        Handler::batch(callback),
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(10);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(20), "queue drained", || async {
        s.broker.message_count(&s.rk).await == 0 && received_count(&s.t.db).await == 8
    })
    .await;
    let report = running.stop().await;
    let good: BTreeSet<String> = all
        .iter()
        .filter(|id| *id != "m03" && *id != "m05")
        .cloned()
        .collect();
    assert_eq!(s.received_ids().await, good);
    let mut notes = good.clone();
    notes.insert("m03".to_owned()); // written before the test
    assert_eq!(
        s.notes().await,
        notes,
        "the failed runs' writes rolled back"
    );
    assert_eq!(
        s.dead_letters(2).await,
        BTreeSet::from(["m03".to_owned(), "m05".to_owned()])
    );
    assert_eq!(
        (report.saved, report.dead_lettered, report.requeued),
        (8, 2, 0),
        "{report:?}"
    );
    let mut sizes = sizes.lock().unwrap().clone();
    sizes.sort_unstable();
    assert_eq!(
        sizes,
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 10],
        "the batch, then each alone"
    );
    s.cleanup().await;
}

/// What `#[callback(batch)]` registers: every message of the batch noted.
#[callback(batch)]
pub async fn note_every_one(batch: Batch) -> BatchResult {
    let txn = batch.begin().await?;
    let keys: Vec<String> = batch
        .payloads()
        .iter()
        .filter_map(|p| p.msg_id().map(str::to_owned))
        .collect();
    notes_at_once(&txn, &keys).await?;
    Ok(batch.save(txn).await?)
}

/// `#[callback(batch)]` is found by its path, like `outbox-cli subscribe`
/// finds it, and runs per batch.
#[tokio::test(flavor = "multi_thread")]
async fn a_registered_batch_callback_runs_per_batch() {
    let s = Setup::new(Backend::Postgres).await;
    let handler = find_callback("group_commit::note_every_one").unwrap();
    assert!(matches!(handler, Handler::Batch(_)), "{handler:?}");
    let consumer = Consumer::new(
        s.t.db.clone(),
        s.settings(10),
        &s.destination,
        None,
        handler,
    )
    .unwrap();
    consumer.declare().await.unwrap();
    let all = ids(10);
    s.send(&refs(&all)).await;
    let running = s.start(consumer);
    eventually(Duration::from_secs(20), "all ten saved", || async {
        received_count(&s.t.db).await == 10
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.saved, 10, "{report:?}");
    assert_eq!(
        s.notes().await,
        all.iter().cloned().collect::<BTreeSet<_>>()
    );
    // one transaction: all ten rows carry one xmin
    let xmins: i64 =
        s.t.db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(DISTINCT xmin::text)::bigint AS n FROM notes",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "n")
            .unwrap();
    assert_eq!(xmins, 1);
    s.cleanup().await;
}
