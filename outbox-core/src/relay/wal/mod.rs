//! Log-tailing capture: committed outbox messages read from PostgreSQL's
//! logical replication stream → the transport → the slot confirmed up to
//! the last transaction the broker took in full.
//!
//! Three emission shapes arrive on the stream: rows inserted into
//! `published` (as the claim path sees them), `pg_logical_emit_message`
//! messages with prefix `outbox` ([`write_to_wal`](crate::write_to_wal)),
//! and rows of jetstream-outbox's `outbox` table. pgoutput is asked for
//! protocol 1 without streaming, so a transaction arrives only once it
//! committed, in commit order: an aborted one never shows.
//!
//! A message the broker refuses is kept as a `published` row with its
//! attempt counted, so the claim path retries it, FAILs it and lets
//! `failed retry` resend it as for any row; sent rows of `published` are
//! marked SUCCEEDED. A lost connection to either side ends the session;
//! the next resumes from the slot's `confirmed_flush_lsn`, so what was in
//! flight is sent again (the row id is the message id: consumers and
//! JetStream drop the repeat).

mod pgoutput;
pub(crate) mod slot;
mod watermark;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter,
    Statement,
};
use serde_json::Value;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::RelayReport;
use super::claim::ClaimedRow;
use super::envelope::envelope;
use super::schedule::next_attempt_after;
use crate::backoff::Backoff;
use crate::broker::{Envelope, Outcome, Publisher, Transport};
use crate::entity::published::{self, Column};
use crate::metrics::Metrics;
use crate::settings::Unroutable;
use crate::{Error, Result, Settings, Shutdown, Status, report};

use pgoutput::{Change, Relation};
use watermark::Watermark;

/// The prefix of `pg_logical_emit_message` messages that are outbox messages.
pub(crate) const MESSAGE_PREFIX: &str = "outbox";

/// Ids per statement (as for claims).
const CHUNK: usize = 250;

/// Reads the replication stream and relays what it carries.
pub(crate) struct WalCapture {
    pub(crate) db: DatabaseConnection,
    pub(crate) settings: Settings,
    pub(crate) transport: Transport,
    pub(crate) name: String,
    pub(crate) metrics: Arc<Metrics>,
}

/// Where a message in flight came from, to keep it as a row if the broker
/// refuses it.
#[derive(Debug, Clone)]
struct Source {
    row: ClaimedRow,
    /// Whether it is a row of `published` (marked when sent).
    in_published: bool,
}

/// How a session ended.
enum End {
    /// Shutdown asked for.
    Stopped,
    /// Another relay reads the slot: wait as a standby.
    SlotBusy(String),
}

