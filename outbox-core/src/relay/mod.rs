//! The relay: claim → publish → outcome by row id → mark, until asked to stop.
//!
//! Rows flow one way. A claim (with its token and lease) hands rows to the
//! [`Window`]; the transport reports one outcome per row id; the window turns
//! outcomes into marks under the claim that holds each row; the marks are
//! written conditional on that claim. At most `relay.max_in_flight` rows are
//! sent and not yet marked at any time, which is also what a crashed relay
//! can send twice. A message's own failure costs that row one attempt; a
//! lost connection costs nothing (the rows go back); refused credentials
//! stop the relay with the fix.

mod claim;
mod envelope;
#[cfg(feature = "postgres")]
mod listen;
mod marking;
mod schedule;
#[cfg(feature = "postgres")]
pub(crate) mod wal;
mod window;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{DatabaseConnection, DbBackend};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::broker::{AnyPublisher, Envelope, Outcome, Publisher, Transport};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::retention::{Retention, Table};
use crate::settings::Capture;
use crate::{Error, Result, Settings, Shutdown, report};

use claim::{Backlog, Claim, Store};
use marking::{Marked, Marking};
use window::{Flight, Marks, Window};

/// What a relay run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows confirmed by the broker and marked sent.
    pub published: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Rows that reached FAILED.
    pub failed: u64,
    /// With [`Relay::run_until_empty`]: rows left unsent because they wait
    /// for a later attempt or are held by another relay.
    pub unsent: u64,
}

/// Moves `published` rows to the broker. Several relays may run against one
/// database; each row is claimed by one of them at a time.
pub struct Relay {
    store: Store,
    db: DatabaseConnection,
    settings: Settings,
    transport: Option<Transport>,
    clock: Clock,
    metrics: Arc<Metrics>,
    retention: Arc<Retention>,
    name: String,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("name", &self.name)
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

/// How a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forever,
    UntilEmpty,
}

impl Relay {
    /// A relay over `db` with `settings`, to the broker `broker.url` names.
    pub fn new(db: DatabaseConnection, settings: Settings) -> Self {
        Relay {
            store: Store::new(db.clone()),
            retention: Arc::new(Retention::new(settings.retention.clone())),
            db,
            settings,
            transport: None,
            clock: Clock::system(),
            metrics: Arc::new(Metrics::default()),
            name: format!("outbox-relay@{}", std::process::id()),
        }
    }

    /// Publish through `transport` instead of the one `broker.url` names
    /// (e.g. a [`MemoryBroker`](crate::MemoryBroker) in tests).
    pub fn with_transport(mut self, transport: impl Into<Transport>) -> Self {
        self.transport = Some(transport.into());
        self
    }

    /// Read time from `clock` (a manual clock makes leases and retries due
    /// without waiting).
    #[cfg(feature = "memory")]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Name the relay in logs and broker connections.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
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

    /// Relay until `shutdown` fires; what is in flight is confirmed and marked.
    pub async fn run(self, shutdown: Shutdown) -> Result<RelayReport> {
        self.run_mode(shutdown, Mode::Forever).await
    }

    /// Relay what is schedulable now, then return (or stop early on
    /// `shutdown`). Rows another relay holds are waited for up to
    /// `relay.claim_lease`; rows waiting for a later attempt are counted in
    /// [`RelayReport::unsent`]. An outage longer than
    /// `broker.operation_timeout` ends the run with its error.
    pub async fn run_until_empty(self, shutdown: Shutdown) -> Result<RelayReport> {
        self.run_mode(shutdown, Mode::UntilEmpty).await
    }

    async fn run_mode(self, shutdown: Shutdown, mode: Mode) -> Result<RelayReport> {
        self.settings.check_relay()?;
        if self.settings.relay.capture == Capture::Wal {
            return self.run_wal(shutdown, mode).await;
        }
        self.run_claim(shutdown, mode).await
    }

