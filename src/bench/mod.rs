//! `segstream bench`: measurements that print their figures (not timed tests).
//!
//! `broker`: through a real broker, segstream's consume-and-process rate next to a bare rdkafka
//! consumer reading the same topics.
//!
//! `pipeline`: pre-generated Avro bytes through decode + engine on all cores: the records are
//! split by user into one shard per thread (as partitions split users between instances), each
//! thread runs its own decoder and engine; the first half of every shard warms its engine, the
//! second half is timed.
//!
//! `restore`: a full checkpoint of N users written to a changelog on a real broker, then the
//! time to restore every partition into a fresh engine (what a starting instance does).
//!
//! `memory`: resident memory per user. Users' events go through the real engine (default
//! configuration), and the process's resident set is read from `/proc/self/statm` before and
//! after; the difference over the user count is the cost of a user (state, map entry, id).

pub mod cli;

use crate::config::{RawConfig, Settings};
use crate::engine::Engine;
use crate::generate::{Generator, Record};
use std::collections::HashMap;
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
pub(crate) fn rss_bytes() -> Option<u64> {
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

/// What `bench pipeline` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineReport {
    pub threads: usize,
    pub users: usize,
    /// Events timed (the second half of the generated ones).
    pub events: usize,
    pub seconds: f64,
    pub events_per_second: f64,
    pub events_per_second_per_core: f64,
    /// Model-space vectors of the users at the end, one row per timed event (f64, row-major,
    /// 50 columns), when `vectors_out` was given: the same stream for the scikit-learn script.
    pub vectors_written: usize,
}

/// Decode + apply over all cores (see the module documentation). With `vectors_out`, writes the
/// final model vector of each timed event's user, in stream order, as raw little-endian f64.
pub fn pipeline(
    events: usize,
    users: usize,
    threads: usize,
    vectors_out: Option<&std::path::Path>,
) -> anyhow::Result<PipelineReport> {
    use crate::decode::{Decoder, ScratchPair};
    use std::io::Write;

    let settings = RawConfig::default().validate()?;
    let threads = threads.max(1);
    let mut g = Generator::new(1, users, 0.0);
    let t0 = crate::clock::wall_ms() - 2 * events as i64;
    let mut shards: Vec<Vec<Record>> = vec![Vec::new(); threads];
    let mut order = Vec::with_capacity(events);
    for i in 0..2 * events {
        let r = g.next_record(t0 + i as i64, &settings.decode);
        let shard = (ahash_of(&r.key) % threads as u64) as usize;
        if i >= events {
            order.push((r.key.clone(), shard));
        }
        shards[shard].push(r);
    }
    let now = t0 + 2 * events as i64;
    let barrier = std::sync::Barrier::new(threads + 1);
    let mut engines = Vec::new();
    let seconds = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .map(|records| {
                let (settings, barrier) = (&settings, &barrier);
                scope.spawn(move || {
                    let decoder = Decoder::new(settings.decode.clone());
                    let mut scratch = ScratchPair::default();
                    let mut engine = Engine::new(settings);
                    let half = records.len() / 2;
                    apply_records(&decoder, &mut engine, &mut scratch, &records[..half], now);
                    barrier.wait();
                    apply_records(&decoder, &mut engine, &mut scratch, &records[half..], now);
                    engine
                })
            })
            .collect();
        barrier.wait();
        let started = Instant::now();
        for h in handles {
            engines.push(h.join().expect("bench thread"));
        }
        started.elapsed().as_secs_f64()
    });
    let timed: usize = shards.iter().map(|s| s.len() - s.len() / 2).sum();
    let mut vectors_written = 0;
    if let Some(path) = vectors_out {
        let dumps: Vec<HashMap<String, Vec<f64>>> = engines
            .iter()
            .map(|e| {
                e.dump()
                    .into_iter()
                    .map(|u| (u.user_id, u.model_vector))
                    .collect()
            })
            .collect();
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (user, shard) in &order {
            if let Some(v) = dumps[*shard].get(user) {
                for x in v {
                    out.write_all(&x.to_le_bytes())?;
                }
                vectors_written += 1;
            }
        }
        out.flush()?;
    }
    let rate = timed as f64 / seconds;
    Ok(PipelineReport {
        threads,
        users,
        events: timed,
        seconds,
        events_per_second: rate,
        events_per_second_per_core: rate / threads as f64,
        vectors_written,
    })
}

