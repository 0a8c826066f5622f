//! Counters, gauges and histograms for the relay and the consumer, rendered
//! in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(value.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q` quantile (0 to 1), interpolated inside its bucket as
    /// Prometheus' `histogram_quantile` does; `None` before any observation
    /// or above the last bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * count as f64;
        let mut lower = (0.0, 0u64);
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let cumulative = bucket.load(Ordering::Relaxed);
            if cumulative as f64 >= rank && cumulative > lower.1 {
                let share = (rank - lower.1 as f64) / (cumulative - lower.1) as f64;
                let secs = lower.0 + (bound - lower.0) * share.clamp(0.0, 1.0);
                return Some(Duration::from_secs_f64(secs));
            }
            lower = (*bound, cumulative);
        }
        None
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything the relay and the consumer count. Cheap to update from hot paths.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Rows confirmed by the broker.
    pub published: AtomicU64,
    /// Rows that reached FAILED.
    pub failed: AtomicU64,
    /// Failed attempts that will be retried.
    pub retried: AtomicU64,
    /// Schedulable rows at the last check.
    pub backlog: AtomicU64,
    /// Age in milliseconds of the oldest schedulable row at the last check.
    pub oldest_pending_ms: AtomicU64,
    /// WAL bytes the replication slot holds beyond what the relay confirmed
    /// (`relay.capture = "wal"`).
    pub wal_lag_bytes: AtomicU64,
    /// Row creation to broker confirm.
    pub publish_latency: Histogram,
    /// Messages the consumer handled (saved or duplicate), acked.
    pub consumed: AtomicU64,
    /// Duplicates acked without running the callback.
    pub duplicates: AtomicU64,
    /// Messages the consumer sent to the dead-letter queue.
    pub dead_lettered: AtomicU64,
    /// Messages the consumer gave back to the queue (database unreachable,
    /// or their batch's commit failed).
    pub requeued: AtomicU64,
    /// From taking a message (the first of its batch) to settling it.
    pub handle_latency: Histogram,
}

impl Metrics {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters = [
            (
                "outbox_published_total",
                "Outbox rows confirmed by the broker.",
                &self.published,
            ),
            (
                "outbox_failed_total",
                "Outbox rows that reached FAILED.",
                &self.failed,
            ),
            (
                "outbox_retried_total",
                "Failed publish attempts that will be retried.",
                &self.retried,
            ),
            (
                "outbox_consumed_total",
                "Messages handled and acknowledged by the consumer.",
                &self.consumed,
            ),
            (
                "outbox_duplicates_total",
                "Duplicate messages acknowledged without running the callback.",
                &self.duplicates,
            ),
            (
                "outbox_dead_lettered_total",
                "Messages rejected to the dead-letter queue.",
                &self.dead_lettered,
            ),
            (
                "outbox_requeued_total",
                "Messages the consumer gave back to the queue because the database was unreachable or a batch's commit failed.",
                &self.requeued,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                Self::get(value)
            );
        }
        let _ = writeln!(
            out,
            "# HELP outbox_backlog Schedulable outbox rows.\n# TYPE outbox_backlog gauge\noutbox_backlog {}",
            Self::get(&self.backlog)
        );
        let _ = writeln!(
            out,
            "# HELP outbox_oldest_pending_age_seconds Age of the oldest schedulable outbox row.\n\
             # TYPE outbox_oldest_pending_age_seconds gauge\noutbox_oldest_pending_age_seconds {}",
            Self::get(&self.oldest_pending_ms) as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "# HELP outbox_wal_lag_bytes WAL the replication slot holds beyond the relay's confirmed position.\n\
             # TYPE outbox_wal_lag_bytes gauge\noutbox_wal_lag_bytes {}",
            Self::get(&self.wal_lag_bytes)
        );
        self.publish_latency.render(
            &mut out,
            "outbox_publish_latency_seconds",
            "Time from outbox row creation to broker confirm.",
        );
        self.handle_latency.render(
            &mut out,
            "outbox_handle_latency_seconds",
            "Time from taking a message (the first of its batch) to settling it: filling the batch, the callbacks, the commit.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        // 90 observations in (2 ms, 3 ms], 10 in (10 ms, 15 ms]
        for _ in 0..90 {
            h.observe(Duration::from_micros(2500));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(12));
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64();
        assert!((0.002..=0.003).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap().as_secs_f64();
        assert!((0.010..=0.015).contains(&p99), "{p99}");
        h.observe(Duration::from_secs(100));
        assert_eq!(h.quantile(1.0), None, "above the last bucket");
    }
}
