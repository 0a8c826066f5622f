//! The relay: claim → publish with confirms → mark, until asked to stop.

mod listen;
mod schedule;
mod store;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::broker::{Broker, InFlight, Outcome, Outgoing, Returns};
use crate::metrics::Metrics;
use crate::retention::{Retention, Table};
use crate::settings::Unroutable;
use crate::{Destination, Error, Result, Settings, Shutdown, report};

use schedule::next_attempt_after;
use store::{ClaimedRow, Store};

/// What a relay run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows confirmed by the broker and marked sent.
    pub published: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Rows that reached FAILED.
    pub failed: u64,
}

/// Moves `published` rows to RabbitMQ. Several relays may run against one
/// database; each row is claimed by one of them at a time.
#[derive(Debug)]
pub struct Relay {
    store: Store,
    db: DatabaseConnection,
    settings: Settings,
    metrics: Arc<Metrics>,
    retention: Arc<Retention>,
    name: String,
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forever,
    UntilEmpty,
}

impl Relay {
    /// A relay over `db` with `settings`.
    pub fn new(db: DatabaseConnection, settings: Settings) -> Self {
        Relay {
            store: Store::new(db.clone()),
            retention: Arc::new(Retention::new(settings.retention.clone())),
            db,
            settings,
            metrics: Arc::new(Metrics::default()),
            name: format!("outbox-relay@{}", std::process::id()),
        }
    }

    /// Count into `metrics` (e.g. to serve them with `--metrics-addr`).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Relay until `shutdown` fires; the in-flight batch is finished and marked.
    pub async fn run(self, shutdown: Shutdown) -> Result<RelayReport> {
        self.run_mode(shutdown, Mode::Forever).await
    }

    /// Relay what is schedulable now, then return (or stop early on `shutdown`).
    pub async fn run_until_empty(self, shutdown: Shutdown) -> Result<RelayReport> {
        self.run_mode(shutdown, Mode::UntilEmpty).await
    }

    async fn run_mode(self, mut shutdown: Shutdown, mode: Mode) -> Result<RelayReport> {
        let wake = Arc::new(Notify::new());
        let listener = self.spawn_listener(&wake);
        let mut state = State::new(self.settings.broker.maximum_backoff);
        info!(relay = %self.name, batch_size = self.settings.relay.batch_size, "relay started");
        let result = self.main_loop(&mut shutdown, mode, &wake, &mut state).await;
        if let Some(listener) = listener {
            listener.abort();
        }
        // Whatever happened: collect and mark what is in flight (the stop
        // is graceful), give back what cannot be confirmed, finish marking.
        self.drain_in_flight(&mut state).await;
        if let Some(rows) = state.ahead.take() {
            self.release(&rows).await;
        }
        state.finish_marking().await;
        if let Some(broker) = state.broker.take() {
            broker.close().await;
        }
        info!(
            relay = %self.name,
            published = state.report.published,
            retried = state.report.retried,
            failed = state.report.failed,
            "relay stopped"
        );
        result.map(|()| state.report)
    }

