//! Shared test helpers: a fresh database per test on the real servers.
#![allow(dead_code, unreachable_pub)]

pub mod amqp;
pub mod entities;
pub mod nats;
pub mod private;
pub mod script;

use std::sync::Once;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Schema, Statement,
};
use uuid::Uuid;

/// Which server a test database lives on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    MariaDb,
    Sqlite,
}

pub const ALL_BACKENDS: [Backend; 3] = [Backend::Postgres, Backend::MariaDb, Backend::Sqlite];

pub fn postgres_admin_url() -> String {
    std::env::var("OUTBOX_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn mariadb_admin_url() -> String {
    std::env::var("OUTBOX_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,outbox_core=info".into()),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A database created for one test, dropped when the value is dropped.
pub struct TestDb {
    pub backend: Backend,
    pub url: String,
    pub db: DatabaseConnection,
    name: String,
    sqlite_dir: Option<std::path::PathBuf>,
    /// The admin URL of a server other than the machine's own.
    admin_url: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        TestDb::create(backend, None).await
    }

    /// A database on another PostgreSQL server (a private cluster), given
    /// its admin URL.
    pub async fn on_postgres(admin_url: &str) -> TestDb {
        TestDb::create(Backend::Postgres, Some(admin_url.to_owned())).await
    }

    async fn create(backend: Backend, admin_url: Option<String>) -> TestDb {
        init_tracing();
        let name = format!("outbox_t_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let (url, sqlite_dir) = match backend {
            Backend::Postgres => {
                let admin_url = admin_url.clone().unwrap_or_else(postgres_admin_url);
                let admin = Database::connect(admin_url.as_str())
                    .await
                    .expect("connect to PostgreSQL (is it running? scripts/services.sh starts it)");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create database");
                (replace_db(&admin_url, &name), None)
            }
            Backend::MariaDb => {
                let admin = Database::connect(mariadb_admin_url())
                    .await
                    .expect("connect to MariaDB (is it running? scripts/services.sh starts it)");
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create database");
                (replace_db(&mariadb_admin_url(), &name), None)
            }
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(&name);
                std::fs::create_dir_all(&dir).expect("temp dir");
                (
                    format!("sqlite://{}?mode=rwc", dir.join("test.db").display()),
                    Some(dir),
                )
            }
        };
        let db = connect(&url).await;
        outbox_core::migrate(&db).await.expect("migrate");
        TestDb {
            backend,
            url,
            db,
            name,
            sqlite_dir,
            admin_url,
        }
    }

    /// Create the test entities' tables.
    pub async fn create_entity_tables(&self) {
        let backend = self.db.get_database_backend();
        let schema = Schema::new(backend);
        let statements = [
            backend.build(&schema.create_table_from_entity(entities::order::Entity)),
            backend.build(&schema.create_table_from_entity(entities::shipment::Entity)),
        ];
        for statement in statements {
            self.db.execute_raw(statement).await.expect("create table");
        }
    }

    pub fn is(&self, backend: DbBackend) -> bool {
        self.db.get_database_backend() == backend
    }
}

pub async fn connect(url: &str) -> DatabaseConnection {
    let mut options = ConnectOptions::new(url.to_owned());
    options.max_connections(10).sqlx_logging(false);
    let db = Database::connect(options)
        .await
        .expect("connect to test database");
    if db.get_database_backend() == DbBackend::Sqlite {
        // As `outbox_core::connect` does: readers do not block the writer.
        db.execute_unprepared("PRAGMA journal_mode=WAL")
            .await
            .expect("WAL mode");
    }
    db
}

fn replace_db(url: &str, name: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    format!("{base}/{name}")
}

impl TestDb {
    /// Transactions left open on this database, counted from another thread
    /// while this one blocks: a rollback queued for a background task of the
    /// test's runtime cannot run meanwhile.
    pub fn open_transactions_now(&self) -> i64 {
        let sql = match self.backend {
            Backend::Postgres => format!(
                "SELECT COUNT(*) AS n FROM pg_stat_activity \
                 WHERE datname = '{}' AND state LIKE 'idle in transaction%'",
                self.name
            ),
            Backend::MariaDb => format!(
                "SELECT COUNT(*) AS n FROM information_schema.innodb_trx t \
                 JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id \
                 WHERE p.db = '{}'",
                self.name
            ),
            Backend::Sqlite => panic!("no server to ask on SQLite"),
        };
        on_admin_connection(self.backend, move |admin| async move {
            let row = admin
                .query_one_raw(Statement::from_string(admin.get_database_backend(), sql))
                .await
                .expect("count open transactions")
                .expect("one row");
            row.try_get::<i64>("", "n").expect("a count")
        })
        .expect("reach the server as admin")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(dir) = &self.sqlite_dir {
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
        let name = self.name.clone();
        if let Some(admin_url) = self.admin_url.clone() {
            // A private server goes away with its test; try once, quietly.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let admin = Database::connect(admin_url.as_str()).await.ok()?;
                    admin
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .ok()
                })
            })
            .join();
            return;
        }
        on_admin_connection(self.backend, move |admin| async move {
            if admin.get_database_backend() == DbBackend::MySql {
                // What WITH (FORCE) does on PostgreSQL: a session still in a
                // transaction holds a metadata lock DROP DATABASE would wait on.
                let sessions = admin
                    .query_all_raw(Statement::from_string(
                        DbBackend::MySql,
                        format!(
                            "SELECT id FROM information_schema.processlist WHERE db = '{name}'"
                        ),
                    ))
                    .await
                    .unwrap_or_default();
                for session in sessions {
                    if let Ok(id) = session.try_get::<i64>("", "id") {
                        let _ = admin.execute_unprepared(&format!("KILL {id}")).await;
                    }
                }
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name}"))
                    .await;
            } else {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        });
    }
}

