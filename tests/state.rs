//! Durable, shared and bounded state against the real broker: two instances in one group (one
//! model, a take-over with state after `kill -9`, a hand-over with a checkpoint on revoke), erasure through the erasure topic (gone from
//! memory, the changelog and a restart), `max_users` eviction, and a broker outage.

mod common;

use common::*;
use rdkafka::producer::{FutureRecord, Producer};
use segstream::clock::wall_ms;
use segstream::config::{Settings, WireFormat};
use segstream::encode::encode_event;
use segstream::event::{ChangeReason, ClickEvent, ClickKind, Event, Source};
use segstream::generate::Generator;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(120);

/// Produces generator traffic in the background until the returned flag is set.
fn traffic(
    settings: &Settings,
    seed: u64,
    users: usize,
    per_batch: usize,
) -> (
    Arc<AtomicBool>,
    Arc<Mutex<Vec<Sent>>>,
    tokio::task::JoinHandle<()>,
) {
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let (settings, sent, stop) = (settings.clone(), sent.clone(), stop.clone());
        tokio::spawn(async move {
            let mut g = Generator::new(seed, users, 0.0);
            while !stop.load(Ordering::Relaxed) {
                let batch = (0..per_batch)
                    .map(|_| g.next_record(wall_ms(), &settings.decode))
                    .collect();
                let done = produce(&settings, batch).await;
                sent.lock().unwrap().extend(done);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    (stop, sent, task)
}

/// Centroids by segment id from `/segments`, with the model version and the trainer flag.
fn catalogue(port: u16) -> Option<(u64, bool, Vec<Vec<f64>>)> {
    let body = http_get(port, "/segments")?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let centroids: Vec<Vec<f64>> = v["segments"]
        .as_array()?
        .iter()
        .map(|s| {
            s["centroid"]
                .as_array()
                .map(|c| c.iter().filter_map(|p| p[1].as_f64()).collect())
                .unwrap_or_default()
        })
        .collect();
    Some((
        v["model_version"].as_u64()?,
        v["trainer"].as_bool()?,
        centroids,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_model_and_one_takes_over_the_others_state() {
    const PARTITIONS: i32 = 4;
    let settings = fresh_settings("pair", PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&settings, dir.path());
    let (stop, sent, producer) = traffic(&settings, 41, 200, 100);

    let (mut a, port_a) = spawn_service(&config);
    assert!(wait_for_metric(port_a, "segstream_events_consumed_total", 1.0).await);
    let (mut b, port_b) = spawn_service(&config);
    assert!(wait_for_metric(port_b, "segstream_events_consumed_total", 1.0).await);

    // While both run: whenever they report the same model version, it is the same model (so
    // the same segment ids), and at most one of them trains.
    let (mut agreed, mut both_trained) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let (Some((va, ta, ca)), Some((vb, tb, cb))) = (catalogue(port_a), catalogue(port_b)) {
            if ta && tb {
                both_trained += 1;
            }
            if va == vb && va > 0 && !ca[0].is_empty() && !cb[0].is_empty() {
                assert_eq!(
                    ca, cb,
                    "model version {va} means one model on both instances"
                );
                agreed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        agreed > 0,
        "the instances were seen agreeing on a model version"
    );
    assert!(
        both_trained <= 1,
        "one trainer at a time (a stale sample aside)"
    );
    let a_users = scrape(port_a, "segstream_users_tracked").unwrap();
    let b_users = scrape(port_b, "segstream_users_tracked").unwrap();
    assert!(
        a_users > 0.0 && b_users > 0.0,
        "the partitions (and users) are split"
    );

    // kill -9 one; the other takes its partitions with their state.
    b.kill().unwrap();
    b.wait().unwrap();
    let restored_before = scrape(port_a, "segstream_restored_users_total").unwrap();
    let took_over = wait_until(PATIENCE, || {
        scrape(port_a, "segstream_restored_users_total").is_some_and(|r| r > restored_before)
    })
    .await;
    assert!(took_over, "the survivor restored the dead instance's users");
    stop.store(true, Ordering::Relaxed);
    producer.await.unwrap();
    let sent = sent.lock().unwrap().clone();
    let ends = end_offsets(&sent);
    let caught_up = wait_until(PATIENCE, || {
        let c = committed(&settings, PARTITIONS);
        ends.iter().all(|(k, end)| c.get(k) == Some(end))
    })
    .await;
    assert!(caught_up, "the survivor consumed everything");
    let (_, trainer, _) = catalogue(port_a).unwrap();
    assert!(trainer, "the survivor trains");
    assert!(terminate(&mut a).success());

    // Nothing lost, nothing counted twice, across the split and the take-over.
    let got = restore_all(&settings, PARTITIONS);
    assert_same_state(&settings, &got, &uninterrupted(&settings, &sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_checkpoints_the_revoked_partitions_so_nothing_is_read_twice() {
    const PARTITIONS: i32 = 4;
    let mut settings = fresh_settings("handover", PARTITIONS).await;
    // No periodic checkpoint during the test: only the one taken on revoke can hand the state
    // over.
    settings.state.checkpoint_interval = Duration::from_secs(3600);
    let sent = produce_generated(&settings, 12, 300, 4_000).await;
    let (metrics_a, store_a, cancel_a, task_a) = start(&settings);
    assert!(wait_for(PATIENCE, || metrics_a.consumed_total() == sent.len() as u64).await);
    let users = store_a.len();

    // A second instance joins: the first checkpoints all four partitions on revoke, then each
    // restores its new share from those checkpoints and reads on from their markers.
    let (metrics_b, store_b, cancel_b, task_b) = start(&settings);
    let settled = wait_for(PATIENCE, || {
        metrics_b.restores_total() > 0
            && metrics_a.restores_total() > PARTITIONS as u64
            && store_a.len() + store_b.len() == users
    })
    .await;
    assert!(settled, "the partitions were split, with their users");
    assert!(!store_a.is_empty() && !store_b.is_empty());
    // An absence can only be watched for: a re-read would show within these 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        metrics_b.consumed_total(),
        0,
        "the new owner re-read nothing"
    );
    assert_eq!(
        metrics_a.consumed_total(),
        sent.len() as u64,
        "nor did the old one"
    );
    assert_eq!(metrics_a.skipped_total() + metrics_b.skipped_total(), 0);
    assert_eq!(
        metrics_a.restored_users_total() + metrics_b.restored_users_total(),
        users as u64,
        "every user was handed over through the changelog"
    );
    cancel_b.cancel();
    task_b.await.unwrap().unwrap();
    cancel_a.cancel();
    task_a.await.unwrap().unwrap();
    let got = restore_all(&settings, PARTITIONS);
    assert_same_state(&settings, &got, &uninterrupted(&settings, &sent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_on_the_topic_removes_every_trace_including_after_a_restart() {
    let settings = fresh_settings("erase", 2).await;
    let sent = produce_generated(&settings, 8, 40, 2_000).await;
    let per_user = events_per_user(&sent);
    let victim = per_user.keys().min().unwrap().clone();

    let (metrics, store, cancel, task) = start(&settings);
    assert!(wait_for(PATIENCE, || metrics.consumed_total() >= sent.len() as u64).await);
    assert!(store.get(&victim).is_some());
    // The request is keyed by the user id like the events, so it reaches the user's partition.
    let producer = producer(&settings);
    producer
        .send(
            FutureRecord::<[u8], [u8]>::to(&settings.kafka.topics.erasure)
                .key(victim.as_bytes())
                .payload(b"gdpr-ticket-1"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    producer
        .send(
            FutureRecord::<[u8], [u8]>::to(&settings.kafka.topics.erasure).payload(b"no key"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();
    assert!(wait_for(PATIENCE, || metrics.erasure_requests("erased") == 1).await);
    assert!(wait_for(PATIENCE, || metrics.erasure_requests("invalid") == 1).await);
    assert!(store.get(&victim).is_none(), "gone from memory");
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert!(
        !restore_all(&settings, 2).contains_key(&victim),
        "gone from the changelog"
    );

    // A restart restores everyone but the erased user; a new event starts them from nothing.
    let (metrics, store, cancel, task) = start(&settings);
    assert!(wait_for(PATIENCE, || metrics.restores_total() == 2).await);
    assert_eq!(metrics.restored_users_total() as usize, per_user.len() - 1);
    assert!(store.get(&victim).is_none(), "not restored");
    let event = Event::Click(ClickEvent {
        event_id: "after-erasure".into(),
        user_id: victim.clone(),
        event_time: wall_ms(),
        session_id: "s".into(),
        kind: ClickKind::View,
        product_id: "p".into(),
        category: "home".into(),
        price: 1.0,
        dwell_ms: 1_000,
        search_text: None,
        embedding: None,
    });
    let again = segstream::generate::Record {
        source: Source::Clickstream,
        key: victim.clone(),
        payload: encode_event(
            &event,
            WireFormat::Avro,
            settings.decode.schema_ids.clickstream,
        ),
        event: Some(event),
        expected_error: None,
    };
    produce(&settings, vec![again]).await;
    assert!(wait_for(PATIENCE, || store.get(&victim).is_some()).await);
    assert_eq!(store.get(&victim).unwrap().events, 1, "starts from nothing");
    cancel.cancel();
    task.await.unwrap().unwrap();

    // Exactly one `erased` change, for the victim.
    let erased = changes_with_reason(
        &settings,
        ChangeReason::Erased,
        usize::MAX,
        Duration::from_secs(5),
    );
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].user_id, victim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_max_users_stays_bounded_and_evictions_are_published() {
    let mut settings = fresh_settings("evict", 2).await;
    settings.state.max_users = 60;
    let sent = produce_generated(&settings, 12, 600, 6_000).await;
    let distinct = events_per_user(&sent).len();
    assert!(distinct >= 10 * 60, "{distinct} users");

    let (metrics, store, cancel, task) = start(&settings);
    let bound = 60 + 1; // max_users plus its 1 % slack (at least one)
    let mut peak = 0;
    let consumed = wait_for(PATIENCE, || {
        peak = peak.max(store.len());
        metrics.consumed_total() >= sent.len() as u64
    })
    .await;
    assert!(consumed);
    cancel.cancel();
    let engine = task.await.unwrap().unwrap();
    assert!(peak <= bound, "peak {peak} users in memory");
    assert!(engine.users() <= bound);
    let evicted = metrics.evictions_total();
    assert!(evicted as usize >= distinct - bound, "{evicted} evictions");

    // Each eviction is published, and the changelog holds only the users still in memory.
    let published = changes_with_reason(
        &settings,
        ChangeReason::Evicted,
        usize::MAX,
        Duration::from_secs(5),
    )
    .len();
    assert_eq!(published as u64, evicted);
    assert_eq!(restore_all(&settings, 2).len(), engine.users());
}

/// A TCP relay in front of a broker that can refuse and cut every connection (an outage).
struct Relay {
    port: u16,
    upstream: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn start(port: u16, upstream: u16) -> Self {
        let mut r = Relay {
            port,
            upstream,
            task: None,
        };
        r.up().await;
        r
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let upstream = self.upstream;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut out) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        }));
    }

    /// Drops the listener and every relayed connection (the JoinSet aborts them).
    fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The broker is unreachable for 30 s mid-stream (every connection cut, new ones refused) while
/// the broker process keeps its data (the memory engine would lose it on a restart, so the
/// process itself is not restarted). segstream is not ready meanwhile, waits, resumes, and ends
/// with the state of an uninterrupted run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_of_30_s_loses_nothing_and_shows_in_readiness() {
    let (listen, advertised) = (free_port(), free_port());
    let broker = OwnBroker::start(listen, advertised, false);
    let mut relay = Relay::start(advertised, listen).await;

    let outcome = async {
        let mut settings = segstream::app::settings_for(
            &format!("127.0.0.1:{advertised}"),
            &format!("outage-{}", std::process::id()),
        );
        settings.model.init_users = 40;
        settings.model.init_events = 400;
        segstream::app::create_all_topics(&settings, 2)
            .await
            .unwrap();
        let mut g = Generator::new(14, 100, 0.0);
        let mut batch = |n: usize| -> Vec<segstream::generate::Record> {
            (0..n)
                .map(|_| g.next_record(wall_ms(), &settings.decode))
                .collect()
        };
        let mut sent = produce(&settings, batch(2_000)).await;
        let (metrics, _store, cancel, task) = start(&settings);
        assert!(wait_for(PATIENCE, || metrics.consumed_total() >= 2_000).await);
        assert!(metrics.is_ready());

        relay.down();
        let mut was_unready = false;
        let outage = Instant::now();
        while outage.elapsed() < Duration::from_secs(30) {
            was_unready |= !metrics.is_ready();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        relay.up().await;
        assert!(was_unready, "readiness showed the outage");

        sent.extend(produce(&settings, batch(2_000)).await);
        let ends = end_offsets(&sent);
        let caught_up = wait_until(PATIENCE, || {
            let c = committed(&settings, 2);
            ends.iter().all(|(k, end)| c.get(k) == Some(end))
        })
        .await;
        assert!(caught_up, "it resumed and consumed everything");
        assert!(metrics.is_ready());
        cancel.cancel();
        task.await.unwrap().unwrap();
        let got = restore_all(&settings, 2);
        assert_same_state(&settings, &got, &uninterrupted(&settings, &sent));
    };
    let result = tokio::time::timeout(Duration::from_secs(240), outcome).await;
    relay.down();
    drop(broker);
    result.expect("the outage test finished in time");
}
