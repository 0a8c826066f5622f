//! Opening the database the way the relay and the consumer need it.

use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend};

use crate::{Error, Result, Settings};

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect to `database.url` with the configured pool size. SQLite gets WAL
/// mode, so the relay can read while the application writes.
pub async fn connect(settings: &Settings) -> Result<DatabaseConnection> {
    let url = settings.database_url()?;
    // The pool retries a refused connection until its acquire timeout and
    // then says only "pool timed out"; a plain TCP connect says why, at once.
    if let Some(address) = tcp_address(url) {
        let reached =
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&address)).await;
        let failure = match reached {
            Ok(Ok(_)) => None,
            Ok(Err(err)) => Some(err),
            Err(_) => Some(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            )),
        };
        if let Some(source) = failure {
            return Err(Error::DatabaseUnreachable { address, source });
        }
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(settings.database.max_connections)
        // Open a few connections up front: a connection opened mid-run
        // costs ~90 ms (sqlx 0.9.0), a visible latency spike.
        .min_connections(settings.database.max_connections.min(4))
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        db.execute_unprepared("PRAGMA journal_mode=WAL").await?;
    }
    Ok(db)
}

/// `host:port` of a PostgreSQL or MySQL URL that connects over TCP (not a
/// Unix socket, not SQLite), without credentials.
fn tcp_address(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme {
        "postgres" | "postgresql" => 5432,
        "mysql" | "mariadb" => 3306,
        _ => return None,
    };
    if rest.contains("host=/") || rest.contains("socket=") {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host_port.is_empty() || host_port.starts_with('%') {
        return None;
    }
    let (host, port) = match host_port.strip_prefix('[') {
        Some(v6) => {
            let (host, after) = v6.split_once(']')?;
            (format!("[{host}]"), after.strip_prefix(':'))
        }
        None => match host_port.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (host_port.to_owned(), None),
        },
    };
    let port = match port {
        Some(port) => port.parse::<u16>().ok()?,
        None => default_port,
    };
    Some(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::tcp_address;

    #[test]
    fn tcp_addresses_come_without_credentials() {
        let cases = [
            (
                "postgres://app:secret@db.example:6432/app",
                Some("db.example:6432"),
            ),
            (
                "postgres://postgres@127.0.0.1/postgres",
                Some("127.0.0.1:5432"),
            ),
            ("mysql://root@localhost/test", Some("localhost:3306")),
            (
                "postgresql://[::1]:5433/x?sslmode=disable",
                Some("[::1]:5433"),
            ),
            ("postgres:///app?host=/var/run/postgresql", None),
            ("sqlite://outbox.db?mode=rwc", None),
            ("sqlite::memory:", None),
        ];
        for (url, want) in cases {
            assert_eq!(tcp_address(url).as_deref(), want, "{url}");
        }
    }
}
