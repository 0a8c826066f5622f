//! Settings: defaults equal to django-outbox-pattern's, overlaid by a TOML
//! file and then by environment variables.
//!
//! Every key `section.name` can be set in the file as `[section] name = ..`
//! and in the environment as `OUTBOX_SECTION_NAME`. `DATABASE_URL` and
//! `AMQP_URL` are honoured as well (below `OUTBOX_DATABASE_URL` and
//! `OUTBOX_BROKER_URL`). Durations are seconds and may be fractional.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Error, Result};

/// What the relay does with a message the broker returns as unroutable
/// (published with `mandatory`, no queue bound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unroutable {
    /// Count a failed attempt and retry on the normal schedule; the row ends
    /// FAILED with the error "unroutable" if nobody ever binds a queue.
    Retry,
    /// Mark it sent, with a warning, like a STOMP `SEND` to a topic nobody
    /// listens to. For fan-out events where no listener is a normal state.
    Accept,
}

/// How the relay finds the messages to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// Claim due rows of `published` (`FOR UPDATE SKIP LOCKED`, a lease, a
    /// mark per row). Every database.
    Claim,
    /// Read committed messages from PostgreSQL's logical replication stream
    /// (`outbox-cli wal setup` first); claims stay for retries and for rows
    /// the stream did not deliver within `wal.sweep_after`.
    Wal,
}

/// How the consumer declares the queues of `/topic/`, `/exchange/` and
/// `/queue/` destinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    /// Classic durable queues, declared exactly as django-outbox-pattern does
    /// (Python and Rust consumers can share them).
    Classic,
    /// Quorum queues (replicated on a cluster), with at-least-once
    /// dead-lettering to `DLQ.<queue>` and an explicit delivery limit.
    Quorum,
}

/// What the consumer does with a message that failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetter {
    /// Copy it to `DLQ.<queue>` with why it failed (`x-outbox-error`), wait
    /// for the broker's confirm, then ack it. Works with every queue.
    Publish,
    /// Reject it without requeue, as django-outbox-pattern does: the queue's
    /// dead-letter exchange routes it (the queues we declare have one; an
    /// `/amq/queue/` queue keeps it only if it has one).
    Nack,
}

/// Where JetStream keeps a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStorage {
    /// On disk (survives a server restart).
    File,
    /// In memory.
    Memory,
}

/// NATS JetStream, used when `broker.url` is `nats://` or `tls://`.
#[derive(Clone, PartialEq)]
pub struct NatsSettings {
    /// `nats.subject_prefix`: put before every subject (`<prefix>.<subject>`), `outbox` by default; empty for none.
    pub subject_prefix: String,
    /// `nats.credentials_file`: a `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// `nats.nkey_seed_file`: a file holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// `nats.tls_ca_file`: PEM certificates to trust for the server's TLS
    /// certificate, besides the system's (a private CA).
    pub tls_ca_file: Option<PathBuf>,
    /// `nats.tls_cert_file` and `nats.tls_key_file`: a client certificate
    /// and its key (PEM), for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    /// See `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// `nats.publish_window`: publishes awaiting their PubAck at once.
    pub publish_window: usize,
    /// `nats.stream`: the stream `outbox-cli stream` creates or checks.
    pub stream: String,
    /// `nats.stream_subjects`: its subjects, comma-separated; empty means `<prefix>.>`.
    pub stream_subjects: Vec<String>,
    /// `nats.stream_storage`: `file` or `memory`.
    pub stream_storage: StreamStorage,
    /// `nats.duplicate_window`: how long JetStream remembers a `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// `nats.replicas`: copies of the stream on a cluster (1 to 5).
    pub replicas: usize,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // File paths only, never what is in them.
        f.debug_struct("NatsSettings")
            .field("subject_prefix", &self.subject_prefix)
            .field("credentials_file", &self.credentials_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("publish_window", &self.publish_window)
            .field("stream", &self.stream)
            .field("stream_subjects", &self.stream_subjects)
            .field("stream_storage", &self.stream_storage)
            .field("duplicate_window", &self.duplicate_window)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// Log-tailing capture (`relay.capture = "wal"`, PostgreSQL).
#[derive(Clone, Debug, PartialEq)]
pub struct WalSettings {
    /// `wal.slot`: the logical replication slot (pgoutput) the relay reads.
    pub slot: String,
    /// `wal.publication`: the publication the slot streams (`published`, plus
    /// an `outbox` table of jetstream-outbox's shape if it has one).
    pub publication: String,
    /// `wal.sweep_after`: a row still unsent this long after it was written
    /// is claimed and sent by the claim path (the stream is behind, or lost).
    pub sweep_after: Duration,
    /// `wal.lag_warning`: warn when the slot holds more WAL than this many bytes.
    pub lag_warning: u64,
}

/// Database connection.
#[derive(Clone, PartialEq)]
pub struct DatabaseSettings {
    /// `database.url` (`DATABASE_URL`): `postgres://`, `mysql://` or `sqlite://`.
    pub url: Option<String>,
    /// `database.max_connections`: pool size.
    pub max_connections: u32,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &self.url.as_deref().map(crate::redact::url))
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Broker connection.
#[derive(Clone, PartialEq)]
pub struct BrokerSettings {
    /// `broker.url` (`AMQP_URL`). Python: `DEFAULT_STOMP_HOST_AND_PORTS`, `..._VHOST`, `..._USERNAME`, `..._PASSCODE`.
    pub url: String,
    /// `broker.heartbeat`: seconds. Python: `DEFAULT_STOMP_HEARTBEATS` (10000 ms).
    pub heartbeat: u16,
    /// `broker.maximum_backoff`: cap of the reconnect backoff. Python: `DEFAULT_MAXIMUM_BACKOFF`.
    pub maximum_backoff: Duration,
    /// `broker.operation_timeout`: limit on every broker round trip (connect, declare, confirm).
    pub operation_timeout: Duration,
}

impl BrokerSettings {
    /// Whether `url` names NATS (`nats://`, `tls://`) rather than RabbitMQ.
    pub fn is_nats(&self) -> bool {
        matches!(
            self.url.split_once("://").map(|(scheme, _)| scheme),
            Some("nats" | "tls")
        )
    }
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &crate::redact::url(&self.url))
            .field("heartbeat", &self.heartbeat)
            .field("maximum_backoff", &self.maximum_backoff)
            .field("operation_timeout", &self.operation_timeout)
            .finish()
    }
}

