//! Seeded fault schedules: the relay and the consumer on the in-memory
//! transport (nacks, returns, channels closed by one message, lost
//! connections, late and reordered confirms, clock jumps past the claim
//! lease, duplicate and redelivered deliveries, failing and panicking
//! callbacks) over a real database, with invariants checked after each
//! schedule. A failure prints its seed; `OUTBOX_SIM_SEED=<seed>` replays it.
//!
//! `OUTBOX_SIM_SCHEDULES` sets how many run on SQLite (default 2000),
//! `OUTBOX_SIM_PG_SCHEDULES` how many on PostgreSQL (default 100).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use common::{Backend, TestDb};
use futures_util::StreamExt as _;
use outbox_core::entity::received;
use outbox_core::{
    Clock, Consumer, DeliveryFault, Envelope, MemoryBroker, Payload, PublishFault, Relay, Settings,
    Shutdown, Status, shutdown_channel,
};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, Statement, Value};
use uuid::Uuid;

const QUEUE: &str = "sim";
const GOOD: &str = "/topic/sim.good";
const POISON: &str = "/topic/sim.poison";
const NO_EXCHANGE: &str = "/exchange/nosuch/sim";
const UNROUTABLE: &str = "/topic/nobody.listens";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules_on_sqlite() {
    run_schedules(Backend::Sqlite, "OUTBOX_SIM_SCHEDULES", 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_schedules_on_postgres() {
    run_schedules(Backend::Postgres, "OUTBOX_SIM_PG_SCHEDULES", 100).await;
}

async fn run_schedules(backend: Backend, var: &str, default: u64) {
    common::init_tracing();
    let seeds: Vec<u64> = match std::env::var("OUTBOX_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("OUTBOX_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var(var)
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(default);
            let base = std::env::var("OUTBOX_SIM_BASE")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            (base..base + n).collect()
        }
    };
    let started = std::time::Instant::now();
    let total = seeds.len();
    let mut failures = Vec::new();
    // Several schedules at once: each has its own database and broker. A
    // schedule must end well within the 60 s claim lease: a relay that waits
    // out a lease is waiting for a row nobody sends.
    let runs = futures_util::stream::iter(seeds).map(|seed| async move {
        let outcome = tokio::time::timeout(Duration::from_secs(45), schedule(backend, seed)).await;
        match outcome {
            Ok(Ok(stats)) => Ok(stats),
            Ok(Err(violation)) => Err((seed, violation)),
            Err(_) => Err((
                seed,
                "did not finish within 45 s (a claim left behind waits out its 60 s lease)"
                    .to_owned(),
            )),
        }
    });
    let mut runs = runs.buffer_unordered(8);
    while let Some(result) = runs.next().await {
        if let Err((seed, violation)) = result {
            eprintln!(
                "SIMULATION FAILURE seed {seed} ({backend:?}): {violation}\n  replay: OUTBOX_SIM_SEED={seed} cargo test -p outbox-tests --test simulation {}",
                if backend == Backend::Sqlite {
                    "seeded_fault_schedules_on_sqlite"
                } else {
                    "seeded_fault_schedules_on_postgres"
                }
            );
            failures.push(format!("seed {seed}: {violation}"));
        }
    }
    eprintln!(
        "{total} schedules on {backend:?} in {:?}, {} failed",
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "invariants violated:\n{}",
        failures.join("\n")
    );
}

/// What the script did to each row, to check the database against.
#[derive(Default)]
struct Log {
    /// Rejections the broker gave each row (nack, return, refusal, close).
    rejections: HashMap<Uuid, u32>,
    /// Fault events that can put rows back in flight.
    disruptions: u32,
    /// Every publish of a good row.
    good_publishes: u32,
}

struct Plan {
    rng: fastrand::Rng,
    clock: Clock,
    lease: Duration,
    broker: MemoryBroker,
    log: Arc<Mutex<Log>>,
    poison: HashSet<Uuid>,
    good: HashSet<Uuid>,
}

impl Plan {
    fn decide(&mut self, envelope: &Envelope) -> PublishFault {
        let mut log = self.log.lock().unwrap();
        if self.good.contains(&envelope.id) {
            log.good_publishes += 1;
        }
        let destination = envelope.destination.as_str();
        if self.poison.contains(&envelope.id) {
            *log.rejections.entry(envelope.id).or_default() += 1;
            log.disruptions += 1;
            return PublishFault::CloseChannel(
                "PRECONDITION_FAILED - poison message refused".to_owned(),
            );
        }
        if destination == NO_EXCHANGE || destination == UNROUTABLE {
            *log.rejections.entry(envelope.id).or_default() += 1;
            return PublishFault::Deliver;
        }
        // A confirm so slow that the claim lease runs out meanwhile.
        if self.rng.u32(0..100) < 2 {
            self.clock.advance(self.lease + Duration::from_secs(1));
            log.disruptions += 1;
        }
        let roll = self.rng.u32(0..1000);
        let fault = match roll {
            0..50 => PublishFault::Nack,
            50..80 => PublishFault::Return,
            80..110 => PublishFault::CloseChannel("NOT_FOUND - scripted close".to_owned()),
            110..125 => PublishFault::DropConnection,
            125..140 => PublishFault::DeliverThenDropConnection,
            140..250 => PublishFault::Delay,
            _ => PublishFault::Deliver,
        };
        match fault {
            PublishFault::Nack | PublishFault::Return | PublishFault::CloseChannel(_) => {
                *log.rejections.entry(envelope.id).or_default() += 1;
                log.disruptions += 1;
            }
            PublishFault::DropConnection | PublishFault::DeliverThenDropConnection => {
                log.disruptions += 1;
                self.broker.refuse_connections(self.rng.u32(0..3));
            }
            _ => {}
        }
        fault
    }
}

struct Stats;

async fn schedule(backend: Backend, seed: u64) -> Result<Stats, String> {
    let phase = std::time::Instant::now();
    let t = TestDb::new(backend).await;
    let timing = std::env::var_os("OUTBOX_SIM_TIMING").is_some();
    if timing {
        eprintln!("seed {seed}: db {:?}", phase.elapsed());
    }
    install_audit(&t.db).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = MemoryBroker::new();
    let clock = Clock::manual();

    let mut settings = Settings::default();
    settings.database.url = Some(t.url.clone());
    settings.relay.batch_size = rng.u32(1..12);
    settings.relay.max_in_flight = settings.relay.batch_size * rng.u32(1..4);
    settings.relay.max_retry_attempts = rng.u32(1..5);
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.relay.wait_retry = Duration::ZERO;
    settings.relay.waiting_time = Duration::from_millis(20);
    settings.relay.claim_lease = Duration::from_secs(60);
    settings.relay.listen = false;
    settings.relay.progress_interval = Duration::from_secs(3600);
    settings.broker.operation_timeout = Duration::from_secs(5);
    settings.broker.maximum_backoff = Duration::from_millis(20);
    settings.consumer.prefetch = rng.u16(1..20);
    settings.consumer.concurrency = rng.usize(1..5);
    settings.consumer.max_retry_attempts = 1;
    settings.consumer.retry_wait = Duration::ZERO;
    let max_attempts = settings.relay.max_retry_attempts;

    // The outbox: good rows, poison, a missing exchange, an unroutable
    // destination, and rows no relay can send, written by SQL.
    let mut kinds: HashMap<Uuid, Kind> = HashMap::new();
    let n = rng.usize(5..40);
    for _ in 0..n {
        let roll = rng.u32(0..100);
        let (destination, kind) = match roll {
            0..3 => (POISON, Kind::Poison),
            3..5 => (NO_EXCHANGE, Kind::Refused),
            5..7 => (UNROUTABLE, Kind::Refused),
            _ => (GOOD, Kind::Good),
        };
        let row = outbox_core::write(
            &t.db,
            outbox_core::Message::new(destination, serde_json::json!({"seed": seed})).unwrap(),
        )
        .await
        .map_err(|e| e.to_string())?;
        kinds.insert(row.id, kind);
    }
    for _ in 0..rng.usize(0..3) {
        let (id, how) = insert_unsendable(&t.db, &mut rng).await;
        if let Some(id) = id {
            kinds.insert(id, Kind::Unsendable(how));
        }
    }

    let log = Arc::new(Mutex::new(Log::default()));
    let plan = Arc::new(Mutex::new(Plan {
        rng: fastrand::Rng::with_seed(seed ^ 0x5eed),
        clock: clock.clone(),
        lease: settings.relay.claim_lease,
        broker: broker.clone(),
        log: Arc::clone(&log),
        poison: kinds
            .iter()
            .filter(|(_, k)| matches!(k, Kind::Poison))
            .map(|(id, _)| *id)
            .collect(),
        good: kinds
            .iter()
            .filter(|(_, k)| matches!(k, Kind::Good))
            .map(|(id, _)| *id)
            .collect(),
    }));
    {
        let plan = Arc::clone(&plan);
        broker.script_publishes(move |envelope| plan.lock().unwrap().decide(envelope));
    }
    let mut delivery_rng = fastrand::Rng::with_seed(seed ^ 0xdead);
    broker.script_deliveries(move |_| match delivery_rng.u32(0..100) {
        0..6 => DeliveryFault::Duplicate,
        6..8 => DeliveryFault::DropConnection,
        _ => DeliveryFault::Deliver,
    });
    // Callback faults are fixed per message, so a failing one always fails.
    let fails = move |id: &str| {
        let h = id
            .bytes()
            .fold(seed, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        (h % 100) as u32
    };

    // The consumer, running throughout.
    let consumer = Consumer::new(
        t.db.clone(),
        settings.clone(),
        GOOD,
        Some(QUEUE),
        move |payload: Payload| async move {
            let id = payload.msg_id().unwrap_or("").to_owned();
            match fails(&id) {
                0..3 => Err("scripted callback failure".into()),
                3..5 => panic!("scripted callback panic"),
                5..10 => {
                    // A lost race with the database, once per delivery.
                    if payload.header("redelivered") == Some("false") {
                        return Err(Box::new(sea_orm::DbErr::ConnectionAcquire(
                            sea_orm::ConnAcquireErr::Timeout,
                        )) as outbox_core::BoxError);
                    }
                    Ok(payload.save_alone().await?)
                }
                _ => Ok(payload.save_alone().await?),
            }
        },
    )
    .map_err(|e| e.to_string())?
    .with_transport(broker.clone());
    consumer.declare().await.map_err(|e| e.to_string())?;
    let (stop_consumer, consumer_shutdown) = shutdown_channel();
    let consumer_task = tokio::spawn(consumer.run(consumer_shutdown));

    // One or two relays at once, restarted (as a supervisor would) until
    // nothing is left to send.
    let relays = rng.usize(1..3);
    let mut rounds = 0;
    loop {
        rounds += 1;
        let mut tasks = Vec::new();
        for r in 0..relays {
            let relay = Relay::new(t.db.clone(), settings.clone())
                .with_transport(broker.clone())
                .with_clock(clock.clone())
                .with_name(format!("sim-relay-{r}"));
            tasks.push(tokio::spawn(relay.run_until_empty(Shutdown::never())));
        }
        let mut unsent = 0;
        for task in tasks {
            match task.await {
                Ok(Ok(report)) => unsent += report.unsent,
                Ok(Err(err)) if err.is_transient() => unsent += 1,
                Ok(Err(err)) => return Err(format!("relay failed: {}", outbox_core::report(&err))),
                Err(panic) => return Err(format!("relay panicked: {panic}")),
            }
        }
        if unsent == 0 && schedulable(&t.db).await == 0 {
            break;
        }
        if rounds > 50 {
            return Err("the relays did not finish in 50 rounds".to_owned());
        }
    }

    if timing {
        eprintln!(
            "seed {seed}: relays done {:?} rounds {rounds}",
            phase.elapsed()
        );
    }
    // Let the consumer take everything, then stop it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !broker.messages(QUEUE).is_empty() || broker.unsettled(QUEUE) > 0 {
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "the consumer did not drain its queue: {} waiting, {} unsettled",
                broker.messages(QUEUE).len(),
                broker.unsettled(QUEUE)
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_consumer.trigger();
    consumer_task
        .await
        .map_err(|e| format!("consumer panicked: {e}"))?
        .map_err(|e| format!("consumer failed: {}", outbox_core::report(&e)))?;

    if timing {
        eprintln!("seed {seed}: consumer done {:?}", phase.elapsed());
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    check(&t, &broker, &kinds, &log, &settings, max_attempts, &fails).await?;
    if timing {
        eprintln!("seed {seed}: checked {:?}", phase.elapsed());
    }
    Ok(Stats)
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Good,
    Poison,
    /// A destination the broker refuses or cannot route.
    Refused,
    /// A row written by SQL that cannot be sent as it is.
    Unsendable(&'static str),
}

async fn check(
    t: &TestDb,
    broker: &MemoryBroker,
    kinds: &HashMap<Uuid, Kind>,
    log: &Log,
    settings: &Settings,
    max_attempts: u32,
    fails: &dyn Fn(&str) -> u32,
) -> Result<(), String> {
    let rows = outbox_rows(&t.db).await;
    let confirmed: HashSet<Uuid> = broker.confirmed().into_iter().collect();
    let max = i32::try_from(max_attempts).unwrap();
    for row in &rows {
        let kind = match row.id {
            Some(id) => kinds.get(&id).copied().unwrap_or(Kind::Unsendable("?")),
            None => Kind::Unsendable("text id"),
        };
        let id = row.id.unwrap_or_default();
        let rejections = log.rejections.get(&id).copied().unwrap_or(0);
        if row.claimed {
            return Err(format!(
                "row {} is still claimed after every relay stopped",
                row.shown
            ));
        }
        // Attempts are counted only for the message's own failures.
        if row.retry as u32 > rejections && !matches!(kind, Kind::Unsendable(_)) {
            return Err(format!(
                "row {} ({kind:?}) has {} attempts counted but the broker refused it {rejections} times",
                row.shown, row.retry
            ));
        }
        match row.status {
            Status::Succeeded => {
                if !confirmed.contains(&id) {
                    return Err(format!(
                        "row {} ({kind:?}) is SUCCEEDED but was never confirmed",
                        row.shown
                    ));
                }
                if matches!(kind, Kind::Poison | Kind::Refused | Kind::Unsendable(_)) {
                    return Err(format!("row {} ({kind:?}) is SUCCEEDED", row.shown));
                }
            }
            Status::Failed => {
                let error = row.last_error.clone().unwrap_or_default();
                if error.is_empty() {
                    return Err(format!("row {} is FAILED without an error", row.shown));
                }
                match kind {
                    Kind::Unsendable(how) if row.retry != 1 => {
                        return Err(format!(
                            "unsendable row {} ({how}) took {} attempts; it should fail at once",
                            row.shown, row.retry
                        ));
                    }
                    Kind::Unsendable(_) => {}
                    Kind::Poison if row.retry != max || !error.contains("poison") => {
                        return Err(format!(
                            "poison row {} FAILED after {} of {max} attempts with {error:?}",
                            row.shown, row.retry
                        ));
                    }
                    _ if row.retry != max => {
                        return Err(format!(
                            "row {} ({kind:?}) FAILED after {} of {max} attempts: {error}",
                            row.shown, row.retry
                        ));
                    }
                    _ => {}
                }
            }
            Status::Schedule => {
                return Err(format!(
                    "row {} ({kind:?}) is still SCHEDULE after the relays finished (attempts {})",
                    row.shown, row.retry
                ));
            }
        }
    }
    // The audit trail: a row is marked sent once, never changes after SENT
    // or FAILED, and only while claimed (by whoever holds the claim).
    let audit = audit_rows(&t.db).await;
    let mut succeeded: HashMap<Vec<u8>, u32> = HashMap::new();
    for entry in &audit {
        if (entry.old_status != entry.new_status || entry.old_retry != entry.new_retry)
            && !entry.old_claimed
        {
            return Err(format!(
                "a row changed status {} → {} without being claimed",
                entry.old_status, entry.new_status
            ));
        }
        if entry.old_status != 1
            && (entry.new_status != entry.old_status || entry.new_retry != entry.old_retry)
        {
            return Err(format!(
                "a finished row changed: status {} → {}, attempts {} → {}",
                entry.old_status, entry.new_status, entry.old_retry, entry.new_retry
            ));
        }
        if entry.new_status == 2 && entry.old_status != 2 {
            *succeeded.entry(entry.id.clone()).or_default() += 1;
        }
    }
    if let Some((_, n)) = succeeded.iter().find(|(_, n)| **n > 1) {
        return Err(format!("a row was marked sent {n} times"));
    }

    // A poison row or an outage never makes the relay loop over the good
    // rows: each disruption puts at most a window of rows back in flight.
    let good = kinds.values().filter(|k| matches!(k, Kind::Good)).count() as u32;
    let bound = good + (log.disruptions + 2) * settings.relay.max_in_flight * 2;
    if log.good_publishes > bound {
        return Err(format!(
            "good rows were published {} times ({good} rows, {} disruptions, bound {bound})",
            log.good_publishes, log.disruptions
        ));
    }

    // The consumer: every id stored once, every ack after its commit,
    // nothing the broker took is lost.
    let inbox = received::Entity::find()
        .all(&t.db)
        .await
        .map_err(|e| e.to_string())?;
    let stored: Vec<String> = inbox.iter().filter_map(|r| r.msg_id.clone()).collect();
    let stored_set: HashSet<&String> = stored.iter().collect();
    if stored_set.len() != stored.len() {
        return Err("an id was stored twice in the inbox".to_owned());
    }
    for acked in broker.acked().into_iter().flatten() {
        if !stored_set.contains(&acked.to_string()) {
            return Err(format!(
                "message {acked} was acked without a committed inbox row"
            ));
        }
    }
    let dead: HashSet<String> = broker
        .messages(&format!("DLQ.{QUEUE}"))
        .into_iter()
        .filter_map(|m| m.id.map(|id| id.to_string()))
        .collect();
    for id in &confirmed {
        let id = id.to_string();
        if kinds
            .get(&Uuid::parse_str(&id).unwrap())
            .is_some_and(|k| matches!(k, Kind::Good))
            && !stored_set.contains(&id)
            && !dead.contains(&id)
        {
            return Err(format!(
                "message {id} was confirmed but is neither in the inbox nor dead-lettered"
            ));
        }
    }
    for id in &dead {
        if fails(id) >= 5 {
            return Err(format!(
                "message {id} was dead-lettered but its callback only fails transiently"
            ));
        }
        if stored_set.contains(id) {
            return Err(format!(
                "message {id} is both dead-lettered and in the inbox"
            ));
        }
    }
    Ok(())
}

/// A `published` row as the checks need it, read without the entity: a row
/// with a text id (SQLite) cannot be read as `published::Model`.
struct Row {
    id: Option<Uuid>,
    shown: String,
    status: Status,
    retry: i32,
    last_error: Option<String>,
    claimed: bool,
}

async fn outbox_rows(db: &DatabaseConnection) -> Vec<Row> {
    let backend = db.get_database_backend();
    db.query_all_raw(Statement::from_string(
        backend,
        "SELECT id, status, retry, last_error, claim_token IS NOT NULL AS claimed FROM published",
    ))
    .await
    .expect("read the outbox")
    .into_iter()
    .map(|row| {
        let id = row.try_get::<Uuid>("", "id").ok();
        let shown = id.map_or_else(
            || row.try_get::<String>("", "id").unwrap_or_default(),
            |id| id.to_string(),
        );
        let status = match row.try_get::<i32>("", "status").unwrap_or_default() {
            -1 => Status::Failed,
            2 => Status::Succeeded,
            _ => Status::Schedule,
        };
        Row {
            id,
            shown,
            status,
            retry: row.try_get("", "retry").unwrap_or_default(),
            last_error: row.try_get("", "last_error").unwrap_or_default(),
            claimed: row
                .try_get::<bool>("", "claimed")
                .or_else(|_| row.try_get::<i32>("", "claimed").map(|n| n != 0))
                .unwrap_or(true),
        }
    })
    .collect()
}

async fn schedulable(db: &DatabaseConnection) -> u64 {
    common::status_counts(db)
        .await
        .get(&Status::Schedule.code())
        .copied()
        .unwrap_or(0)
}

/// Rows no relay can send as they are: a non-JSON body, a text id (SQLite),
/// a 300-byte header name, a 300-byte correlation id, no `dop-msg-id` and
/// unroutable (that one fails after its attempts, never SUCCEEDED).
async fn insert_unsendable(
    db: &DatabaseConnection,
    rng: &mut fastrand::Rng,
) -> (Option<Uuid>, &'static str) {
    let sqlite = db.get_database_backend() == DbBackend::Sqlite;
    let id = Uuid::new_v4();
    let now = Utc::now();
    let long = "h".repeat(300);
    let (id_value, body, headers, how): (Value, &str, String, &'static str) =
        match rng.u32(0..if sqlite { 4 } else { 2 }) {
            0 => (
                id.into(),
                "{}",
                format!("{{\"{long}\": \"v\"}}"),
                "header name over 255 bytes",
            ),
            1 => (
                id.into(),
                "{}",
                format!("{{\"dop-correlation-id\": \"{long}\"}}"),
                "correlation id over 255 bytes",
            ),
            2 => (id.into(), "not json {", "{}".to_owned(), "body not JSON"),
            _ => (id.to_string().into(), "{}", "{}".to_owned(), "text id"),
        };
    let sql = match db.get_database_backend() {
        DbBackend::Postgres => {
            "INSERT INTO published (id, destination, body, added, expires_at, retry, status, headers, next_attempt_at) \
                                VALUES ($1, $2, $3::jsonb, $4, $4, 0, 1, $5::jsonb, $4)"
        }
        _ => {
            "INSERT INTO published (id, destination, body, added, expires_at, retry, status, headers, next_attempt_at) \
              VALUES (?, ?, ?, ?, ?, 0, 1, ?, ?)"
        }
    };
    let values: Vec<Value> = match db.get_database_backend() {
        DbBackend::Postgres => vec![
            id_value,
            GOOD.into(),
            body.into(),
            now.into(),
            headers.into(),
        ],
        _ => vec![
            id_value,
            GOOD.into(),
            body.into(),
            now.into(),
            now.into(),
            headers.into(),
            now.into(),
        ],
    };
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        sql,
        values,
    ))
    .await
    .expect("insert an unsendable row");
    // A text id reads back as a row whose id is unknown to `published::Model`.
    (if how == "text id" { None } else { Some(id) }, how)
}

struct AuditEntry {
    id: Vec<u8>,
    old_status: i32,
    new_status: i32,
    old_retry: i32,
    new_retry: i32,
    old_claimed: bool,
}

async fn install_audit(db: &DatabaseConnection) {
    let statements: &[&str] = match db.get_database_backend() {
        DbBackend::Postgres => &[
            "CREATE TABLE outbox_audit (id uuid, old_status int, new_status int, old_retry int, new_retry int, old_claimed boolean)",
            "CREATE FUNCTION outbox_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
               INSERT INTO outbox_audit VALUES (OLD.id, OLD.status, NEW.status, OLD.retry, NEW.retry, OLD.claim_token IS NOT NULL); \
               RETURN NULL; END $$",
            "CREATE TRIGGER outbox_audit AFTER UPDATE ON published FOR EACH ROW EXECUTE FUNCTION outbox_audit()",
        ],
        _ => &[
            "CREATE TABLE outbox_audit (id blob, old_status int, new_status int, old_retry int, new_retry int, old_claimed int)",
            "CREATE TRIGGER outbox_audit AFTER UPDATE ON published BEGIN \
               INSERT INTO outbox_audit VALUES (OLD.id, OLD.status, NEW.status, OLD.retry, NEW.retry, OLD.claim_token IS NOT NULL); END",
        ],
    };
    for statement in statements {
        db.execute_unprepared(statement)
            .await
            .expect("install the audit trigger");
    }
}

async fn audit_rows(db: &DatabaseConnection) -> Vec<AuditEntry> {
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT id::text AS id, old_status, new_status, old_retry, new_retry, old_claimed FROM outbox_audit"
        }
        _ => {
            "SELECT CAST(hex(id) AS TEXT) AS id, old_status, new_status, old_retry, new_retry, old_claimed FROM outbox_audit"
        }
    };
    db.query_all_raw(Statement::from_string(backend, sql))
        .await
        .expect("read the audit trail")
        .into_iter()
        .map(|row| AuditEntry {
            id: row
                .try_get::<String>("", "id")
                .unwrap_or_default()
                .into_bytes(),
            old_status: row.try_get("", "old_status").unwrap_or_default(),
            new_status: row.try_get("", "new_status").unwrap_or_default(),
            old_retry: row.try_get("", "old_retry").unwrap_or_default(),
            new_retry: row.try_get("", "new_retry").unwrap_or_default(),
            old_claimed: row
                .try_get::<bool>("", "old_claimed")
                .or_else(|_| row.try_get::<i32>("", "old_claimed").map(|n| n != 0))
                .unwrap_or(false),
        })
        .collect()
}
