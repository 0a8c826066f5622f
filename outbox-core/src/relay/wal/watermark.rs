//! Which position of the replication stream may be confirmed: the commit
//! of the last transaction such that it and every one before it is settled
//! (each of its messages confirmed by the broker, or kept as a row for the
//! claim path). Transactions arrive in commit order; outcomes do not.

use std::collections::{HashMap, VecDeque};

use uuid::Uuid;

#[derive(Debug, Default)]
pub(crate) struct Watermark {
    /// Transactions not yet confirmed, oldest first: their commit's end
    /// position and how many of their messages are unsettled.
    open: VecDeque<(u64, usize)>,
    /// Sequence number of `open[0]`.
    first: u64,
    /// For each message in flight, the transactions waiting for it (an id
    /// met again while in flight is sent once and settles both).
    waiting: HashMap<Uuid, Vec<u64>>,
}

impl Watermark {
    /// A committed transaction ending at `end_lsn` with messages `ids`.
    /// Returns the ids to send: those not already in flight.
    pub(crate) fn commit(&mut self, end_lsn: u64, ids: &[Uuid]) -> Vec<Uuid> {
        let seq = self.first + self.open.len() as u64;
        self.open.push_back((end_lsn, ids.len()));
        let mut send = Vec::with_capacity(ids.len());
        for id in ids {
            let waiting = self.waiting.entry(*id).or_default();
            if waiting.is_empty() {
                send.push(*id);
            }
            waiting.push(seq);
        }
        send
    }

    /// Message `id` is settled.
    pub(crate) fn settle(&mut self, id: Uuid) {
        for seq in self.waiting.remove(&id).unwrap_or_default() {
            if let Some(open) = seq
                .checked_sub(self.first)
                .and_then(|at| self.open.get_mut(at as usize))
            {
                open.1 = open.1.saturating_sub(1);
            }
        }
    }

    /// The end position of the newest transaction that may be confirmed now,
    /// if that moved.
    pub(crate) fn advance(&mut self) -> Option<u64> {
        let mut confirmed = None;
        while let Some(&(end_lsn, 0)) = self.open.front() {
            self.open.pop_front();
            self.first += 1;
            confirmed = Some(end_lsn);
        }
        confirmed
    }

    /// Messages in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.waiting.len()
    }

    /// Whether every transaction seen is confirmed.
    pub(crate) fn is_idle(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_a_contiguous_prefix() {
        let mut w = Watermark::default();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(w.commit(10, &[a]), vec![a]);
        assert_eq!(w.commit(20, &[b, c]), vec![b, c]);
        assert_eq!(w.commit(30, &[]), Vec::<Uuid>::new());
        w.settle(b);
        w.settle(c);
        assert_eq!(w.advance(), None, "the first transaction is still open");
        w.settle(a);
        assert_eq!(w.advance(), Some(30));
        assert!(w.is_idle());
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn an_id_in_flight_twice_is_sent_once_and_settles_both() {
        let mut w = Watermark::default();
        let a = Uuid::new_v4();
        assert_eq!(w.commit(10, &[a]), vec![a]);
        assert!(w.commit(20, &[a]).is_empty());
        w.settle(a);
        assert_eq!(w.advance(), Some(20));
        // Settling an unknown id changes nothing.
        w.settle(Uuid::new_v4());
        assert!(w.is_idle());
    }
}