impl WalCapture {
    /// Relay from the stream until `shutdown`; outages are waited out.
    pub(crate) async fn run(self, mut shutdown: Shutdown) -> Result<RelayReport> {
        // First: on another database this says to use claims.
        slot::check(&self.db, &self.settings.wal).await?;
        let target = Target::parse(self.settings.database_url()?)?;
        let mut totals = RelayReport::default();
        let mut backoff = Backoff::new(self.settings.broker.maximum_backoff);
        let mut standby = false;
        loop {
            match self
                .session(
                    &target,
                    &mut shutdown,
                    &mut totals,
                    &mut backoff,
                    &mut standby,
                )
                .await
            {
                Ok(End::Stopped) => break,
                Ok(End::SlotBusy(reason)) => {
                    if !standby {
                        info!(relay = %self.name, slot = %self.settings.wal.slot, reason = %reason, "another relay reads the slot; waiting as a standby");
                        standby = true;
                    }
                    // A standby takes over within about a second of the
                    // active relay's end.
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        () = shutdown.wait() => break,
                    }
                }
                Err(err) if err.is_transient() => {
                    let wait = backoff.next_delay();
                    warn!(relay = %self.name, error = %report(&err), retry_in = ?wait, "log-tailing capture interrupted; resuming from the slot");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.wait() => break,
                    }
                }
                Err(err @ Error::Capture { .. }) => {
                    // A slot dropped or lost while the relay ran: what it did
                    // not confirm goes out through the claim sweep.
                    if !slot::recreate_if_gone(&self.db, &self.settings.wal).await? {
                        return Err(err);
                    }
                    warn!(relay = %self.name, slot = %self.settings.wal.slot, sweep_after = ?self.settings.wal.sweep_after, "the replication slot was gone or had lost WAL; created it again (rows of `published` it did not confirm go out through the claim path after wal.sweep_after)");
                }
                Err(err) => return Err(err),
            }
        }
        info!(relay = %self.name, published = totals.published, retried = totals.retried, failed = totals.failed, "log-tailing capture stopped");
        Ok(totals)
    }

    /// One replication connection, from the slot's confirmed position.
    async fn session(
        &self,
        target: &Target,
        shutdown: &mut Shutdown,
        report: &mut RelayReport,
        backoff: &mut Backoff,
        standby: &mut bool,
    ) -> Result<End> {
        let endpoint = target.shown.clone();
        let lost = |err: PgWireError| Error::Replication {
            endpoint: endpoint.clone(),
            reason: crate::redact::text(&err.to_string()),
        };
        crate::tls::use_ring();
        let mut client = ReplicationClient::connect(target.config(&self.settings, &self.name))
            .await
            .map_err(lost)?;
        if let Err(err) = client.wait_started().await {
            let text = err.to_string();
            if text.contains("is active for PID") {
                return Ok(End::SlotBusy(text));
            }
            return Err(classify(&self.settings, &endpoint, err));
        }
        backoff.reset();
        if std::mem::take(standby) {
            info!(relay = %self.name, slot = %self.settings.wal.slot, "the slot is free; this relay reads it now");
        }
        let mut publisher = self.transport.publisher(&self.name).await?;
        info!(relay = %self.name, database = %endpoint, slot = %self.settings.wal.slot, publication = %self.settings.wal.publication, broker = %self.transport.endpoint(), "log-tailing capture started");
        let mut session = Session::new(self);
        let mut lag = tokio::time::interval(self.settings.relay.progress_interval);
        lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let limit = self.settings.relay.max_in_flight as usize;
        let result = loop {
            tokio::select! {
                biased;
                () = shutdown.wait() => break Ok(End::Stopped),
                // Before the stream: a busy stream must not starve the lag
                // check, which matters most then.
                _ = lag.tick() => self.watch_lag().await,
                outcomes = publisher.outcomes(), if publisher.in_flight() > 0 => {
                    match outcomes {
                        Ok(outcomes) => session.settle(outcomes, report).await?,
                        Err(err) => break Err(err),
                    }
                }
                event = client.recv(), if session.watermark.in_flight() < limit => {
                    let event = match event {
                        Ok(Some(event)) => event,
                        Ok(None) => break Err(Error::Replication { endpoint: endpoint.clone(), reason: "the server ended the stream".to_owned() }),
                        Err(err) => break Err(classify(&self.settings, &endpoint, err)),
                    };
                    match session.event(event, report).await? {
                        Some(envelopes) if !envelopes.is_empty() => {
                            if let Err(err) = publisher.publish(envelopes).await {
                                break Err(err);
                            }
                        }
                        _ => {}
                    }
                }
            }
            if let Some(lsn) = session.watermark.advance() {
                client.update_applied_lsn(Lsn::from_u64(lsn));
            }
            if let Some(lsn) = session.idle_position.take()
                && session.watermark.is_idle()
            {
                client.update_applied_lsn(Lsn::from_u64(lsn));
            }
        };
        // What the broker still answers in time is settled and confirmed;
        // the rest comes again from the slot next time.
        let deadline = tokio::time::Instant::now() + self.settings.broker.operation_timeout;
        while publisher.in_flight() > 0 && publisher.is_connected() {
            match tokio::time::timeout_at(deadline, publisher.outcomes()).await {
                Ok(Ok(outcomes)) => session.settle(outcomes, report).await?,
                _ => break,
            }
        }
        if let Some(lsn) = session.watermark.advance() {
            client.update_applied_lsn(Lsn::from_u64(lsn));
        }
        publisher.close().await;
        // Give the worker its status interval to send the last position.
        if result.is_ok() {
            tokio::time::sleep(STATUS_INTERVAL).await;
        }
        let _ = client.shutdown().await;
        result
    }

    /// Warn when the slot holds more WAL than `wal.lag_warning`.
    async fn watch_lag(&self) {
        match slot::wal_status(&self.db, &self.settings.wal).await {
            Ok(status) => {
                if let Some(state) = status.slot {
                    self.metrics
                        .wal_lag_bytes
                        .store(state.lag_bytes, std::sync::atomic::Ordering::Relaxed);
                    if state.lag_bytes > self.settings.wal.lag_warning {
                        warn!(slot = %state.name, lag_bytes = state.lag_bytes, limit = self.settings.wal.lag_warning, "the replication slot holds WAL the relay has not confirmed; PostgreSQL keeps it on disk until then");
                    }
                }
            }
            Err(err) => debug!(error = %report(&err), "could not read the slot's lag"),
        }
    }
}

