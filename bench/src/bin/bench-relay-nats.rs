//! `bench-relay-nats`: drain throughput of `Relay::run_until_empty` to NATS
//! JetStream against raw async-nats publishing the same messages with a
//! window of 1,000 un-awaited PubAcks, same run.
//!
//! Environment: `BENCH_N` (messages per run, 100000), `BENCH_ROUNDS` (3),
//! `BENCH_BATCH_SIZES` (200,1000), `BENCH_NATS_URL` (nats://127.0.0.1:4222),
//! `BENCH_QUIET_WAIT` (seconds to wait for an idle machine, 600),
//! `BENCH_MAX_IN_FLIGHT` (the relay's `relay.max_in_flight`; its default).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream;
use outbox_bench::{
    BenchDb, CpuSnapshot, env_list, env_usize, finish, median, nats_url, order_body, thousands,
    undisturbed, with_database, write_rows,
};
use outbox_core::{Relay, Shutdown};
use sea_orm::ConnectionTrait;

const STREAM: &str = "OUTBOX_BENCH_RELAY";
const PREFIX: &str = "outboxbench";
const BASE: &str = "/topic/bench.relay";
const SUBJECT: &str = "outboxbench.bench.relay.v1";
const WINDOW: usize = 1000;

fn settings(bench: &BenchDb) -> outbox_core::Settings {
    bench.nats_settings(STREAM, PREFIX)
}

struct Nats {
    jetstream: jetstream::Context,
}

impl Nats {
    async fn connect() -> anyhow::Result<Nats> {
        let client = async_nats::connect(nats_url())
            .await
            .context("connect to NATS (BENCH_NATS_URL)")?;
        Ok(Nats {
            jetstream: jetstream::new(client),
        })
    }

    async fn purge(&self) -> anyhow::Result<()> {
        let stream = self.jetstream.get_stream(STREAM).await?;
        stream.purge().await?;
        Ok(())
    }

    async fn expect_count(&self, n: usize) -> anyhow::Result<()> {
        let mut stream = self.jetstream.get_stream(STREAM).await?;
        let messages = stream.info().await?.state.messages;
        ensure!(
            messages == n as u64,
            "stream {STREAM} holds {messages} messages, expected {n}"
        );
        Ok(())
    }
}

/// The headers a relayed row carries (five dop-* plus Nats-Msg-Id).
fn relay_like_headers(id: &str, destination: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "dop-correlation-id",
        uuid::Uuid::new_v4().to_string().as_str(),
    );
    headers.insert("dop-msg-destination", destination);
    headers.insert("dop-msg-id", id);
    headers.insert("dop-msg-sent-time", "2026-12-01T12:00:00.000Z");
    headers.insert("dop-msg-type", "Published");
    headers.insert("Nats-Msg-Id", id);
    headers
}

