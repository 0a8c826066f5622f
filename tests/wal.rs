//! Log-tailing capture (`relay.capture = "wal"`) against the machine's
//! PostgreSQL (wal_level = logical, set by scripts/services.sh) and NATS
//! JetStream: every test has its own database, slot, publication and stream.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::nats::{PrivateNats, TestStream, nats_url};
use common::private::{Private, Server};
use common::{Backend, TestDb, cli, eventually, settings, signal, status_counts, write_messages};
use outbox_core::{Capture, Relay, Settings, Status, shutdown_channel};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

/// A database with the outbox tables, a slot and publication of its own,
/// and a stream of its own; the slot is dropped at the end (a database
/// with a slot cannot be dropped).
struct Wal {
    slot: SlotGuard,
    stream: TestStream,
    settings: Settings,
    t: TestDb,
}

/// A slot's name, and the admin URL of its server.
struct SlotGuard(String, String);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let sql = format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{0}' AND active_pid IS NOT NULL; \
             SELECT pg_sleep(0.2); \
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{0}'",
            self.0
        );
        for _ in 0..20 {
            let done = std::process::Command::new("psql")
                .args(["-d", &self.1, "-qAtc", &sql])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if done {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Wal {
    async fn new() -> Wal {
        let t = TestDb::new(Backend::Postgres).await;
        Wal::with(t, common::postgres_admin_url(), &nats_url()).await
    }

    /// The same on another PostgreSQL server (a private cluster), given its
    /// admin URL.
    async fn on(admin_url: &str) -> Wal {
        let t = TestDb::on_postgres(admin_url).await;
        Wal::with(t, admin_url.to_owned(), &nats_url()).await
    }

    /// The same with the stream on another NATS server.
    async fn to_nats(url: &str) -> Wal {
        let t = TestDb::new(Backend::Postgres).await;
        Wal::with(t, common::postgres_admin_url(), url).await
    }

    async fn with(t: TestDb, admin_url: String, nats: &str) -> Wal {
        let mut settings = settings(&t.url);
        let stream = TestStream::create(nats, &mut settings).await;
        settings.relay.capture = Capture::Wal;
        settings.wal.slot = format!("outbox_{}", stream.prefix);
        settings.wal.publication = "outbox_test".to_owned();
        let setup = outbox_core::wal_setup(&t.db, &settings.wal)
            .await
            .expect("wal setup");
        assert!(setup.slot_created && setup.publication_created);
        Wal {
            slot: SlotGuard(settings.wal.slot.clone(), admin_url),
            stream,
            settings,
            t,
        }
    }

    /// Run a relay in this process until the returned trigger fires.
    fn start(&self, settings: Settings) -> Running {
        let (trigger, shutdown) = shutdown_channel();
        let relay = Relay::new(self.t.db.clone(), settings);
        Running {
            trigger,
            task: tokio::spawn(relay.run(shutdown)),
        }
    }

    /// `outbox-cli publish` in `wal` mode on this database, slot and stream.
    fn spawn_cli_relay(&self) -> tokio::process::Child {
        self.cli_relay()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start outbox-cli publish")
    }

    fn cli_relay(&self) -> tokio::process::Command {
        let mut command = cli(&self.t.url);
        command
            .env("AMQP_URL", &self.stream.url)
            .env("OUTBOX_RELAY_CAPTURE", "wal")
            .env("OUTBOX_WAL_SLOT", &self.settings.wal.slot)
            .env("OUTBOX_WAL_PUBLICATION", &self.settings.wal.publication)
            .env("OUTBOX_NATS_STREAM", &self.stream.name)
            .env("OUTBOX_NATS_SUBJECT_PREFIX", &self.stream.prefix)
            .arg("publish");
        command
    }

    async fn confirmed_flush_lsn(&self) -> i64 {
        let row = self
            .t
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                vec![self.slot.0.clone().into()],
            ))
            .await
            .unwrap()
            .expect("the slot exists");
        row.try_get_by_index(0).unwrap()
    }

    /// The server's clock (µs since the epoch) once the walsender reading
    /// this slot has sent everything up to `lsn`.
    async fn when_sent(&self, lsn: i64) -> i64 {
        let sql = "SELECT (extract(epoch FROM now()) * 1e6)::bigint FROM pg_stat_replication r \
                   JOIN pg_replication_slots s ON s.active_pid = r.pid \
                   WHERE s.slot_name = $1 AND (r.sent_lsn - '0/0'::pg_lsn)::bigint >= $2";
        let at = std::sync::atomic::AtomicI64::new(0);
        eventually(
            Duration::from_secs(60),
            "the walsender sent the writes",
            || async {
                let row = self
                    .t
                    .db
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        sql,
                        vec![self.slot.0.clone().into(), lsn.into()],
                    ))
                    .await
                    .unwrap();
                match row {
                    Some(row) => {
                        at.store(
                            row.try_get_by_index(0).unwrap(),
                            std::sync::atomic::Ordering::SeqCst,
                        );
                        true
                    }
                    None => false,
                }
            },
        )
        .await;
        at.into_inner()
    }

    /// When the relay's last status update arrived (µs since the epoch).
    async fn last_reply_micros(&self) -> i64 {
        let sql = "SELECT (extract(epoch FROM r.reply_time) * 1e6)::bigint FROM pg_stat_replication r \
                   JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1";
        self.t
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                vec![self.slot.0.clone().into()],
            ))
            .await
            .unwrap()
            .map(|row| row.try_get_by_index(0).unwrap())
            .unwrap_or(0)
    }

    async fn stream_ids(&self) -> Vec<String> {
        self.stream
            .messages()
            .await
            .into_iter()
            .map(|m| m.headers["Nats-Msg-Id"].clone())
            .collect()
    }
}

