//! A complete subscriber of segment changes, as a marketing system would write one: it reads the
//! output topic from the beginning, decodes the Confluent-framed Avro records with the bundled
//! schema, applies the version rule (drop a record whose `version` is not greater than the last one
//! applied for that user), and keeps each user's current segment, action and value. It uses only
//! rdkafka, apache-avro and serde_json — not segstream's library.
//!
//! ```sh
//! cargo run --example subscriber -- --brokers 127.0.0.1:9092 --topic segment-changes \
//!   [--group my-crm] [-X security.protocol=SASL_SSL -X ...] [--idle-exit-ms 10000]
//! ```
//! With `--idle-exit-ms` it stops after that long without a record (once one came) and prints its
//! view, one JSON object per user; without it, it runs until killed and prints each applied change.

use apache_avro::types::Value;
use apache_avro::Schema;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SCHEMA: &str = include_str!("../schemas/segment_change.avsc");

/// What the subscriber knows of one user.
#[derive(serde::Serialize)]
struct Current {
    segment: i32,
    version: i64,
    action: Option<String>,
    predicted_value: f64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = ClientConfig::new();
    cfg.set("group.id", format!("subscriber-{}", std::process::id()))
        .set("auto.offset.reset", "earliest")
        // Find the topic soon if it is created after we start (librdkafka's default: 5 min).
        .set("topic.metadata.refresh.interval.ms", "10000");
    let (mut topic, mut idle_exit) = (String::from("segment-changes"), None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--brokers" => drop(cfg.set("bootstrap.servers", value()?)),
            "--topic" => topic = value()?,
            "--group" => drop(cfg.set("group.id", value()?)),
            "--idle-exit-ms" => idle_exit = Some(Duration::from_millis(value()?.parse()?)),
            "-X" => {
                let kv = value()?;
                let (k, v) = kv.split_once('=').ok_or("-X takes key=value")?;
                cfg.set(k, v);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let schema = Schema::parse_str(SCHEMA)?;
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema).build()?;
    let consumer: BaseConsumer = cfg.create()?;
    consumer.subscribe(&[&topic])?;
    let mut view: BTreeMap<String, Current> = BTreeMap::new();
    let mut last_version: BTreeMap<String, i64> = BTreeMap::new();
    // Idle is counted from the last record, once one came (joining the group takes a while).
    let mut last_record: Option<Instant> = None;
    loop {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            if let (Some(d), Some(last)) = (idle_exit, last_record) {
                if last.elapsed() >= d {
                    break;
                }
            }
            continue;
        };
        let msg = msg?;
        last_record = Some(Instant::now());
        let Some(payload) = msg.payload() else {
            continue;
        };
        // Confluent framing: magic byte 0, then the 4-byte big-endian schema id, then Avro.
        if payload.len() < 5 || payload[0] != 0 {
            eprintln!("skipping a record without the Confluent header");
            continue;
        }
        let record = reader.read_value(&mut &payload[5..])?;
        let Value::Record(fields) = record else {
            continue;
        };
        let field = |name: &str| fields.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let (Some(Value::String(user)), Some(Value::Long(version))) =
            (field("user_id"), field("version"))
        else {
            continue;
        };
        // The version rule: repeats after a crash or a hand-over carry a version already seen.
        if last_version.get(user).is_some_and(|v| *version <= *v) {
            continue;
        }
        last_version.insert(user.clone(), *version);
        let reason = match field("reason") {
            Some(Value::Enum(_, symbol)) => symbol.as_str(),
            _ => "",
        };
        if reason == "erased" || reason == "evicted" {
            // The service no longer holds the user (erasure: forget everything you hold too).
            view.remove(user);
            continue;
        }
        let current = Current {
            segment: match field("new_segment") {
                Some(Value::Int(s)) => *s,
                _ => continue,
            },
            version: *version,
            action: match field("action") {
                Some(Value::Union(_, v)) => match v.as_ref() {
                    Value::String(a) => Some(a.clone()),
                    _ => None,
                },
                _ => None,
            },
            predicted_value: match field("predicted_value") {
                Some(Value::Double(v)) => *v,
                _ => 0.0,
            },
        };
        if idle_exit.is_none() {
            println!("{user} {reason} -> {}", serde_json::to_string(&current)?);
        }
        view.insert(user.clone(), current);
    }
    for (user, current) in &view {
        let mut line = serde_json::to_value(current)?;
        line["user_id"] = user.clone().into();
        println!("{line}");
    }
    Ok(())
}