    async fn main_loop(
        &self,
        shutdown: &mut Shutdown,
        mode: Mode,
        wake: &Notify,
        state: &mut State,
    ) -> Result<()> {
        self.retention.maybe_spawn(&self.db, Table::Published).await;
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            self.log_progress(state).await;

            if state.broker.as_ref().is_none_or(|b| !b.is_connected()) {
                // Batches sent on a dead connection have unknown outcomes.
                self.release_in_flight(state).await;
                state.broker = None;
                match Broker::connect(&self.settings.broker, &self.name).await {
                    Ok(broker) => {
                        if state.backoff.failures() > 0 {
                            info!(relay = %self.name, "broker connection restored");
                        }
                        state.broker = Some(broker);
                    }
                    Err(err) => {
                        self.outage(state, shutdown, "cannot connect to the broker", &err)
                            .await?;
                        continue;
                    }
                }
            }

            // Keep up to `max_in_flight` messages waiting for confirms: the
            // broker works on earlier batches while we claim the next one.
            match self.fill_window(state, shutdown).await {
                Ok(()) => {}
                Err(err) if err.is_transient() => {
                    let what = if matches!(err, Error::Database(_)) {
                        "cannot claim rows from the database"
                    } else {
                        "publishing failed; will reconnect"
                    };
                    self.release_in_flight(state).await;
                    state.broker = None;
                    self.outage(state, shutdown, what, &err).await?;
                    continue;
                }
                Err(err) => return Err(err),
            }

            // Collect the oldest batch's confirms and mark it, and meanwhile
            // claim the next batch so it is ready when the window has room.
            if let Some(batch) = state.in_flight.pop_front() {
                state.in_flight_messages -= batch.rows.len();
                let claim_ahead = state.ahead.is_none()
                    && state.backlog_left
                    && !shutdown.is_triggered()
                    && self.store.backend() != sea_orm::DbBackend::MySql;
                let (collected, ahead) = tokio::join!(
                    collect(batch.confirms, &mut state.returns, &mut state.in_flight),
                    async {
                        if claim_ahead {
                            self.claim().await.map(Some)
                        } else {
                            Ok(None)
                        }
                    }
                );
                match ahead {
                    Ok(Some(rows)) if !rows.is_empty() => state.ahead = Some(rows),
                    Ok(_) => {}
                    Err(err) => {
                        warn!(relay = %self.name, error = %report(&err), "claiming ahead failed")
                    }
                }
                match collected {
                    Ok(outcomes) => {
                        state.backoff.reset();
                        let outcomes = merge_outcomes(&batch.prepared, outcomes);
                        // One mark at a time: what a crash can resend stays bounded by
                        // the window plus one batch.
                        state.finish_marking().await;
                        let marking = self.spawn_mark(batch.rows, outcomes, &mut state.report);
                        state.marking.push(marking);
                    }
                    Err(err) => {
                        // Not the messages' fault: give them back without counting an attempt.
                        self.release(&batch.rows).await;
                        self.release_in_flight(state).await;
                        state.broker = None;
                        self.outage(state, shutdown, "publishing failed; will reconnect", &err)
                            .await?;
                    }
                }
                self.retention.maybe_spawn(&self.db, Table::Published).await;
                continue;
            }

            // Nothing in flight and nothing claimable. Marking may have made
            // failed rows due again (attempts 1 and 2 retry at once).
            if !state.marking.is_empty() {
                state.finish_marking().await;
                continue;
            }
            if mode == Mode::UntilEmpty {
                return Ok(());
            }
            self.idle(shutdown, wake).await;
        }
    }

    /// Claim and send batches until the window is full or nothing is due.
    async fn fill_window(&self, state: &mut State, shutdown: &Shutdown) -> Result<()> {
        // At least two batches, so one is always on the wire while the next is claimed.
        let batch_size = self.settings.relay.batch_size as usize;
        let window = (self.settings.relay.max_in_flight as usize).max(2 * batch_size);
        while state.in_flight_messages < window && !shutdown.is_triggered() {
            let rows = match state.ahead.take() {
                Some(rows) => rows,
                None => {
                    if self.store.backend() == sea_orm::DbBackend::MySql {
                        // InnoDB's SKIP LOCKED may pass over rows next to ones being
                        // marked; let marks finish so the claim keeps creation order.
                        state.finish_marking().await;
                    }
                    self.claim().await?
                }
            };
            let full = rows.len() >= batch_size;
            state.backlog_left = full;
            if rows.is_empty() {
                return Ok(());
            }
            let prepared = prepare(&rows);
            let outgoing: Vec<Outgoing<'_>> = prepared
                .iter()
                .filter_map(|p| p.as_ref().ok())
                .map(|p| Outgoing {
                    destination: &p.destination,
                    body: &p.body,
                    headers: &p.headers,
                })
                .collect();
            let Some(broker) = state.broker.as_mut() else {
                self.release(&rows).await;
                return Ok(());
            };
            let confirms = match broker.start_publish(&outgoing).await {
                Ok(confirms) => confirms,
                Err(err) => {
                    drop(outgoing);
                    self.release(&rows).await;
                    return Err(err);
                }
            };
            drop(outgoing);
            state.in_flight_messages += rows.len();
            state.in_flight.push_back(Batch {
                rows,
                prepared,
                confirms,
            });
            if !full {
                // The backlog is drained for now; collect what is in flight.
                return Ok(());
            }
        }
        Ok(())
    }

    /// Give back every batch still waiting for confirms.
    async fn release_in_flight(&self, state: &mut State) {
        if let Some(rows) = state.ahead.take() {
            self.release(&rows).await;
        }
        while let Some(batch) = state.in_flight.pop_front() {
            self.release(&batch.rows).await;
        }
        state.in_flight_messages = 0;
        state.returns = Returns::default();
    }

    /// On the way out: wait for the confirms of what was sent and mark it.
    async fn drain_in_flight(&self, state: &mut State) {
        while let Some(batch) = state.in_flight.pop_front() {
            match collect(batch.confirms, &mut state.returns, &mut state.in_flight).await {
                Ok(outcomes) => {
                    let outcomes = merge_outcomes(&batch.prepared, outcomes);
                    let marking = self.spawn_mark(batch.rows, outcomes, &mut state.report);
                    state.marking.push(marking);
                }
                Err(err) => {
                    warn!(relay = %self.name, error = %report(&err), rows = batch.rows.len(), "confirms lost while stopping; the rows will be sent again");
                    self.release(&batch.rows).await;
                }
            }
        }
        state.in_flight_messages = 0;
    }

    async fn claim(&self) -> Result<Vec<ClaimedRow>> {
        let now = Utc::now();
        let lease = chrono::Duration::from_std(self.settings.relay.claim_lease)
            .unwrap_or(chrono::Duration::seconds(60));
        self.store
            .claim(self.settings.relay.batch_size, now, now + lease)
            .await
    }

    async fn release(&self, rows: &[ClaimedRow]) {
        let ids: Vec<_> = rows.iter().map(|r| r.id).collect();
        if let Err(err) = self.store.release(&ids).await {
            // The lease expires by itself; the rows are not lost.
            warn!(relay = %self.name, rows = ids.len(), error = %report(&err), "could not release claimed rows; they are retried when the claim lease ends");
        }
    }

    /// Log an outage and wait out the backoff (or the shutdown).
    async fn outage(
        &self,
        state: &mut State,
        shutdown: &mut Shutdown,
        what: &str,
        err: &Error,
    ) -> Result<()> {
        let delay = state.backoff.next_delay();
        warn!(
            relay = %self.name,
            error = %report(err),
            retry_in = ?delay,
            failures = state.backoff.failures(),
            "{what}; no attempts are counted against messages"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.wait() => {}
        }
        Ok(())
    }

    /// Sleep until woken by NOTIFY, the next retry falls due, `waiting_time` passes, or shutdown.
    async fn idle(&self, shutdown: &mut Shutdown, wake: &Notify) {
        let mut wait = self.settings.relay.waiting_time;
        if let Ok(backlog) = self.store.backlog().await
            && let Some(next_due) = backlog.next_due
        {
            let until = (next_due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            wait = wait.min(until.max(Duration::from_millis(1)));
        }
        tokio::select! {
            () = wake.notified() => debug!("woken by NOTIFY"),
            () = tokio::time::sleep(wait) => {}
            () = shutdown.wait() => {}
        }
    }

    fn spawn_mark(
        &self,
        batch: Vec<ClaimedRow>,
        outcomes: Vec<Outcome>,
        totals: &mut RelayReport,
    ) -> JoinHandle<()> {
        let mut sent = Vec::with_capacity(batch.len());
        let mut failures = Vec::new();
        let now = Utc::now();
        for (row, outcome) in batch.into_iter().zip(outcomes) {
            match outcome {
                Outcome::Confirmed => sent.push(row),
                Outcome::Returned(reason)
                    if self.settings.relay.unroutable == Unroutable::Accept =>
                {
                    warn!(id = %row.id, destination = %row.destination, "{reason}; marked sent (relay.unroutable = accept)");
                    sent.push(row);
                }
                Outcome::Returned(reason) | Outcome::Rejected(reason) => {
                    failures.push((row, reason))
                }
            }
        }
        for row in &sent {
            let latency = (now - row.added).to_std().unwrap_or_default();
            self.metrics.publish_latency.observe(latency);
        }
        totals.published += sent.len() as u64;
        Metrics::add(&self.metrics.published, sent.len() as u64);
        let mut scheduled = Vec::with_capacity(failures.len());
        // One warning per distinct reason and batch: an unbound destination
        // can fail a whole batch, and a line per message would drown the log.
        let mut retrying: BTreeMap<&str, (u64, Uuid)> = BTreeMap::new();
        for (row, reason) in &failures {
            let failures_so_far = u32::try_from(row.retry).unwrap_or(0).saturating_add(1);
            let next = next_attempt_after(failures_so_far, &self.settings.relay)
                .map(|wait| now + chrono::Duration::from_std(wait).unwrap_or_default());
            if next.is_some() {
                totals.retried += 1;
                Metrics::add(&self.metrics.retried, 1);
                debug!(id = %row.id, destination = %row.destination, attempt = failures_so_far, error = %reason, "publish attempt failed; will retry");
                retrying.entry(reason.as_str()).or_insert((0, row.id)).0 += 1;
            } else {
                totals.failed += 1;
                Metrics::add(&self.metrics.failed, 1);
                error!(id = %row.id, destination = %row.destination, attempts = failures_so_far, error = %reason, "message FAILED after the last attempt; see `outbox-cli failed`");
            }
            scheduled.push((row.id, failures_so_far, next, reason.clone()));
        }
        for (reason, (count, example)) in retrying {
            warn!(messages = count, example_id = %example, error = %reason, "publish attempts failed; will retry on schedule");
        }
        let store = self.store.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let ids: Vec<_> = sent.iter().map(|r| r.id).collect();
            let mut pause = Duration::from_millis(100);
            // A database blip must not resend a whole confirmed batch: retry the mark.
            for attempt in 1.. {
                match store.mark_sent(&ids).await {
                    Ok(()) => break,
                    Err(err) if attempt < 20 => {
                        warn!(relay = %name, rows = ids.len(), error = %report(&err), "marking sent rows failed; retrying");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Err(err) => {
                        error!(relay = %name, rows = ids.len(), error = %report(&err), "could not mark rows sent; they will be sent again after the claim lease (consumers deduplicate)");
                        break;
                    }
                }
            }
            for (id, retry, next, reason) in scheduled {
                if let Err(err) = store
                    .mark_failed(id, i32::try_from(retry).unwrap_or(i32::MAX), next, &reason)
                    .await
                {
                    warn!(relay = %name, %id, error = %report(&err), "could not record a failed attempt");
                }
            }
        })
    }

    async fn log_progress(&self, state: &mut State) {
        if state.last_progress.elapsed() < self.settings.relay.progress_interval {
            return;
        }
        let elapsed = state.last_progress.elapsed().as_secs_f64();
        let published = state.report.published - state.published_at_last_progress;
        state.last_progress = Instant::now();
        state.published_at_last_progress = state.report.published;
        match self.store.backlog().await {
            Ok(backlog) => {
                let oldest_age = backlog
                    .oldest
                    .map(|oldest| (Utc::now() - oldest).to_std().unwrap_or_default());
                self.metrics
                    .backlog
                    .store(backlog.pending, std::sync::atomic::Ordering::Relaxed);
                self.metrics.oldest_pending_ms.store(
                    oldest_age.map_or(0, |age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX)),
                    std::sync::atomic::Ordering::Relaxed,
                );
                info!(
                    relay = %self.name,
                    rate = format!("{:.0}/s", published as f64 / elapsed),
                    published_total = state.report.published,
                    backlog = backlog.pending,
                    oldest_pending = ?oldest_age.map(|d| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
                    "relay progress"
                );
            }
            Err(err) => warn!(relay = %self.name, error = %report(&err), "cannot read the backlog"),
        }
    }

    fn spawn_listener(&self, wake: &Arc<Notify>) -> Option<JoinHandle<()>> {
        if !self.settings.relay.listen || self.store.backend() != sea_orm::DbBackend::Postgres {
            return None;
        }
        let url = self.settings.database.url.clone()?;
        Some(tokio::spawn(listen::listen(
            url,
            Arc::clone(wake),
            self.settings.broker.maximum_backoff,
        )))
    }
}

