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

/// NATS's decentralised auth, made by hand the way `nsc` would: an
/// operator, one account (JetStream allowed) and its users, each a JWT
/// signed with its issuer's NKey. Server mode: `operator` + a memory
/// resolver preloaded with the account.
pub struct Operator {
    operator_jwt: String,
    /// JetStream needs a system account to start in operator mode.
    system: nkeys::KeyPair,
    system_jwt: String,
    account: nkeys::KeyPair,
    account_jwt: String,
}

impl Operator {
    pub fn new() -> Operator {
        let operator = nkeys::KeyPair::new_operator();
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "test operator",
            serde_json::json!({ "type": "operator", "version": 2 }),
        );
        let account = nkeys::KeyPair::new_account();
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "test account",
            serde_json::json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                }
            }),
        );
        let system = nkeys::KeyPair::new_account();
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            serde_json::json!({ "type": "account", "version": 2 }),
        );
        Operator {
            operator_jwt,
            system,
            system_jwt,
            account,
            account_jwt,
        }
    }

    /// The server configuration that trusts this operator and knows its account.
    pub fn server_config(&self) -> String {
        format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.operator_jwt,
            self.system.public_key(),
            self.system.public_key(),
            self.system_jwt,
            self.account.public_key(),
            self.account_jwt
        )
    }

    /// A `.creds` file's text for a new user of this account, and its seed.
    pub fn user_creds(&self) -> (String, String) {
        creds(&self.account)
    }

    /// A user signed by an account this server has never heard of.
    pub fn stranger_creds(&self) -> (String, String) {
        creds(&nkeys::KeyPair::new_account())
    }
}

impl Default for Operator {
    fn default() -> Self {
        Operator::new()
    }
}

fn creds(account: &nkeys::KeyPair) -> (String, String) {
    let user = nkeys::KeyPair::new_user();
    let token = jwt(
        account,
        &user.public_key(),
        "test user",
        serde_json::json!({
            "type": "user", "version": 2,
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1
        }),
    );
    let seed = user.seed().expect("user seed");
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    (text, seed)
}

/// A NATS JWT: `header.claims.signature`, base64url without padding,
/// signed with the issuer's ed25519 NKey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let header = serde_json::json!({ "typ": "JWT", "alg": "ed25519-nkey" });
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign a JWT");
    format!("{signed}.{}", base64url(&signature))
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
