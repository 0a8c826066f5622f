//! `bench-consumer`: messages/s through `outbox_core::Consumer` with a
//! callback that writes one row of its own and saves the payload
//! (`received` row) in the same transaction, against raw lapin consuming the
//! same messages (prefetch 100, manual ack), same run; per configuration the
//! p50/p99 handle latency (first delivery of a batch taken → settled).
//!
//! Environment: `BENCH_N` (messages per run, 100000), `BENCH_CONFIGS`
//! (`<batch_size>x<concurrency>` list, `1x1,1x8,16x2,32x1,32x2,64x2`),
//! `BENCH_PREFETCH` (100; raised by the consumer to 2 × batch × concurrency).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use outbox_bench::{
    Amqp, BenchDb, CpuSnapshot, env_usize, finish, print_machine, relay_like_properties, thousands,
    undisturbed,
};
use outbox_core::{Consumer, Metrics, Payload, shutdown_channel};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use uuid::Uuid;

const ROUTING_KEY: &str = "bench.consumer.v1";
const DESTINATION: &str = "/topic/bench.consumer.v1";
const QUEUE: &str = "outbox_bench_consumer";

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    finish(run().await)
}

async fn run() -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 100_000)?;
    let configs = configs()?;
    let prefetch = env_usize("BENCH_PREFETCH", 100)?;
    print_machine();
    println!(
        "method: N = {n} persistent messages with the relay's properties (dop-* headers, unique dop-msg-id) published \
         to amq.topic / {ROUTING_KEY} into the queue `{QUEUE}` (declared by the consumer, as django-outbox-pattern declares it) \
         before each run (not timed). consumer: outbox_core::Consumer, prefetch {prefetch} (raised to 2 x batch x concurrency), callback = begin; \
         INSERT one row into bench_effects; payload.save(txn) (its row and the `received` row committed together, before the ack); \
         timed from start until the last commit (the report counts N saved). \
         raw: one lapin consumer, prefetch {prefetch}, ack each delivery, no database; timed until N acked. \
         After each run: the queue is empty; consumer runs also check N rows with N distinct msg_ids and N effect rows."
    );
    let amqp = Amqp::connect().await?;
    let mut rows = Vec::new();
    let raw = undisturbed("raw lapin", async || {
        let bench = BenchDb::create("consumer").await?;
        let consumer = consumer_for(&bench, 1, 1, prefetch, Arc::new(Metrics::default()))?;
        consumer.declare().await?;
        publish(&amqp, n).await?;
        let before = CpuSnapshot::take();
        let started = Instant::now();
        raw_consume(&amqp, n, prefetch as u16).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = CpuSnapshot::take();
        println!(
            "raw lapin consume, prefetch {prefetch}: {}/s   CPU: {}",
            thousands(n as f64 / elapsed),
            after.describe(&before, elapsed)
        );
        amqp.expect_count(QUEUE, 0).await?;
        bench.drop_database().await?;
        Ok((n as f64 / elapsed, after.other_share(&before, elapsed)))
    })
    .await?;
    rows.push(("raw lapin, ack only".to_owned(), raw));
    let mut latencies = Vec::new();
    for &(batch, concurrency) in &configs {
        let label = format!("batch {batch}, concurrency {concurrency}");
        let (rate, p50, p99) = undisturbed(&format!("consumer, {label}"), async || {
            let bench = BenchDb::create("consumer").await?;
            bench
                .db
                .execute_unprepared("CREATE TABLE bench_effects (id uuid PRIMARY KEY, msg_id text NOT NULL, amount bigint NOT NULL)")
                .await?;
            let metrics = Arc::new(Metrics::default());
            let consumer = consumer_for(&bench, batch, concurrency, prefetch, Arc::clone(&metrics))?;
            consumer.declare().await?;
            publish(&amqp, n).await?;
            let (stop, shutdown) = shutdown_channel();
            let before = CpuSnapshot::take();
            let started = Instant::now();
            let task = tokio::spawn(consumer.run(shutdown));
            let deadline = started + Duration::from_secs(600);
            while Metrics::get(&metrics.consumed) < n as u64 {
                ensure!(
                    Instant::now() < deadline,
                    "the consumer did not save every message in 10 minutes"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let after = CpuSnapshot::take();
            stop.trigger();
            let report = task.await??;
            let p50 = metrics.handle_latency.quantile(0.50).unwrap_or_default();
            let p99 = metrics.handle_latency.quantile(0.99).unwrap_or_default();
            println!(
                "consumer, {label}: {}/s   handle p50 {:.2} ms p99 {:.2} ms   CPU: {}",
                thousands(n as f64 / elapsed),
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                after.describe(&before, elapsed)
            );
            ensure!(
                report.saved == n as u64 && report.dead_lettered == 0,
                "consumer report {report:?}"
            );
            let stored = bench
                .scalar("SELECT COUNT(DISTINCT msg_id) FROM received")
                .await?;
            ensure!(
                stored == n as i64,
                "{stored} distinct msg_ids in received, expected {n}"
            );
            let effects = bench.scalar("SELECT COUNT(*) FROM bench_effects").await?;
            ensure!(effects == n as i64, "{effects} effect rows, expected {n}");
            amqp.expect_count(QUEUE, 0).await?;
            bench.drop_database().await?;
            Ok((
                (n as f64 / elapsed, p50, p99),
                after.other_share(&before, elapsed),
            ))
        })
        .await?;
        rows.push((
            format!("consumer + effect row + received row, {label}"),
            rate,
        ));
        latencies.push((label, p50, p99));
    }
    amqp.delete(QUEUE).await?;
    amqp.delete(&format!("DLQ.{QUEUE}")).await?;
    println!();
    println!("| path | msg/s | vs raw lapin |");
    println!("|---|---:|---:|");
    for (path, rate) in &rows {
        println!("| {path} | {} | {:.2} |", thousands(*rate), rate / raw);
    }
    println!();
    println!("| configuration | handle p50 ms | handle p99 ms |");
    println!("|---|---:|---:|");
    for (label, p50, p99) in &latencies {
        println!(
            "| {label} | {:.2} | {:.2} |",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    let best = rows.iter().skip(1).map(|(_, r)| *r).fold(0.0, f64::max);
    println!();
    println!(
        "best consumer rate {}/s = {:.2} of raw (targets: >= 8,000 msg/s and >= 0.75 of raw): {}",
        thousands(best),
        best / raw,
        if best >= 8_000.0 && best / raw >= 0.75 {
            "MET"
        } else {
            "NOT MET"
        }
    );
    amqp.close().await;
    Ok(())
}

/// `(batch_size, concurrency)` pairs from `BENCH_CONFIGS`.
fn configs() -> anyhow::Result<Vec<(usize, usize)>> {
    let text =
        std::env::var("BENCH_CONFIGS").unwrap_or_else(|_| "1x1,1x8,16x2,32x1,32x2,64x2".to_owned());
    text.split(',')
        .map(|pair| {
            let (batch, concurrency) = pair
                .trim()
                .split_once('x')
                .context("BENCH_CONFIGS: expected <batch>x<concurrency>, e.g. 32x2")?;
            Ok((batch.parse()?, concurrency.parse()?))
        })
        .collect()
}

fn consumer_for(
    bench: &BenchDb,
    batch: usize,
    concurrency: usize,
    prefetch: usize,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Consumer> {
    let mut settings = bench.settings();
    settings.consumer.concurrency = concurrency;
    settings.consumer.batch_size = batch;
    settings.consumer.prefetch = u16::try_from(prefetch)?;
    settings.database.max_connections = u32::try_from(concurrency.max(4) + 2)?;
    let db = bench.db.clone();
    Ok(Consumer::new(
        db,
        settings,
        DESTINATION,
        Some(QUEUE),
        |payload: Payload| async move {
            let txn = payload.begin().await?;
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "INSERT INTO bench_effects (id, msg_id, amount) VALUES ($1, $2, $3)",
                [
                    Uuid::new_v4().into(),
                    payload.msg_id().unwrap_or_default().into(),
                    payload.body()["amount"].as_i64().unwrap_or(0).into(),
                ],
            ))
            .await?;
            Ok(payload.save(txn).await?)
        },
    )?
    .with_metrics(metrics))
}

/// Fill the queue with `n` messages shaped like the relay's (not timed).
async fn publish(amqp: &Amqp, n: usize) -> anyhow::Result<()> {
    let channel = amqp.connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let body = serde_json::to_vec(&outbox_bench::order_body(i))?;
        let confirm = channel
            .basic_publish(
                "amq.topic".into(),
                ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                &body,
                relay_like_properties(DESTINATION),
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= 1000
            && let Some(confirm) = pending.pop_front()
        {
            confirm.await?;
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    let _ = channel.close(200, "bye".into()).await;
    amqp.expect_count(QUEUE, n).await
}

async fn raw_consume(amqp: &Amqp, n: usize, prefetch: u16) -> anyhow::Result<()> {
    let channel = amqp.connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            QUEUE.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // BENCH_RAW_ACK_EVERY=k acks every k-th delivery with `multiple` (diagnostic).
    let every = env_usize("BENCH_RAW_ACK_EVERY", 1)?.max(1);
    let mut acked = 0;
    while acked < n {
        let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .context("raw consumer stalled")?
            .context("raw consumer ended")??;
        acked += 1;
        if acked % every == 0 || acked == n {
            delivery
                .acker
                .ack(BasicAckOptions {
                    multiple: every > 1,
                })
                .await?;
        }
    }
    let _ = channel.close(200, "bye".into()).await;
    Ok(())
}