/// Decodes and applies `records` in order as the consume loop does: each next record is decoded
/// before the current one is applied, and its user's state prefetched. Returns how many
/// records decoded.
pub fn apply_records(
    decoder: &crate::decode::Decoder,
    engine: &mut Engine,
    scratch: &mut crate::decode::ScratchPair,
    records: &[Record],
    now: i64,
) -> usize {
    let mut decoded = 0;
    let mut ahead = None;
    for (i, r) in records.iter().enumerate() {
        let Ok((event, spare)) =
            scratch.decode(decoder, r.source, &r.payload, Some(now), ahead.take())
        else {
            continue;
        };
        if let Some(next) = records.get(i + 1) {
            ahead =
                Some(engine.decode_ahead(spare, decoder, next.source, &next.payload, Some(now)));
        }
        engine.apply(event, now);
        decoded += 1;
    }
    decoded
}

/// What `bench broker` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerReport {
    pub events: u64,
    pub users: usize,
    /// Segment changes the segstream run published (each one a produced record).
    pub changes: u64,
    pub bare_consumer_events_per_second: f64,
    /// With checkpoints (the default).
    pub segstream_events_per_second: f64,
    pub ratio: f64,
    /// The same pipeline with `state.checkpoints = false` (at-least-once, state in memory).
    pub segstream_without_checkpoints_events_per_second: f64,
    /// 1 - with / without: the throughput checkpointing costs.
    pub checkpoint_cost: f64,
    /// Of the time per message with checkpoints (1 / rate), the part spent decoding and applying
    /// it (the rest is consuming, handing over and publishing).
    pub decode_apply_us_per_message: f64,
    pub pipeline_us_per_message: f64,
}

