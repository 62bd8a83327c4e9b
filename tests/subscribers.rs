//! The subscriber examples that docs/schemas.md shows (Rust: `examples/subscriber.rs`, Python:
//! `examples/subscriber.py`), run against the real broker after the service has segmented a
//! stream and erased one user: each ends with exactly the service's final segments.

mod common;

use common::*;
use rdkafka::producer::FutureRecord;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(90);

/// One JSON object per user, as both examples print their view: user → segment.
fn view(stdout: &[u8]) -> BTreeMap<String, u64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["user_id"].as_str().unwrap().to_owned(),
                v["segment"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn rust_example() -> PathBuf {
    // target/<profile>/deps/subscribers-… → target/<profile>/examples/subscriber
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/subscriber")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_and_python_subscribers_end_with_the_services_segments() {
    let settings = fresh_settings("subs", 2).await;
    let sent = produce_generated(&settings, 21, 80, 2_000).await;
    let (metrics, store, cancel, task) = start(&settings);
    assert!(wait_for(PATIENCE, || metrics.consumed_total() == sent.len() as u64).await);
    // One erasure, through the topic (keyed, so on the user's partition).
    let erased = sent[0].record.key.clone();
    let producer = producer(&settings);
    producer
        .send(
            FutureRecord::to(&settings.kafka.topics.erasure)
                .key(erased.as_bytes())
                .payload(&b""[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(wait_for(PATIENCE, || store.get(&erased).is_none()).await);
    cancel.cancel();
    let engine = task.await.unwrap().unwrap();
    let expected: BTreeMap<String, u64> = events_per_user(&sent)
        .into_keys()
        .filter_map(|u| {
            let segment = engine.user(&u)?.segment?;
            Some((u, u64::from(segment)))
        })
        .collect();
    assert!(!expected.contains_key(&erased) && expected.len() > 50);

    let brokers = brokers();
    let topic = &settings.kafka.topics.segment_changes;
    // Quick group joins (the broker takes about half the session timeout to form a group).
    let args = [
        "--brokers",
        &brokers,
        "--topic",
        topic,
        "--idle-exit-ms",
        "5000",
        "-X",
        "session.timeout.ms=6000",
        "-X",
        "heartbeat.interval.ms=1000",
    ];
    let rust = Command::new(rust_example()).args(args).output().unwrap();
    assert!(
        rust.status.success(),
        "{}",
        String::from_utf8_lossy(&rust.stderr)
    );
    assert_eq!(view(&rust.stdout), expected, "the Rust subscriber's view");

    let python = std::env::var("SEGSTREAM_TEST_PYTHON")
        .expect("SEGSTREAM_TEST_PYTHON is not set: run the tests with `bash .ci/run`");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/subscriber.py");
    let py = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(view(&py.stdout), expected, "the Python subscriber's view");
}
