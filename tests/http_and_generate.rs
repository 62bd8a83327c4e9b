//! The HTTP surface SREs scrape, and `segstream generate` against the real broker.

mod common;

use common::*;
use segstream::event::Source;
use segstream::metrics::Metrics;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

#[tokio::test]
async fn metrics_health_and_readiness_are_served() {
    let metrics = Metrics::new();
    let cancel = CancellationToken::new();
    let (addr, server) = segstream::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        cancel.clone(),
    )
    .await
    .unwrap();
    metrics.consumed(Source::Clickstream);
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("segstream_events_consumed_total{topic=\"clickstream\"} 1"),
        "{body}"
    );
    assert!(body.contains("# TYPE segstream_processing_seconds histogram"));
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(
        get(addr, "/readyz").await.0,
        503,
        "not ready before partitions are assigned"
    );
    metrics.set_ready(true);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    cancel.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_creates_topics_and_produces_the_requested_count() {
    let prefix = format!("gen-{}-{}", std::process::id(), rand::random::<u32>());
    let settings = segstream::app::settings_for(&brokers(), &prefix);
    let t = &settings.kafka.topics;
    let out = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args([
            "generate",
            "--brokers",
            &settings.kafka.brokers,
            "--count",
            "600",
            "--rate",
            "0",
        ])
        .args(["--malformed-ratio", "0.1", "--create-topics", "2"])
        .env("SEGSTREAM__KAFKA__TOPICS__CLICKSTREAM", &t.clickstream)
        .env("SEGSTREAM__KAFKA__TOPICS__PURCHASES", &t.purchases)
        .env("SEGSTREAM__KAFKA__TOPICS__SOCIAL", &t.social)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sent 600 records"), "{stdout}");
    let topics: Vec<&str> = Source::ALL.iter().map(|s| settings.topic(*s)).collect();
    let got = read_topics(&settings, &topics, 601, Duration::from_secs(3));
    assert_eq!(got.len(), 600, "exactly the requested count, no more");
}