struct Running {
    trigger: outbox_core::ShutdownTrigger,
    task: tokio::task::JoinHandle<outbox_core::Result<outbox_core::RelayReport>>,
}

impl Running {
    async fn stop(self) -> outbox_core::RelayReport {
        self.trigger.trigger();
        self.task.await.unwrap().expect("relay")
    }
}

/// `n` messages to `destination` in one transaction, only in the WAL.
async fn write_wal(db: &sea_orm::DatabaseConnection, destination: &str, n: usize) -> Vec<Uuid> {
    let txn = db.begin().await.unwrap();
    let messages = (0..n)
        .map(|i| outbox_core::Message::new(destination, serde_json::json!({ "n": i })).unwrap())
        .collect();
    let written = outbox_core::write_to_wal(&txn, messages).await.unwrap();
    txn.commit().await.unwrap();
    written.into_iter().map(|m| m.id).collect()
}

/// `n` messages to `destination` written on `db` (a transaction too).
async fn write_in<C: ConnectionTrait>(db: &C, destination: &str, n: usize) -> Vec<Uuid> {
    let messages = (0..n)
        .map(|i| outbox_core::Message::new(destination, serde_json::json!({ "n": i })).unwrap())
        .collect();
    outbox_core::write_all(db, messages)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.id)
        .collect()
}

