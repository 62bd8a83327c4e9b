//! The records the pipeline produces: segment changes, catalogue records and dead letters, each
//! returned with its delivery future and what it was (for the metric counted on delivery).
//! Adding an output topic is one method here.

use crate::catalogue::CatalogueReason;
use crate::config::{KafkaConfig, OutputConfig, TopicsConfig};
use crate::decode::DecodeError;
use crate::encode::{encode_catalogue, encode_change};
use crate::event::{CatalogueRecord, ChangeReason, SegmentChange, Source};
use crate::kafka::send;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

/// Dead-letter headers added to the original message's headers.
pub const DLQ_ERROR_CODE: &str = "segstream.error.code";
pub const DLQ_ERROR_MESSAGE: &str = "segstream.error.message";
pub const DLQ_SOURCE_TOPIC: &str = "segstream.source.topic";
pub const DLQ_SOURCE_PARTITION: &str = "segstream.source.partition";
pub const DLQ_SOURCE_OFFSET: &str = "segstream.source.offset";
/// Set to `true` when the dead letter's key or value was cut to fit the output limit.
pub const DLQ_TRUNCATED: &str = "segstream.truncated";
pub const DLQ_ORIGINAL_KEY_SIZE: &str = "segstream.original.key.size";
pub const DLQ_ORIGINAL_VALUE_SIZE: &str = "segstream.original.value.size";
/// How many original headers were left out because they did not fit the output limit.
pub const DLQ_HEADERS_DROPPED: &str = "segstream.headers.dropped";

/// What an output record was, for the metric counted when it is delivered.
#[derive(Clone, Copy)]
pub(super) enum Output {
    /// A segment change and the event time of the event that caused it.
    Change(ChangeReason, i64),
    /// A dead letter from an input topic (`None`: the erasure topic).
    DeadLetter(Option<Source>),
    /// A segment catalogue record.
    Catalogue(CatalogueReason),
}

impl Output {
    /// The output's name in logs and in the producer-error metric.
    pub(super) fn name(self) -> &'static str {
        match self {
            Output::Change(..) => "changes",
            Output::DeadLetter(_) => "dead_letter",
            Output::Catalogue(_) => "catalogue",
        }
    }
}

/// A record handed to the producer: its delivery and what it was.
pub(super) type Sent = (DeliveryFuture, Output);

/// The producer and the topics and formats it writes.
pub(super) struct Outputs<'s> {
    topics: &'s TopicsConfig,
    output: &'s OutputConfig,
    producer: FutureProducer,
    /// librdkafka's limit on one produced message (see [`output_limit`]).
    limit: usize,
}

impl<'s> Outputs<'s> {
    pub(super) fn new(
        kafka: &'s KafkaConfig,
        output: &'s OutputConfig,
        producer: FutureProducer,
    ) -> Self {
        Self {
            topics: &kafka.topics,
            output,
            limit: output_limit(kafka),
            producer,
        }
    }

    pub(super) fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Sends a segment change to the output topic, keyed by user id.
    pub(super) async fn change(&self, change: &SegmentChange) -> Result<Sent, KafkaError> {
        let o = self.output;
        let bytes = encode_change(change, o.format, o.schema_id);
        let record = FutureRecord::to(&self.topics.segment_changes)
            .key(change.user_id.as_bytes())
            .payload(&bytes[..]);
        let f = send(&self.producer, record).await?;
        Ok((f, Output::Change(change.reason, change.event_time)))
    }

    /// Sends a catalogue record to the catalogue topic, keyed by segment id.
    pub(super) async fn catalogue(&self, record: &CatalogueRecord) -> Result<Sent, KafkaError> {
        let o = self.output;
        let bytes = encode_catalogue(record, o.format, o.catalogue_schema_id);
        let key = record.segment_id.to_string();
        let topic = FutureRecord::to(&self.topics.segment_catalogue)
            .key(key.as_bytes())
            .payload(&bytes[..]);
        let f = send(&self.producer, topic).await?;
        Ok((f, Output::Catalogue(record.reason)))
    }

