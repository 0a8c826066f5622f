//! `#[derive(Publish)]`, the manual API and the save helpers, against real
//! PostgreSQL, MariaDB and SQLite.

mod common;

use chrono::{TimeZone, Utc};
use common::entities::{order, shipment};
use common::{Backend, TestDb};
use outbox_core::entity::published;
use outbox_core::{Message, Publish, PublishExt, Status, headers, with_correlation_id};
use rust_decimal::Decimal;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, EntityTrait, PaginatorTrait, QueryOrder, TransactionTrait,
};
use serde_json::json;
use uuid::Uuid;

/// One test function per backend for each scenario.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres { $( #[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await } )* }
        mod mariadb { $( #[tokio::test] async fn $name() { super::$name(super::Backend::MariaDb).await } )* }
        mod sqlite { $( #[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await } )* }
    };
}

on_every_backend!(
    model_and_outbox_rows_commit_together,
    rollback_leaves_neither,
    joins_the_callers_transaction,
    update_emits_again,
    correlation_id_is_inherited,
    manual_write_api,
    after_save_hook_is_atomic_in_a_transaction,
    migrate_is_idempotent,
);

fn new_order() -> order::ActiveModel {
    order::ActiveModel {
        customer: Set("ada".to_owned()),
        total: Set(Decimal::new(1250, 2)),
        placed_at: Set(Utc.with_ymd_and_hms(2025, 1, 31, 14, 5, 9).unwrap()
            + chrono::Duration::microseconds(123_456)),
        reference: Set(Uuid::parse_str("3f2a8c3e-2b7d-4b8e-9a51-6c8d1a0f6f10").unwrap()),
        note: Set(None),
        due: Set(chrono::NaiveDate::from_ymd_opt(2025, 2, 3).unwrap()),
        paid: Set(true),
        ..Default::default()
    }
}

async fn outbox_rows(t: &TestDb) -> Vec<published::Model> {
    published::Entity::find()
        .order_by_asc(published::Column::Added)
        .all(&t.db)
        .await
        .unwrap()
}

async fn model_and_outbox_rows_commit_together(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;

    let order = new_order().insert_and_publish(&t.db).await.unwrap();

    assert_eq!(order::Entity::find().count(&t.db).await.unwrap(), 1);
    let rows = outbox_rows(&t).await;
    assert_eq!(rows.len(), 3, "one row per #[publish]");

    // attribute order, version suffix once
    let destinations: Vec<&str> = rows.iter().map(|r| r.destination.as_str()).collect();
    assert_eq!(
        destinations,
        [
            "/topic/orders.created.v1",
            "/exchange/audit/orders",
            "/queue/order-summaries"
        ]
    );
    assert_eq!(rows[0].version.as_deref(), Some("v1"));
    assert_eq!(rows[1].version, None);

    // Django encodings. The body is built from the row as stored: SeaORM's
    // MariaDB `timestamp` column keeps whole seconds. Decimals keep their
    // column's scale on every backend (SQLite hands 12.50 back as 12.5).
    let total = "12.50";
    let placed_at = if backend == Backend::MariaDb {
        "2025-01-31T14:05:09Z"
    } else {
        "2025-01-31T14:05:09.123Z"
    };
    assert_eq!(
        rows[0].body,
        json!({
            "id": order.id,
            "customer": "ada",
            "total": total,
            "placed_at": placed_at,
            "reference": "3f2a8c3e-2b7d-4b8e-9a51-6c8d1a0f6f10",
            "note": null,
            "due": "2025-02-03",
            "paid": true,
        })
    );
    assert_eq!(
        rows[1].body,
        json!({"id": order.id, "customer": "ada", "total": total})
    );
    assert_eq!(rows[2].body, json!({"order": order.id, "who": "ADA"}));

    // headers computed once, stored
    for row in &rows {
        assert_eq!(row.status, Status::Schedule);
        assert_eq!(row.retry, 0);
        // Time-ordered, so the primary key's index is written at one edge.
        assert_eq!(row.id.get_version_num(), 7, "{}", row.id);
        let h = row.headers.as_object().unwrap();
        assert_eq!(h[headers::MSG_ID], row.id.to_string());
        assert_eq!(h[headers::MSG_DESTINATION], row.destination.as_str());
        assert_eq!(h[headers::MSG_TYPE], "Published");
        let sent = h[headers::MSG_SENT_TIME].as_str().unwrap();
        assert!(
            sent.ends_with('Z')
                && sent.starts_with(&row.added.format("%Y-%m-%dT%H:%M:%S").to_string()),
            "{sent}"
        );
        Uuid::parse_str(h[headers::CORRELATION_ID].as_str().unwrap()).unwrap();
    }
    // one save shares one correlation id across its rows
    assert_eq!(
        rows[0].headers[headers::CORRELATION_ID],
        rows[2].headers[headers::CORRELATION_ID]
    );
}

async fn rollback_leaves_neither(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;

    let txn = t.db.begin().await.unwrap();
    new_order().insert_and_publish(&txn).await.unwrap();
    txn.rollback().await.unwrap();

    assert_eq!(order::Entity::find().count(&t.db).await.unwrap(), 0);
    assert_eq!(published::Entity::find().count(&t.db).await.unwrap(), 0);

    // a failing save leaves nothing either: duplicate primary key
    let first = new_order().insert_and_publish(&t.db).await.unwrap();
    let mut again = new_order();
    again.id = Set(first.id);
    assert!(again.insert_and_publish(&t.db).await.is_err());
    assert_eq!(order::Entity::find().count(&t.db).await.unwrap(), 1);
    assert_eq!(published::Entity::find().count(&t.db).await.unwrap(), 3);
}

/// A failed save has rolled back when it returns, not later: dropping a SeaORM
/// transaction only queues the rollback, and the failed statement's locks
/// (here the duplicate key's) would be held until the runtime gets to it.
/// The runtime is blocked while the server is asked.
async fn failed_save_has_rolled_back_when_it_returns(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;
    let first = new_order().insert_and_publish(&t.db).await.unwrap();
    let mut again = new_order();
    again.id = Set(first.id);
    assert!(again.insert_and_publish(&t.db).await.is_err());
    assert_eq!(t.open_transactions_now(), 0);
}

#[tokio::test]
async fn failed_save_has_rolled_back_when_it_returns_postgres() {
    failed_save_has_rolled_back_when_it_returns(Backend::Postgres).await
}

#[tokio::test]
async fn failed_save_has_rolled_back_when_it_returns_mariadb() {
    failed_save_has_rolled_back_when_it_returns(Backend::MariaDb).await
}

async fn joins_the_callers_transaction(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;

    let txn = t.db.begin().await.unwrap();
    new_order().insert_and_publish(&txn).await.unwrap();
    new_order().insert_and_publish(&txn).await.unwrap();
    // nothing visible outside before the commit (SQLite has one writer: skip the peek there)
    if backend != Backend::Sqlite {
        assert_eq!(published::Entity::find().count(&t.db).await.unwrap(), 0);
    }
    txn.commit().await.unwrap();
    assert_eq!(order::Entity::find().count(&t.db).await.unwrap(), 2);
    assert_eq!(published::Entity::find().count(&t.db).await.unwrap(), 6);
}

async fn update_emits_again(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;

    let order = new_order().insert_and_publish(&t.db).await.unwrap();
    let mut changed: order::ActiveModel = order.clone().into();
    changed.customer = Set("grace".to_owned());
    let updated = changed.update_and_publish(&t.db).await.unwrap();
    assert_eq!(updated.customer, "grace");

    let rows = outbox_rows(&t).await;
    assert_eq!(rows.len(), 6);
    assert_eq!(rows[3].body["customer"], "grace");
    assert_eq!(
        rows[3].destination, "/topic/orders.created.v1",
        "suffix applied once"
    );

    // save() inserts when the key is unset
    let saved = new_order().save_and_publish(&t.db).await.unwrap();
    assert_ne!(saved.id, order.id);
    assert_eq!(outbox_rows(&t).await.len(), 9);
}

async fn correlation_id_is_inherited(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;

    with_correlation_id("req-42", new_order().insert_and_publish(&t.db))
        .await
        .unwrap();
    // "none" counts as absent, as in the Python library
    with_correlation_id("none", new_order().insert_and_publish(&t.db))
        .await
        .unwrap();

    let rows = outbox_rows(&t).await;
    assert!(
        rows[..3]
            .iter()
            .all(|r| r.headers[headers::CORRELATION_ID] == "req-42")
    );
    let fresh = rows[3].headers[headers::CORRELATION_ID].as_str().unwrap();
    Uuid::parse_str(fresh).unwrap();
}

async fn manual_write_api(backend: Backend) {
    let t = TestDb::new(backend).await;

    let txn = t.db.begin().await.unwrap();
    let message = Message::new("/topic/payments", json!({"amount": "3.10", "ok": true}))
        .unwrap()
        .with_version("v2")
        .unwrap()
        .with_header("tenant", "acme")
        .unwrap()
        .with_header(headers::CORRELATION_ID, "chosen")
        .unwrap()
        .with_header(headers::MSG_ID, "forged")
        .unwrap();
    let written = outbox_core::write(&txn, message).await.unwrap();
    txn.commit().await.unwrap();

    let rows = outbox_rows(&t).await;
    assert_eq!(
        rows,
        vec![written.clone()],
        "what write() returns is what is stored"
    );
    assert_eq!(written.destination, "/topic/payments.v2");
    assert_eq!(written.version.as_deref(), Some("v2"));
    assert_eq!(written.headers["tenant"], "acme");
    assert_eq!(
        written.headers[headers::CORRELATION_ID],
        "chosen",
        "the correlation id may be set"
    );
    assert_eq!(
        written.headers[headers::MSG_ID],
        written.id.to_string(),
        "other dop-* headers are forced"
    );

    // rolled back: gone
    let txn = t.db.begin().await.unwrap();
    outbox_core::write(&txn, Message::new("/queue/x", json!({})).unwrap())
        .await
        .unwrap();
    txn.rollback().await.unwrap();
    assert_eq!(outbox_rows(&t).await.len(), 1);

    // bad input is refused before anything is written
    let err = Message::new("/topc/payments", json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown destination prefix") && err.contains("/topic/<routing-key>"),
        "{err}"
    );
    let err = Message::new("/topic/p", json!({}))
        .unwrap()
        .with_version("v 2")
        .unwrap_err()
        .to_string();
    assert!(err.contains("version"), "{err}");
}

async fn after_save_hook_is_atomic_in_a_transaction(backend: Backend) {
    let t = TestDb::new(backend).await;
    t.create_entity_tables().await;

    let id = Uuid::new_v4();
    let txn = t.db.begin().await.unwrap();
    shipment::ActiveModel {
        id: Set(id),
        order_id: Set(7),
        carrier: Set("dhl".to_owned()),
    }
    .insert(&txn)
    .await
    .unwrap();
    txn.commit().await.unwrap();

    let rows = outbox_rows(&t).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].destination, "/topic/shipments");
    assert_eq!(
        rows[0].body,
        json!({"id": id.to_string(), "order_id": 7, "carrier": "dhl"})
    );

    let txn = t.db.begin().await.unwrap();
    shipment::ActiveModel {
        id: Set(Uuid::new_v4()),
        order_id: Set(8),
        carrier: Set("ups".to_owned()),
    }
    .insert(&txn)
    .await
    .unwrap();
    txn.rollback().await.unwrap();
    assert_eq!(outbox_rows(&t).await.len(), 1);
}

