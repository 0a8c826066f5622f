//! A one-line progress display for long operations, on terminals only.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// Redraws `\r<text>` on stderr at most every 200 ms when stderr is a terminal.
#[derive(Debug)]
pub(crate) struct Progress {
    enabled: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: None,
        }
    }

    /// Show `done` of `total` (if known) with the rate so far.
    pub(crate) fn update(&mut self, what: &str, done: u64, total: Option<u64>) {
        if !self.enabled
            || self
                .last
                .is_some_and(|at| at.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        self.last = Some(Instant::now());
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let of = total.map(|t| format!(" / {t}")).unwrap_or_default();
        let mut stderr = std::io::stderr().lock();
        let _ = write!(stderr, "\r{what} {done}{of} ({rate:.0}/s)\x1b[K");
        let _ = stderr.flush();
    }

    /// End the line (after a display drawn from another task).
    pub(crate) fn end_line(&self) {
        if self.enabled {
            eprintln!();
        }
    }
}
