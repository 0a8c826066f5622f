//! `bench-consumer-nats`: messages/s through `outbox_core::Consumer` over
//! NATS JetStream (a callback that writes one row of its own and saves the
//! payload's `received` row in the same transaction), against raw async-nats
//! pulling the same messages from a durable and acking each, same run.
//!
//! Environment: `BENCH_N` (messages per run, 50000), `BENCH_CONFIGS`
//! (`<batch_size>x<concurrency>` list, `1x1,32x1,32x2,64x2`), `BENCH_NATS_URL`
//! (nats://127.0.0.1:4222).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt as _;
use outbox_bench::{
    BenchDb, CpuSnapshot, env_usize, finish, nats_url, print_machine, thousands, undisturbed,
};
use outbox_core::{Consumer, Metrics, Payload, shutdown_channel};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use uuid::Uuid;

const STREAM: &str = "OUTBOX_BENCH_CONSUMER";
const PREFIX: &str = "outboxbenchc";
const DESTINATION: &str = "/topic/bench.consumer.v1";
const SUBJECT: &str = "outboxbenchc.bench.consumer.v1";
const DURABLE: &str = "outbox_bench_consumer";

fn settings(bench: &BenchDb) -> outbox_core::Settings {
    bench.nats_settings(STREAM, PREFIX)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    finish(run().await)
}

async fn run() -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 50_000)?;
    let configs = configs()?;
    print_machine();
    println!(
        "method: N = {n} messages with the relay's headers (dop-* and a unique Nats-Msg-Id) published to \
         {SUBJECT} in stream {STREAM} (file storage) before each run (not timed), the durable `{DURABLE}` \
         deleted first. consumer: outbox_core::Consumer over JetStream, callback = begin; INSERT one row \
         into bench_effects; payload.save(txn); timed from start until N saved. raw: one async-nats durable \
         pull consumer (explicit ack, max_ack_pending 1000), ack each message, no database; timed until N \
         acked. After each consumer run: N distinct msg_ids in received and N effect rows."
    );
    let client = async_nats::connect(nats_url())
        .await
        .context("connect to NATS")?;
    let context = jetstream::new(client);
    let mut rows = Vec::new();
    let setup = BenchDb::create("consumer_nats").await?;
    outbox_core::ensure_stream(&settings(&setup)).await?;
    setup.drop_database().await?;

    let raw = undisturbed("raw async-nats", async || {
        fill(&context, n).await?;
        let before = CpuSnapshot::take();
        let started = Instant::now();
        raw_consume(&context, n).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = CpuSnapshot::take();
        println!(
            "raw async-nats pull + ack: {}/s   CPU: {}",
            thousands(n as f64 / elapsed),
            after.describe(&before, elapsed)
        );
        Ok((n as f64 / elapsed, after.other_share(&before, elapsed)))
    })
    .await?;
    rows.push(("raw async-nats, pull and ack".to_owned(), raw));
    for &(batch, concurrency) in &configs {
        let label = format!("batch {batch}, concurrency {concurrency}");
        let rate = undisturbed(&format!("consumer, {label}"), async || {
            let bench = BenchDb::create("consumer_nats").await?;
            bench
                .db
                .execute_unprepared("CREATE TABLE bench_effects (id uuid PRIMARY KEY, msg_id text NOT NULL, amount bigint NOT NULL)")
                .await?;
            fill(&context, n).await?;
            let metrics = Arc::new(Metrics::default());
            let consumer = consumer_for(&bench, batch, concurrency, Arc::clone(&metrics))?;
            let (stop, shutdown) = shutdown_channel();
            let before = CpuSnapshot::take();
            let started = Instant::now();
            let task = tokio::spawn(consumer.run(shutdown));
            let deadline = started + Duration::from_secs(600);
            while Metrics::get(&metrics.consumed) < n as u64 {
                ensure!(Instant::now() < deadline, "the consumer did not save every message in 10 minutes");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let after = CpuSnapshot::take();
            stop.trigger();
            let report = task.await??;
            println!(
                "consumer, {label}: {}/s   CPU: {}",
                thousands(n as f64 / elapsed),
                after.describe(&before, elapsed)
            );
            ensure!(report.saved == n as u64 && report.dead_lettered == 0, "consumer report {report:?}");
            let stored = bench.scalar("SELECT COUNT(DISTINCT msg_id) FROM received").await?;
            ensure!(stored == n as i64, "{stored} distinct msg_ids in received, expected {n}");
            let effects = bench.scalar("SELECT COUNT(*) FROM bench_effects").await?;
            ensure!(effects == n as i64, "{effects} effect rows, expected {n}");
            bench.drop_database().await?;
            Ok((n as f64 / elapsed, after.other_share(&before, elapsed)))
        })
        .await?;
        rows.push((
            format!("consumer + effect row + received row, {label}"),
            rate,
        ));
    }
    let _ = context.delete_stream(STREAM).await;
    let _ = context.delete_stream(format!("{STREAM}_DLQ")).await;
    println!();
    println!("| path | msg/s | vs raw |");
    println!("|---|---:|---:|");
    for (path, rate) in &rows {
        println!("| {path} | {} | {:.2} |", thousands(*rate), rate / raw);
    }
    let best = rows.iter().skip(1).map(|(_, r)| *r).fold(0.0, f64::max);
    println!();
    println!(
        "best consumer rate {}/s = {:.2} of raw pull-and-ack",
        thousands(best),
        best / raw
    );
    Ok(())
}

