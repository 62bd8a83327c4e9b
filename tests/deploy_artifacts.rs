//! The deployment artifacts stay true to the code: the Grafana dashboard is valid JSON whose every
//! query names metrics segstream exports (and every exported family has a panel), and the
//! Prometheus alerts only use exported metrics (`promtool test rules` runs them in .ci/run), and
//! the image's and the Deployment's command lines start the service with this build's binary.

use segstream::engine::SegmentFigures;
use segstream::metrics::Metrics;
use std::collections::BTreeSet;
use std::path::Path;

/// Exported metric names, with the series names a histogram adds.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    // Families with labels appear once they have a series: give each one, as traffic would.
    let m = Metrics::new();
    m.set_lag("clickstream", 0, 1);
    m.catalogue_delivered(segstream::catalogue::CatalogueReason::Created);
    m.set_model_state(
        1,
        1,
        0.0,
        &[SegmentFigures {
            id: 0,
            size: 1,
            mean_predicted_value: 1.0,
            mean_purchase_probability: 0.5,
        }],
    );
    let text = m.render();
    let mut families = BTreeSet::new();
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        families.insert(name.to_owned());
        names.insert(name.to_owned());
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
    }
    (families, names)
}

/// The `segstream_*` and `process_*` identifiers a PromQL expression mentions.
fn metric_names(expr: &str) -> Vec<String> {
    // Identifiers of the query that name segstream's metrics or the process collector's.
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("segstream_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_dashboard_query_names_exported_metrics_and_every_family_has_a_panel() {
    let (families, names) = exported();
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/segstream-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(dash["uid"], "segstream");
    let mut used = BTreeSet::new();
    let panels = dash["panels"].as_array().unwrap();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"]
            .as_array()
            .expect("every panel has queries");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            let found = metric_names(expr);
            assert!(!found.is_empty(), "{}: {expr}", panel["title"]);
            for name in found {
                assert!(
                    names.contains(&name),
                    "{}: `{name}` is not exported",
                    panel["title"]
                );
                used.insert(name.trim_end_matches("_bucket").to_owned());
            }
        }
    }
    let missing: Vec<_> = families.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "metric families without a panel: {missing:?}"
    );
}

#[test]
fn alerts_use_exported_metrics() {
    let (_, names) = exported();
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut count = 0;
    for name in metric_names(&text) {
        count += 1;
        assert!(
            names.contains(&name),
            "alerts.yml uses `{name}`, which is not exported"
        );
    }
    assert!(count >= 8);
}

/// The command line the image runs (Dockerfile `CMD`, after `ENTRYPOINT` = the binary) and the one
/// the Kubernetes Deployment passes, each started with this build's binary against the test
/// broker: the flags parse, the process serves `/healthz`, logs JSON, waits not ready (naming
/// the missing input topic) and exits 0 on SIGTERM.
#[test]
fn the_container_command_lines_start_the_service() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let cmd = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("the Dockerfile has a CMD");
    let k8s = std::fs::read_to_string(root().join("deploy/kubernetes/segstream.yaml")).unwrap();
    let args = k8s
        .lines()
        .find_map(|l| l.trim().strip_prefix("args: [\"run\""))
        .map(|rest| format!("[\"run\"{rest}"))
        .expect("the Deployment passes args");
    // The image copies config/segstream.toml to /etc/segstream/segstream.toml; the Deployment
    // mounts its ConfigMap's segstream.toml there.
    let dir = tempfile::tempdir().unwrap();
    let config_map = dir.path().join("segstream.toml");
    let toml: String = k8s
        .lines()
        .skip_while(|l| !l.trim().starts_with("segstream.toml: |"))
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    assert!(
        toml.contains("[kafka]"),
        "the ConfigMap carries segstream.toml"
    );
    std::fs::write(&config_map, toml).unwrap();
    for (origin, line, config) in [
        (
            "Dockerfile CMD",
            cmd.to_owned(),
            root().join("config/segstream.toml"),
        ),
        ("Deployment args", args, config_map),
    ] {
        let argv: Vec<String> = serde_json::from_str(&line).unwrap();
        let argv: Vec<String> = argv
            .into_iter()
            .map(|a| {
                if a == "/etc/segstream/segstream.toml" {
                    config.display().to_string()
                } else {
                    a
                }
            })
            .collect();
        run_like_the_container(origin, &argv);
    }
}

fn run_like_the_container(origin: &str, argv: &[String]) {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let brokers = std::env::var("SEGSTREAM_TEST_BROKERS")
        .expect("SEGSTREAM_TEST_BROKERS is not set: run the tests with `bash .ci/run`");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prefix = format!("image-{}-{}", std::process::id(), port);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_segstream"));
    cmd.args(argv)
        .env("SEGSTREAM__HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("SEGSTREAM__KAFKA__BROKERS", &brokers)
        .env("SEGSTREAM__KAFKA__GROUP_ID", format!("{prefix}-group"));
    for topic in [
        "CLICKSTREAM",
        "PURCHASES",
        "SOCIAL",
        "SEGMENT_CHANGES",
        "DEAD_LETTER",
        "CHANGELOG",
        "MODEL",
        "ERASURE",
    ] {
        cmd.env(
            format!("SEGSTREAM__KAFKA__TOPICS__{topic}"),
            format!("{prefix}-{}", topic.to_ascii_lowercase()),
        );
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = |path: &str| -> Option<u16> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        r.split(' ').nth(1)?.parse().ok()
    };
    let missing = format!("{prefix}-clickstream");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut waited = false;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("does not exist") && text.contains(&missing) {
            waited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (healthz, readyz) = (status("/healthz"), status("/readyz"));
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let exit = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        waited,
        "{origin}: the log names the missing input topic:\n{text}"
    );
    assert!(
        text.lines().all(|l| l.starts_with('{')),
        "{origin}: --log-format json logs JSON lines:\n{text}"
    );
    assert_eq!(healthz, Some(200), "{origin}: alive");
    assert_eq!(readyz, Some(503), "{origin}: not ready without its inputs");
    assert!(exit.success(), "{origin}: SIGTERM exits 0: {exit:?}");
}
