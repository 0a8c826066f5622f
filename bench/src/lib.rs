//! Shared helpers for the benchmark binaries in `src/bin/`.
//!
//! Every benchmark runs in release mode against the real PostgreSQL and
//! RabbitMQ, in a database of its own (`outbox_bench_<name>`, dropped at the
//! end), and exits non-zero when what it measured is not correct.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};

/// The entity the save benchmark writes: one `#[publish]`, as in the brief.
pub mod order {
    use outbox_core::Publish;
    use sea_orm::entity::prelude::*;

    /// An order; each save emits one message to `/topic/bench.orders.v1`.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Publish)]
    #[sea_orm(table_name = "orders")]
    #[publish(destination = "/topic/bench.orders", version = "v1")]
    pub struct Model {
        /// Serial key.
        #[sea_orm(primary_key)]
        pub id: i32,
        /// Which benchmark path wrote the row (`raw`, `seaorm`, `derive`).
        pub customer: String,
        /// A number.
        pub amount: i64,
        /// A timestamp.
        pub placed_at: DateTimeUtc,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}

    /// The table, in plain SQL (what SeaORM's schema builder would create).
    pub const CREATE_TABLE: &str = "CREATE TABLE orders (
        id serial PRIMARY KEY,
        customer varchar NOT NULL,
        amount bigint NOT NULL,
        placed_at timestamptz NOT NULL
    )";
}

/// Start logging; `RUST_LOG` overrides the quiet default.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// A size from the environment (`BENCH_N=100000`), or `default`.
pub fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(value) => value
            .replace('_', "")
            .parse()
            .with_context(|| format!("{name}={value:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// A list of sizes from the environment (`BENCH_BATCH_SIZES=200,1000`), or `default`.
pub fn env_list(name: &str, default: &[usize]) -> anyhow::Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(value) => value
            .split(',')
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                v.trim()
                    .replace('_', "")
                    .parse()
                    .with_context(|| format!("{name}={value:?}: not a list of whole numbers"))
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

/// Whether benchmark queues are durable (`BENCH_QUEUE_DURABLE`, default yes):
/// RabbitMQ then writes persistent messages to disk before confirming them.
pub fn queue_durable() -> bool {
    !matches!(
        std::env::var("BENCH_QUEUE_DURABLE").as_deref(),
        Ok("0" | "false" | "no")
    )
}

/// The PostgreSQL server's maintenance database URL (`BENCH_POSTGRES_URL`).
pub fn admin_url() -> String {
    std::env::var("BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `BENCH_NATS_URL`, default the machine's nats-server.
pub fn nats_url() -> String {
    std::env::var("BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// The broker URL (`AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

fn replace_db(url: &str, name: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    format!("{base}/{name}")
}

/// A fresh database for one benchmark, migrated with `outbox_core::migrate`.
#[derive(Debug)]
pub struct BenchDb {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A small pool on it, for setup and checks.
    pub db: DatabaseConnection,
}

impl BenchDb {
    /// Drop `outbox_bench_<name>` if a crashed run left it, create it, migrate it.
    pub async fn create(name: &str) -> anyhow::Result<BenchDb> {
        let name = format!("outbox_bench_{name}");
        let admin = Database::connect(admin_url())
            .await
            .context("connect to PostgreSQL (BENCH_POSTGRES_URL)")?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await?;
        match Self::prepare(&admin, &name).await {
            Ok(bench) => {
                admin.close().await?;
                Ok(bench)
            }
            Err(err) => {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
                Err(err)
            }
        }
    }

    /// Apply `BENCH_PG_SET`, connect and migrate.
    async fn prepare(admin: &DatabaseConnection, name: &str) -> anyhow::Result<BenchDb> {
        // A diagnostic knob: BENCH_PG_SET="synchronous_commit=off" (`;` between several)
        // to see e.g. what WAL flushes cost, or log_min_duration_statement=0 for a timeline.
        if let Ok(settings) = std::env::var("BENCH_PG_SET") {
            for setting in settings.split(';').filter(|s| !s.trim().is_empty()) {
                let (key, value) = setting
                    .split_once('=')
                    .with_context(|| format!("BENCH_PG_SET: {setting:?} is not name=value"))?;
                let (key, value) = (key.trim(), value.trim());
                let plain = |s: &str| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
                };
                ensure!(
                    plain(key) && plain(value),
                    "BENCH_PG_SET: {setting:?}: only letters, digits, `_` and `.`"
                );
                admin
                    .execute_unprepared(&format!("ALTER DATABASE {name} SET {key} = '{value}'"))
                    .await?;
                println!("note: {key} = {value} on {name} (BENCH_PG_SET)");
            }
        }
        let url = replace_db(&admin_url(), name);
        let db = connect(&url, 4).await?;
        outbox_core::migrate(&db).await?;
        Ok(BenchDb {
            name: name.to_owned(),
            url,
            db,
        })
    }

    /// Close the pool and drop the database.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let _ = self.db.close().await;
        let admin = Database::connect(admin_url()).await?;
        admin
            .execute_unprepared(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await?;
        admin.close().await?;
        Ok(())
    }

    /// Settings for this database and the local NATS server
    /// (`BENCH_NATS_URL`), writing to `stream` under subject `prefix`.
    pub fn nats_settings(&self, stream: &str, prefix: &str) -> outbox_core::Settings {
        let mut settings = self.settings();
        settings.broker.url = nats_url();
        settings.nats.stream = stream.to_owned();
        settings.nats.subject_prefix = prefix.to_owned();
        settings
    }

    /// Settings for a relay on this database and the local broker.
    pub fn settings(&self) -> outbox_core::Settings {
        let mut settings = outbox_core::Settings::default();
        settings.database.url = Some(self.url.clone());
        settings.broker.url = amqp_url();
        settings
    }

    /// Rows of `published` per status code.
    pub async fn status_counts(&self) -> anyhow::Result<BTreeMap<i32, i64>> {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT status, COUNT(*) AS n FROM published GROUP BY status",
            ))
            .await?;
        let mut counts = BTreeMap::new();
        for row in rows {
            counts.insert(row.try_get::<i32>("", "status")?, row.try_get("", "n")?);
        }
        Ok(counts)
    }

    /// Fail unless every row of `published` is sent (status 2) and there are `n` of them.
    pub async fn expect_all_sent(&self, n: usize) -> anyhow::Result<()> {
        let counts = self.status_counts().await?;
        let expected: BTreeMap<i32, i64> = if n == 0 {
            BTreeMap::new()
        } else {
            BTreeMap::from([(2, n as i64)])
        };
        ensure!(
            counts == expected,
            "published rows per status: {counts:?}, expected {expected:?}"
        );
        Ok(())
    }

    /// One scalar `i64` from `sql`.
    pub async fn scalar(&self, sql: &str) -> anyhow::Result<i64> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await?
            .context("no row")?;
        Ok(row.try_get_by_index(0)?)
    }
}

/// Run `body` on a fresh database, then drop the database whatever happened.
pub async fn with_database<F>(name: &str, body: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&BenchDb) -> anyhow::Result<()>,
{
    let db = BenchDb::create(name).await?;
    let result = body(&db).await;
    let dropped = db.drop_database().await;
    result?;
    dropped
}

/// A SeaORM pool of `max` connections, without statement logging.
pub async fn connect(url: &str, max: u32) -> anyhow::Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max)
        .min_connections(1)
        .sqlx_logging(false);
    Ok(Database::connect(options).await?)
}