/// The relay (`outbox-cli publish`).
#[derive(Clone, Debug, PartialEq)]
pub struct RelaySettings {
    /// `relay.batch_size`: rows claimed per batch. Python: `DEFAULT_PUBLISHED_CHUNK_SIZE`.
    pub batch_size: u32,
    /// `relay.max_retry_attempts`: failed attempts before FAILED. Python: `DEFAULT_MAXIMUM_RETRY_ATTEMPTS`.
    pub max_retry_attempts: u32,
    /// `relay.pause_for_retry`: wait after the 3rd failed attempt. Python: `DEFAULT_PAUSE_FOR_RETRY`.
    pub pause_for_retry: Duration,
    /// `relay.wait_retry`: wait after each later failed attempt. Python: `DEFAULT_WAIT_RETRY`.
    pub wait_retry: Duration,
    /// `relay.waiting_time`: poll interval when idle. Python: `DEFAULT_PRODUCER_WAITING_TIME`.
    pub waiting_time: Duration,
    /// `relay.max_in_flight`: rows sent and not yet marked, across batches;
    /// also the most a crashed relay can send twice. At least `batch_size`.
    pub max_in_flight: u32,
    /// `relay.max_in_flight_bytes`: body and header bytes in flight (claims
    /// shrink when rows are large).
    pub max_in_flight_bytes: usize,
    /// `relay.claim_lease`: how long a claimed row stays reserved for one relay.
    pub claim_lease: Duration,
    /// `relay.unroutable`: `retry` or `accept`.
    pub unroutable: Unroutable,
    /// `relay.listen`: wake up on PostgreSQL `NOTIFY` (polling stays as fallback).
    pub listen: bool,
    /// `relay.progress_interval`: how often progress (rate, backlog, oldest pending) is logged.
    pub progress_interval: Duration,
    /// `relay.capture`: `claim` (every database) or `wal` (PostgreSQL logical replication).
    pub capture: Capture,
}

/// The largest `consumer.batch_size`: a batch's inbox rows go in one
/// statement, and MariaDB and SQLite bound the values in one statement.
pub(crate) const MAX_BATCH: usize = 1000;

