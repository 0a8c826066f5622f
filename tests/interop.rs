//! Wire compatibility with the Python library django-outbox-pattern 3.2.1, process against
//! process, on the real RabbitMQ and PostgreSQL.
//!
//! The Python side is the unmodified library in a virtualenv, driven through the Django project
//! in `tests/interop/` (see its README): `manage.py subscribe`, `publish`, `emit`,
//! `count_received`, `count_published`. `tests/interop/setup.sh` runs once per test binary; each
//! test then gets its own Python database, its own Rust database, and its own destinations and
//! queues, so the tests run in parallel.
//!
//! Every test is bounded by [`LIMIT`]; every child process is owned by a [`Proc`] guard that kills
//! it when the test ends, however it ends.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::amqp::TestBroker;
use common::{Backend, TestDb, eventually, postgres_admin_url, received_count, settings};
use outbox_core::entity::{published, received};
use outbox_core::{
    Consumer, ConsumerReport, Message, Metrics, Payload, Relay, Shutdown, shutdown_channel,
};
use sea_orm::{ConnectionTrait, Database, EntityTrait};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// No interop test may take longer than this; children are killed when it passes.
const LIMIT: Duration = Duration::from_secs(150);
/// How long to wait for one thing to happen (a queue, a delivery, a log line).
const WAIT: Duration = Duration::from_secs(45);
/// Messages per direction.
const N: usize = 50;

// ------------------------------------------------------------------------------------------
// Rust → Python
// ------------------------------------------------------------------------------------------

