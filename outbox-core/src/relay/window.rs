//! What the relay has in flight: which rows, under which claim, how many
//! bytes; and what each outcome means for its row. No I/O here.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::broker::Outcome;
use crate::settings::{RelaySettings, Unroutable};

use super::schedule::next_attempt_after;

/// A published row waiting for its outcome.
#[derive(Debug, Clone)]
pub(crate) struct Flight {
    pub(crate) token: Uuid,
    pub(crate) retry: i32,
    pub(crate) added: DateTime<Utc>,
    pub(crate) destination: String,
    pub(crate) bytes: usize,
}

/// What to write for a round of outcomes, per claim.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    /// Confirmed: mark sent.
    pub(crate) sent: HashMap<Uuid, Vec<Uuid>>,
    /// Failed attempts to record.
    pub(crate) failed: HashMap<Uuid, Vec<super::claim::Failure>>,
    /// Unknown outcome: give back without an attempt.
    pub(crate) released: HashMap<Uuid, Vec<Uuid>>,
    /// Rows marked sent, with when they were written (for latency).
    pub(crate) sent_added: Vec<DateTime<Utc>>,
    /// Failures that end FAILED, for the log: `(id, destination, attempts, error)`.
    pub(crate) gave_up: Vec<(Uuid, String, i32, String)>,
    /// Failures that will be retried, for the log.
    pub(crate) retrying: Vec<(Uuid, String, i32, String)>,
}

impl Marks {
    pub(crate) fn rows(&self) -> usize {
        self.sent.values().map(Vec::len).sum::<usize>()
            + self.failed.values().map(Vec::len).sum::<usize>()
            + self.released.values().map(Vec::len).sum::<usize>()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    /// Add `other`'s marks to these (claim by claim).
    pub(crate) fn merge(&mut self, other: Marks) {
        for (token, ids) in other.sent {
            self.sent.entry(token).or_default().extend(ids);
        }
        for (token, failures) in other.failed {
            self.failed.entry(token).or_default().extend(failures);
        }
        for (token, ids) in other.released {
            self.released.entry(token).or_default().extend(ids);
        }
        self.sent_added.extend(other.sent_added);
        self.gave_up.extend(other.gave_up);
        self.retrying.extend(other.retrying);
    }
}

/// Claims with rows in flight.
#[derive(Debug, Default)]
pub(crate) struct Window {
    rows: HashMap<Uuid, Flight>,
    leases: HashMap<Uuid, DateTime<Utc>>,
    bytes: usize,
}

impl Window {
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Take a row in under claim `token`. `false` when it is already in
    /// flight (our own lease ran out and we claimed it again): it is not
    /// sent twice, its outcome is recorded under the newer claim.
    pub(crate) fn admit(&mut self, id: Uuid, flight: Flight, lease_until: DateTime<Utc>) -> bool {
        self.leases.insert(flight.token, lease_until);
        if let Some(existing) = self.rows.get_mut(&id) {
            existing.token = flight.token;
            return false;
        }
        self.bytes += flight.bytes;
        self.rows.insert(id, flight);
        true
    }

    /// Turn outcomes into marks. Outcomes for rows not in flight (given
    /// back after an outage) are ignored.
    pub(crate) fn settle(
        &mut self,
        outcomes: Vec<(Uuid, Outcome)>,
        settings: &RelaySettings,
        now: DateTime<Utc>,
    ) -> Marks {
        let mut marks = Marks::default();
        for (id, outcome) in outcomes {
            let Some(flight) = self.rows.remove(&id) else {
                continue;
            };
            self.bytes -= flight.bytes;
            let failure = match outcome {
                Outcome::Confirmed => None,
                Outcome::Unroutable(_) if settings.unroutable == Unroutable::Accept => None,
                Outcome::Unroutable(reason) | Outcome::Rejected(reason) => Some((reason, false)),
                Outcome::Invalid(reason) => Some((reason, true)),
                Outcome::Unknown(_) => {
                    marks.released.entry(flight.token).or_default().push(id);
                    continue;
                }
            };
            let Some((reason, permanent)) = failure else {
                marks.sent.entry(flight.token).or_default().push(id);
                marks.sent_added.push(flight.added);
                continue;
            };
            let attempts = flight.retry.saturating_add(1);
            let next = if permanent {
                None
            } else {
                next_attempt_after(u32::try_from(attempts).unwrap_or(u32::MAX), settings)
                    .map(|wait| now + chrono::Duration::from_std(wait).unwrap_or_default())
            };
            let log = (id, flight.destination, attempts, reason.clone());
            if next.is_some() {
                marks.retrying.push(log);
            } else {
                marks.gave_up.push(log);
            }
            marks
                .failed
                .entry(flight.token)
                .or_default()
                .push(super::claim::Failure {
                    id,
                    retry: attempts,
                    next_attempt_at: next,
                    error: reason,
                });
        }
        self.forget_leases();
        marks
    }

