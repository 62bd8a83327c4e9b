//! The pipeline against a real Kafka-protocol broker: valid events are applied exactly once,
//! malformed ones reach the dead-letter topic with the right codes, outputs decode with the
//! bundled schema (the segment catalogue too), and offsets are committed so that a restart neither loses nor repeats input.

mod common;

use common::*;
use segstream::catalogue::CatalogueReason;
use segstream::clock::wall_ms;
use segstream::config::WireFormat;
use segstream::encode::{decode_catalogue, decode_change};
use segstream::engine::Engine;
use segstream::event::Source;
use segstream::generate::Generator;
use segstream::metrics::Metrics;
use segstream::pipeline::{
    self, DLQ_ERROR_CODE, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION, DLQ_SOURCE_TOPIC,
};
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);

fn records(
    seed: u64,
    users: usize,
    n: usize,
    malformed: f64,
    cfg: &segstream::config::DecodeConfig,
) -> Vec<segstream::generate::Record> {
    let mut g = Generator::new(seed, users, malformed);
    (0..n).map(|_| g.next_record(wall_ms(), cfg)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_events_are_applied_once_and_malformed_ones_are_dead_lettered_with_their_code() {
    let settings = fresh_settings("dlq", 3).await;
    let sent = produce(&settings, records(11, 150, 3_000, 0.1, &settings.decode)).await;
    let valid = sent.iter().filter(|s| s.record.event.is_some()).count() as u64;
    let malformed = sent.len() as u64 - valid;
    assert!(malformed > 200, "the fixture has malformed records");

    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    let done = wait_for(PATIENCE, || {
        metrics.consumed_total() == sent.len() as u64 && metrics.dead_letters_total() == malformed
    })
    .await;
    cancel.cancel();
    let engine = task.await.unwrap().unwrap();
    assert!(
        done,
        "consumed {} of {}, dead letters {} of {malformed}",
        metrics.consumed_total(),
        sent.len(),
        metrics.dead_letters_total()
    );

    // Exactly the valid events were applied, each once, to the right user.
    assert_eq!(metrics.applied_total(), valid);
    assert_eq!(engine.applied(), valid);
    for (user, n) in events_per_user(&sent) {
        assert_eq!(engine.user(&user).map(|u| u.events), Some(n), "{user}");
    }

    // Every malformed record is in the dead-letter topic with its original bytes, key and code.
    let expected: HashMap<(String, i32, i64), &Sent> = sent
        .iter()
        .filter(|s| s.record.expected_error.is_some())
        .map(|s| {
            (
                (
                    settings.topic(s.record.source).to_owned(),
                    s.partition,
                    s.offset,
                ),
                s,
            )
        })
        .collect();
    let dead = read_topic(
        &settings,
        &settings.kafka.topics.dead_letter,
        malformed as usize,
        PATIENCE,
    );
    assert_eq!(dead.len() as u64, malformed);
    let mut per_code: HashMap<(Source, String), u64> = HashMap::new();
    for d in &dead {
        let at = (
            d.headers[DLQ_SOURCE_TOPIC].clone(),
            d.headers[DLQ_SOURCE_PARTITION].parse().unwrap(),
            d.headers[DLQ_SOURCE_OFFSET].parse().unwrap(),
        );
        let original = expected
            .get(&at)
            .unwrap_or_else(|| panic!("unexpected dead letter {at:?}"));
        assert_eq!(
            d.headers[DLQ_ERROR_CODE],
            original.record.expected_error.unwrap()
        );
        assert_eq!(d.payload, original.record.payload);
        assert_eq!(d.key.as_deref(), Some(original.record.key.as_bytes()));
        *per_code
            .entry((original.record.source, d.headers[DLQ_ERROR_CODE].clone()))
            .or_default() += 1;
    }
    for ((source, code), n) in per_code {
        assert_eq!(metrics.invalid_count(source, &code), n, "{source:?} {code}");
    }

    // Every segment change decodes with schemas/segment_change.avsc; versions grow per user.
    let changes = metrics.changes_total();
    assert!(changes >= 100, "segments were formed ({changes} changes)");
    let out = read_topic(
        &settings,
        &settings.kafka.topics.segment_changes,
        changes as usize,
        PATIENCE,
    );
    assert_eq!(out.len() as u64, changes);
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut decoded = Vec::new();
    for o in out {
        let c =
            decode_change(&o.payload, WireFormat::Avro).expect("decodes with the bundled schema");
        assert_eq!(o.key.as_deref(), Some(c.user_id.as_bytes()));
        let prev = last.insert(c.user_id.clone(), c.version).unwrap_or(0);
        assert!(c.version > prev, "versions increase per user");
        assert!(!c.segment_label.is_empty());
        decoded.push(c);
    }

    // The catalogue topic names every segment (key: its id), and each change's label is the
    // wording of the catalogue version it carries.
    let n = metrics.catalogue_records();
    let catalogue: Vec<_> = read_topic(
        &settings,
        &settings.kafka.topics.segment_catalogue,
        n as usize,
        PATIENCE,
    )
    .into_iter()
    .map(|o| {
        let r = decode_catalogue(&o.payload, WireFormat::Avro).expect("decodes with its schema");
        assert_eq!(o.key.unwrap(), r.segment_id.to_string().into_bytes());
        r
    })
    .collect();
    assert_eq!(catalogue.len() as u64, n);
    let created: std::collections::BTreeSet<i32> = catalogue
        .iter()
        .filter(|r| r.reason == CatalogueReason::Created)
        .map(|r| r.segment_id)
        .collect();
    assert_eq!(created, (0..6).collect(), "{catalogue:?}");
    for c in &decoded {
        let wording = catalogue
            .iter()
            .filter(|r| r.segment_id == c.new_segment && r.catalogue_version <= c.catalogue_version)
            .max_by_key(|r| r.catalogue_version)
            .expect("a catalogue record precedes the change");
        assert_eq!(wording.label, c.segment_label);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_offsets_and_a_second_run_resumes_without_loss_or_repeats() {
    let settings = fresh_settings("resume", 3).await;
    let sent = produce(&settings, records(12, 100, 6_000, 0.0, &settings.decode)).await;
    let total = sent.len() as u64;

    // First run: stop it part-way.
    let m1 = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), m1.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    assert!(wait_for(PATIENCE, || m1.consumed_total() >= total / 3).await);
    cancel.cancel();
    let first = task.await.unwrap().unwrap();
    let c1 = m1.consumed_total();
    assert!(
        c1 < total,
        "the first run stopped mid-stream ({c1} of {total})"
    );
    let committed: i64 = committed(&settings, 3).values().sum();
    assert_eq!(
        committed as u64, c1,
        "shutdown committed exactly what was processed"
    );

    // Second run: the rest, and only the rest.
    let m2 = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), m2.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    assert!(wait_for(PATIENCE, || m2.consumed_total() >= total - c1).await);
    cancel.cancel();
    let second = task.await.unwrap().unwrap();
    assert_eq!(m2.consumed_total(), total - c1);
    assert_eq!(m2.skipped_total(), 0, "nothing was read twice");
    // The second run restored the first's state from the changelog and continued it.
    assert_eq!(m2.restored_users_total() as usize, first.users());
    for (user, n) in events_per_user(&sent) {
        let a = first.user(&user).map_or(0, |u| u.events);
        let b = second.user(&user).map_or(0, |u| u.events);
        assert!(a <= n);
        assert_eq!(
            b, n,
            "{user}: every event applied exactly once across the two runs"
        );
    }
}