/// Run `work` on a new connection to the server's admin database, on a
/// throwaway runtime in another thread, and wait for it: usable from `Drop`
/// and while the caller's runtime must stay blocked. `None` when the server
/// cannot be reached or `work` panicked (`Drop` must not panic).
fn on_admin_connection<F, T>(
    backend: Backend,
    work: impl FnOnce(DatabaseConnection) -> F + Send + 'static,
) -> Option<T>
where
    F: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let admin = match backend {
        Backend::Postgres => postgres_admin_url(),
        Backend::MariaDb => mariadb_admin_url(),
        Backend::Sqlite => unreachable!("SQLite has no server"),
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let admin = Database::connect(admin).await.ok()?;
            Some(work(admin).await)
        })
    })
    .join()
    .ok()
    .flatten()
}

/// Settings for a test: this database, the local broker, quick retries.
pub fn settings(url: &str) -> outbox_core::Settings {
    let mut settings = outbox_core::Settings::default();
    settings.database.url = Some(url.to_owned());
    settings.broker.url = amqp_url();
    settings.broker.operation_timeout = std::time::Duration::from_secs(10);
    settings.relay.waiting_time = std::time::Duration::from_millis(100);
    settings
}

/// Write `n` messages to `destination` with bodies `{"n": i}`.
pub async fn write_messages(db: &DatabaseConnection, destination: &str, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let messages = chunk
            .iter()
            .map(|i| {
                outbox_core::Message::new(destination, serde_json::json!({ "n": i }))
                    .expect("message")
            })
            .collect();
        let rows = outbox_core::write_all(db, messages).await.expect("write");
        ids.extend(rows.into_iter().map(|r| r.id));
    }
    ids
}

/// Rows per status.
pub async fn status_counts(db: &DatabaseConnection) -> std::collections::BTreeMap<i32, u64> {
    use outbox_core::entity::published;
    use sea_orm::{EntityTrait, QuerySelect, sea_query::Expr};
    let rows: Vec<(i32, i64)> = published::Entity::find()
        .select_only()
        .column(published::Column::Status)
        .column_as(Expr::cust("COUNT(*)"), "n")
        .group_by(published::Column::Status)
        .into_tuple()
        .all(db)
        .await
        .expect("status counts");
    rows.into_iter().map(|(s, n)| (s, n as u64)).collect()
}

/// Poll `check` every 50 ms until it is true or `limit` passes.
pub async fn eventually<F, Fut>(limit: std::time::Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Rows in `received`.
pub async fn received_count(db: &DatabaseConnection) -> u64 {
    use sea_orm::{EntityTrait, PaginatorTrait};
    outbox_core::entity::received::Entity::find()
        .count(db)
        .await
        .expect("count received")
}

/// The `outbox-cli` binary of this build: `OUTBOX_TEST_CLI` when set
/// (scripts/test.sh names the one `cargo test --workspace --all-targets`
/// just built), else built on demand, as when a test runs alone. That build
/// has other features than the test build, so it recompiles outbox-core.
pub fn cli_binary() -> std::path::PathBuf {
    if let Some(binary) = std::env::var_os("OUTBOX_TEST_CLI") {
        return binary.into();
    }
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let binary = dir.join("outbox-cli");
    BUILD.call_once(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "outbox-cli",
                "--bin",
                "outbox-cli",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building outbox-cli failed");
    });
    binary
}

/// `outbox-cli` with this test's database and the local broker.
pub fn cli(url: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(cli_binary());
    command
        .env_remove("OUTBOX_CONFIG")
        .env("DATABASE_URL", url)
        .env("AMQP_URL", amqp_url())
        .env("RUST_LOG", "info,sqlx=warn")
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    command
}

/// Send a signal to a child process.
pub fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("child still running");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Insert a `published` row by SQL, as another tool might: `id` as given
/// (a UUID, or text on SQLite), the body and headers as JSON text.
pub async fn insert_raw_row(
    db: &DatabaseConnection,
    id: sea_orm::Value,
    destination: &str,
    body: &str,
    headers: &str,
) {
    let backend = db.get_database_backend();
    let now = chrono::Utc::now();
    let (sql, values): (&str, Vec<sea_orm::Value>) = match backend {
        DbBackend::Postgres => (
            "INSERT INTO published (id, destination, body, added, expires_at, retry, status, headers, next_attempt_at) \
             VALUES ($1, $2, $3::jsonb, $4, $4, 0, 1, $5::jsonb, $4)",
            vec![
                id,
                destination.into(),
                body.into(),
                now.into(),
                headers.into(),
            ],
        ),
        _ => (
            "INSERT INTO published (id, destination, body, added, expires_at, retry, status, headers, next_attempt_at) \
             VALUES (?, ?, ?, ?, ?, 0, 1, ?, ?)",
            vec![
                id,
                destination.into(),
                body.into(),
                now.into(),
                now.into(),
                headers.into(),
                now.into(),
            ],
        ),
    };
    db.execute_raw(Statement::from_sql_and_values(backend, sql, values))
        .await
        .expect("insert a row by SQL");
}

/// A loopback port where nothing answers, for as long as this lives. The
/// socket is bound but never listens: a connection to it is refused at
/// once, and no other process can take the port meanwhile (a port merely
/// found free and let go was once taken by some listener, likely the
/// Erlang node of a concurrent rabbitmqctl, that accepted the test's AMQP
/// connection and said nothing).
#[derive(Debug)]
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl ClosedPort {
    pub fn bind() -> ClosedPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind("127.0.0.1:0".parse().unwrap())
            .expect("bind a loopback port");
        let port = socket.local_addr().expect("its address").port();
        ClosedPort {
            _socket: socket,
            port,
        }
    }
}
