//! `bench-memory`: peak RSS and drain rate of the release `outbox-cli publish
//! --until-empty` draining a large backlog, against a small one.
//!
//! Build the CLI first: `cargo build --release -p outbox-cli`.
//!
//! Environment: `BENCH_N` (large backlog, 1000000), `BENCH_SMALL_N` (100000),
//! `BENCH_PROBE_N` (raw lapin messages published into the empty queue and
//! into the queue holding the large backlog, to tell a slower broker from a
//! slower database; 50000, 0 skips),
//! `BENCH_TABLE_SET` (storage parameters for `published`, e.g.
//! `fillfactor=50`, applied after migrate), `BENCH_OUTBOX_CLI` (path of the binary; default `target/release/outbox-cli`
//! of this workspace), `BENCH_CHILD_LOG` (its `RUST_LOG`, default
//! `warn,outbox_core=info`), `BENCH_SHOW_CHILD_LOG=1` (print all of its log).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use outbox_bench::{
    Amqp, BenchDb, CpuSnapshot, RawPublisher, amqp_url, env_usize, fill_rows_sql, finish,
    order_body, relay_like_properties, thousands, undisturbed, wait_quiet,
};
use sea_orm::ConnectionTrait;
use tokio::io::{AsyncBufReadExt as _, BufReader};

const QUEUE: &str = "outbox_bench_memory";
const BASE: &str = "/topic/bench.memory";
const ROUTING_KEY: &str = "bench.memory.v1";

fn cli_path() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_OUTBOX_CLI") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
        PathBuf::from,
    );
    target.join("release").join("outbox-cli")
}

/// `VmRSS` and `VmHWM` of `pid`, in kB.
fn memory_kb(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|line| line.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// `utime + stime` of `pid` in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

#[derive(Debug, Default)]
struct Drain {
    /// CPU seconds of the child (last sample), and what the machine did meanwhile.
    child_cpu: f64,
    cpu: String,
    rows: usize,
    wall: f64,
    /// Highest `VmHWM` seen (the kernel's own peak RSS).
    peak_kb: u64,
    /// (seconds since start, VmRSS kB)
    samples: Vec<(f64, u64)>,
    progress: Vec<String>,
}

/// Run the CLI until the outbox is empty, sampling its memory every 100 ms.
async fn drain(bench: &BenchDb, rows: usize) -> anyhow::Result<(Drain, f64)> {
    let cli = cli_path();
    ensure!(
        cli.exists(),
        "{} not found: run `cargo build --release -p outbox-cli` (or set BENCH_OUTBOX_CLI)",
        cli.display()
    );
    let workdir = std::env::temp_dir().join(format!("{}-cwd", bench.name));
    std::fs::create_dir_all(&workdir)?;
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&cli)
        .args(["publish", "--until-empty"])
        .current_dir(&workdir) // no ./outbox.toml
        .env_remove("OUTBOX_CONFIG")
        .env("DATABASE_URL", &bench.url)
        .env("AMQP_URL", amqp_url())
        .env(
            "RUST_LOG",
            std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn,outbox_core=info".into()),
        )
        .env("OUTBOX_RELAY_PROGRESS_INTERVAL", "5")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", cli.display()))?;
    let pid = child.id().context("child pid")?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().context("stderr")?;
    let sink = Arc::clone(&lines);
    let reader = tokio::spawn(async move {
        let mut stderr = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = stderr.next_line().await {
            if let Ok(mut lines) = sink.lock() {
                lines.push(line);
            }
        }
    });
    let mut result = Drain {
        rows,
        ..Drain::default()
    };
    let mut ticks = tokio::time::interval(Duration::from_millis(100));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = ticks.tick() => {
                if let Some((rss, hwm)) = memory_kb(pid) {
                    result.samples.push((start.elapsed().as_secs_f64(), rss));
                    result.peak_kb = result.peak_kb.max(hwm);
                }
                if let Some(used) = cpu_seconds(pid) {
                    result.child_cpu = used;
                }
            }
        }
    };
    result.wall = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    result.cpu = after.describe(&cpu, result.wall);
    let other = after.other_share(&cpu, result.wall);
    let _ = reader.await;
    let lines = lines
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    ensure!(
        status.success(),
        "outbox-cli exited with {status}; its log:\n{}",
        lines.join("\n")
    );
    let everything = std::env::var("BENCH_SHOW_CHILD_LOG").is_ok_and(|v| v == "1");
    result.progress = lines
        .into_iter()
        .filter(|l| {
            everything || l.contains("relay progress") || l.contains("done") || l.contains("WARN")
        })
        .collect();
    let _ = std::fs::remove_dir_all(&workdir);
    Ok((result, other))
}

/// Raw lapin into the bench queue as it is now: `n` messages with the
/// relay's properties, at most 1,000 unconfirmed; msg/s. The queue then
/// holds `n` more.
async fn raw_probe(n: usize) -> anyhow::Result<f64> {
    let raw = RawPublisher::connect().await?;
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|i| serde_json::to_vec(&order_body(i)))
        .collect::<Result<_, _>>()?;
    let destination = format!("{BASE}.v1");
    let start = Instant::now();
    let published = raw
        .publish(ROUTING_KEY, &bodies, 1000, || {
            relay_like_properties(&destination)
        })
        .await;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    raw.close().await;
    published?;
    Ok(rate)
}

