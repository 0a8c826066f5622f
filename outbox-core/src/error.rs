//! The crate's one error type.

use std::time::Duration;

/// A boxed error from user code (callbacks, serializers).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `outbox-core`.
///
/// Messages are lowercase and say what failed at this layer; the cause is
/// available through [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database statement failed.
    #[error("database error")]
    Database(#[source] sea_orm::DbErr),

    /// A broker operation failed because the connection or the broker did
    /// (an outage: retried with backoff, no attempt counted).
    #[error("broker operation `{operation}` failed ({endpoint})")]
    Broker {
        /// What we were doing.
        operation: &'static str,
        /// The broker, without credentials.
        endpoint: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// Nothing answers at the broker's address (an outage: retried with
    /// backoff).
    #[error(
        "nothing answers at {endpoint} ({source}); is the broker running, and does broker.url (AMQP_URL) name the right host and port?"
    )]
    BrokerUnreachable {
        /// The broker, without credentials.
        endpoint: String,
        /// Why the connection failed.
        #[source]
        source: BoxError,
    },

    /// The broker refused the connection for a reason retrying cannot fix
    /// (credentials, an unknown vhost).
    #[error("the broker at {endpoint} refused the connection: {reason}; {fix}")]
    BrokerRefused {
        /// The broker, without credentials.
        endpoint: String,
        /// What the broker said.
        reason: String,
        /// What to change.
        fix: String,
    },

    /// The broker refused to set up a subscription (a missing exchange, a
    /// queue with other arguments, a permission).
    #[error("cannot subscribe to `{destination}`: {reason}; {fix}")]
    SubscriptionRefused {
        /// The destination subscribed to.
        destination: String,
        /// What the broker said.
        reason: String,
        /// What to change.
        fix: String,
    },

    /// The broker did not take a directly sent message.
    #[error("message to `{destination}` not delivered: {reason}")]
    NotDelivered {
        /// Where it was going.
        destination: String,
        /// What the broker said.
        reason: String,
    },

    /// A broker operation did not finish in time.
    #[error("broker operation `{operation}` timed out after {timeout:?}")]
    BrokerTimeout {
        /// What we were waiting for.
        operation: &'static str,
        /// How long we waited.
        timeout: Duration,
    },

    /// A destination string is not one RabbitMQ's STOMP plugin understands.
    #[error(
        "invalid destination `{destination}`: {reason}; {}",
        crate::destination::rules::ADVICE
    )]
    InvalidDestination {
        /// The destination as given.
        destination: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A destination that names no NATS subject.
    #[error("destination {destination:?} is not a NATS subject: {problem}")]
    InvalidSubject {
        /// The destination as given.
        destination: String,
        /// What is wrong with it, and what to write instead.
        problem: String,
    },

    /// A message version that cannot be appended to a destination.
    #[error("invalid version {version:?}: {reason}")]
    InvalidVersion {
        /// The version as given.
        version: String,
        /// What is allowed.
        reason: &'static str,
    },

    /// A setting has a value that is not allowed.
    #[error("invalid setting `{key}` = {value}: {allowed}")]
    InvalidSetting {
        /// The setting's key, as written in `outbox.toml` (`relay.batch_size`).
        key: String,
        /// The rejected value.
        value: String,
        /// What would be accepted.
        allowed: String,
    },

    /// A settings file names a key we do not know.
    #[error("unknown setting `{key}` in {file}; {known}")]
    UnknownSetting {
        /// The key as written.
        key: String,
        /// The file it is in.
        file: String,
        /// Every known key.
        known: String,
    },

    /// A setting that this command needs has no value.
    #[error("missing setting `{key}`: {hint}")]
    MissingSetting {
        /// The key.
        key: &'static str,
        /// How to provide it.
        hint: &'static str,
    },

    /// The settings file could not be read or parsed.
    #[error("cannot read settings file `{path}`")]
    SettingsFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: BoxError,
    },

    /// A message body could not be turned into JSON.
    #[error("cannot serialize the message body for `{destination}`")]
    Body {
        /// The destination of the message.
        destination: String,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },

    /// No callback is registered under the path given to `subscribe`.
    #[error(
        "no callback registered as `{path}`; registered callbacks: {}; a `#[callback]` in a library crate is linked into a binary only when the binary uses that crate: add `use {} as _;` to its main.rs",
        list_or_none(.registered),
        crate_of(.path)
    )]
    UnknownCallback {
        /// The path asked for.
        path: String,
        /// Every registered path.
        registered: Vec<String>,
    },

    /// A header that cannot travel: a name or value over a transport limit.
    #[error("invalid header `{name}`: {reason}")]
    InvalidHeader {
        /// The header name (cut to 40 characters).
        name: String,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// An outbox table or column this command needs is missing.
    #[error(
        "the database has no {what}; run `outbox-cli migrate` (or `outbox_core::migrate`) first"
    )]
    SchemaMissing {
        /// What is missing, e.g. "table `published`".
        what: String,
        /// The database's error.
        #[source]
        source: sea_orm::DbErr,
    },

    /// [`Payload::save`](crate::Payload::save) or [`Batch::save`](crate::Batch::save)
    /// was given a transaction begun by another payload or batch.
    #[error(
        "the transaction passed to `save` was begun by another payload or batch; save with the transaction your own `begin` returned"
    )]
    ForeignTransaction,

    /// [`Batch::nack`](crate::Batch::nack) was given a payload of another batch.
    #[error(
        "the payload passed to `Batch::nack` is not one of this batch's; nack only payloads from `Batch::payloads`"
    )]
    NotInBatch,

    /// A callback used its transaction after the message was decided.
    #[error(
        "this transaction is over: its message was already saved, nacked or its batch ended; do every write before `Payload::save` returns"
    )]
    TransactionOver,

    /// The database backend is not one we support.
    #[error("unsupported database backend `{0}`; use PostgreSQL, MySQL/MariaDB or SQLite")]
    UnsupportedBackend(String),

    /// Something the configured broker's transport cannot do (yet).
    #[error("{0}")]
    UnsupportedByTransport(String),

    /// An outbox row was asked for that does not exist (or is in the wrong state).
    #[error("no {what} outbox row with id {id}")]
    RowNotFound {
        /// Which kind of row (e.g. "failed").
        what: &'static str,
        /// The id asked for.
        id: uuid::Uuid,
    },

    /// Nothing answers at the database's address.
    #[error(
        "nothing answers at {address} ({source}); is the database running, and does database.url (DATABASE_URL) name the right host and port?"
    )]
    DatabaseUnreachable {
        /// `host:port` from the URL.
        address: String,
        /// Why the connection failed.
        #[source]
        source: std::io::Error,
    },

    /// Log-tailing capture cannot run as configured (PostgreSQL settings,
    /// a missing slot or publication, another database).
    #[error("log-tailing capture: {problem}; {fix}")]
    Capture {
        /// What is wrong.
        problem: String,
        /// What to change.
        fix: String,
    },

    /// The replication stream broke or could not start (an outage: the
    /// relay reconnects with backoff and resumes from the slot).
    #[error("replication stream from {endpoint}: {reason}")]
    Replication {
        /// The database, without credentials.
        endpoint: String,
        /// What the replication client said.
        reason: String,
    },

    /// Reading or writing a local resource (a socket, a file) failed.
    #[error("i/o error while {context}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<sea_orm::DbErr> for Error {
    /// A missing table or column says what to run.
    fn from(err: sea_orm::DbErr) -> Error {
        if crate::schema::is_missing(&err) {
            let text = err.to_string();
            let what = ["published", "received"]
                .into_iter()
                .find(|table| text.contains(table))
                .map_or("outbox table or column this needs".to_owned(), |table| {
                    format!("`{table}` table (or one of its columns)")
                });
            Error::SchemaMissing { what, source: err }
        } else {
            Error::Database(err)
        }
    }
}

