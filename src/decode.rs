//! Decoding and validation of input messages: bytes in, a valid [`Event`] or a [`DecodeError`] out.
//!
//! This is the only module that parses input bytes, so the decoding strategy can change in one
//! place. It is pure: no Kafka, no clock (the caller passes `now`), and it never panics on any
//! input (a property test feeds it arbitrary bytes).

use crate::avro_fast;
use crate::config::{DecodeConfig, WireFormat};
use crate::event::{ClickEvent, Event, OrderStatus, PurchaseEvent, SocialEvent, Source};
use crate::schema::CONFLUENT_HEADER_LEN;

/// Why a message could not be used. Each variant has a stable low-cardinality [`code`](Self::code)
/// used as the metric label and in the dead-letter headers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message has no payload")]
    Empty,
    #[error("not Confluent-framed Avro: expected magic byte 0 and a 4-byte schema id")]
    BadMagic,
    #[error("schema id {got} is not the configured id {expected} for this topic")]
    UnknownSchemaId { got: u32, expected: u32 },
    #[error("invalid avro: {0}")]
    InvalidAvro(String),
    #[error("invalid json: {0}")]
    InvalidJson(String),
    #[error("missing field: {0}")]
    MissingField(String),
    #[error("user_id is empty")]
    EmptyUserId,
    #[error("user_id is {len} bytes, over the limit of {MAX_USER_ID_BYTES}")]
    UserIdTooLong { len: usize },
    #[error("event_id is empty")]
    EmptyEventId,
    #[error("{0} is not a finite number")]
    NonFinite(&'static str),
    #[error("{0} is negative")]
    Negative(&'static str),
    #[error("quantity must be > 0 in a placed order")]
    BadQuantity,
    #[error("order has no line items")]
    NoItems,
    #[error("rating must be between 1 and 5")]
    BadRating,
    #[error("event time is {skew_ms} ms away from now, outside the allowed range")]
    EventTimeOutOfRange { skew_ms: i64 },
    /// Raised by the pipeline, not the decoder: the key would route the user's events to
    /// another partition than the ones keyed by the user id, splitting the user's state.
    #[error("message key is not the event's user_id (producers must key by user id)")]
    KeyMismatch,
    /// Raised by the engine, not the decoder, under `features.late_policy = "dead_letter"`.
    #[error("event is older than the user's latest event by more than features.allowed_lateness")]
    TooLate,
}

impl DecodeError {
    /// Stable code for metrics labels and dead-letter headers.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Empty => "empty",
            DecodeError::BadMagic => "bad_magic",
            DecodeError::UnknownSchemaId { .. } => "unknown_schema_id",
            DecodeError::InvalidAvro(_) => "invalid_avro",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::EmptyUserId => "empty_user_id",
            DecodeError::UserIdTooLong { .. } => "user_id_too_long",
            DecodeError::EmptyEventId => "empty_event_id",
            DecodeError::NonFinite(_) => "non_finite",
            DecodeError::Negative(_) => "negative_value",
            DecodeError::BadQuantity => "bad_quantity",
            DecodeError::NoItems => "no_items",
            DecodeError::BadRating => "bad_rating",
            DecodeError::EventTimeOutOfRange { .. } => "event_time_out_of_range",
            DecodeError::KeyMismatch => "key_mismatch",
            DecodeError::TooLate => "too_late",
        }
    }

    /// Every code, for documentation and for pre-registering metric series.
    pub const CODES: [&'static str; 18] = [
        "too_large",
        "empty",
        "bad_magic",
        "unknown_schema_id",
        "invalid_avro",
        "invalid_json",
        "missing_field",
        "empty_user_id",
        "user_id_too_long",
        "empty_event_id",
        "non_finite",
        "negative_value",
        "bad_quantity",
        "no_items",
        "bad_rating",
        "event_time_out_of_range",
        "key_mismatch",
        "too_late",
    ];

    /// `KeyMismatch` when a message's key is present and is not `user_id`. A message without a
    /// key is accepted: it is the producer's partitioner, not the key, that placed it.
    pub(crate) fn check_key(key: Option<&[u8]>, user_id: &str) -> Result<(), DecodeError> {
        match key {
            Some(k) if k != user_id.as_bytes() => Err(DecodeError::KeyMismatch),
            _ => Ok(()),
        }
    }
}

