//! `bench-relay-wal`: log-tailing capture (`relay.capture = "wal"`) against
//! claiming (`claim`), same run, same rows, to NATS JetStream (file storage).
//!
//! 1. Drain: N rows of `published` written first (not timed; for `wal` after
//!    the slot exists), then the relay timed until every row is in the stream
//!    and marked SUCCEEDED. PostgreSQL CPU per 1,000 messages from /proc.
//! 2. Live: the relay running, a writer committing transactions of 10 rows
//!    at `BENCH_RATE` messages/s for `BENCH_LIVE_SECS`; a core NATS
//!    subscriber stamps each message's arrival: commit → published latency.
//!
//! Environment: `BENCH_N` (100000), `BENCH_ROUNDS` (3), `BENCH_RATE` (2000),
//! `BENCH_LIVE_SECS` (10), `BENCH_NATS_URL`, `BENCH_QUIET_WAIT`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use async_nats::jetstream;
use futures_util::StreamExt as _;
use outbox_bench::{
    BenchDb, CpuSnapshot, env_usize, finish, median, nats_url, order_body, percentile, thousands,
    undisturbed, with_database, write_rows,
};
use outbox_core::{Capture, Relay, Shutdown, shutdown_channel};
use sea_orm::{ConnectionTrait, TransactionTrait};

const STREAM: &str = "OUTBOX_BENCH_WAL";
const PREFIX: &str = "outboxbenchwal";
const BASE: &str = "/topic/bench.wal";
const SLOT: &str = "outbox_bench_wal";
const BATCH: u32 = 1000;

/// What is measured: claiming rows, or the stream carrying rows of
/// `published` (marked when sent) or `write_to_wal` messages (no row).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Claim,
    WalRows,
    WalMessages,
}

impl Mode {
    fn capture(self) -> Capture {
        match self {
            Mode::Claim => Capture::Claim,
            Mode::WalRows | Mode::WalMessages => Capture::Wal,
        }
    }
}

/// Write messages `from..to` the way `mode` emits them, in one transaction.
async fn emit(bench: &BenchDb, mode: Mode, from: usize, to: usize) -> anyhow::Result<Vec<String>> {
    let messages = (from..to)
        .map(|k| outbox_core::Message::new(BASE, order_body(k)))
        .collect::<outbox_core::Result<Vec<_>>>()?;
    let txn = bench.db.begin().await?;
    let rows = if mode == Mode::WalMessages {
        outbox_core::write_to_wal(&txn, messages).await?
    } else {
        outbox_core::write_all(&txn, messages).await?
    };
    txn.commit().await?;
    Ok(rows.into_iter().map(|r| r.id.to_string()).collect())
}

fn settings(bench: &BenchDb, capture: Capture) -> outbox_core::Settings {
    let mut settings = bench.nats_settings(STREAM, PREFIX);
    settings.relay.capture = capture;
    settings.relay.batch_size = BATCH;
    settings.wal.slot = SLOT.to_owned();
    settings
}

async fn stream_count(jetstream: &jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = jetstream.get_stream(STREAM).await?;
    Ok(stream.info().await?.state.messages)
}

/// A fresh slot (and publication) for `wal`, none for `claim`.
async fn reset(
    bench: &BenchDb,
    jetstream: &jetstream::Context,
    capture: Capture,
) -> anyhow::Result<()> {
    jetstream.get_stream(STREAM).await?.purge().await?;
    bench.db.execute_unprepared("TRUNCATE published").await?;
    let wal = settings(bench, Capture::Wal).wal;
    outbox_core::wal_drop(&bench.db, &wal).await?;
    if capture == Capture::Wal {
        outbox_core::wal_setup(&bench.db, &wal).await?;
    }
    Ok(())
}

async fn sent(bench: &BenchDb) -> anyhow::Result<i64> {
    bench
        .scalar("SELECT count(*) FROM published WHERE status = 2")
        .await
}

