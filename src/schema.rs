//! The bundled Avro schemas (`schemas/*.avsc`), parsed once.
//!
//! These are the only schemas segstream reads or writes; the Confluent schema ids that name them
//! on the wire come from configuration (`decode.schema_ids`, `output.schema_id`).

use crate::event::Source;
use apache_avro::Schema;
use std::sync::LazyLock;

pub const CLICK_EVENT_AVSC: &str = include_str!("../schemas/click_event.avsc");
pub const PURCHASE_EVENT_AVSC: &str = include_str!("../schemas/purchase_event.avsc");
pub const SOCIAL_EVENT_AVSC: &str = include_str!("../schemas/social_event.avsc");
pub const SEGMENT_CHANGE_AVSC: &str = include_str!("../schemas/segment_change.avsc");
pub const SEGMENT_CATALOGUE_AVSC: &str = include_str!("../schemas/segment_catalogue.avsc");

fn parse(text: &str) -> Schema {
    // The schemas are compiled in and covered by tests: failing here is a build defect.
    Schema::parse_str(text).expect("bundled schema is valid Avro")
}

pub static CLICK_EVENT: LazyLock<Schema> = LazyLock::new(|| parse(CLICK_EVENT_AVSC));
pub static PURCHASE_EVENT: LazyLock<Schema> = LazyLock::new(|| parse(PURCHASE_EVENT_AVSC));
pub static SOCIAL_EVENT: LazyLock<Schema> = LazyLock::new(|| parse(SOCIAL_EVENT_AVSC));
pub static SEGMENT_CHANGE: LazyLock<Schema> = LazyLock::new(|| parse(SEGMENT_CHANGE_AVSC));
pub static SEGMENT_CATALOGUE: LazyLock<Schema> = LazyLock::new(|| parse(SEGMENT_CATALOGUE_AVSC));

/// The writer schema of an input source.
pub fn input(source: Source) -> &'static Schema {
    match source {
        Source::Clickstream => &CLICK_EVENT,
        Source::Purchases => &PURCHASE_EVENT,
        Source::Social => &SOCIAL_EVENT,
    }
}

/// Length of the Confluent wire-format header: magic byte 0 and a big-endian u32 schema id.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// The Confluent header for `schema_id`.
pub(crate) fn confluent_header(schema_id: u32) -> [u8; CONFLUENT_HEADER_LEN] {
    let [a, b, c, d] = schema_id.to_be_bytes();
    [0, a, b, c, d]
}

/// Prefixes `body` with the Confluent header for `schema_id`.
pub(crate) fn confluent_frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + body.len());
    out.extend_from_slice(&confluent_header(schema_id));
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_schemas_parse() {
        for s in [
            &*CLICK_EVENT,
            &*PURCHASE_EVENT,
            &*SOCIAL_EVENT,
            &*SEGMENT_CHANGE,
            &*SEGMENT_CATALOGUE,
        ] {
            assert!(matches!(s, Schema::Record(_)));
        }
    }
}