    /// The claim path: claim → publish → outcome → mark.
    async fn run_claim(self, mut shutdown: Shutdown, mode: Mode) -> Result<RelayReport> {
        crate::schema::check(&self.db, crate::schema::Need::Outbox).await?;
        let transport = match &self.transport {
            Some(transport) => transport.clone(),
            None => Transport::from_settings(&self.settings)?,
        };
        let wake = Arc::new(Notify::new());
        let listener = self.spawn_listener(&wake);
        let marking = Marking::new(
            self.store.clone(),
            self.name.clone(),
            self.clock.clone(),
            self.lease(),
        );
        let mut run = Run::new(&self.settings, Arc::clone(&self.metrics), marking);
        info!(
            relay = %self.name,
            broker = %transport.endpoint(),
            batch_size = self.settings.relay.batch_size,
            max_in_flight = self.settings.relay.max_in_flight,
            "relay started"
        );
        let result = self
            .main_loop(&transport, &mut run, &mut shutdown, mode, &wake)
            .await;
        if let Some(listener) = listener {
            listener.abort();
        }
        self.wind_down(&mut run).await;
        info!(
            relay = %self.name,
            published = run.report.published,
            retried = run.report.retried,
            failed = run.report.failed,
            "relay stopped"
        );
        result.map(|()| run.report)
    }

