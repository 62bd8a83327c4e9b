//! The recommended deployment path (docs/operations.md, "Bootstrap a model from history"): turn
//! history into events, `replay --save-model`, then `run --model`. The service starts with those
//! segments and that value model: before its first event it already serves the bootstrapped
//! catalogue, and a new user's value comes from the model, not from the cold-start rule.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(120);

fn segstream(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "segstream {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The committed Online Retail data as purchase events (NDJSON), written into `dir`.
fn retail_events(dir: &std::path::Path) -> String {
    let out = dir.join("retail.ndjson").display().to_string();
    let data = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/online_retail.csv.gz"
    );
    segstream(&["retail", "--input", data, "--output", &out]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_bootstrapped_from_history_serves_from_the_first_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    // Seeding after 1,000 events, so that three months of history train a model.
    let model_config = "[model]\ninit_users = 200\ninit_events = 1000\n";
    std::fs::write(path("replay.toml"), model_config).unwrap();
    let events = retail_events(dir.path());
    segstream(&[
        "replay",
        "--config",
        &path("replay.toml"),
        "--purchases",
        &events,
        "--until",
        "2011-02-20T00:00:00Z",
        "--save-model",
        &path("model.json"),
    ]);
    let listed = segstream(&["segments", "--model", &path("model.json"), "--json"]);
    let saved: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let saved_labels: Vec<&str> = saved
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert!(saved_labels.iter().all(|l| !l.is_empty()), "{saved}");

    let settings = fresh_settings("boot", 2).await;
    // Its own [model] seeding settings do not matter: the saved model is seeded.
    let config = write_config(&settings, dir.path());
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["run", "--config"])
        .arg(&config)
        .args(["--model", &path("model.json")])
        .args(["--http-bind", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(path("run.log")).unwrap())
        .spawn()
        .unwrap();
    let ready = wait_until(PATIENCE, || http_status(port, "/readyz") == Some(200)).await;
    let log = || std::fs::read_to_string(path("run.log")).unwrap_or_default();
    let catalogue: serde_json::Value =
        serde_json::from_str(&http_get(port, "/segments").unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: ready {ready}\n{}", log()));
    let first_user = produce_generated(&settings, 4, 20, 200).await[0]
        .record
        .key
        .clone();
    let seen = wait_until(PATIENCE, || {
        http_get(port, &format!("/users/{first_user}")).is_some()
    })
    .await;
    let profile: serde_json::Value =
        serde_json::from_str(&http_get(port, &format!("/users/{first_user}")).unwrap_or_default())
            .unwrap_or_default();
    let status = terminate(&mut child);
    assert!(ready && seen, "ready {ready}, user seen {seen}");
    assert!(status.success());

    // Before any event: the bootstrapped segments and a trained value model.
    assert!(
        catalogue["model_version"].as_u64().unwrap() > 0,
        "{catalogue}"
    );
    assert_eq!(catalogue["value_source"], "model", "{catalogue}");
    let served: Vec<&str> = catalogue["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(served, saved_labels, "the saved segments, as saved");
    // A brand-new user is valued by the model from their first events.
    assert_eq!(profile["value_source"], "model", "{profile}");
    assert!(
        profile["predicted_value"].as_f64().unwrap() > 0.0,
        "{profile}"
    );
}

#[test]
fn too_little_history_for_segments_is_said_not_saved_silently() {
    let dir = tempfile::tempdir().unwrap();
    let path = |f: &str| dir.path().join(f).display().to_string();
    let events = retail_events(dir.path());
    // Two days of history: far fewer than model.init_events (4,000) events.
    let replay = segstream(&[
        "replay",
        "--purchases",
        &events,
        "--until",
        "2010-12-03T00:00:00Z",
        "--save-model",
        &path("model.json"),
    ]);
    let log = String::from_utf8_lossy(&replay.stderr);
    assert!(log.contains("No segments yet"), "{log}");
    let listed = Command::new(env!("CARGO_BIN_EXE_segstream"))
        .args(["segments", "--model", &path("model.json")])
        .output()
        .unwrap();
    assert!(!listed.status.success());
    assert!(
        String::from_utf8_lossy(&listed.stderr).contains("no segments yet"),
        "{listed:?}"
    );
}