/// Loop state that survives iterations.
struct State {
    broker: Option<Broker>,
    /// Batches sent, oldest first, waiting for their confirms.
    in_flight: VecDeque<Batch>,
    in_flight_messages: usize,
    /// Marks of confirmed batches, running in the background.
    marking: Vec<JoinHandle<()>>,
    /// Returned message ids not yet matched to their batch.
    returns: Returns,
    /// A batch claimed while the previous one was being confirmed.
    ahead: Option<Vec<ClaimedRow>>,
    /// Whether the last claim was full, i.e. more is probably due.
    backlog_left: bool,
    backoff: Backoff,
    report: RelayReport,
    last_progress: Instant,
    published_at_last_progress: u64,
}

/// One claimed batch on the wire.
struct Batch {
    rows: Vec<ClaimedRow>,
    prepared: Vec<std::result::Result<Prepared, String>>,
    confirms: InFlight,
}

impl State {
    fn new(maximum_backoff: Duration) -> Self {
        State {
            broker: None,
            in_flight: VecDeque::new(),
            in_flight_messages: 0,
            marking: Vec::new(),
            returns: Returns::default(),
            ahead: None,
            backlog_left: false,
            backoff: Backoff::new(maximum_backoff),
            report: RelayReport::default(),
            last_progress: Instant::now(),
            published_at_last_progress: 0,
        }
    }

