//! A decoder specialised to the three bundled input schemas (Avro binary encoding, spec 1.11):
//! it reads the fields straight into the event structs, with no intermediate `Value` tree, which
//! is what makes decoding cheap per event. apache-avro remains the reference: tests check that
//! both decoders agree on every generated event and that the bundled schemas are still the ones
//! this code was written for (by their Rabin fingerprints).
//!
//! Pure; never panics on any input; refuses lengths larger than what is left of the message, so
//! malformed input cannot make it allocate more than the message size.

use crate::event::{
    ClickEvent, ClickKind, LineItem, OrderStatus, PurchaseEvent, SocialAction, SocialEvent,
};

/// Why the bytes are not a valid datum of the schema.
pub type Error = String;

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Result<i64, Error> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                // Zigzag: 0, -1, 1, -2, ... on the wire as 0, 1, 2, 3, ...
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn int(&mut self) -> Result<i32, Error> {
        i32::try_from(self.long()?).map_err(|_| "int out of range".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if n > self.buf.len() {
            return Err(format!(
                "length {n} exceeds the {} bytes left",
                self.buf.len()
            ));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn len(&mut self) -> Result<usize, Error> {
        usize::try_from(self.long()?).map_err(|_| "negative length".into())
    }

    fn string(&mut self) -> Result<String, Error> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| "string is not UTF-8".into())
    }

    fn double(&mut self) -> Result<f64, Error> {
        let b = self.take(8)?;
        Ok(f64::from_le_bytes(b.try_into().map_err(|_| "double")?))
    }

    fn float(&mut self) -> Result<f32, Error> {
        let b = self.take(4)?;
        Ok(f32::from_le_bytes(b.try_into().map_err(|_| "float")?))
    }

    fn enum_index(&mut self, symbols: usize) -> Result<usize, Error> {
        let i = self.long()?;
        usize::try_from(i)
            .ok()
            .filter(|&i| i < symbols)
            .ok_or_else(|| format!("enum index {i} out of range"))
    }

    /// `["null", T]`: branch 0 is null, branch 1 is a `T`.
    fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<Option<T>, Error> {
        match self.long()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            b => Err(format!("union branch {b} out of range")),
        }
    }

    /// An array in blocks: a count (negative: followed by the block's byte size), the items,
    /// and a zero count at the end. `min_item` bytes per item bound the count by what is left.
    fn array<T>(
        &mut self,
        min_item: usize,
        mut read: impl FnMut(&mut Self) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        loop {
            let count = self.long()?;
            if count == 0 {
                return Ok(out);
            }
            if count < 0 {
                self.long()?; // block size in bytes: not needed to read sequentially
            }
            let n = usize::try_from(count.unsigned_abs()).map_err(|_| "array count")?;
            if n.saturating_mul(min_item) > self.buf.len() {
                return Err(format!(
                    "array of {n} items exceeds the {} bytes left",
                    self.buf.len()
                ));
            }
            out.reserve(n);
            for _ in 0..n {
                out.push(read(self)?);
            }
        }
    }

    fn finish<T>(self, value: T) -> Result<T, Error> {
        if self.buf.is_empty() {
            Ok(value)
        } else {
            Err(format!("{} bytes left after the record", self.buf.len()))
        }
    }
}

fn embedding(r: &mut Reader<'_>) -> Result<Option<Vec<f32>>, Error> {
    r.optional(|r| r.array(4, Reader::float))
}

/// `schemas/click_event.avsc`.
pub fn click(body: &[u8]) -> Result<ClickEvent, Error> {
    let mut r = Reader { buf: body };
    let e = ClickEvent {
        event_id: r.string()?,
        user_id: r.string()?,
        event_time: r.long()?,
        session_id: r.string()?,
        kind: [
            ClickKind::View,
            ClickKind::Search,
            ClickKind::AddToCart,
            ClickKind::RemoveFromCart,
            ClickKind::CheckoutStart,
        ][r.enum_index(5)?],
        product_id: r.string()?,
        category: r.string()?,
        price: r.double()?,
        dwell_ms: r.long()?,
        search_text: r.optional(Reader::string)?,
        embedding: embedding(&mut r)?,
    };
    r.finish(e)
}

/// `schemas/purchase_event.avsc`.
pub fn purchase(body: &[u8]) -> Result<PurchaseEvent, Error> {
    let mut r = Reader { buf: body };
    let e = PurchaseEvent {
        event_id: r.string()?,
        user_id: r.string()?,
        event_time: r.long()?,
        order_id: r.string()?,
        status: [
            OrderStatus::Placed,
            OrderStatus::Cancelled,
            OrderStatus::Refunded,
        ][r.enum_index(3)?],
        // A line item is at least 12 bytes: two empty strings, an int, a double, a union tag.
        items: r.array(12, |r| {
            Ok(LineItem {
                product_id: r.string()?,
                category: r.string()?,
                quantity: r.int()?,
                unit_price: r.double()?,
                description: r.optional(Reader::string)?,
            })
        })?,
        total: r.double()?,
        currency: r.string()?,
    };
    r.finish(e)
}