/// The message body every benchmark sends: the same shape the derive writes
/// for [`order::Model`] (`{"id", "customer", "amount", "placed_at"}`), ~100 bytes.
pub fn order_body(i: usize) -> serde_json::Value {
    serde_json::json!({
        "id": i,
        "customer": format!("customer-{i:07}"),
        "amount": i * 100,
        "placed_at": "2026-11-24T10:15:30.123Z",
    })
}

/// Write `n` outbox rows to `destination` with `outbox_core::write_all`,
/// `chunk` rows per statement (setup; not timed).
pub async fn write_rows(
    db: &DatabaseConnection,
    destination: &str,
    version: Option<&str>,
    n: usize,
    chunk: usize,
) -> anyhow::Result<()> {
    let mut start = 0;
    while start < n {
        let end = (start + chunk).min(n);
        let messages = (start..end)
            .map(|i| {
                let message = outbox_core::Message::new(destination, order_body(i))?;
                match version {
                    Some(v) => message.with_version(v),
                    None => Ok(message),
                }
            })
            .collect::<outbox_core::Result<Vec<_>>>()?;
        outbox_core::write_all(db, messages).await?;
        start = end;
    }
    Ok(())
}

/// Insert `n` outbox rows with one `INSERT .. SELECT generate_series`, shaped
/// as `write_all` shapes them (same columns, body keys, `dop-*` header keys),
/// and check that shape against a row written by `write_all`.
pub async fn fill_rows_sql(
    bench: &BenchDb,
    base_destination: &str,
    version: &str,
    n: usize,
) -> anyhow::Result<()> {
    let destination = format!("{base_destination}.{version}");
    // A reference row from the library, to compare the shape with.
    let reference = outbox_core::write(
        &bench.db,
        outbox_core::Message::new(base_destination, order_body(0))?.with_version(version)?,
    )
    .await?;
    // BENCH_IDS=v7: ids ordered by time (48-bit milliseconds first, as
    // UUIDv7), instead of random ones.
    let ordered = std::env::var("BENCH_IDS").is_ok_and(|v| v == "v7");
    let id = if ordered {
        "(lpad(to_hex(floor(extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7' \
           || substr(replace(gen_random_uuid()::text, '-', ''), 14, 19))::uuid"
    } else {
        "gen_random_uuid()"
    };
    let sql = format!(
        "WITH t AS (
            SELECT g, $2::timestamptz + g * interval '1 microsecond' AS ts
            FROM generate_series(1, $1::bigint) AS g
        ), s AS (SELECT g, ts, {id} AS id FROM t)
        INSERT INTO published (id, version, destination, body, added, expires_at, retry,
                               status, headers, next_attempt_at, last_error)
        SELECT id, $3, $4,
               jsonb_build_object('id', g, 'customer', 'customer-' || lpad(g::text, 7, '0'),
                                  'amount', g * 100, 'placed_at', '2026-11-24T10:15:30.123Z'),
               ts, ts + interval '1 day', 0, 1,
               jsonb_build_object(
                   'dop-msg-id', id::text,
                   'dop-msg-destination', $4::text,
                   'dop-msg-type', 'Published',
                   'dop-msg-sent-time', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                   'dop-correlation-id', gen_random_uuid()::text),
               ts, NULL
        FROM s"
    );
    bench
        .db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            [
                (n as i64).into(),
                chrono::Utc::now().into(),
                version.into(),
                destination.clone().into(),
            ],
        ))
        .await?;
    // Compare a generated row with the reference, then remove the reference.
    let row = bench
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT body, headers, destination, version FROM published WHERE id <> $1 LIMIT 1",
            [reference.id.into()],
        ))
        .await?
        .context("no generated row")?;
    let body: serde_json::Value = row.try_get("", "body")?;
    let headers: serde_json::Value = row.try_get("", "headers")?;
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    ensure!(
        keys(&body) == keys(&reference.body) && keys(&headers) == keys(&reference.headers),
        "generated row shape differs from write_all's: body {body} headers {headers} vs {} {}",
        reference.body,
        reference.headers
    );
    ensure!(row.try_get::<String>("", "destination")? == reference.destination);
    ensure!(row.try_get::<Option<String>>("", "version")? == reference.version);
    bench
        .db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "DELETE FROM published WHERE id = $1",
            [reference.id.into()],
        ))
        .await?;
    let count = bench.scalar("SELECT COUNT(*) FROM published").await?;
    ensure!(
        count == n as i64,
        "expected {n} generated rows, found {count}"
    );
    Ok(())
}