    /// Log-tailing capture beside a claim sweep for retries and for rows
    /// the stream did not send within `wal.sweep_after`.
    #[cfg(feature = "postgres")]
    async fn run_wal(self, shutdown: Shutdown, mode: Mode) -> Result<RelayReport> {
        if mode == Mode::UntilEmpty {
            return Err(Error::Capture {
                problem: "`--until-empty` has no end with relay.capture = \"wal\" (the stream never is empty)".to_owned(),
                fix: "run `outbox-cli publish` without it, or with relay.capture = \"claim\" (OUTBOX_RELAY_CAPTURE=claim) to drain once".to_owned(),
            });
        }
        crate::schema::check(&self.db, crate::schema::Need::Outbox).await?;
        let transport = match &self.transport {
            Some(transport) => transport.clone(),
            None => Transport::from_settings(&self.settings)?,
        };
        let capture = wal::WalCapture {
            db: self.db.clone(),
            settings: self.settings.clone(),
            transport: transport.clone(),
            name: self.name.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let mut settings = self.settings.clone();
        // The sweep is woken by its timer, not by every insert.
        settings.relay.listen = false;
        let sweep = Relay {
            store: Store::new(self.db.clone()).sweeping(self.settings.wal.sweep_after),
            settings,
            transport: Some(transport),
            ..self
        };
        // Either side failing for good stops the other.
        let (stop, inner) = crate::shutdown_channel();
        let both = async {
            tokio::join!(
                async {
                    let result = capture.run(inner.clone()).await;
                    if result.is_err() {
                        stop.trigger();
                    }
                    result
                },
                async {
                    let result = sweep.run_claim(inner.clone(), Mode::Forever).await;
                    if result.is_err() {
                        stop.trigger();
                    }
                    result
                }
            )
        };
        tokio::pin!(both);
        let mut shutdown = shutdown;
        let (stream, swept) = tokio::select! {
            results = &mut both => results,
            () = shutdown.wait() => {
                stop.trigger();
                both.await
            }
        };
        let (stream, swept) = (stream?, swept?);
        Ok(RelayReport {
            published: stream.published + swept.published,
            retried: stream.retried + swept.retried,
            failed: stream.failed + swept.failed,
            unsent: swept.unsent,
        })
    }

    #[cfg(not(feature = "postgres"))]
    async fn run_wal(self, _shutdown: Shutdown, _mode: Mode) -> Result<RelayReport> {
        Err(Error::Capture {
            problem: "this build has no PostgreSQL driver".to_owned(),
            fix: "build outbox-core with its `postgres` feature".to_owned(),
        })
    }

    async fn main_loop(
        &self,
        transport: &Transport,
        run: &mut Run,
        shutdown: &mut Shutdown,
        mode: Mode,
        wake: &Notify,
    ) -> Result<()> {
        self.retention.maybe_spawn(&self.db, Table::Published).await;
        loop {
            if shutdown.is_triggered() {
                return Ok(());
            }
            self.log_progress(run).await;

            if run.publisher.as_ref().is_none_or(|p| !p.is_connected()) {
                // Rows sent on a dead connection have unknown outcomes.
                self.give_back_everything(run).await;
                run.publisher = None;
                match transport.publisher(&self.name).await {
                    Ok(publisher) => {
                        if run.broker_down.take().is_some() {
                            info!(relay = %self.name, "broker connection restored");
                        }
                        run.backoff.reset();
                        run.publisher = Some(publisher);
                    }
                    Err(err) => {
                        self.outage(
                            run,
                            shutdown,
                            mode,
                            Down::Broker,
                            "cannot connect to the broker",
                            err,
                        )
                        .await?;
                        continue;
                    }
                }
            }

            self.renew_leases(run).await;

            match self.fill_window(run, shutdown).await {
                Ok(()) => {}
                Err(err) if err.is_transient() && matches!(err, Error::Database(_)) => {
                    // Keep collecting what is in flight; claim again later.
                    if run.window.is_empty() {
                        self.outage(
                            run,
                            shutdown,
                            mode,
                            Down::Database,
                            "cannot claim rows from the database",
                            err,
                        )
                        .await?;
                        continue;
                    }
                    if run.database_down.is_none() {
                        warn!(relay = %self.name, error = %report(&err), "cannot claim rows from the database; finishing what is in flight");
                        run.database_down = Some(Instant::now());
                    }
                }
                Err(err) if err.is_transient() => {
                    self.give_back_everything(run).await;
                    run.publisher = None;
                    self.outage(
                        run,
                        shutdown,
                        mode,
                        Down::Broker,
                        "publishing failed; will reconnect",
                        err,
                    )
                    .await?;
                    continue;
                }
                Err(err) => return Err(err),
            }

            if run.window.is_empty() {
                // Marks count against the window: once written, there may be
                // room for a claim made ahead.
                run.finish_marking().await;
                if run.database_down.is_some() || run.ahead.is_some() {
                    continue;
                }
                // Both read the backlog, so rows the marks made due again
                // (a retry at once, rows given back) are claimed next.
                if mode == Mode::UntilEmpty {
                    if self.until_empty_done(run, shutdown).await? {
                        return Ok(());
                    }
                    continue;
                }
                self.idle(shutdown, wake).await;
                run.backlog_left = true;
                continue;
            }

            self.collect(run, mode).await?;
            self.retention.maybe_spawn(&self.db, Table::Published).await;
        }
    }

    /// Claim and publish until the window is full or nothing is due.
    async fn fill_window(&self, run: &mut Run, shutdown: &Shutdown) -> Result<()> {
        // A claim made ahead is sent first, whatever the backlog looks like.
        while (run.backlog_left || run.ahead.is_some()) && !shutdown.is_triggered() {
            let Some(limit) = run.room(&self.settings) else {
                return Ok(());
            };
            let claim = match run.ahead.take() {
                Some(claim) => claim,
                None => {
                    if self.store.backend() == DbBackend::MySql {
                        // InnoDB's SKIP LOCKED may pass over rows next to ones being
                        // marked; let marks finish so the claim keeps creation order.
                        run.finish_marking().await;
                    }
                    let claim = self.claim(limit).await?;
                    if run.database_down.take().is_some() {
                        info!(relay = %self.name, "database reachable again");
                    }
                    claim
                }
            };
            let full = claim.len() >= limit as usize;
            if !full {
                run.backlog_left = false;
            }
            if claim.is_empty() {
                return Ok(());
            }
            self.send(run, claim).await?;
        }
        Ok(())
    }

    /// Admit a claim to the window and hand its rows to the transport.
    async fn send(&self, run: &mut Run, claim: Claim) -> Result<()> {
        let trusted_json = self.store.backend() == DbBackend::Postgres;
        if !claim.rows.is_empty() {
            let total: usize = claim
                .rows
                .iter()
                .map(|r| r.body.len() + r.headers.len())
                .sum();
            let mean = total / claim.rows.len();
            run.row_bytes = Some(match run.row_bytes {
                Some(previous) => mean.max((previous + mean) / 2),
                None => mean,
            });
        }
        debug!(token = %claim.token, rows = ?claim.rows.iter().map(|r| r.id).collect::<Vec<_>>(), "claimed");
        let mut envelopes: Vec<Envelope> = Vec::with_capacity(claim.rows.len());
        let mut refused = Vec::new();
        for row in &claim.rows {
            let flight = Flight {
                token: claim.token,
                retry: row.retry,
                added: row.added,
                destination: row.destination.clone(),
                bytes: row.body.len() + row.headers.len(),
            };
            if !run.window.admit(row.id, flight, claim.lease_until) {
                debug!(id = %row.id, "claimed again while in flight; not sent twice");
                continue;
            }
            match envelope::envelope(row, trusted_json) {
                Ok(envelope) => envelopes.push(envelope),
                Err(reason) => refused.push((row.id, Outcome::Invalid(reason))),
            }
        }
        run.counted(Marked {
            failed: claim.unreadable,
            ..Marked::default()
        });
        if !refused.is_empty() {
            let marks = run
                .window
                .settle(refused, &self.settings.relay, self.clock.now());
            self.record(run, marks).await;
        }
        if envelopes.is_empty() {
            return Ok(());
        }
        let publisher = run.publisher.as_mut().ok_or(Error::BrokerTimeout {
            operation: "publish (not connected)",
            timeout: self.settings.broker.operation_timeout,
        })?;
        publisher.publish(envelopes).await
    }

    /// Wait for outcomes (claiming the next batch meanwhile), then mark them.
    async fn collect(&self, run: &mut Run, mode: Mode) -> Result<()> {
        let claim_ahead = run.ahead.is_none()
            && run.backlog_left
            && run.database_down.is_none()
            && self.store.backend() != DbBackend::MySql;
        // A claim made ahead is held in memory too: keep it within the byte bound.
        let limit = match run.row_bytes {
            Some(average) => {
                let fits = self.settings.relay.max_in_flight_bytes / average.max(1);
                self.settings
                    .relay
                    .batch_size
                    .min(u32::try_from(fits.max(1)).unwrap_or(u32::MAX))
            }
            None => 1,
        };
        // Wake in time to renew leases while confirms are slow (at least
        // every second, so a jump of the clock is noticed too).
        let renew_in = run
            .window
            .next_lease_end()
            .map(|end| (end - self.clock.now()).to_std().unwrap_or_default() / 2)
            .unwrap_or(self.settings.broker.operation_timeout)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let Some(publisher) = run.publisher.as_mut() else {
            return Ok(());
        };
        let marking = &mut run.marking;
        let (woke, ahead) = tokio::join!(
            async {
                tokio::select! {
                    outcomes = tokio::time::timeout(renew_in, publisher.outcomes()) => Woke::Outcomes(outcomes),
                    // A round of marks written: the next starts, and there is room to claim.
                    marked = marking.written() => Woke::Written(marked),
                }
            },
            async {
                if claim_ahead {
                    Some(self.claim(limit).await)
                } else {
                    None
                }
            }
        );
        match ahead {
            Some(Ok(claim)) if !claim.is_empty() => run.ahead = Some(claim),
            Some(Ok(_)) => run.backlog_left = false,
            Some(Err(err)) => {
                warn!(relay = %self.name, error = %report(&err), "claiming ahead failed")
            }
            None => {}
        }
        let outcomes = match woke {
            Woke::Outcomes(outcomes) => outcomes,
            Woke::Written(marked) => {
                run.counted(marked);
                return Ok(());
            }
        };
        match outcomes {
            // Nothing arrived in time: renew, then wait again.
            Err(_) => Ok(()),
            Ok(Ok(outcomes)) => {
                if !outcomes.is_empty() {
                    let marks = run
                        .window
                        .settle(outcomes, &self.settings.relay, self.clock.now());
                    self.record(run, marks).await;
                }
                Ok(())
            }
            Ok(Err(err)) if err.is_transient() => {
                self.give_back_everything(run).await;
                run.publisher = None;
                warn!(relay = %self.name, error = %report(&err), "broker connection lost; the rows in flight go back, no attempts are counted");
                if mode == Mode::UntilEmpty {
                    run.broker_down.get_or_insert_with(Instant::now);
                }
                Ok(())
            }
            Ok(Err(err)) => Err(err),
        }
    }

    /// Count and log the marks of one round of outcomes, and have them
    /// written (they count against `max_in_flight` until they are).
    async fn record(&self, run: &mut Run, marks: Marks) {
        if marks.is_empty() {
            return;
        }
        let now = self.clock.now();
        for added in &marks.sent_added {
            let latency = (now - *added).to_std().unwrap_or_default();
            self.metrics.publish_latency.observe(latency);
        }
        // One warning per distinct reason and round: an unbound destination
        // can fail a whole batch, and a line per message would drown the log.
        let mut reasons: std::collections::BTreeMap<&str, (u64, Uuid)> = Default::default();
        for (id, destination, attempt, reason) in &marks.retrying {
            debug!(%id, %destination, attempt, error = %reason, "publish attempt failed; will retry");
            reasons.entry(reason.as_str()).or_insert((0, *id)).0 += 1;
        }
        for (reason, (count, example)) in reasons {
            warn!(messages = count, example_id = %example, error = %reason, "publish attempts failed; will retry on schedule");
        }
        let marked = run.marking.add(marks).await;
        run.counted(marked);
    }

    /// Give every row in flight back (the connection is gone).
    async fn give_back_everything(&self, run: &mut Run) {
        let by_claim = run.window.take_all();
        run.finish_marking().await;
        for (token, ids) in by_claim {
            self.release(token, &ids).await;
        }
        if let Some(claim) = run.ahead.take() {
            let ids: Vec<Uuid> = claim.rows.iter().map(|r| r.id).collect();
            self.release(claim.token, &ids).await;
            run.counted(Marked {
                failed: claim.unreadable,
                ..Marked::default()
            });
        }
    }

    /// On the way out: collect what the broker still answers (within the
    /// operation timeout), mark it, give back the rest.
    async fn wind_down(&self, run: &mut Run) {
        let deadline = tokio::time::Instant::now() + self.settings.broker.operation_timeout;
        while !run.window.is_empty() && tokio::time::Instant::now() < deadline {
            let Some(publisher) = run.publisher.as_mut() else {
                break;
            };
            match tokio::time::timeout_at(deadline, publisher.outcomes()).await {
                Ok(Ok(outcomes)) if !outcomes.is_empty() => {
                    let marks = run
                        .window
                        .settle(outcomes, &self.settings.relay, self.clock.now());
                    self.record(run, marks).await;
                }
                Ok(Ok(_)) => break,
                Ok(Err(err)) => {
                    warn!(relay = %self.name, error = %report(&err), rows = run.window.len(), "confirms lost while stopping; the rows will be sent again");
                    break;
                }
                Err(_) => break,
            }
        }
        self.give_back_everything(run).await;
        run.finish_marking().await;
        if let Some(publisher) = run.publisher.take() {
            publisher.close().await;
        }
    }

    /// Claim a batch. Rows that cannot be read are FAILED at once, whatever
    /// happens to the rest of the claim.
    async fn claim(&self, limit: u32) -> Result<Claim> {
        let now = self.clock.now();
        let lease = self.lease();
        let mut claim = self.store.claim(limit, now, now + lease).await?;
        for bad in std::mem::take(&mut claim.bad) {
            error!(id = %bad.shown, error = %bad.reason, "outbox row cannot be read; marked FAILED");
            match self.store.mark_unreadable(claim.token, &bad, now).await {
                Ok(marked) => claim.unreadable += marked,
                Err(err) => {
                    warn!(id = %bad.shown, error = %report(&err), "could not mark an unreadable row FAILED; it is met again when its lease ends")
                }
            }
        }
        Ok(claim)
    }

    fn lease(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.relay.claim_lease)
            .unwrap_or(chrono::Duration::seconds(60))
    }