/// Drain N written rows; returns (msg/s, PostgreSQL CPU s per 1,000, CPU text, others' share).
async fn drain(
    bench: &BenchDb,
    jetstream: &jetstream::Context,
    mode: Mode,
    n: usize,
) -> anyhow::Result<((f64, f64, String), f64)> {
    let capture = mode.capture();
    reset(bench, jetstream, capture).await?;
    if mode == Mode::WalMessages {
        for from in (0..n).step_by(1000) {
            emit(bench, mode, from, (from + 1000).min(n)).await?;
        }
    } else {
        write_rows(&bench.db, BASE, Some("v1"), n, 1000).await?;
    }
    bench
        .db
        .execute_unprepared("VACUUM ANALYZE published")
        .await?;
    let settings = settings(bench, capture);
    let db = outbox_core::connect(&settings).await?;
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    match capture {
        Capture::Claim => {
            let report = Relay::new(db.clone(), settings)
                .run_until_empty(Shutdown::never())
                .await?;
            ensure!(
                report.published == n as u64,
                "claim relay report {report:?}"
            );
        }
        Capture::Wal => {
            let (trigger, shutdown) = shutdown_channel();
            let relay = tokio::spawn(Relay::new(db.clone(), settings).run(shutdown));
            let deadline = Instant::now() + Duration::from_secs(600);
            let rows = if mode == Mode::WalRows { n as i64 } else { 0 };
            while stream_count(jetstream).await? < n as u64 || sent(bench).await? < rows {
                ensure!(
                    Instant::now() < deadline,
                    "wal relay did not finish in 600 s"
                );
                ensure!(!relay.is_finished(), "the wal relay stopped early");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let elapsed = start.elapsed().as_secs_f64();
            let after = CpuSnapshot::take();
            trigger.trigger();
            relay.await??;
            let _ = db.close().await;
            return finish_drain(bench, jetstream, n, rows as usize, &cpu, &after, elapsed).await;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let _ = db.close().await;
    finish_drain(bench, jetstream, n, n, &cpu, &after, elapsed).await
}

async fn finish_drain(
    bench: &BenchDb,
    jetstream: &jetstream::Context,
    n: usize,
    rows: usize,
    cpu: &CpuSnapshot,
    after: &CpuSnapshot,
    elapsed: f64,
) -> anyhow::Result<((f64, f64, String), f64)> {
    let (seconds, _) = after.since(cpu);
    let postgres = seconds.get("postgres").copied().unwrap_or(0.0);
    bench.expect_all_sent(rows).await?;
    let stored = stream_count(jetstream).await?;
    ensure!(stored == n as u64, "stream holds {stored}, expected {n}");
    Ok((
        (
            n as f64 / elapsed,
            postgres * 1000.0 / n as f64,
            after.describe(cpu, elapsed),
        ),
        after.other_share(cpu, elapsed),
    ))
}

/// Commit → published latencies (ms, sorted) at a steady write rate.
async fn live(
    bench: &BenchDb,
    jetstream: &jetstream::Context,
    mode: Mode,
    rate: usize,
    secs: usize,
) -> anyhow::Result<Vec<f64>> {
    let capture = mode.capture();
    reset(bench, jetstream, capture).await?;
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let client = async_nats::connect(nats_url()).await?;
    let mut subscriber = client.subscribe(format!("{PREFIX}.>")).await?;
    let listener = {
        let arrivals = Arc::clone(&arrivals);
        tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                if let Some(id) = message.headers.as_ref().and_then(|h| h.get("dop-msg-id")) {
                    arrivals
                        .lock()
                        .expect("arrivals")
                        .insert(id.to_string(), Instant::now());
                }
            }
        })
    };
    client.flush().await?;
    let settings = settings(bench, capture);
    let db = outbox_core::connect(&settings).await?;
    let (trigger, shutdown) = shutdown_channel();
    let relay = tokio::spawn(Relay::new(db.clone(), settings).run(shutdown));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_txn = 10;
    let interval = Duration::from_secs_f64(per_txn as f64 / rate as f64);
    let mut ticker = tokio::time::interval(interval);
    let mut committed: HashMap<String, Instant> = HashMap::new();
    let total = rate * secs;
    let mut i = 0;
    while i < total {
        ticker.tick().await;
        let ids = emit(bench, mode, i, i + per_txn).await?;
        let now = Instant::now();
        committed.extend(ids.into_iter().map(|id| (id, now)));
        i += per_txn;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while arrivals.lock().expect("arrivals").len() < total {
        ensure!(
            Instant::now() < deadline,
            "not every live message arrived within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.trigger();
    relay.await??;
    listener.abort();
    let _ = db.close().await;
    let arrivals = arrivals.lock().expect("arrivals");
    let mut latencies: Vec<f64> = committed
        .iter()
        .filter_map(|(id, at)| {
            arrivals
                .get(id)
                .map(|got| got.saturating_duration_since(*at))
        })
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    ensure!(
        latencies.len() == total,
        "{} of {total} matched",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

fn label(mode: Mode) -> &'static str {
    match mode {
        Mode::Claim => "claim, rows (SKIP LOCKED + lease + mark, LISTEN)",
        Mode::WalRows => "wal, rows of published (+ mark)",
        Mode::WalMessages => "wal, write_to_wal messages (no row)",
    }
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let result = measure(bench).await;
    // A database with a slot cannot be dropped: the slot goes first, always.
    let dropped = outbox_core::wal_drop(&bench.db, &settings(bench, Capture::Wal).wal).await;
    result?;
    dropped?;
    Ok(())
}

async fn measure(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 100_000)?;
    let rounds = env_usize("BENCH_ROUNDS", 3)?;
    let rate = env_usize("BENCH_RATE", 2000)?;
    let secs = env_usize("BENCH_LIVE_SECS", 10)?;
    let mut setup = settings(bench, Capture::Wal);
    setup.nats.stream_storage = outbox_core::StreamStorage::File;
    outbox_core::ensure_stream(&setup).await?;
    let client = async_nats::connect(nats_url())
        .await
        .context("connect to NATS")?;
    let jetstream = jetstream::new(client);
    println!(
        "method: drain = N = {n} rows of published written with write_all (not timed; for wal after \
         a fresh slot exists), then the relay timed from start until the stream {STREAM} (file \
         storage) holds N and every row is SUCCEEDED; claim = run_until_empty, wal = run, stopped \
         once both hold (polled every 20 ms). batch_size {BATCH}. PostgreSQL CPU = CPU of all \
         postgres processes (walsender included) from /proc. {rounds} rounds, order alternated, \
         median. live = the relay running, a writer committing {rate} msg/s in transactions of \
         10 for {secs} s; latency = commit returned → a core NATS subscriber on {PREFIX}.> got \
         the message."
    );
    let modes = [Mode::Claim, Mode::WalRows, Mode::WalMessages];
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut pg: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for k in 0..modes.len() {
            let mode = modes[(round + k) % modes.len()];
            let name = label(mode);
            let (rate, pg_cpu, cpu) =
                undisturbed(name, async || drain(bench, &jetstream, mode, n).await).await?;
            println!(
                "round {}: {name}: {}/s, PostgreSQL {pg_cpu:.3} CPU s per 1,000   CPU: {cpu}",
                round + 1,
                thousands(rate)
            );
            rates.entry(name).or_default().push(rate);
            pg.entry(name).or_default().push(pg_cpu);
        }
    }
    let mut live_rows = Vec::new();
    for mode in modes {
        let latencies = live(bench, &jetstream, mode, rate, secs).await?;
        live_rows.push((
            label(mode),
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            latencies.last().copied().unwrap_or(0.0),
        ));
    }
    println!();
    println!(
        "| capture | drain msg/s (median of {rounds}) | PostgreSQL CPU s / 1,000 msg | live p50 ms | live p99 ms | live max ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (mode, (name, p50, p99, max)) in modes.iter().zip(&live_rows) {
        let name_ = label(*mode);
        println!(
            "| {name} | {} | {:.3} | {p50:.1} | {p99:.1} | {max:.1} |",
            thousands(median(&rates[name_])),
            median(&pg[name_])
        );
    }
    let claim = median(&rates[label(Mode::Claim)]);
    let pg_claim = median(&pg[label(Mode::Claim)]);
    println!();
    for (index, mode) in [Mode::WalRows, Mode::WalMessages].into_iter().enumerate() {
        let (wal, pg_wal) = (median(&rates[label(mode)]), median(&pg[label(mode)]));
        let p99 = live_rows[index + 1].2;
        println!(
            "{}: throughput {:.2} of claim (target >= 1: {}), PostgreSQL CPU per message {:.2} of claim (target < 1: {}), live p99 {p99:.1} ms (target <= 10: {})",
            label(mode),
            wal / claim,
            if wal >= claim { "MET" } else { "NOT MET" },
            pg_wal / pg_claim,
            if pg_wal < pg_claim { "MET" } else { "NOT MET" },
            if p99 <= 10.0 { "MET" } else { "NOT MET" }
        );
    }
    let _ = jetstream.delete_stream(STREAM).await;
    let _ = jetstream.delete_stream(format!("{STREAM}_DLQ")).await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    // A crashed run's slot would keep its database from being dropped.
    if let Ok(admin) = outbox_bench::connect(&outbox_bench::admin_url(), 1).await {
        let _ = admin
            .execute_unprepared(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{SLOT}' AND NOT active"
            ))
            .await;
    }
    finish(with_database("relay_wal", bench).await)
}
