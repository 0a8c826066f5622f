//! NATS JetStream for tests: the machine's server on 4222 (streams of the
//! test's own, deleted at the end), or a private nats-server on a free port
//! with its own store directory for tests that kill and restart it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream;

pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// One message as the stream holds it.
#[derive(Debug)]
pub struct Stored {
    pub subject: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// A stream of the test's own (name and subject prefix unique), deleted with
/// its dead-letter stream on drop.
pub struct TestStream {
    pub name: String,
    pub prefix: String,
    pub url: String,
    jetstream: jetstream::Context,
}

impl TestStream {
    /// Create it through `outbox_core::ensure_stream` with these settings'
    /// `nats.*` (name and prefix are set here).
    pub async fn create(url: &str, settings: &mut outbox_core::Settings) -> TestStream {
        let unique = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let name = format!("TEST_{unique}");
        let prefix = format!("t{unique}");
        settings.broker.url = url.to_owned();
        settings.nats.stream = name.clone();
        settings.nats.subject_prefix = prefix.clone();
        let (change, _) = outbox_core::ensure_stream(settings)
            .await
            .expect("stream create");
        assert_eq!(change, outbox_core::StreamChange::Created);
        TestStream {
            name,
            prefix,
            url: url.to_owned(),
            jetstream: jetstream::new(async_nats::connect(url).await.expect("connect to NATS")),
        }
    }

    /// Messages in the stream now.
    pub async fn count(&self) -> u64 {
        match self.jetstream.get_stream(&self.name).await {
            Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        }
    }

    /// Every message, in stream order.
    pub async fn messages(&self) -> Vec<Stored> {
        let stream = self.jetstream.get_stream(&self.name).await.expect("stream");
        let mut info = stream.clone();
        let last = info.info().await.expect("info").state.last_sequence;
        let mut out = Vec::new();
        for sequence in 1..=last {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            let headers = message
                .headers
                .iter()
                .flat_map(|(name, values)| {
                    values
                        .iter()
                        .map(move |value| (name.to_string(), value.as_str().to_owned()))
                })
                .collect();
            out.push(Stored {
                subject: message.subject.to_string(),
                headers,
                body: message.payload.to_vec(),
            });
        }
        out
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (jetstream, name) = (self.jetstream.clone(), self.name.clone());
        // Best effort, on a runtime of its own (drop may run outside one).
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    for stream in [name.clone(), format!("{name}_DLQ")] {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            jetstream.delete_stream(&stream),
                        )
                        .await;
                    }
                });
            }
        })
        .join();
    }
}

/// A nats-server of the test's own, with JetStream and a store directory.
pub struct PrivateNats {
    pub port: u16,
    dir: PathBuf,
    child: Option<tokio::process::Child>,
    /// `--user`/`--pass` the server requires, if any.
    user: Option<(String, String)>,
    /// A configuration file (`-c`); the server is then ready when its log says so.
    config: Option<PathBuf>,
}

impl PrivateNats {
    pub async fn start() -> PrivateNats {
        PrivateNats::start_as(None).await
    }

    /// A server that admits only `user` with `password`.
    pub async fn start_with_user(user: &str, password: &str) -> PrivateNats {
        PrivateNats::start_as(Some((user.to_owned(), password.to_owned()))).await
    }

    /// A server with this configuration file text besides the port and
    /// store (for TLS and NKey users); `dir()` may hold files it names.
    pub async fn start_with_config(config: impl FnOnce(&std::path::Path) -> String) -> PrivateNats {
        let mut nats = PrivateNats::start_as_not_up(None).await;
        let path = nats.dir.join("server.conf");
        std::fs::write(&path, config(&nats.dir)).expect("write server.conf");
        nats.config = Some(path);
        nats.up().await;
        nats
    }

    async fn start_as(user: Option<(String, String)>) -> PrivateNats {
        let mut nats = PrivateNats::start_as_not_up(user).await;
        nats.up().await;
        nats
    }

    async fn start_as_not_up(user: Option<(String, String)>) -> PrivateNats {
        let port = super::private::free_port().await;
        let dir = std::env::temp_dir().join(format!(
            "outbox-private-nats-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).expect("store dir");
        PrivateNats {
            port,
            dir,
            child: None,
            user,
            config: None,
        }
    }

    /// Its own directory (the store, the log, files a test puts there).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same store.
    pub async fn up(&mut self) {
        let mut command = tokio::process::Command::new("nats-server");
        command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir);
        if let Some((user, password)) = &self.user {
            command.args(["--user", user, "--pass", password]);
        }
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
            // Readiness is read from the log: not from an earlier start's.
            let _ = std::fs::remove_file(self.dir.join("server.log"));
        }
        let child = command
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server (scripts/services.sh nats installs it)");
        self.child = Some(child);
        let log = self.dir.join("server.log");
        if self.config.is_some() {
            // Its clients need what the file asks for; its log says when it is up.
            super::eventually(
                Duration::from_secs(20),
                &format!("the private nats-server is ready (log: {})", log.display()),
                || async {
                    std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains("Server is ready")
                },
            )
            .await;
            return;
        }
        super::eventually(
            Duration::from_secs(20),
            &format!("the private nats-server answers (log: {})", log.display()),
            || async {
                let options = match &self.user {
                    Some((user, password)) => async_nats::ConnectOptions::with_user_and_password(
                        user.clone(),
                        password.clone(),
                    ),
                    None => async_nats::ConnectOptions::new(),
                };
                match options.connect(self.url()).await {
                    // JetStream answers its API (async-nats 0.51 cannot parse
                    // 2.9's account info, so the raw request).
                    Ok(client) => client.request("$JS.API.INFO", "".into()).await.is_ok(),
                    Err(_) => false,
                }
            },
        )
        .await;
    }

    /// SIGSTOP: the server holds every connection open and answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`PrivateNats::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|child| child.id())
            .expect("nats-server running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} nats-server");
    }

    /// kill -9.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("kill nats-server");
            child.wait().await.expect("nats-server gone");
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
