//! Shared helpers for the benchmark binaries in `src/bin/`.
//!
//! Every benchmark runs in release mode against the real PostgreSQL and
//! RabbitMQ, in a database of its own (`outbox_bench_<name>`, dropped at the
//! end), and exits non-zero when what it measured is not correct.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use lapin::options::{
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
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

/// The PostgreSQL server's maintenance database URL (`BENCH_POSTGRES_URL`).
pub fn admin_url() -> String {
    std::env::var("BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
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
        admin.close().await?;
        let url = replace_db(&admin_url(), &name);
        let db = connect(&url, 4).await?;
        outbox_core::migrate(&db).await?;
        Ok(BenchDb { name, url, db })
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
    let sql = "WITH s AS (
            SELECT g, gen_random_uuid() AS id,
                   $2::timestamptz + g * interval '1 microsecond' AS ts
            FROM generate_series(1, $1::bigint) AS g
        )
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
        FROM s";
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

    /// Declare a durable queue (deleted first if a crashed run left it) and
    /// bind it to `amq.topic` with `routing_key`. `lazy` keeps its messages on disk.
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
        if lazy {
            args.insert("x-queue-mode".into(), AMQPValue::LongString("lazy".into()));
        }
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
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
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(table)
        .with_message_id(id.as_str().into())
        .with_correlation_id(correlation.as_str().into())
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
