//! Helpers for the integration tests against the real broker that `.ci/run` starts.
#![allow(dead_code)]

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use segstream::app::{create_all_topics, settings_for};
use segstream::config::Settings;
use segstream::event::Source;
use segstream::generate::Record;
use std::collections::HashMap;
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
    // The test broker (Tansu) completes a group join after about half the session timeout;
    // librdkafka's 45 s default would make every test wait 23 s per join.
    s.kafka
        .consumer_properties
        .insert("session.timeout.ms".into(), "6000".into());
    s.kafka
        .consumer_properties
        .insert("heartbeat.interval.ms".into(), "1000".into());
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

pub fn producer(settings: &Settings) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .set("enable.idempotence", "true")
        .create()
        .unwrap()
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
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
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
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
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
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
