//! `segstream bench`: measurements that print their figures (not timed tests).
//!
//! `broker`: through a real broker, segstream's consume-and-process rate next to a bare rdkafka
//! consumer reading the same topics.
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

/// What `bench broker` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerReport {
    pub events: u64,
    pub users: usize,
    /// Segment changes the segstream run published (each one a produced record).
    pub changes: u64,
    pub bare_consumer_events_per_second: f64,
    pub segstream_events_per_second: f64,
    pub ratio: f64,
}

/// Produces `events` persona records to fresh topics on `brokers`, then times a bare consumer
/// (reads and counts) and the segstream pipeline (consumes, decodes, applies, publishes changes,
/// stores offsets) over all of them, each from a fresh consumer group.
pub async fn broker(brokers: &str, events: u64, users: usize) -> anyhow::Result<BrokerReport> {
    use crate::app::{create_all_topics, generate, settings_for, GenerateOptions};
    use crate::event::Source;
    use crate::metrics::Metrics;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use tokio_util::sync::CancellationToken;

    let prefix = format!("bench-{}", std::process::id());
    let mut settings = settings_for(brokers, &prefix);
    create_all_topics(&settings, 3).await?;
    let opts = GenerateOptions {
        rate: 0,
        users,
        malformed_ratio: 0.0,
        seed: 1,
        count: Some(events),
        create_topics: None,
    };
    generate(&settings, &opts, CancellationToken::new()).await?;
    let topics: Vec<&str> = Source::ALL.iter().map(|s| settings.topic(*s)).collect();

    // A bare consumer: the broker's and librdkafka's limit for these topics.
    let bare: StreamConsumer = crate::kafka::consumer_config(&settings)
        .set("group.id", format!("{prefix}-bare"))
        .set("enable.auto.commit", "false")
        .create()?;
    bare.subscribe(&topics)?;
    let mut n = 0u64;
    let mut started = None;
    while n < events {
        let m = bare.recv().await?;
        started.get_or_insert_with(Instant::now);
        let _ = rdkafka::Message::payload(&m).map(<[u8]>::len);
        n += 1;
    }
    let bare_rate = events as f64 / started.map_or(1e-9, |s| s.elapsed().as_secs_f64());

    // segstream, from its own group. Timed from its first message, as the bare consumer.
    settings.kafka.group_id = format!("{prefix}-segstream");
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { crate::pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    while metrics.consumed_total() == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    while metrics.consumed_total() < events {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let seg_rate = events as f64 / started.elapsed().as_secs_f64();
    let changes = metrics.changes_total();
    cancel.cancel();
    task.await??;
    Ok(BrokerReport {
        events,
        users,
        changes,
        bare_consumer_events_per_second: bare_rate,
        segstream_events_per_second: seg_rate,
        ratio: seg_rate / bare_rate,
    })
}
