//! The JetStream stream the relay writes to: created or checked by
//! `outbox-cli stream`, shown by `outbox-cli status`.

use async_nats::jetstream::stream::{Config, StorageType};

use super::Nats;
use crate::settings::StreamStorage;
use crate::{Error, Result};

/// What a stream is, as configured or as found.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    /// Its name.
    pub name: String,
    /// The subjects it captures.
    pub subjects: Vec<String>,
    /// `file` or `memory`.
    pub storage: String,
    /// How long it remembers a `Nats-Msg-Id`, in seconds.
    pub duplicate_window_secs: f64,
    /// Copies on a cluster.
    pub replicas: usize,
    /// Messages in it.
    pub messages: u64,
    /// Bytes in it.
    pub bytes: u64,
}

/// What `outbox-cli stream create` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamChange {
    /// The stream did not exist and was created.
    Created,
    /// It existed as configured.
    Unchanged,
    /// It existed with other subjects, window or replicas, and was updated.
    Updated,
}

impl Nats {
    /// The stream `nats.*` describes.
    fn stream_config(&self) -> Result<Config> {
        let settings = self.settings();
        let subjects = if settings.stream_subjects.is_empty() {
            if settings.subject_prefix.is_empty() {
                return Err(Error::InvalidSetting {
                    key: "nats.stream_subjects".to_owned(),
                    value: String::new(),
                    allowed: "the subjects of the stream (e.g. `orders.>`): with an empty \
                              nats.subject_prefix there is no default"
                        .to_owned(),
                });
            }
            vec![format!("{}.>", settings.subject_prefix)]
        } else {
            settings.stream_subjects.clone()
        };
        Ok(Config {
            name: settings.stream.clone(),
            subjects,
            storage: match settings.stream_storage {
                StreamStorage::File => StorageType::File,
                StreamStorage::Memory => StorageType::Memory,
            },
            duplicate_window: settings.duplicate_window,
            num_replicas: settings.replicas,
            ..Config::default()
        })
    }

    /// Create the stream, or bring an existing one's subjects, duplicate
    /// window and replicas to the settings. Running it again changes nothing.
    pub(crate) async fn ensure_stream(&self) -> Result<(StreamChange, StreamInfo)> {
        let wanted = self.stream_config()?;
        let client = self.connect("outbox-cli stream").await?;
        let jetstream = self.jetstream(client);
        let call = |err: &dyn std::error::Error| self.api_error("stream create", err);
        let change = match jetstream.get_stream(&wanted.name).await {
            Ok(mut stream) => {
                let found = stream
                    .info()
                    .await
                    .map_err(|err| call(&err))?
                    .config
                    .clone();
                if found.storage != wanted.storage {
                    return Err(Error::InvalidSetting {
                        key: "nats.stream_storage".to_owned(),
                        value: storage_name(wanted.storage).to_owned(),
                        allowed: format!(
                            "{}, as stream {} already is: JetStream cannot change a stream's storage (delete and recreate it, losing its messages, to move it)",
                            storage_name(found.storage),
                            wanted.name
                        ),
                    });
                }
                if found.subjects == wanted.subjects
                    && found.duplicate_window == wanted.duplicate_window
                    && found.num_replicas == wanted.num_replicas
                {
                    StreamChange::Unchanged
                } else {
                    let updated = Config {
                        subjects: wanted.subjects.clone(),
                        duplicate_window: wanted.duplicate_window,
                        num_replicas: wanted.num_replicas,
                        ..found
                    };
                    jetstream
                        .update_stream(&updated)
                        .await
                        .map_err(|err| call(&err))?;
                    StreamChange::Updated
                }
            }
            Err(err) if is_not_found(&err) => {
                jetstream
                    .create_stream(wanted.clone())
                    .await
                    .map_err(|err| call(&err))?;
                StreamChange::Created
            }
            Err(err) => return Err(call(&err)),
        };
        // Where the consumer copies failed messages: DLQ.<stream>.<durable>.
        let dead_letters = Config {
            name: super::consume::dead_letter_stream(&wanted.name),
            subjects: vec![super::consume::dead_letter_subject(&wanted.name, ">")],
            storage: wanted.storage,
            num_replicas: wanted.num_replicas,
            ..Config::default()
        };
        match jetstream.get_stream(&dead_letters.name).await {
            Ok(_) => {}
            Err(err) if is_not_found(&err) => {
                jetstream
                    .create_stream(dead_letters)
                    .await
                    .map_err(|err| call(&err))?;
            }
            Err(err) => return Err(call(&err)),
        }
        let info = self.stream_info_on(&jetstream, &wanted.name).await?;
        Ok((change, info))
    }

    /// The stream as the server has it; `None` when it does not exist.
    pub(crate) async fn stream_info(&self) -> Result<Option<StreamInfo>> {
        let client = self.connect("outbox-cli status").await?;
        let jetstream = self.jetstream(client);
        let name = &self.settings().stream;
        match jetstream.get_stream(name).await {
            Ok(_) => Ok(Some(self.stream_info_on(&jetstream, name).await?)),
            Err(err) if is_not_found(&err) => Ok(None),
            Err(err) => Err(self.api_error("stream info", &err)),
        }
    }

    async fn stream_info_on(
        &self,
        jetstream: &async_nats::jetstream::Context,
        name: &str,
    ) -> Result<StreamInfo> {
        let mut stream = jetstream
            .get_stream(name)
            .await
            .map_err(|err| self.api_error("stream info", &err))?;
        let info = stream
            .info()
            .await
            .map_err(|err| self.api_error("stream info", &err))?;
        Ok(StreamInfo {
            name: info.config.name.clone(),
            subjects: info.config.subjects.clone(),
            storage: storage_name(info.config.storage).to_owned(),
            duplicate_window_secs: info.config.duplicate_window.as_secs_f64(),
            replicas: info.config.num_replicas,
            messages: info.state.messages,
            bytes: info.state.bytes,
        })
    }

    pub(crate) fn api_error(&self, operation: &'static str, err: &dyn std::error::Error) -> Error {
        Error::Broker {
            operation,
            endpoint: self.endpoint(),
            source: err.to_string().into(),
        }
    }
}

pub(crate) fn is_not_found(err: &async_nats::jetstream::context::GetStreamError) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    matches!(err.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn storage_name(storage: StorageType) -> &'static str {
    match storage {
        StorageType::File => "file",
        StorageType::Memory => "memory",
    }
}