/// Decodes and validates messages of the three input topics. Build once, reuse per message.
pub struct Decoder {
    config: DecodeConfig,
}

/// Buffers that [`Decoder::decode_in`] decodes into, one record per input topic. Reused from
/// message to message, Avro decoding then allocates nothing once the buffers have grown to the
/// longest strings seen (a fresh record per message cost five to ten allocations and frees).
pub struct Scratch {
    events: [Event; 3],
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            events: Source::ALL.map(empty),
        }
    }
}

/// Two [`Scratch`]es, for decoding the next message before the current one is applied: its
/// user is then known early enough to start loading that user's state into cache
/// ([`crate::engine::Engine::prefetch`]) while the current event is applied, instead of
/// waiting on those cache misses afterwards. The consume loop and the benches use it.
///
/// [`ScratchPair::decode`] gives the current message's event and the [`Spare`] buffer, into
/// which [`Spare::decode`] decodes the next message; its [`Ahead`] token, handed back to
/// `decode` with that message, makes the spare buffer the current one.
#[derive(Default)]
pub struct ScratchPair {
    bufs: [Scratch; 2],
    current: usize,
    /// Counts decodes into the spare buffer, so that only the latest one's token is honoured.
    ahead: u64,
}

/// The spare buffer of a [`ScratchPair`], while the current event is borrowed.
pub struct Spare<'a> {
    buf: &'a mut Scratch,
    counter: &'a mut u64,
}

/// A message decoded ahead into a [`ScratchPair`]'s spare buffer: what decoding it gave.
/// Dropping it is harmless (the spare buffer is overwritten next time).
#[must_use]
#[derive(Debug)]
pub struct Ahead {
    source: Source,
    number: u64,
    result: Result<(), DecodeError>,
}

impl Ahead {
    /// The topic the message decoded ahead came from.
    pub fn source(&self) -> Source {
        self.source
    }
}

impl ScratchPair {
    /// The event of `payload` (a message of `source`): taken from the spare buffer if `ahead`
    /// is the latest token [`Spare::decode`] gave (for this message), else decoded now.
    pub fn decode(
        &mut self,
        decoder: &Decoder,
        source: Source,
        payload: &[u8],
        now_ms: Option<i64>,
        ahead: Option<Ahead>,
    ) -> Result<(&Event, Spare<'_>), DecodeError> {
        match ahead {
            Some(a) if a.number == self.ahead && a.source == source => {
                self.current = 1 - self.current;
                a.result?;
            }
            _ => {
                decoder.decode_in(source, payload, now_ms, &mut self.bufs[self.current])?;
            }
        }
        let [first, second] = &mut self.bufs;
        let (current, spare) = if self.current == 0 {
            (first, second)
        } else {
            (second, first)
        };
        Ok((
            &current.events[source as usize],
            Spare {
                buf: spare,
                counter: &mut self.ahead,
            },
        ))
    }
}

impl<'a> Spare<'a> {
    /// Decodes the message after the current one (whose event stays as it is). Returns its
    /// token and, if it decoded, its user id.
    pub fn decode(
        self,
        decoder: &Decoder,
        source: Source,
        payload: &[u8],
        now_ms: Option<i64>,
    ) -> (Ahead, Option<&'a str>) {
        *self.counter += 1;
        let number = *self.counter;
        match decoder.decode_in(source, payload, now_ms, self.buf) {
            Ok(event) => (
                Ahead {
                    source,
                    number,
                    result: Ok(()),
                },
                Some(event.user_id()),
            ),
            Err(e) => (
                Ahead {
                    source,
                    number,
                    result: Err(e),
                },
                None,
            ),
        }
    }
}

/// An empty record of `source`'s kind.
fn empty(source: Source) -> Event {
    match source {
        Source::Clickstream => Event::Click(ClickEvent::default()),
        Source::Purchases => Event::Purchase(PurchaseEvent::default()),
        Source::Social => Event::Social(SocialEvent::default()),
    }
}

impl Decoder {
    pub fn new(config: DecodeConfig) -> Self {
        Self { config }
    }

