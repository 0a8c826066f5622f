//! NATS JetStream over async-nats: the only code that knows async-nats.
//!
//! Destinations become subjects (see [`subject`]); each row is published
//! with `Nats-Msg-Id` = row id, so JetStream drops a second copy inside the
//! stream's duplicate window, and is confirmed by its PubAck.

mod consume;
pub(crate) mod dead_letters;
mod publish;
pub(crate) mod stream;
mod subject;

pub(crate) use consume::NatsSubscription;
pub(crate) use publish::NatsPublisher;
pub(crate) use subject::{check_subject, subject};

use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};
use tracing::debug;

use crate::settings::{BrokerSettings, NatsSettings};
use crate::{Error, Result};

/// How to reach one NATS server (or cluster).
#[derive(Debug, Clone)]
pub(crate) struct Nats {
    /// `broker.url` with the credentials taken out.
    servers: Vec<String>,
    credentials: Credentials,
    shown: String,
    timeout: Duration,
    settings: NatsSettings,
}

/// Credentials from the URL: `user:password@` or a bare `token@`.
#[derive(Clone, Default)]
struct Credentials {
    user_password: Option<(String, crate::redact::Secret)>,
    token: Option<crate::redact::Secret>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user_password.as_ref().map(|(user, _)| user))
            .field("token", &self.token.as_ref().map(|_| crate::redact::MASK))
            .finish()
    }
}

impl Nats {
    pub(crate) fn new(broker: &BrokerSettings, settings: &NatsSettings) -> Nats {
        let mut credentials = Credentials::default();
        let servers = broker
            .url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
                let (userinfo, host) = match rest.rsplit_once('@') {
                    Some((userinfo, host)) => (Some(userinfo), host),
                    None => (None, rest),
                };
                match userinfo.map(|info| info.split_once(':')) {
                    Some(Some((user, password))) => {
                        credentials.user_password = Some((
                            crate::url::percent_decode(user),
                            crate::redact::Secret::new(crate::url::percent_decode(password)),
                        ));
                    }
                    Some(None) => {
                        credentials.token = userinfo.map(|token| {
                            crate::redact::Secret::new(crate::url::percent_decode(token))
                        });
                    }
                    None => {}
                }
                format!("{scheme}://{host}")
            })
            .collect();
        Nats {
            servers,
            credentials,
            shown: crate::redact::url(&broker.url),
            timeout: broker.operation_timeout,
            settings: settings.clone(),
        }
    }

    pub(crate) fn endpoint(&self) -> String {
        self.shown.clone()
    }

    pub(crate) fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Connect. Refused credentials are permanent ([`Error::BrokerRefused`]);
    /// a server that cannot be reached is an outage. Once connected,
    /// async-nats reconnects by itself and the publisher reports what was
    /// lost meanwhile as unknown.
    pub(crate) async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        crate::tls::use_ring();
        let mut options = ConnectOptions::new()
            .name(name)
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
            .max_reconnects(None);
        if let Some((user, password)) = &self.credentials.user_password {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &self.credentials.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(path) = &self.settings.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|err| unreadable("nats.credentials_file", path, "a .creds file", &err))?;
        }
        if let Some(path) = &self.settings.nkey_seed_file {
            let seed = std::fs::read_to_string(path).map_err(|err| {
                unreadable(
                    "nats.nkey_seed_file",
                    path,
                    "a file holding an NKey seed",
                    &err,
                )
            })?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &self.settings.tls_ca_file {
            readable("nats.tls_ca_file", path, "PEM certificates")?;
            options = options.add_root_certificates(path.clone());
        }
        match (&self.settings.tls_cert_file, &self.settings.tls_key_file) {
            (Some(cert), Some(key)) => {
                readable("nats.tls_cert_file", cert, "a PEM certificate")?;
                readable("nats.tls_key_file", key, "a PEM private key")?;
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            (cert, _) => {
                let (set, missing) = if cert.is_some() {
                    ("nats.tls_cert_file", "nats.tls_key_file")
                } else {
                    ("nats.tls_key_file", "nats.tls_cert_file")
                };
                return Err(Error::InvalidSetting {
                    key: missing.to_owned(),
                    value: String::new(),
                    allowed: format!(
                        "a PEM file: {set} is set, and a client certificate needs both"
                    ),
                });
            }
        }
        let mut addresses = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            addresses.push(server.parse::<ServerAddr>().map_err(|err| {
                Error::InvalidSetting {
                    key: "broker.url".to_owned(),
                    value: self.endpoint(),
                    allowed: format!(
                        "NATS server URLs like nats://host:4222 or tls://host:4222, comma-separated ({err})"
                    ),
                }
            })?);
        }
        let connected = tokio::time::timeout(self.timeout, options.connect(addresses)).await;
        let client = match connected {
            Err(_) => {
                return Err(Error::BrokerTimeout {
                    operation: "connect",
                    timeout: self.timeout,
                });
            }
            Ok(Ok(client)) => client,
            Ok(Err(err)) => return Err(self.connect_error(err)),
        };
        debug!(name, endpoint = %self.endpoint(), "connected to NATS");
        Ok(client)
    }

    fn connect_error(&self, err: async_nats::ConnectError) -> Error {
        let endpoint = self.endpoint();
        let text = err.to_string();
        // async-nats reports a certificate it cannot verify as an IO error.
        let tls = err.kind() == ConnectErrorKind::Tls
            || text.contains("certificate")
            || text.contains("HandshakeFailure");
        if tls {
            return Error::BrokerRefused {
                endpoint,
                reason: text,
                fix: "the TLS handshake failed: trust the server's CA with nats.tls_ca_file, \
                      give a client certificate with nats.tls_cert_file and nats.tls_key_file \
                      if the server verifies clients, and use tls:// for a server that requires TLS"
                    .to_owned(),
            };
        }
        match err.kind() {
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                Error::BrokerRefused {
                    endpoint,
                    reason: err.to_string(),
                    fix: "check the user and password or token in broker.url, \
                          nats.credentials_file and nats.nkey_seed_file against the server's \
                          authorization block"
                        .to_owned(),
                }
            }
            ConnectErrorKind::Io | ConnectErrorKind::TimedOut | ConnectErrorKind::Dns => {
                Error::BrokerUnreachable {
                    endpoint,
                    source: Box::new(err),
                }
            }
            _ => Error::Broker {
                operation: "connect",
                endpoint,
                source: Box::new(err),
            },
        }
    }

    /// A JetStream context whose PubAck window is ours.
    pub(crate) fn jetstream(&self, client: async_nats::Client) -> async_nats::jetstream::Context {
        async_nats::jetstream::ContextBuilder::new()
            .timeout(self.timeout)
            // We never hold more un-awaited acks than the window, so
            // async-nats never has to wait for a slot (it would wait
            // without reading acks, and hang).
            .max_ack_inflight(self.settings.publish_window)
            .backpressure_on_inflight(true)
            .build(client)
    }

    pub(crate) async fn publisher(&self, name: &str) -> Result<NatsPublisher> {
        NatsPublisher::open(self, name).await
    }

    pub(crate) async fn subscribe(
        &self,
        spec: &crate::broker::SubscriptionSpec,
    ) -> Result<NatsSubscription> {
        NatsSubscription::open(self, spec).await
    }
}

