//! A plain lapin client for checking what reaches RabbitMQ.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};

use super::amqp_url;

/// A message as a test sees it.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub body: serde_json::Value,
    pub headers: BTreeMap<String, String>,
    pub delivery_mode: Option<u8>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
}

pub struct TestBroker {
    pub connection: Connection,
    pub channel: Channel,
}

impl TestBroker {
    pub async fn connect() -> TestBroker {
        TestBroker::connect_to(&amqp_url()).await
    }

    pub async fn connect_to(url: &str) -> TestBroker {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ (is it running? scripts/services.sh starts it)");
        let channel = connection.create_channel().await.expect("channel");
        TestBroker {
            connection,
            channel,
        }
    }

    /// A fresh non-durable queue bound to `exchange` with `routing_key`.
    pub async fn bound_queue(&self, exchange: &str, routing_key: &str) -> String {
        let name = format!("test.{}", uuid::Uuid::new_v4().simple());
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    auto_delete: false,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare test queue");
        self.channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind test queue");
        name
    }

    pub async fn delete_queue(&self, name: &str) {
        let _ = self
            .channel
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await;
    }

    /// Messages waiting in `queue`.
    pub async fn message_count(&self, queue: &str) -> u32 {
        self.queue(queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} does not exist"))
            .message_count()
    }

    /// `queue` as the broker sees it (messages, consumers), if it exists.
    pub async fn queue(&self, queue: &str) -> Option<lapin::Queue> {
        // A refused passive declare closes its channel: use a new one each time.
        let channel = self.connection.create_channel().await.ok()?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if channel.status().connected() {
            let _ = channel.close(200, "checked".into()).await;
        }
        declared.ok()
    }

    /// Consume until `expected` messages arrived or `idle` passes with none.
    pub async fn take(&self, queue: &str, expected: usize, idle: Duration) -> Vec<Received> {
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut out = Vec::new();
        while out.len() < expected {
            let Ok(Some(delivery)) = tokio::time::timeout(idle, consumer.next()).await else {
                break;
            };
            let delivery = delivery.expect("delivery");
            out.push(Received {
                routing_key: delivery.routing_key.to_string(),
                body: serde_json::from_slice(&delivery.data).unwrap_or(serde_json::Value::Null),
                headers: long_strings(delivery.properties.headers().as_ref()),
                delivery_mode: *delivery.properties.delivery_mode(),
                content_type: delivery
                    .properties
                    .content_type()
                    .as_ref()
                    .map(|s| s.to_string()),
                message_id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string()),
            });
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }
}

/// Every header that is an AMQP long string; panics on another type, because
/// the STOMP plugin would silently drop it.
pub fn long_strings(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(table) = table {
        for (key, value) in table.inner() {
            match value {
                AMQPValue::LongString(s) => {
                    out.insert(
                        key.to_string(),
                        String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    );
                }
                // The broker's own dead-lettering headers (x-death) are arrays.
                _ if key.as_str().starts_with("x-") => {}
                other => panic!(
                    "header {key} is {other:?}, not a long string: STOMP subscribers would never see it"
                ),
            }
        }
    }
    out
}

impl TestBroker {
    /// Publish a JSON (or any) body with string headers, persistent, to `exchange`/`routing_key`.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) {
        use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
        use lapin::types::{LongString, ShortString};
        let channel = self.connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm");
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(
                ShortString::from(*k),
                AMQPValue::LongString(LongString::from(*v)),
            );
        }
        channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(table),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        let _ = channel.close(200, "done".into()).await;
    }
}

/// `rabbitmqctl <args>` against the machine's RabbitMQ; its stdout.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .expect("run rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