/// `(batch_size, concurrency)` pairs from `BENCH_CONFIGS`.
fn configs() -> anyhow::Result<Vec<(usize, usize)>> {
    let text = std::env::var("BENCH_CONFIGS").unwrap_or_else(|_| "1x1,32x1,32x2,64x2".to_owned());
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
    metrics: Arc<Metrics>,
) -> anyhow::Result<Consumer> {
    let mut settings = settings(bench);
    settings.consumer.concurrency = concurrency;
    settings.consumer.batch_size = batch;
    settings.database.max_connections = u32::try_from(concurrency.max(4) + 2)?;
    Ok(Consumer::new(
        bench.db.clone(),
        settings,
        DESTINATION,
        Some(DURABLE),
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

/// Empty the stream, remove the durable, publish `n` relay-shaped messages.
async fn fill(context: &jetstream::Context, n: usize) -> anyhow::Result<()> {
    let stream = context.get_stream(STREAM).await?;
    let _ = stream.delete_consumer(DURABLE).await;
    stream.purge().await?;
    let mut pending = VecDeque::new();
    for i in 0..n {
        let id = Uuid::new_v4().to_string();
        let mut headers = HeaderMap::new();
        headers.insert("dop-msg-id", id.as_str());
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("dop-msg-destination", DESTINATION);
        headers.insert("dop-msg-type", "Published");
        headers.insert("dop-correlation-id", Uuid::new_v4().to_string().as_str());
        let body = serde_json::to_vec(&serde_json::json!({"id": i, "amount": i}))?;
        pending.push_back(
            context
                .publish_with_headers(SUBJECT, headers, body.into())
                .await?,
        );
        if pending.len() >= 1000
            && let Some(ack) = pending.pop_front()
        {
            ack.await?;
        }
    }
    while let Some(ack) = pending.pop_front() {
        ack.await?;
    }
    Ok(())
}

async fn raw_consume(context: &jetstream::Context, n: usize) -> anyhow::Result<()> {
    let stream = context.get_stream(STREAM).await?;
    let consumer = stream
        .get_or_create_consumer(
            DURABLE,
            pull::Config {
                durable_name: Some(DURABLE.to_owned()),
                filter_subject: SUBJECT.to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 1000,
                ..pull::Config::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    let mut acked = 0;
    while acked < n {
        let message = messages
            .next()
            .await
            .context("the pull stream ended")?
            .map_err(|err| anyhow::anyhow!("pull: {err}"))?;
        message
            .ack()
            .await
            .map_err(|err| anyhow::anyhow!("ack: {err}"))?;
        acked += 1;
    }
    Ok(())
}