async fn current_wal_lsn(db: &sea_orm::DatabaseConnection) -> i64 {
    db.query_one_raw(Statement::from_string(
        DbBackend::Postgres,
        "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint",
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get_by_index(0)
    .unwrap()
}

/// The three emission shapes in commit order, a rolled-back transaction
/// that emits nothing, rows marked SUCCEEDED, and nothing left as a row
/// for the shapes that write none.
#[tokio::test(flavor = "multi_thread")]
async fn every_committed_message_arrives_in_commit_order() {
    let w = Wal::new().await;
    let running = w.start(w.settings.clone());
    let mut expected = Vec::new();
    for round in 0..10 {
        // Rows in `published`, as `#[derive(Publish)]` writes them.
        expected.extend(
            write_messages(&w.t.db, "/topic/orders.created", 20)
                .await
                .into_iter()
                .map(|id| id.to_string()),
        );
        // A transaction that rolls back emits nothing.
        let txn = w.t.db.begin().await.unwrap();
        write_in(&txn, "/topic/orders.rolled_back", 5).await;
        outbox_core::write_to_wal(
            &txn,
            vec![
                outbox_core::Message::new("/topic/orders.rolled_back", serde_json::json!({}))
                    .unwrap(),
            ],
        )
        .await
        .unwrap();
        txn.rollback().await.unwrap();
        // Messages only in the WAL.
        let txn = w.t.db.begin().await.unwrap();
        let messages = (0..5)
            .map(|n| {
                outbox_core::Message::new(
                    "/topic/orders.logged",
                    serde_json::json!({"round": round, "n": n}),
                )
                .unwrap()
            })
            .collect();
        let logged = outbox_core::write_to_wal(&txn, messages).await.unwrap();
        txn.commit().await.unwrap();
        expected.extend(logged.iter().map(|m| m.id.to_string()));
        // Inserted and deleted in one transaction (jetstream-outbox's way).
        let txn = w.t.db.begin().await.unwrap();
        let gone = write_in(&txn, "/topic/orders.gone", 5).await;
        txn.execute_unprepared(&format!(
            "DELETE FROM published WHERE id IN ({})",
            gone.iter()
                .map(|id| format!("'{id}'"))
                .collect::<Vec<_>>()
                .join(",")
        ))
        .await
        .unwrap();
        txn.commit().await.unwrap();
        expected.extend(gone.iter().map(Uuid::to_string));
    }
    eventually(
        Duration::from_secs(120),
        "300 messages in the stream",
        || async { w.stream.count().await >= 300 },
    )
    .await;
    let report = running.stop().await;
    let ids = w.stream_ids().await;
    assert_eq!(
        ids, expected,
        "every committed message once, in commit order"
    );
    assert_eq!(report.published, 300);
    assert_eq!(
        status_counts(&w.t.db).await,
        [(Status::Succeeded.code(), 200)].into_iter().collect(),
        "rows of published marked sent; the other shapes left no row"
    );
    let logged = w
        .stream
        .messages()
        .await
        .into_iter()
        .find(|m| m.subject.ends_with(".orders.logged"))
        .unwrap();
    assert_eq!(
        logged.headers["dop-msg-destination"],
        "/topic/orders.logged"
    );
    assert_eq!(logged.headers["dop-msg-id"], logged.headers["Nats-Msg-Id"]);
    let body: serde_json::Value = serde_json::from_slice(&logged.body).unwrap();
    assert_eq!(body, serde_json::json!({"round": 0, "n": 0}));
}

/// An aborted transaction of 100,000 inserts (far past
/// logical_decoding_work_mem) emits nothing; the next commit goes through.
#[tokio::test(flavor = "multi_thread")]
async fn an_aborted_transaction_of_100000_inserts_emits_nothing() {
    let w = Wal::new().await;
    let running = w.start(w.settings.clone());
    let txn = w.t.db.begin().await.unwrap();
    txn.execute_unprepared(
        "INSERT INTO published (id, destination, body, added, expires_at, retry, status, headers, next_attempt_at) \
         SELECT gen_random_uuid(), '/topic/aborted', jsonb_build_object('n', n, 'pad', repeat('x', 500)), now(), now(), 0, 1, '{}'::jsonb, now() \
         FROM generate_series(1, 100000) n",
    )
    .await
    .unwrap();
    txn.rollback().await.unwrap();
    let marker = write_messages(&w.t.db, "/topic/after", 1).await;
    eventually(
        Duration::from_secs(60),
        "the marker in the stream",
        || async { w.stream.count().await >= 1 },
    )
    .await;
    running.stop().await;
    assert_eq!(
        w.stream_ids().await,
        vec![marker[0].to_string()],
        "only the committed one"
    );
}

/// A message JetStream refuses (no stream for its subject) is kept as a
/// row: the claim path retries it and it ends FAILED with the reason, while
/// the others flow from the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_message_becomes_a_row_the_claim_path_fails() {
    let w = Wal::new().await;
    let mut settings = w.settings.clone();
    outbox_core::ensure_stream(&{
        let mut narrow = settings.clone();
        narrow.nats.stream_subjects = vec![format!("{}.good.>", w.stream.prefix)];
        narrow
    })
    .await
    .unwrap();
    settings.relay.max_retry_attempts = 3;
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.relay.wait_retry = Duration::ZERO;
    let running = w.start(settings);
    let txn = w.t.db.begin().await.unwrap();
    let stray = outbox_core::write_to_wal(
        &txn,
        vec![
            outbox_core::Message::new("/topic/stray.x", serde_json::json!({"lost": false}))
                .unwrap(),
        ],
    )
    .await
    .unwrap();
    txn.commit().await.unwrap();
    let good = write_messages(&w.t.db, "/topic/good.x", 1000).await;
    eventually(
        Duration::from_secs(60),
        "the stray one FAILED, the others sent",
        || async {
            status_counts(&w.t.db).await
                == [(Status::Failed.code(), 1), (Status::Succeeded.code(), 1000)]
                    .into_iter()
                    .collect()
        },
    )
    .await;
    running.stop().await;
    let failed = outbox_core::failed_message(&w.t.db, stray[0].id)
        .await
        .unwrap();
    assert_eq!(failed.retry, 3, "every attempt counted");
    assert!(
        failed
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("stream"),
        "{:?}",
        failed.last_error
    );
    assert_eq!(failed.body, serde_json::json!({"lost": false}));
    let ids: HashSet<String> = w.stream_ids().await.into_iter().collect();
    assert_eq!(ids.len(), 1000);
    assert!(good.iter().all(|id| ids.contains(&id.to_string())));
}

/// With nothing of ours to send, the relay still confirms the server's
/// position, so the slot does not pin the WAL other tables write.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_relay_advances_the_slot_while_others_write() {
    let w = Wal::new().await;
    let running = w.start(w.settings.clone());
    w.t.db
        .execute_unprepared("CREATE TABLE elsewhere (n int)")
        .await
        .unwrap();
    let before = current_wal_lsn(&w.t.db).await;
    let writer = {
        let db = w.t.db.clone();
        tokio::spawn(async move {
            for n in 0..600 {
                db.execute_unprepared(&format!("INSERT INTO elsewhere VALUES ({n})"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    eventually(
        Duration::from_secs(60),
        "confirmed_flush_lsn past the writes' start",
        || async { w.confirmed_flush_lsn().await > before },
    )
    .await;
    writer.abort();
    running.stop().await;
    assert_eq!(w.stream.count().await, 0);
}

/// jetstream-outbox's table, unchanged: subject `<prefix>.<aggregatetype>.<aggregateid>`,
/// `Nats-Msg-Id` = id, the payload as the body; rows deleted in their transaction.
#[tokio::test(flavor = "multi_thread")]
async fn a_jetstream_outbox_table_is_relayed_as_jetstream_outbox_sends_it() {
    let w = Wal::new().await;
    w.t.db
        .execute_unprepared(
            "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, payload jsonb NOT NULL); \
             CREATE PUBLICATION jso FOR TABLE outbox",
        )
        .await
        .unwrap();
    let mut settings = w.settings.clone();
    settings.wal.publication = "jso".to_owned();
    let running = w.start(settings);
    let mut expected = Vec::new();
    for n in 0..20 {
        let id = Uuid::new_v4();
        let payload = format!(r#"{{"order": {n}, "total": "1{n}.50"}}"#);
        let txn = w.t.db.begin().await.unwrap();
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO outbox VALUES ($1, 'orders', $2, $3::jsonb)",
            vec![id.into(), format!("o{n}").into(), payload.clone().into()],
        ))
        .await
        .unwrap();
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "DELETE FROM outbox WHERE id = $1",
            vec![id.into()],
        ))
        .await
        .unwrap();
        txn.commit().await.unwrap();
        // What PostgreSQL prints for the jsonb, which jetstream-outbox sends.
        let printed: String =
            w.t.db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT $1::jsonb::text",
                    vec![payload.into()],
                ))
                .await
                .unwrap()
                .unwrap()
                .try_get_by_index(0)
                .unwrap();
        expected.push((
            format!("{}.orders.o{n}", w.stream.prefix),
            id.to_string(),
            printed,
        ));
    }
    eventually(Duration::from_secs(120), "20 messages", || async {
        w.stream.count().await >= 20
    })
    .await;
    running.stop().await;
    let got: Vec<(String, String, String)> = w
        .stream
        .messages()
        .await
        .into_iter()
        .map(|m| {
            (
                m.subject,
                m.headers["Nats-Msg-Id"].clone(),
                String::from_utf8(m.body).unwrap(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    let left: i64 =
        w.t.db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(*) FROM outbox",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index(0)
            .unwrap();
    assert_eq!(left, 0, "no rows accumulate");
}

/// kill -9 of the relay mid-stream, then a new one, over both shapes that
/// come from the stream (rows, and messages only in the WAL, which have no
/// row to fall back on): every id in the stream, and JetStream dropped the
/// repeats (zero duplicate entries).
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_stream_resumes_from_the_slot() {
    let w = Wal::new().await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.extend(write_messages(&w.t.db, "/topic/orders.created", 500).await);
        let txn = w.t.db.begin().await.unwrap();
        let messages = (0..500)
            .map(|n| {
                outbox_core::Message::new("/topic/orders.wal", serde_json::json!({ "n": n }))
                    .unwrap()
            })
            .collect();
        let written = outbox_core::write_to_wal(&txn, messages).await.unwrap();
        txn.commit().await.unwrap();
        ids.extend(written.into_iter().map(|m| m.id));
    }
    let mut first = w.spawn_cli_relay();
    eventually(Duration::from_secs(60), "some in the stream", || async {
        w.stream.count().await >= 2_000
    })
    .await;
    signal(&first, "KILL");
    let _ = first.wait().await;
    let at_kill = w.stream.count().await;
    assert!(at_kill < 20_000, "killed mid-stream ({at_kill} sent)");
    let mut second = w.spawn_cli_relay();
    eventually(
        Duration::from_secs(120),
        "all 20,000 in the stream, the 10,000 rows marked",
        || async {
            w.stream.count().await >= 20_000
                && status_counts(&w.t.db)
                    .await
                    .get(&(Status::Succeeded.code()))
                    == Some(&10_000)
        },
    )
    .await;
    signal(&second, "TERM");
    let _ = second.wait().await;
    let stream_ids = w.stream_ids().await;
    assert_eq!(
        stream_ids.len(),
        20_000,
        "zero duplicate stream entries ({at_kill} at the kill)"
    );
    let unique: HashSet<&String> = stream_ids.iter().collect();
    assert!(ids.iter().all(|id| unique.contains(&id.to_string())));
}

/// The slot is confirmed only through what the broker acknowledged. With
/// the NATS server paused, the relay reads and publishes 1,000 messages that
/// exist only in the WAL and answers the server for a second; then the
/// relay is killed, and the paused server too (what sat in its socket is
/// gone with it). The next relay, against the restarted server, must send
/// all 1,000: a relay that had confirmed them would have lost them.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_the_broker_did_not_acknowledge_is_confirmed() {
    let mut nats = PrivateNats::start().await;
    let w = Wal::to_nats(&nats.url()).await;
    let mut first = w.spawn_cli_relay();
    let mut ids = write_wal(&w.t.db, "/topic/orders.wal", 100).await;
    eventually(Duration::from_secs(120), "the first 100", || async {
        w.stream.count().await >= 100
    })
    .await;
    nats.pause();
    ids.extend(write_wal(&w.t.db, "/topic/orders.wal", 500).await);
    ids.extend(write_wal(&w.t.db, "/topic/orders.wal", 500).await);
    let written = current_wal_lsn(&w.t.db).await;
    let sent_at = w.when_sent(written).await;
    // The relay has had them a second, answering every 200 ms meanwhile:
    // a position confirmed too early would have reached the server.
    eventually(
        Duration::from_secs(20),
        "status updates a second after the relay got them",
        || async { w.last_reply_micros().await > sent_at + 1_000_000 },
    )
    .await;
    signal(&first, "KILL");
    let _ = first.wait().await;
    nats.kill().await;
    nats.up().await;
    let mut second = w.spawn_cli_relay();
    eventually(
        Duration::from_secs(120),
        "all 1,100 in the stream",
        || async { w.stream.count().await >= 1_100 },
    )
    .await;
    signal(&second, "TERM");
    let _ = second.wait().await;
    let stream_ids = w.stream_ids().await;
    assert_eq!(stream_ids.len(), 1_100, "zero duplicate stream entries");
    let unique: HashSet<&String> = stream_ids.iter().collect();
    assert!(ids.iter().all(|id| unique.contains(&id.to_string())));
}

/// Two relays on one slot: one reads, the other waits; kill -9 of the
/// reader and the standby takes over within 10 s, nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_within_seconds() {
    let w = Wal::new().await;
    let mut a = w.spawn_cli_relay();
    let mut b = w.spawn_cli_relay();
    let first = write_messages(&w.t.db, "/topic/orders.created", 100).await;
    eventually(Duration::from_secs(120), "the first 100", || async {
        w.stream.count().await >= 100
    })
    .await;
    // The reader is the process whose walsender holds the slot.
    let reader_name: String = w
        .t
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT r.application_name::text FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = $1",
            vec![w.slot.0.clone().into()],
        ))
        .await
        .unwrap()
        .expect("one relay reads the slot")
        .try_get_by_index(0)
        .unwrap();
    let a_pid = a.id().unwrap();
    let (reader, standby) = if reader_name.ends_with(&format!("@{a_pid}")) {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    signal(reader, "KILL");
    let _ = reader.wait().await;
    let killed = std::time::Instant::now();
    let second = write_messages(&w.t.db, "/topic/orders.created", 100).await;
    eventually(
        Duration::from_secs(10),
        "the standby sends the next 100 within 10 s",
        || async {
            let ids: HashSet<String> = w.stream_ids().await.into_iter().collect();
            second.iter().all(|id| ids.contains(&id.to_string()))
        },
    )
    .await;
    let took_over = killed.elapsed();
    signal(standby, "TERM");
    let _ = standby.wait().await;
    let ids: HashSet<String> = w.stream_ids().await.into_iter().collect();
    assert!(
        first
            .iter()
            .chain(&second)
            .all(|id| ids.contains(&id.to_string()))
    );
    eprintln!("takeover after kill -9: {took_over:?}");
}

/// The slot dropped under a running relay: it makes a new one, and what the
/// old one never confirmed goes out through the claim sweep. Nothing lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_dropped_under_a_running_relay_loses_nothing() {
    let w = Wal::new().await;
    let mut settings = w.settings.clone();
    settings.wal.sweep_after = Duration::from_secs(2);
    settings.relay.waiting_time = Duration::from_millis(200);
    let running = w.start(settings);
    let before = write_messages(&w.t.db, "/topic/orders.created", 100).await;
    eventually(Duration::from_secs(120), "the first 100", || async {
        w.stream.count().await >= 100
    })
    .await;
    // Drop it the way an operator (or a lost slot) would, rows written meanwhile.
    let admin = common::connect(&common::postgres_admin_url()).await;
    let during = loop {
        admin
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}' AND active_pid IS NOT NULL",
                w.slot.0
            ))
            .await
            .unwrap();
        let written = write_messages(&w.t.db, "/topic/orders.created", 50).await;
        if admin
            .execute_unprepared(&format!("SELECT pg_drop_replication_slot('{}')", w.slot.0))
            .await
            .is_ok()
        {
            break written;
        }
    };
    let after = write_messages(&w.t.db, "/topic/orders.created", 100).await;
    eventually(Duration::from_secs(60), "every row sent", || async {
        !status_counts(&w.t.db)
            .await
            .contains_key(&Status::Schedule.code())
    })
    .await;
    running.stop().await;
    let ids: HashSet<String> = w.stream_ids().await.into_iter().collect();
    for id in before.iter().chain(&during).chain(&after) {
        assert!(ids.contains(&id.to_string()), "{id} lost");
    }
}

