//! The broker side: one lapin connection with a confirm-mode channel.

mod amqp;
mod topology;

pub(crate) use amqp::Returns;
pub use amqp::{Broker, InFlight, Outcome, Outgoing};
pub(crate) use amqp::{passive, with_timeout};
pub use topology::{QueueDeclaration, declare_subscription};