/// A plain lapin connection for topology, counting and raw publishing.
#[derive(Debug)]
pub struct Amqp {
    /// The connection.
    pub connection: Connection,
    /// A channel for topology calls.
    pub channel: Channel,
}

impl Amqp {
    /// Connect to [`amqp_url`].
    pub async fn connect() -> anyhow::Result<Amqp> {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .context("connect to RabbitMQ (AMQP_URL)")?;
        let channel = connection.create_channel().await?;
        Ok(Amqp {
            connection,
            channel,
        })
    }

    /// Declare a queue (deleted first if a crashed run left it), durable unless
    /// `BENCH_QUEUE_DURABLE=0`, and bind it to `amq.topic` with `routing_key`.
    /// `lazy` (or `BENCH_QUEUE_LAZY=1`) keeps its messages on disk.
    pub async fn bound_queue(
        &self,
        name: &str,
        routing_key: &str,
        lazy: bool,
    ) -> anyhow::Result<()> {
        self.channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
        let mut args = FieldTable::default();
        if lazy || std::env::var("BENCH_QUEUE_LAZY").is_ok_and(|v| v == "1") {
            args.insert("x-queue-mode".into(), AMQPValue::LongString("lazy".into()));
        }
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: queue_durable(),
                    ..Default::default()
                },
                args,
            )
            .await?;
        self.channel
            .queue_bind(
                name.into(),
                "amq.topic".into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Messages ready in `queue`.
    pub async fn message_count(&self, queue: &str) -> anyhow::Result<u32> {
        let channel = self.connection.create_channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "bye".into()).await;
        Ok(q.message_count())
    }

    /// Fail unless `queue` holds exactly `n` messages (waits up to 10 s for it to settle).
    pub async fn expect_count(&self, queue: &str, n: usize) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let count = self.message_count(queue).await? as usize;
            if count == n {
                return Ok(());
            }
            if count > n || tokio::time::Instant::now() > deadline {
                bail!("queue {queue} holds {count} messages, expected {n}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Empty `queue`.
    pub async fn purge(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_purge(queue.into(), QueuePurgeOptions::default())
            .await?;
        Ok(())
    }

    /// Delete `queue`.
    pub async fn delete(&self, queue: &str) -> anyhow::Result<()> {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// Close the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// The properties the relay sends with a message (persistent JSON, the five
/// `dop-*` headers as long strings, `message_id`, `correlation_id`), for the
/// raw lapin baseline to send exactly as much.
pub fn relay_like_properties(destination: &str) -> BasicProperties {
    let (properties, id, correlation) = dop_headers_only(destination);
    properties
        .with_content_type("application/json".into())
        .with_message_id(id.as_str().into())
        .with_correlation_id(correlation.as_str().into())
}

/// The five `dop-*` headers and `delivery_mode 2` alone (what the wire
/// format requires), with the message and correlation ids they carry.
pub fn dop_headers_only(destination: &str) -> (BasicProperties, String, String) {
    let id = uuid::Uuid::new_v4().to_string();
    let correlation = uuid::Uuid::new_v4().to_string();
    let mut table = FieldTable::default();
    for (name, value) in [
        ("dop-correlation-id", correlation.as_str()),
        ("dop-msg-destination", destination),
        ("dop-msg-id", id.as_str()),
        ("dop-msg-sent-time", "2026-11-24T10:15:30.123Z"),
        ("dop-msg-type", "Published"),
    ] {
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(table);
    (properties, id, correlation)
}

/// A raw lapin baseline: a connection of its own with one confirm-mode
/// channel, publishing to `amq.topic`.
#[derive(Debug)]
pub struct RawPublisher {
    connection: Connection,
    channel: Channel,
}

impl RawPublisher {
    /// Connect and put the channel in confirm mode (not part of a timing).
    pub async fn connect() -> anyhow::Result<RawPublisher> {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(RawPublisher {
            connection,
            channel,
        })
    }

    /// Publish `bodies` (persistent, mandatory) with at most `window`
    /// unconfirmed, each with `properties()`; fails unless every confirm is a
    /// plain ack. With a window of 1, returns each publish → confirm time in
    /// ms (there each one is a round trip), sorted.
    pub async fn publish(
        &self,
        routing_key: &str,
        bodies: &[Vec<u8>],
        window: usize,
        properties: impl Fn() -> BasicProperties,
    ) -> anyhow::Result<Vec<f64>> {
        let mut refused = 0_usize;
        let mut check = |confirmation: Confirmation| {
            if !matches!(confirmation, Confirmation::Ack(None)) {
                refused += 1;
            }
        };
        let mut confirm_ms = Vec::new();
        let mut pending = std::collections::VecDeque::with_capacity(window);
        for body in bodies {
            let sent = std::time::Instant::now();
            let confirm = self
                .channel
                .basic_publish(
                    "amq.topic".into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body,
                    properties(),
                )
                .await?;
            pending.push_back(confirm);
            if pending.len() >= window
                && let Some(oldest) = pending.pop_front()
            {
                check(oldest.await?);
                if window == 1 {
                    confirm_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        while let Some(confirm) = pending.pop_front() {
            check(confirm.await?);
        }
        if refused > 0 {
            bail!(
                "raw lapin: {refused} of {} messages were not acked cleanly",
                bodies.len()
            );
        }
        confirm_ms.sort_by(f64::total_cmp);
        Ok(confirm_ms)
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// The median of `values` (not empty).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

/// The `p`-th percentile (nearest rank) of sorted `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 { format!("-{out}") } else { out }
}

/// Print the header every benchmark starts with.
pub fn print_machine() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "machine: {cores} cores, PostgreSQL at {}, RabbitMQ at {}",
        admin_url(),
        amqp_url()
    );
}

/// Exit non-zero (after printing the error chain) when `result` failed.
pub fn finish(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => {
            println!("OK: every measured run was verified");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("FAILED: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// CPU time per process group, from `/proc`: who burns the two cores.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    /// Clock ticks per group (`postgres`, `rabbitmq`, `nats-server`, `outbox-cli`, `this process`, `other`).
    pub ticks: BTreeMap<&'static str, u64>,
    /// Busy and total ticks of the whole machine (`/proc/stat`).
    pub machine: (u64, u64),
}

impl CpuSnapshot {
    /// Read every process's `utime + stime` now.
    pub fn take() -> CpuSnapshot {
        let me = std::process::id().to_string();
        let mut ticks = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.bytes().all(|b| b.is_ascii_digit()) {
                    continue;
                }
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    continue;
                };
                let comm = &stat[open + 1..close];
                let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                let used = fields
                    .get(11)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
                    + fields
                        .get(12)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                let group = if name == me {
                    "this process"
                } else if comm.starts_with("postgres") {
                    "postgres"
                } else if comm == "beam.smp" || comm == "erl_child_setup" || comm == "epmd" {
                    "rabbitmq"
                } else if comm == "nats-server" {
                    "nats-server"
                } else if comm == "outbox-cli" {
                    "outbox-cli"
                } else {
                    "other"
                };
                *ticks.entry(group).or_insert(0) += used;
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let values: Vec<u64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                let total: u64 = values.iter().sum();
                let idle =
                    values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        CpuSnapshot { ticks, machine }
    }

    /// CPU seconds per group since `earlier`, and the machine's busy share (0..1).
    pub fn since(&self, earlier: &CpuSnapshot) -> (BTreeMap<&'static str, f64>, f64) {
        const TICKS_PER_SECOND: f64 = 100.0; // `getconf CLK_TCK` on Linux
        let seconds = self
            .ticks
            .iter()
            .map(|(group, t)| {
                let before = earlier.ticks.get(group).copied().unwrap_or(0);
                (*group, t.saturating_sub(before) as f64 / TICKS_PER_SECOND)
            })
            .collect();
        let busy = self.machine.0.saturating_sub(earlier.machine.0) as f64;
        let total = self.machine.1.saturating_sub(earlier.machine.1) as f64;
        (seconds, if total > 0.0 { busy / total } else { 0.0 })
    }

    /// `relay 1.2 s, postgres 3.4 s, ..., machine 97% busy` over `wall` seconds.
    pub fn describe(&self, earlier: &CpuSnapshot, wall: f64) -> String {
        let (seconds, busy) = self.since(earlier);
        let mut parts: Vec<String> = seconds
            .iter()
            .map(|(group, s)| format!("{group} {s:.1}s ({:.0}%)", 100.0 * s / wall))
            .collect();
        parts.push(format!("machine {:.0}% busy", 100.0 * busy));
        parts.join(", ")
    }
}

impl CpuSnapshot {
    /// CPU used by processes other than this one, PostgreSQL, RabbitMQ and NATS
    /// since `earlier`, as a share of one core over `wall` seconds: a
    /// compiler or test run next to the benchmark.
    pub fn other_share(&self, earlier: &CpuSnapshot, wall: f64) -> f64 {
        let (seconds, _) = self.since(earlier);
        seconds.get("other").copied().unwrap_or(0.0) / wall.max(1e-9)
    }
}

/// Wait (up to `BENCH_QUIET_WAIT` seconds, default 600) until the machine is
/// idle (< 20% busy over two consecutive seconds), so that a compile or test
/// run next to the benchmark does not skew it.
pub async fn wait_quiet() -> anyhow::Result<()> {
    let limit = Duration::from_secs(env_usize("BENCH_QUIET_WAIT", 600)? as u64);
    let start = tokio::time::Instant::now();
    let mut calm = 0;
    let mut said = false;
    while calm < 2 {
        let before = CpuSnapshot::take();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, busy) = CpuSnapshot::take().since(&before);
        if busy < 0.20 {
            calm += 1;
        } else {
            calm = 0;
            if !said {
                println!(
                    "(waiting for the machine to be idle: {:.0}% busy)",
                    busy * 100.0
                );
                said = true;
            }
        }
        if start.elapsed() > limit {
            println!("warning: the machine did not become idle within {limit:?}; measuring anyway");
            break;
        }
    }
    Ok(())
}

/// Run `run` (which returns its value and the share of a core other
/// processes used meanwhile, see [`CpuSnapshot::other_share`]) after waiting
/// for quiet; repeat it, up to 3 attempts, when something else ran alongside
/// (> 10% of a core).
pub async fn undisturbed<T>(
    label: &str,
    mut run: impl AsyncFnMut() -> anyhow::Result<(T, f64)>,
) -> anyhow::Result<T> {
    let mut attempt = 1;
    loop {
        wait_quiet().await?;
        let (value, other) = run().await?;
        if other <= 0.10 {
            return Ok(value);
        }
        if attempt == 3 {
            println!(
                "warning: {label}: other processes used {:.0}% of a core during the run (3rd attempt, kept)",
                other * 100.0
            );
            return Ok(value);
        }
        println!(
            "{label}: other processes used {:.0}% of a core during the run; repeating it",
            other * 100.0
        );
        attempt += 1;
    }
}