/// PostgreSQL crashes (an immediate shutdown) and starts again while rows
/// are written and relayed: every committed row arrives, once in the stream.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_stream_loses_nothing() {
    let cluster = Private::start(Server::Postgres, &["-c", "wal_level=logical"]).await;
    let w = Wal::on(&cluster.postgres_url("postgres")).await;
    let mut settings = w.settings.clone();
    settings.broker.maximum_backoff = Duration::from_secs(1);
    let running = w.start(settings);
    // The writer goes on through the outage; a write that fails is tried
    // again. Which rows committed is read from the table at the end.
    let writer = {
        let db = w.t.db.clone();
        tokio::spawn(async move {
            let mut written = 0;
            while written < 3_000 {
                let messages = (0..50)
                    .map(|n| {
                        outbox_core::Message::new(
                            "/topic/orders.created",
                            serde_json::json!({ "n": written + n }),
                        )
                        .unwrap()
                    })
                    .collect();
                match outbox_core::write_all(&db, messages).await {
                    Ok(_) => written += 50,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        })
    };
    eventually(Duration::from_secs(120), "500 in the stream", || async {
        w.stream.count().await >= 500
    })
    .await;
    cluster.kill().await;
    cluster.up().await;
    writer.await.unwrap();
    let committed: Vec<String> =
        w.t.db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT id::text FROM published",
            ))
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.try_get_by_index(0).unwrap())
            .collect();
    assert!(committed.len() >= 3_000);
    eventually(
        Duration::from_secs(180),
        "every committed row in the stream",
        || async { w.stream.count().await >= committed.len() as u64 },
    )
    .await;
    eventually(Duration::from_secs(120), "every row marked", || async {
        status_counts(&w.t.db).await.get(&Status::Succeeded.code())
            == Some(&(committed.len() as u64))
    })
    .await;
    running.stop().await;
    let stream_ids = w.stream_ids().await;
    assert_eq!(
        stream_ids.len(),
        committed.len(),
        "zero duplicate stream entries"
    );
    let unique: HashSet<&String> = stream_ids.iter().collect();
    for id in &committed {
        assert!(unique.contains(id), "{id} lost");
    }
}

