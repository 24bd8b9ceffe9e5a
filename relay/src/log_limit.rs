//! Rate limits for log lines that callers can cause: a flood of refused requests must not fill
//! the disk. Each kind of refusal the relay logs has its own [`LogLimit`], in
//! [`RefusalLogs`].

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Lines a call site may log per [`WINDOW`].
const BURST: u32 = 10;
/// The window [`BURST`] counts in.
const WINDOW: Duration = Duration::from_secs(10);

/// At most [`BURST`] lines per [`WINDOW`] from one call site; the others are counted, and the
/// next line let through says how many were left out (its `left_out` field).
#[derive(Debug)]
pub(crate) struct LogLimit(Mutex<State>);

/// The refusals the relay logs, each limited on its own.
#[derive(Debug, Default)]
pub(crate) struct RefusalLogs {
    /// A signature that did not verify.
    pub auth: LogLimit,
    /// A server key used with another server's name.
    pub other_server: LogLimit,
    /// A `connect` that the client's allow list does not grant.
    pub not_allowed: LogLimit,
    /// A `connect` refused for a limit.
    pub connect: LogLimit,
    /// A TCP connection over `max_http_connections_per_ip`.
    pub per_ip: LogLimit,
    /// A refused request's audit line, when the audit log goes to the log (to a file, every
    /// one is written).
    pub audit: LogLimit,
}

#[derive(Debug)]
struct State {
    /// When the current window began (none yet: `None`).
    since: Option<Instant>,
    /// Lines let through in the current window.
    logged: u32,
    /// Lines left out since the last one let through.
    left_out: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        Self(Mutex::new(State {
            since: None,
            logged: 0,
            left_out: 0,
        }))
    }
}

impl LogLimit {
    /// Whether a line may be logged now: `Some` with the number of lines left out before it,
    /// or `None` (counted) if the site has logged its share of this window.
    pub(crate) fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.0.lock();
        if state.since.is_none_or(|since| now >= since + WINDOW) {
            state.since = Some(now);
            state.logged = 0;
        }
        if state.logged >= BURST {
            state.left_out += 1;
            return None;
        }
        state.logged += 1;
        Some(std::mem::take(&mut state.left_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_per_window_then_the_count_of_what_was_left_out() {
        let limit = LogLimit::default();
        for _ in 0..BURST {
            assert_eq!(limit.admit(), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(limit.admit(), None);
        }
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(limit.admit(), None, "the window is not over");
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(limit.admit(), Some(26), "the first line of the next window");
        assert_eq!(limit.admit(), Some(0));
    }
}