    /// Decodes a message of `source` in the topic's configured format and validates it.
    /// `now_ms` is the wall clock for the event-time range check; `None` skips that check (replay
    /// of history, where there is no meaningful "now").
    pub fn decode(
        &self,
        source: Source,
        payload: &[u8],
        now_ms: Option<i64>,
    ) -> Result<Event, DecodeError> {
        self.decode_as(source, self.config.formats.get(source), payload, now_ms)
    }

    /// Like [`Decoder::decode`] in an explicit format (replay reads NDJSON whatever the topics use).
    pub(crate) fn decode_as(
        &self,
        source: Source,
        format: WireFormat,
        payload: &[u8],
        now_ms: Option<i64>,
    ) -> Result<Event, DecodeError> {
        let mut scratch = Scratch::default();
        self.decode_in_as(source, format, payload, now_ms, &mut scratch)?;
        Ok(std::mem::replace(
            &mut scratch.events[source as usize],
            empty(source),
        ))
    }

    /// [`Decoder::decode`] into `scratch`'s buffers: the event borrowed from them is valid until
    /// the next decode into the same scratch. The consume loop and the benches decode this way.
    pub fn decode_in<'s>(
        &self,
        source: Source,
        payload: &[u8],
        now_ms: Option<i64>,
        scratch: &'s mut Scratch,
    ) -> Result<&'s Event, DecodeError> {
        let format = self.config.formats.get(source);
        self.decode_in_as(source, format, payload, now_ms, scratch)
    }

    fn decode_in_as<'s>(
        &self,
        source: Source,
        format: WireFormat,
        payload: &[u8],
        now_ms: Option<i64>,
        scratch: &'s mut Scratch,
    ) -> Result<&'s Event, DecodeError> {
        if payload.len() > self.config.max_message_bytes {
            return Err(DecodeError::TooLarge {
                size: payload.len(),
                limit: self.config.max_message_bytes,
            });
        }
        if payload.is_empty() {
            return Err(DecodeError::Empty);
        }
        let slot = &mut scratch.events[source as usize];
        match format {
            WireFormat::Avro => self.decode_avro(source, payload, slot)?,
            WireFormat::Json => *slot = decode_json(source, payload)?,
        }
        validate(slot)?;
        if let Some(now) = now_ms {
            self.check_time(slot.event_time(), now)?;
        }
        Ok(slot)
    }

    /// Decodes Confluent-framed Avro into `slot` (a record of `source`'s kind).
    fn decode_avro(
        &self,
        source: Source,
        payload: &[u8],
        slot: &mut Event,
    ) -> Result<(), DecodeError> {
        if payload.len() < CONFLUENT_HEADER_LEN || payload[0] != 0 {
            return Err(DecodeError::BadMagic);
        }
        let got = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
        let expected = self.config.schema_ids.get(source);
        if got != expected {
            return Err(DecodeError::UnknownSchemaId { got, expected });
        }
        // The decoder specialised to the bundled schemas (`avro_fast`); apache-avro is its
        // reference in tests.
        let body = &payload[CONFLUENT_HEADER_LEN..];
        if slot.source() != source {
            *slot = empty(source);
        }
        let decoded = match slot {
            Event::Click(e) => avro_fast::click_into(body, e),
            Event::Purchase(e) => avro_fast::purchase_into(body, e),
            Event::Social(e) => avro_fast::social_into(body, e),
        };
        decoded.map_err(DecodeError::InvalidAvro)
    }

    fn check_time(&self, event_ms: i64, now_ms: i64) -> Result<(), DecodeError> {
        let skew_ms = event_ms.saturating_sub(now_ms);
        let future = i64::try_from(self.config.max_future_skew.as_millis()).unwrap_or(i64::MAX);
        let past = i64::try_from(self.config.max_event_age.as_millis()).unwrap_or(i64::MAX);
        if skew_ms > future || skew_ms < -past {
            return Err(DecodeError::EventTimeOutOfRange { skew_ms });
        }
        Ok(())
    }
}

