//! segstream against a secured cluster, as managed Kafka services run them.
//!
//! TLS: Tansu 0.6.0 cannot serve TLS itself (its `--cert` and `--key` exclude each other), so a
//! TLS front (`common::tls`) terminates TLS before a plain-text Tansu that advertises the front,
//! as a TLS load balancer would. librdkafka's side is real: the handshake, verification of the
//! broker's certificate against `ssl.ca.location`, and the client certificate the front requires.
//! SASL: Tansu's own `--authentication` offers SCRAM-SHA-256/512 only. With its in-memory storage
//! a user cannot be created once authentication is on (`tansu user create` is refused as
//! unauthenticated), so these tests cover SCRAM's failure path, not a successful login.

mod common;

use common::tls::{front, Pki};
use common::*;
use segstream::app::{create_all_topics, settings_with};
use std::path::Path;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(90);

fn properties(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let (listen, tls_port) = (free_port(), free_port());
    let _broker = OwnBroker::start(listen, tls_port, false);
    front(&pki, tls_port, listen, true).await;

    let mut settings = settings_with(
        &format!("127.0.0.1:{tls_port}"),
        &format!("tls-{}", std::process::id()),
        &pki.client_properties(true),
    );
    settings.model.init_users = 40;
    settings.model.init_events = 400;
    assert_eq!(settings.security.describe(), "SSL");
    segstream::kafka::check_clients(&settings).unwrap();
    create_all_topics(&settings, 2).await.unwrap();
    let sent = produce_generated(&settings, 5, 80, 1_500).await;

    let (metrics, store, cancel, task) = start(&settings);
    let ends = end_offsets(&sent);
    let done = wait_until(PATIENCE, || {
        let c = committed(&settings, 2);
        ends.iter().all(|(k, end)| c.get(k) == Some(end))
    })
    .await;
    let changes = read_topic(
        &settings,
        &settings.kafka.topics.segment_changes,
        1,
        Duration::from_secs(30),
    );
    cancel.cancel();
    task.await.unwrap().unwrap();
    assert!(done, "every input offset was committed over TLS");
    assert_eq!(metrics.consumed_total(), sent.len() as u64);
    assert_eq!(store.len(), events_per_user(&sent).len());
    assert!(
        !changes.is_empty(),
        "segment changes were published over TLS"
    );
}

/// `segstream run` on `properties`: waits for a log line containing `cause`, checks that the
/// instance is not ready meanwhile, and that SIGTERM still ends it cleanly.
async fn refused_with(brokers: &str, properties: Vec<(String, String)>, cause: &str, dir: &Path) {
    let settings = settings_with(brokers, &format!("sec-{}", rand::random::<u32>()), &[]);
    let extra: String = std::iter::once("[kafka.properties]\n".to_owned())
        .chain(properties.iter().map(|(k, v)| format!("{k:?} = {v:?}\n")))
        .collect();
    let config = write_config_with(&settings, dir, &extra);
    let log = dir.join(format!("run-{}.log", rand::random::<u32>()));
    let (mut child, port) = spawn_service_logging(&config, &log);
    let named = wait_until(PATIENCE, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains(cause))
    })
    .await;
    let ready = http_status(port, "/readyz");
    let status = terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(named, "the log names the cause `{cause}`:\n{text}");
    let line = text.lines().find(|l| l.contains(cause)).unwrap_or_default();
    eprintln!("{line}");
    assert_eq!(ready, Some(503), "not ready while the cluster refuses it");
    assert!(
        status.success(),
        "SIGTERM while waiting exits 0: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_broker_a_missing_client_certificate_and_plain_text_to_tls_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let (listen, tls_port) = (free_port(), free_port());
    let _broker = OwnBroker::start(listen, tls_port, false);
    front(&pki, tls_port, listen, true).await;
    let brokers = format!("127.0.0.1:{tls_port}");
    let tls = |ca: &str| {
        vec![
            ("security.protocol".to_owned(), "SSL".to_owned()),
            ("ssl.ca.location".to_owned(), pki.path(ca)),
        ]
    };
    let mut untrusted = tls("other-ca.pem");
    untrusted.extend(properties(&[
        ("ssl.certificate.location", pki.path("client.pem")),
        ("ssl.key.location", pki.path("client.key")),
    ]));
    refused_with(&brokers, untrusted, "TLS handshake failed", dir.path()).await;
    refused_with(&brokers, tls("ca.pem"), "TLS handshake failed", dir.path()).await;
    refused_with(
        &brokers,
        vec![],
        "listener expects another security.protocol",
        dir.path(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scram_login_the_broker_refuses_is_named_as_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _broker = OwnBroker::start(port, port, true);
    let sasl = properties(&[
        ("security.protocol", "SASL_PLAINTEXT".into()),
        ("sasl.mechanism", "SCRAM-SHA-512".into()),
        ("sasl.username", "segstream".into()),
        ("sasl.password", "not-the-password".into()),
    ]);
    refused_with(
        &format!("127.0.0.1:{port}"),
        sasl,
        "authentication failed",
        dir.path(),
    )
    .await;
}
