//! Secrets never leave the process: every `outbox-cli` command, with good
//! settings and bad ones (wrong password, a server down, a malformed URL, a
//! settings file), runs with a marker password in its URLs at debug log
//! level, and the marker must appear nowhere in stdout or stderr; a command
//! that works logs no ERROR line.
//!
//! The bad inputs also make the table in docs/ERRORS.md: each must end the
//! command non-zero with one `error:` line that names the problem and the
//! fix. `cargo test -p outbox-tests --test secrets -- --nocapture` prints the
//! table with the messages as they are now.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::amqp::rabbitmqctl;
use common::{Backend, TestDb, amqp_url, cli, eventually, received_count, signal};
use sea_orm::ConnectionTrait as _;
use tokio::io::AsyncBufReadExt as _;
use uuid::Uuid;

const MARKER: &str = "Mk7Pa55w0rdMarker";

/// Debug for everything, dependencies included: what a user debugging a
/// problem would turn on.
const LOG: &str = "debug";

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(mut command: tokio::process::Command) -> Output {
    command.env("RUST_LOG", LOG).stdin(Stdio::null());
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the command finishes")
        .expect("run outbox-cli");
    Output {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn assert_no_marker(what: &str, output: &Output) {
    for (stream, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        if let Some(at) = text.find(MARKER) {
            let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!(
                "{what}: the password is in {stream}:\n{}",
                &text[line_start..line_end]
            );
        }
    }
}

/// A command that did its job logs no ERROR line, not even from a library
/// (lapin logs one when a channel is still closing as its connection closes).
fn assert_no_error_line(what: &str, output: &Output) {
    if let Some(line) = output.stderr.lines().find(|line| line.contains(" ERROR ")) {
        panic!("{what} succeeded but logged an ERROR line:\n{line}");
    }
}

/// `postgres://postgres@host/db` with the marker as password (the machine's
/// PostgreSQL trusts loopback, so the password is sent and ignored).
fn with_marker(url: &str) -> String {
    let marked = url.replacen("://postgres@", &format!("://postgres:{MARKER}@"), 1);
    assert!(
        marked.contains(MARKER),
        "no user `postgres` to give a password in {url}"
    );
    marked
}

/// A broker user whose password is the marker, removed on drop.
struct BrokerUser(String);

impl BrokerUser {
    async fn create() -> BrokerUser {
        let name = format!("secrets-{}", &Uuid::new_v4().simple().to_string()[..8]);
        rabbitmqctl(&["add_user", &name, MARKER]).await;
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]).await;
        BrokerUser(name)
    }

    fn url(&self) -> String {
        let base = amqp_url();
        let host = base
            .rsplit_once('@')
            .map_or("127.0.0.1:5672/%2f", |(_, h)| h);
        format!("amqp://{}:{MARKER}@{host}", self.0)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.0])
            .output();
    }
}