/// The consumer (`outbox-cli subscribe`).
#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerSettings {
    /// `consumer.prefetch`: unacknowledged deliveries in flight. Python: `prefetch-count` in `DEFAULT_STOMP_QUEUE_HEADERS`.
    pub prefetch: u16,
    /// `consumer.concurrency`: callbacks running at once. Python: `DEFAULT_CONSUMER_PROCESS_MSG_ON_BACKGROUND` (one worker).
    pub concurrency: usize,
    /// `consumer.exclusive_queue`. Python: `DEFAULT_EXCLUSIVE_QUEUE`.
    pub exclusive_queue: bool,
    /// `consumer.shutdown_timeout`: wait for in-flight callbacks on shutdown; `none` waits forever. Python: `DEFAULT_CONSUMER_SHUTDOWN_TIMEOUT`.
    pub shutdown_timeout: Option<Duration>,
    /// `consumer.max_retry_attempts`: retries after a transient database error. Python: `DEFAULT_CONSUMER_MAX_RETRY_ATTEMPTS`.
    pub max_retry_attempts: u32,
    /// `consumer.retry_wait`: linear wait unit between those retries. Python: `DEFAULT_CONSUMER_RETRY_WAIT`.
    pub retry_wait: Duration,
    /// `consumer.queue_type`: `classic` (django-outbox-pattern's) or `quorum`.
    pub queue_type: QueueType,
    /// `consumer.delivery_limit`: quorum queues dead-letter a message
    /// delivered more often than this (a consumer crashing on it).
    pub delivery_limit: u32,
    /// `consumer.dead_letter`: `publish` (copy with the reason, then ack) or `nack`.
    pub dead_letter: DeadLetter,
    /// `consumer.batch_size`: deliveries whose callbacks share one database
    /// transaction (group commit); 1 gives every message its own.
    pub batch_size: usize,
    /// `consumer.batch_wait`: how long a batch waits to fill once its first
    /// delivery is in (seconds, fractions allowed).
    pub batch_wait: Duration,
}

impl ConsumerSettings {
    /// The prefetch asked of the broker: `consumer.prefetch`, raised so every
    /// lane can fill a batch while the one before it commits (2 × batch size
    /// per lane).
    pub fn effective_prefetch(&self) -> u16 {
        if self.batch_size <= 1 {
            return self.prefetch;
        }
        let wanted = self
            .batch_size
            .saturating_mul(2)
            .saturating_mul(self.concurrency);
        u16::try_from(wanted).unwrap_or(u16::MAX).max(self.prefetch)
    }
}

/// Deleting old rows.
#[derive(Clone, Debug, PartialEq)]
pub struct RetentionSettings {
    /// `retention.days_to_keep`. Python: `DAYS_TO_KEEP_DATA`.
    pub days_to_keep: u32,
    /// `retention.remove_data_cache_ttl`: at most one cleanup per process per this period. Python: `REMOVE_DATA_CACHE_TTL`.
    pub remove_data_cache_ttl: Duration,
    /// `retention.batch_size`: rows deleted per statement.
    pub batch_size: u32,
}

/// Every setting, with django-outbox-pattern's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `[database]`
    pub database: DatabaseSettings,
    /// `[broker]`
    pub broker: BrokerSettings,
    /// `[nats]`
    pub nats: NatsSettings,
    /// `[relay]`
    pub relay: RelaySettings,
    /// `[wal]`
    pub wal: WalSettings,
    /// `[consumer]`
    pub consumer: ConsumerSettings,
    /// `[retention]`
    pub retention: RetentionSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database: DatabaseSettings {
                url: None,
                max_connections: 10,
            },
            broker: BrokerSettings {
                url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
                heartbeat: 10,
                maximum_backoff: Duration::from_secs(3600),
                operation_timeout: Duration::from_secs(30),
            },
            nats: NatsSettings {
                subject_prefix: "outbox".to_owned(),
                credentials_file: None,
                nkey_seed_file: None,
                tls_ca_file: None,
                tls_cert_file: None,
                tls_key_file: None,
                publish_window: 1000,
                stream: "OUTBOX".to_owned(),
                stream_subjects: Vec::new(),
                stream_storage: StreamStorage::File,
                duplicate_window: Duration::from_secs(120),
                replicas: 1,
            },
            relay: RelaySettings {
                batch_size: 200,
                max_retry_attempts: 50,
                pause_for_retry: Duration::from_secs(240),
                wait_retry: Duration::from_secs(60),
                waiting_time: Duration::from_secs(1),
                max_in_flight: 2000,
                max_in_flight_bytes: 16 * 1024 * 1024,
                claim_lease: Duration::from_secs(60),
                unroutable: Unroutable::Retry,
                listen: true,
                progress_interval: Duration::from_secs(10),
                capture: Capture::Claim,
            },
            wal: WalSettings {
                slot: "outbox".to_owned(),
                publication: "outbox".to_owned(),
                sweep_after: Duration::from_secs(60),
                lag_warning: 1 << 30,
            },
            consumer: ConsumerSettings {
                prefetch: 1,
                concurrency: 1,
                exclusive_queue: false,
                shutdown_timeout: Some(Duration::from_secs(90)),
                max_retry_attempts: 3,
                retry_wait: Duration::from_secs(2),
                queue_type: QueueType::Classic,
                delivery_limit: 20,
                dead_letter: DeadLetter::Publish,
                batch_size: 32,
                batch_wait: Duration::from_millis(2),
            },
            retention: RetentionSettings {
                days_to_keep: 30,
                remove_data_cache_ttl: Duration::from_secs(86400),
                batch_size: 1000,
            },
        }
    }
}