/// Decodes one JSON object of `source` (the NDJSON form used by replay as well).
pub(crate) fn decode_json(source: Source, payload: &[u8]) -> Result<Event, DecodeError> {
    fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
        serde_json::from_slice(payload).map_err(|e| {
            let msg = e.to_string();
            if msg.starts_with("missing field") {
                DecodeError::MissingField(msg)
            } else {
                DecodeError::InvalidJson(msg)
            }
        })
    }
    // serde also reads a struct from an array of its fields in order; the documented wire format
    // is one object, and an array would silently depend on the schema's field order.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(DecodeError::InvalidJson("expected one JSON object".into()));
    }
    Ok(match source {
        Source::Clickstream => Event::Click(parse::<ClickEvent>(payload)?),
        Source::Purchases => Event::Purchase(parse::<PurchaseEvent>(payload)?),
        Source::Social => Event::Social(parse::<SocialEvent>(payload)?),
    })
}

fn finite_non_negative(field: &'static str, v: f64) -> Result<(), DecodeError> {
    if !v.is_finite() {
        Err(DecodeError::NonFinite(field))
    } else if v < 0.0 {
        Err(DecodeError::Negative(field))
    } else {
        Ok(())
    }
}

fn finite_embedding(e: &Option<Vec<f32>>) -> Result<(), DecodeError> {
    match e {
        Some(v) if v.iter().any(|x| !x.is_finite()) => Err(DecodeError::NonFinite("embedding")),
        _ => Ok(()),
    }
}

/// Longest user id accepted, in bytes. An id is a key, not content: longer ones could not be
/// addressed over HTTP (`GET /users/{id}` answers 414 past about 64 KiB) and would make every
/// record published for the user as large as the id (a 600 KB id once made a segment change
/// exceed the producer's limit).
pub const MAX_USER_ID_BYTES: usize = 1024;