fn list_or_none(paths: &[String]) -> String {
    if paths.is_empty() {
        "none (annotate an async fn with #[outbox_core::callback] and link it into this binary)"
            .to_owned()
    } else {
        paths.join(", ")
    }
}

impl Error {
    /// True when the error comes from the infrastructure (broker or database
    /// connectivity) rather than from the message itself. Such errors pause
    /// the relay and the consumer; they never count as a failed attempt.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Broker { .. }
            | Error::BrokerTimeout { .. }
            | Error::BrokerUnreachable { .. } => true,
            Error::Database(err) => is_transient_db(err),
            Error::Io { .. } | Error::DatabaseUnreachable { .. } | Error::Replication { .. } => {
                true
            }
            _ => false,
        }
    }
}

/// Database failures that another try can cure: the server went away, the
/// pool could not hand out a connection, a socket broke, or the statement
/// lost a race (serialization failure, deadlock, lock timeout, SQLite busy).
pub(crate) fn is_transient_db(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr};
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            use sea_orm::sqlx::Error as SqlxError;
            match e.as_ref() {
                SqlxError::Io(_)
                | SqlxError::Tls(_)
                | SqlxError::PoolTimedOut
                | SqlxError::PoolClosed
                | SqlxError::WorkerCrashed
                | SqlxError::Protocol(_) => true,
                SqlxError::Database(db) => transient_code(db.as_ref()),
                _ => false,
            }
        }
        _ => false,
    }
}