type Setter = fn(&mut Settings, &str) -> std::result::Result<(), String>;

/// Every key, its setter. The environment name is derived from the key.
const KEYS: &[(&str, Setter)] = &[
    ("database.url", |s, v| {
        set_url(
            &mut s.database.url,
            v,
            &["postgres", "postgresql", "mysql", "mariadb", "sqlite"],
        )
    }),
    ("database.max_connections", |s, v| {
        set_int(&mut s.database.max_connections, v, 1, 10_000)
    }),
    ("broker.url", |s, v| {
        let mut url = None;
        set_url(&mut url, v, &["amqp", "amqps", "nats", "tls"])?;
        s.broker.url = url.unwrap_or_default();
        Ok(())
    }),
    ("broker.heartbeat", |s, v| {
        set_int(&mut s.broker.heartbeat, v, 0, 3600)
    }),
    ("broker.maximum_backoff", |s, v| {
        set_secs(&mut s.broker.maximum_backoff, v)
    }),
    ("broker.operation_timeout", |s, v| {
        set_positive_secs(&mut s.broker.operation_timeout, v)
    }),
    ("nats.subject_prefix", |s, v| {
        let prefix = v.trim_end_matches('.');
        crate::broker::nats::check_subject(prefix, false).map_err(|problem| {
            format!("subject tokens, e.g. `orders` or `acme.orders` ({problem})")
        })?;
        s.nats.subject_prefix = prefix.to_owned();
        Ok(())
    }),
    ("nats.credentials_file", |s, v| {
        s.nats.credentials_file = (!v.is_empty()).then(|| PathBuf::from(v));
        Ok(())
    }),
    ("nats.nkey_seed_file", |s, v| {
        s.nats.nkey_seed_file = (!v.is_empty()).then(|| PathBuf::from(v));
        Ok(())
    }),
    ("nats.tls_ca_file", |s, v| {
        s.nats.tls_ca_file = (!v.is_empty()).then(|| PathBuf::from(v));
        Ok(())
    }),
    ("nats.tls_cert_file", |s, v| {
        s.nats.tls_cert_file = (!v.is_empty()).then(|| PathBuf::from(v));
        Ok(())
    }),
    ("nats.tls_key_file", |s, v| {
        s.nats.tls_key_file = (!v.is_empty()).then(|| PathBuf::from(v));
        Ok(())
    }),
    ("nats.publish_window", |s, v| {
        // async-nats waits for a free PubAck slot without reading acks, so the
        // window must stay within what we give it; 1 to 10,000.
        set_int(&mut s.nats.publish_window, v, 1, 10_000)
    }),
    ("nats.stream", |s, v| {
        if v.is_empty()
            || v.contains(|c: char| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
        {
            return Err(
                "a stream name without spaces, `.`, `*`, `>`, `/` or `\\`, e.g. OUTBOX".to_owned(),
            );
        }
        s.nats.stream = v.to_owned();
        Ok(())
    }),
    ("nats.stream_subjects", |s, v| {
        let subjects: Vec<String> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for subject in &subjects {
            crate::broker::nats::check_subject(subject, true).map_err(|problem| {
                format!("comma-separated subjects, wildcards `*` and `>` allowed ({problem})")
            })?;
        }
        s.nats.stream_subjects = subjects;
        Ok(())
    }),
    ("nats.stream_storage", |s, v| {
        s.nats.stream_storage = match v {
            "file" => StreamStorage::File,
            "memory" => StreamStorage::Memory,
            _ => return Err("file or memory".to_owned()),
        };
        Ok(())
    }),
    ("nats.duplicate_window", |s, v| {
        set_positive_secs(&mut s.nats.duplicate_window, v)
    }),
    ("nats.replicas", |s, v| {
        set_int(&mut s.nats.replicas, v, 1, 5)
    }),
    ("relay.batch_size", |s, v| {
        set_int(&mut s.relay.batch_size, v, 1, 10_000)
    }),
    ("relay.max_retry_attempts", |s, v| {
        set_int(&mut s.relay.max_retry_attempts, v, 1, 1_000_000)
    }),
    ("relay.pause_for_retry", |s, v| {
        set_secs(&mut s.relay.pause_for_retry, v)
    }),
    ("relay.wait_retry", |s, v| {
        set_secs(&mut s.relay.wait_retry, v)
    }),
    ("relay.waiting_time", |s, v| {
        set_positive_secs(&mut s.relay.waiting_time, v)
    }),
    ("relay.max_in_flight", |s, v| {
        set_int(&mut s.relay.max_in_flight, v, 1, 1_000_000)
    }),
    ("relay.max_in_flight_bytes", |s, v| {
        set_int(&mut s.relay.max_in_flight_bytes, v, 1024, 1 << 40)
    }),
    ("relay.claim_lease", |s, v| {
        set_positive_secs(&mut s.relay.claim_lease, v)
    }),
    ("relay.unroutable", |s, v| {
        s.relay.unroutable = match v {
            "retry" => Unroutable::Retry,
            "accept" => Unroutable::Accept,
            _ => return Err("one of \"retry\", \"accept\"".to_owned()),
        };
        Ok(())
    }),
    ("relay.listen", |s, v| set_bool(&mut s.relay.listen, v)),
    ("relay.progress_interval", |s, v| {
        set_positive_secs(&mut s.relay.progress_interval, v)
    }),
    ("relay.capture", |s, v| {
        s.relay.capture = match v {
            "claim" => Capture::Claim,
            "wal" => Capture::Wal,
            _ => return Err("one of \"claim\", \"wal\"".to_owned()),
        };
        Ok(())
    }),
    ("wal.slot", |s, v| set_identifier(&mut s.wal.slot, v)),
    ("wal.publication", |s, v| {
        set_identifier(&mut s.wal.publication, v)
    }),
    ("wal.sweep_after", |s, v| {
        set_positive_secs(&mut s.wal.sweep_after, v)
    }),
    ("wal.lag_warning", |s, v| {
        set_int(&mut s.wal.lag_warning, v, 1, u64::MAX)
    }),
    ("consumer.prefetch", |s, v| {
        set_int(&mut s.consumer.prefetch, v, 1, 65_535)
    }),
    ("consumer.concurrency", |s, v| {
        set_int(&mut s.consumer.concurrency, v, 1, 10_000)
    }),
    ("consumer.exclusive_queue", |s, v| {
        set_bool(&mut s.consumer.exclusive_queue, v)
    }),
    ("consumer.shutdown_timeout", |s, v| {
        if v == "none" {
            s.consumer.shutdown_timeout = None;
            return Ok(());
        }
        let mut d = Duration::ZERO;
        set_secs(&mut d, v).map_err(|_| {
            "seconds (0 or more, fractions allowed) or \"none\" to wait forever".to_owned()
        })?;
        s.consumer.shutdown_timeout = Some(d);
        Ok(())
    }),
    ("consumer.max_retry_attempts", |s, v| {
        set_int(&mut s.consumer.max_retry_attempts, v, 0, 1000)
    }),
    ("consumer.retry_wait", |s, v| {
        set_secs(&mut s.consumer.retry_wait, v)
    }),
    ("consumer.queue_type", |s, v| {
        s.consumer.queue_type = match v {
            "classic" => QueueType::Classic,
            "quorum" => QueueType::Quorum,
            _ => return Err("one of \"classic\", \"quorum\"".to_owned()),
        };
        Ok(())
    }),
    ("consumer.delivery_limit", |s, v| {
        set_int(&mut s.consumer.delivery_limit, v, 1, 1_000_000)
    }),
    ("consumer.dead_letter", |s, v| {
        s.consumer.dead_letter = match v {
            "publish" => DeadLetter::Publish,
            "nack" => DeadLetter::Nack,
            _ => return Err("one of \"publish\", \"nack\"".to_owned()),
        };
        Ok(())
    }),
    ("consumer.batch_size", |s, v| {
        set_int(&mut s.consumer.batch_size, v, 1, MAX_BATCH as u64)
    }),
    ("consumer.batch_wait", |s, v| {
        set_secs(&mut s.consumer.batch_wait, v)
    }),
    ("retention.days_to_keep", |s, v| {
        set_int(&mut s.retention.days_to_keep, v, 1, 36_500)
    }),
    ("retention.remove_data_cache_ttl", |s, v| {
        set_secs(&mut s.retention.remove_data_cache_ttl, v)
    }),
    ("retention.batch_size", |s, v| {
        set_int(&mut s.retention.batch_size, v, 1, 100_000)
    }),
];

/// A replication slot or publication name: PostgreSQL allows lowercase
/// letters, digits and `_` in slot names, at most 63 bytes.
fn set_identifier(slot: &mut String, value: &str) -> std::result::Result<(), String> {
    if value.is_empty()
        || value.len() > 63
        || !value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err("a name of lowercase letters, digits and `_`, at most 63 long".to_owned());
    }
    *slot = value.to_owned();
    Ok(())
}

