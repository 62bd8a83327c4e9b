//! Encoding of events to their wire formats: segment changes for the output topic, and input
//! events for the generator, tests and benchmarks. Pure; the inverse of `decode`.

use crate::config::WireFormat;
use crate::event::{CatalogueRecord, ChangeReason, Event, SegmentChange};
use crate::schema;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::Serialize;
use std::sync::LazyLock;

fn writer(schema: &'static Schema) -> GenericDatumWriter<'static> {
    GenericDatumWriter::builder(schema)
        .build()
        .expect("bundled schema resolves")
}

static CLICK: LazyLock<GenericDatumWriter<'static>> =
    LazyLock::new(|| writer(&schema::CLICK_EVENT));
static PURCHASE: LazyLock<GenericDatumWriter<'static>> =
    LazyLock::new(|| writer(&schema::PURCHASE_EVENT));
static SOCIAL: LazyLock<GenericDatumWriter<'static>> =
    LazyLock::new(|| writer(&schema::SOCIAL_EVENT));
static CHANGE: LazyLock<GenericDatumWriter<'static>> =
    LazyLock::new(|| writer(&schema::SEGMENT_CHANGE));
static CATALOGUE: LazyLock<GenericDatumWriter<'static>> =
    LazyLock::new(|| writer(&schema::SEGMENT_CATALOGUE));

fn encode<T: Serialize>(
    w: &GenericDatumWriter<'static>,
    value: &T,
    format: WireFormat,
    schema_id: u32,
) -> Vec<u8> {
    match format {
        WireFormat::Avro => {
            // Our own types always match the bundled schemas (tested); a failure is a defect.
            let body = w.write_ser_to_vec(value).expect("value matches its schema");
            schema::confluent_frame(schema_id, &body)
        }
        WireFormat::Json => serde_json::to_vec(value).expect("event serialises to json"),
    }
}

/// Encodes an input event; `schema_id` is written in the Confluent header (Avro only).
pub fn encode_event(event: &Event, format: WireFormat, schema_id: u32) -> Vec<u8> {
    match event {
        Event::Click(e) => encode(&CLICK, e, format, schema_id),
        Event::Purchase(e) => encode(&PURCHASE, e, format, schema_id),
        Event::Social(e) => encode(&SOCIAL, e, format, schema_id),
    }
}

/// Encodes a segment change for the output topic.
///
/// Avro is written field by field for `schemas/segment_change.avsc`, straight into the framed
/// buffer: apache-avro's serde writer looked each field up by name in the schema and took about
/// half a microsecond per change, and every published change goes through here. apache-avro
/// stays the reference: tests check that both write the same bytes, and pin the schema by its
/// fingerprint.
pub fn encode_change(change: &SegmentChange, format: WireFormat, schema_id: u32) -> Vec<u8> {
    match format {
        WireFormat::Avro => {
            let mut out = Vec::with_capacity(change_capacity(change));
            out.extend_from_slice(&schema::confluent_header(schema_id));
            write_change(&mut out, change);
            out
        }
        WireFormat::Json => encode(&CHANGE, change, format, schema_id),
    }
}

/// Encodes a segment catalogue record for the catalogue topic (a few per sweep: apache-avro's
/// serde writer is fast enough).
pub(crate) fn encode_catalogue(r: &CatalogueRecord, format: WireFormat, schema_id: u32) -> Vec<u8> {
    encode(&CATALOGUE, r, format, schema_id)
}

/// Decodes a catalogue record as a subscriber would (Avro with Confluent header, or JSON).
pub fn decode_catalogue(bytes: &[u8], format: WireFormat) -> Result<CatalogueRecord, String> {
    decode_framed(bytes, format, &schema::SEGMENT_CATALOGUE)
}

/// An upper bound of a change's framed Avro size: the header, the three strings with their
/// lengths, and ten bytes (the longest varint) or eight (a double) for every other field and
/// union index.
fn change_capacity(c: &SegmentChange) -> usize {
    let strings =
        c.user_id.len() + c.segment_label.len() + c.action.as_ref().map_or(0, String::len);
    schema::CONFLUENT_HEADER_LEN + strings + 16 * 10
}

/// The Avro binary encoding (spec 1.11) of `c`, in the schema's field order.
fn write_change(out: &mut Vec<u8>, c: &SegmentChange) {
    write_str(out, &c.user_id);
    match c.previous_segment {
        None => write_long(out, 0),
        Some(s) => {
            write_long(out, 1);
            write_long(out, s.into());
        }
    }
    write_long(out, c.new_segment.into());
    write_str(out, &c.segment_label);
    for x in [c.distance, c.confidence, c.predicted_value] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    write_long(out, c.version);
    write_long(out, reason_index(c.reason));
    write_long(out, c.event_time);
    write_long(out, c.emit_time);
    write_long(out, c.model_version);
    match &c.action {
        None => write_long(out, 0),
        Some(a) => {
            write_long(out, 1);
            write_str(out, a);
        }
    }
    match c.purchase_probability {
        None => write_long(out, 0),
        Some(p) => {
            write_long(out, 1);
            out.extend_from_slice(&p.to_le_bytes());
        }
    }
    write_long(out, c.catalogue_version);
}

/// The symbol's position in the schema's `ChangeReason` enum.
fn reason_index(r: ChangeReason) -> i64 {
    match r {
        ChangeReason::FirstAssignment => 0,
        ChangeReason::Moved => 1,
        ChangeReason::Evicted => 2,
        ChangeReason::Erased => 3,
        ChangeReason::Updated => 4,
    }
}

/// A zigzag varint (Avro's `int` and `long` alike).
fn write_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    write_long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

/// Decodes a segment change as a subscriber would (Avro with Confluent header, or JSON).
pub fn decode_change(bytes: &[u8], format: WireFormat) -> Result<SegmentChange, String> {
    decode_framed(bytes, format, &schema::SEGMENT_CHANGE)
}

/// One output record as a subscriber reads it: JSON, or Avro of `schema` after the Confluent
/// header, with nothing left over.
fn decode_framed<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    format: WireFormat,
    schema: &Schema,
) -> Result<T, String> {
    match format {
        WireFormat::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        WireFormat::Avro => {
            if bytes.len() < schema::CONFLUENT_HEADER_LEN || bytes[0] != 0 {
                return Err("missing confluent header".into());
            }
            let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
                .build()
                .map_err(|e| e.to_string())?;
            let mut body = &bytes[schema::CONFLUENT_HEADER_LEN..];
            let record = reader.read_deser(&mut body).map_err(|e| e.to_string())?;
            if !body.is_empty() {
                return Err("trailing bytes".into());
            }
            Ok(record)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn example() -> SegmentChange {
        SegmentChange {
            user_id: "u".into(),
            previous_segment: None,
            new_segment: 3,
            segment_label: "high spend".into(),
            distance: 1.5,
            confidence: 0.25,
            predicted_value: 10.0,
            version: 1,
            reason: ChangeReason::FirstAssignment,
            event_time: 1,
            emit_time: 2,
            model_version: 7,
            action: Some("vip".into()),
            purchase_probability: Some(0.4),
            catalogue_version: 12,
        }
    }

    #[test]
    fn segment_change_round_trips_through_the_schema() {
        let c = example();
        for f in [WireFormat::Avro, WireFormat::Json] {
            assert_eq!(decode_change(&encode_change(&c, f, 4), f).unwrap(), c);
        }
    }

    /// apache-avro's encoding of `c`, with the same framing.
    fn reference(c: &SegmentChange, schema_id: u32) -> Vec<u8> {
        let body = CHANGE.write_ser_to_vec(c).unwrap();
        schema::confluent_frame(schema_id, &body)
    }

    #[test]
    fn written_for_this_schema() {
        // If the schema changes, `write_change` must change with it: update both, then this.
        let fp = format!(
            "{}",
            schema::SEGMENT_CHANGE.fingerprint::<apache_avro::rabin::Rabin>()
        );
        assert_eq!(fp, "d795734ad1df5481");
    }

    /// The output schemas published before (kept in `schemas/history`): subscribers built on
    /// them must keep reading what this build writes (`updated` records aside: see the schema).
    static V1: LazyLock<Schema> = LazyLock::new(|| {
        Schema::parse_str(include_str!("../schemas/history/segment_change.v1.avsc")).unwrap()
    });
    static V2: LazyLock<Schema> = LazyLock::new(|| {
        Schema::parse_str(include_str!("../schemas/history/segment_change.v2.avsc")).unwrap()
    });

    fn read_as(writer: &Schema, reader: &Schema, body: &[u8]) -> apache_avro::types::Value {
        let r = apache_avro::reader::datum::GenericDatumReader::builder(writer)
            .reader_schema(reader)
            .build()
            .unwrap();
        let mut body = body;
        let v = r.read_value(&mut body).unwrap();
        assert!(body.is_empty(), "the whole record is read");
        v
    }

    fn field<'v>(v: &'v apache_avro::types::Value, name: &str) -> &'v apache_avro::types::Value {
        let apache_avro::types::Value::Record(fields) = v else {
            panic!("a record: {v:?}")
        };
        &fields.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn readers_of_earlier_schemas_read_todays_records() {
        use apache_avro::types::Value;
        let mut c = example();
        for reason in [ChangeReason::FirstAssignment, ChangeReason::Moved] {
            c.reason = reason;
            let framed = encode_change(&c, WireFormat::Avro, 1);
            let v2 = read_as(&schema::SEGMENT_CHANGE, &V2, &framed[5..]);
            let p = Value::Union(1, Box::new(Value::Double(0.4)));
            assert_eq!(field(&v2, "purchase_probability"), &p);
            let r = field(&v2, "reason");
            assert_eq!(
                r,
                &Value::Enum(reason_index(reason) as u32, reason.as_str().into())
            );
        }
        let framed = encode_change(&c, WireFormat::Avro, 1);
        let old = read_as(&schema::SEGMENT_CHANGE, &V1, &framed[5..]);
        assert_eq!(field(&old, "user_id"), &Value::String("u".into()));
        assert_eq!(field(&old, "predicted_value"), &Value::Double(10.0));
        let action = field(&old, "action");
        assert_eq!(
            action,
            &Value::Union(1, Box::new(Value::String("vip".into())))
        );
        let Value::Record(fields) = &old else {
            unreachable!()
        };
        assert!(fields.iter().all(|(n, _)| n != "purchase_probability"));
    }

    #[test]
    fn records_of_the_first_schema_read_with_no_propensity() {
        use apache_avro::types::Value;
        let mut c = example();
        c.purchase_probability = None;
        c.catalogue_version = 0;
        // The first schema's encoding is today's without the last two fields (a null and a
        // zero: one byte each).
        let framed = encode_change(&c, WireFormat::Avro, 1);
        let v1 = &framed[5..framed.len() - 2];
        assert_eq!(
            read_as(&V1, &V1, v1),
            read_as(&schema::SEGMENT_CHANGE, &V1, &framed[5..])
        );
        let new = read_as(&V1, &schema::SEGMENT_CHANGE, v1);
        let absent = Value::Union(0, Box::new(Value::Null));
        assert_eq!(field(&new, "purchase_probability"), &absent);
        assert_eq!(field(&new, "new_segment"), &Value::Int(3));
        assert_eq!(field(&new, "catalogue_version"), &Value::Long(0));
    }

    #[test]
    fn catalogue_records_round_trip_through_their_schema() {
        let r = CatalogueRecord {
            segment_id: 2,
            catalogue_version: 1 << 40,
            reason: crate::catalogue::CatalogueReason::Split,
            split_from: Some(0),
            label: "frequent buyer".into(),
            action: None,
            share: 0.25,
            mean_predicted_value: 120.5,
            mean_purchase_probability: 0.4,
            centroid: [
                ("frequency".to_owned(), 1.5),
                ("recency_days".to_owned(), -0.5),
            ]
            .into(),
            model_version: 9,
            emit_time: 1_700_000_000_000,
        };
        for f in [WireFormat::Avro, WireFormat::Json] {
            assert_eq!(decode_catalogue(&encode_catalogue(&r, f, 5), f).unwrap(), r);
        }
        assert_eq!(
            &encode_catalogue(&r, WireFormat::Avro, 5)[..5],
            &[0, 0, 0, 0, 5]
        );
    }

    fn reason() -> impl Strategy<Value = ChangeReason> {
        prop_oneof![
            Just(ChangeReason::FirstAssignment),
            Just(ChangeReason::Moved),
            Just(ChangeReason::Evicted),
            Just(ChangeReason::Erased),
            Just(ChangeReason::Updated),
        ]
    }

    fn change() -> impl Strategy<Value = SegmentChange> {
        let strings = (".{0,40}", ".{0,200}", proptest::option::of(".{0,30}"));
        let numbers = (
            proptest::option::of(any::<i32>()),
            any::<i32>(),
            (any::<f64>(), any::<f64>(), any::<f64>()),
            (any::<i64>(), any::<i64>(), any::<i64>(), any::<i64>()),
        );
        let propensity = proptest::option::of(any::<f64>());
        (strings, numbers, reason(), propensity).prop_map(
            |((user_id, segment_label, action), (prev, new, floats, longs), reason, p)| {
                SegmentChange {
                    user_id,
                    previous_segment: prev,
                    new_segment: new,
                    segment_label,
                    distance: floats.0,
                    confidence: floats.1,
                    predicted_value: floats.2,
                    version: longs.0,
                    reason,
                    event_time: longs.1,
                    emit_time: longs.2,
                    model_version: longs.3,
                    action,
                    purchase_probability: p,
                    catalogue_version: longs.0 ^ longs.3,
                }
            },
        )
    }

    proptest! {
        /// Byte for byte what apache-avro writes, for any field values (extreme integers,
        /// NaN and infinite doubles, empty and multi-byte strings, either union branch), and
        /// within the capacity reserved for it.
        #[test]
        fn avro_encoding_is_apache_avros(c in change(), schema_id in any::<u32>()) {
            let fast = encode_change(&c, WireFormat::Avro, schema_id);
            prop_assert_eq!(&fast, &reference(&c, schema_id));
            prop_assert!(fast.len() <= change_capacity(&c));
        }
    }

    #[test]
    fn varints_at_their_boundaries_are_apache_avros() {
        let mut c = SegmentChange {
            user_id: "ü".repeat(70),
            previous_segment: Some(-1),
            new_segment: i32::MIN,
            segment_label: String::new(),
            distance: f64::NAN,
            confidence: f64::NEG_INFINITY,
            predicted_value: -0.0,
            version: i64::MAX,
            reason: ChangeReason::Erased,
            event_time: i64::MIN,
            emit_time: 63,
            model_version: -64,
            action: Some(String::new()),
            purchase_probability: Some(f64::MIN_POSITIVE),
            catalogue_version: i64::MIN,
        };
        for n in [
            0,
            1,
            -1,
            63,
            64,
            -64,
            -65,
            8191,
            8192,
            1 << 35,
            i64::MAX,
            i64::MIN,
        ] {
            (c.version, c.event_time, c.emit_time) = (n, n.wrapping_neg(), n / 3);
            c.new_segment = n as i32;
            assert_eq!(
                encode_change(&c, WireFormat::Avro, 7),
                reference(&c, 7),
                "{n}"
            );
        }
    }
}