/// Past `wal.lag_warning` the relay warns, naming the slot and its lag,
/// while it is busy with a backlog too.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_lagging_past_the_limit_is_warned_about() {
    let w = Wal::new().await;
    write_messages(&w.t.db, "/topic/orders.created", 5_000).await;
    let log = std::env::temp_dir().join(format!("outbox-wal-lag-{}.log", Uuid::new_v4().simple()));
    let mut relay = w
        .cli_relay()
        .env("OUTBOX_WAL_LAG_WARNING", "1")
        .env("OUTBOX_RELAY_PROGRESS_INTERVAL", "0.2")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start outbox-cli publish");
    let warning = "the replication slot holds WAL the relay has not confirmed";
    eventually(Duration::from_secs(60), "the lag warning", || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(warning)
    })
    .await;
    signal(&relay, "TERM");
    let _ = relay.wait().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let line = text.lines().find(|l| l.contains(warning)).unwrap();
    assert!(
        line.contains(&w.settings.wal.slot) && line.contains("lag_bytes="),
        "{line}"
    );
}

/// Capture is PostgreSQL's; elsewhere the error says what to use.
#[tokio::test(flavor = "multi_thread")]
async fn wal_capture_on_another_database_says_to_use_claim() {
    let t = TestDb::new(Backend::Sqlite).await;
    let mut settings = settings(&t.url);
    settings.relay.capture = Capture::Wal;
    let err = Relay::new(t.db.clone(), settings.clone())
        .run(outbox_core::Shutdown::never())
        .await
        .unwrap_err();
    let text = outbox_core::report(&err);
    assert!(text.contains("relay.capture = \"claim\""), "{text}");
    let err = outbox_core::wal_setup(&t.db, &settings.wal)
        .await
        .unwrap_err();
    assert!(outbox_core::report(&err).contains("claim"));
}

