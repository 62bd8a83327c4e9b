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

    fn str(&mut self) -> Result<&'a str, Error> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".into())
    }

    /// Reads a string into `out`, reusing its buffer.
    fn string_into(&mut self, out: &mut String) -> Result<(), Error> {
        let s = self.str()?;
        out.clear();
        out.push_str(s);
        Ok(())
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

    /// `["null", T]` into `out`: branch 0 is null, branch 1 is a `T`, read by `read` into the
    /// value `out` already holds (reusing its buffers) or into a new default one.
    fn optional_into<T: Default>(
        &mut self,
        out: &mut Option<T>,
        read: impl FnOnce(&mut Self, &mut T) -> Result<(), Error>,
    ) -> Result<(), Error> {
        match self.long()? {
            0 => *out = None,
            1 => read(self, out.get_or_insert_with(T::default))?,
            b => return Err(format!("union branch {b} out of range")),
        }
        Ok(())
    }

    /// An array in blocks into `out`, reusing its items (and their buffers): a count (negative:
    /// followed by the block's byte size), the items, and a zero count at the end. `min_item`
    /// bytes per item bound the count by what is left; `read` decodes into an item in place.
    fn array_into<T: Default>(
        &mut self,
        out: &mut Vec<T>,
        min_item: usize,
        mut read: impl FnMut(&mut Self, &mut T) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut len = 0;
        loop {
            let count = self.long()?;
            if count == 0 {
                out.truncate(len);
                return Ok(());
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
            for _ in 0..n {
                if len == out.len() {
                    out.push(T::default());
                }
                read(self, &mut out[len])?;
                len += 1;
            }
        }
    }

    fn finish(self) -> Result<(), Error> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes left after the record", self.buf.len()))
        }
    }
}

/// `["null", {"type": "array", "items": "float"}]` into `out`, reusing its buffer.
fn embedding_into(r: &mut Reader<'_>, out: &mut Option<Vec<f32>>) -> Result<(), Error> {
    r.optional_into(out, |r, v| {
        r.array_into(v, 4, |r, x| {
            *x = r.float()?;
            Ok(())
        })
    })
}

/// `schemas/click_event.avsc`, into `e`: every field is overwritten and string buffers are
/// reused, so decoding allocates only for a message longer than the ones before. On an error
/// `e` holds a partial record and must not be used.
pub(crate) fn click_into(body: &[u8], e: &mut ClickEvent) -> Result<(), Error> {
    let mut r = Reader { buf: body };
    r.string_into(&mut e.event_id)?;
    r.string_into(&mut e.user_id)?;
    e.event_time = r.long()?;
    r.string_into(&mut e.session_id)?;
    e.kind = [
        ClickKind::View,
        ClickKind::Search,
        ClickKind::AddToCart,
        ClickKind::RemoveFromCart,
        ClickKind::CheckoutStart,
    ][r.enum_index(5)?];
    r.string_into(&mut e.product_id)?;
    r.string_into(&mut e.category)?;
    e.price = r.double()?;
    e.dwell_ms = r.long()?;
    r.optional_into(&mut e.search_text, Reader::string_into)?;
    embedding_into(&mut r, &mut e.embedding)?;
    r.finish()
}

/// `schemas/purchase_event.avsc`, into `e` (as [`click_into`]).
pub(crate) fn purchase_into(body: &[u8], e: &mut PurchaseEvent) -> Result<(), Error> {
    let mut r = Reader { buf: body };
    r.string_into(&mut e.event_id)?;
    r.string_into(&mut e.user_id)?;
    e.event_time = r.long()?;
    r.string_into(&mut e.order_id)?;
    e.status = [
        OrderStatus::Placed,
        OrderStatus::Cancelled,
        OrderStatus::Refunded,
    ][r.enum_index(3)?];
    // A line item is at least 12 bytes: two empty strings, an int, a double, a union tag.
    r.array_into(&mut e.items, 12, |r, item: &mut LineItem| {
        r.string_into(&mut item.product_id)?;
        r.string_into(&mut item.category)?;
        item.quantity = r.int()?;
        item.unit_price = r.double()?;
        r.optional_into(&mut item.description, Reader::string_into)
    })?;
    e.total = r.double()?;
    r.string_into(&mut e.currency)?;
    r.finish()
}