/// Every command with working settings: the marker is in both URLs, and
/// the commands work.
#[tokio::test]
async fn no_command_prints_the_password() {
    let t = TestDb::new(Backend::Postgres).await;
    let user = BrokerUser::create().await;
    let database = with_marker(&t.url);
    let broker = user.url();
    let destination = format!("/topic/secrets.{}", Uuid::new_v4().simple());
    let queue = destination.rsplit('/').next().unwrap().to_owned();
    let command = |args: &[&str]| {
        let mut command = cli(&database);
        command.env("AMQP_URL", &broker).args(args);
        command
    };

    for args in [
        vec!["migrate"],
        vec!["callbacks"],
        vec![
            "send",
            &destination,
            r#"{"id": 1}"#,
            "--header",
            "note=hello",
        ],
    ] {
        let output = run(command(&args)).await;
        assert!(output.ok, "{args:?}: {}", output.stderr);
        assert_no_marker(&format!("{args:?}"), &output);
        assert_no_error_line(&format!("{args:?}"), &output);
    }

    // subscribe, until it has stored the message the relay sends.
    let mut subscriber = command(&[
        "subscribe",
        "outbox_cli::callbacks::json_lines",
        &destination,
    ]);
    subscriber
        .env("RUST_LOG", LOG)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = subscriber.spawn().expect("start subscribe");
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let collected = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let mut text = String::new();
        let mut ready = Some(ready_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("waiting for messages")
                && let Some(ready) = ready.take()
            {
                let _ = ready.send(());
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    tokio::time::timeout(Duration::from_secs(60), ready_rx)
        .await
        .expect("subscribe declares its queue")
        .expect("subscribe logs that it waits");

    for args in [
        vec!["publish", "--until-empty"],
        vec!["status"],
        vec!["status", "--json"],
    ] {
        let output = run(command(&args)).await;
        assert!(output.ok, "{args:?}: {}", output.stderr);
        assert_no_marker(&format!("{args:?}"), &output);
        assert_no_error_line(&format!("{args:?}"), &output);
    }
    eventually(
        Duration::from_secs(60),
        "the message is received",
        || async { received_count(&t.db).await == 1 },
    )
    .await;
    signal(&child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("subscribe stops on SIGTERM")
        .expect("wait for subscribe");
    let mut stdout = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout)
        .await
        .unwrap();
    let subscribed = Output {
        ok: status.success(),
        stdout,
        stderr: collected.await.unwrap(),
    };
    assert!(subscribed.ok, "subscribe: {}", subscribed.stderr);
    assert!(
        subscribed.stdout.contains("\"note\":\"hello\""),
        "{}",
        subscribed.stdout
    );
    assert_no_marker("subscribe", &subscribed);
    assert_no_error_line("subscribe", &subscribed);

    for args in [vec!["failed", "list"], vec!["dlq", "list", &queue]] {
        let output = run(command(&args)).await;
        assert!(output.ok, "{args:?}: {}", output.stderr);
        assert_no_marker(&format!("{args:?}"), &output);
        assert_no_error_line(&format!("{args:?}"), &output);
    }
}

/// One bad input: what it is, how to give it, what the error must say.
struct Bad {
    what: &'static str,
    env: Vec<(&'static str, String)>,
    args: Vec<&'static str>,
    config: Option<String>,
    says: &'static [&'static str],
}

/// Bad settings and servers that are not there: each ends non-zero with
/// one `error:` line naming the problem and the fix, and no password.
#[tokio::test]
async fn bad_input_gives_one_clear_line_without_the_password() {
    let t = TestDb::new(Backend::Postgres).await;
    let database = with_marker(&t.url);
    let closed = common::ClosedPort::bind();
    let closed_port = closed.port;
    let unmigrated = TestDb::new(Backend::Postgres).await;
    unmigrated
        .db
        .execute_unprepared("DROP TABLE published; DROP TABLE received")
        .await
        .expect("drop the outbox tables");
    let wrong_broker = format!("amqp://guest:{MARKER}@127.0.0.1:5672/%2f");
    let cases = vec![
        Bad {
            what: "database not running",
            env: vec![(
                "DATABASE_URL",
                format!("postgres://app:{MARKER}@127.0.0.1:{closed_port}/app"),
            )],
            args: vec!["status"],
            config: None,
            says: &[
                "cannot connect to the database",
                "nothing answers at 127.0.0.1:",
                "is the database running",
            ],
        },
        Bad {
            what: "database URL with a typo in the scheme",
            env: vec![("DATABASE_URL", format!("postgress://app:{MARKER}@db/app"))],
            args: vec!["migrate"],
            config: None,
            says: &["database.url", "postgres://"],
        },
        Bad {
            what: "wrong broker password",
            env: vec![
                ("DATABASE_URL", database.clone()),
                ("AMQP_URL", wrong_broker.clone()),
            ],
            args: vec!["publish", "--until-empty"],
            config: None,
            says: &["ACCESS_REFUSED", "check the user name and password"],
        },
        Bad {
            what: "broker not running",
            env: vec![
                ("DATABASE_URL", database.clone()),
                (
                    "AMQP_URL",
                    format!("amqp://guest:{MARKER}@127.0.0.1:{closed_port}/%2f"),
                ),
                ("OUTBOX_BROKER_OPERATION_TIMEOUT", "2".to_owned()),
            ],
            args: vec!["publish", "--until-empty"],
            config: None,
            says: &[
                "nothing answers at amqp://guest:***@127.0.0.1:",
                "is the broker running",
            ],
        },
        Bad {
            what: "NATS server not running (token in the URL)",
            env: vec![
                ("DATABASE_URL", database.clone()),
                (
                    "AMQP_URL",
                    format!("nats://{MARKER}@127.0.0.1:{closed_port}"),
                ),
                ("OUTBOX_BROKER_OPERATION_TIMEOUT", "2".to_owned()),
            ],
            args: vec!["publish", "--until-empty"],
            config: None,
            says: &[
                "nothing answers at nats://***@127.0.0.1:",
                "is the broker running",
            ],
        },
        Bad {
            what: "broker URL with a wrong scheme",
            env: vec![
                ("DATABASE_URL", database.clone()),
                (
                    "AMQP_URL",
                    format!("amqpx://guest:{MARKER}@127.0.0.1:5672/%2f"),
                ),
            ],
            args: vec!["publish"],
            config: None,
            says: &["broker.url", "amqp://"],
        },
        Bad {
            what: "tables not created",
            env: vec![("DATABASE_URL", with_marker(&unmigrated.url))],
            args: vec!["publish"],
            config: None,
            says: &["run `outbox-cli migrate`"],
        },
        Bad {
            what: "unknown key in the settings file",
            env: vec![],
            args: vec!["status"],
            config: Some(format!(
                "[database]\nurl = \"{database}\"\n\n[relay]\nbatchsize = 5\n"
            )),
            says: &[
                "unknown setting `relay.batchsize`",
                "did you mean `relay.batch_size`?",
            ],
        },
        Bad {
            what: "invalid value in the environment",
            env: vec![
                ("DATABASE_URL", database.clone()),
                ("OUTBOX_RELAY_BATCH_SIZE", "many".to_owned()),
            ],
            args: vec!["status"],
            config: None,
            says: &["OUTBOX_RELAY_BATCH_SIZE"],
        },
        Bad {
            what: "body that is not JSON",
            env: vec![("DATABASE_URL", database.clone())],
            args: vec!["send", "/topic/x", "{id: 1}"],
            config: None,
            says: &["the body is not JSON", "quoted for the shell"],
        },
        Bad {
            what: "unknown callback",
            env: vec![("DATABASE_URL", database.clone())],
            args: vec!["subscribe", "my_service::on_order", "/topic/x"],
            config: None,
            says: &["my_service::on_order", "use my_service as _;"],
        },
    ];

    let dir = std::env::temp_dir().join(format!("outbox-secrets-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut table =
        String::from("| bad input | command | what `outbox-cli` says (stderr) |\n|---|---|---|\n");
    for (i, case) in cases.iter().enumerate() {
        let mut command = cli(&database);
        command.env_remove("DATABASE_URL").env_remove("AMQP_URL");
        for (name, value) in &case.env {
            command.env(name, value);
        }
        if let Some(config) = &case.config {
            let path = dir.join(format!("outbox-{i}.toml"));
            std::fs::write(&path, config).unwrap();
            command.arg("--config").arg(&path);
        }
        command.args(&case.args);
        let output = run(command).await;
        assert_no_marker(case.what, &output);
        assert!(
            !output.ok,
            "{}: the command succeeded: {}",
            case.what, output.stderr
        );
        let errors: Vec<&str> = output
            .stderr
            .lines()
            .filter(|line| line.starts_with("error:"))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{}: one error line: {}",
            case.what,
            output.stderr
        );
        for phrase in case.says {
            assert!(
                errors[0].contains(phrase),
                "{}: {phrase:?} not in {:?}",
                case.what,
                errors[0]
            );
        }
        let error = errors[0]
            .replace(closed_port.to_string().as_str(), "<port>")
            .replace('|', "\\|");
        table.push_str(&format!(
            "| {} | `outbox-cli {}` | `` {} `` |\n",
            case.what,
            case.args.join(" "),
            error
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("{table}");
}
