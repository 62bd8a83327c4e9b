//! Wiring of the commands: the service (`run`), the traffic generator (`generate`) and the
//! self-contained demo (`demo`). Everything here is glue between the pure core and the edges.

use crate::clock::wall_ms;
use crate::config::{KafkaConfig, RawConfig, Settings, WireFormat};
use crate::encode::decode_change;
use crate::engine::Engine;
use crate::event::Source;
use crate::generate::Generator;
use crate::kafka::{ensure_topics, producer};
use crate::metrics::Metrics;
use crate::pipeline;
use crate::quality::adjusted_rand_index;
use crate::{http, kafka};
use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, DeliveryFuture, FutureRecord, Producer};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `segstream run`: the service. Returns when `cancel` fires (SIGINT/SIGTERM) after an ordered
/// shutdown, or with the error that stopped the pipeline.
pub async fn run(
    settings: Settings,
    model: Option<&std::path::Path>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    kafka::check_clients(&settings)?;
    info!(security = %settings.security.describe(), features = %kafka::builtin_features(), "Kafka clients checked.");
    let engine = match model {
        Some(path) => Engine::with_model(&settings, path)
            .with_context(|| format!("loading model {}", path.display()))?,
        None => Engine::new(&settings),
    };
    let metrics = Metrics::new();
    let (api, link) = http::link(
        &engine,
        metrics.clone(),
        settings.http_token.clone(),
        settings.http_peers.clone(),
    );
    let http_stop = CancellationToken::new();
    let (addr, server) = http::serve(settings.http_bind, http::api_router(api), http_stop.clone())
        .await
        .with_context(|| format!("binding http on {}", settings.http_bind))?;
    info!(%addr, "Serving the API, /metrics, /healthz and /readyz.");
    let result = pipeline::run_with_api(&settings, engine, metrics, cancel, link).await;
    http_stop.cancel();
    let _ = server.await;
    result.map(|_| ()).map_err(Into::into)
}

/// Options of `segstream generate`.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Records per second; 0 means as fast as the producer takes them.
    pub rate: u64,
    pub users: usize,
    pub malformed_ratio: f64,
    pub seed: u64,
    /// Stop after this many records.
    pub count: Option<u64>,
    /// Create missing input topics with this many partitions first.
    pub create_topics: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GenerateSummary {
    pub sent: u64,
    pub malformed: u64,
    pub failed: u64,
}