/// A credentials file that cannot be read: a setting to fix, not an outage.
/// async-nats reads TLS files only while connecting, where a missing one
/// would look like a TLS failure; say which setting names it.
fn readable(key: &str, path: &std::path::Path, what: &str) -> Result<()> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|err| unreadable(key, path, what, &err))
}

fn unreadable(key: &str, path: &std::path::Path, what: &str, err: &std::io::Error) -> Error {
    Error::InvalidSetting {
        key: key.to_owned(),
        value: path.display().to_string(),
        allowed: format!("{what} this process can read ({err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Settings;

    fn nats(url: &str) -> Nats {
        let mut settings = Settings::default();
        settings.broker.url = url.to_owned();
        Nats::new(&settings.broker, &settings.nats)
    }

    #[test]
    fn credentials_come_out_of_the_url_and_stay_out_of_debug() {
        let with_password = nats("nats://app:p%40ss@h1:4222,nats://h2:4222");
        assert_eq!(with_password.servers, ["nats://h1:4222", "nats://h2:4222"]);
        let (user, password) = with_password.credentials.user_password.clone().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("app", "p@ss"));
        assert!(!format!("{with_password:?}").contains("p@ss"));
        assert!(!with_password.endpoint().contains("p%40ss"));

        let with_token = nats("tls://T0kenMarker@h:4222");
        assert_eq!(with_token.servers, ["tls://h:4222"]);
        assert_eq!(
            with_token.credentials.token.as_ref().unwrap().expose(),
            "T0kenMarker"
        );
        assert!(!format!("{with_token:?}").contains("T0kenMarker"));
        assert!(!with_token.endpoint().contains("T0kenMarker"));
    }
}
