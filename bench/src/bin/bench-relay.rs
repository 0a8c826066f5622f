//! `bench-relay`: drain throughput of `Relay::run_until_empty` against raw
//! lapin publishing the same messages with publisher confirms, same run.
//!
//! Environment: `BENCH_N` (messages per run, 100000), `BENCH_ROUNDS` (rounds of
//! raw w1000 bare, with the relay's properties, with the dop-* headers only, and the relay per
//! batch size, 3), `BENCH_BATCH_SIZES` (200,1000), `BENCH_REF_WINDOWS`
//! (reference raw windows run once, bare, 100,1), `BENCH_QUEUE_DURABLE` (1),
//! `BENCH_QUIET_WAIT` (seconds to wait for an idle machine, 600),
//! `BENCH_MAX_IN_FLIGHT` (the relay's `relay.max_in_flight`; its default).

use std::time::Instant;

use anyhow::ensure;
use lapin::BasicProperties;
use outbox_bench::{
    Amqp, BenchDb, CpuSnapshot, RawPublisher, dop_headers_only, env_list, env_usize, finish,
    median, order_body, percentile, queue_durable, relay_like_properties, thousands, undisturbed,
    with_database, write_rows,
};
use outbox_core::{Relay, Shutdown};
use sea_orm::ConnectionTrait;

const QUEUE: &str = "outbox_bench_relay";
const BASE: &str = "/topic/bench.relay";
const ROUTING_KEY: &str = "bench.relay.v1";

/// Fill the outbox with `n` rows (not timed), drain it with the relay, verify.
async fn relay_run(
    bench: &BenchDb,
    amqp: &Amqp,
    n: usize,
    batch: usize,
) -> anyhow::Result<(Run, f64)> {
    bench.db.execute_unprepared("TRUNCATE published").await?;
    write_rows(&bench.db, BASE, Some("v1"), n, 1000).await?;
    bench
        .db
        .execute_unprepared("VACUUM ANALYZE published")
        .await?;
    amqp.purge(QUEUE).await?;
    let mut settings = bench.settings();
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
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    Ok((
        Run {
            rate: n as f64 / elapsed,
            cpu,
            confirm_ms: Vec::new(),
        },
        other,
    ))
}

/// What a run measured.
struct Run {
    rate: f64,
    /// CPU seconds per process group during the timed part.
    cpu: String,
    /// Publish → confirm times in ms, sorted (raw window 1 only: there each one is a round trip).
    confirm_ms: Vec<f64>,
}

/// Publish `n` persistent messages on one confirm-mode channel with at most
/// `window` unconfirmed; verify every confirm and the queue count.
async fn raw_run(
    amqp: &Amqp,
    n: usize,
    window: usize,
    properties: Props,
) -> anyhow::Result<(Run, f64)> {
    amqp.purge(QUEUE).await?;
    let raw = RawPublisher::connect().await?;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| serde_json::to_vec(&order_body(i)))
        .collect::<Result<_, _>>()?;
    let destination = format!("{BASE}.v1");
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let published = raw
        .publish(ROUTING_KEY, &bodies, window, || match properties {
            Props::Bare => BasicProperties::default().with_delivery_mode(2),
            Props::Dop => dop_headers_only(&destination).0,
            Props::Relay => relay_like_properties(&destination),
        })
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let other = after.other_share(&cpu, elapsed);
    let cpu = after.describe(&cpu, elapsed);
    raw.close().await;
    let confirm_ms = published?;
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    Ok((
        Run {
            rate: n as f64 / elapsed,
            cpu,
            confirm_ms,
        },
        other,
    ))
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 100_000)?;
    let rounds = env_usize("BENCH_ROUNDS", 3)?;
    let batches = env_list("BENCH_BATCH_SIZES", &[200, 1000])?;
    let windows = env_list("BENCH_REF_WINDOWS", &[100, 1])?;
    let body_len = serde_json::to_vec(&order_body(n / 2))?.len();
    println!(
        "method: N = {n} messages per run to amq.topic / {ROUTING_KEY}, bound to one classic \
         queue `{QUEUE}` (durable: {durable}); body ~{body_len} bytes of JSON; persistent \
         (delivery_mode 2), mandatory. relay: outbox filled with write_all (1000 rows per \
         statement, not timed), then Relay::run_until_empty timed from call to return \
         (includes the broker connect), batch sizes {batches:?}. raw: one lapin confirm-mode \
         channel, the same bodies, at most `window` unconfirmed; two variants: `bare` = \
         delivery_mode 2 only (as briefed), `relay properties` = also the relay's 5 dop-* \
         headers, message_id, correlation_id, content_type (what the relay sends), `dop-* \
         headers only` = the 5 headers without the three properties (what the wire format \
         requires). \
         {rounds} rounds of raw bare w1000, raw relay-properties w1000, raw dop-* headers only w1000 and relay per batch \
         size, interleaved, order rotated; median reported; references run once. Before each \
         run: wait for an idle machine; a run during which other processes used > 10% of a \
         core is repeated. After each run: queue holds exactly N, then purged; relay runs also \
         check report.published = N, nothing retried or failed, every row status 2. CPU \
         seconds per process group from /proc over each timed part.",
        durable = queue_durable()
    );
    let amqp = Amqp::connect().await?;
    amqp.bound_queue(QUEUE, ROUTING_KEY, false).await?;
    let result = measure(bench, &amqp, n, rounds, &batches, &windows).await;
    amqp.delete(QUEUE).await?;
    amqp.close().await;
    result
}

