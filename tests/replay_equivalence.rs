//! Replay runs the same decode → features → models code as the Kafka path: the same events give
//! the same per-user state either way, and bad lines are reported, not dropped silently.

mod common;

use common::*;
use segstream::clock::wall_ms;
use segstream::engine::Engine;
use segstream::event::Event;
use segstream::generate::Generator;
use segstream::metrics::Metrics;
use segstream::pipeline;
use segstream::replay::{replay, ReplayInputs, ReplayOutputs};
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_kafka_reach_the_same_per_user_state() {
    let settings = fresh_settings("replay", 3).await;
    let mut g = Generator::new(31, 80, 0.0);
    let records: Vec<_> = (0..4_000)
        .map(|_| g.next_record(wall_ms(), &settings.decode))
        .collect();

    // The same events as NDJSON files, one per topic, plus two unusable lines.
    let dir = tempfile::tempdir().unwrap();
    let paths = ["clicks.ndjson", "purchases.ndjson", "social.ndjson"].map(|f| dir.path().join(f));
    let mut files = paths.clone().map(|p| std::fs::File::create(p).unwrap());
    for r in &records {
        let (i, json) = match r.event.as_ref().unwrap() {
            Event::Click(e) => (0, serde_json::to_string(e)),
            Event::Purchase(e) => (1, serde_json::to_string(e)),
            Event::Social(e) => (2, serde_json::to_string(e)),
        };
        writeln!(files[i], "{}", json.unwrap()).unwrap();
    }
    writeln!(files[0], "{{not json").unwrap();
    writeln!(files[1], r#"{{"event_id":"x","user_id":""}}"#).unwrap();
    drop(files);

    let sent = produce(&settings, records).await;
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    assert!(
        wait_for(Duration::from_secs(90), || metrics.consumed_total()
            >= sent.len() as u64)
        .await
    );
    cancel.cancel();
    let kafka = task.await.unwrap().unwrap();

    let dead = dir.path().join("dead.ndjson");
    let (replayed, report) = replay(
        &settings,
        &ReplayInputs {
            clickstream: Some(paths[0].clone()),
            purchases: Some(paths[1].clone()),
            social: Some(paths[2].clone()),
        },
        &ReplayOutputs {
            dead_letters: Some(dead.clone()),
            ..Default::default()
        },
        &Default::default(),
    )
    .unwrap();
    assert_eq!(report.applied, sent.len() as u64);
    assert_eq!(report.invalid.get("invalid_json"), Some(&1));
    assert_eq!(report.invalid.get("missing_field"), Some(&1));
    assert_eq!(std::fs::read_to_string(dead).unwrap().lines().count(), 2);

    assert_eq!(kafka.users(), replayed.users());
    for (user, n) in events_per_user(&sent) {
        let (a, b) = (kafka.user(&user).unwrap(), replayed.user(&user).unwrap());
        assert_eq!(a.events, n);
        assert_eq!(b.events, n);
        assert_eq!(a.anchor_ms, b.anchor_ms);
        for ((name, x), (_, y)) in a
            .named(kafka.feature_params())
            .into_iter()
            .zip(b.named(kafka.feature_params()))
        {
            assert!(
                (x - y).abs() <= 1e-9 * (1.0 + x.abs()),
                "{user} {name}: {x} vs {y}"
            );
        }
    }
    // Both formed segments from the same data.
    assert!(kafka.is_seeded() && replayed.is_seeded());
}
