//! A progress line on stderr, rewritten in place with `\r`, shown only once a phase has run for two seconds so that
//! short runs (and CI logs) stay clean.

use std::time::{Duration, Instant};

/// Phases shorter than this print no progress.
const QUIET_FOR: Duration = Duration::from_secs(2);
const EVERY: Duration = Duration::from_millis(250);

/// A running progress line; [`Progress::finish`] ends it.
pub struct Progress {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Shows `label` and the text `status` returns, every quarter second after the first two seconds.
    pub fn start(label: &'static str, status: impl Fn() -> String + Send + 'static) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut shown = false;
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {}
                }
                if started.elapsed() >= QUIET_FOR {
                    eprint!("\r{label}: {}   ", status());
                    shown = true;
                }
            }
            if shown {
                eprintln!("\r{label}: {}   ", status());
            }
        });
        Self { stop, task }
    }

    /// Stops the line, printing its final state if it was shown.
    pub async fn finish(self) {
        self.stop.send_replace(true);
        self.task.await.ok();
    }
}