    async fn release(&self, token: Uuid, ids: &[Uuid]) {
        if let Err(err) = self.store.release(token, ids).await {
            // The lease ends by itself; the rows are not lost.
            warn!(relay = %self.name, rows = ids.len(), error = %report(&err), "could not give claimed rows back; they are retried when the claim lease ends");
        }
    }

    /// Extend the leases of claims that are half over while their rows are
    /// still in flight (slow confirms).
    async fn renew_leases(&self, run: &mut Run) {
        let lease = self.lease();
        let now = self.clock.now();
        let expiring = run.window.expiring(now + lease / 2);
        for (token, ids) in expiring {
            let until = now + lease;
            match self.store.renew(token, &ids, until).await {
                Ok(renewed) => {
                    run.window.renewed(token, until);
                    debug!(rows = ids.len(), renewed, "claim lease renewed");
                }
                Err(err) => {
                    warn!(relay = %self.name, error = %report(&err), "could not renew a claim lease")
                }
            }
        }
    }

    /// Log an outage and wait out the backoff (or the shutdown). In
    /// until-empty mode, an outage longer than `operation_timeout` ends the run.
    async fn outage(
        &self,
        run: &mut Run,
        shutdown: &mut Shutdown,
        mode: Mode,
        down: Down,
        what: &str,
        err: Error,
    ) -> Result<()> {
        if !err.is_transient() {
            return Err(err);
        }
        let since = match down {
            Down::Broker => *run.broker_down.get_or_insert_with(Instant::now),
            Down::Database => *run.database_down.get_or_insert_with(Instant::now),
        };
        if mode == Mode::UntilEmpty && since.elapsed() >= self.settings.broker.operation_timeout {
            error!(relay = %self.name, error = %report(&err), "{what}; giving up (--until-empty does not wait out outages longer than broker.operation_timeout)");
            return Err(err);
        }
        let delay = run.backoff.next_delay();
        warn!(
            relay = %self.name,
            error = %report(&err),
            retry_in = ?delay,
            failures = run.backoff.failures(),
            "{what}; no attempts are counted against messages"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.wait() => {}
        }
        Ok(())
    }

