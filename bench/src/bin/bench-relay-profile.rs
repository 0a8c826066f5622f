//! `bench-relay-profile`: where the relay's time goes. Not a target
//! benchmark: it takes the relay apart and times the pieces on their own,
//! with the relay's own statements and publishing pattern.
//!
//! 1. database only: claim B rows (the relay's `UPDATE .. FOR UPDATE SKIP
//!    LOCKED .. RETURNING`) then mark them sent (the relay's `update_many ..
//!    WHERE id IN (..)`), sequentially, until the outbox is empty;
//! 2. broker only, the relay's pattern: publish B messages (relay
//!    properties), then wait for all B confirms, repeat (a window that drains
//!    to zero every batch);
//! 3. broker only, sliding window of B unconfirmed (the raw baseline's pattern);
//! 4. the relay itself (`Relay::run_until_empty`);
//! 5. a pipelined prototype with the same statements (see [`pipelined`]).
//!
//! Environment: `BENCH_N` (100000), `BENCH_BATCH_SIZES` (200,1000),
//! `BENCH_PARTS` (db,drained,window,pipelined,relay; also marks, contention, connect), and the diagnostic knobs
//! `BENCH_QUEUE_DURABLE=0` and `BENCH_PG_SET=synchronous_commit=off`.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Confirmation, Connection, ConnectionProperties};
use outbox_bench::{
    Amqp, BenchDb, CpuSnapshot, amqp_url, env_list, env_usize, finish, order_body, percentile,
    relay_like_properties, thousands, undisturbed, with_database, write_rows,
};
use outbox_core::entity::published::{self, Column};
use outbox_core::{Relay, Shutdown, Status};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, Statement};
use uuid::Uuid;

const QUEUE: &str = "outbox_bench_relay_profile";
const BASE: &str = "/topic/bench.profile";
const ROUTING_KEY: &str = "bench.profile.v1";

fn ms(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(values, 50.0),
        percentile(values, 90.0),
        percentile(values, 99.0),
        percentile(values, 100.0)
    )
}

async fn fill(bench: &BenchDb, n: usize) -> anyhow::Result<()> {
    bench.db.execute_unprepared("TRUNCATE published").await?;
    write_rows(&bench.db, BASE, Some("v1"), n, 1000).await?;
    bench
        .db
        .execute_unprepared("VACUUM ANALYZE published")
        .await?;
    Ok(())
}

/// How to mark a batch sent.
#[derive(Clone, Copy, Debug)]
enum Mark {
    /// The relay's: SeaORM `update_many` with `id IN ($1, .., $n)`.
    SeaOrmInList,
    /// The same statement text through sqlx directly.
    SqlxInList,
    /// One array parameter: `id = ANY($1)`.
    SqlxAny,
}

async fn mark_sent(
    db: &sea_orm::DatabaseConnection,
    ids: &[Uuid],
    mark: Mark,
) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    match mark {
        Mark::SeaOrmInList => {
            published::Entity::update_many()
                .col_expr(Column::Status, Expr::value(Status::Succeeded.code()))
                .col_expr(Column::NextAttemptAt, Expr::value(now))
                .col_expr(Column::LastError, Expr::value(Option::<String>::None))
                .filter(Column::Id.is_in(ids.iter().copied()))
                .exec(db)
                .await?;
        }
        Mark::SqlxInList => {
            let placeholders: Vec<String> = (0..ids.len()).map(|i| format!("${}", i + 4)).collect();
            let sql = format!(
                "UPDATE \"published\" SET \"status\" = $1, \"next_attempt_at\" = $2, \
                 \"last_error\" = $3 WHERE \"published\".\"id\" IN ({})",
                placeholders.join(", ")
            );
            let mut query = sea_orm::sqlx::query(sea_orm::sqlx::AssertSqlSafe(sql))
                .bind(Status::Succeeded.code())
                .bind(now)
                .bind(None::<String>);
            for id in ids {
                query = query.bind(*id);
            }
            query.execute(db.get_postgres_connection_pool()).await?;
        }
        Mark::SqlxAny => {
            sea_orm::sqlx::query(
                "UPDATE published SET status = $1, next_attempt_at = $2, last_error = $3 \
                 WHERE id = ANY($4)",
            )
            .bind(Status::Succeeded.code())
            .bind(now)
            .bind(None::<String>)
            .bind(ids)
            .execute(db.get_postgres_connection_pool())
            .await?;
        }
    }
    Ok(())
}