fn set_int<T: TryFrom<u64>>(
    slot: &mut T,
    value: &str,
    min: u64,
    max: u64,
) -> std::result::Result<(), String> {
    let allowed = || format!("a whole number from {min} to {max}");
    let parsed: u64 = value.parse().map_err(|_| allowed())?;
    if parsed < min || parsed > max {
        return Err(allowed());
    }
    *slot = T::try_from(parsed).map_err(|_| allowed())?;
    Ok(())
}

fn set_secs(slot: &mut Duration, value: &str) -> std::result::Result<(), String> {
    let allowed = "seconds, 0 or more (fractions allowed, e.g. 0.5)";
    let secs: f64 = value.parse().map_err(|_| allowed.to_owned())?;
    *slot = Duration::try_from_secs_f64(secs).map_err(|_| allowed.to_owned())?;
    Ok(())
}

fn set_positive_secs(slot: &mut Duration, value: &str) -> std::result::Result<(), String> {
    let allowed = "seconds, more than 0 (fractions allowed, e.g. 0.5)";
    let mut d = Duration::ZERO;
    set_secs(&mut d, value).map_err(|_| allowed.to_owned())?;
    if d.is_zero() {
        return Err(allowed.to_owned());
    }
    *slot = d;
    Ok(())
}

fn set_bool(slot: &mut bool, value: &str) -> std::result::Result<(), String> {
    *slot = match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => true,
        "false" | "0" | "no" => false,
        _ => return Err("true or false".to_owned()),
    };
    Ok(())
}

