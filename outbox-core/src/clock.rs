//! The relay's notion of now: the system clock, or (feature `memory`) a
//! clock a test moves by hand, to make leases expire and retries fall due
//! without waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

/// Wall-clock time for claims, leases and retry schedules.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Microseconds added to the system clock.
    offset: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { offset: None }
    }

    /// A clock that runs with the system clock but can be moved forward.
    #[cfg(feature = "memory")]
    pub fn manual() -> Clock {
        Clock {
            offset: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// Move a manual clock forward (no effect on the system clock).
    #[cfg(feature = "memory")]
    pub fn advance(&self, by: std::time::Duration) {
        if let Some(offset) = &self.offset {
            offset.fetch_add(
                i64::try_from(by.as_micros()).unwrap_or(i64::MAX),
                Ordering::SeqCst,
            );
        }
    }

    /// Now.
    pub fn now(&self) -> DateTime<Utc> {
        let now = Utc::now();
        match &self.offset {
            Some(offset) => now + chrono::Duration::microseconds(offset.load(Ordering::SeqCst)),
            None => now,
        }
    }
}