    /// Sends the message to the dead-letter topic with its original key and headers plus why;
    /// `source` is the input topic it came from (`None`: the erasure topic).
    ///
    /// A dead letter always fits the producer's limit (`message.max.bytes`: key, value and
    /// headers together), or an oversized input would stop the pipeline on every restart: the
    /// key is cut to a quarter of the limit and the value to what is left, with
    /// [`DLQ_TRUNCATED`] and the original sizes in headers. If the original headers still do
    /// not fit, the dead letter goes without them and [`DLQ_HEADERS_DROPPED`] says how many
    /// there were.
    pub(super) async fn dead_letter(
        &self,
        msg: &BorrowedMessage<'_>,
        error: &DecodeError,
        source: Option<Source>,
    ) -> Result<Sent, KafkaError> {
        let cut = DeadLetterCut::of(msg, self.limit);
        let record = |headers| {
            let mut record = FutureRecord::to(&self.topics.dead_letter)
                .payload(cut.value)
                .headers(headers);
            if let Some(key) = cut.key {
                record = record.key(key);
            }
            record
        };
        let with_originals = dead_letter_headers(msg, error, &cut, true);
        let f = match send(&self.producer, record(with_originals)).await {
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                let without = dead_letter_headers(msg, error, &cut, false);
                send(&self.producer, record(without)).await
            }
            sent => sent,
        }?;
        Ok((f, Output::DeadLetter(source)))
    }
}

/// librdkafka's limit on one produced message, key, value and headers together: the producer's
/// `message.max.bytes` as configured, else librdkafka's default (1,000,000 bytes).
fn output_limit(k: &KafkaConfig) -> usize {
    const LIBRDKAFKA_DEFAULT: usize = 1_000_000;
    k.producer_properties
        .get("message.max.bytes")
        .or_else(|| k.properties.get("message.max.bytes"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(LIBRDKAFKA_DEFAULT)
}

/// The parts of an unusable message that its dead letter carries, cut to fit the output limit.
struct DeadLetterCut<'m> {
    key: Option<&'m [u8]>,
    value: &'m [u8],
    /// (original key size, original value size), if either was cut.
    truncated: Option<(usize, usize)>,
}

impl<'m> DeadLetterCut<'m> {
    /// Room kept for segstream's own headers (the error message is short) and librdkafka's
    /// per-header overhead.
    const HEADROOM: usize = 8 * 1024;

    fn of(msg: &'m impl Message, limit: usize) -> Self {
        let (key, value) = (msg.key(), msg.payload().unwrap_or_default());
        let key_len = key.map_or(0, <[u8]>::len);
        let kept_key = key.map(|k| &k[..k.len().min(limit / 4)]);
        let room = limit.saturating_sub(kept_key.map_or(0, <[u8]>::len) + Self::HEADROOM);
        let kept_value = &value[..value.len().min(room)];
        let cut = kept_key.map_or(0, <[u8]>::len) < key_len || kept_value.len() < value.len();
        Self {
            key: kept_key,
            value: kept_value,
            truncated: cut.then_some((key_len, value.len())),
        }
    }
}

/// The original headers (copied as bytes: a key that is not UTF-8 is kept as it is) plus the
/// reason, the source coordinates and, for a cut message, what was cut.
fn dead_letter_headers(
    msg: &BorrowedMessage<'_>,
    error: &DecodeError,
    cut: &DeadLetterCut<'_>,
    originals: bool,
) -> OwnedHeaders {
    let original = msg.headers();
    let mut headers = match original {
        Some(h) if originals => h.detach(),
        _ => OwnedHeaders::new(),
    };
    let message = error.to_string();
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let mut ours = vec![
        (DLQ_ERROR_CODE, error.code().to_owned()),
        (DLQ_ERROR_MESSAGE, message),
        (DLQ_SOURCE_TOPIC, msg.topic().to_owned()),
        (DLQ_SOURCE_PARTITION, partition),
        (DLQ_SOURCE_OFFSET, offset),
    ];
    if let Some((key_size, value_size)) = cut.truncated {
        ours.push((DLQ_TRUNCATED, "true".to_owned()));
        ours.push((DLQ_ORIGINAL_KEY_SIZE, key_size.to_string()));
        ours.push((DLQ_ORIGINAL_VALUE_SIZE, value_size.to_string()));
    }
    if let (Some(h), false) = (original, originals) {
        ours.push((DLQ_HEADERS_DROPPED, h.count().to_string()));
    }
    for (key, value) in &ours {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}
