//! What a save emits: a destination, a JSON body, headers and an optional version.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::{Destination, Error, Result};

/// One message to be written to the outbox (and later relayed).
///
/// Build it by hand for the manual API ([`write`](crate::write)) or get it from
/// [`Publish::outbox_messages`](crate::Publish::outbox_messages), which also
/// serves as a preview of what a save would emit.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    base: Destination,
    destination: Destination,
    version: Option<String>,
    body: Value,
    headers: BTreeMap<String, String>,
}

impl Message {
    /// A message for `destination` with `body` serialized to JSON.
    pub fn new(destination: &str, body: impl Serialize) -> Result<Self> {
        let destination = Destination::parse(destination)?;
        let body = serde_json::to_value(body).map_err(|source| Error::Body {
            destination: destination.to_string(),
            source,
        })?;
        Ok(Self::from_parts(destination, body))
    }

    /// A message from an already parsed destination and JSON body.
    pub fn from_parts(destination: Destination, body: Value) -> Self {
        Message {
            base: destination.clone(),
            destination,
            version: None,
            body,
            headers: BTreeMap::new(),
        }
    }

    /// Append `.<version>` to the destination (once) and store the version.
    pub fn with_version(mut self, version: impl Into<String>) -> Result<Self> {
        let version = version.into();
        if let Err(reason) = crate::destination::rules::check_version(&version) {
            return Err(Error::InvalidVersion { version, reason });
        }
        self.destination = self.base.with_version(&version)?;
        self.version = Some(version);
        Ok(self)
    }

    /// Add a header sent with the message. `dop-*` headers other than
    /// `dop-correlation-id` are generated and cannot be overridden. Names
    /// hold at most 255 bytes, and so does a correlation id.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self> {
        let (name, value) = (name.into(), value.into());
        crate::headers::check(&name, &value)?;
        self.headers.insert(name, value);
        Ok(self)
    }

    /// The destination the message goes to, version suffix included.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// The version, if any.
    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The JSON body.
    pub fn body(&self) -> &Value {
        &self.body
    }

    /// The headers given by the caller (the `dop-*` ones are added on write).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }
}
