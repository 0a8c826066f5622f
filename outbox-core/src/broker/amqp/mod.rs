//! RabbitMQ over lapin: the only code that knows lapin.

mod admin;
mod codec;
mod consume;
mod publish;
mod topology;

pub(crate) use admin::{dead_letters, replay_dead_letters};
pub(crate) use consume::AmqpSubscription;
pub(crate) use publish::AmqpPublisher;

use std::future::Future;
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tracing::debug;

use super::SubscriptionSpec;
use crate::settings::BrokerSettings;
use crate::{Error, Result};

/// How to reach one RabbitMQ (or cluster node).
#[derive(Debug, Clone)]
pub(crate) struct Amqp {
    url: crate::redact::Secret,
    /// The URL as configured, without credentials.
    shown: String,
    heartbeat: u16,
    timeout: Duration,
}

impl Amqp {
    pub(crate) fn new(settings: &BrokerSettings) -> Amqp {
        Amqp {
            url: crate::redact::Secret::new(with_heartbeat(&settings.url, settings.heartbeat)),
            shown: crate::redact::url(&settings.url),
            heartbeat: settings.heartbeat,
            timeout: settings.operation_timeout,
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        self.shown.clone()
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Open a connection. Refused credentials or an unknown vhost are
    /// permanent ([`Error::BrokerRefused`]); anything else is an outage.
    pub(crate) async fn connect(&self, name: &str) -> Result<Connection> {
        crate::tls::use_ring();
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let connected = tokio::time::timeout(
            self.timeout,
            Connection::connect(self.url.expose(), properties),
        )
        .await;
        let connection = match connected {
            Err(_) => {
                return Err(Error::BrokerTimeout {
                    operation: "connect",
                    timeout: self.timeout,
                });
            }
            Ok(Ok(connection)) => connection,
            Ok(Err(err)) => return Err(self.connect_error(err)),
        };
        debug!(name, endpoint = %self.endpoint(), heartbeat = self.heartbeat, "connected to RabbitMQ");
        Ok(connection)
    }

    fn connect_error(&self, err: lapin::Error) -> Error {
        let endpoint = self.endpoint();
        if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
            let text = amqp.get_message().to_string();
            let fix = match amqp.get_id() {
                403 => Some(
                    "check the user name and password in broker.url (AMQP_URL); \
                     `rabbitmqctl list_users` shows who exists",
                ),
                530 => Some(
                    "the vhost in broker.url does not exist or the user may not use it; \
                     create it with `rabbitmqctl add_vhost` and grant access with `rabbitmqctl set_permissions`",
                ),
                _ => None,
            };
            if let Some(fix) = fix {
                return Error::BrokerRefused {
                    endpoint,
                    reason: text,
                    fix: fix.to_owned(),
                };
            }
        }
        if let lapin::ErrorKind::IOError(io) = err.kind() {
            return Error::BrokerUnreachable {
                endpoint,
                source: Box::new(std::io::Error::new(io.kind(), io.to_string())),
            };
        }
        Error::Broker {
            operation: "connect",
            endpoint,
            source: Box::new(err),
        }
    }

    pub(crate) async fn publisher(&self, name: &str) -> Result<AmqpPublisher> {
        AmqpPublisher::open(self, name).await
    }

    pub(crate) async fn subscribe(&self, spec: &SubscriptionSpec) -> Result<AmqpSubscription> {
        AmqpSubscription::open(self, spec).await
    }

    /// Run a broker call with the `operation_timeout`: lapin futures can hang
    /// when a broker dies mid-operation.
    pub(crate) async fn call<T, F>(&self, operation: &'static str, future: F) -> Result<T>
    where
        F: Future<Output = lapin::Result<T>>,
    {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(result) => result.map_err(|err| self.error(operation, err)),
            Err(_) => Err(Error::BrokerTimeout {
                operation,
                timeout: self.timeout,
            }),
        }
    }

    pub(crate) fn error(&self, operation: &'static str, err: lapin::Error) -> Error {
        Error::Broker {
            operation,
            endpoint: self.endpoint(),
            source: Box::new(err),
        }
    }
}

/// What the broker said when it closed a channel (a soft error caused by
/// one operation), as `(reply code, reply text)`; `None` for everything else.
pub(crate) fn channel_error(err: &lapin::Error) -> Option<(u16, String)> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) =>
        {
            Some((amqp.get_id(), amqp.get_message().to_string()))
        }
        _ => None,
    }
}

/// The lapin error inside one of ours, if any.
pub(crate) fn lapin_error(err: &Error) -> Option<&lapin::Error> {
    match err {
        Error::Broker { source, .. } => source.downcast_ref::<lapin::Error>(),
        _ => None,
    }
}

/// Add `heartbeat=<secs>` to the URL unless it sets one.
fn with_heartbeat(url: &str, heartbeat: u16) -> String {
    if url.contains("heartbeat=") {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}heartbeat={heartbeat}")
}
