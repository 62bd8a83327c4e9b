//! The deployment artifacts stay true to the code: the Grafana dashboard is valid JSON whose every
//! query names metrics segstream exports (and every exported family has a panel), and the
//! Prometheus alerts only use exported metrics (`promtool test rules` runs them in .ci/run).

use segstream::metrics::Metrics;
use std::collections::BTreeSet;
use std::path::Path;

/// Exported metric names, with the series names a histogram adds.
fn exported() -> (BTreeSet<String>, BTreeSet<String>) {
    // Families with labels appear once they have a series: give each one, as traffic would.
    let m = Metrics::new();
    m.set_lag("clickstream", 0, 1);
    m.set_model_state(1, 1, 0.0, [(0, 1)].into_iter());
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
