//! Helpers for the integration tests against the real broker that `.ci/run` starts.
#![allow(dead_code)]

pub mod tls;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use segstream::app::{create_all_topics, settings_for};
use segstream::checkpoint::restore_partition;
use segstream::clock::wall_ms;
use segstream::config::Settings;
use segstream::engine::Engine;
use segstream::event::Source;
use segstream::features::{FeatureParams, UserState};
use segstream::generate::Record;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The broker `.ci/run` started. Tests of Kafka behaviour need a real broker: run them through
/// `bash .ci/run`, or start one and set SEGSTREAM_TEST_BROKERS yourself.
pub fn brokers() -> String {
    std::env::var("SEGSTREAM_TEST_BROKERS").expect(
        "SEGSTREAM_TEST_BROKERS is not set: run the tests with `bash .ci/run`, which starts a broker",
    )
}

/// Settings with unique topics and group, created on the broker, and models that seed quickly.
pub async fn fresh_settings(name: &str, partitions: i32) -> Settings {
    let prefix = format!("{name}-{}-{}", std::process::id(), rand::random::<u32>());
    let mut s = settings_for(&brokers(), &prefix);
    s.model.init_users = 40;
    s.model.init_events = 400;
    s.model.batch_size = 16;
    create_all_topics(&s, partitions).await.unwrap();
    s
}

/// A produced record with where it landed.
#[derive(Clone, Debug)]
pub struct Sent {
    pub record: Record,
    pub partition: i32,
    pub offset: i64,
}

/// A client configuration for the settings' cluster, with their properties for every client
/// (security).
pub fn client(settings: &Settings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.kafka.brokers);
    for (k, v) in &settings.kafka.properties {
        c.set(k, v);
    }
    c
}

pub fn producer(settings: &Settings) -> FutureProducer {
    client(settings)
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
}

/// Produces `n` generator records (seeded, over `users` users, none malformed), stamped now, and
/// waits for every acknowledgement.
pub async fn produce_generated(
    settings: &Settings,
    seed: u64,
    users: usize,
    n: usize,
) -> Vec<Sent> {
    let mut g = segstream::generate::Generator::new(seed, users, 0.0);
    let records = (0..n)
        .map(|_| g.next_record(segstream::clock::wall_ms(), &settings.decode))
        .collect();
    produce(settings, records).await
}