/// The semantic rules every event must satisfy, whatever its wire format.
pub fn validate(event: &Event) -> Result<(), DecodeError> {
    if event.user_id().trim().is_empty() {
        return Err(DecodeError::EmptyUserId);
    }
    if event.user_id().len() > MAX_USER_ID_BYTES {
        return Err(DecodeError::UserIdTooLong {
            len: event.user_id().len(),
        });
    }
    if event.event_id().is_empty() {
        return Err(DecodeError::EmptyEventId);
    }
    match event {
        Event::Click(c) => {
            finite_non_negative("price", c.price)?;
            if c.dwell_ms < 0 {
                return Err(DecodeError::Negative("dwell_ms"));
            }
            finite_embedding(&c.embedding)?;
        }
        Event::Purchase(p) => {
            if p.items.is_empty() {
                return Err(DecodeError::NoItems);
            }
            finite_non_negative("total", p.total)?;
            for item in &p.items {
                finite_non_negative("unit_price", item.unit_price)?;
                match p.status {
                    OrderStatus::Placed if item.quantity <= 0 => {
                        return Err(DecodeError::BadQuantity)
                    }
                    _ if item.quantity < 0 => return Err(DecodeError::Negative("quantity")),
                    _ => {}
                }
            }
        }
        Event::Social(s) => {
            if let Some(r) = s.rating {
                if !(1..=5).contains(&r) {
                    return Err(DecodeError::BadRating);
                }
            }
            finite_embedding(&s.embedding)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::encode_event;
    use crate::event::{ClickKind, LineItem};
    use proptest::prelude::*;

    #[test]
    fn json_input_is_one_object_not_an_array_of_fields() {
        let json = encode_event(&Event::Click(click()), WireFormat::Json, 0);
        assert!(decode_json(Source::Clickstream, &json).is_ok());
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let fields: Vec<serde_json::Value> = value.as_object().unwrap().values().cloned().collect();
        let array = serde_json::to_vec(&fields).unwrap();
        let e = decode_json(Source::Clickstream, &array).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
        assert!(e.to_string().contains("one JSON object"), "{e}");
    }

    #[test]
    fn a_user_id_over_the_limit_is_refused_with_its_own_code() {
        let d = decoder();
        let id = DecodeConfig::default().schema_ids.clickstream;
        let mut c = click();
        c.user_id = "u".repeat(MAX_USER_ID_BYTES);
        let ok = encode_event(&Event::Click(c.clone()), WireFormat::Avro, id);
        assert!(d.decode(Source::Clickstream, &ok, None).is_ok());
        c.user_id.push('u');
        let long = encode_event(&Event::Click(c), WireFormat::Avro, id);
        let e = d.decode(Source::Clickstream, &long, None).unwrap_err();
        assert_eq!(e.code(), "user_id_too_long");
    }

    #[test]
    fn a_key_other_than_the_user_id_is_refused_and_no_key_is_accepted() {
        assert!(DecodeError::check_key(Some(b"user-1"), "user-1").is_ok());
        assert!(DecodeError::check_key(None, "user-1").is_ok());
        let e = DecodeError::check_key(Some(b"user-2"), "user-1").unwrap_err();
        assert_eq!(e.code(), "key_mismatch");
        assert!(DecodeError::CODES.contains(&e.code()));
    }

    fn click() -> ClickEvent {
        ClickEvent {
            event_id: "e1".into(),
            user_id: "u1".into(),
            event_time: 1_700_000_000_000,
            session_id: "s1".into(),
            kind: ClickKind::AddToCart,
            product_id: "p1".into(),
            category: "home".into(),
            price: 12.5,
            dwell_ms: 3000,
            search_text: None,
            embedding: Some(vec![0.5, -1.0]),
        }
    }

    fn purchase() -> PurchaseEvent {
        PurchaseEvent {
            event_id: "e2".into(),
            user_id: "u1".into(),
            event_time: 1_700_000_000_000,
            order_id: "o1".into(),
            status: OrderStatus::Placed,
            items: vec![LineItem {
                product_id: "p1".into(),
                category: "home".into(),
                quantity: 2,
                unit_price: 3.0,
                description: Some("MUG".into()),
            }],
            total: 6.0,
            currency: "GBP".into(),
        }
    }

    fn decoder() -> Decoder {
        Decoder::new(DecodeConfig::default())
    }

    #[test]
    fn avro_and_json_round_trip() {
        let d = decoder();
        let cfg = DecodeConfig::default();
        for event in [Event::Click(click()), Event::Purchase(purchase())] {
            let src = event.source();
            let avro = encode_event(&event, WireFormat::Avro, cfg.schema_ids.get(src));
            assert_eq!(d.decode(src, &avro, None).unwrap(), event);
            let json = encode_event(&event, WireFormat::Json, 0);
            assert_eq!(decode_json(src, &json).unwrap(), event);
        }
    }

    #[test]
    fn each_rule_has_its_code() {
        let d = decoder();
        let id = DecodeConfig::default().schema_ids.clickstream;
        let code = |e: Event| {
            let bytes = encode_event(&e, WireFormat::Avro, id);
            d.decode(e.source(), &bytes, Some(1_700_000_000_000))
                .unwrap_err()
                .code()
        };
        let mut c = click();
        c.user_id = " ".into();
        assert_eq!(code(Event::Click(c)), "empty_user_id");
        let mut c = click();
        c.price = f64::NAN;
        assert_eq!(code(Event::Click(c)), "non_finite");
        let mut c = click();
        c.price = -1.0;
        assert_eq!(code(Event::Click(c)), "negative_value");
        let mut c = click();
        c.event_time += 3_600_000;
        assert_eq!(code(Event::Click(c)), "event_time_out_of_range");

        let id = DecodeConfig::default().schema_ids.purchases;
        let mut p = purchase();
        p.items[0].quantity = 0;
        let bytes = encode_event(&Event::Purchase(p.clone()), WireFormat::Avro, id);
        assert_eq!(
            d.decode(Source::Purchases, &bytes, None)
                .unwrap_err()
                .code(),
            "bad_quantity"
        );
        p.status = OrderStatus::Cancelled;
        let bytes = encode_event(&Event::Purchase(p), WireFormat::Avro, id);
        assert!(d.decode(Source::Purchases, &bytes, None).is_ok());

        // A click framed with the purchases schema id is refused before it is read.
        let bytes = encode_event(&Event::Click(click()), WireFormat::Avro, id);
        assert_eq!(
            d.decode(Source::Clickstream, &bytes, None)
                .unwrap_err()
                .code(),
            "unknown_schema_id"
        );
        assert_eq!(
            d.decode(Source::Clickstream, b"{}", None)
                .unwrap_err()
                .code(),
            "bad_magic"
        );
        assert_eq!(
            d.decode(Source::Clickstream, b"", None).unwrap_err().code(),
            "empty"
        );
        assert_eq!(
            decode_json(Source::Social, br#"{"event_id":"x"}"#)
                .unwrap_err()
                .code(),
            "missing_field"
        );
    }

    #[test]
    fn truncated_and_padded_avro_is_invalid() {
        let d = decoder();
        let id = DecodeConfig::default().schema_ids.purchases;
        let bytes = encode_event(&Event::Purchase(purchase()), WireFormat::Avro, id);
        let short = &bytes[..bytes.len() - 3];
        assert_eq!(
            d.decode(Source::Purchases, short, None).unwrap_err().code(),
            "invalid_avro"
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            d.decode(Source::Purchases, &long, None).unwrap_err().code(),
            "invalid_avro"
        );
    }

    #[test]
    fn oversized_messages_are_refused_unread() {
        let cfg = DecodeConfig {
            max_message_bytes: 100,
            ..DecodeConfig::default()
        };
        let d = Decoder::new(cfg);
        assert_eq!(
            d.decode(Source::Social, &[0u8; 101], None)
                .unwrap_err()
                .code(),
            "too_large"
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), src in 0usize..3) {
            let d = decoder();
            let source = Source::ALL[src];
            // Confluent-framed garbage with the right id reaches the Avro reader itself.
            let mut framed = crate::schema::confluent_frame(DecodeConfig::default().schema_ids.get(source), &bytes);
            let _ = d.decode(source, &bytes, Some(0));
            let _ = d.decode(source, &framed, Some(0));
            framed.truncate(framed.len() / 2);
            let _ = d.decode(source, &framed, None);
            let _ = decode_json(source, &bytes);
        }
    }

    /// Decoding one message ahead gives each message what a fresh decode gives (malformed ones
    /// their error), and a token that is not the latest is never trusted.
    #[test]
    fn decoding_ahead_equals_decoding_each_message_on_its_own() {
        let cfg = DecodeConfig::default();
        let d = Decoder::new(cfg.clone());
        let mut g = crate::generate::Generator::new(5, 40, 0.1);
        let records: Vec<_> = (0..2_000)
            .map(|i| g.next_record(1_700_000_000_000 + i, &cfg))
            .collect();
        let mut pair = ScratchPair::default();
        let mut ahead = None;
        let (mut taken_ahead, mut failed) = (0, 0);
        for (i, r) in records.iter().enumerate() {
            let fresh = d.decode(r.source, &r.payload, None);
            taken_ahead += usize::from(ahead.is_some());
            match pair.decode(&d, r.source, &r.payload, None, ahead.take()) {
                Ok((event, spare)) => {
                    assert_eq!(Ok(event), fresh.as_ref(), "record {i}");
                    if let Some(n) = records.get(i + 1) {
                        let (token, user) = spare.decode(&d, n.source, &n.payload, None);
                        let expected = d.decode(n.source, &n.payload, None);
                        assert_eq!(user, expected.as_ref().ok().map(Event::user_id));
                        ahead = Some(token);
                    }
                }
                Err(e) => {
                    assert_eq!(Err(e), fresh, "record {i}");
                    failed += 1;
                }
            }
        }
        assert!(taken_ahead > 1_500 && failed > 50, "{taken_ahead} {failed}");

        // A stale token (another message was decoded ahead since) is ignored: the message is
        // decoded now. So is a token handed over with a message of another topic.
        let click = encode_event(
            &Event::Click(click()),
            WireFormat::Avro,
            cfg.schema_ids.clickstream,
        );
        let social = records
            .iter()
            .find(|r| r.source == Source::Social && r.event.is_some())
            .unwrap();
        let mut pair = ScratchPair::default();
        for (ahead_as, payload, stale) in [
            (Source::Social, &social.payload, true),
            (Source::Clickstream, &click, false),
        ] {
            let (_, spare) = pair
                .decode(&d, Source::Clickstream, &click, None, None)
                .unwrap();
            let (token, _) = spare.decode(&d, ahead_as, payload, None);
            if stale {
                let (_, spare) = pair
                    .decode(&d, Source::Clickstream, &click, None, None)
                    .unwrap();
                let (_latest, _) = spare.decode(&d, Source::Clickstream, &click, None);
            }
            let (event, _) = pair
                .decode(&d, Source::Social, &social.payload, None, Some(token))
                .unwrap();
            assert_eq!(Some(event), social.event.as_ref(), "stale: {stale}");
        }
    }
}
