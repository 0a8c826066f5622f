//! When to try a failed message again: django-outbox-pattern's schedule,
//! without blocking other rows while waiting.

use std::time::Duration;

use crate::settings::RelaySettings;

/// After failed attempt number `failures` (1-based): `Some(wait)` before the
/// next attempt, or `None` when the limit is reached and the row is FAILED.
/// Attempts 1 and 2 retry at once, the 3rd waits `pause_for_retry`, later
/// ones `wait_retry`.
pub(crate) fn next_attempt_after(failures: u32, settings: &RelaySettings) -> Option<Duration> {
    if failures >= settings.max_retry_attempts {
        return None;
    }
    Some(match failures {
        0..=2 => Duration::ZERO,
        3 => settings.pause_for_retry,
        _ => settings.wait_retry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Settings;

    #[test]
    fn follows_the_python_schedule() {
        let mut settings = Settings::default().relay;
        settings.max_retry_attempts = 5;
        settings.pause_for_retry = Duration::from_secs(240);
        settings.wait_retry = Duration::from_secs(60);
        let waits: Vec<_> = (1..=5).map(|n| next_attempt_after(n, &settings)).collect();
        assert_eq!(
            waits,
            [
                Some(Duration::ZERO),
                Some(Duration::ZERO),
                Some(Duration::from_secs(240)),
                Some(Duration::from_secs(60)),
                None
            ]
        );
    }
}
