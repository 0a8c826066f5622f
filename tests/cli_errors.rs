//! What `outbox-cli` does when it cannot do its job: permanent problems end
//! it at once, non-zero, with the fix; outages are waited out (and, for a
//! `--until-empty` batch job, given up on); what is left unsent is said.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Backend, TestDb, cli, eventually, signal, status_counts, write_messages};
use outbox_core::Status;
use uuid::Uuid;

async fn run(mut command: tokio::process::Command) -> (bool, String, String, Duration) {
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the command finishes")
        .expect("run outbox-cli");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

/// A wrong password is not an outage: `publish` and `subscribe` stop at once
/// with the fix, and the password is not in the output.
#[tokio::test]
async fn a_wrong_broker_password_stops_publish_and_subscribe() {
    let t = TestDb::new(Backend::Sqlite).await;
    write_messages(&t.db, "/topic/x", 1).await;
    for args in [
        vec!["publish"],
        vec![
            "subscribe",
            "outbox_cli::callbacks::json_lines",
            "/topic/cli.errors",
        ],
    ] {
        let mut command = cli(&t.url);
        command
            .env("AMQP_URL", "amqp://guest:Wr0ngS3cret@127.0.0.1:5672/%2f")
            .args(&args);
        let (ok, _, stderr, took) = run(command).await;
        assert!(!ok, "{args:?}: {stderr}");
        assert!(
            stderr.contains("refused the connection")
                && stderr.contains("ACCESS_REFUSED")
                && stderr.contains("check the user name and password"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("Wr0ngS3cret"), "{stderr}");
        assert!(took < Duration::from_secs(30), "{args:?} took {took:?}");
    }
}

/// Subscribing to an exchange that does not exist is a setup problem.
#[tokio::test]
async fn subscribing_to_a_missing_exchange_stops_with_the_fix() {
    let t = TestDb::new(Backend::Sqlite).await;
    let exchange = format!("nosuch-{}", Uuid::new_v4().simple());
    let mut command = cli(&t.url);
    command.args([
        "subscribe",
        "outbox_cli::callbacks::json_lines",
        &format!("/exchange/{exchange}/x"),
        &format!("q.{exchange}"),
    ]);
    let (ok, _, stderr, _) = run(command).await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains(&format!("exchange `{exchange}` does not exist"))
            && stderr.contains("create it"),
        "{stderr}"
    );
    let broker = common::amqp::TestBroker::connect().await;
    broker.delete_queue(&format!("q.{exchange}")).await;
    broker.delete_queue(&format!("DLQ.q.{exchange}")).await;
}

/// Missing tables: one clear error at start, not a failure per message.
#[tokio::test]
async fn publish_and_subscribe_on_an_unmigrated_database_say_migrate() {
    let dir = std::env::temp_dir().join(format!("outbox-unmigrated-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("empty.db").display());
    for args in [
        vec!["publish", "--until-empty"],
        vec![
            "subscribe",
            "outbox_cli::callbacks::json_lines",
            "/topic/cli.unmigrated",
        ],
    ] {
        let mut command = cli(&url);
        command.args(&args);
        let (ok, _, stderr, _) = run(command).await;
        assert!(!ok, "{args:?}: {stderr}");
        assert!(
            stderr.contains("run `outbox-cli migrate`"),
            "{args:?}: {stderr}"
        );
    }
    let mut command = cli(&url);
    command.arg("migrate");
    let (ok, stdout, stderr, _) = run(command).await;
    assert!(
        ok && stdout.contains("created tables: published, received"),
        "{stdout} {stderr}"
    );
    let mut command = cli(&url);
    command.arg("migrate");
    let (ok, stdout, _, _) = run(command).await;
    assert!(ok && stdout.contains("up to date"), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `--until-empty` is a batch job: a broker it cannot reach is an error
/// after `broker.operation_timeout`, not an exit 0.
#[tokio::test]
async fn until_empty_without_a_broker_fails() {
    let t = TestDb::new(Backend::Sqlite).await;
    write_messages(&t.db, "/topic/x", 3).await;
    let mut command = cli(&t.url);
    command
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("OUTBOX_BROKER_OPERATION_TIMEOUT", "2")
        .env("OUTBOX_RELAY_CLAIM_LEASE", "5")
        .args(["publish", "--until-empty"]);
    let (ok, _, stderr, took) = run(command).await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("127.0.0.1:1") && stderr.contains("connect"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(
        status_counts(&t.db).await.get(&Status::Schedule.code()),
        Some(&3),
        "nothing is lost and no attempt is counted"
    );
}

/// A killed relay's leased rows are waited for (up to the claim lease) and
/// sent by the next `--until-empty` run, which then exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn until_empty_sends_what_a_killed_relay_held() {
    let t = TestDb::new(Backend::Postgres).await;
    let destination = format!("/topic/cli.lease.{}", Uuid::new_v4().simple());
    write_messages(&t.db, &destination, 20_000).await;
    let relay = |extra: &[&str]| {
        let mut command = cli(&t.url);
        command
            .env("OUTBOX_RELAY_CLAIM_LEASE", "4")
            .env("OUTBOX_BROKER_OPERATION_TIMEOUT", "2")
            .env("OUTBOX_RELAY_UNROUTABLE", "accept")
            .arg("publish")
            .args(extra)
            .stdout(Stdio::null());
        command
    };
    let mut first = relay(&[]).stderr(Stdio::null()).spawn().unwrap();
    eventually(Duration::from_secs(60), "some rows sent", || async {
        status_counts(&t.db)
            .await
            .get(&Status::Succeeded.code())
            .copied()
            .unwrap_or(0)
            >= 2_000
    })
    .await;
    signal(&first, "KILL");
    first.wait().await.unwrap();
    let (ok, _, stderr, _) = run(relay(&["--until-empty"])).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        status_counts(&t.db).await.get(&Status::Succeeded.code()),
        Some(&20_000),
        "{stderr}"
    );
}

/// Rows that wait for a later attempt are not "empty": the run says so and
/// exits non-zero.
#[tokio::test]
async fn until_empty_reports_rows_left_for_a_later_attempt() {
    let t = TestDb::new(Backend::Sqlite).await;
    write_messages(
        &t.db,
        &format!("/topic/nobody.{}", Uuid::new_v4().simple()),
        1,
    )
    .await;
    let mut command = cli(&t.url);
    command.args(["publish", "--until-empty"]);
    let (ok, _, stderr, _) = run(command).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("1 row(s) left unsent"), "{stderr}");
    let counts = status_counts(&t.db).await;
    assert_eq!(counts.get(&Status::Schedule.code()), Some(&1));
}

/// A typo in an `OUTBOX_*` variable is named, with the setting it meant.
#[tokio::test]
async fn an_environment_typo_is_named() {
    let t = TestDb::new(Backend::Sqlite).await;
    let mut command = cli(&t.url);
    command.env("OUTBOX_RELAY_BATCHSIZE", "5").arg("status");
    let (ok, _, stderr, _) = run(command).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("OUTBOX_RELAY_BATCHSIZE")
            && stderr.contains("did you mean OUTBOX_RELAY_BATCH_SIZE"),
        "{stderr}"
    );
}
