//! Private servers for tests that stop, kill, restart or reconfigure one:
//! a RabbitMQ node or a PostgreSQL cluster of the test's own, on a free port
//! with its own data directory (`scripts/private-server.sh`). The machine's
//! own services are never touched. A watchdog removes the instance when the
//! test process ends, however it ends.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Rabbitmq,
    Postgres,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Rabbitmq => "rabbitmq",
            Server::Postgres => "postgres",
        }
    }
}

/// One private server instance.
pub struct Private {
    pub server: Server,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("private-server.sh")
}

async fn run_script(args: &[&str]) -> String {
    let output = tokio::process::Command::new(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run scripts/private-server.sh");
    assert!(
        output.status.success(),
        "private-server.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A port nothing listens on (below the ephemeral range).
pub async fn free_port() -> u16 {
    run_script(&["free-port"]).await.parse().expect("a port")
}

impl Private {
    /// Start a server; `extra` are rabbitmq.conf lines, or `-c name=value`
    /// pairs for PostgreSQL.
    pub async fn start(server: Server, extra: &[&str]) -> Private {
        let port = free_port().await;
        let dir = std::env::temp_dir().join(format!(
            "outbox-private-{}-{}",
            server.name(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).expect("private server dir");
        let private = Private {
            server,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        private.watchdog();
        private.up().await;
        private
    }

    /// Start (again) on the existing data.
    pub async fn up(&self) {
        let port = self.port.to_string();
        let dir = self.dir.display().to_string();
        let mut args = vec![self.server.name(), "start", dir.as_str(), port.as_str()];
        args.extend(self.extra.iter().map(String::as_str));
        run_script(&args).await;
    }

    /// Stop gracefully (`fast` shutdown for PostgreSQL).
    pub async fn stop(&self) {
        let dir = self.dir.display().to_string();
        run_script(&[self.server.name(), "stop", &dir]).await;
    }

    /// kill -9 (RabbitMQ) or an immediate shutdown (PostgreSQL, which is a crash for it).
    pub async fn kill(&self) {
        let dir = self.dir.display().to_string();
        match self.server {
            Server::Rabbitmq => run_script(&["rabbitmq", "kill", &dir]).await,
            Server::Postgres => run_script(&["postgres", "stop", &dir, "immediate"]).await,
        };
    }

    /// `rabbitmqctl` against this node.
    pub async fn ctl(&self, args: &[&str]) -> String {
        let dir = self.dir.display().to_string();
        let mut all = vec!["rabbitmq", "ctl", dir.as_str()];
        all.extend_from_slice(args);
        run_script(&all).await
    }

    /// `amqp://user:password@127.0.0.1:<port>/%2f`
    pub fn amqp_url(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:{}/%2f", self.port)
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`
    pub fn postgres_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Kill the instance and delete its directory once this process is gone.
    fn watchdog(&self) {
        let pid = std::process::id();
        let dir = self.dir.display().to_string();
        let kill = match self.server {
            Server::Rabbitmq => format!("{:?} rabbitmq kill {dir:?}", script()),
            Server::Postgres => format!("{:?} postgres stop {dir:?} immediate", script()),
        };
        let watch = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {kill} >/dev/null 2>&1; rm -rf {dir:?}"
        );
        let _ = std::process::Command::new("setsid")
            .args(["sh", "-c", &watch])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let dir = self.dir.display().to_string();
        let args: Vec<&str> = match self.server {
            Server::Rabbitmq => vec!["rabbitmq", "kill", &dir],
            Server::Postgres => vec!["postgres", "stop", &dir, "immediate"],
        };
        let _ = std::process::Command::new(script())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