/// How often the replication client tells the server the confirmed position.
const STATUS_INTERVAL: Duration = Duration::from_millis(200);

/// A replication error: a configuration problem stops the relay with the
/// fix; the rest are outages.
fn classify(settings: &Settings, endpoint: &str, err: PgWireError) -> Error {
    let text = crate::redact::text(&err.to_string());
    let wal = &settings.wal;
    if text.contains("does not exist") && text.contains("replication slot") {
        return slot::missing_slot(wal);
    }
    if text.contains("publication") && text.contains("does not exist") {
        return slot::missing_publication(wal);
    }
    if matches!(err, PgWireError::Auth(_))
        || text.contains("must be superuser or replication role")
        || text.contains("permission denied to start WAL sender")
    {
        return Error::Capture {
            problem: format!("the database refused a replication connection ({text})"),
            fix: "give the user the REPLICATION attribute (`ALTER ROLE <user> REPLICATION`) and allow it in pg_hba.conf".to_owned(),
        };
    }
    Error::Replication {
        endpoint: endpoint.to_owned(),
        reason: text,
    }
}

/// The state of one replication session.
struct Session<'a> {
    capture: &'a WalCapture,
    relations: HashMap<u32, Relation>,
    /// The transaction being read: its messages, in order.
    open: Option<Vec<Source>>,
    /// Messages sent and not settled, by id.
    in_flight: HashMap<Uuid, Source>,
    watermark: Watermark,
    /// A position the server reported with nothing of ours before it: safe
    /// to confirm once everything in flight is.
    idle_position: Option<u64>,
    commit_time: DateTime<Utc>,
}

impl<'a> Session<'a> {
    fn new(capture: &'a WalCapture) -> Self {
        Session {
            capture,
            relations: HashMap::new(),
            open: None,
            in_flight: HashMap::new(),
            watermark: Watermark::default(),
            idle_position: None,
            commit_time: Utc::now(),
        }
    }

