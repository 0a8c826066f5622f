//! The broker side: one lapin connection with a confirm-mode channel.

mod amqp;
mod topology;

pub(crate) use amqp::Returns;
pub(crate) use amqp::with_timeout;
pub use amqp::{Broker, InFlight, Outcome, Outgoing};
pub use topology::{QueueDeclaration, declare_subscription};
