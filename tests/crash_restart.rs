//! `kill -9` of a running `segstream run` process mid-stream, then a restart: the committed
//! offsets never run ahead of delivered effects (every dead letter before the commit point is in
//! the dead-letter topic), and the restarted service applies exactly the events after the commit
//! point — nothing lost, nothing applied twice relative to it.

mod common;

use common::*;
use segstream::engine::Engine;
use segstream::generate::Generator;
use segstream::metrics::Metrics;
use segstream::pipeline::{
    self, wall_ms, DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION, DLQ_SOURCE_TOPIC,
};
use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const PATIENCE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_loses_nothing() {
    let settings = fresh_settings("crash", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&settings, dir.path());

    // Traffic keeps flowing while the first process runs and dies.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer = {
        let (settings, sent, stop) = (settings.clone(), sent.clone(), stop_producing.clone());
        tokio::spawn(async move {
            let mut g = Generator::new(21, 120, 0.05);
            while !stop.load(Ordering::Relaxed) {
                let batch = (0..200)
                    .map(|_| g.next_record(wall_ms(), &settings.decode))
                    .collect();
                let done = produce(&settings, batch).await;
                sent.lock().unwrap().extend(done);
            }
        })
    };

    let mut child = spawn_service(&config);
    let progressed = wait_committed(&settings, 500).await;
    child.kill().unwrap(); // SIGKILL: no shutdown, no final commit.
    child.wait().unwrap();
    assert!(
        progressed,
        "the first process committed progress before it was killed"
    );
    let at_kill = committed(&settings, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_producing.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let sent = sent.lock().unwrap().clone();
    let topic_of = |s: &Sent| settings.topic(s.record.source).to_owned();
    let before = |s: &Sent| s.offset < at_kill[&(s.record.source, s.partition)];
    let after_kill: Vec<&Sent> = sent.iter().filter(|s| !before(s)).collect();
    assert!(!after_kill.is_empty(), "the process was killed mid-stream");

    // Committed means delivered: every malformed record before the commit point was dead-lettered.
    let must_be_dead: HashSet<(String, i32, i64)> = sent
        .iter()
        .filter(|s| s.record.expected_error.is_some() && before(s))
        .map(|s| (topic_of(s), s.partition, s.offset))
        .collect();
    assert!(!must_be_dead.is_empty());
    // Read the whole dead-letter topic: the killed process may have dead-lettered records past
    // the commit point too, so stopping after `must_be_dead.len()` records could miss some.
    // Its writer is dead, so what is there is final; every malformed record sent bounds it.
    let malformed_sent = sent
        .iter()
        .filter(|s| s.record.expected_error.is_some())
        .count();
    let dead = read_topic(
        &settings,
        &settings.kafka.topics.dead_letter,
        malformed_sent,
        Duration::from_secs(10),
    );
    let dead: HashSet<(String, i32, i64)> = dead
        .iter()
        .map(|d| {
            (
                d.headers[DLQ_SOURCE_TOPIC].clone(),
                d.headers[DLQ_SOURCE_PARTITION].parse().unwrap(),
                d.headers[DLQ_SOURCE_OFFSET].parse().unwrap(),
            )
        })
        .collect();
    assert!(
        must_be_dead.is_subset(&dead),
        "a committed offset ran ahead of its dead letter"
    );

    // The restart consumes exactly what follows the commit point.
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    let want = after_kill.len() as u64;
    assert!(wait_for(PATIENCE, || metrics.consumed_total() >= want).await);
    cancel.cancel();
    let engine = task.await.unwrap().unwrap();
    assert_eq!(metrics.consumed_total(), want);
    let mut expected: HashMap<String, u64> = HashMap::new();
    for s in after_kill.iter().filter(|s| s.record.event.is_some()) {
        *expected.entry(s.record.key.clone()).or_default() += 1;
    }
    for (user, n) in &expected {
        assert_eq!(engine.user(user).map(|u| u.events), Some(*n), "{user}");
    }
    assert_eq!(engine.users(), expected.len());
}

/// A config file for a `segstream run` subprocess on the test's topics and group.
fn write_config(
    settings: &segstream::config::Settings,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let config = dir.join("segstream.toml");
    let t = &settings.kafka.topics;
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
dead_letter = "{}"
[kafka.consumer_properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
[model]
init_users = 40
init_events = 400
[http]
bind = "127.0.0.1:0"
"#,
            settings.kafka.brokers,
            settings.kafka.group_id,
            t.clickstream,
            t.purchases,
            t.social,
            t.segment_changes,
            t.dead_letter
        ),
    )
    .unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_service_in_order_and_commits() {
    let settings = fresh_settings("sigterm", 3).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&settings, dir.path());
    let mut g = Generator::new(5, 50, 0.0);
    let sent = produce(
        &settings,
        (0..3_000)
            .map(|_| g.next_record(wall_ms(), &settings.decode))
            .collect(),
    )
    .await;
    let mut child = spawn_service(&config);
    let started = wait_committed(&settings, 0).await;
    assert!(started, "the service consumed and committed");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut status = None;
    for _ in 0..300 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.unwrap_or_else(|| {
        child.kill().ok();
        panic!("no exit within 30 s of SIGTERM")
    });
    assert!(status.success(), "{status}");
    let done = committed(&settings, 3).values().sum::<i64>() as u64;
    let total = sent.len() as u64;
    assert!(done > 0 && done <= total);

    // A restart consumes exactly the rest: nothing committed is read again, nothing is skipped.
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run(&s, Engine::new(&s), m, c).await })
    };
    if done < total {
        assert!(wait_for(PATIENCE, || metrics.consumed_total() >= total - done).await);
    } else {
        // Nothing left: give the consumer its assignment, then check it read nothing.
        assert!(wait_for(PATIENCE, || metrics.is_ready()).await);
    }
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(metrics.consumed_total(), total - done);
}

/// `segstream run --config FILE` as a separate process.
fn spawn_service(config: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Polls the group's committed offsets until their sum exceeds `more_than` (90 s at most).
async fn wait_committed(settings: &segstream::config::Settings, more_than: i64) -> bool {
    for _ in 0..900 {
        if committed(settings, 3).values().sum::<i64>() > more_than {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