/// Fill `rows` rows, drain them with the CLI, verify rows and queue, and
/// (with `probe`) publish that many raw messages into the queue the drain
/// left full; repeated when something else used the machine meanwhile.
async fn measured(
    bench: &BenchDb,
    amqp: &Amqp,
    rows: usize,
    probe: usize,
) -> anyhow::Result<(Drain, Option<f64>)> {
    undisturbed(&format!("drain of {rows} rows"), async || {
        bench.db.execute_unprepared("TRUNCATE published").await?;
        amqp.purge(QUEUE).await?;
        if rows > 0 {
            let start = Instant::now();
            fill_rows_sql(bench, BASE, "v1", rows).await?;
            bench.db.execute_unprepared("VACUUM ANALYZE published").await?;
            println!(
                "filled {} rows in {:.1} s (INSERT .. SELECT generate_series, shape checked against write_all)",
                thousands(rows as f64),
                start.elapsed().as_secs_f64()
            );
            wait_quiet().await?;
        }
        let (result, other) = drain(bench, rows).await?;
        bench.expect_all_sent(rows).await?;
        amqp.expect_count(QUEUE, rows).await?;
        let probed = if probe > 0 {
            wait_quiet().await?;
            let rate = raw_probe(probe).await?;
            amqp.expect_count(QUEUE, rows + probe).await?;
            Some(rate)
        } else {
            None
        };
        amqp.purge(QUEUE).await?;
        Ok(((result, probed), other))
    })
    .await
}

fn rss_at(drain: &Drain, fraction: f64) -> f64 {
    let t = drain.wall * fraction;
    drain
        .samples
        .iter()
        .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
        .map_or(f64::NAN, |s| s.1 as f64 / 1024.0)
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let large = env_usize("BENCH_N", 1_000_000)?;
    let small = env_usize("BENCH_SMALL_N", 100_000)?;
    let probe = env_usize("BENCH_PROBE_N", 50_000)?;
    println!(
        "method: {} runs as a child process (`publish --until-empty`, default settings: \
         batch_size 200, pool 10) with DATABASE_URL/AMQP_URL; /proc/<pid>/status sampled every \
         100 ms: VmRSS for the curve, VmHWM (kernel peak) as the peak, last sample <= 100 ms \
         before exit. Backlog made by one INSERT .. SELECT generate_series with write_all's \
         row shape (not timed). Queue `{QUEUE}`: durable, x-queue-mode lazy, bound to amq.topic \
         / {ROUTING_KEY}. Rate = rows / (child wall time - wall time of a run on an empty \
         outbox, i.e. process start, connect, first claim, exit). Verified: exit 0, every row \
         status 2, queue holds exactly N (then purged). Probe: raw lapin publishes \
         {probe} messages with the relay's properties (window 1000) into the empty queue, and \
         into the queue still holding the {large}-row drain, before it is purged.",
        cli_path().display()
    );
    if let Ok(set) = std::env::var("BENCH_TABLE_SET") {
        bench
            .db
            .execute_unprepared(&format!("ALTER TABLE published SET ({set})"))
            .await?;
        println!("ALTER TABLE published SET ({set})");
    }
    let amqp = Amqp::connect().await?;
    amqp.bound_queue(QUEUE, ROUTING_KEY, true).await?;
    let result = async {
        let (empty, shallow) = measured(bench, &amqp, 0, probe).await?;
        println!(
            "empty outbox: {:.3} s wall, peak RSS {:.1} MB",
            empty.wall,
            empty.peak_kb as f64 / 1024.0
        );
        let mut runs = Vec::new();
        let mut deep = None;
        for rows in [small, large] {
            let (run, probed) =
                measured(bench, &amqp, rows, if rows == large { probe } else { 0 }).await?;
            deep = deep.or(probed);
            println!(
                "{} rows: {:.2} s wall, peak RSS {:.1} MB, outbox-cli CPU {:.1} s; CPU: {}",
                thousands(rows as f64),
                run.wall,
                run.peak_kb as f64 / 1024.0,
                run.child_cpu,
                run.cpu
            );
            for line in &run.progress {
                println!("    {line}");
            }
            runs.push(run);
        }
        anyhow::Ok((empty, runs, shallow.zip(deep)))
    }
    .await;
    amqp.delete(QUEUE).await?;
    amqp.close().await;
    let (empty, runs, probes) = result?;

    let rate = |d: &Drain| d.rows as f64 / (d.wall - empty.wall).max(1e-9);
    println!();
    println!(
        "| backlog | wall s | drain msg/s | peak RSS MB (VmHWM) | RSS at 25% / 50% / 75% / 95% of the run, MB | samples |"
    );
    println!("|---:|---:|---:|---:|---|---:|");
    for run in &runs {
        println!(
            "| {} | {:.2} | {} | {:.1} | {:.1} / {:.1} / {:.1} / {:.1} | {} |",
            thousands(run.rows as f64),
            run.wall,
            thousands(rate(run)),
            run.peak_kb as f64 / 1024.0,
            rss_at(run, 0.25),
            rss_at(run, 0.5),
            rss_at(run, 0.75),
            rss_at(run, 0.95),
            run.samples.len()
        );
    }
    let (small_run, large_run) = (&runs[0], &runs[1]);
    let peak = large_run.peak_kb as f64 / 1024.0;
    let ratio = rate(large_run) / rate(small_run);
    println!();
    println!(
        "peak RSS at {} rows = {peak:.1} MB (target <= 50 MB): {}",
        thousands(large as f64),
        if peak <= 50.0 { "MET" } else { "NOT MET" }
    );
    println!(
        "rate {} rows / {} rows = {ratio:.2} (target: same rate, >= 0.90 read as met): {}",
        thousands(large as f64),
        thousands(small as f64),
        if ratio >= 0.90 { "MET" } else { "NOT MET" }
    );
    if let Some((shallow, deep)) = probes {
        println!(
            "raw lapin into the empty queue {}/s, into the queue holding {} messages {}/s: {:.2}",
            thousands(shallow),
            thousands(large as f64),
            thousands(deep),
            deep / shallow
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(outbox_bench::with_database("memory", bench).await)
}