    /// Take one event; a commit returns the messages to send.
    async fn event(
        &mut self,
        event: ReplicationEvent,
        report: &mut RelayReport,
    ) -> Result<Option<Vec<Envelope>>> {
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                self.open = Some(Vec::new());
                self.commit_time = pg_time(commit_time_micros);
            }
            ReplicationEvent::XLogData { data, .. } => match pgoutput::decode(&data) {
                Ok(Change::Relation(id, relation)) => {
                    self.relations.insert(id, relation);
                }
                Ok(Change::Insert { relation, values }) => {
                    let Some(table) = self.relations.get(&relation) else {
                        warn!(
                            relation,
                            "a row of a table the stream never described; skipped"
                        );
                        return Ok(None);
                    };
                    if let Some(source) = from_row(table, &values, self.commit_time) {
                        self.open.get_or_insert_with(Vec::new).push(source);
                    }
                }
                Ok(Change::Other) => {}
                Err(problem) => {
                    return Err(Error::Replication {
                        endpoint: self.capture.name.clone(),
                        reason: format!("a pgoutput message could not be decoded: {problem}"),
                    });
                }
            },
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } if prefix == MESSAGE_PREFIX => {
                let source = from_message(&content, self.commit_time);
                if transactional {
                    self.open.get_or_insert_with(Vec::new).push(source);
                } else {
                    // Not tied to a transaction: it stands alone.
                    return self.commit(lsn.as_u64(), vec![source], report).await;
                }
            }
            ReplicationEvent::Message { .. } => {}
            ReplicationEvent::Commit { end_lsn, .. } => {
                let sources = self.open.take().unwrap_or_default();
                return self.commit(end_lsn.as_u64(), sources, report).await;
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                if self.open.is_none() {
                    self.idle_position = Some(wal_end.as_u64());
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(None)
    }

    /// A committed transaction's messages: the ones that can be sent, and
    /// the ones that never can kept as FAILED rows.
    async fn commit(
        &mut self,
        end_lsn: u64,
        sources: Vec<Source>,
        report: &mut RelayReport,
    ) -> Result<Option<Vec<Envelope>>> {
        let ids: Vec<Uuid> = sources.iter().map(|s| s.row.id).collect();
        debug!(end_lsn, messages = ids.len(), "transaction committed");
        // A set: a committed transaction may hold many thousands of messages.
        let send: std::collections::HashSet<Uuid> =
            self.watermark.commit(end_lsn, &ids).into_iter().collect();
        let mut envelopes = Vec::with_capacity(send.len());
        let mut refused = Vec::new();
        for source in sources {
            if !send.contains(&source.row.id) || self.in_flight.contains_key(&source.row.id) {
                continue;
            }
            match envelope(&source.row, false) {
                Ok(envelope) => {
                    self.in_flight.insert(source.row.id, source);
                    envelopes.push(envelope);
                }
                Err(reason) => {
                    let id = source.row.id;
                    self.in_flight.insert(id, source);
                    refused.push((id, Outcome::Invalid(reason)));
                }
            }
        }
        if !refused.is_empty() {
            self.settle(refused, report).await?;
        }
        Ok(Some(envelopes))
    }

    /// Outcomes from the broker: sent rows marked, refused messages kept as
    /// rows for the claim path, then settled in the watermark.
    async fn settle(
        &mut self,
        outcomes: Vec<(Uuid, Outcome)>,
        report: &mut RelayReport,
    ) -> Result<()> {
        let settings = &self.capture.settings.relay;
        let now = Utc::now();
        // Settled: confirmed (rows of `published` among them also in `sent`,
        // to mark) or kept as a row.
        let mut settled = Vec::new();
        let mut sent = Vec::new();
        let mut kept = Vec::new();
        for (id, outcome) in outcomes {
            let Some(source) = self.in_flight.get(&id) else {
                continue;
            };
            let failure = match outcome {
                Outcome::Confirmed => None,
                Outcome::Unroutable(reason) => match settings.unroutable {
                    Unroutable::Accept => {
                        warn!(%id, destination = %source.row.destination, "no queue is bound to the destination; counted as sent (relay.unroutable = accept)");
                        None
                    }
                    Unroutable::Retry => Some((reason, false)),
                },
                Outcome::Rejected(reason) => Some((reason, false)),
                Outcome::Invalid(reason) => Some((reason, true)),
                Outcome::Unknown(reason) => {
                    // The connection went: this session ends and the slot
                    // gives the message again.
                    return Err(Error::Broker {
                        operation: "publish",
                        endpoint: self.capture.transport.endpoint(),
                        source: reason.into(),
                    });
                }
            };
            match failure {
                None => {
                    self.capture
                        .metrics
                        .publish_latency
                        .observe((now - source.row.added).to_std().unwrap_or_default());
                    if source.in_published {
                        sent.push(id);
                    }
                    settled.push(id);
                    report.published += 1;
                    Metrics::add(&self.capture.metrics.published, 1);
                }
                Some((reason, never)) => {
                    let next = if never {
                        None
                    } else {
                        next_attempt_after(1, settings)
                    };
                    match next {
                        Some(_) => {
                            report.retried += 1;
                            Metrics::add(&self.capture.metrics.retried, 1);
                        }
                        None => {
                            report.failed += 1;
                            Metrics::add(&self.capture.metrics.failed, 1);
                        }
                    }
                    warn!(%id, destination = %source.row.destination, error = %reason, "the broker refused a message from the replication stream; kept as a row for the claim path");
                    kept.push((source.clone(), reason, next));
                    settled.push(id);
                }
            }
        }
        mark_sent(&self.capture.db, &sent, now).await?;
        for (source, reason, next) in &kept {
            keep(&self.capture.db, source, reason, *next, now).await?;
        }
        for id in settled {
            self.in_flight.remove(&id);
            self.watermark.settle(id);
        }
        Ok(())
    }
}

