//! `bench-latency`: commit → consumer latency with an idle relay.
//!
//! `Relay::run` runs in the background; a lapin consumer reads a queue bound
//! to the destination; a writer commits one outbox row at a time, every
//! `BENCH_INTERVAL_MS`. The writer takes the wall clock (epoch µs) right after
//! `COMMIT` returns; the consumer takes it when the delivery arrives; the
//! latency is the difference (one process, one clock).
//!
//! Environment: `BENCH_N` (samples with LISTEN, 2000), `BENCH_POLL_N` (samples
//! with polling, 200), `BENCH_WARMUP` (unmeasured samples first, 20),
//! `BENCH_INTERVAL_MS` (5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use futures_util::StreamExt as _;
use lapin::Confirmation;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use outbox_bench::{
    Amqp, BenchDb, CpuSnapshot, connect, env_usize, finish, percentile, queue_durable,
    relay_like_properties, undisturbed, with_database,
};
use outbox_core::{Message, Relay, shutdown_channel};
use sea_orm::{ConnectionTrait as _, TransactionTrait};
use tokio::time::MissedTickBehavior;

const QUEUE: &str = "outbox_bench_latency";
const BASE: &str = "/topic/bench.latency";

fn epoch_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

struct Outcome {
    /// CPU per process group while the writer ran.
    cpu: String,
    /// Latencies in ms of the measured samples, sorted.
    latencies: Vec<f64>,
    /// Deliveries per sequence number (to catch duplicates).
    duplicates: usize,
    /// Samples above 10 ms: (seconds since the first measured commit, ms).
    outliers: Vec<(f64, f64)>,
}

type Arrivals = Arc<Mutex<HashMap<usize, Vec<i64>>>>;

/// A consumer on [`QUEUE`] recording the wall clock on arrival per sequence
/// number, until `total` distinct ones arrived.
async fn consume(
    amqp: &Amqp,
    run_id: &str,
    total: usize,
) -> anyhow::Result<(
    tokio::task::JoinHandle<anyhow::Result<()>>,
    Arrivals,
    lapin::Channel,
)> {
    let received: Arrivals = Arc::default();
    let channel = amqp.connection.create_channel().await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            format!("bench-{run_id}").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let sink = Arc::clone(&received);
    let consuming = tokio::spawn(async move {
        while let Some(delivery) = consumer.next().await {
            let at = epoch_micros();
            let delivery = delivery?;
            let body: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            let seq = body["seq"].as_u64().context("body without seq")? as usize;
            let mut map = sink.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            map.entry(seq).or_default().push(at);
            if map.len() >= total {
                break;
            }
        }
        anyhow::Ok(())
    });
    Ok((consuming, received, channel))
}

/// Outliers as `(count): +<s since the first measured commit> <ms>, …`, the first 40.
fn shown_outliers(outliers: &[(f64, f64)]) -> String {
    let shown: Vec<String> = outliers
        .iter()
        .take(40)
        .map(|(at, ms)| format!("+{at:.2}s {ms:.1}ms"))
        .collect();
    format!("({}) {}", outliers.len(), shown.join(", "))
}