async fn migrate_is_idempotent(backend: Backend) {
    let t = TestDb::new(backend).await;
    outbox_core::migrate(&t.db).await.unwrap();
    outbox_core::migrate(&t.db).await.unwrap();
    outbox_core::write(&t.db, Message::new("/topic/a", json!({"x": 1})).unwrap())
        .await
        .unwrap();
    outbox_core::migrate(&t.db).await.unwrap();
    assert_eq!(outbox_rows(&t).await.len(), 1);
}

#[test]
fn preview_without_a_database() {
    let model = order::Model {
        id: 9,
        customer: "lin".to_owned(),
        total: Decimal::new(1000, 2),
        placed_at: Utc.with_ymd_and_hms(2025, 1, 31, 14, 5, 9).unwrap(),
        reference: Uuid::nil(),
        note: Some("gift".to_owned()),
        due: chrono::NaiveDate::from_ymd_opt(2025, 2, 3).unwrap(),
        paid: false,
    };
    let messages = model.outbox_messages().unwrap();
    assert_eq!(messages.len(), 3);
    assert_eq!(
        messages[0].destination().as_str(),
        "/topic/orders.created.v1"
    );
    assert_eq!(messages[0].body()["placed_at"], "2025-01-31T14:05:09Z");
    assert_eq!(messages[0].body()["total"], "10.00");
    assert_eq!(messages[0].body()["note"], "gift");
    assert_eq!(
        messages[1].body(),
        &json!({"id": 9, "customer": "lin", "total": "10.00"})
    );
    assert_eq!(messages[2].body(), &json!({"order": 9, "who": "LIN"}));
}