/// 1. Claim + mark with the relay's SQL, no broker.
async fn database_only(
    bench: &BenchDb,
    n: usize,
    batch: usize,
    mark: Mark,
) -> anyhow::Result<(String, f64)> {
    fill(bench, n).await?;
    let db = outbox_bench::connect(&bench.url, 2).await?;
    let (mut claims, mut marks, mut decode) = (Vec::new(), Vec::new(), Vec::new());
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let mut total = 0;
    loop {
        let now = chrono::Utc::now();
        let t0 = Instant::now();
        let rows = db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "UPDATE published SET next_attempt_at = $1 WHERE id IN (\
                   SELECT id FROM published WHERE status = 1 AND next_attempt_at <= $2 \
                   ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, destination, body, headers, retry, added",
                [
                    (now + chrono::Duration::seconds(60)).into(),
                    now.into(),
                    (batch as i64).into(),
                ],
            ))
            .await?;
        let t1 = Instant::now();
        if rows.is_empty() {
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<Uuid>("", "id")?);
            let body: serde_json::Value = row.try_get("", "body")?;
            let _headers: serde_json::Value = row.try_get("", "headers")?;
            let _ = serde_json::to_vec(&body)?;
        }
        let t2 = Instant::now();
        mark_sent(&db, &ids, mark).await?;
        let t3 = Instant::now();
        total += ids.len();
        claims.push((t1 - t0).as_secs_f64() * 1000.0);
        decode.push((t2 - t1).as_secs_f64() * 1000.0);
        marks.push((t3 - t2).as_secs_f64() * 1000.0);
    }
    let wall = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let _ = db.close().await;
    ensure!(total == n, "claimed {total} rows, expected {n}");
    bench.expect_all_sent(n).await?;
    let report = format!(
        "database only, batch {batch}, mark {mark:?}: {} rows/s ({} batches)\n    claim:  {}\n    decode: {}\n    mark:   {}\n    CPU: {}",
        thousands(n as f64 / wall),
        claims.len(),
        ms(&mut claims),
        ms(&mut decode),
        ms(&mut marks),
        after.describe(&cpu, wall)
    );
    Ok((report, after.other_share(&cpu, wall)))
}