/// Latencies (sorted), duplicates and outliers from send instants and arrivals.
fn outcome(
    cpu: String,
    map: &HashMap<usize, Vec<i64>>,
    sent: &[i64],
    warmup: usize,
) -> anyhow::Result<Outcome> {
    let total = sent.len();
    if map.len() != total {
        bail!("{} of {total} messages arrived", map.len());
    }
    let duplicates = map.values().map(|v| v.len() - 1).sum();
    let mut latencies: Vec<f64> = (warmup..total)
        .map(|seq| (map[&seq][0] - sent[seq]) as f64 / 1000.0)
        .collect();
    let outliers = (warmup..total)
        .map(|seq| {
            (
                (sent[seq] - sent[warmup]) as f64 / 1e6,
                latencies[seq - warmup],
            )
        })
        .filter(|(_, ms)| *ms > 10.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(Outcome {
        cpu,
        latencies,
        duplicates,
        outliers,
    })
}

/// The broker alone: one confirmed publish every `interval` straight to the
/// queue (no database, no relay); latency = arrival - just before publish.
async fn raw_run(
    amqp: &Amqp,
    run_id: &str,
    warmup: usize,
    n: usize,
    interval: Duration,
) -> anyhow::Result<(Outcome, f64)> {
    let routing_key = format!("bench.latency.{run_id}");
    amqp.bound_queue(QUEUE, &routing_key, false).await?;
    let total = warmup + n;
    let (consuming, received, channel) = consume(amqp, run_id, total).await?;
    let publisher = amqp.connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut sent = Vec::with_capacity(total);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let cpu = CpuSnapshot::take();
    let started = std::time::Instant::now();
    let mut bad = 0;
    for seq in 0..total {
        ticks.tick().await;
        let body = serde_json::to_vec(&serde_json::json!({ "seq": seq }))?;
        sent.push(epoch_micros());
        let confirm = publisher
            .basic_publish(
                "amq.topic".into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                relay_like_properties(&format!("{BASE}.{run_id}")),
            )
            .await?;
        bad += usize::from(!matches!(confirm.await?, Confirmation::Ack(None)));
    }
    let consumed = match tokio::time::timeout(Duration::from_secs(15), consuming).await {
        Ok(joined) => joined?,
        Err(_) => Err(anyhow::anyhow!("timed out waiting for deliveries")),
    };
    let wall = started.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let other = after.other_share(&cpu, wall);
    let _ = publisher.close(200, "bye".into()).await;
    let _ = channel.close(200, "bye".into()).await;
    consumed?;
    ensure!(bad == 0, "{bad} publishes not acked cleanly");
    amqp.expect_count(QUEUE, 0).await?;
    let map = std::mem::take(&mut *received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let result = outcome(after.describe(&cpu, wall), &map, &sent, warmup)?;
    amqp.delete(QUEUE).await?;
    Ok((result, other))
}

/// One configuration: `warmup + n` commits, one every `interval`.
async fn run(
    bench: &BenchDb,
    amqp: &Amqp,
    listen: bool,
    run_id: &str,
    warmup: usize,
    n: usize,
    interval: Duration,
) -> anyhow::Result<(Outcome, f64)> {
    let routing_key = format!("bench.latency.{run_id}");
    amqp.bound_queue(QUEUE, &routing_key, false).await?;
    let total = warmup + n;

    let (consuming, received, channel) = consume(amqp, run_id, total).await?;

    // Relay: idle, woken by NOTIFY (or polling every waiting_time).
    let mut settings = bench.settings();
    settings.relay.listen = listen;
    let relay_db = outbox_core::connect(&settings).await?;
    let (trigger, shutdown) = shutdown_channel();
    let relay = tokio::spawn(Relay::new(relay_db.clone(), settings).run(shutdown));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Writer: one committed row per tick.
    let writer = connect(&bench.url, 1).await?;
    let mut committed = Vec::with_capacity(total);
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let destination = format!("{BASE}.{run_id}");
    let cpu = CpuSnapshot::take();
    let started = std::time::Instant::now();
    for seq in 0..total {
        ticks.tick().await;
        let message = Message::new(
            &destination,
            serde_json::json!({ "seq": seq, "written_at_us": epoch_micros() }),
        )?;
        let txn = writer.begin().await?;
        outbox_core::write(&txn, message).await?;
        txn.commit().await?;
        committed.push(epoch_micros());
    }

    // Everything arrives (polling may take up to waiting_time more).
    let waited = tokio::time::timeout(Duration::from_secs(15), consuming).await;
    let wall = started.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let other = after.other_share(&cpu, wall);
    let cpu = after.describe(&cpu, wall);
    let consumed = match waited {
        Ok(joined) => joined?,
        Err(_) => Err(anyhow::anyhow!("timed out waiting for deliveries")),
    };
    // Marking is asynchronous: give it a moment, then check the rows.
    let mut sent = 0;
    for _ in 0..50 {
        sent = bench
            .scalar(&format!(
                "SELECT COUNT(*) FROM published WHERE status = 2 AND destination = '{destination}'"
            ))
            .await?;
        if sent == total as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if std::env::var("BENCH_SHOW_CONNECTIONS").is_ok_and(|v| v == "1") {
        // Diagnostic: when each connection to this database was opened,
        // relative to the first measured commit.
        let rows = bench
            .db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!(
                    "SELECT pid, (extract(epoch FROM backend_start) * 1e6)::bigint AS started, \
                     left(coalesce(query, ''), 40) AS query FROM pg_stat_activity \
                     WHERE datname = '{}' ORDER BY backend_start",
                    bench.name
                ),
            ))
            .await?;
        for row in rows {
            let started: i64 = row.try_get("", "started")?;
            let pid: i32 = row.try_get("", "pid")?;
            let query: String = row.try_get("", "query")?;
            println!(
                "  connection pid {pid} opened at {:+.3} s: last query {query:?}",
                (started - committed[warmup.min(total - 1)]) as f64 / 1e6
            );
        }
    }
    trigger.trigger();
    let report = relay.await??;
    let _ = relay_db.close().await;
    let _ = writer.close().await;
    let _ = channel.close(200, "bye".into()).await;
    consumed?;
    ensure!(
        sent == total as i64,
        "{sent} of {total} rows marked sent (status 2)"
    );
    ensure!(
        report.published == total as u64 && report.failed == 0 && report.retried == 0,
        "relay report {report:?}, expected {total} published"
    );
    amqp.expect_count(QUEUE, 0).await?;

    let map = std::mem::take(&mut *received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let result = outcome(cpu, &map, &committed, warmup)?;
    amqp.delete(QUEUE).await?;
    Ok((result, other))
}

fn row(label: &str, outcome: &Outcome) -> String {
    let l = &outcome.latencies;
    format!(
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
        l.len(),
        l[0],
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        l[l.len() - 1],
        l.iter().sum::<f64>() / l.len() as f64,
        l.iter().filter(|&&ms| ms > 10.0).count(),
    )
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 2000)?;
    let poll_n = env_usize("BENCH_POLL_N", 200)?;
    let warmup = env_usize("BENCH_WARMUP", 20)?;
    let interval = Duration::from_millis(env_usize("BENCH_INTERVAL_MS", 5)? as u64);
    println!(
        "method: Relay::run in the background (default settings; LISTEN/NOTIFY on, then \
         relay.listen = false with waiting_time 1 s), idle for 1.5 s before the writer starts. \
         Writer: one transaction per row (BEGIN; outbox_core::write; COMMIT) every {interval:?} \
         on its own connection; it takes the wall clock (epoch µs) right after COMMIT returns \
         and keeps it by sequence number (the body carries the sequence number and the \
         pre-commit time). Consumer: lapin basic.consume on a queue (durable: {durable}) \
         bound to the routing key, no-ack, prefetch 1000; wall clock on arrival. Latency = arrival - \
         commit return. {warmup} warm-up samples first, not counted. Verified: every message \
         arrived exactly once, every row status 2, relay report published = samples. \
         A run during which other processes used > 10% of a core is repeated.",
        durable = queue_durable()
    );
    let amqp = Amqp::connect().await?;
    let mut attempt = 0;
    let listen = undisturbed("LISTEN run", async || {
        attempt += 1;
        let id = format!("listen{attempt}");
        run(bench, &amqp, true, &id, warmup, n, interval).await
    })
    .await?;
    println!("LISTEN run CPU: {}", listen.cpu);
    println!(
        "LISTEN samples above 10 ms, at time since the first measured commit: {}",
        shown_outliers(&listen.outliers)
    );
    let poll = undisturbed("polling run", async || {
        attempt += 1;
        let id = format!("poll{attempt}");
        run(bench, &amqp, false, &id, warmup, poll_n, interval).await
    })
    .await?;
    println!("polling run CPU: {}", poll.cpu);
    let raw = undisturbed("raw run", async || {
        attempt += 1;
        let id = format!("raw{attempt}");
        raw_run(&amqp, &id, warmup, n, interval).await
    })
    .await?;
    println!("raw run CPU: {}", raw.cpu);
    println!("raw samples above 10 ms: {}", shown_outliers(&raw.outliers));
    amqp.close().await;
    ensure!(
        listen.duplicates == 0 && poll.duplicates == 0 && raw.duplicates == 0,
        "duplicate deliveries: {} with LISTEN, {} polling",
        listen.duplicates,
        poll.duplicates
    );
    println!();
    println!(
        "| wake-up | samples | min ms | p50 ms | p90 ms | p99 ms | max ms | mean ms | > 10 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!("{}", row("LISTEN/NOTIFY (default)", &listen));
    println!(
        "{}",
        row("polling (relay.listen = false, waiting_time 1 s)", &poll)
    );
    println!(
        "{}",
        row(
            "reference: raw lapin publish -> consumer, no database (confirm awaited)",
            &raw
        )
    );
    let p99 = percentile(&listen.latencies, 99.0);
    println!();
    println!(
        "p99 with LISTEN = {p99:.2} ms (target <= 10 ms): {}",
        if p99 <= 10.0 { "MET" } else { "NOT MET" }
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(with_database("latency", bench).await)
}