/// A row of a table in the publication, as a message; `None` for rows that
/// are not outbox messages to send (other tables, rows not SCHEDULE).
fn from_row(
    table: &Relation,
    values: &[Option<String>],
    commit_time: DateTime<Utc>,
) -> Option<Source> {
    let get = |name: &str| {
        table
            .column(name)
            .and_then(|at| values.get(at).cloned().flatten())
    };
    match table.name.as_str() {
        "published" => {
            if get("status").and_then(|s| s.parse::<i32>().ok()) != Some(Status::Schedule.code()) {
                return None;
            }
            // A row with a failed attempt is the claim path's (the rows this
            // relay keeps for it are written that way).
            let retry: i32 = get("retry").and_then(|r| r.parse().ok()).unwrap_or(0);
            if retry > 0 {
                return None;
            }
            let raw_id = get("id").unwrap_or_default();
            let id = Uuid::parse_str(&raw_id).ok()?;
            Some(Source {
                row: ClaimedRow {
                    id,
                    destination: get("destination").unwrap_or_default(),
                    body: get("body").unwrap_or_else(|| "null".to_owned()),
                    headers: get("headers").unwrap_or_else(|| "{}".to_owned()),
                    retry,
                    added: get("added")
                        .and_then(|a| parse_timestamp(&a))
                        .unwrap_or(commit_time),
                },
                in_published: true,
            })
        }
        // jetstream-outbox's table: subject `<prefix>.<aggregatetype>.<aggregateid>`.
        "outbox" => {
            let id = Uuid::parse_str(&get("id")?).ok()?;
            let destination = format!(
                "/topic/{}.{}",
                get("aggregatetype").unwrap_or_default(),
                get("aggregateid").unwrap_or_default()
            );
            Some(Source {
                row: ClaimedRow {
                    id,
                    destination,
                    body: get("payload").unwrap_or_else(|| "null".to_owned()),
                    headers: "{}".to_owned(),
                    retry: 0,
                    added: commit_time,
                },
                in_published: false,
            })
        }
        _ => None,
    }
}