    /// Everything in flight, to give back after the connection was lost.
    pub(crate) fn take_all(&mut self) -> HashMap<Uuid, Vec<Uuid>> {
        let mut by_claim: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (id, flight) in self.rows.drain() {
            by_claim.entry(flight.token).or_default().push(id);
        }
        self.bytes = 0;
        self.leases.clear();
        by_claim
    }

    /// Rows of claims whose lease ends before `before`, to renew.
    pub(crate) fn expiring(&self, before: DateTime<Utc>) -> HashMap<Uuid, Vec<Uuid>> {
        let mut by_claim: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for (id, flight) in &self.rows {
            if self
                .leases
                .get(&flight.token)
                .is_some_and(|end| *end < before)
            {
                by_claim.entry(flight.token).or_default().push(*id);
            }
        }
        by_claim
    }

    /// The earliest lease end of what is in flight.
    pub(crate) fn next_lease_end(&self) -> Option<DateTime<Utc>> {
        self.leases.values().min().copied()
    }

    pub(crate) fn renewed(&mut self, token: Uuid, lease_until: DateTime<Utc>) {
        self.leases.insert(token, lease_until);
    }

    fn forget_leases(&mut self) {
        if self.leases.len() > 2 * self.rows.len().max(1) {
            let live: std::collections::HashSet<Uuid> =
                self.rows.values().map(|f| f.token).collect();
            self.leases.retain(|token, _| live.contains(token));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Settings;

    fn flight(token: Uuid, retry: i32) -> Flight {
        Flight {
            token,
            retry,
            added: Utc::now(),
            destination: "/topic/t".to_owned(),
            bytes: 10,
        }
    }

    #[test]
    fn outcomes_become_marks_under_their_claim() {
        let mut settings = Settings::default().relay;
        settings.max_retry_attempts = 3;
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let mut window = Window::default();
        let lease = Utc::now();
        assert!(window.admit(ids[0], flight(a, 0), lease));
        assert!(window.admit(ids[1], flight(a, 0), lease));
        assert!(window.admit(ids[2], flight(b, 2), lease));
        assert!(window.admit(ids[3], flight(b, 0), lease));
        assert!(window.admit(ids[4], flight(b, 0), lease));
        assert_eq!(window.bytes(), 50);
        let marks = window.settle(
            vec![
                (ids[0], Outcome::Confirmed),
                (ids[1], Outcome::Unknown("lost".into())),
                (ids[2], Outcome::Rejected("nack".into())),
                (ids[3], Outcome::Invalid("bad header".into())),
                (ids[4], Outcome::Rejected("nack".into())),
                (Uuid::new_v4(), Outcome::Confirmed),
            ],
            &settings,
            Utc::now(),
        );
        assert_eq!(marks.sent[&a], vec![ids[0]]);
        assert_eq!(marks.released[&a], vec![ids[1]]);
        let failed = &marks.failed[&b];
        assert_eq!(failed.len(), 3);
        // The third attempt of a row allowed three is its last.
        assert!(failed[0].next_attempt_at.is_none() && failed[0].retry == 3);
        // An invalid row is FAILED at once, whatever its attempts.
        assert!(failed[1].next_attempt_at.is_none() && failed[1].retry == 1);
        assert!(failed[2].next_attempt_at.is_some());
        assert!(window.is_empty() && window.bytes() == 0);
    }

    #[test]
    fn a_row_claimed_again_is_not_sent_twice() {
        let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
        let id = Uuid::new_v4();
        let mut window = Window::default();
        assert!(window.admit(id, flight(old, 0), Utc::now()));
        assert!(!window.admit(id, flight(new, 0), Utc::now()));
        let marks = window.settle(
            vec![(id, Outcome::Confirmed)],
            &Settings::default().relay,
            Utc::now(),
        );
        assert_eq!(marks.sent[&new], vec![id]);
        assert!(!marks.sent.contains_key(&old));
    }
}