/// What a raw message carries besides its body.
#[derive(Clone, Copy)]
enum Props {
    /// `delivery_mode 2` only.
    Bare,
    /// Also the five `dop-*` headers: what the wire format requires.
    Dop,
    /// Also `message_id`, `correlation_id` and `content_type`: what the relay sends.
    Relay,
}

/// One kind of timed run.
#[derive(Clone, Copy)]
enum Kind {
    Raw { window: usize, properties: Props },
    Relay { batch: usize },
}

impl Kind {
    fn label(self) -> String {
        match self {
            Kind::Raw { window, properties } => format!(
                "raw lapin, window {window}, {}",
                match properties {
                    Props::Bare => "bare",
                    Props::Dop => "dop-* headers only",
                    Props::Relay => "relay properties",
                }
            ),
            Kind::Relay { batch } => format!("relay, batch_size {batch}"),
        }
    }

    async fn run(self, bench: &BenchDb, amqp: &Amqp, n: usize) -> anyhow::Result<Run> {
        let label = self.label();
        match self {
            Kind::Raw { window, properties } => {
                undisturbed(&label, async || raw_run(amqp, n, window, properties).await).await
            }
            Kind::Relay { batch } => {
                undisturbed(&label, async || relay_run(bench, amqp, n, batch).await).await
            }
        }
    }
}

async fn measure(
    bench: &BenchDb,
    amqp: &Amqp,
    n: usize,
    rounds: usize,
    batches: &[usize],
    windows: &[usize],
) -> anyhow::Result<()> {
    let mut kinds = vec![
        Kind::Raw {
            window: 1000,
            properties: Props::Bare,
        },
        Kind::Raw {
            window: 1000,
            properties: Props::Relay,
        },
        Kind::Raw {
            window: 1000,
            properties: Props::Dop,
        },
    ];
    kinds.extend(batches.iter().map(|&batch| Kind::Relay { batch }));
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    for round in 0..rounds {
        for k in 0..kinds.len() {
            let index = (round + k) % kinds.len();
            let run = kinds[index].run(bench, amqp, n).await?;
            println!(
                "round {}: {} {}/s   CPU: {}",
                round + 1,
                kinds[index].label(),
                thousands(run.rate),
                run.cpu
            );
            runs[index].push(run.rate);
        }
    }
    let mut references = Vec::new();
    for &window in windows {
        let kind = Kind::Raw {
            window,
            properties: Props::Bare,
        };
        let run = kind.run(bench, amqp, n).await?;
        println!(
            "reference: {} {}/s   CPU: {}",
            kind.label(),
            thousands(run.rate),
            run.cpu
        );
        if window == 1 {
            let c = &run.confirm_ms;
            println!(
                "  one publish -> confirm (window 1): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                percentile(c, 50.0),
                percentile(c, 90.0),
                percentile(c, 99.0),
                percentile(c, 100.0)
            );
        }
        references.push((kind.label(), run.rate));
    }

    let medians: Vec<f64> = runs.iter().map(|r| median(r)).collect();
    let (bare, like) = (medians[0], medians[1]);
    println!();
    println!(
        "| path | msg/s (median of {rounds}) | min | max | vs raw w1000 bare | vs raw w1000 relay properties |"
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
    for (label, rate) in &references {
        println!(
            "| {label} (once) | {} | | | {:.2} | {:.2} |",
            thousands(*rate),
            rate / bare,
            rate / like
        );
    }
    println!();
    for (index, kind) in kinds.iter().enumerate().skip(3) {
        for (name, raw) in [("bare (as briefed)", bare), ("with relay properties", like)] {
            let ratio = medians[index] / raw;
            println!(
                "ratio {} / raw w1000 {name} = {ratio:.3} (target >= 0.75): {}",
                kind.label(),
                if ratio >= 0.75 { "MET" } else { "NOT MET" }
            );
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(with_database("relay", bench).await)
}