/// Produces the records (key = user id) and waits for every acknowledgement.
pub async fn produce(settings: &Settings, records: Vec<Record>) -> Vec<Sent> {
    let producer = producer(settings);
    let mut futures = Vec::with_capacity(records.len());
    for r in &records {
        let rec = FutureRecord::to(settings.topic(r.source))
            .key(r.key.as_bytes())
            .payload(&r.payload[..]);
        futures.push(producer.send_result(rec).map_err(|(e, _)| e).unwrap());
    }
    let mut sent = Vec::with_capacity(records.len());
    for (r, f) in records.into_iter().zip(futures) {
        let delivery = f.await.unwrap().unwrap();
        sent.push(Sent {
            record: r,
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    sent
}

/// A consumed output record.
#[derive(Clone, Debug)]
pub struct Got {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: HashMap<String, String>,
    pub partition: i32,
}

/// Reads `topic` from the beginning (all partitions, no group) until `want` records arrived or
/// `timeout` passed.
pub fn read_topic(settings: &Settings, topic: &str, want: usize, timeout: Duration) -> Vec<Got> {
    read_topics(settings, &[topic], want, timeout)
}

/// [`read_topic`] over several topics together.
pub fn read_topics(
    settings: &Settings,
    topics: &[&str],
    want: usize,
    timeout: Duration,
) -> Vec<Got> {
    let consumer: BaseConsumer = client(settings)
        .set("group.id", format!("reader-{}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        for p in metadata.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Got {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
                partition: m.partition(),
            });
        }
    }
    out
}

/// The group's committed offset per (source, partition).
pub fn committed(settings: &Settings, partitions: i32) -> HashMap<(Source, i32), i64> {
    let consumer: BaseConsumer = client(settings)
        .set("group.id", &settings.kafka.group_id)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for s in Source::ALL {
        for p in 0..partitions {
            tpl.add_partition(settings.topic(s), p);
        }
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let mut out = HashMap::new();
    for s in Source::ALL {
        for p in 0..partitions {
            let off = match got.find_partition(settings.topic(s), p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            out.insert((s, p), off);
        }
    }
    out
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_for(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    poll_until(timeout, Duration::from_millis(20), cond).await
}

async fn poll_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Valid events per user among the sent records.
pub fn events_per_user<'a>(sent: impl IntoIterator<Item = &'a Sent>) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for s in sent {
        if s.record.event.is_some() {
            *m.entry(s.record.key.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// A config file for a `segstream run` subprocess on the test's topics and group.
pub fn write_config(settings: &Settings, dir: &std::path::Path) -> std::path::PathBuf {
    write_config_with(settings, dir, "")
}

/// [`write_config`] with more TOML appended (sections after `[state]`).
pub fn write_config_with(
    settings: &Settings,
    dir: &std::path::Path,
    extra: &str,
) -> std::path::PathBuf {
    let config = dir.join("segstream.toml");
    let t = &settings.kafka.topics;
    // The settings' own consumer properties (quick group joins, from `settings_for`).
    let consumer_properties: String = settings
        .kafka
        .consumer_properties
        .iter()
        .map(|(key, value)| format!("{key:?} = {value:?}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{}"
group_id = "{}"
[kafka.topics]
clickstream = "{}"
purchases = "{}"
social = "{}"
segment_changes = "{}"
segment_catalogue = "{}"
dead_letter = "{}"
changelog = "{}"
erasure = "{}"
model = "{}"
[kafka.consumer_properties]
{}[model]
init_users = 40
init_events = 400
[state]
checkpoint_interval = "300ms"
full_checkpoint_every = 7
{}
"#,
            settings.kafka.brokers,
            settings.kafka.group_id,
            t.clickstream,
            t.purchases,
            t.social,
            t.segment_changes,
            t.segment_catalogue,
            t.dead_letter,
            t.changelog,
            t.erasure,
            t.model,
            consumer_properties,
            extra,
        ),
    )
    .unwrap();
    config
}

/// `segstream run --config FILE` as a separate process, serving HTTP on a free port.
pub fn spawn_service(config: &std::path::Path) -> (Child, u16) {
    let port = free_port();
    (spawn_service_on(config, port), port)
}

/// [`spawn_service`] on a given HTTP port (so that peers can be configured before it starts).
pub fn spawn_service_on(config: &std::path::Path, port: u16) -> Child {
    spawn_run(config, port, Stdio::null())
}

/// `segstream run --config FILE --http-bind 127.0.0.1:PORT`, its log (stderr) to `stderr`.
fn spawn_run(config: &std::path::Path, port: u16, stderr: Stdio) -> Child {
    Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["run", "--config"])
        .arg(config)
        .args(["--http-bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// A broker of the test's own (Tansu from `SEGSTREAM_TEST_TANSU`) on `listen`, advertising
/// `advertised` (a TLS front's or a relay's port, or `listen` itself), with client
/// authentication when asked; stopped when dropped.
pub struct OwnBroker(Child);

impl OwnBroker {
    pub fn start(listen: u16, advertised: u16, authentication: bool) -> OwnBroker {
        let tansu = std::env::var("SEGSTREAM_TEST_TANSU")
            .expect("SEGSTREAM_TEST_TANSU is not set: run the tests with `bash .ci/run`");
        let mut cmd = Command::new(tansu);
        cmd.args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{listen}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine",
            "memory://tansu/",
        ]);
        if authentication {
            cmd.arg("--authentication");
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", listen)).is_err() {
            assert!(Instant::now() < deadline, "the broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnBroker(child)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `method path` with an optional bearer token: status, headers (lower-case names) and body.
pub fn http_call(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, HashMap<String, String>, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some((status, headers, body.to_owned()))
}

/// [`spawn_service`] with its log (stderr) written to `log`.
pub fn spawn_service_logging(config: &std::path::Path, log: &std::path::Path) -> (Child, u16) {
    let port = free_port();
    let stderr = std::fs::File::create(log).unwrap();
    (spawn_run(config, port, stderr.into()), port)
}

/// SIGTERM, then the exit status (SIGKILL and a panic after 30 s).
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().ok();
    panic!("no exit within 30 s of SIGTERM")
}

/// The body of `GET path` on the service's HTTP port, if it answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_call(port, "GET", path, None)
        .filter(|(status, _, _)| *status == 200)
        .map(|(_, _, body)| body)
}

/// The status code of `GET path` on the service's HTTP port, if it answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_call(port, "GET", path, None).map(|(status, _, _)| status)
}

/// The sum of a metric family's samples from the service's /metrics, if it answers.
pub fn scrape(port: u16, family: &str) -> Option<f64> {
    let body = http_get(port, "/metrics")?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

pub async fn wait_for_metric(port: u16, family: &str, at_least: f64) -> bool {
    wait_until(Duration::from_secs(120), || {
        scrape(port, family).is_some_and(|v| v >= at_least)
    })
    .await
}

/// [`wait_for`] for conditions that do blocking I/O: polled every 200 ms.
pub async fn wait_until(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    poll_until(timeout, Duration::from_millis(200), cond).await
}

/// Next offset after the last record sent, per (source, partition).
pub fn end_offsets(sent: &[Sent]) -> HashMap<(Source, i32), i64> {
    let mut ends = HashMap::new();
    for s in sent {
        let e = ends.entry((s.record.source, s.partition)).or_insert(0);
        *e = (*e).max(s.offset + 1);
    }
    ends
}

/// Every user's state as the changelog holds it.
pub fn restore_all(settings: &Settings, partitions: i32) -> HashMap<String, UserState> {
    let mut out = HashMap::new();
    for p in 0..partitions {
        let (restored, _) = restore_partition(&settings.kafka, p).unwrap();
        assert!(restored.marker.is_some(), "partition {p} has a checkpoint");
        for (id, state) in restored.users {
            assert!(out.insert(id.as_str().to_owned(), *state).is_none());
        }
    }
    out
}

/// The reference: every valid event applied once to one engine, without Kafka.
pub fn uninterrupted(settings: &Settings, sent: &[Sent]) -> HashMap<String, UserState> {
    let mut engine = Engine::new(settings);
    for s in sent {
        if let Some(event) = &s.record.event {
            engine.apply(event, wall_ms());
        }
    }
    engine
        .store()
        .snapshot()
        .into_iter()
        .map(|(id, state)| (id.as_str().to_owned(), state))
        .collect()
}

/// Exact for counts and times; the features (decayed sums, evaluated at one instant) within
/// 1e-9 relative (1e-12 absolute near zero), since events from three topics interleave
/// differently run to run and float addition is not associative.
pub fn assert_same_state(
    settings: &Settings,
    got: &HashMap<String, UserState>,
    want: &HashMap<String, UserState>,
) {
    assert_eq!(got.len(), want.len(), "users");
    let params = FeatureParams::new(
        settings.features.half_lives.map(|d| d.as_millis() as f64),
        settings.model.seed,
    );
    let at = want.values().map(|s| s.anchor_ms).max().unwrap();
    for (user, w) in want {
        let g = got.get(user).unwrap_or_else(|| panic!("{user} is missing"));
        assert_eq!(g.events, w.events, "{user}: events");
        assert_eq!(g.lifetime_orders, w.lifetime_orders, "{user}: orders");
        assert_eq!(g.anchor_ms, w.anchor_ms, "{user}: latest event time");
        assert_eq!(
            g.first_event_ms, w.first_event_ms,
            "{user}: first event time"
        );
        assert_eq!(
            g.last_purchase_ms, w.last_purchase_ms,
            "{user}: last purchase"
        );
        let (gv, wv) = (g.vector_at(at, &params), w.vector_at(at, &params));
        for (i, (a, b)) in gv.iter().zip(wv.iter()).enumerate() {
            // Relative, with an absolute floor for sums that cancel to ~0 (sentiment, ±spend).
            assert!(
                (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-12,
                "{user}: feature {i} {a} vs {b}"
            );
        }
    }
}

/// The segment changes published so far with `reason` (reads the output topic for `wait`).
pub fn changes_with_reason(
    settings: &Settings,
    reason: segstream::event::ChangeReason,
    want: usize,
    wait: Duration,
) -> Vec<segstream::event::SegmentChange> {
    read_topic(settings, &settings.kafka.topics.segment_changes, want, wait)
        .iter()
        .map(|c| segstream::encode::decode_change(&c.payload, settings.output.format).unwrap())
        .filter(|c| c.reason == reason)
        .collect()
}

/// An in-process pipeline on a fresh engine: its metrics, a handle on its user map, the token
/// that stops it, and the task (which returns the engine).
pub fn start(
    settings: &Settings,
) -> (
    segstream::metrics::Metrics,
    std::sync::Arc<segstream::store::Store>,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<Engine, segstream::pipeline::PipelineError>>,
) {
    let engine = Engine::new(settings);
    let store = engine.store();
    let metrics = segstream::metrics::Metrics::new();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { segstream::pipeline::run(&s, engine, m, c).await })
    };
    (metrics, store, cancel, task)
}