fn transient_code(db: &dyn sea_orm::sqlx::error::DatabaseError) -> bool {
    use sea_orm::sqlx::error::ErrorKind;
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        // deadlock, lock wait timeout, server gone / lost, too many connections
        return matches!(
            mysql.number(),
            1213 | 1205 | 2006 | 2013 | 1040 | 1053 | 1927
        );
    }
    #[cfg(feature = "sqlite")]
    if db
        .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // SQLITE_BUSY and SQLITE_LOCKED, with their extended codes
        let primary = db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .map(|code| code & 0xff);
        return matches!(primary, Some(5 | 6));
    }
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation | ErrorKind::ForeignKeyViolation
    ) {
        return false;
    }
    // PostgreSQL: serialization_failure, deadlock_detected, lock_not_available,
    // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections,
    // connection exceptions, query_canceled by statement timeout.
    matches!(
        db.code().as_deref(),
        Some(
            "40001"
                | "40P01"
                | "55P03"
                | "57P01"
                | "57P02"
                | "57P03"
                | "53300"
                | "08006"
                | "08003"
                | "08001"
                | "08000"
                | "08004"
        )
    )
}

/// An error and its causes on one line: `relay stopped: broker error: connection refused`.
/// Causes whose text is already there are not repeated, and URLs in it have
/// their passwords masked.
pub fn report(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Wrapped errors often repeat their source's text; say it once.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    crate::redact::text(&without_source_lines(&text))
}

/// The crate a callback path names (its first segment).
fn crate_of(path: &str) -> &str {
    match path.split("::").next() {
        Some(first) if !first.is_empty() && path.contains("::") => first,
        _ => "<your_crate>",
    }
}

/// PostgreSQL errors end in " at line N", a line of the server's C source:
/// noise to a user. (serde_json's "at line 1 column 2" stays.)
fn without_source_lines(text: &str) -> String {
    const MARK: &str = " at line ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let next = after[digits..].chars().next();
        let noise = digits > 0 && matches!(next, None | Some(':' | ')' | ';' | ','));
        out.push_str(&rest[..at]);
        if !noise {
            out.push_str(MARK);
        }
        rest = if noise { &after[digits..] } else { after };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::without_source_lines;

    #[test]
    fn server_source_lines_are_dropped_and_json_positions_kept() {
        assert_eq!(
            without_source_lines(
                "error returned from database: relation \"published\" does not exist at line 1392"
            ),
            "error returned from database: relation \"published\" does not exist"
        );
        assert_eq!(without_source_lines("a at line 12: b at line 3"), "a: b");
        let json = "key must be a string at line 1 column 2";
        assert_eq!(without_source_lines(json), json);
        assert_eq!(without_source_lines("at line x"), "at line x");
    }
}