    async fn finish_marking(&mut self) {
        for marking in self.marking.drain(..) {
            if let Err(err) = marking.await {
                error!(error = %err, "marking task failed");
            }
        }
    }
}

/// Wait for a batch's confirms; returns riding on later batches' confirms
/// are picked up too (see [`InFlight`]).
async fn collect(
    mut confirms: InFlight,
    returns: &mut Returns,
    later: &mut VecDeque<Batch>,
) -> Result<Vec<Outcome>> {
    confirms.wait(returns).await?;
    for batch in later {
        batch.confirms.harvest(returns);
    }
    Ok(confirms.finish(returns))
}

/// A claimed row ready for the wire, or why it can never be sent.
struct Prepared {
    destination: Destination,
    body: Vec<u8>,
    headers: BTreeMap<String, String>,
}

fn prepare(rows: &[ClaimedRow]) -> Vec<std::result::Result<Prepared, String>> {
    rows.iter()
        .map(|row| {
            let destination = Destination::parse(&row.destination).map_err(|err| report(&err))?;
            let body = serde_json::to_vec(&row.body)
                .map_err(|err| format!("body is not serializable: {err}"))?;
            let headers = row
                .headers
                .as_object()
                .map(|map| {
                    map.iter()
                        .map(|(k, v)| {
                            let value = match v {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            };
                            (k.clone(), value)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(Prepared {
                destination,
                body,
                headers,
            })
        })
        .collect()
}

/// Put the broker's outcomes back next to rows that were never sent.
fn merge_outcomes(
    prepared: &[std::result::Result<Prepared, String>],
    outcomes: Vec<Outcome>,
) -> Vec<Outcome> {
    let mut outcomes = outcomes.into_iter();
    prepared
        .iter()
        .map(|p| match p {
            Ok(_) => outcomes
                .next()
                .unwrap_or(Outcome::Rejected("no confirm received".to_owned())),
            Err(reason) => Outcome::Rejected(reason.clone()),
        })
        .collect()
}
