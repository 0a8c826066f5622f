//! The inbox write: every `received` row of a batch in one statement that
//! skips the ids already there, so deduplication costs no extra round trip
//! and a racing delivery of the same id waits on the unique index instead of
//! failing.

use std::collections::HashSet;

use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, IntoActiveModel, QueryFilter, QueryTrait,
};
use uuid::Uuid;

use crate::Result;
use crate::entity::received;

/// The most parameter bytes one statement carries. sqlx 0.9 leaves Nagle's
/// algorithm on, and a statement split over two writes (over TLS, one record
/// holds 16 KiB) waits for the server's delayed ACK: 40 ms on Linux.
const STATEMENT_BYTES: usize = 12 * 1024;

/// Insert `rows`; the ids of those that went in (the others' `msg_id` was
/// already received). Rows are written in `msg_id` order, so two batches
/// holding the same ids lock them in the same order and cannot deadlock.
pub(super) async fn insert_new(
    conn: &impl ConnectionTrait,
    mut rows: Vec<received::Model>,
) -> Result<HashSet<Uuid>> {
    rows.sort_by(|a, b| a.msg_id.cmp(&b.msg_id));
    let mut inserted = HashSet::with_capacity(rows.len());
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for row in rows {
        let size = row_bytes(&row);
        if !chunk.is_empty() && bytes + size > STATEMENT_BYTES {
            inserted.extend(insert_chunk(conn, std::mem::take(&mut chunk)).await?);
            bytes = 0;
        }
        bytes += size;
        chunk.push(row);
    }
    if !chunk.is_empty() {
        inserted.extend(insert_chunk(conn, chunk).await?);
    }
    Ok(inserted)
}

/// About what `row` costs on the wire.
fn row_bytes(row: &received::Model) -> usize {
    let json = |value: &Option<serde_json::Value>| {
        value
            .as_ref()
            .map_or(0, |v| serde_json::to_vec(v).map_or(0, |bytes| bytes.len()))
    };
    128 + row.msg_id.as_ref().map_or(0, String::len) + json(&row.headers) + json(&row.body)
}

async fn insert_chunk(
    conn: &impl ConnectionTrait,
    rows: Vec<received::Model>,
) -> Result<Vec<Uuid>> {
    let backend = conn.get_database_backend();
    let mut insert =
        received::Entity::insert_many(rows.into_iter().map(IntoActiveModel::into_active_model))
            .into_query();
    let statement = match backend {
        // MariaDB has no ON CONFLICT; INSERT IGNORE skips the duplicate keys
        // and its RETURNING lists only the rows that went in.
        DbBackend::MySql => {
            let mut statement = backend.build(&insert);
            statement.sql = format!(
                "{} RETURNING `id`",
                statement
                    .sql
                    .replacen("INSERT INTO", "INSERT IGNORE INTO", 1)
            );
            statement
        }
        _ => {
            insert
                .on_conflict(
                    OnConflict::column(received::Column::MsgId)
                        .do_nothing()
                        .to_owned(),
                )
                .returning(Query::returning().column(received::Column::Id));
            backend.build(&insert)
        }
    };
    let inserted = conn.query_all_raw(statement).await?;
    inserted
        .iter()
        .map(|row| Ok(row.try_get::<Uuid>("", "id")?))
        .collect()
}

/// Take the rows `ids` out again (messages a batch callback nacked).
pub(super) async fn delete(conn: &impl ConnectionTrait, ids: Vec<Uuid>) -> Result<()> {
    received::Entity::delete_many()
        .filter(received::Column::Id.is_in(ids))
        .exec(conn)
        .await?;
    Ok(())
}