/// Produces persona traffic to the input topics until `count` records are sent or `cancel`.
pub async fn generate(
    settings: &Settings,
    opts: &GenerateOptions,
    cancel: CancellationToken,
) -> anyhow::Result<GenerateSummary> {
    if let Some(partitions) = opts.create_topics {
        let topics: Vec<&str> = Source::ALL.iter().map(|s| settings.topic(*s)).collect();
        ensure_topics(
            &settings.kafka.brokers,
            &settings.kafka.properties,
            &topics,
            partitions,
        )
        .await
        .context("creating input topics")?;
    }
    let producer = producer(&settings.kafka).context("creating producer")?;
    let mut generator = Generator::new(opts.seed, opts.users, opts.malformed_ratio);
    let mut summary = GenerateSummary::default();
    let mut in_flight: VecDeque<DeliveryFuture> = VecDeque::new();
    let tick = Duration::from_millis(10);
    let mut ticker = tokio::time::interval(tick);
    let per_tick = opts.rate as f64 * tick.as_secs_f64();
    let mut budget = 0.0;
    let started = Instant::now();
    let mut last_report = Instant::now();
    'outer: loop {
        if opts.rate > 0 {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            budget += per_tick;
        } else {
            if cancel.is_cancelled() {
                break;
            }
            budget = 1000.0;
        }
        while budget >= 1.0 {
            if opts.count.is_some_and(|c| summary.sent >= c) {
                break 'outer;
            }
            budget -= 1.0;
            let r = generator.next_record(wall_ms(), &settings.decode);
            let mut record = FutureRecord::to(settings.topic(r.source))
                .key(r.key.as_bytes())
                .payload(&r.payload[..]);
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        in_flight.push_back(f);
                        break;
                    }
                    Err((_, back)) => {
                        record = back;
                        if let Some(f) = in_flight.pop_front() {
                            summary.failed += u64::from(!matches!(f.await, Ok(Ok(_))));
                        } else {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            }
            summary.sent += 1;
            summary.malformed += u64::from(r.expected_error.is_some());
            while in_flight.len() > 50_000 {
                if let Some(f) = in_flight.pop_front() {
                    summary.failed += u64::from(!matches!(f.await, Ok(Ok(_))));
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            info!(
                sent = summary.sent,
                malformed = summary.malformed,
                "Generating."
            );
        }
    }
    for f in in_flight {
        summary.failed += u64::from(!matches!(f.await, Ok(Ok(_))));
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing producer")?;
    let secs = started.elapsed().as_secs_f64();
    info!(
        sent = summary.sent,
        malformed = summary.malformed,
        failed = summary.failed,
        rate = summary.sent as f64 / secs.max(1e-9),
        "Generator done."
    );
    Ok(summary)
}

/// How long the demo waits, after the traffic stops, for the pipeline to consume all of it.
const DEMO_CATCH_UP: Duration = Duration::from_secs(60);

/// Options of `segstream demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub duration: Option<Duration>,
    pub rate: u64,
    pub users: usize,
    pub malformed_ratio: f64,
    pub seed: u64,
    pub http_bind: String,
}

/// What the demo reached, also printed at its end.
#[derive(Clone, Debug)]
pub struct DemoReport {
    pub consumed: u64,
    pub applied: u64,
    pub dead_letters: u64,
    pub changes: u64,
    pub users_assigned: usize,
    pub segments_non_empty: usize,
    pub ari: f64,
}

/// What a subscriber of the output topic has seen, for the live summary.
#[derive(Default)]
struct SubscriberView {
    received: u64,
    recent: VecDeque<String>,
}

/// `segstream demo`: an in-process Kafka cluster (librdkafka's mock), the generator, the full
/// pipeline over real Kafka clients, and a subscriber of the segment changes; prints a live
/// summary and a final report with the agreement (ARI) between segments and the generator's
/// personas.
pub async fn demo(opts: DemoOptions, cancel: CancellationToken) -> anyhow::Result<DemoReport> {
    let (cluster, settings) = demo_cluster(&opts)?;
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let engine = Engine::new(&settings);
    let (api, link) = http::link(&engine, metrics.clone(), None, Vec::new());
    let (addr, server) =
        http::serve(settings.http_bind, http::api_router(api), stop.clone()).await?;
    println!(
        "segstream demo: embedded Kafka at {}",
        settings.kafka.brokers
    );
    println!("metrics: http://{addr}/metrics   (Ctrl-C to stop)");
    println!(
        "status page: http://{addr}/   segments: http://{addr}/segments   a user: http://{addr}/users/user-1"
    );

    let pipeline = {
        let (settings, metrics, stop) = (settings.clone(), metrics.clone(), stop.child_token());
        tokio::spawn(
            async move { pipeline::run_with_api(&settings, engine, metrics, stop, link).await },
        )
    };
    let gen_opts = GenerateOptions {
        rate: opts.rate,
        users: opts.users,
        malformed_ratio: opts.malformed_ratio,
        seed: opts.seed,
        count: None,
        create_topics: None,
    };
    let gen_stop = stop.child_token();
    let generator = {
        let (settings, gen_opts, gen_stop) = (settings.clone(), gen_opts.clone(), gen_stop.clone());
        tokio::spawn(async move { generate(&settings, &gen_opts, gen_stop).await })
    };
    let view = Arc::new(Mutex::new(SubscriberView::default()));
    let subscriber = tokio::spawn(subscribe(
        settings.kafka.clone(),
        settings.output.format,
        view.clone(),
        stop.child_token(),
    ));
    live_summary(opts.duration, &cancel, &metrics, &view).await;

    // Stop the traffic first, let the pipeline catch up (the report is on all the traffic, even
    // on a loaded machine; after Ctrl-C it does not wait), then stop it.
    gen_stop.cancel();
    let sent = generator.await??;
    catch_up(&metrics, sent.sent, &cancel).await;
    stop.cancel();
    let engine = pipeline.await??;
    let _ = subscriber.await;
    let _ = server.await;
    let report = final_report(&engine, &metrics, &opts, &sent);
    drop(cluster);
    Ok(report)
}

/// The embedded cluster with every topic, and the demo's settings for it: value labels mature
/// and sweeps run in seconds, not months.
fn demo_cluster(
    opts: &DemoOptions,
) -> anyhow::Result<(MockCluster<'static, DefaultProducerContext>, Settings)> {
    let cluster = MockCluster::new(1).context("starting the embedded kafka cluster")?;
    let mut raw = RawConfig::default();
    raw.kafka.brokers = cluster.bootstrap_servers();
    raw.kafka.group_id = "segstream-demo".into();
    raw.http.bind = opts.http_bind.clone();
    raw.model.value_horizon = Duration::from_secs(5);
    raw.model.sweep_interval = Duration::from_secs(5);
    let settings = raw.validate()?;
    for (key, topic) in settings.kafka.topics.all() {
        // One partition for the models: one order of them.
        let partitions = if key == "model" { 1 } else { 3 };
        cluster
            .create_topic(topic, partitions, 1)
            .with_context(|| format!("creating topic {topic}"))?;
    }

    Ok((cluster, settings))
}

/// A summary line every 2 s until `duration` passes or `cancel` fires.
async fn live_summary(
    duration: Option<Duration>,
    cancel: &CancellationToken,
    metrics: &Metrics,
    view: &Arc<Mutex<SubscriberView>>,
) {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    let mut last = (Instant::now(), 0u64);
    loop {
        let deadline = duration.map(|d| started + d);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => break,
            _ = ticker.tick() => {}
        }
        let consumed = metrics.consumed_total();
        let rate = (consumed - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), consumed);
        print_summary(started.elapsed(), rate, metrics, view);
    }
}