/// Publish `n` messages with at most `WINDOW` PubAcks outstanding.
async fn raw_run(nats: &Nats, n: usize, headers: bool) -> anyhow::Result<(f64, String, f64)> {
    nats.purge().await?;
    let client = async_nats::connect(nats_url()).await?;
    let context = jetstream::new(client);
    let bodies: Vec<bytes::Bytes> = (0..n)
        .map(|i| serde_json::to_vec(&order_body(i)).map(bytes::Bytes::from))
        .collect::<Result<_, _>>()?;
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let destination = format!("{BASE}.v1");
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let mut pending = VecDeque::with_capacity(WINDOW);
    for (body, id) in bodies.into_iter().zip(&ids) {
        let ack = if headers {
            context
                .publish_with_headers(SUBJECT, relay_like_headers(id, &destination), body)
                .await?
        } else {
            context.publish(SUBJECT, body).await?
        };
        pending.push_back(ack);
        if pending.len() >= WINDOW
            && let Some(oldest) = pending.pop_front()
        {
            oldest.await?;
        }
    }
    while let Some(ack) = pending.pop_front() {
        ack.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let other = after.other_share(&cpu, elapsed);
    let cpu = after.describe(&cpu, elapsed);
    nats.expect_count(n).await?;
    Ok((n as f64 / elapsed, cpu, other))
}

async fn relay_run(
    bench: &BenchDb,
    nats: &Nats,
    n: usize,
    batch: usize,
) -> anyhow::Result<(f64, String, f64)> {
    nats.purge().await?;
    bench.db.execute_unprepared("TRUNCATE published").await?;
    write_rows(&bench.db, BASE, Some("v1"), n, 1000).await?;
    bench
        .db
        .execute_unprepared("VACUUM ANALYZE published")
        .await?;
    let mut settings = settings(bench);
    settings.relay.batch_size = u32::try_from(batch)?;
    if let Ok(window) = std::env::var("BENCH_MAX_IN_FLIGHT") {
        settings.relay.max_in_flight = window.parse()?;
    }
    let db = outbox_core::connect(&settings).await?;
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let report = Relay::new(db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await?;
    let elapsed = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let other = after.other_share(&cpu, elapsed);
    let cpu = after.describe(&cpu, elapsed);
    let _ = db.close().await;
    ensure!(
        report.published == n as u64 && report.retried == 0 && report.failed == 0,
        "relay report {report:?}, expected {n} published"
    );
    bench.expect_all_sent(n).await?;
    nats.expect_count(n).await?;
    Ok((n as f64 / elapsed, cpu, other))
}

#[derive(Clone, Copy)]
enum Kind {
    Raw { headers: bool },
    Relay { batch: usize },
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Raw { headers } => format!(
                "raw async-nats, window {WINDOW}, {}",
                if headers { "relay headers" } else { "bare" }
            ),
            Kind::Relay { batch } => format!("relay, batch_size {batch}"),
        }
    }
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 100_000)?;
    let rounds = env_usize("BENCH_ROUNDS", 3)?;
    let batches = env_list("BENCH_BATCH_SIZES", &[200, 1000])?;
    let body_len = serde_json::to_vec(&order_body(n / 2))?.len();
    let mut setup = settings(bench);
    setup.nats.stream_storage = outbox_core::StreamStorage::File;
    outbox_core::ensure_stream(&setup).await?;
    println!(
        "method: N = {n} messages per run to JetStream subject {SUBJECT}, stream {STREAM} \
         (file storage, default sync), body ~{body_len} bytes of JSON. relay: outbox filled \
         with write_all (not timed), then Relay::run_until_empty timed from call to return \
         (includes the connect), nats.publish_window 1000, batch sizes {batches:?}. raw: one \
         async-nats JetStream context, the same bodies, at most {WINDOW} PubAcks outstanding; \
         `bare` = no headers, `relay headers` = the relay's 5 dop-* headers and Nats-Msg-Id. \
         {rounds} rounds interleaved, order rotated; median reported. Before each run: stream \
         purged, wait for an idle machine; a disturbed run (> 10% of a core used by others) is \
         repeated. After each run: the stream holds exactly N."
    );
    let nats = Nats::connect().await?;
    let mut kinds = vec![Kind::Raw { headers: false }, Kind::Raw { headers: true }];
    kinds.extend(batches.iter().map(|&batch| Kind::Relay { batch }));
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for k in 0..kinds.len() {
            let index = (round + k) % kinds.len();
            let kind = kinds[index];
            let label = kind.label();
            let (rate, cpu) = match kind {
                Kind::Raw { headers } => {
                    undisturbed(&label, async || {
                        let (rate, cpu, other) = raw_run(&nats, n, headers).await?;
                        Ok(((rate, cpu), other))
                    })
                    .await?
                }
                Kind::Relay { batch } => {
                    undisturbed(&label, async || {
                        let (rate, cpu, other) = relay_run(bench, &nats, n, batch).await?;
                        Ok(((rate, cpu), other))
                    })
                    .await?
                }
            };
            println!(
                "round {}: {label} {}/s   CPU: {cpu}",
                round + 1,
                thousands(rate)
            );
            runs[index].push(rate);
        }
    }
    let medians: Vec<f64> = runs.iter().map(|r| median(r)).collect();
    let (bare, like) = (medians[0], medians[1]);
    println!();
    println!(
        "| path | msg/s (median of {rounds}) | min | max | vs raw bare | vs raw relay headers |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (index, kind) in kinds.iter().enumerate() {
        let r = &runs[index];
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} |",
            kind.label(),
            thousands(medians[index]),
            thousands(r.iter().copied().fold(f64::INFINITY, f64::min)),
            thousands(r.iter().copied().fold(0.0, f64::max)),
            medians[index] / bare,
            medians[index] / like
        );
    }
    println!();
    for (index, kind) in kinds.iter().enumerate().skip(2) {
        let ratio = medians[index] / bare;
        println!(
            "ratio {} / raw window {WINDOW} bare = {ratio:.3} (target >= 0.75): {}",
            kind.label(),
            if ratio >= 0.75 { "MET" } else { "NOT MET" }
        );
    }
    nats.purge().await?;
    let _ = nats.jetstream.delete_stream(STREAM).await;
    let _ = nats.jetstream.delete_stream(format!("{STREAM}_DLQ")).await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(with_database("relay_nats", bench).await)
}