/// 2./3. Publish `n` messages in batches of `batch`: `drain` waits for every
/// confirm of a batch before the next one; otherwise a sliding window.
async fn broker_only(
    amqp: &Amqp,
    n: usize,
    batch: usize,
    drain: bool,
) -> anyhow::Result<(String, f64)> {
    amqp.purge(QUEUE).await?;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let destination = format!("{BASE}.v1");
    let mut batch_ms = Vec::new();
    let mut bad = 0;
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let mut pending = VecDeque::new();
    let mut sent = 0;
    while sent < n {
        let t0 = Instant::now();
        let count = batch.min(n - sent);
        for i in sent..sent + count {
            let body = serde_json::to_vec(&order_body(i))?;
            let confirm = channel
                .basic_publish(
                    "amq.topic".into(),
                    ROUTING_KEY.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &body,
                    relay_like_properties(&destination),
                )
                .await?;
            pending.push_back(confirm);
            if !drain
                && pending.len() > batch
                && let Some(c) = pending.pop_front()
            {
                bad += usize::from(!matches!(c.await?, Confirmation::Ack(None)));
            }
        }
        if drain {
            while let Some(c) = pending.pop_front() {
                bad += usize::from(!matches!(c.await?, Confirmation::Ack(None)));
            }
            batch_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        sent += count;
    }
    while let Some(c) = pending.pop_front() {
        bad += usize::from(!matches!(c.await?, Confirmation::Ack(None)));
    }
    let wall = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let _ = connection.close(200, "bye".into()).await;
    ensure!(bad == 0, "{bad} messages not acked cleanly");
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    let pattern = if drain {
        format!("publish {batch} then wait for all {batch} confirms (the relay's pattern)")
    } else {
        format!("sliding window of {batch} unconfirmed")
    };
    let mut report = format!(
        "broker only, {pattern}: {} msg/s\n    CPU: {}",
        thousands(n as f64 / wall),
        after.describe(&cpu, wall)
    );
    if drain {
        report.push_str(&format!("\n    per batch: {}", ms(&mut batch_ms)));
    }
    Ok((report, after.other_share(&cpu, wall)))
}

/// The relay's claim from [`database_only`], as a function: (ids, bodies, headers).
async fn claim(
    db: &sea_orm::DatabaseConnection,
    batch: usize,
) -> anyhow::Result<Vec<(Uuid, Vec<u8>, serde_json::Value)>> {
    let now = chrono::Utc::now();
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE published SET next_attempt_at = $1 WHERE id IN (\
               SELECT id FROM published WHERE status = 1 AND next_attempt_at <= $2 \
               ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id, destination, body, headers, retry, added",
            [
                (now + chrono::Duration::seconds(60)).into(),
                now.into(),
                (batch as i64).into(),
            ],
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let body: serde_json::Value = row.try_get("", "body")?;
        out.push((
            row.try_get::<Uuid>("", "id")?,
            serde_json::to_vec(&body)?,
            row.try_get("", "headers")?,
        ));
    }
    Ok(out)
}

/// A prototype of a pipelined relay (part 5), same statements: claim batch k+1 and
/// publish it while batch k's confirms are still outstanding (at most
/// `in_flight` batches unconfirmed); a second task waits for each batch's
/// confirms in order and marks it. What the relay could reach without the
/// per-batch confirm barrier.
async fn pipelined(
    bench: &BenchDb,
    amqp: &Amqp,
    n: usize,
    batch: usize,
    in_flight: usize,
) -> anyhow::Result<(String, f64)> {
    fill(bench, n).await?;
    amqp.purge(QUEUE).await?;
    let db = outbox_bench::connect(&bench.url, 4).await?;
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(Vec<Uuid>, Vec<lapin::PublisherConfirm>)>(in_flight.max(1));
    let marker_db = db.clone();
    let marker = tokio::spawn(async move {
        let mut marked = 0;
        let mut bad = 0;
        while let Some((ids, confirms)) = rx.recv().await {
            for confirm in confirms {
                bad += usize::from(!matches!(confirm.await?, Confirmation::Ack(None)));
            }
            mark_sent(&marker_db, &ids, Mark::SeaOrmInList).await?;
            marked += ids.len();
        }
        anyhow::Ok((marked, bad))
    });
    let destination = format!("{BASE}.v1");
    loop {
        let rows = claim(&db, batch).await?;
        if rows.is_empty() {
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut confirms = Vec::with_capacity(rows.len());
        for (id, body, _headers) in &rows {
            ids.push(*id);
            confirms.push(
                channel
                    .basic_publish(
                        "amq.topic".into(),
                        ROUTING_KEY.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        body,
                        relay_like_properties(&destination),
                    )
                    .await?,
            );
        }
        tx.send((ids, confirms)).await?;
    }
    drop(tx);
    let (marked, bad) = marker.await??;
    let wall = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let _ = connection.close(200, "bye".into()).await;
    let _ = db.close().await;
    ensure!(bad == 0 && marked == n, "{marked} marked, {bad} not acked");
    bench.expect_all_sent(n).await?;
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    Ok((
        format!(
            "pipelined prototype, batch {batch}, up to {} batches unconfirmed: {} msg/s\n    CPU: {}",
            in_flight + 1,
            thousands(n as f64 / wall),
            after.describe(&cpu, wall)
        ),
        after.other_share(&cpu, wall),
    ))
}

/// 4. The relay.
async fn relay(
    bench: &BenchDb,
    amqp: &Amqp,
    n: usize,
    batch: usize,
) -> anyhow::Result<(String, f64)> {
    fill(bench, n).await?;
    amqp.purge(QUEUE).await?;
    let mut settings = bench.settings();
    settings.relay.batch_size = u32::try_from(batch)?;
    let db = outbox_core::connect(&settings).await?;
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    let report = Relay::new(db.clone(), settings)
        .run_until_empty(Shutdown::never())
        .await?;
    let wall = start.elapsed().as_secs_f64();
    let after = CpuSnapshot::take();
    let _ = db.close().await;
    ensure!(report.published == n as u64, "relay report {report:?}");
    bench.expect_all_sent(n).await?;
    amqp.expect_count(QUEUE, n).await?;
    amqp.purge(QUEUE).await?;
    Ok((
        format!(
            "relay, batch {batch}: {} msg/s\n    CPU: {}",
            thousands(n as f64 / wall),
            after.describe(&cpu, wall)
        ),
        after.other_share(&cpu, wall),
    ))
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 100_000)?;
    let batches = env_list("BENCH_BATCH_SIZES", &[200, 1000])?;
    let parts =
        std::env::var("BENCH_PARTS").unwrap_or_else(|_| "db,drained,window,pipelined,relay".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    println!(
        "method: N = {n} per measurement; the relay's statements and publishing pattern timed \
         apart (see the file's doc comment); CPU seconds per process group from /proc."
    );
    let amqp = Amqp::connect().await?;
    amqp.bound_queue(QUEUE, ROUTING_KEY, false).await?;
    let result = async {
        if part("connect") {
            // What opening one more pool connection costs (the pool grows on demand).
            let mut open_ms = Vec::new();
            let mut first_ms = Vec::new();
            for _ in 0..20 {
                let t0 = Instant::now();
                let db = outbox_bench::connect(&bench.url, 1).await?;
                let t1 = Instant::now();
                db.query_one_raw(Statement::from_string(
                    DbBackend::Postgres,
                    "SELECT COUNT(*) FROM published WHERE status = 1",
                ))
                .await?;
                let t2 = Instant::now();
                let _ = db.close().await;
                open_ms.push((t1 - t0).as_secs_f64() * 1000.0);
                first_ms.push((t2 - t1).as_secs_f64() * 1000.0);
            }
            println!("open a SeaORM/sqlx connection: {}", ms(&mut open_ms));
            println!("  then its first statement: {}", ms(&mut first_ms));
        }
        for &batch in &batches {
            let label = format!("batch {batch}");
            if part("db") {
                println!(
                    "{}",
                    undisturbed(&label, async || {
                        database_only(bench, n, batch, Mark::SeaOrmInList).await
                    })
                    .await?
                );
            }
            if part("marks") {
                for mark in [Mark::SqlxInList, Mark::SqlxAny] {
                    println!(
                        "{}",
                        undisturbed(&label, async || {
                            database_only(bench, n, batch, mark).await
                        })
                        .await?
                    );
                }
            }
            if part("drained") {
                println!(
                    "{}",
                    undisturbed(&label, async || broker_only(&amqp, n, batch, true).await).await?
                );
            }
            if part("window") {
                println!(
                    "{}",
                    undisturbed(&label, async || broker_only(&amqp, n, batch, false).await).await?
                );
            }
            if part("contention") {
                // The broker baseline while the relay's SQL runs next to it (unrelated rows).
                let both = undisturbed(&label, async || {
                    let (broker, database) = tokio::join!(
                        broker_only(&amqp, n, batch, false),
                        database_only(bench, n, batch, Mark::SeaOrmInList)
                    );
                    let (broker, database) = (broker?, database?);
                    Ok((
                        format!("side by side:\n  {}\n  {}", broker.0, database.0),
                        broker.1.max(database.1),
                    ))
                })
                .await?;
                println!("{both}");
            }
            if part("pipelined") {
                println!(
                    "{}",
                    undisturbed(&label, async || pipelined(bench, &amqp, n, batch, 2).await)
                        .await?
                );
            }
            if part("relay") {
                println!(
                    "{}",
                    undisturbed(&label, async || relay(bench, &amqp, n, batch).await).await?
                );
            }
        }
        anyhow::Ok(())
    }
    .await;
    amqp.delete(QUEUE).await.context("delete queue")?;
    amqp.close().await;
    result
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(with_database("relay_profile", bench).await)
}