/// A `pg_logical_emit_message` message. One that cannot be read still
/// becomes a message (that fails as invalid), so it is kept as a FAILED row
/// showing what arrived instead of vanishing.
fn from_message(content: &[u8], commit_time: DateTime<Utc>) -> Source {
    let parsed: Option<Value> = serde_json::from_slice(content).ok();
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name));
    let id = field("id")
        .and_then(Value::as_str)
        .and_then(|id| Uuid::parse_str(id).ok());
    let row = match (id, field("destination").and_then(Value::as_str)) {
        (Some(id), Some(destination)) => ClaimedRow {
            id,
            destination: destination.to_owned(),
            body: field("body").map_or_else(|| "null".to_owned(), Value::to_string),
            headers: field("headers").map_or_else(|| "{}".to_owned(), Value::to_string),
            retry: 0,
            added: field("added")
                .and_then(Value::as_str)
                .and_then(|a| DateTime::parse_from_rfc3339(a).ok())
                .map_or(commit_time, |a| a.with_timezone(&Utc)),
        },
        _ => ClaimedRow {
            id: Uuid::new_v4(),
            // An empty destination fails as invalid, with this row kept.
            destination: String::new(),
            body: Value::String(String::from_utf8_lossy(content).into_owned()).to_string(),
            headers: "{}".to_owned(),
            retry: 0,
            added: commit_time,
        },
    };
    Source {
        row,
        in_published: false,
    }
}

/// `2026-12-01 22:41:15.123456+00`, as PostgreSQL prints a timestamptz.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Microseconds since 2000-01-01 (PostgreSQL's epoch).
fn pg_time(micros: i64) -> DateTime<Utc> {
    const PG_EPOCH: i64 = 946_684_800;
    DateTime::from_timestamp(PG_EPOCH, 0)
        .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::microseconds(micros)))
        .unwrap_or_else(Utc::now)
}

/// Sent rows of `published` become SUCCEEDED (a row another relay already
/// marked, or that was deleted, is left alone).
async fn mark_sent(db: &DatabaseConnection, ids: &[Uuid], now: DateTime<Utc>) -> Result<()> {
    for chunk in ids.chunks(CHUNK) {
        published::Entity::update_many()
            .col_expr(Column::Status, Expr::value(Status::Succeeded.code()))
            .col_expr(Column::NextAttemptAt, Expr::value(now))
            .col_expr(Column::LastError, Expr::value(Option::<String>::None))
            .col_expr(Column::ClaimToken, Expr::value(Option::<Uuid>::None))
            .filter(Column::Status.eq(Status::Schedule.code()))
            .filter(Column::Id.is_in(chunk.iter().copied()))
            .exec(db)
            .await?;
    }
    Ok(())
}

/// Keep a refused message as a `published` row with one failed attempt:
/// SCHEDULE for the claim path at `next`, or FAILED when `None`. A row that
/// exists (and is still SCHEDULE) is updated, one that does not is written.
async fn keep(
    db: &DatabaseConnection,
    source: &Source,
    reason: &str,
    next: Option<Duration>,
    now: DateTime<Utc>,
) -> Result<()> {
    let row = &source.row;
    let (status, next_attempt_at) = match next {
        Some(wait) => (
            Status::Schedule,
            now + chrono::Duration::from_std(wait).unwrap_or_default(),
        ),
        None => (Status::Failed, now),
    };
    let body = json_or_text(&row.body);
    let headers = match serde_json::from_str::<Value>(&row.headers) {
        Ok(Value::Object(map)) => Value::Object(map),
        _ => Value::Object(Default::default()),
    };
    let error: String = reason.chars().take(2000).collect();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO published (id, version, destination, body, added, expires_at, retry, status, \
           headers, next_attempt_at, last_error, claim_token) \
         VALUES ($1, NULL, $2, $3, $4, $5, 1, $6, $7, $8, $9, NULL) \
         ON CONFLICT (id) DO UPDATE SET retry = published.retry + 1, status = EXCLUDED.status, \
           next_attempt_at = EXCLUDED.next_attempt_at, last_error = EXCLUDED.last_error, \
           claim_token = NULL \
         WHERE published.status = 1",
        vec![
            row.id.into(),
            row.destination.clone().into(),
            body.into(),
            row.added.into(),
            (row.added + chrono::Duration::days(1)).into(),
            status.code().into(),
            headers.into(),
            next_attempt_at.into(),
            error.into(),
        ],
    ))
    .await?;
    Ok(())
}

