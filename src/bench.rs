//! `segstream bench`: measurements that print their figures (not timed tests).
//!
//! `memory`: resident memory per user. Users' events go through the real engine (default
//! configuration), and the process's resident set is read from `/proc/self/statm` before and
//! after; the difference over the user count is the cost of a user (state, map entry, id).

use crate::config::RawConfig;
use crate::engine::Engine;
use crate::generate::Generator;
use std::time::Instant;

/// What `bench memory` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemoryReport {
    pub users: usize,
    pub events: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_user: f64,
    pub events_per_second: f64,
}

/// Resident set size of this process, in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Applies `events_per_user` persona events to each of `users` users and measures the growth
/// of resident memory.
pub fn memory(users: usize, events_per_user: usize) -> anyhow::Result<MemoryReport> {
    let settings = RawConfig::default().validate()?;
    let mut generator = Generator::new(1, users, 0.0);
    let mut engine = Engine::new(&settings);
    let before = rss_bytes().ok_or_else(|| anyhow::anyhow!("cannot read /proc/self/statm"))?;
    let t0 = 1_700_000_000_000i64;
    let events = users * events_per_user;
    let started = Instant::now();
    for i in 0..events {
        let t = t0 + i as i64;
        let e = generator.next_event(t);
        engine.apply(&e, t);
        if i % 1_000_000 == 0 && i > 0 {
            tracing::info!(done = i, of = events, users = engine.users(), "Applying.");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = rss_bytes().unwrap_or(before);
    let tracked = engine.users();
    Ok(MemoryReport {
        users: tracked,
        events,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_user: after.saturating_sub(before) as f64 / tracked.max(1) as f64,
        events_per_second: events as f64 / seconds.max(1e-9),
    })
}