/// `schemas/social_event.avsc`.
pub fn social(body: &[u8]) -> Result<SocialEvent, Error> {
    let mut r = Reader { buf: body };
    let e = SocialEvent {
        event_id: r.string()?,
        user_id: r.string()?,
        event_time: r.long()?,
        action: [
            SocialAction::Like,
            SocialAction::Share,
            SocialAction::Review,
            SocialAction::Comment,
            SocialAction::Follow,
        ][r.enum_index(5)?],
        target_product: r.optional(Reader::string)?,
        target_category: r.optional(Reader::string)?,
        rating: r.optional(Reader::int)?,
        text: r.optional(Reader::string)?,
        embedding: embedding(&mut r)?,
    };
    r.finish(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DecodeConfig, WireFormat};
    use crate::encode::encode_event;
    use crate::event::{Event, Source};
    use crate::generate::Generator;
    use crate::schema::{self, CONFLUENT_HEADER_LEN};
    use apache_avro::rabin::Rabin;
    use apache_avro::reader::datum::GenericDatumReader;
    use proptest::prelude::*;

    fn reference(source: Source, body: &[u8]) -> Result<Event, String> {
        let reader = GenericDatumReader::builder(schema::input(source))
            .build()
            .unwrap();
        let mut b = body;
        let e = match source {
            Source::Clickstream => {
                Event::Click(reader.read_deser(&mut b).map_err(|e| e.to_string())?)
            }
            Source::Purchases => {
                Event::Purchase(reader.read_deser(&mut b).map_err(|e| e.to_string())?)
            }
            Source::Social => Event::Social(reader.read_deser(&mut b).map_err(|e| e.to_string())?),
        };
        if b.is_empty() {
            Ok(e)
        } else {
            Err("trailing".into())
        }
    }

    fn fast(source: Source, body: &[u8]) -> Result<Event, String> {
        Ok(match source {
            Source::Clickstream => Event::Click(click(body)?),
            Source::Purchases => Event::Purchase(purchase(body)?),
            Source::Social => Event::Social(social(body)?),
        })
    }

    #[test]
    fn written_for_these_schemas() {
        // If a schema changes, this decoder must change with it: update both, then these.
        let fp = |s: &apache_avro::Schema| format!("{}", s.fingerprint::<Rabin>());
        let got = [
            fp(&schema::CLICK_EVENT),
            fp(&schema::PURCHASE_EVENT),
            fp(&schema::SOCIAL_EVENT),
        ];
        assert_eq!(got, FINGERPRINTS, "{got:?}");
    }

    const FINGERPRINTS: [&str; 3] = ["bbeb3ed4a2f81b4d", "e63671ebbe7af1e3", "4a0e0e77a6f6830f"];

    #[test]
    fn agrees_with_apache_avro_on_generated_events() {
        let cfg = DecodeConfig::default();
        let mut g = Generator::new(4, 100, 0.0);
        for i in 0..5_000 {
            let mut e = g.next_event(1_700_000_000_000 + i);
            // Exercise the optional fields the generator leaves empty.
            match &mut e {
                Event::Click(c) if i % 3 == 0 => c.embedding = Some(vec![0.5, -1.5, 3.25]),
                Event::Social(s) if i % 2 == 0 => {
                    s.embedding = Some(vec![1.0; 8]);
                    s.target_product = Some("p-1".into());
                }
                Event::Purchase(p) if i % 2 == 0 => p.items[0].description = Some("MUG".into()),
                _ => {}
            }
            let bytes = encode_event(&e, WireFormat::Avro, cfg.schema_ids.get(e.source()));
            let body = &bytes[CONFLUENT_HEADER_LEN..];
            assert_eq!(fast(e.source(), body), Ok(e.clone()));
            assert_eq!(reference(e.source(), body), Ok(e));
        }
    }

    proptest! {
        #[test]
        fn garbage_is_refused_like_the_reference(bytes in proptest::collection::vec(any::<u8>(), 0..256), src in 0usize..3) {
            let source = Source::ALL[src];
            let (f, r) = (fast(source, &bytes), reference(source, &bytes));
            prop_assert_eq!(f.is_ok(), r.is_ok(), "fast {:?} reference {:?}", f, r);
            if let (Ok(a), Ok(b)) = (f, r) {
                prop_assert_eq!(a, b);
            }
        }
    }
}
