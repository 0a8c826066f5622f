//! Writing marks: one round at a time, in the background, conditional on
//! each row's claim. Outcomes decided while a round is being written join
//! the next round, so a slow database makes the next statement bigger
//! instead of holding the relay up (confirms arrive in small groups; one
//! statement each would cost more than the publishing).

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use super::claim::Store;
use super::window::Marks;
use crate::clock::Clock;
use crate::report;

/// Rows a round of marks changed (rows another relay claimed meanwhile are
/// not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Marked {
    pub(super) published: u64,
    pub(super) retried: u64,
    pub(super) failed: u64,
}

impl std::ops::AddAssign for Marked {
    fn add_assign(&mut self, other: Marked) {
        self.published += other.published;
        self.retried += other.retried;
        self.failed += other.failed;
    }
}

/// The round being written and the one that waits for it.
pub(super) struct Marking {
    store: Store,
    name: String,
    clock: Clock,
    lease: chrono::Duration,
    writing: Option<(JoinHandle<Marked>, usize)>,
    next: Marks,
}

impl Marking {
    pub(super) fn new(store: Store, name: String, clock: Clock, lease: chrono::Duration) -> Self {
        Marking {
            store,
            name,
            clock,
            lease,
            writing: None,
            next: Marks::default(),
        }
    }

    /// Rows decided and not yet written: they count against
    /// `relay.max_in_flight`, since a crash now sends them again.
    pub(super) fn rows(&self) -> usize {
        self.writing.as_ref().map_or(0, |(_, rows)| *rows) + self.next.rows()
    }

    /// Queue `marks`; start writing them now unless a round is still being
    /// written. Returns what a round that ended meanwhile changed.
    pub(super) async fn add(&mut self, marks: Marks) -> Marked {
        self.next.merge(marks);
        let nothing_to_do = self.writing.is_none() && self.next.is_empty();
        let still_writing = self
            .writing
            .as_ref()
            .is_some_and(|(task, _)| !task.is_finished());
        if nothing_to_do || still_writing {
            return Marked::default();
        }
        self.written().await
    }

    /// Wait for the round being written (forever when none is), then start
    /// the next. Cancel-safe.
    pub(super) async fn written(&mut self) -> Marked {
        let mut done = Marked::default();
        if let Some((task, _)) = self.writing.as_mut() {
            match task.await {
                Ok(marked) => done = marked,
                Err(err) => error!(error = %err, "marking task failed"),
            }
            self.writing = None;
        } else if self.next.is_empty() {
            std::future::pending::<()>().await;
        }
        self.start();
        done
    }

    /// Write everything decided so far, and wait for it.
    pub(super) async fn finish(&mut self) -> Marked {
        let mut done = Marked::default();
        while self.writing.is_some() || !self.next.is_empty() {
            done += self.written().await;
        }
        done
    }

    fn start(&mut self) {
        if self.next.is_empty() {
            return;
        }
        let marks = std::mem::take(&mut self.next);
        let rows = marks.rows();
        let store = self.store.clone();
        let name = self.name.clone();
        let clock = self.clock.clone();
        // Past the lease the rows are someone else's to send.
        let deadline = self.clock.now() + self.lease;
        let task = tokio::spawn(async move { write(&store, &name, marks, &clock, deadline).await });
        self.writing = Some((task, rows));
    }
}

/// Write one round, each statement retried through database blips until
/// the claim's lease ends.
async fn write(
    store: &Store,
    name: &str,
    marks: Marks,
    clock: &Clock,
    deadline: DateTime<Utc>,
) -> Marked {
    let now = clock.now();
    let mut done = Marked::default();
    for (token, ids) in &marks.sent {
        let written = retry(name, "mark rows sent", clock, deadline, || {
            store.mark_sent(*token, ids, now)
        })
        .await;
        if let Some(marked) = written {
            done.published += marked;
            if marked < ids.len() as u64 {
                warn!(relay = %name, rows = ids.len() as u64 - marked, "confirmed rows were claimed by another relay after their lease ended; it sends them again (consumers deduplicate)");
            }
        }
    }
    for (token, failures) in &marks.failed {
        let written = retry(name, "record failed attempts", clock, deadline, || {
            store.mark_failed(*token, failures, now)
        })
        .await;
        let Some((scheduled, failed)) = written else {
            continue;
        };
        done.retried += scheduled;
        done.failed += failed;
        if (scheduled + failed) as usize == failures.len() {
            for (id, destination, attempts, reason) in marks
                .gave_up
                .iter()
                .filter(|(id, ..)| failures.iter().any(|f| f.id == *id))
            {
                error!(%id, %destination, attempts, error = %reason, "message FAILED after its last attempt; see `outbox-cli failed`");
            }
        } else {
            warn!(relay = %name, rows = failures.len() as u64 - scheduled - failed, "failed rows were claimed by another relay after their lease ended; their attempt is counted there");
        }
    }
    for (token, ids) in &marks.released {
        retry(name, "give rows back", clock, deadline, || {
            store.release(*token, ids)
        })
        .await;
    }
    done
}

async fn retry<T, F, Fut>(
    name: &str,
    what: &str,
    clock: &Clock,
    deadline: DateTime<Utc>,
    mut write: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        match write().await {
            Ok(rows) => return Some(rows),
            Err(err)
                if clock.now() + chrono::Duration::from_std(pause).unwrap_or_default()
                    < deadline =>
            {
                warn!(relay = %name, error = %report(&err), "could not {what}; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(5));
            }
            Err(err) => {
                error!(relay = %name, error = %report(&err), "could not {what} before the claim lease ended; the rows are sent again (consumers deduplicate)");
                return None;
            }
        }
    }
}