/// Waits (at most [`DEMO_CATCH_UP`], not after Ctrl-C) until the pipeline consumed `sent`.
async fn catch_up(metrics: &Metrics, sent: u64, cancel: &CancellationToken) {
    let started = Instant::now();
    while metrics.consumed_total() < sent
        && started.elapsed() < DEMO_CATCH_UP
        && !cancel.is_cancelled()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if metrics.consumed_total() < sent {
        println!(
            "stopped with {} of {sent} records consumed",
            metrics.consumed_total(),
        );
    }
}

/// The final segments, the counts and the agreement with the generator's personas, printed.
fn final_report(
    engine: &Engine,
    metrics: &Metrics,
    opts: &DemoOptions,
    sent: &GenerateSummary,
) -> DemoReport {
    let truth = Generator::new(opts.seed, opts.users, opts.malformed_ratio);
    let (mut seg, mut persona) = (Vec::new(), Vec::new());
    for u in engine.dump() {
        if let (Some(s), Some(p)) = (u.segment, truth.persona_of(&u.user_id)) {
            seg.push(s);
            persona.push(p as u32);
        }
    }
    let segments = engine.segments();
    let report = DemoReport {
        consumed: metrics.consumed_total(),
        applied: metrics.applied_total(),
        dead_letters: metrics.dead_letters_total(),
        changes: metrics.changes_total(),
        users_assigned: seg.len(),
        segments_non_empty: segments.iter().filter(|s| s.size > 0).count(),
        ari: if seg.is_empty() {
            0.0
        } else {
            adjusted_rand_index(&seg, &persona)
        },
    };
    println!("\nFinal segments:");
    for s in &segments {
        println!(
            "  segment {:>2}: {:>6} users  value {:>8.2}  p(buy) {:>5.1}%  {:<22} {}",
            s.id,
            s.size,
            s.mean_predicted_value,
            100.0 * s.mean_purchase_probability,
            s.action.as_deref().unwrap_or("-"),
            s.label
        );
    }
    println!(
        "generated {} records ({} malformed); consumed {}, applied {}, dead-lettered {}, segment changes {}",
        sent.sent, sent.malformed, report.consumed, report.applied, report.dead_letters, report.changes
    );
    println!(
        "{} users assigned to {} segments; agreement with the generator's {} personas: ARI = {:.3}",
        report.users_assigned,
        report.segments_non_empty,
        truth.personas().len(),
        report.ari
    );
    report
}