/// `text` as JSON, or as a JSON string when it is not JSON.
fn json_or_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// The replication connection's address and credentials, from
/// `database.url` (the same server the pool uses, never a pooler: logical
/// replication needs a direct connection).
#[derive(Clone)]
pub(crate) struct Target {
    host: String,
    port: u16,
    user: String,
    password: crate::redact::Secret,
    database: String,
    tls: TlsConfig,
    shown: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let invalid = |allowed: &str| Error::InvalidSetting {
            key: "database.url".to_owned(),
            value: crate::redact::url(url),
            allowed: allowed.to_owned(),
        };
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| invalid("a postgres:// URL for relay.capture = \"wal\""))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (userinfo, hostport),
            None => ("", authority),
        };
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || hostport.starts_with('[') => (
                host,
                port.parse()
                    .map_err(|_| invalid("a port number after the host"))?,
            ),
            _ => (hostport, 5432),
        };
        let mut tls = TlsConfig::disabled();
        for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
            if key == "sslmode" {
                tls = match value {
                    "require" => TlsConfig::require(),
                    "verify-ca" => TlsConfig::verify_ca(root_cert(query)),
                    "verify-full" => TlsConfig::verify_full(root_cert(query)),
                    _ => TlsConfig::disabled(),
                };
            }
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Target {
            host: if host.is_empty() { "localhost" } else { host }.to_owned(),
            port,
            user: match crate::url::percent_decode(user) {
                user if user.is_empty() => "postgres".to_owned(),
                user => user,
            },
            password: crate::redact::Secret::new(crate::url::percent_decode(password)),
            database: match crate::url::percent_decode(database) {
                database if database.is_empty() => "postgres".to_owned(),
                database => database,
            },
            tls,
            shown: crate::redact::url(url),
        })
    }

    fn config(&self, settings: &Settings, name: &str) -> ReplicationConfig {
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.expose().to_owned(),
            self.database.clone(),
            settings.wal.slot.clone(),
            settings.wal.publication.clone(),
        )
        .with_port(self.port)
        .with_tls(self.tls.clone())
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(16_384)
        // Timestamps in the stream in a form `parse_timestamp` reads.
        .with_options("-c TimeZone=UTC -c DateStyle=ISO")
        .with_application_name(name.chars().take(63).collect::<String>())
    }
}

fn root_cert(query: &str) -> Option<std::path::PathBuf> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "sslrootcert")
        .map(|(_, v)| std::path::PathBuf::from(crate::url::percent_decode(v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replication_target_comes_from_the_database_url() {
        let t = Target::parse("postgres://app:s%40cret@db.example:6543/orders?sslmode=disable")
            .unwrap();
        assert_eq!((t.host.as_str(), t.port), ("db.example", 6543));
        assert_eq!((t.user.as_str(), t.database.as_str()), ("app", "orders"));
        assert_eq!(t.password.expose(), "s@cret");
        assert!(!t.shown.contains("s%40cret"));
        let t = Target::parse("postgres://127.0.0.1/app").unwrap();
        assert_eq!((t.user.as_str(), t.port), ("postgres", 5432));
        assert!(Target::parse("mysql://root@127.0.0.1/app").is_err());
    }

    #[test]
    fn timestamps_and_messages_decode() {
        let t = parse_timestamp("2026-12-01 22:41:15.123456+00").unwrap();
        assert_eq!(t.timestamp_subsec_micros(), 123_456);
        let now = Utc::now();
        let id = Uuid::new_v4();
        let good = format!(
            r#"{{"id":"{id}","destination":"/topic/a.b","body":{{"x":1}},"headers":{{"h":"v"}}}}"#
        );
        let source = from_message(good.as_bytes(), now);
        assert_eq!(source.row.id, id);
        assert_eq!(source.row.body, r#"{"x":1}"#);
        let bad = from_message(b"not json", now);
        assert!(bad.row.destination.is_empty());
        assert_eq!(bad.row.body, r#""not json""#);
    }
}