    /// Nothing is due: `true` when done, unless rows are held by another
    /// relay (wait up to `claim_lease` for them, then `false` to send them)
    /// or wait for a later attempt (counted in `unsent`).
    async fn until_empty_done(&self, run: &mut Run, shutdown: &mut Shutdown) -> Result<bool> {
        let started = Instant::now();
        loop {
            let backlog = self.store.backlog(self.clock.now()).await?;
            if backlog.due > 0 {
                run.backlog_left = true;
                return Ok(false);
            }
            if backlog.leased > 0 && started.elapsed() < self.settings.relay.claim_lease {
                if run.waiting_for_leases.is_none() {
                    info!(relay = %self.name, rows = backlog.leased, until = ?backlog.next_lease_end, "rows are held by another relay's claim; waiting for it to finish or its lease to end");
                    run.waiting_for_leases = Some(Instant::now());
                }
                let wait = backlog
                    .next_lease_end
                    .map(|end| (end - self.clock.now()).to_std().unwrap_or_default())
                    .unwrap_or(self.settings.relay.waiting_time)
                    .clamp(Duration::from_millis(10), self.settings.relay.waiting_time);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.wait() => return Ok(true),
                }
                continue;
            }
            run.report.unsent = backlog.pending;
            if backlog.pending > 0 {
                self.report_unsent(&backlog);
            }
            return Ok(true);
        }
    }

    fn report_unsent(&self, backlog: &Backlog) {
        let scheduled = backlog.pending - backlog.leased;
        warn!(
            relay = %self.name,
            scheduled_later = scheduled,
            held_by_another_relay = backlog.leased,
            next_attempt = ?backlog.next_due,
            "rows left unsent: they wait for a later attempt (see `outbox-cli status`) or another relay still holds them"
        );
    }

    /// Sleep until woken by NOTIFY, the next retry falls due, `waiting_time` passes, or shutdown.
    async fn idle(&self, shutdown: &mut Shutdown, wake: &Notify) {
        let mut wait = self.settings.relay.waiting_time;
        if let Ok(backlog) = self.store.backlog(self.clock.now()).await {
            for at in [backlog.next_due, backlog.next_lease_end]
                .into_iter()
                .flatten()
            {
                let until = (at - self.clock.now()).to_std().unwrap_or(Duration::ZERO);
                wait = wait.min(until.max(Duration::from_millis(1)));
            }
        }
        tokio::select! {
            () = wake.notified() => debug!("woken by NOTIFY"),
            () = tokio::time::sleep(wait) => {}
            () = shutdown.wait() => {}
        }
    }

    async fn log_progress(&self, run: &mut Run) {
        if run.last_progress.elapsed() < self.settings.relay.progress_interval {
            return;
        }
        let elapsed = run.last_progress.elapsed().as_secs_f64();
        let published = run.report.published - run.published_at_last_progress;
        run.last_progress = Instant::now();
        run.published_at_last_progress = run.report.published;
        match self.store.backlog(self.clock.now()).await {
            Ok(backlog) => {
                let oldest_age = backlog
                    .oldest
                    .map(|oldest| (self.clock.now() - oldest).to_std().unwrap_or_default());
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
                    published_total = run.report.published,
                    backlog = backlog.pending,
                    in_flight = run.window.len(),
                    oldest_pending = ?oldest_age.map(|d| Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
                    "relay progress"
                );
            }
            Err(err) => warn!(relay = %self.name, error = %report(&err), "cannot read the backlog"),
        }
    }

    #[cfg(not(feature = "postgres"))]
    fn spawn_listener(&self, _wake: &Arc<Notify>) -> Option<JoinHandle<()>> {
        None
    }

    #[cfg(feature = "postgres")]
    fn spawn_listener(&self, wake: &Arc<Notify>) -> Option<JoinHandle<()>> {
        if !self.settings.relay.listen || self.store.backend() != DbBackend::Postgres {
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

/// What ended a wait for outcomes.
enum Woke {
    Outcomes(std::result::Result<Result<Vec<(Uuid, Outcome)>>, tokio::time::error::Elapsed>),
    Written(Marked),
}

#[derive(Debug, Clone, Copy)]
enum Down {
    Broker,
    Database,
}

/// Loop state that survives iterations.
struct Run {
    publisher: Option<AnyPublisher>,
    window: Window,
    /// A claim made while the window waited for outcomes.
    ahead: Option<Claim>,
    /// Outcomes decided and not yet written.
    marking: Marking,
    /// Whether the last claim was full, i.e. more is probably due.
    backlog_left: bool,
    /// Bytes per row, from the claims so far (the larger of the last claim's
    /// mean and a running mean, so a claim of big rows shrinks the next).
    row_bytes: Option<usize>,
    backoff: Backoff,
    broker_down: Option<Instant>,
    database_down: Option<Instant>,
    waiting_for_leases: Option<Instant>,
    report: RelayReport,
    metrics: Arc<Metrics>,
    last_progress: Instant,
    published_at_last_progress: u64,
}

impl Run {
    fn new(settings: &Settings, metrics: Arc<Metrics>, marking: Marking) -> Run {
        Run {
            metrics,
            publisher: None,
            window: Window::default(),
            ahead: None,
            marking,
            backlog_left: true,
            row_bytes: None,
            backoff: Backoff::new(settings.broker.maximum_backoff),
            broker_down: None,
            database_down: None,
            waiting_for_leases: None,
            report: RelayReport::default(),
            last_progress: Instant::now(),
            published_at_last_progress: 0,
        }
    }

    /// How many rows the next claim may take: what keeps rows sent and not
    /// yet marked under `max_in_flight`, and bodies in flight under
    /// `max_in_flight_bytes` (estimated from the rows in flight).
    fn room(&self, settings: &Settings) -> Option<u32> {
        let relay = &settings.relay;
        let busy = self.window.len() + self.marking.rows();
        let count_room = (relay.max_in_flight as usize).saturating_sub(busy);
        let bytes = self.window.bytes();
        if bytes >= relay.max_in_flight_bytes {
            return None;
        }
        // Row sizes are known only once claimed: the first claim takes one
        // row, later ones as many as the sizes seen so far leave room for.
        let byte_room = match self.row_bytes {
            None => 1,
            Some(average) => ((relay.max_in_flight_bytes - bytes) / average.max(1)).max(1),
        };
        let room = count_room.min(byte_room).min(relay.batch_size as usize);
        u32::try_from(room).ok().filter(|room| *room > 0)
    }

    /// Write every mark decided so far.
    async fn finish_marking(&mut self) {
        let marked = self.marking.finish().await;
        self.counted(marked);
    }

    /// Count what the database took.
    fn counted(&mut self, marked: Marked) {
        self.report.published += marked.published;
        self.report.retried += marked.retried;
        self.report.failed += marked.failed;
        Metrics::add(&self.metrics.published, marked.published);
        Metrics::add(&self.metrics.retried, marked.retried);
        Metrics::add(&self.metrics.failed, marked.failed);
    }
}