fn set_url(
    slot: &mut Option<String>,
    value: &str,
    schemes: &[&'static str],
) -> std::result::Result<(), String> {
    let scheme = value.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some(scheme) if schemes.contains(&scheme) => {
            *slot = Some(value.to_owned());
            Ok(())
        }
        _ if schemes.contains(&"amqp") => {
            Err("a URL like amqp://user:password@host:5672/vhost (or amqps://), or nats://host:4222 (or tls://) for NATS JetStream".to_owned())
        }
        _ => Err("a URL starting with postgres://, mysql:// or sqlite://".to_owned()),
    }
}

impl Settings {
    /// Load settings the way the CLI does: the file at `config`, else the one
    /// named by `OUTBOX_CONFIG`, else `./outbox.toml` when present; then the
    /// environment on top.
    pub fn load(config: Option<&Path>) -> Result<Settings> {
        let path: Option<PathBuf> = config
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("OUTBOX_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from("outbox.toml")).filter(|p| p.exists()));
        let file = match &path {
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| Error::SettingsFile {
                    path: path.display().to_string(),
                    source: Box::new(source),
                })?,
            )),
            None => None,
        };
        Settings::from_sources(
            file.as_ref()
                .map(|(name, text)| (name.as_str(), text.as_str())),
            |name| std::env::var(name).ok(),
        )
    }

    /// Defaults, overlaid by `file` (its name and TOML text), then by `env`.
    pub fn from_sources(
        file: Option<(&str, &str)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Settings> {
        let mut settings = Settings::default();
        if let Some((name, text)) = file {
            settings.apply_toml(name, text)?;
        }
        for (key, fallback) in [("database.url", "DATABASE_URL"), ("broker.url", "AMQP_URL")] {
            if let Some(value) = env(fallback) {
                settings.set(key, &value, fallback)?;
            }
        }
        for (key, _) in KEYS {
            let var = env_name(key);
            if let Some(value) = env(&var) {
                settings.set(key, &value, &var)?;
            }
        }
        Ok(settings)
    }

    fn apply_toml(&mut self, file: &str, text: &str) -> Result<()> {
        let table: toml::Table =
            text.parse()
                .map_err(|source: toml::de::Error| Error::SettingsFile {
                    path: file.to_owned(),
                    source: Box::new(source),
                })?;
        for (section, values) in &table {
            let Some(values) = values.as_table() else {
                return Err(self.unknown(section, file));
            };
            for (name, value) in values {
                let key = format!("{section}.{name}");
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    other => other.to_string(),
                };
                if !KEYS.iter().any(|(k, _)| *k == key) {
                    return Err(self.unknown(&key, file));
                }
                self.set(&key, &text, file)?;
            }
        }
        Ok(())
    }

    fn unknown(&self, key: &str, file: &str) -> Error {
        let known = match closest(key, KEYS.iter().map(|(k, _)| *k)) {
            Some(near) => format!("did you mean `{near}`? settings: "),
            None => "settings: ".to_owned(),
        };
        Error::UnknownSetting {
            key: key.to_owned(),
            file: file.to_owned(),
            known: known + &KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
        }
    }

    /// Settings that cannot work together, found before anything starts.
    pub(crate) fn check_relay(&self) -> Result<()> {
        let relay = &self.relay;
        if relay.max_in_flight < relay.batch_size {
            return Err(Error::InvalidSetting {
                key: "relay.max_in_flight".to_owned(),
                value: relay.max_in_flight.to_string(),
                allowed: format!(
                    "at least relay.batch_size ({}): a claim must fit in the window; two batches or more keep the broker busy while the next is claimed",
                    relay.batch_size
                ),
            });
        }
        if relay.claim_lease <= self.broker.operation_timeout {
            return Err(Error::InvalidSetting {
                key: "relay.claim_lease".to_owned(),
                value: format!("{:?}", relay.claim_lease),
                allowed: format!(
                    "longer than broker.operation_timeout ({:?}): a claim must outlive the longest wait for a confirm, or another relay takes its rows while they are in flight",
                    self.broker.operation_timeout
                ),
            });
        }
        Ok(())
    }

    /// Consumer settings that cannot work together.
    pub(crate) fn check_consumer(&self) -> Result<()> {
        let consumer = &self.consumer;
        if consumer.queue_type == QueueType::Quorum && consumer.exclusive_queue {
            return Err(Error::InvalidSetting {
                key: "consumer.exclusive_queue".to_owned(),
                value: "true".to_owned(),
                allowed:
                    "false with consumer.queue_type = \"quorum\": quorum queues cannot be exclusive"
                        .to_owned(),
            });
        }
        Ok(())
    }

    /// `OUTBOX_*` variables in the environment that name no setting, each
    /// with the closest known name (a typo is otherwise silently ignored).
    pub fn unknown_environment() -> Vec<(String, Option<String>)> {
        let known: Vec<String> = KEYS.iter().map(|(k, _)| env_name(k)).collect();
        std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| name.starts_with("OUTBOX_") && !NOT_SETTINGS.contains(&name.as_str()))
            .filter(|name| !name.starts_with("OUTBOX_TEST_") && !known.contains(name))
            .map(|name| {
                let near = closest(&name, known.iter().map(String::as_str)).map(str::to_owned);
                (name, near)
            })
            .collect()
    }

    /// Set one key from its text form; `source` names where it came from.
    fn set(&mut self, key: &str, value: &str, source: &str) -> Result<()> {
        let (_, setter) = KEYS
            .iter()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| self.unknown(key, source))?;
        setter(self, value.trim()).map_err(|allowed| Error::InvalidSetting {
            key: format!("{key} (from {source})"),
            value: format!("{:?}", crate::redact::text(value)),
            allowed: format!("expected {allowed}"),
        })
    }

    /// The database URL, or an error telling how to set it.
    pub fn database_url(&self) -> Result<&str> {
        self.database.url.as_deref().ok_or(Error::MissingSetting {
            key: "database.url",
            hint: "set DATABASE_URL (e.g. postgres://postgres@127.0.0.1/app or sqlite://outbox.db?mode=rwc) \
                   or `url` under [database] in outbox.toml",
        })
    }

    /// Every key with its environment variable, for documentation and `--help`.
    pub fn keys() -> impl Iterator<Item = (&'static str, String)> {
        KEYS.iter().map(|(key, _)| (*key, env_name(key)))
    }
}

