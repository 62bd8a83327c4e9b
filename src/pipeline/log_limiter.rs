//! At most one log line per [`LOG_INTERVAL`] for per-message problems, which says how many it
//! stood for (the metrics count each by topic and code).

use std::time::{Duration, Instant};

#[derive(Default)]
pub(super) struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl LogLimiter {
    /// `Some(n)` when a line may be written now: `n` problems went unlogged since the last.
    pub(super) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