/// Rows written by us and relayed by our `Relay` reach an unmodified dop subscriber with the
/// ids and bodies we stored; resending all of them changes nothing on the Python side.
#[tokio::test(flavor = "multi_thread")]
async fn rust_relay_to_python_subscriber() {
    bounded(async {
        let py = Python::new("rs2py").await;
        let t = TestDb::new(Backend::Postgres).await;
        let broker = TestBroker::connect().await;
        let names = Names::new("rs2py");
        let _queues = QueueCleanup::new(&names.queue);

        // 50 rows for /topic/interop.rs2py.<id>, version v1 → routing key <rk>.v1.
        let messages = (0..N)
            .map(|i| {
                Message::new(&names.destination, rust_body(i))
                    .and_then(|m| m.with_version("v1"))
                    .unwrap()
            })
            .collect();
        let rows = outbox_core::write_all(&t.db, messages).await.unwrap();
        let versioned = format!("{}.v1", names.destination);
        assert!(rows.iter().all(|r| r.destination == versioned));

        let record = py.path("record.jsonl");
        let mut subscriber = py.spawn(
            "subscriber",
            &[
                "subscribe",
                "interop_app.callbacks.record",
                &versioned,
                &names.queue,
            ],
            &[("DOP_RECORD_FILE", path_str(&record))],
        );
        wait_for_consumer(&broker, &names.queue, &mut subscriber).await;

        let report = Relay::new(t.db.clone(), settings(&t.url))
            .run_until_empty(Shutdown::never())
            .await
            .unwrap();
        assert_eq!(report.published, N as u64, "{report:?}");

        wait_for_lines(&record, N, &mut subscriber).await;
        let records = read_records(&record);
        assert_eq!(records.len(), N);

        // The Python library's dedup key (its `received.msg_id`) is our row id, the body is ours,
        // and the headers the STOMP subscriber saw are the ones we stored.
        let ours: BTreeMap<String, &published::Model> =
            rows.iter().map(|r| (r.id.to_string(), r)).collect();
        let theirs: BTreeSet<String> = records.iter().map(|r| msg_id(r).to_owned()).collect();
        assert_eq!(
            theirs,
            ours.keys().cloned().collect(),
            "Python msg ids == our row ids"
        );
        for record in &records {
            let row = ours[msg_id(record)];
            assert_eq!(record["body"], row.body, "body of {}", row.id);
            let seen = &record["headers"];
            for (name, value) in row.headers.as_object().unwrap() {
                assert_eq!(&seen[name], value, "header {name} of {}", row.id);
            }
            assert_eq!(seen["destination"], versioned.as_str());
            assert_eq!(seen["dop-msg-destination"], versioned.as_str());
            assert_eq!(seen["dop-msg-type"], "Published");
        }
        assert_eq!(
            py.manage(&["count_received", "--distinct"]).await,
            N.to_string()
        );

        // Resend everything: the same dop-msg-ids again. dop acks them as duplicates.
        let resent =
            t.db.execute_unprepared("UPDATE published SET status = 1")
                .await
                .unwrap();
        assert_eq!(resent.rows_affected(), N as u64);
        let report = Relay::new(t.db.clone(), settings(&t.url))
            .run_until_empty(Shutdown::never())
            .await
            .unwrap();
        assert_eq!(report.published, N as u64, "resent: {report:?}");
        wait_for_log(&mut subscriber, "already exists. discarding the message", N).await;
        assert_eq!(py.manage(&["count_received"]).await, N.to_string());
        assert_eq!(
            read_records(&record).len(),
            N,
            "the callback never ran again"
        );
        assert_eq!(broker.message_count(&names.queue).await, 0, "all acked");
        assert_eq!(
            broker.message_count(&names.dlq()).await,
            0,
            "nothing rejected"
        );

        let status = subscriber.stop("TERM").await;
        assert!(status.success(), "subscriber exit: {status}");
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// Python → Rust
// ------------------------------------------------------------------------------------------

/// Rows emitted and published by the Python library reach our `Consumer` once each; when the
/// Python side sends them all again, our callback does not run again.
#[tokio::test(flavor = "multi_thread")]
async fn python_publisher_to_rust_subscriber() {
    bounded(async {
        let py = Python::new("py2rs").await;
        let t = TestDb::new(Backend::Postgres).await;
        let broker = TestBroker::connect().await;
        let names = Names::new("py2rs");
        let _queues = QueueCleanup::new(&names.queue);

        let calls = Arc::new(AtomicU32::new(0));
        let seen_ids = Arc::new(Mutex::new(Vec::<String>::new()));
        let metrics = Arc::new(Metrics::default());
        let consumer = Consumer::new(
            t.db.clone(),
            settings(&t.url),
            &names.destination,
            Some(&names.queue),
            {
                let calls = Arc::clone(&calls);
                let seen_ids = Arc::clone(&seen_ids);
                move |payload: Payload| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    seen_ids
                        .lock()
                        .unwrap()
                        .push(payload.msg_id().unwrap_or_default().to_owned());
                    async move { Ok(payload.save_alone().await?) }
                }
            },
        )
        .unwrap()
        .with_metrics(Arc::clone(&metrics));
        let (stop, shutdown) = shutdown_channel();
        let running = AbortOnDrop(tokio::spawn(consumer.run(shutdown)));
        wait_for_queue(&broker, &names.queue, |consumers| consumers >= 1).await;

        let emitted = py
            .manage(&[
                "emit",
                "--destination",
                &names.destination,
                "--count",
                &N.to_string(),
            ])
            .await;
        let emitted: Vec<String> = emitted
            .lines()
            .map(|line| line.split('\t').next().unwrap().to_owned())
            .collect();
        assert_eq!(emitted.len(), N, "emit printed one id per row");

        py.publish_all(N).await;
        eventually(WAIT, "our consumer saved every message", || async {
            received_count(&t.db).await == N as u64
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), N as u32);
        let called: BTreeSet<String> = seen_ids.lock().unwrap().iter().cloned().collect();
        assert_eq!(
            called,
            emitted.iter().cloned().collect(),
            "callback msg ids"
        );

        let rows = received::Entity::find().all(&t.db).await.unwrap();
        let stored: BTreeMap<String, received::Model> = rows
            .into_iter()
            .map(|r| (r.msg_id.clone().unwrap(), r))
            .collect();
        assert_eq!(
            stored.keys().cloned().collect::<BTreeSet<_>>(),
            emitted.iter().cloned().collect(),
            "our received.msg_id == the dop-msg-ids printed by emit"
        );
        for (i, id) in emitted.iter().enumerate() {
            let row = &stored[id];
            assert_eq!(
                row.body,
                Some(json!({"id": i + 1, "price": "1.50", "source": "python"})),
                "body of {id}"
            );
            let headers = row.headers.as_ref().unwrap();
            assert_eq!(headers["dop-msg-id"], id.as_str());
            assert_eq!(headers["destination"], names.destination.as_str());
            assert_eq!(headers["dop-msg-destination"], names.destination.as_str());
        }

        // The Python side sends everything again (its rows back to SCHEDULE).
        py.sql("UPDATE published SET status = 1").await;
        assert_eq!(
            py.manage(&["count_published", "--status", "schedule"])
                .await,
            N.to_string()
        );
        py.publish_all(N).await;
        eventually(WAIT, "the resent messages acked as duplicates", || async {
            Metrics::get(&metrics.duplicates) == N as u64
        })
        .await;
        assert_eq!(received_count(&t.db).await, N as u64);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            N as u32,
            "callback ran once per id"
        );

        stop.trigger();
        let report: ConsumerReport = tokio::time::timeout(WAIT, running.join())
            .await
            .expect("consumer stops")
            .unwrap();
        assert_eq!(
            report,
            ConsumerReport {
                saved: N as u64,
                duplicates: N as u64,
                dead_lettered: 0,
                requeued: 0,
            }
        );
        assert_eq!(broker.message_count(&names.queue).await, 0);
        assert_eq!(broker.message_count(&names.dlq()).await, 0);
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// Queue declarations
// ------------------------------------------------------------------------------------------

/// Python first, then us, on one queue; us first, then Python, on another: neither side's
/// declaration is refused, and both leave byte-identical queues.
#[tokio::test(flavor = "multi_thread")]
async fn queue_declarations_coexist() {
    bounded(async {
        let py = Python::new("decl").await;
        let t = TestDb::new(Backend::Postgres).await;
        let broker = TestBroker::connect().await;

        // 1. The Python subscriber declares Q and DLQ.Q; our declare of the same must succeed.
        let first = Names::new("decl_py_first");
        let _first_queues = QueueCleanup::new(&first.queue);
        let mut subscriber = py.spawn(
            "subscriber-q1",
            &[
                "subscribe",
                "interop_app.callbacks.record",
                &first.destination,
                &first.queue,
            ],
            &[("DOP_RECORD_FILE", path_str(&py.path("q1.jsonl")))],
        );
        wait_for_consumer(&broker, &first.queue, &mut subscriber).await;
        let declared = Consumer::new(
            t.db.clone(),
            settings(&t.url),
            &first.destination,
            Some(&first.queue),
            |payload: Payload| async move { Ok(payload.nack("unused")) },
        )
        .unwrap()
        .declare()
        .await
        .unwrap_or_else(|err| {
            panic!(
                "our declare after the Python subscriber's: {}",
                outbox_core::report(&err)
            )
        });
        assert_eq!(declared.queue, first.queue);
        assert_eq!(declared.dead_letter_queue, first.dlq());
        subscriber.assert_running();
        let status = subscriber.stop("TERM").await;
        assert!(status.success(), "subscriber exit: {status}");

        // 2. We declare Q2 first; the Python subscriber must come up without an ERROR frame
        //    (dop only logs those at DEBUG, and a refused DLQ declaration is otherwise silent)
        //    and consume what we relay.
        let second = Names::new("decl_rs_first");
        let _second_queues = QueueCleanup::new(&second.queue);
        Consumer::new(
            t.db.clone(),
            settings(&t.url),
            &second.destination,
            Some(&second.queue),
            |payload: Payload| async move { Ok(payload.nack("unused")) },
        )
        .unwrap()
        .declare()
        .await
        .unwrap();
        let record = py.path("q2.jsonl");
        let mut subscriber = py.spawn(
            "subscriber-q2",
            &[
                "subscribe",
                "interop_app.callbacks.record",
                &second.destination,
                &second.queue,
            ],
            &[
                ("DOP_RECORD_FILE", path_str(&record)),
                ("DOP_LOG_LEVEL", "DEBUG"),
            ],
        );
        wait_for_consumer(&broker, &second.queue, &mut subscriber).await;
        let row = outbox_core::write(
            &t.db,
            Message::new(&second.destination, json!({"hello": "python"})).unwrap(),
        )
        .await
        .unwrap();
        let report = Relay::new(t.db.clone(), settings(&t.url))
            .run_until_empty(Shutdown::never())
            .await
            .unwrap();
        assert_eq!(report.published, 1);
        wait_for_lines(&record, 1, &mut subscriber).await;
        let records = read_records(&record);
        assert_eq!(msg_id(&records[0]), row.id.to_string());
        assert_eq!(records[0]["body"], json!({"hello": "python"}));
        subscriber.assert_running();
        let log = subscriber.log(); // before the shutdown, which disconnects on purpose
        let status = subscriber.stop("TERM").await;
        assert!(status.success(), "subscriber exit: {status}");
        for bad in [
            "received an error",
            "precondition_failed",
            "Consumer disconnected",
        ] {
            assert!(
                !log.to_lowercase().contains(&bad.to_lowercase()),
                "the Python subscriber saw '{bad}' on a queue we declared:\n{}",
                tail(&log)
            );
        }

        // 3. The broker's records, with AMQP field types: ours are the Python ones, name for name.
        let python_made = describe_queues(&first.queue).await;
        let rust_made = describe_queues(&second.queue).await;
        assert_eq!(
            rust_made, python_made,
            "queues declared by us vs by the Python subscriber"
        );
        let dlq_args = list_queue_arguments(&second.dlq()).await;
        assert!(
            dlq_args.contains(&format!(
                "{{\"x-dead-letter-routing-key\",\"DLQ.DLQ.DLQ.{}\"}}",
                second.queue
            )),
            "our DLQ's dead-letter routing key: {dlq_args}"
        );
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// Dead letters
// ------------------------------------------------------------------------------------------

/// What we relay to a queue whose Python callback raises ends in the Python `DLQ.<Q>`.
#[tokio::test(flavor = "multi_thread")]
async fn python_dlq_receives_rust_messages() {
    bounded(async {
        let py = Python::new("dlq").await;
        let t = TestDb::new(Backend::Postgres).await;
        let broker = TestBroker::connect().await;
        let names = Names::new("dlq");
        let _queues = QueueCleanup::new(&names.queue);

        let failures = py.path("fail.jsonl");
        let mut subscriber = py.spawn(
            "fail-subscriber",
            &[
                "subscribe",
                "interop_app.callbacks.fail",
                &names.destination,
                &names.queue,
            ],
            &[("DOP_FAIL_RECORD_FILE", path_str(&failures))],
        );
        wait_for_consumer(&broker, &names.queue, &mut subscriber).await;

        const DEAD: usize = 3;
        let ids = common::write_messages(&t.db, &names.destination, DEAD).await;
        let report = Relay::new(t.db.clone(), settings(&t.url))
            .run_until_empty(Shutdown::never())
            .await
            .unwrap();
        assert_eq!(report.published, DEAD as u64);

        let dlq = names.dlq();
        let deadline = tokio::time::Instant::now() + WAIT;
        while broker.message_count(&dlq).await < DEAD as u32 {
            subscriber.assert_running();
            assert!(
                tokio::time::Instant::now() < deadline,
                "{dlq} has {} of {DEAD} messages:\n{}",
                broker.message_count(&dlq).await,
                tail(&subscriber.log())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rejected: BTreeSet<String> = read_records(&failures)
            .iter()
            .map(|r| msg_id(r).to_owned())
            .collect();
        let ids: BTreeSet<String> = ids.iter().map(Uuid::to_string).collect();
        assert_eq!(rejected, ids, "the fail callback saw each of our messages");
        assert_eq!(py.manage(&["count_received"]).await, "0");
        assert_eq!(broker.message_count(&names.queue).await, 0);

        let status = subscriber.stop("TERM").await;
        assert!(status.success(), "subscriber exit: {status}");
        let dead = broker.take(&dlq, DEAD, Duration::from_secs(5)).await;
        assert_eq!(dead.len(), DEAD);
        for message in &dead {
            assert_eq!(
                message.routing_key, dlq,
                "dead-lettered with routing key DLQ.<Q>"
            );
            assert_eq!(
                message
                    .headers
                    .get("x-first-death-reason")
                    .map(String::as_str),
                Some("rejected")
            );
        }
        let dead_ids: BTreeSet<String> = dead
            .iter()
            .map(|m| m.headers["dop-msg-id"].clone())
            .collect();
        assert_eq!(dead_ids, ids, "the dead letters keep their dop-msg-id");
    })
    .await;
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

/// Run a test body, failing it (and so dropping, i.e. killing, its children) after [`LIMIT`].
async fn bounded(test: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(LIMIT, test).await.is_err() {
        panic!("interop test did not finish within {LIMIT:?}");
    }
}

/// A body with the JSON types a Python consumer must get back unchanged.
fn rust_body(i: usize) -> Value {
    json!({
        "n": i,
        "source": "rust",
        "price": "12.50",
        "name": "Zoë ✓ \"quoted\"",
        "tags": ["a", "b"],
        "nested": {"ok": true, "nothing": null},
        "ratio": 0.25,
    })
}

/// A destination and a queue name unique to one test.
struct Names {
    destination: String,
    queue: String,
}

impl Names {
    fn new(what: &str) -> Names {
        let id = &Uuid::new_v4().simple().to_string()[..12];
        Names {
            destination: format!("/topic/interop.{}.{id}", what.replace('_', ".")),
            queue: format!("interop_{what}_{id}"),
        }
    }

    fn dlq(&self) -> String {
        format!("DLQ.{}", self.queue)
    }
}

/// The dedup key the Python library used (`received.msg_id`), as recorded by `callbacks.*`.
fn msg_id(record: &Value) -> &str {
    record["msg_id"].as_str().expect("msg_id in record")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `tests/interop/setup.sh`, once per test binary (it is idempotent, but a first run creates
/// the virtualenv, which must not happen twice at once).
async fn setup_once() {
    static SETUP: OnceCell<Result<(), String>> = OnceCell::const_new();
    let result = SETUP
        .get_or_init(|| async {
            let script = repo_root().join("tests/interop/setup.sh");
            let output = tokio::time::timeout(
                Duration::from_secs(600),
                tokio::process::Command::new("bash")
                    .arg(&script)
                    .env_remove("DOP_DATABASE_NAME")
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .map_err(|_| "tests/interop/setup.sh took more than 600 s".to_owned())?
            .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "tests/interop/setup.sh failed ({}):\n{}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ))
            }
        })
        .await;
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// The Python service of one test: its own database and a work directory for logs and record
/// files. The database is dropped at the end; the work directory too, unless the test failed.
struct Python {
    python: PathBuf,
    manage: PathBuf,
    project: PathBuf,
    database: String,
    work: PathBuf,
}

impl Python {
    async fn new(what: &str) -> Python {
        setup_once().await;
        let root = repo_root();
        let id = &Uuid::new_v4().simple().to_string()[..12];
        let database = format!("dop_it_{what}_{id}");
        let admin = Database::connect(postgres_admin_url()).await.unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        let work = std::env::temp_dir().join(format!("outbox-interop-{what}-{id}"));
        std::fs::create_dir_all(&work).unwrap();
        let py = Python {
            python: root.join("target/interop-venv/bin/python"),
            project: root.join("tests/interop/dop_project"),
            manage: root.join("tests/interop/dop_project/manage.py"),
            database,
            work,
        };
        py.manage(&["migrate", "--noinput"]).await;
        py
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    fn command(&self, program: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.project)
            .env("DOP_DATABASE_NAME", &self.database)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null());
        command
    }

    /// Run a management command to completion; its trimmed stdout.
    async fn manage(&self, args: &[&str]) -> String {
        let mut command = tokio::process::Command::from(self.command(&self.python));
        command.arg(&self.manage).args(args).kill_on_drop(true);
        let output = tokio::time::timeout(WAIT, command.output())
            .await
            .unwrap_or_else(|_| panic!("manage.py {args:?} took more than {WAIT:?}"))
            .unwrap();
        assert!(
            output.status.success(),
            "manage.py {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// Start a long-running management command, its output going to `<work>/<name>.log`.
    fn spawn(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let log = self.path(&format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = self.command(&self.python);
        if args.first() == Some(&"publish") {
            // `publish` stops only on KeyboardInterrupt. A process started with SIGINT ignored
            // (e.g. under a background job of a non-interactive shell) passes that on, and
            // Python then never raises it: restore the default handler before running manage.py.
            command.args([
                "-c",
                "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); \
                 sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
            ]);
        }
        command
            .arg(&self.manage)
            .args(args)
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command.spawn().unwrap();
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Run `manage.py publish` until `count_published` shows `n` rows SUCCEEDED, then SIGINT it.
    async fn publish_all(&self, n: usize) {
        let mut publisher = self.spawn("publisher", &["publish"], &[]);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            publisher.assert_running();
            if self
                .manage(&["count_published", "--status", "succeeded"])
                .await
                == n.to_string()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "manage.py publish did not send {n} rows in {WAIT:?}:\n{}",
                tail(&publisher.log())
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let status = publisher.stop("INT").await;
        assert!(status.success(), "publisher exit after SIGINT: {status}");
    }

    /// Run SQL on the Python service's database.
    async fn sql(&self, statement: &str) {
        let url = format!(
            "{}/{}",
            postgres_admin_url().rsplit_once('/').unwrap().0,
            self.database
        );
        let db = common::connect(&url).await;
        db.execute_unprepared(statement).await.unwrap();
        db.close().await.unwrap();
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work);
        } else {
            eprintln!("interop: logs kept in {}", self.work.display());
        }
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin = Database::connect(postgres_admin_url()).await.ok()?;
                admin.execute_unprepared(&statement).await.ok()
            })
        })
        .join();
    }
}

/// A child process that is killed (SIGKILL) when dropped, unless it already exited.
struct Proc {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Panic, with the end of its log, if the process has exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited early ({status}):\n{}",
                self.name,
                tail(&self.log())
            );
        }
    }

    /// Send `signal` and wait (bounded) for the exit.
    async fn stop(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not exit within 30 s of SIG{signal}:\n{}",
                self.name,
                tail(&self.log())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A spawned task aborted when dropped (our consumer, if the test fails before stopping it).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> T {
        (&mut self.0).await.expect("task")
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deletes `<queue>` and `DLQ.<queue>` when dropped.
struct QueueCleanup(String);

impl QueueCleanup {
    fn new(queue: &str) -> QueueCleanup {
        QueueCleanup(queue.to_owned())
    }
}

impl Drop for QueueCleanup {
    fn drop(&mut self) {
        let queue = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let broker = TestBroker::connect().await;
                broker.delete_queue(&queue).await;
                broker.delete_queue(&format!("DLQ.{queue}")).await;
                Some(())
            })
        })
        .join();
    }
}

/// The last lines of a log, for failure messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Wait until `queue` exists with a consumer count that satisfies `ready`.
async fn wait_for_queue(broker: &TestBroker, queue: &str, ready: impl Fn(u32) -> bool) {
    eventually(WAIT, &format!("queue {queue} consumed"), || async {
        broker
            .queue(queue)
            .await
            .is_some_and(|q| ready(q.consumer_count()))
    })
    .await;
}

/// Wait until a Python subscriber consumes `queue`.
async fn wait_for_consumer(broker: &TestBroker, queue: &str, subscriber: &mut Proc) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        subscriber.assert_running();
        let probe = tokio::time::timeout(
            Duration::from_millis(500),
            wait_for_queue(broker, queue, |consumers| consumers >= 1),
        );
        if probe.await.is_ok() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never consumed {queue}:\n{}",
            subscriber.name,
            tail(&subscriber.log())
        );
    }
}

/// Complete JSON lines of a record file (none if it does not exist yet).
fn read_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

/// Wait until `path` has `n` complete lines, checking that the writer is alive.
async fn wait_for_lines(path: &Path, n: usize, writer: &mut Proc) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while read_records(path).len() < n {
        writer.assert_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} has {} of {n} lines after {WAIT:?}:\n{}",
            path.display(),
            read_records(path).len(),
            tail(&writer.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until the process's log contains `needle` `n` times.
async fn wait_for_log(process: &mut Proc, needle: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while process.log().matches(needle).count() < n {
        process.assert_running();
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: '{needle}' logged {} of {n} times:\n{}",
            process.name,
            process.log().matches(needle).count(),
            tail(&process.log())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tests/interop/amqp_probe.sh describe` for `<queue>` and `DLQ.<queue>`: flags and
/// arguments with their AMQP types, with the queue name replaced by `Q`.
async fn describe_queues(queue: &str) -> String {
    let probe = repo_root().join("tests/interop/amqp_probe.sh");
    let dlq = format!("DLQ.{queue}");
    let mut command = Command::new("bash");
    command.arg(probe).args(["describe", queue, &dlq]);
    let out = run_tool(command).await;
    let records: Vec<&str> = out.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(records.len(), 2, "describe {queue}: {out}");
    assert!(!out.contains("not_found"), "describe {queue}: {out}");
    records.join("\n").replace(queue, "Q")
}

/// `rabbitmqctl list_queues name arguments`, the line of `queue`.
async fn list_queue_arguments(queue: &str) -> String {
    let mut command = Command::new(rabbitmqctl());
    command.args([
        "-q",
        "list_queues",
        "--no-table-headers",
        "name",
        "arguments",
    ]);
    let out = run_tool(command).await;
    out.lines()
        .find(|line| line.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("{queue} not in list_queues:\n{out}"))
        .to_owned()
}

fn rabbitmqctl() -> PathBuf {
    let sbin = Path::new("/usr/sbin/rabbitmqctl");
    if sbin.exists() {
        sbin.to_owned()
    } else {
        PathBuf::from("rabbitmqctl")
    }
}

/// Run a short tool (bounded), returning its stdout; panic on failure.
async fn run_tool(command: Command) -> String {
    let mut command = tokio::process::Command::from(command);
    let path = std::env::var("PATH").unwrap_or_default();
    command
        .env("PATH", format!("{path}:/usr/sbin:/sbin"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("tool took more than 60 s")
        .unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