/// `outbox-cli wal setup` twice (created, then exists), `status`, `drop`.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_sets_up_shows_and_drops_capture() {
    let t = TestDb::new(Backend::Postgres).await;
    let slot = format!("outbox_cli_{}", &Uuid::new_v4().simple().to_string()[..8]);
    let _guard = SlotGuard(slot.clone(), common::postgres_admin_url());
    let run = |args: &'static [&'static str]| {
        let mut command = cli(&t.url);
        command.env("OUTBOX_WAL_SLOT", &slot).args(args);
        async move {
            let out = command.output().await.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let first = run(&["wal", "setup"]).await;
    assert!(
        first.contains("publication outbox: created (tables: published)"),
        "{first}"
    );
    assert!(first.contains(&format!("slot {slot}: created")), "{first}");
    let again = run(&["wal", "setup"]).await;
    assert!(
        again.contains("publication outbox: exists") && again.contains(": exists (pgoutput)"),
        "{again}"
    );
    let status = run(&["wal", "status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["wal_level"], "logical");
    assert_eq!(status["slot"]["name"], slot.as_str());
    assert!(status["slot"]["lag_bytes"].is_u64());
    let dropped = run(&["wal", "drop"]).await;
    assert!(dropped.contains("dropped"), "{dropped}");
    let status = run(&["wal", "status"]).await;
    assert!(
        status.contains("missing (run `outbox-cli wal setup`)"),
        "{status}"
    );
}

/// The same capture over RabbitMQ: rows, WAL-only messages and
/// insert+delete rows reach the bound queue in commit order with their
/// `dop-*` headers and the id as the AMQP message id.
#[tokio::test(flavor = "multi_thread")]
async fn capture_relays_to_rabbitmq_too() {
    let t = TestDb::new(Backend::Postgres).await;
    let broker = common::amqp::TestBroker::connect().await;
    let rk = format!("wal.{}", Uuid::new_v4().simple());
    let queue = broker.bound_queue("amq.topic", &rk).await;
    let mut settings = settings(&t.url);
    settings.relay.capture = Capture::Wal;
    settings.wal.slot = format!("outbox_amqp_{}", &Uuid::new_v4().simple().to_string()[..10]);
    let _slot = SlotGuard(settings.wal.slot.clone(), common::postgres_admin_url());
    outbox_core::wal_setup(&t.db, &settings.wal).await.unwrap();
    let (trigger, shutdown) = shutdown_channel();
    let relay = tokio::spawn(Relay::new(t.db.clone(), settings).run(shutdown));
    let destination = format!("/topic/{rk}");
    let mut expected: Vec<String> = write_in(&t.db, &destination, 10)
        .await
        .iter()
        .map(Uuid::to_string)
        .collect();
    let txn = t.db.begin().await.unwrap();
    let logged = outbox_core::write_to_wal(
        &txn,
        vec![outbox_core::Message::new(&destination, serde_json::json!({"logged": true})).unwrap()],
    )
    .await
    .unwrap();
    let gone = write_in(&txn, &destination, 3).await;
    txn.execute_unprepared(&format!(
        "DELETE FROM published WHERE id IN ({})",
        gone.iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(",")
    ))
    .await
    .unwrap();
    txn.commit().await.unwrap();
    expected.push(logged[0].id.to_string());
    expected.extend(gone.iter().map(Uuid::to_string));
    let received = broker
        .take(&queue, expected.len(), Duration::from_secs(30))
        .await;
    trigger.trigger();
    relay.await.unwrap().unwrap();
    let ids: Vec<String> = received
        .iter()
        .map(|r| r.headers["dop-msg-id"].clone())
        .collect();
    assert_eq!(ids, expected, "every message once, in commit order");
    for r in &received {
        assert_eq!(r.message_id.as_ref(), Some(&r.headers["dop-msg-id"]));
        assert_eq!(r.routing_key, rk);
    }
    assert_eq!(received[10].body, serde_json::json!({"logged": true}));
    broker.delete_queue(&queue).await;
}

/// Transactions of many WAL-only messages, more than `relay.max_in_flight`
/// in all: the window refills as confirms come back, nothing waits forever.
#[tokio::test(flavor = "multi_thread")]
async fn large_transactions_of_wal_messages_flow_through_the_window() {
    let w = Wal::new().await;
    let running = w.start(w.settings.clone());
    let mut expected = 0;
    for _ in 0..4 {
        let txn = w.t.db.begin().await.unwrap();
        let messages = (0..1000)
            .map(|n| {
                outbox_core::Message::new("/topic/orders.bulk", serde_json::json!({ "n": n }))
                    .unwrap()
            })
            .collect();
        expected += outbox_core::write_to_wal(&txn, messages)
            .await
            .unwrap()
            .len();
        txn.commit().await.unwrap();
    }
    eventually(
        Duration::from_secs(60),
        "4,000 messages in the stream",
        || async { w.stream.count().await >= expected as u64 },
    )
    .await;
    running.stop().await;
    assert_eq!(w.stream.count().await, 4000);
}
