//! `segstream run` as a separate process, killed with SIGKILL at random points while traffic
//! flows and restarted each time: the per-user state it ends with equals an uninterrupted
//! application of the same input (nothing lost, nothing applied twice), and every malformed
//! record reached the dead-letter topic. And SIGTERM: an ordered stop whose checkpoint lets the
//! next run continue exactly where it stopped.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use segstream::clock::wall_ms;
use segstream::encode::decode_change;
use segstream::generate::Generator;
use segstream::pipeline::{DLQ_SOURCE_OFFSET, DLQ_SOURCE_PARTITION, DLQ_SOURCE_TOPIC};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(120);
const PARTITIONS: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_then_the_state_equals_an_uninterrupted_run() {
    let settings = fresh_settings("crashloop", PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&settings, dir.path());

    // Traffic flows while the service is killed and restarted.
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer = {
        let (settings, sent, stop) = (settings.clone(), sent.clone(), stop_producing.clone());
        tokio::spawn(async move {
            let mut g = Generator::new(31, 150, 0.02);
            while !stop.load(Ordering::Relaxed) {
                let batch = (0..100)
                    .map(|_| g.next_record(wall_ms(), &settings.decode))
                    .collect();
                let done = produce(&settings, batch).await;
                sent.lock().unwrap().extend(done);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let mut rng = rand::rngs::StdRng::seed_from_u64(wall_ms() as u64);
    let mut kills = 0;
    for round in 0..6 {
        let (mut child, port) = spawn_service(&config);
        if round == 2 {
            // Once during start-up (joining the group or restoring).
            tokio::time::sleep(Duration::from_millis(rng.random_range(300..2_500))).await;
        } else {
            let consuming = wait_for_metric(port, "segstream_events_consumed_total", 1.0).await;
            assert!(consuming, "round {round}: the service consumed");
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..1_500))).await;
        }
        child.kill().unwrap(); // SIGKILL: no shutdown, no last checkpoint.
        child.wait().unwrap();
        kills += 1;
    }
    assert!(kills >= 5);
    stop_producing.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let sent = sent.lock().unwrap().clone();

    // A last run catches up and stops in order.
    let (mut child, port) = spawn_service(&config);
    let ends = end_offsets(&sent);
    let caught_up = wait_until(PATIENCE, || {
        let c = committed(&settings, PARTITIONS);
        ends.iter().all(|(k, end)| c.get(k) == Some(end))
    })
    .await;
    let restored = scrape(port, "segstream_restored_users_total");
    terminate(&mut child);
    assert!(caught_up, "the last run consumed everything");
    assert!(
        restored.unwrap_or(0.0) > 0.0,
        "the last run started from restored state"
    );

    // The changelog's state equals applying every valid event once, in any order.
    let got = restore_all(&settings, PARTITIONS);
    let want = uninterrupted(&settings, &sent);
    assert_same_state(&settings, &got, &want);

    // One version is one decision: changes published again after a kill (decided again from
    // the checkpoint, perhaps differently) never reuse a version that was published for
    // another decision, so a subscriber keeping the highest version keeps a real latest one.
    let changes = read_topic(
        &settings,
        &settings.kafka.topics.segment_changes,
        usize::MAX,
        Duration::from_secs(8),
    );
    assert!(!changes.is_empty());
    let mut decisions: HashMap<(String, i64), (i32, Option<i32>)> = HashMap::new();
    let mut reused = Vec::new();
    for g in &changes {
        let c = decode_change(&g.payload, settings.output.format).unwrap();
        let d = (c.new_segment, c.previous_segment);
        match decisions.insert((c.user_id.clone(), c.version), d) {
            Some(before) if before != d => reused.push((c.user_id, c.version, before, d)),
            _ => {}
        }
    }
    assert!(
        reused.is_empty(),
        "{} (user, version) pairs carry two decisions, e.g. {:?}",
        reused.len(),
        &reused[..reused.len().min(3)]
    );

    // Every malformed record was dead-lettered (some perhaps twice: output is at-least-once).
    let malformed: HashSet<(String, i32, i64)> = sent
        .iter()
        .filter(|s| s.record.expected_error.is_some())
        .map(|s| {
            (
                settings.topic(s.record.source).to_owned(),
                s.partition,
                s.offset,
            )
        })
        .collect();
    assert!(!malformed.is_empty());
    let dead: HashSet<(String, i32, i64)> = read_topic(
        &settings,
        &settings.kafka.topics.dead_letter,
        usize::MAX,
        Duration::from_secs(8),
    )
    .iter()
    .map(|d| {
        (
            d.headers[DLQ_SOURCE_TOPIC].clone(),
            d.headers[DLQ_SOURCE_PARTITION].parse().unwrap(),
            d.headers[DLQ_SOURCE_OFFSET].parse().unwrap(),
        )
    })
    .collect();
    assert_eq!(dead, malformed, "every malformed record, and only those");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_and_the_next_run_continues_exactly() {
    let settings = fresh_settings("sigterm", PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&settings, dir.path());
    let sent = produce_generated(&settings, 5, 50, 3_000).await;
    let (mut child, port) = spawn_service(&config);
    assert!(wait_for_metric(port, "segstream_events_consumed_total", 1.0).await);
    let status = terminate(&mut child);
    assert!(status.success(), "{status}");
    let done = committed(&settings, PARTITIONS).values().sum::<i64>() as u64;
    let total = sent.len() as u64;
    assert!(done > 0 && done <= total);

    // A restart consumes exactly the rest: nothing read twice, nothing skipped.
    let (metrics, _, cancel, task) = start(&settings);
    if done < total {
        assert!(wait_for(PATIENCE, || metrics.consumed_total() >= total - done).await);
    } else {
        assert!(wait_for(PATIENCE, || metrics.is_ready()).await);
    }
    cancel.cancel();
    let engine = task.await.unwrap().unwrap();
    assert_eq!(metrics.consumed_total(), total - done);
    assert_eq!(metrics.skipped_total(), 0);
    for (user, n) in events_per_user(&sent) {
        assert_eq!(engine.user(&user).map(|u| u.events), Some(n), "{user}");
    }
}
