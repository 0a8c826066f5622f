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
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use outbox_bench::{Amqp, BenchDb, connect, env_usize, finish, percentile, with_database};
use outbox_core::{Message, Relay, shutdown_channel};
use sea_orm::{ConnectionTrait, TransactionTrait};
use tokio::time::MissedTickBehavior;

const QUEUE: &str = "outbox_bench_latency";
const BASE: &str = "/topic/bench.latency";

fn epoch_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

struct Outcome {
    /// Latencies in ms of the measured samples, sorted.
    latencies: Vec<f64>,
    /// Deliveries per sequence number (to catch duplicates).
    duplicates: usize,
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
) -> anyhow::Result<Outcome> {
    let routing_key = format!("bench.latency.{run_id}");
    amqp.bound_queue(QUEUE, &routing_key, false).await?;
    let total = warmup + n;

    // Consumer: record the wall clock on arrival, per sequence number.
    let received: Arc<Mutex<HashMap<usize, Vec<i64>>>> = Arc::default();
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

    let map = received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    if map.len() != total {
        bail!("{} of {total} messages arrived", map.len());
    }
    let duplicates = map.values().map(|v| v.len() - 1).sum();
    let mut latencies: Vec<f64> = (warmup..total)
        .map(|seq| (map[&seq][0] - committed[seq]) as f64 / 1000.0)
        .collect();
    latencies.sort_by(f64::total_cmp);
    amqp.delete(QUEUE).await?;
    Ok(Outcome {
        latencies,
        duplicates,
    })
}

fn row(label: &str, outcome: &Outcome) -> String {
    let l = &outcome.latencies;
    format!(
        "| {label} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        l.len(),
        l[0],
        percentile(l, 50.0),
        percentile(l, 90.0),
        percentile(l, 99.0),
        l[l.len() - 1],
        l.iter().sum::<f64>() / l.len() as f64,
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
         pre-commit time). Consumer: lapin basic.consume on a durable queue bound to the \
         routing key, no-ack, prefetch 1000; wall clock on arrival. Latency = arrival - \
         commit return. {warmup} warm-up samples first, not counted. Verified: every message \
         arrived exactly once, every row status 2, relay report published = samples."
    );
    let amqp = Amqp::connect().await?;
    let listen = run(bench, &amqp, true, "listen", warmup, n, interval).await?;
    let poll = run(bench, &amqp, false, "poll", warmup, poll_n, interval).await?;
    amqp.close().await;
    ensure!(
        listen.duplicates == 0 && poll.duplicates == 0,
        "duplicate deliveries: {} with LISTEN, {} polling",
        listen.duplicates,
        poll.duplicates
    );
    println!();
    println!("| wake-up | samples | min ms | p50 ms | p90 ms | p99 ms | max ms | mean ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    println!("{}", row("LISTEN/NOTIFY (default)", &listen));
    println!(
        "{}",
        row("polling (relay.listen = false, waiting_time 1 s)", &poll)
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