/// Produces `events` persona records to fresh topics on `brokers`, then times a bare consumer
/// (reads and counts) and the segstream pipeline (consumes, decodes, applies, publishes changes,
/// stores offsets) over all of them, each from a fresh consumer group.
pub async fn broker(
    brokers: &str,
    events: u64,
    users: usize,
    consumer_properties: &[(String, String)],
) -> anyhow::Result<BrokerReport> {
    use crate::app::{create_all_topics, generate, settings_for, GenerateOptions};
    use crate::event::Source;
    use crate::metrics::Metrics;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use tokio_util::sync::CancellationToken;

    let prefix = format!("bench-{}", std::process::id());
    let mut settings = settings_for(brokers, &prefix);
    settings
        .kafka
        .consumer_properties
        .extend(consumer_properties.iter().cloned());
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
    let bare: StreamConsumer =
        crate::kafka::consumer_config(&settings.kafka, settings.state.checkpoints)
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
    drop(bare);

    // segstream, from its own group (and changelog), without and with checkpoints. Timed from
    // its first message, as the bare consumer.
    let rate = |checkpoints: bool| {
        let mut s = settings.clone();
        let run = if checkpoints { "ckpt" } else { "mem" };
        s.kafka.group_id = format!("{prefix}-segstream-{run}");
        s.kafka.topics.changelog = format!("{prefix}-changelog-{run}");
        s.kafka.topics.model = format!("{prefix}-model-{run}");
        s.state.checkpoints = checkpoints;
        async move {
            let metrics = Metrics::new();
            let cancel = CancellationToken::new();
            let task = {
                let (s, m, c) = (s.clone(), metrics.clone(), cancel.clone());
                tokio::spawn(async move { crate::pipeline::run(&s, Engine::new(&s), m, c).await })
            };
            while metrics.consumed_total() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let started = Instant::now();
            while metrics.consumed_total() < events {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let rate = events as f64 / started.elapsed().as_secs_f64();
            cancel.cancel();
            task.await??;
            anyhow::Ok((rate, metrics.changes_total(), metrics.processing_mean()))
        }
    };
    let (without, _, _) = rate(false).await?;
    let (seg_rate, changes, processing) = rate(true).await?;
    Ok(BrokerReport {
        events,
        users,
        changes,
        bare_consumer_events_per_second: bare_rate,
        segstream_events_per_second: seg_rate,
        ratio: seg_rate / bare_rate,
        segstream_without_checkpoints_events_per_second: without,
        checkpoint_cost: 1.0 - seg_rate / without,
        decode_apply_us_per_message: processing * 1e6,
        pipeline_us_per_message: 1e6 / seg_rate,
    })
}

/// What `bench latency` runs.
#[derive(Debug, Clone, Copy)]
pub struct LatencyOptions {
    /// Input events per second, for `seconds`, over `users` users.
    pub rate: u64,
    pub seconds: u64,
    pub users: usize,
    /// librdkafka's `fetch.wait.max.ms` for segstream's consumer, if set.
    pub fetch_wait_ms: Option<u64>,
    /// No segstream: time the input's own delivery (one broker hop).
    pub floor: bool,
    /// segstream's checkpoint interval; `None`: no checkpoints.
    pub checkpoints: Option<std::time::Duration>,
}

/// What `bench latency` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LatencyReport {
    pub rate: u64,
    pub seconds: u64,
    pub produced: u64,
    /// Changes (with `floor`: input events) timed, after the first quarter of the run (a
    /// warm-up).
    pub changes: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Produces persona events stamped with their produce time at `rate` per second for `seconds`
/// while segstream (checkpoints on; librdkafka's `fetch.wait.max.ms` set to `fetch_wait_ms` if
/// given) runs; a subscriber reads the segment changes and times each
/// from its causing event's produce time (its `event_time`) to the moment the subscriber has it.
/// With `floor`, segstream does not run: a consumer configured as segstream's reads the input
/// and times each event itself (one broker hop, where a change takes two).
pub(crate) async fn latency(
    brokers: &str,
    options: &LatencyOptions,
) -> anyhow::Result<LatencyReport> {
    let &LatencyOptions {
        rate,
        seconds,
        users,
        floor,
        ..
    } = options;
    use crate::app::{create_all_topics, settings_for};
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

    let prefix = format!("bench-latency-{}", std::process::id());
    let mut settings = settings_for(brokers, &prefix);
    if let Some(wait) = options.fetch_wait_ms {
        settings
            .kafka
            .consumer_properties
            .insert("fetch.wait.max.ms".into(), wait.to_string());
    }
    match options.checkpoints {
        Some(every) => settings.state.checkpoint_interval = every,
        None => settings.state.checkpoints = false,
    }
    create_all_topics(&settings, 3).await?;
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let pipeline = (!floor).then(|| {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { crate::pipeline::run(&s, Engine::new(&s), m, c).await })
    });
    let subscriber = latency_subscriber(brokers, &settings, &prefix, floor).await?;
    while !floor && !metrics.is_ready() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let started = crate::clock::wall_ms();
    let window = (
        started + (seconds as i64 * 1_000) / 4,
        started + seconds as i64 * 1_000,
    );
    let producing = produce_at(&settings, rate, users, window.1);
    let mut latencies = time_arrivals(&subscriber, &settings, floor, window).await;
    let produced = producing.await??;
    cancel.cancel();
    if let Some(p) = pipeline {
        p.await??;
    }
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok(LatencyReport {
        rate,
        seconds,
        produced,
        changes: latencies.len(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

/// The consumer timed: of the inputs (`floor`: no segstream) or of the segment changes. Events
/// are produced only once it has joined (it has partitions; polling drives the join, and
/// nothing it reads before production starts is timed) and segstream is consuming. Otherwise
/// whichever joins later times a backlog.
async fn latency_subscriber(
    brokers: &str,
    settings: &Settings,
    prefix: &str,
    floor: bool,
) -> anyhow::Result<rdkafka::consumer::StreamConsumer> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let subscriber: StreamConsumer = if floor {
        crate::kafka::consumer_config(&settings.kafka, settings.state.checkpoints)
            .set("group.id", format!("{prefix}-floor"))
            .create()?
    } else {
        let mut subscriber = rdkafka::ClientConfig::new();
        subscriber
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("{prefix}-subscriber"))
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "5");
        for (key, value) in crate::app::QUICK_JOINS {
            subscriber.set(key, value);
        }
        subscriber.create()?
    };
    let inputs: Vec<&str> = crate::event::Source::ALL
        .iter()
        .map(|s| settings.topic(*s))
        .collect();
    if floor {
        subscriber.subscribe(&inputs)?;
    } else {
        subscriber.subscribe(&[&settings.kafka.topics.segment_changes])?;
    }
    while subscriber.assignment()?.count() == 0 {
        let _ =
            tokio::time::timeout(std::time::Duration::from_millis(100), subscriber.recv()).await;
    }
    Ok(subscriber)
}

/// Produces generated events at `rate` per second (in 10 ms ticks) until `end`; how many.
fn produce_at(
    settings: &Settings,
    rate: u64,
    users: usize,
    end: i64,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    use rdkafka::producer::FutureRecord;
    let settings = settings.clone();
    tokio::spawn(async move {
        let producer = crate::kafka::producer(&settings.kafka)?;
        let mut g = Generator::new(3, users, 0.0);
        g.set_skew(0);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
        let per_tick = rate as f64 / 100.0;
        let (mut budget, mut produced) = (0.0, 0u64);
        while crate::clock::wall_ms() < end {
            tick.tick().await;
            budget += per_tick;
            while budget >= 1.0 {
                budget -= 1.0;
                let r = g.next_record(crate::clock::wall_ms(), &settings.decode);
                let record = FutureRecord::to(settings.topic(r.source))
                    .key(r.key.as_bytes())
                    .payload(&r.payload[..]);
                drop(crate::kafka::send(&producer, record).await?);
                produced += 1;
            }
        }
        rdkafka::producer::Producer::flush(&producer, std::time::Duration::from_secs(10))?;
        anyhow::Ok(produced)
    })
}

/// Until 5 s after the window ends: each arrival's latency from its event time, in ms, for
/// the events timed inside the window (`from`, `to`) (the first quarter warms up).
async fn time_arrivals(
    subscriber: &rdkafka::consumer::StreamConsumer,
    settings: &Settings,
    floor: bool,
    (from, to): (i64, i64),
) -> Vec<f64> {
    use rdkafka::Message;
    let decoder = crate::decode::Decoder::new(settings.decode.clone());
    let mut latencies = Vec::new();
    let deadline = to + 5_000;
    while crate::clock::wall_ms() < deadline {
        let msg = tokio::time::timeout(std::time::Duration::from_millis(200), subscriber.recv());
        let Ok(Ok(m)) = msg.await else { continue };
        let now = crate::clock::wall_ms();
        let payload = m.payload().unwrap_or_default();
        let event_time = if floor {
            settings
                .kafka
                .topics
                .source_of(m.topic())
                .and_then(|s| decoder.decode(s, payload, Some(now)).ok())
                .map(|e| e.event_time())
        } else {
            crate::encode::decode_change(payload, settings.output.format)
                .ok()
                .map(|c| c.event_time)
        };
        if let Some(t) = event_time.filter(|t| *t >= from && *t < to) {
            latencies.push((now - t) as f64);
        }
    }
    latencies
}

/// What `bench restore` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub users: usize,
    pub partitions: i32,
    pub changelog_bytes: usize,
    /// Writing the full checkpoint of every user (all partitions).
    pub checkpoint_seconds: f64,
    /// Reading every changelog partition and installing its users in a fresh engine.
    pub restore_seconds: f64,
    pub users_per_second: f64,
}

