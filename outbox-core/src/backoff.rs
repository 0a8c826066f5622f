//! Capped exponential backoff with jitter, for reconnecting after an outage.

use std::time::Duration;

/// Delays of roughly 0.25 s, 0.5 s, 1 s, 2 s, … plus up to 50 % jitter,
/// never more than `maximum` (the `broker.maximum_backoff` setting).
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    failures: u32,
    maximum: Duration,
}

const BASE: Duration = Duration::from_millis(250);

impl Backoff {
    pub(crate) fn new(maximum: Duration) -> Self {
        Backoff {
            failures: 0,
            maximum,
        }
    }

    /// The wait before the next try; each call doubles the next one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let exponential = BASE.saturating_mul(1u32 << self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let jittered = exponential.mul_f64(1.0 + fastrand::f64() * 0.5);
        jittered.min(self.maximum)
    }

    /// How many consecutive failures so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut backoff = Backoff::new(Duration::from_secs(3));
        let first = backoff.next_delay();
        assert!(first >= BASE && first <= BASE.mul_f64(1.5));
        let second = backoff.next_delay();
        assert!(second >= BASE * 2);
        for _ in 0..30 {
            assert!(backoff.next_delay() <= Duration::from_secs(3));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= BASE.mul_f64(1.5));
    }
}