/// `schemas/social_event.avsc`, into `e` (as [`click_into`]).
pub(crate) fn social_into(body: &[u8], e: &mut SocialEvent) -> Result<(), Error> {
    let mut r = Reader { buf: body };
    r.string_into(&mut e.event_id)?;
    r.string_into(&mut e.user_id)?;
    e.event_time = r.long()?;
    e.action = [
        SocialAction::Like,
        SocialAction::Share,
        SocialAction::Review,
        SocialAction::Comment,
        SocialAction::Follow,
    ][r.enum_index(5)?];
    r.optional_into(&mut e.target_product, Reader::string_into)?;
    r.optional_into(&mut e.target_category, Reader::string_into)?;
    r.optional_into(&mut e.rating, |r, x| {
        *x = r.int()?;
        Ok(())
    })?;
    r.optional_into(&mut e.text, Reader::string_into)?;
    embedding_into(&mut r, &mut e.embedding)?;
    r.finish()
}

/// `schemas/click_event.avsc` into a new record.
pub fn click(body: &[u8]) -> Result<ClickEvent, Error> {
    let mut e = ClickEvent::default();
    click_into(body, &mut e).map(|()| e)
}

/// `schemas/purchase_event.avsc` into a new record.
pub fn purchase(body: &[u8]) -> Result<PurchaseEvent, Error> {
    let mut e = PurchaseEvent::default();
    purchase_into(body, &mut e).map(|()| e)
}

/// `schemas/social_event.avsc` into a new record.
pub fn social(body: &[u8]) -> Result<SocialEvent, Error> {
    let mut e = SocialEvent::default();
    social_into(body, &mut e).map(|()| e)
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

    /// Decoding into reused buffers gives what a fresh decode gives, whatever came before:
    /// longer and shorter strings, more and fewer line items, optional fields set then unset.
    #[test]
    fn decoding_into_reused_buffers_equals_a_fresh_decode() {
        let cfg = DecodeConfig::default();
        let mut g = Generator::new(9, 50, 0.0);
        let (mut click_buf, mut purchase_buf, mut social_buf) = (
            ClickEvent::default(),
            PurchaseEvent::default(),
            SocialEvent::default(),
        );
        let mut long_then_short = 0;
        for i in 0..3_000 {
            let mut e = g.next_event(1_700_000_000_000 + i);
            match &mut e {
                Event::Click(c) if i % 2 == 0 => {
                    c.embedding = Some(vec![0.25; (i % 7) as usize]);
                    c.search_text = Some("x".repeat((i % 40) as usize));
                }
                Event::Social(s) if i % 3 == 0 => s.text = None,
                Event::Purchase(p) if i % 2 == 0 => {
                    p.items.truncate(1);
                    p.items[0].description = Some("MUG".into());
                }
                Event::Purchase(p) => {
                    let extra = p.items[0].clone();
                    p.items.extend(std::iter::repeat_n(extra, (i % 4) as usize));
                }
                _ => {}
            }
            let bytes = encode_event(&e, WireFormat::Avro, cfg.schema_ids.get(e.source()));
            let body = &bytes[CONFLUENT_HEADER_LEN..];
            let reused = match e.source() {
                Source::Clickstream => {
                    let text_len = |c: &ClickEvent| c.search_text.as_ref().map(String::len);
                    let before = text_len(&click_buf);
                    click_into(body, &mut click_buf).unwrap();
                    long_then_short += usize::from(text_len(&click_buf) < before);
                    Event::Click(click_buf.clone())
                }
                Source::Purchases => {
                    purchase_into(body, &mut purchase_buf).unwrap();
                    Event::Purchase(purchase_buf.clone())
                }
                Source::Social => {
                    social_into(body, &mut social_buf).unwrap();
                    Event::Social(social_buf.clone())
                }
            };
            assert_eq!(reused, e);
        }
        assert!(long_then_short > 0, "the sequence must shrink strings too");
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