/// Fills an engine with `users` users, writes a full checkpoint of them to a fresh changelog on
/// `brokers`, then restores every partition into a fresh engine, timing both.
pub(crate) async fn restore(
    brokers: &str,
    users: usize,
    partitions: i32,
) -> anyhow::Result<RestoreReport> {
    use crate::app::settings_for;
    use crate::checkpoint::{restore_partition, take, write, Owned};
    use std::collections::BTreeMap;

    let prefix = format!("bench-restore-{}", std::process::id());
    let settings = settings_for(brokers, &prefix);
    crate::kafka::ensure_topics(
        brokers,
        &settings.kafka.properties,
        &[&settings.kafka.topics.changelog],
        partitions,
    )
    .await?;
    let mut engine = Engine::new(&settings);
    let mut generator = Generator::new(1, users, 0.0);
    let t0 = 1_700_000_000_000i64;
    for i in 0..users * 4 {
        let t = t0 + i as i64;
        let e = generator.next_event(t);
        let shard = (ahash_of(e.user_id()) % partitions as u64) as i32;
        engine.apply_in(&e, t, shard);
    }
    tracing::info!(
        users = engine.users(),
        "Engine filled; writing a full checkpoint."
    );
    let producer = crate::kafka::producer(&settings.kafka)?;
    let owned: BTreeMap<i32, Owned> = (0..partitions)
        .map(|p| {
            (
                p,
                Owned {
                    epoch: 1,
                    seq: 0,
                    since_full: None,
                    restored_offsets: BTreeMap::new(),
                },
            )
        })
        .collect();
    let started = Instant::now();
    let snapshot = take(
        settings.state.full_checkpoint_every,
        &mut engine,
        &owned,
        &HashMap::new(),
        0,
    );
    let written = write(&settings.kafka, &producer, &snapshot).await?;
    let checkpoint_seconds = started.elapsed().as_secs_f64();
    drop(engine);

    tracing::info!(records = written.records, "Restoring.");
    let mut fresh = Engine::new(&settings);
    let started = Instant::now();
    // As the pipeline does on an assignment: every partition read at once, installed in turn.
    let reads: Vec<_> = (0..partitions)
        .map(|p| {
            let kafka = settings.kafka.clone();
            tokio::task::spawn_blocking(move || restore_partition(&kafka, p))
        })
        .collect();
    for (p, read) in (0..partitions).zip(reads) {
        let (restored, _) = read.await??;
        fresh.restore_shard(p, restored.users);
    }
    let restore_seconds = started.elapsed().as_secs_f64();
    Ok(RestoreReport {
        users: fresh.users(),
        partitions,
        changelog_bytes: written.bytes,
        checkpoint_seconds,
        restore_seconds,
        users_per_second: fresh.users() as f64 / restore_seconds,
    })
}

/// A fixed hash of a user id, standing in for the producers' partitioner.
fn ahash_of(user: &str) -> u64 {
    ahash::RandomState::with_seeds(1, 2, 3, 4).hash_one(user)
}
