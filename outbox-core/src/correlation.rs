//! The correlation id that follows a request across services.
//!
//! Outbox rows written inside [`with_correlation_id`] carry that id in
//! `dop-correlation-id`; the consumer runs every callback inside the id of the
//! message it handles, so events a callback emits inherit it.

use std::future::Future;

tokio::task_local! {
    static CORRELATION_ID: String;
}

/// Run `future` with `id` as the current correlation id.
pub async fn with_correlation_id<F: Future>(id: impl Into<String>, future: F) -> F::Output {
    CORRELATION_ID.scope(id.into(), future).await
}

/// The current correlation id, if one is set and meaningful. As in the Python
/// library, an empty id and the string `none` count as absent.
pub fn correlation_id() -> Option<String> {
    CORRELATION_ID
        .try_with(|id| id.clone())
        .ok()
        .filter(|id| !id.is_empty() && id != "none")
}

/// The current correlation id, or a new one; an id too long to travel is an
/// error at write time, not a failure in the relay later.
pub(crate) fn current_or_new() -> crate::Result<String> {
    match correlation_id() {
        Some(id) => {
            crate::headers::check(crate::headers::CORRELATION_ID, &id)?;
            Ok(id)
        }
        None => Ok(uuid::Uuid::new_v4().to_string()),
    }
}
