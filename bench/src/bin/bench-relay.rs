//! `bench-relay`: drain throughput of `Relay::run_until_empty` against raw
//! lapin publishing the same messages with publisher confirms, same run.
//!
//! Environment: `BENCH_N` (messages per run, 100000), `BENCH_ROUNDS` (rounds of
//! raw w1000 / relay per batch size, 3), `BENCH_BATCH_SIZES` (200,1000),
//! `BENCH_REF_WINDOWS` (reference raw windows run once, 100,1).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, ensure};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use outbox_bench::{
    Amqp, BenchDb, amqp_url, env_list, env_usize, finish, median, order_body,
    relay_like_properties, thousands, with_database, write_rows,
};
use outbox_core::{Relay, Shutdown};
use sea_orm::ConnectionTrait;

const QUEUE: &str = "outbox_bench_relay";
const BASE: &str = "/topic/bench.relay";
const ROUTING_KEY: &str = "bench.relay.v1";

/// Fill the outbox with `n` rows (not timed), drain it with the relay, verify.
async fn relay_run(bench: &BenchDb, amqp: &Amqp, n: usize, batch: usize) -> anyhow::Result<f64> {
    bench.db.execute_unprepared("TRUNCATE published").await?;
    write_rows(&bench.db, BASE, Some("v1"), n, 1000).await?;
    bench
        .db
        .execute_unprepared("VACUUM ANALYZE published")
        .await?;
    amqp.purge(QUEUE).await?;
    let mut settings = bench.settings();
    settings.relay.batch_size = u32::try_from(batch)?;
    let db = outbox_core::connect(&settings).await?;
    let start = Instant::now();
    let report = Relay::new(db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await?;
    let elapsed = start.elapsed().as_secs_f64();
    let _ = db.close().await;
    ensure!(
        report.published == n as u64 && report.retried == 0 && report.failed == 0,
        "relay report {report:?}, expected {n} published"
    );
    bench.expect_all_sent(n).await?;
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    Ok(n as f64 / elapsed)
}

/// Publish `n` persistent messages on one confirm-mode channel with at most
/// `window` unconfirmed; verify every confirm and the queue count.
async fn raw_run(amqp: &Amqp, n: usize, window: usize, headers: bool) -> anyhow::Result<f64> {
    amqp.purge(QUEUE).await?;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| serde_json::to_vec(&order_body(i)))
        .collect::<Result<_, _>>()?;
    let destination = format!("{BASE}.v1");
    let mut bad = 0_usize;
    let mut check = |confirmation: Confirmation| {
        if !matches!(confirmation, Confirmation::Ack(None)) {
            bad += 1;
        }
    };
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for body in &bodies {
        let properties = if headers {
            relay_like_properties(&destination)
        } else {
            BasicProperties::default().with_delivery_mode(2)
        };
        let confirm = channel
            .basic_publish(
                "amq.topic".into(),
                ROUTING_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties,
            )
            .await?;
        pending.push_back(confirm);
        if pending.len() >= window
            && let Some(oldest) = pending.pop_front()
        {
            check(oldest.await?);
        }
    }
    while let Some(confirm) = pending.pop_front() {
        check(confirm.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = connection.close(200, "bye".into()).await;
    if bad > 0 {
        bail!("raw lapin: {bad} of {n} messages were not acked cleanly");
    }
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    Ok(n as f64 / elapsed)
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 100_000)?;
    let rounds = env_usize("BENCH_ROUNDS", 3)?;
    let batches = env_list("BENCH_BATCH_SIZES", &[200, 1000])?;
    let windows = env_list("BENCH_REF_WINDOWS", &[100, 1])?;
    let body_len = serde_json::to_vec(&order_body(n / 2))?.len();
    println!(
        "method: N = {n} messages per run to amq.topic / {ROUTING_KEY}, bound to one durable \
         classic queue `{QUEUE}`; body ~{body_len} bytes of JSON; persistent, mandatory. \
         relay: outbox filled with write_all (1000 rows/statement, not timed), then \
         Relay::run_until_empty timed from call to return (includes broker connect), \
         batch sizes {batches:?}. raw: one lapin confirm-mode channel, same body and the \
         relay's properties (5 dop-* headers, message_id, correlation_id, content_type), \
         at most `window` unconfirmed. {rounds} rounds of raw w1000 + relay per batch size, \
         interleaved; median reported. After each run: queue holds exactly N, then purged; \
         relay runs also check report.published = N and every row status 2."
    );
    let amqp = Amqp::connect().await?;
    amqp.bound_queue(QUEUE, ROUTING_KEY, false).await?;
    let result = measure(bench, &amqp, n, rounds, &batches, &windows).await;
    amqp.delete(QUEUE).await?;
    amqp.close().await;
    result
}

async fn measure(
    bench: &BenchDb,
    amqp: &Amqp,
    n: usize,
    rounds: usize,
    batches: &[usize],
    windows: &[usize],
) -> anyhow::Result<()> {
    // runs[0] = raw w1000, runs[1..] = relay per batch size
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); 1 + batches.len()];
    for round in 0..rounds {
        let mut line = format!("round {}:", round + 1);
        for k in 0..runs.len() {
            let index = (round + k) % runs.len();
            let rate = if index == 0 {
                let rate = raw_run(amqp, n, 1000, true).await?;
                line.push_str(&format!("  raw w1000 {}/s", thousands(rate)));
                rate
            } else {
                let batch = batches[index - 1];
                let rate = relay_run(bench, amqp, n, batch).await?;
                line.push_str(&format!("  relay b{batch} {}/s", thousands(rate)));
                rate
            };
            runs[index].push(rate);
        }
        println!("{line}");
    }
    let mut references = Vec::new();
    for &window in windows {
        let rate = raw_run(amqp, n, window, true).await?;
        println!("reference: raw w{window} {}/s", thousands(rate));
        references.push((format!("raw lapin, window {window}"), rate));
    }
    let rate = raw_run(amqp, n, 1000, false).await?;
    println!("reference: raw w1000 without headers {}/s", thousands(rate));
    references.push((
        "raw lapin, window 1000, no headers/properties".to_owned(),
        rate,
    ));

    let raw = median(&runs[0]);
    println!();
    println!("| path | msg/s | runs | vs raw w1000 |");
    println!("|---|---:|---:|---:|");
    println!(
        "| raw lapin, window 1000 (median) | {} | {} | 1.00 |",
        thousands(raw),
        rounds
    );
    for (i, batch) in batches.iter().enumerate() {
        let m = median(&runs[i + 1]);
        println!(
            "| relay, batch_size {batch} (median) | {} | {} | {:.2} |",
            thousands(m),
            rounds,
            m / raw
        );
    }
    for (label, rate) in &references {
        println!("| {label} | {} | 1 | {:.2} |", thousands(*rate), rate / raw);
    }
    println!();
    for (i, batch) in batches.iter().enumerate() {
        let ratio = median(&runs[i + 1]) / raw;
        println!(
            "ratio relay(batch {batch}) / raw w1000 = {ratio:.3} (target >= 0.75): {}",
            if ratio >= 0.75 { "MET" } else { "NOT MET" }
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(with_database("relay", bench).await)
}
