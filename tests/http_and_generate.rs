//! The HTTP surface SREs scrape, and `segstream generate` against the real broker.

mod common;

use common::*;
use segstream::clock::wall_ms;
use segstream::engine::Engine;
use segstream::event::{ChangeReason, Source};
use segstream::generate::Generator;
use segstream::metrics::Metrics;
use segstream::pipeline;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, None).await
}

/// A minimal HTTP/1.1 request over a fresh connection: (status, body).
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
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
        segstream::http::metrics_router(metrics.clone()),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_profiles_and_segments_and_erases_users() {
    let run = start_api("api", 8, Some("s3cret")).await;
    let (settings, addr, metrics) = (run.settings.clone(), run.addr, run.metrics.clone());
    let token = Some("s3cret");

    // The token guards the API, not metrics or health.
    assert_eq!(request(addr, "GET", "/segments", None).await.0, 401);
    assert_eq!(
        request(addr, "GET", "/segments", Some("wrong")).await.0,
        401
    );
    assert_eq!(get(addr, "/metrics").await.0, 200);
    assert_eq!(get(addr, "/healthz").await.0, 200);

    // The catalogue is republished by the pipeline about twice a second.
    let mut catalogue = serde_json::Value::Null;
    for _ in 0..50 {
        let (status, body) = request(addr, "GET", "/segments", token).await;
        assert_eq!(status, 200);
        catalogue = serde_json::from_str(&body).unwrap();
        let sizes: i64 = catalogue["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["size"].as_i64().unwrap())
            .sum();
        if sizes > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let segments = catalogue["segments"].as_array().unwrap();
    assert_eq!(segments.len(), settings.model.k);
    assert!(segments
        .iter()
        .all(|s| !s["label"].as_str().unwrap().is_empty()));
    assert!(catalogue["model_version"].as_u64().unwrap() > 0);

    // A profile: named features, segment and its description.
    let user = "user-7";
    let (status, body) = request(addr, "GET", &format!("/users/{user}"), token).await;
    assert_eq!(status, 200, "{body}");
    let profile: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(profile["user_id"], user);
    assert!(profile["events"].as_u64().unwrap() > 0);
    assert!(profile["features"]["monetary"].is_number());
    // A fresh service's values come from each user's own spend until labels mature, and say so.
    assert!(profile["predicted_value"].as_f64().unwrap() >= 0.0);
    let p = profile["purchase_probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{p}");
    assert!(
        ["cold_start", "blended", "model"].contains(&profile["value_source"].as_str().unwrap()),
        "{profile}"
    );
    assert!(
        profile["segment"].is_u64() && profile["segment_label"].is_string(),
        "{profile}"
    );
    assert_eq!(request(addr, "GET", "/users/nobody", token).await.0, 404);

    // Erasure: gone from memory, and an `erased` change is published.
    assert_eq!(
        request(addr, "DELETE", &format!("/users/{user}"), token)
            .await
            .0,
        204
    );
    assert_eq!(
        request(addr, "GET", &format!("/users/{user}"), token)
            .await
            .0,
        404
    );
    assert_eq!(
        request(addr, "DELETE", &format!("/users/{user}"), token)
            .await
            .0,
        404
    );
    // Stopping drains deliveries, so every published change is counted by then.
    run.stop().await;
    let changes = metrics.changes_total() as usize;
    let erased = changes_with_reason(
        &settings,
        ChangeReason::Erased,
        changes,
        Duration::from_secs(30),
    );
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].user_id, user);
    assert!(metrics.render().contains("segstream_erasures_total 1"));
    assert!(metrics
        .render()
        .contains("segstream_segment_mean_purchase_probability{segment="));
    assert!(metrics
        .render()
        .contains("segstream_event_to_emit_seconds_count"));

    // Prometheus' own linter finds nothing wrong with a live scrape.
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .output_with_stdin(metrics.render().as_bytes())
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

trait WithStdin {
    fn output_with_stdin(&mut self, input: &[u8]) -> Option<std::process::Output>;
}

impl WithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &[u8]) -> Option<std::process::Output> {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(input).ok()?;
        child.wait_with_output().ok()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_renders_segments_in_a_real_browser() {
    let run = start_api("page", 9, None).await;
    let (settings, addr) = (run.settings.clone(), run.addr);
    // Until the pipeline has published the seeded model's catalogue.
    let mut published = false;
    for _ in 0..100 {
        let (_, body) = request(addr, "GET", "/segments", None).await;
        let c: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if c["segments"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["size"].as_i64() > Some(0)))
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(published, "the catalogue was published");

    // Debian's chromium (.ci/run installs it), headless, as the workplace's probe runs it.
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/");
    let dom = tokio::task::spawn_blocking(move || {
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .expect("chromium (Debian package chromium; .ci/run installs it)")
    })
    .await
    .unwrap();
    run.stop().await;
    let html = String::from_utf8_lossy(&dom.stdout);
    // The rows are drawn by the page's script from /segments: a browser ran it.
    let table = html
        .split("<tbody id=\"segments\">")
        .nth(1)
        .and_then(|t| t.split("</tbody>").next())
        .expect("the segments table");
    assert_eq!(
        table.matches("<tr class=\"segment\">").count(),
        settings.model.k,
        "{table}"
    );
    assert!(
        !table.contains("waiting") && !table.contains("cannot reach"),
        "{table}"
    );
    let chart = html
        .split("<svg id=\"chart\"")
        .nth(1)
        .unwrap()
        .split("</svg>")
        .next()
        .unwrap();
    assert_eq!(
        chart.matches("<polyline").count(),
        settings.model.k,
        "the sizes chart is drawn"
    );
    // Axes with user counts and clock times, and a legend naming every segment.
    assert!(
        chart.matches("class=\"axis\"").count() >= 2 + 5 + 3,
        "{chart}"
    );
    assert!(chart.contains(">users</text>"), "{chart}");
    let legend = html
        .split("<div class=\"legend\" id=\"legend\">")
        .nth(1)
        .and_then(|l| l.split("</div>").next())
        .expect("the legend");
    assert_eq!(
        legend.matches("class=\"entry\"").count(),
        settings.model.k,
        "{legend}"
    );
}

/// A pipeline with its HTTP API on a free port, having consumed 2,000 persona records.
struct Running {
    settings: segstream::config::Settings,
    addr: std::net::SocketAddr,
    metrics: Metrics,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<Engine, segstream::pipeline::PipelineError>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start_api(name: &str, seed: u64, token: Option<&str>) -> Running {
    let settings = fresh_settings(name, 2).await;
    let mut g = Generator::new(seed, 60, 0.0);
    let records = (0..2_000)
        .map(|_| g.next_record(wall_ms(), &settings.decode))
        .collect();
    let sent = produce(&settings, records).await;
    let engine = Engine::new(&settings);
    let metrics = Metrics::new();
    let (api, link) =
        segstream::http::link(&engine, metrics.clone(), token.map(Into::into), Vec::new());
    let cancel = CancellationToken::new();
    let (addr, server) = segstream::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        segstream::http::api_router(api),
        cancel.clone(),
    )
    .await
    .unwrap();
    let task = {
        let (s, m, c) = (settings.clone(), metrics.clone(), cancel.clone());
        tokio::spawn(async move { pipeline::run_with_api(&s, engine, m, c, link).await })
    };
    let want = sent.len() as u64;
    assert!(wait_for(Duration::from_secs(90), || metrics.consumed_total() >= want).await);
    Running {
        settings,
        addr,
        metrics,
        cancel,
        task,
        server,
    }
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
        self.server.await.unwrap().unwrap();
    }
}
