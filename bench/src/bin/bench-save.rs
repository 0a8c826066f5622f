//! `bench-save`: saves per second of "business row + outbox row in one
//! transaction", three ways, interleaved in rounds.
//!
//! - `raw`: sqlx on a one-connection `PgPool`: BEGIN; INSERT INTO orders ..
//!   RETURNING id; INSERT INTO published (all 11 columns, as `write_all`); COMMIT.
//! - `seaorm`: SeaORM `ActiveModel::insert` in a transaction plus
//!   `outbox_core::write` of a hand-built `Message` (no derive).
//! - `derive`: `ActiveModel { .. }.insert_and_publish(&db)` on an entity with
//!   one `#[publish(destination = "/topic/bench.orders", version = "v1")]`.
//!
//! Environment: `BENCH_N` (saves per way per round, 10000), `BENCH_ROUNDS` (5),
//! `BENCH_WARMUP` (saves per way before round 1, 500).

use std::time::Instant;

use anyhow::ensure;
use chrono::{DateTime, Duration, SubsecRound, Utc};
use outbox_bench::{
    BenchDb, CpuSnapshot, connect, env_usize, finish, median, order, thousands, undisturbed,
    wait_quiet, with_database,
};
use outbox_core::{Message, PublishExt};
use sea_orm::sqlx::postgres::{PgPool, PgPoolOptions};
use sea_orm::sqlx::types::Json;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, DatabaseConnection, TransactionTrait};
use serde_json::json;
use uuid::Uuid;

const DESTINATION: &str = "/topic/bench.orders.v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Raw,
    SeaOrm,
    Derive,
}

impl Way {
    const ALL: [Way; 3] = [Way::Raw, Way::SeaOrm, Way::Derive];

    fn tag(self) -> &'static str {
        match self {
            Way::Raw => "raw",
            Way::SeaOrm => "seaorm",
            Way::Derive => "derive",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Way::Raw => "a. raw SQL (sqlx)",
            Way::SeaOrm => "b. SeaORM insert + outbox_core::write",
            Way::Derive => "c. derive: insert_and_publish",
        }
    }
}

struct Clients {
    raw: PgPool,
    seaorm: DatabaseConnection,
    derive: DatabaseConnection,
}

