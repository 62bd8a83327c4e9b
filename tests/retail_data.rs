//! The real UCI Online Retail data: converted by the documented rules (nothing dropped silently)
//! and replayed into segments.

use segstream::config::RawConfig;
use segstream::replay::{replay, ReplayInputs, ReplayOutputs};
use segstream::retail;
use std::path::Path;

#[test]
fn online_retail_converts_by_the_rules_and_replays_into_segments() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/online_retail.csv.gz");
    let dir = tempfile::tempdir().unwrap();
    let (events, rejects) = (
        dir.path().join("purchases.ndjson"),
        dir.path().join("rejects.ndjson"),
    );
    let report = retail::convert(&data, &events, Some(&rejects)).unwrap();

    assert_eq!(report.rows, 541_909);
    // Figures of the data set's README: ~135k rows lack a customer; cancellations exist.
    assert_eq!(report.rejected["missing_customer_id"], 135_080);
    assert!(report.cancellations > 3_000, "{report:?}");
    let rejected: u64 = report.rejected.values().sum();
    assert_eq!(
        std::fs::read_to_string(&rejects).unwrap().lines().count() as u64,
        rejected
    );
    let kept_lines: usize = retail::read_events(&events)
        .unwrap()
        .iter()
        .map(|e| e.items.len())
        .sum();
    assert_eq!(
        kept_lines as u64 + rejected,
        report.rows,
        "every row is kept or rejected with a reason"
    );

    let mut raw = RawConfig::default();
    // A year of history: daily sweeps keep this debug-build test fast (hourly is the default).
    raw.model.sweep_interval = std::time::Duration::from_secs(86_400);
    let settings = raw.validate().unwrap();
    let (engine, r) = replay(
        &settings,
        &ReplayInputs {
            purchases: Some(events),
            ..Default::default()
        },
        &ReplayOutputs::default(),
        &Default::default(),
    )
    .unwrap();
    assert_eq!(r.lines, report.events);
    assert!(
        r.invalid.is_empty(),
        "converted events all validate: {:?}",
        r.invalid
    );
    assert!(r.users > 4_000, "about 4,372 customers: {}", r.users);
    let segments = engine.segments();
    assert!(segments.iter().all(|s| s.size > 0), "{segments:?}");
    let assigned: i64 = segments.iter().map(|s| s.size).sum();
    assert!(
        assigned as f64 > 0.9 * r.users as f64,
        "{assigned} of {} users assigned",
        r.users
    );
}
