//! The one tracing set-up of every binary: human-readable lines on stderr, the level from `RUST_LOG` (else the
//! binary's default), colour only when stderr is a terminal and `NO_COLOR` is unset or empty.

use std::io::IsTerminal;

/// Installs the process's tracing subscriber. `default_filter` applies when `RUST_LOG` is unset or invalid.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour_allowed(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR")))
        .with_env_filter(filter)
        .init();
}

/// Whether a stream may carry colour escapes: it must be a terminal, and `NO_COLOR` (<https://no-color.org>) unset
/// or empty.
pub fn colour_allowed(is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour_allowed;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some("".into())));
        assert!(!colour_allowed(true, Some("1".into())));
        assert!(!colour_allowed(false, None));
    }
}
