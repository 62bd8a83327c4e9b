use super::*;
use crate::event::Source;
use std::time::Duration;

#[test]
fn defaults_validate() {
    let s = RawConfig::default().validate().unwrap();
    assert_eq!(
        s.kafka.topics.source_of("purchases"),
        Some(Source::Purchases)
    );
    assert_eq!(s.kafka.topics.source_of("segment-changes"), None);
}

#[test]
fn shipped_default_file_matches_builtin_defaults() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/segstream.toml");
    let raw = RawConfig::load(Some(&file)).unwrap();
    let builtin = RawConfig::default();
    assert_eq!(
        serde_json::to_value(&raw).unwrap(),
        serde_json::to_value(&builtin).unwrap()
    );
}

#[test]
fn the_shipped_production_example_is_a_valid_sasl_ssl_configuration() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.example.toml");
    let raw = RawConfig::load(Some(&file)).unwrap();
    assert!(raw.problems().is_empty(), "{:?}", raw.problems());
    let s = raw.validate().unwrap();
    assert_eq!(s.security.describe(), "SASL_SSL/SCRAM-SHA-512");
    // No CA set: the system bundle is looked up (the vendored OpenSSL has none of its own).
    assert_eq!(s.kafka.properties["ssl.ca.location"], "probe");
}

#[test]
fn each_rule_names_its_key() {
    let mut raw = RawConfig::default();
    raw.model.k = 1;
    assert!(raw
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("model.k"));

    let mut raw = RawConfig::default();
    raw.kafka.topics.dead_letter = "clickstream".into();
    assert!(matches!(
        raw.validate(),
        Err(ConfigError::DuplicateTopic(t)) if t == "clickstream"
    ));

    let mut raw = RawConfig::default();
    raw.http.bind = "nowhere".into();
    assert!(raw
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("http.bind"));
}

#[test]
fn an_empty_token_or_broker_entry_is_refused_not_taken_as_none() {
    let mut raw = RawConfig::default();
    raw.http.token = Some(" ".into());
    assert!(matches!(raw.validate(), Err(ConfigError::EmptyToken)));
    let mut raw = RawConfig::default();
    raw.kafka.brokers = " , ,".into();
    assert!(matches!(raw.validate(), Err(ConfigError::NoBrokers)));
    let mut raw = RawConfig::default();
    raw.kafka.brokers = "a:9092, b:9092".into();
    assert!(raw.validate().is_ok());
}

#[test]
fn durations_are_printed_as_exactly_as_they_were_written() {
    use super::sections::exact_duration::format;
    assert_eq!(format(Duration::from_secs(365 * 86_400)), "365days");
    assert_eq!(format(Duration::from_secs(90)), "90s");
    assert_eq!(format(Duration::from_secs(300)), "5m");
    assert_eq!(format(Duration::from_millis(300)), "300ms");
    assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    for written in ["365days", "7days", "1h", "90s", "300ms", "1500ms"] {
        let d = humantime::parse_duration(written).unwrap();
        assert_eq!(
            humantime::parse_duration(&format(d)).unwrap(),
            d,
            "{written}"
        );
    }
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let mut raw = RawConfig::default();
    raw.model.k = 1;
    raw.model.hysteresis = 3.0;
    raw.http.bind = "nowhere".into();
    let problems: Vec<String> = raw.problems().iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems[0].starts_with("model.k") && problems[2].starts_with("http.bind"));
    assert!(RawConfig::default().problems().is_empty());
}

#[test]
fn secrets_are_redacted_in_the_printed_configuration() {
    let mut raw = RawConfig::default();
    raw.http.token = Some("t0ken".into());
    raw.kafka
        .properties
        .insert("sasl.password".into(), "pa55".into());
    raw.kafka
        .properties
        .insert("sasl.username".into(), "alice".into());
    let printed = raw.redacted_json().to_string();
    let toml = raw.redacted_toml();
    assert!(
        !toml.contains("t0ken") && toml.contains("<redacted>"),
        "{toml}"
    );
    let reread: RawConfig = toml::from_str(&toml).unwrap();
    assert_eq!(reread.kafka.properties["sasl.username"], "alice");
    assert!(
        !printed.contains("t0ken") && !printed.contains("pa55"),
        "{printed}"
    );
    assert!(printed.contains("alice") && printed.contains("<redacted>"));
}

#[test]
fn unknown_keys_are_refused_and_overrides_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[kafka]\nbrokerz = \"x\"\n").unwrap();
    let err = RawConfig::load(Some(&path)).unwrap_err().to_string();
    assert!(err.contains("brokerz"), "{err}");

    std::fs::write(&path, "[kafka]\nbrokers = \"file:1\"\ngroup_id = \"g\"\n").unwrap();
    let raw = RawConfig::load_with(
        Some(&path),
        Figment::new().merge(("kafka.brokers", "cli:2")),
    )
    .unwrap();
    assert_eq!(raw.kafka.brokers, "cli:2");
    assert_eq!(raw.kafka.group_id, "g");
}
