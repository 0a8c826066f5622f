//! The in-memory transport as a service's own tests would use it: save,
//! relay and consume with no broker, and script what a broker can do.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Backend, TestDb, eventually, received_count, write_messages};
use outbox_core::{
    CallbackFuture, Consumer, DeliveryFault, MemoryBroker, Payload, PublishFault, Relay, Settings,
    Shutdown, Status, shutdown_channel,
};

fn settings(url: &str) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = Some(url.to_owned());
    settings.relay.listen = false;
    settings.relay.waiting_time = Duration::from_millis(20);
    settings.relay.pause_for_retry = Duration::ZERO;
    settings.consumer.prefetch = 10;
    settings.consumer.concurrency = 4;
    settings
}

/// Save → relay → consume, end to end, with a nack and a duplicate
/// delivery scripted in: every message is stored once.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_tested_without_a_broker() {
    let t = TestDb::new(Backend::Sqlite).await;
    let broker = MemoryBroker::new();
    let mut nth = 0;
    broker.script_publishes(move |_| {
        nth += 1;
        if nth == 3 {
            PublishFault::Nack
        } else {
            PublishFault::Deliver
        }
    });
    // Every message is delivered twice (its copy once).
    broker.script_deliveries(|message| {
        if message.redelivered {
            DeliveryFault::Deliver
        } else {
            DeliveryFault::Duplicate
        }
    });
    let consumer = Consumer::new(
        t.db.clone(),
        settings(&t.url),
        "/topic/orders.created",
        Some("shipping"),
        |payload: Payload| async move { Ok(payload.save_alone().await?) },
    )
    .unwrap()
    .with_transport(broker.clone());
    consumer.declare().await.unwrap();
    let (stop, shutdown) = shutdown_channel();
    let consuming = tokio::spawn(consumer.run(shutdown));

    write_messages(&t.db, "/topic/orders.created", 20).await;
    let report = Relay::new(t.db.clone(), settings(&t.url))
        .with_transport(broker.clone())
        .run_until_empty(Shutdown::never())
        .await
        .unwrap();
    assert_eq!((report.published, report.retried), (20, 1), "{report:?}");
    eventually(Duration::from_secs(10), "every message stored", || async {
        received_count(&t.db).await == 20 && broker.messages("shipping").is_empty()
    })
    .await;
    stop.trigger();
    let consumed = consuming.await.unwrap().unwrap();
    assert_eq!(
        (consumed.saved, consumed.duplicates),
        (20, 20),
        "{consumed:?}"
    );
    assert_eq!(
        common::status_counts(&t.db)
            .await
            .get(&Status::Succeeded.code()),
        Some(&20)
    );
}

/// A callback that panics while making its future (before any `.await`)
/// is caught like any panic: the delivery is dead-lettered, the consumer
/// goes on with the next one.
#[tokio::test(flavor = "multi_thread")]
async fn a_callback_that_panics_before_its_future_is_settled() {
    struct Eager(Arc<AtomicU32>);
    impl outbox_core::Callback for Eager {
        fn call(&self, payload: Payload) -> CallbackFuture {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("panicked before returning a future");
            }
            Box::pin(async move { Ok(payload.save_alone().await?) })
        }
    }
    let t = TestDb::new(Backend::Sqlite).await;
    let broker = MemoryBroker::new();
    let mut settings = settings(&t.url);
    settings.consumer.prefetch = 1;
    settings.consumer.concurrency = 1;
    // Alone: in a batch the message would run again by itself and save.
    settings.consumer.batch_size = 1;
    let calls = Arc::new(AtomicU32::new(0));
    let consumer = Consumer::new(
        t.db.clone(),
        settings,
        "/queue/eager",
        None,
        Eager(Arc::clone(&calls)),
    )
    .unwrap()
    .with_transport(broker.clone());
    let (stop, shutdown) = shutdown_channel();
    let consuming = tokio::spawn(consumer.run(shutdown));
    for n in 0..3 {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("dop-msg-id".to_owned(), format!("eager-{n}"));
        broker.inject("/queue/eager", headers, b"{}").unwrap();
    }
    eventually(Duration::from_secs(10), "the two others saved", || async {
        received_count(&t.db).await == 2
    })
    .await;
    stop.trigger();
    let report = consuming.await.unwrap().unwrap();
    assert_eq!((report.saved, report.dead_lettered), (2, 1), "{report:?}");
    let dead = broker.messages("DLQ.eager");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].headers["x-outbox-error"].contains("panicked before returning a future"));
    assert_eq!(
        broker.unsettled("eager"),
        0,
        "nothing left unsettled at prefetch 1"
    );
}

/// Large bodies: what is in flight is bounded by `relay.max_in_flight_bytes`,
/// not only by the row count.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_in_flight_are_bounded_by_bytes() {
    let t = TestDb::new(Backend::Sqlite).await;
    let big = "x".repeat(1024 * 1024);
    for _ in 0..20 {
        outbox_core::write(
            &t.db,
            outbox_core::Message::new("/queue/big", serde_json::json!({ "big": big })).unwrap(),
        )
        .await
        .unwrap();
    }
    let broker = MemoryBroker::new();
    broker.script_publishes(|_| PublishFault::Hold);
    let mut settings = settings(&t.url);
    settings.relay.batch_size = 20;
    settings.relay.max_in_flight = 20;
    settings.relay.max_in_flight_bytes = 4 * 1024 * 1024;
    let relay = tokio::spawn(
        Relay::new(t.db.clone(), settings)
            .with_transport(broker.clone())
            .run_until_empty(Shutdown::never()),
    );
    eventually(Duration::from_secs(10), "a first window sent", || async {
        !broker.publishes().is_empty()
    })
    .await;
    let in_flight = broker.publishes().len();
    assert!(
        in_flight <= 5,
        "{in_flight} bodies of 1 MiB in flight with a 4 MiB bound"
    );
    broker.release_held();
    // Later windows are held too until let go: release until done.
    while !relay.is_finished() {
        broker.release_held();
        let sent = broker.publishes().len();
        assert!(sent <= 20);
        tokio::task::yield_now().await;
    }
    let report = relay.await.unwrap().unwrap();
    assert_eq!(report.published, 20);
}
