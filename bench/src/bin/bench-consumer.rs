//! `bench-consumer`: messages/s through `outbox_core::Consumer` with a
//! callback that saves the payload (`received` row) in its transaction,
//! against raw lapin consuming the same messages (prefetch 100, manual ack),
//! same run.
//!
//! Environment: `BENCH_N` (messages per run, 100000), `BENCH_CONCURRENCY`
//! (handler concurrency values, 1,8,16), `BENCH_PREFETCH` (100).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use outbox_bench::{
    Amqp, BenchDb, CpuSnapshot, env_list, env_usize, finish, print_machine, relay_like_properties,
    thousands, undisturbed,
};
use outbox_core::{Consumer, Payload, shutdown_channel};
use tokio::sync::Notify;

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
    let concurrencies = env_list("BENCH_CONCURRENCY", &[1, 8, 16])?;
    let prefetch = env_usize("BENCH_PREFETCH", 100)?;
    print_machine();
    println!(
        "method: N = {n} persistent messages with the relay's properties (dop-* headers, unique dop-msg-id) published \
         to amq.topic / {ROUTING_KEY} into the queue `{QUEUE}` (declared by the consumer, as django-outbox-pattern declares it) \
         before each run (not timed). consumer: outbox_core::Consumer, prefetch {prefetch}, callback = begin; payload.save(txn) \
         (one `received` row per message, committed before the ack); timed from start until the callback saved N. \
         raw: one lapin consumer, prefetch {prefetch}, ack each delivery, no database; timed until N acked. \
         After each run: the queue is empty; consumer runs also check N rows with N distinct msg_ids."
    );
    let amqp = Amqp::connect().await?;
    let mut rows = Vec::new();
    let raw = undisturbed("raw lapin", async || {
        let bench = BenchDb::create("consumer").await?;
        let consumer = consumer_for(
            &bench,
            1,
            prefetch,
            Arc::new(AtomicU64::new(0)),
            Arc::new(Notify::new()),
            n,
        )?;
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
    for &concurrency in &concurrencies {
        let rate = undisturbed(
            &format!("consumer, concurrency {concurrency}"),
            async || {
                let bench = BenchDb::create("consumer").await?;
                let saved = Arc::new(AtomicU64::new(0));
                let done = Arc::new(Notify::new());
                let consumer = consumer_for(
                    &bench,
                    concurrency,
                    prefetch,
                    Arc::clone(&saved),
                    Arc::clone(&done),
                    n,
                )?;
                consumer.declare().await?;
                publish(&amqp, n).await?;
                let (stop, shutdown) = shutdown_channel();
                let before = CpuSnapshot::take();
                let started = Instant::now();
                let task = tokio::spawn(consumer.run(shutdown));
                tokio::time::timeout(Duration::from_secs(600), done.notified())
                    .await
                    .context("the consumer did not save every message in 10 minutes")?;
                let elapsed = started.elapsed().as_secs_f64();
                let after = CpuSnapshot::take();
                stop.trigger();
                let report = task.await??;
                println!(
                    "consumer, concurrency {concurrency}, prefetch {prefetch}: {}/s   CPU: {}",
                    thousands(n as f64 / elapsed),
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
                amqp.expect_count(QUEUE, 0).await?;
                bench.drop_database().await?;
                Ok((n as f64 / elapsed, after.other_share(&before, elapsed)))
            },
        )
        .await?;
        rows.push((
            format!("consumer + received row, concurrency {concurrency}"),
            rate,
        ));
    }
    amqp.delete(QUEUE).await?;
    amqp.delete(&format!("DLQ.{QUEUE}")).await?;
    println!();
    println!("| path | msg/s | vs raw lapin |");
    println!("|---|---:|---:|");
    for (path, rate) in &rows {
        println!("| {path} | {} | {:.2} |", thousands(*rate), rate / raw);
    }
    let best = rows.iter().skip(1).map(|(_, r)| *r).fold(0.0, f64::max);
    println!();
    println!(
        "best consumer rate {}/s (target >= 8,000 msg/s with concurrent handlers): {}",
        thousands(best),
        if best >= 8_000.0 { "MET" } else { "NOT MET" }
    );
    amqp.close().await;
    Ok(())
}

fn consumer_for(
    bench: &BenchDb,
    concurrency: usize,
    prefetch: usize,
    saved: Arc<AtomicU64>,
    done: Arc<Notify>,
    n: usize,
) -> anyhow::Result<Consumer> {
    let mut settings = bench.settings();
    settings.consumer.concurrency = concurrency;
    settings.consumer.prefetch = u16::try_from(prefetch)?;
    settings.database.max_connections = u32::try_from(concurrency.max(4) + 2)?;
    let db = bench.db.clone();
    Ok(Consumer::new(
        db,
        settings,
        DESTINATION,
        Some(QUEUE),
        move |payload: Payload| {
            let saved = Arc::clone(&saved);
            let done = Arc::clone(&done);
            async move {
                let txn = payload.begin().await?;
                let handled = payload.save(txn).await?;
                if saved.fetch_add(1, Ordering::SeqCst) + 1 == n as u64 {
                    done.notify_one();
                }
                Ok(handled)
            }
        },
    )?)
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