fn iso_millis(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

async fn save_raw(pool: &PgPool, i: i64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let placed_at = Utc::now();
    let id: i32 = sea_orm::sqlx::query_scalar(
        "INSERT INTO orders (customer, amount, placed_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind("raw")
    .bind(i)
    .bind(placed_at)
    .fetch_one(&mut *tx)
    .await?;
    let msg_id = Uuid::new_v4();
    let added = Utc::now().trunc_subsecs(6);
    let body = json!({
        "id": id,
        "customer": "raw",
        "amount": i,
        "placed_at": iso_millis(placed_at),
    });
    let headers = json!({
        "dop-correlation-id": Uuid::new_v4().to_string(),
        "dop-msg-destination": DESTINATION,
        "dop-msg-id": msg_id.to_string(),
        "dop-msg-sent-time": iso_millis(added),
        "dop-msg-type": "Published",
    });
    sea_orm::sqlx::query(
        "INSERT INTO published (id, version, destination, body, added, expires_at, retry, \
         status, headers, next_attempt_at, last_error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(msg_id)
    .bind("v1")
    .bind(DESTINATION)
    .bind(Json(body))
    .bind(added)
    .bind(added + Duration::days(1))
    .bind(0_i32)
    .bind(1_i32)
    .bind(Json(headers))
    .bind(added)
    .bind(None::<String>)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn save_seaorm(db: &DatabaseConnection, i: i64) -> anyhow::Result<()> {
    let txn = db.begin().await?;
    let model = order::ActiveModel {
        customer: Set("seaorm".to_owned()),
        amount: Set(i),
        placed_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(&txn)
    .await?;
    let message = Message::new(
        "/topic/bench.orders",
        json!({
            "id": model.id,
            "customer": model.customer,
            "amount": model.amount,
            "placed_at": iso_millis(model.placed_at),
        }),
    )?
    .with_version("v1")?;
    outbox_core::write(&txn, message).await?;
    txn.commit().await?;
    Ok(())
}

async fn save_derive(db: &DatabaseConnection, i: i64) -> anyhow::Result<()> {
    order::ActiveModel {
        customer: Set("derive".to_owned()),
        amount: Set(i),
        placed_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert_and_publish(db)
    .await?;
    Ok(())
}

/// `n` sequential saves one way; saves per second, and the share of a core
/// other processes used meanwhile.
async fn run(clients: &Clients, way: Way, n: usize) -> anyhow::Result<(f64, f64)> {
    let cpu = CpuSnapshot::take();
    let start = Instant::now();
    for i in 0..n as i64 {
        match way {
            Way::Raw => save_raw(&clients.raw, i).await?,
            Way::SeaOrm => save_seaorm(&clients.seaorm, i).await?,
            Way::Derive => save_derive(&clients.derive, i).await?,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    Ok((n as f64 / wall, CpuSnapshot::take().other_share(&cpu, wall)))
}

/// Every save wrote its order and exactly one matching outbox row, all three
/// ways wrote rows of the same shape.
async fn verify(bench: &BenchDb, saved: [usize; 3]) -> anyhow::Result<()> {
    for (way, per_way) in Way::ALL.into_iter().zip(saved) {
        let tag = way.tag();
        let orders = bench
            .scalar(&format!(
                "SELECT COUNT(*) FROM orders WHERE customer = '{tag}'"
            ))
            .await?;
        let rows = bench
            .scalar(&format!(
                "SELECT COUNT(*) FROM published p JOIN orders o ON o.id = (p.body->>'id')::int \
                 WHERE p.body->>'customer' = '{tag}' AND o.customer = '{tag}' \
                   AND (p.body->>'amount')::bigint = o.amount \
                   AND p.destination = '{DESTINATION}' AND p.version = 'v1' AND p.status = 1 \
                   AND p.headers->>'dop-msg-id' = p.id::text"
            ))
            .await?;
        ensure!(
            orders == per_way as i64 && rows == per_way as i64,
            "{tag}: {orders} orders and {rows} matching outbox rows, expected {per_way} each"
        );
    }
    let total = bench.scalar("SELECT COUNT(*) FROM published").await?;
    let expected: usize = saved.iter().sum();
    ensure!(
        total == expected as i64,
        "{total} outbox rows, expected {expected}"
    );
    for column in ["body", "headers"] {
        let shapes = bench
            .scalar(&format!(
                "SELECT COUNT(DISTINCT (SELECT string_agg(k, ',' ORDER BY k) \
                 FROM jsonb_object_keys({column}) AS k)) FROM published"
            ))
            .await?;
        ensure!(
            shapes == 1,
            "the three ways wrote {shapes} different `{column}` shapes"
        );
    }
    Ok(())
}

async fn bench(bench: &BenchDb) -> anyhow::Result<()> {
    let n = env_usize("BENCH_N", 10_000)?;
    let rounds = env_usize("BENCH_ROUNDS", 5)?;
    let warmup = env_usize("BENCH_WARMUP", 500)?;
    println!(
        "method: {n} sequential single-row saves per way per round, {rounds} rounds, the three ways \
         interleaved (order rotated each round), each way on its own one-connection pool; \
         {warmup} warm-up saves per way first (not timed). saves/s = n / wall time of the loop; \
         reported: median over rounds. Each save = BEGIN; INSERT orders RETURNING; \
         INSERT published (11 columns); COMMIT (synchronous_commit on)."
    );
    sea_orm::ConnectionTrait::execute_unprepared(&bench.db, order::CREATE_TABLE).await?;
    let clients = Clients {
        raw: PgPoolOptions::new()
            .max_connections(1)
            .connect(&bench.url)
            .await?,
        seaorm: connect(&bench.url, 1).await?,
        derive: connect(&bench.url, 1).await?,
    };
    for way in Way::ALL {
        run(&clients, way, warmup).await?;
    }
    let mut rates: [Vec<f64>; 3] = Default::default();
    let mut saved = [warmup; 3];
    for round in 0..rounds {
        wait_quiet().await?;
        let mut line = format!("round {}:", round + 1);
        for k in 0..3 {
            let index = (round + k) % 3;
            let way = Way::ALL[index];
            let rate = undisturbed(way.tag(), async || {
                saved[index] += n;
                run(&clients, way, n).await
            })
            .await?;
            rates[index].push(rate);
            line.push_str(&format!("  {} {}/s", way.tag(), thousands(rate)));
        }
        println!("{line}");
    }
    verify(bench, saved).await?;
    println!("verified: {saved:?} saves (raw, seaorm, derive; warm-up and repeats included)");

    let medians: Vec<f64> = rates.iter().map(|r| median(r)).collect();
    println!();
    println!("| way | saves/s (median of {rounds}) | min | max | vs raw |");
    println!("|---|---:|---:|---:|---:|");
    for (index, way) in Way::ALL.iter().enumerate() {
        let r = &rates[index];
        println!(
            "| {} | {} | {} | {} | {:.2} |",
            way.label(),
            thousands(medians[index]),
            thousands(r.iter().copied().fold(f64::INFINITY, f64::min)),
            thousands(r.iter().copied().fold(0.0, f64::max)),
            medians[index] / medians[0]
        );
    }
    let ratio = medians[2] / medians[0];
    println!();
    println!(
        "ratio derive/raw = {ratio:.3} (target >= 0.90): {}",
        if ratio >= 0.90 { "MET" } else { "NOT MET" }
    );
    println!(
        "ratio seaorm/raw = {:.3}; derive/seaorm = {:.3}",
        medians[1] / medians[0],
        medians[2] / medians[1]
    );
    clients.raw.close().await;
    let _ = clients.seaorm.close().await;
    let _ = clients.derive.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    outbox_bench::init_tracing();
    outbox_bench::print_machine();
    finish(with_database("save", bench).await)
}
