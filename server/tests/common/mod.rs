//! Helpers shared by the tests that run the server binaries as child processes.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// Waits for `child` to exit, killing it and failing the test after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("child process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `child` and waits (bounded) for a clean exit.
pub fn terminate(child: &mut Child) -> ExitStatus {
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(kill.success(), "kill -TERM failed");
    wait_exit(child, Duration::from_secs(20))
}
