//! Inputs that once stopped the pipeline on every restart, against a real Kafka-protocol broker: each is
//! dead-lettered exactly once, within the producer's limit, and processing goes on after it.

mod common;

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use segstream::event::Source;
use segstream::generate::Record;
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(90);

/// A dead letter as read back: key and value sizes, header count, and segstream's headers.
struct Dead {
    key_len: usize,
    value_len: usize,
    header_count: usize,
    code: String,
    truncated: bool,
}

fn read_dead_letters(settings: &segstream::config::Settings, want: usize) -> Vec<Dead> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .set("group.id", format!("reader-{}", rand::random::<u64>()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topic = &settings.kafka.topics.dead_letter;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let (mut out, deadline) = (Vec::new(), Instant::now() + PATIENCE);
    while out.len() < want && Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let h = m.headers().expect("dead letters carry headers");
        // Ours come last, the error code first of them: read back to it and stop, never
        // touching an original header's key.
        let mut ours = std::collections::HashMap::new();
        for i in (0..h.count()).rev() {
            let header = h.get(i);
            let value = String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned();
            ours.insert(header.key.to_owned(), value);
            if header.key == segstream::pipeline::DLQ_ERROR_CODE {
                break;
            }
        }
        out.push(Dead {
            key_len: m.key().map_or(0, <[u8]>::len),
            value_len: m.payload().map_or(0, <[u8]>::len),
            header_count: h.count(),
            code: ours
                .remove(segstream::pipeline::DLQ_ERROR_CODE)
                .unwrap_or_default(),
            truncated: ours.contains_key(segstream::pipeline::DLQ_TRUNCATED),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_inputs_are_dead_lettered_within_the_limit_and_processing_goes_on() {
    let settings = fresh_settings("poison", 1).await;
    let topic = settings.topic(Source::Clickstream);
    let big_producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .set("message.max.bytes", "8000000")
        .create()
        .unwrap();
    let key = vec![b'k'; 2_048];
    let five_mb = vec![7u8; 5_000_000];
    let just_under = vec![7u8; 999_000];
    let header = OwnedHeaders::new().insert(Header {
        key: "origin",
        value: Some(&b"v"[..]),
    });
    for record in [
        FutureRecord::to(topic).key(&key[..]).payload(&five_mb[..]),
        FutureRecord::to(topic)
            .key(&key[..])
            .payload(&just_under[..]),
        FutureRecord::to(topic)
            .key(&b"user-1"[..])
            .payload(&b"not an event"[..])
            .headers(header),
    ] {
        big_producer
            .send(record, Duration::from_secs(30))
            .await
            .unwrap();
    }
    // Valid events after the poison pills: they must still be applied.
    let sent = produce_generated(&settings, 5, 20, 200).await;

    let (metrics, _store, cancel, task) = start(&settings);
    let done = wait_for(PATIENCE, || {
        metrics.dead_letters_total() == 3 && metrics.applied_total() == sent.len() as u64
    })
    .await;
    cancel.cancel();
    let stopped = task.await.unwrap();
    assert!(
        done,
        "dead letters {} of 3, applied {} of {}",
        metrics.dead_letters_total(),
        metrics.applied_total(),
        sent.len()
    );
    assert!(stopped.is_ok(), "the pipeline ran on: {:?}", stopped.err());

    let dead = read_dead_letters(&settings, 4);
    assert_eq!(dead.len(), 3, "each exactly once");
    let limit = 1_000_000;
    for d in &dead {
        assert!(d.key_len + d.value_len < limit, "fits the producer's limit");
    }
    assert_eq!(dead[0].code, "too_large");
    assert!(dead[0].truncated && dead[0].value_len > 900_000);
    assert_eq!(dead[0].key_len, 2_048, "a key this small is kept whole");
    assert_eq!(dead[1].code, "bad_magic");
    assert!(dead[1].truncated);
    assert_eq!(dead[2].code, "bad_magic");
    assert!(!dead[2].truncated);
    assert_eq!(
        dead[2].header_count,
        1 + 5,
        "the original header is kept, as bytes"
    );
}

/// Five events of a user keyed by the user id, one keyed by another id (which a producer's
/// partitioner would send to another partition), five more: the odd one is dead-lettered as
/// `key_mismatch`, never applied, and the user has the ten others, not a split state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_the_user_id_is_dead_lettered_and_the_user_is_not_split() {
    let settings = fresh_settings("keys", 2).await;
    let mut g = segstream::generate::Generator::new(3, 1, 0.0);
    let mut records: Vec<Record> = (0..11)
        .map(|_| g.next_record(segstream::clock::wall_ms(), &settings.decode))
        .collect();
    let user = records[0].key.clone();
    records[5].key = format!("{user}-somebody-else");
    produce(&settings, records).await;

    let (metrics, store, cancel, task) = start(&settings);
    let done = wait_for(PATIENCE, || {
        metrics.consumed_total() == 11 && metrics.dead_letters_total() == 1
    })
    .await;
    let events = store.get(&user).map(|s| s.events);
    cancel.cancel();
    assert!(task.await.unwrap().is_ok());
    assert!(
        done,
        "consumed {}, dead letters {}",
        metrics.consumed_total(),
        metrics.dead_letters_total()
    );
    assert_eq!(events, Some(10), "the ten events keyed by the user id");
    let dead = read_dead_letters(&settings, 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].code, "key_mismatch");
}
