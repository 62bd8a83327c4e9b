//! Encoding of events to their wire formats: segment changes for the output topic, and input
//! events for the generator, tests and benchmarks. Pure; the inverse of `decode`.

use crate::config::WireFormat;
use crate::event::{Event, SegmentChange};
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
pub fn encode_change(change: &SegmentChange, format: WireFormat, schema_id: u32) -> Vec<u8> {
    encode(&CHANGE, change, format, schema_id)
}

/// Decodes a segment change as a subscriber would (Avro with Confluent header, or JSON).
pub fn decode_change(bytes: &[u8], format: WireFormat) -> Result<SegmentChange, String> {
    match format {
        WireFormat::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        WireFormat::Avro => {
            if bytes.len() < schema::CONFLUENT_HEADER_LEN || bytes[0] != 0 {
                return Err("missing confluent header".into());
            }
            let reader =
                apache_avro::reader::datum::GenericDatumReader::builder(&schema::SEGMENT_CHANGE)
                    .build()
                    .map_err(|e| e.to_string())?;
            let mut body = &bytes[schema::CONFLUENT_HEADER_LEN..];
            let change = reader.read_deser(&mut body).map_err(|e| e.to_string())?;
            if !body.is_empty() {
                return Err("trailing bytes".into());
            }
            Ok(change)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ChangeReason;

    #[test]
    fn segment_change_round_trips_through_the_schema() {
        let c = SegmentChange {
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
        };
        for f in [WireFormat::Avro, WireFormat::Json] {
            assert_eq!(decode_change(&encode_change(&c, f, 4), f).unwrap(), c);
        }
    }
}