/// `OUTBOX_*` variables that are not settings.
const NOT_SETTINGS: &[&str] = &["OUTBOX_CONFIG", "OUTBOX_SKIP_RESTARTS"];

/// The known name nearest to `name` (edit distance at most a third of it).
fn closest<'a>(name: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.len() / 3).max(2);
    known
        .map(|k| {
            (
                distance(&name.to_ascii_lowercase(), &k.to_ascii_lowercase()),
                k,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(row[j + 1])
            };
            previous = current;
        }
    }
    row[b.len()]
}

fn env_name(key: &str) -> String {
    format!("OUTBOX_{}", key.replace('.', "_").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn defaults_match_the_python_library() {
        let s = Settings::default();
        assert_eq!(s.relay.max_retry_attempts, 50);
        assert_eq!(s.relay.pause_for_retry, Duration::from_secs(240));
        assert_eq!(s.relay.wait_retry, Duration::from_secs(60));
        assert_eq!(s.broker.maximum_backoff, Duration::from_secs(3600));
        assert_eq!(s.relay.batch_size, 200);
        assert_eq!(s.retention.days_to_keep, 30);
        assert_eq!(s.consumer.prefetch, 1);
        assert_eq!(s.consumer.shutdown_timeout, Some(Duration::from_secs(90)));
    }

    #[test]
    fn file_then_env() {
        let file =
            "[relay]\nbatch_size = 500\nwaiting_time = 0.25\n[database]\nurl = \"sqlite://a.db\"\n";
        let s = Settings::from_sources(
            Some(("outbox.toml", file)),
            env(&[
                ("OUTBOX_RELAY_BATCH_SIZE", "700"),
                ("DATABASE_URL", "postgres://x/y"),
            ]),
        )
        .unwrap();
        assert_eq!(s.relay.batch_size, 700);
        assert_eq!(s.relay.waiting_time, Duration::from_millis(250));
        assert_eq!(s.database.url.as_deref(), Some("postgres://x/y"));
        let s = Settings::from_sources(
            None,
            env(&[
                ("DATABASE_URL", "postgres://x/y"),
                ("OUTBOX_DATABASE_URL", "mysql://z/w"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.url.as_deref(), Some("mysql://z/w"));
    }

    #[test]
    fn max_in_flight_is_set_from_the_file_and_the_environment() {
        let s = Settings::from_sources(
            Some((
                "outbox.toml",
                "[relay]\nmax_in_flight = 1000\nmax_in_flight_bytes = 4096\n",
            )),
            env(&[]),
        )
        .unwrap();
        assert_eq!(
            (s.relay.max_in_flight, s.relay.max_in_flight_bytes),
            (1000, 4096)
        );
        let s =
            Settings::from_sources(None, env(&[("OUTBOX_RELAY_MAX_IN_FLIGHT", "700")])).unwrap();
        assert_eq!(s.relay.max_in_flight, 700);
    }

    #[test]
    fn inconsistent_settings_are_refused_before_starting() {
        let mut s = Settings::default();
        s.relay.max_in_flight = 100;
        let err = s.check_relay().unwrap_err().to_string();
        assert!(
            err.contains("relay.max_in_flight") && err.contains("relay.batch_size"),
            "{err}"
        );
        let mut s = Settings::default();
        s.relay.claim_lease = Duration::from_secs(10);
        let err = s.check_relay().unwrap_err().to_string();
        assert!(
            err.contains("relay.claim_lease") && err.contains("operation_timeout"),
            "{err}"
        );
        let mut s = Settings::default();
        s.consumer.queue_type = QueueType::Quorum;
        s.consumer.exclusive_queue = true;
        assert!(s.check_consumer().is_err());
    }

    #[test]
    fn secrets_in_bad_urls_are_not_echoed() {
        let err = Settings::from_sources(
            None,
            env(&[("DATABASE_URL", "postgress://app:Sup3rS3cret@db/app")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            !err.contains("Sup3rS3cret") && err.contains("app:***@db"),
            "{err}"
        );
        let debug = format!(
            "{:?}",
            Settings::from_sources(None, env(&[("AMQP_URL", "amqp://u:Sup3rS3cret@h/v")])).unwrap()
        );
        assert!(!debug.contains("Sup3rS3cret"), "{debug}");
    }

    #[test]
    fn batches_are_settable_and_raise_the_prefetch() {
        let s = Settings::from_sources(
            Some((
                "outbox.toml",
                "[consumer]\nbatch_size = 50\nbatch_wait = 0.005\nconcurrency = 2\n",
            )),
            env(&[]),
        )
        .unwrap();
        assert_eq!(s.consumer.batch_size, 50);
        assert_eq!(s.consumer.batch_wait, Duration::from_millis(5));
        assert_eq!(s.consumer.effective_prefetch(), 200);
        let mut one = s.consumer.clone();
        one.batch_size = 1;
        assert_eq!(
            one.effective_prefetch(),
            one.prefetch,
            "batch_size 1 keeps prefetch"
        );
        let err = Settings::from_sources(None, env(&[("OUTBOX_CONSUMER_BATCH_SIZE", "0")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("consumer.batch_size"), "{err}");
    }

    #[test]
    fn unknown_keys_get_the_closest_known_one() {
        let err =
            Settings::from_sources(Some(("outbox.toml", "[relay]\nbatchsize = 1\n")), env(&[]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("did you mean `relay.batch_size`"), "{err}");
    }

    #[test]
    fn errors_name_key_value_and_what_is_allowed() {
        let err = Settings::from_sources(None, env(&[("OUTBOX_RELAY_BATCH_SIZE", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("relay.batch_size"), "{err}");
        assert!(err.contains("\"lots\""), "{err}");
        assert!(err.contains("whole number"), "{err}");

        let err = Settings::from_sources(Some(("outbox.toml", "[relay]\nbatch = 1\n")), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting `relay.batch`"), "{err}");
        assert!(err.contains("relay.batch_size"), "{err}");

        let err = Settings::from_sources(None, env(&[("AMQP_URL", "localhost:5672")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("broker.url"), "{err}");
        assert!(err.contains("amqp://"), "{err}");
    }
}
