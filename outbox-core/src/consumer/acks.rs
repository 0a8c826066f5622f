//! Acknowledging in bulk: one `basic.ack` with `multiple` for every run of
//! finished deliveries, instead of one per message (a per-message ack costs
//! the broker and lapin more than the message itself). A delivery is acked
//! only after its callback returned and its transaction committed; a
//! finished delivery waiting behind a slow one is acked on its own after a
//! short delay, so a slow callback never holds up the prefetch window.

use std::collections::BTreeSet;
use std::time::Duration;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

/// How long a finished delivery may wait for the ones before it.
const HOLD: Duration = Duration::from_millis(20);

/// What the consumer tells the acker, in delivery order per tag.
#[derive(Debug, Clone, Copy)]
pub(super) enum AckEvent {
    /// A delivery was handed to a callback.
    Delivered(u64),
    /// Its callback finished: ack, or nack without requeue (dead-letter).
    Done { tag: u64, ack: bool },
}

/// The acker task of one channel.
#[derive(Debug)]
pub(super) struct Acks {
    events: mpsc::UnboundedSender<AckEvent>,
    task: JoinHandle<()>,
}

impl Acks {
    pub(super) fn start(channel: Channel) -> Acks {
        let (events, receiver) = mpsc::unbounded_channel();
        Acks {
            events,
            task: tokio::spawn(run(channel, receiver)),
        }
    }

    pub(super) fn sender(&self) -> mpsc::UnboundedSender<AckEvent> {
        self.events.clone()
    }

    /// Send what is finished and stop (call after every handler finished).
    pub(super) async fn finish(self) {
        drop(self.events);
        let _ = self.task.await;
    }
}

async fn run(channel: Channel, mut events: mpsc::UnboundedReceiver<AckEvent>) {
    let mut state = State {
        channel,
        outstanding: BTreeSet::new(),
        finished: BTreeSet::new(),
        failed: false,
    };
    loop {
        let event = if state.finished.is_empty() {
            events.recv().await
        } else {
            tokio::select! {
                event = events.recv() => event,
                () = tokio::time::sleep(HOLD) => {
                    state.ack_each().await;
                    continue;
                }
            }
        };
        let Some(event) = event else {
            state.ack_prefix().await;
            state.ack_each().await;
            return;
        };
        state.apply(event).await;
        // Take everything already queued before acking: natural batching.
        while let Ok(event) = events.try_recv() {
            state.apply(event).await;
        }
        state.ack_prefix().await;
    }
}

struct State {
    channel: Channel,
    /// Delivered and not yet acked or nacked.
    outstanding: BTreeSet<u64>,
    /// Finished with an ack, waiting for an earlier delivery to finish.
    finished: BTreeSet<u64>,
    /// Whether an ack already failed (logged once).
    failed: bool,
}

impl State {
    async fn apply(&mut self, event: AckEvent) {
        match event {
            AckEvent::Delivered(tag) => {
                self.outstanding.insert(tag);
            }
            AckEvent::Done { tag, ack: true } => {
                self.finished.insert(tag);
            }
            AckEvent::Done { tag, ack: false } => {
                self.outstanding.remove(&tag);
                let nack = BasicNackOptions {
                    requeue: false,
                    multiple: false,
                };
                let result = self.channel.basic_nack(tag, nack).await;
                self.check(result);
            }
        }
    }

    /// One `multiple` ack for the run of finished deliveries at the front.
    async fn ack_prefix(&mut self) {
        let mut last = None;
        while let Some(&first) = self.outstanding.first() {
            if !self.finished.remove(&first) {
                break;
            }
            self.outstanding.pop_first();
            last = Some(first);
        }
        if let Some(tag) = last {
            let result = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await;
            self.check(result);
        }
    }

    /// Ack finished deliveries one by one: they waited long enough.
    async fn ack_each(&mut self) {
        for tag in std::mem::take(&mut self.finished) {
            self.outstanding.remove(&tag);
            let result = self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple: false })
                .await;
            self.check(result);
        }
    }

    fn check(&mut self, result: lapin::Result<()>) {
        if let Err(err) = result
            && !self.failed
        {
            self.failed = true;
            warn!(error = %err, "could not ack/nack; the broker will redeliver those messages and the duplicates are skipped");
        }
    }
}
