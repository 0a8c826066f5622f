//! STOMP-style destinations, mapped to AMQP exactly as RabbitMQ's STOMP plugin maps them.
//!
//! | destination              | publish to                       | declared on publish      |
//! |--------------------------|----------------------------------|--------------------------|
//! | `/topic/<rk>`            | `amq.topic`, routing key `<rk>`  | nothing                  |
//! | `/exchange/<ex>[/<rk>]`  | `<ex>`, routing key `<rk>` or "" | nothing                  |
//! | `/queue/<q>`, bare `<q>` | default exchange, `<q>`          | `<q>`, durable           |
//! | `/amq/queue/<q>`         | default exchange, `<q>`          | nothing                  |

use std::fmt;
use std::str::FromStr;

pub(crate) mod rules;

use crate::{Error, Result};
use rules::Endpoint;

/// The longest destination the `published.destination` column holds.
pub const MAX_DESTINATION_LEN: usize = rules::MAX_LEN;

/// A parsed destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    raw: String,
    kind: Kind,
}

/// What a destination points at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/topic/<routing key>`: the `amq.topic` exchange.
    Topic {
        /// The routing key (may hold wildcards when subscribing).
        routing_key: String,
    },
    /// `/exchange/<exchange>[/<routing key>]`.
    Exchange {
        /// The exchange, which must already exist.
        exchange: String,
        /// The routing key, empty when absent.
        routing_key: String,
    },
    /// `/queue/<name>` or a bare `<name>`: a durable queue declared on first use.
    Queue {
        /// The queue.
        name: String,
    },
    /// `/amq/queue/<name>`: an existing queue; nothing is declared.
    AmqQueue {
        /// The queue.
        name: String,
    },
}

impl Destination {
    /// Parse a destination string.
    pub fn parse(destination: &str) -> Result<Self> {
        let kind = parse_kind(destination).map_err(|reason| Error::InvalidDestination {
            destination: destination.to_owned(),
            reason,
        })?;
        Ok(Destination {
            raw: destination.to_owned(),
            kind,
        })
    }

    /// The destination as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// What it points at.
    pub fn kind(&self) -> &Kind {
        &self.kind
    }

    /// The destination with `.<version>` appended, as the Python library does on insert.
    pub fn with_version(&self, version: &str) -> Result<Self> {
        Destination::parse(&format!("{}.{version}", self.raw))
    }

    /// The exchange to publish to (`""` is the default exchange).
    pub fn exchange(&self) -> &str {
        match &self.kind {
            Kind::Topic { .. } => "amq.topic",
            Kind::Exchange { exchange, .. } => exchange,
            Kind::Queue { .. } | Kind::AmqQueue { .. } => "",
        }
    }

    /// The routing key to publish with.
    pub fn routing_key(&self) -> &str {
        match &self.kind {
            Kind::Topic { routing_key } | Kind::Exchange { routing_key, .. } => routing_key,
            Kind::Queue { name } | Kind::AmqQueue { name } => name,
        }
    }

    /// The queue a subscriber uses when none is given: the text after the last `/`.
    pub fn default_queue(&self) -> &str {
        self.raw.rsplit('/').next().unwrap_or(&self.raw)
    }
}

fn parse_kind(destination: &str) -> std::result::Result<Kind, &'static str> {
    Ok(match rules::parse(destination)? {
        Endpoint::Topic(routing_key) => Kind::Topic { routing_key },
        Endpoint::Exchange(exchange, routing_key) => Kind::Exchange {
            exchange,
            routing_key,
        },
        Endpoint::Queue(name) => Kind::Queue { name },
        Endpoint::AmqQueue(name) => Kind::AmqQueue { name },
    })
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for Destination {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Destination::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(d: &str) -> (String, String) {
        let d = Destination::parse(d).expect("valid");
        (d.exchange().to_owned(), d.routing_key().to_owned())
    }

    #[test]
    fn maps_like_the_stomp_plugin() {
        assert_eq!(
            route("/topic/orders.v1"),
            ("amq.topic".into(), "orders.v1".into())
        );
        assert_eq!(route("/exchange/ex/a.b"), ("ex".into(), "a.b".into()));
        assert_eq!(route("/exchange/ex"), ("ex".into(), "".into()));
        assert_eq!(route("/queue/q1"), ("".into(), "q1".into()));
        assert_eq!(route("/amq/queue/q2"), ("".into(), "q2".into()));
        assert_eq!(route("plain"), ("".into(), "plain".into()));
        assert_eq!(route("/queue/a%2Fb"), ("".into(), "a/b".into()));
    }

    #[test]
    fn rejects_what_the_plugin_rejects() {
        for bad in [
            "",
            "/topic/",
            "/queue/",
            "/amq/queue/",
            "/exchange/",
            "/foo/bar",
            "a b",
            "/queue/%zz",
        ] {
            let err = Destination::parse(bad).expect_err(bad).to_string();
            assert!(err.starts_with("invalid destination"), "{err}");
        }
        assert!(Destination::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn version_suffix_and_default_queue() {
        let d = Destination::parse("/topic/orders")
            .unwrap()
            .with_version("v1")
            .unwrap();
        assert_eq!(d.as_str(), "/topic/orders.v1");
        assert_eq!(d.default_queue(), "orders.v1");
        assert_eq!(
            Destination::parse("queue").unwrap().default_queue(),
            "queue"
        );
    }
}