fn print_summary(
    elapsed: Duration,
    rate: f64,
    metrics: &Metrics,
    view: &Arc<Mutex<SubscriberView>>,
) {
    let text = metrics.render();
    let sizes: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("segstream_segment_users{"))
        .filter_map(|l| {
            let id = l.split('"').nth(1)?;
            let n = l.rsplit(' ').next()?;
            Some(format!("{id}:{n}"))
        })
        .collect();
    let v = view.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "[{:>5.1}s] {:>7.0} events/s | consumed {} | dead letters {} | changes delivered {} (subscriber saw {}) | segment sizes {}",
        elapsed.as_secs_f64(),
        rate,
        metrics.consumed_total(),
        metrics.dead_letters_total(),
        metrics.changes_total(),
        v.received,
        if sizes.is_empty() { "(seeding)".to_string() } else { sizes.join(" ") },
    );
    for line in v.recent.iter().rev().take(3) {
        println!("          {line}");
    }
}

/// A subscriber of the output topic, as a marketing system would run one.
async fn subscribe(
    kafka: KafkaConfig,
    format: WireFormat,
    view: Arc<Mutex<SubscriberView>>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", "segstream-demo-subscriber")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&kafka.topics.segment_changes])?;
    let mut last_version: HashMap<String, i64> = HashMap::new();
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            m = consumer.recv() => m,
        };
        let Ok(msg) = msg else { continue };
        match decode_change(msg.payload().unwrap_or_default(), format) {
            Ok(c) => {
                // Drop repeats by version, as the schema documents.
                let seen = last_version.entry(c.user_id.clone()).or_insert(0);
                if c.version <= *seen {
                    continue;
                }
                *seen = c.version;
                let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
                v.received += 1;
                v.recent.push_back(format!(
                    "{} {} -> {} ({}): {}",
                    c.user_id,
                    c.previous_segment.map_or("-".into(), |p| p.to_string()),
                    c.new_segment,
                    c.reason.as_str(),
                    c.segment_label
                ));
                if v.recent.len() > 3 {
                    v.recent.pop_front();
                }
            }
            Err(e) => warn!(error = %e, "Undecodable segment change."),
        }
    }
    Ok(())
}

/// Consumer properties for group joins that do not idle, for tests and benchmarks. Tansu (the
/// test broker) completes a join after about half the session timeout: with librdkafka's 45 s
/// default every join waited 23 s (each of `bench broker`'s three consumers, every test's
/// pipeline). 6 s (the least a Kafka broker accepts by default) with heartbeats every second
/// makes that 3 s.
pub const QUICK_JOINS: [(&str, &str); 2] = [
    ("session.timeout.ms", "6000"),
    ("heartbeat.interval.ms", "1000"),
];

/// Convenience for tests and tools: settings for `brokers` with unique topic and group names,
/// and [`QUICK_JOINS`] for the consumers.
pub fn settings_for(brokers: &str, prefix: &str) -> Settings {
    settings_with(brokers, prefix, &[])
}

/// [`settings_for`] with librdkafka properties for every client (security).
pub fn settings_with(brokers: &str, prefix: &str, properties: &[(String, String)]) -> Settings {
    let mut raw = RawConfig::default();
    raw.kafka.brokers = brokers.to_owned();
    raw.kafka.properties.extend(properties.iter().cloned());
    raw.kafka.consumer_properties.extend(
        QUICK_JOINS
            .iter()
            .map(|&(key, value)| (key.to_owned(), value.to_owned())),
    );
    raw.kafka.group_id = format!("{prefix}-group");
    for (key, name) in raw.kafka.topics.all_mut() {
        *name = format!("{prefix}-{}", key.replace('_', "-"));
    }
    raw.http.bind = "127.0.0.1:0".into();
    raw.validate().expect("generated settings are valid")
}

/// Creates all topics of `settings` (tests, demo-like setups).
pub async fn create_all_topics(settings: &Settings, partitions: i32) -> anyhow::Result<()> {
    let k = &settings.kafka;
    // One partition for the models: one order of them.
    let (model, others): (Vec<_>, Vec<_>) = k
        .topics
        .all()
        .into_iter()
        .partition(|(key, _)| *key == "model");
    for (topics, partitions) in [(others, partitions), (model, 1)] {
        let names: Vec<&str> = topics.into_iter().map(|(_, name)| name.as_str()).collect();
        kafka::ensure_topics(&k.brokers, &k.properties, &names, partitions).await?;
    }
    Ok(())
}
