//! Synthetic traffic with a known ground truth: users belong to latent personas whose behaviour
//! differs, and a chosen share of records is malformed in known ways (each with the error code
//! the decoder must give it). Pure and seeded: the same seed gives the same stream.

use crate::config::{DecodeConfig, WireFormat};
use crate::encode::encode_event;
use crate::event::{
    ClickEvent, ClickKind, Event, LineItem, OrderStatus, PurchaseEvent, SocialAction, SocialEvent,
    Source,
};
use rand::distr::{weighted::WeightedIndex, Distribution};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const CATEGORIES: [&str; 8] = [
    "electronics",
    "fashion",
    "home",
    "beauty",
    "sports",
    "toys",
    "books",
    "grocery",
];

/// How one latent group of users behaves.
#[derive(Clone, Debug)]
pub struct Persona {
    pub name: &'static str,
    /// Weights of clickstream, purchases, social.
    sources: [f64; 3],
    /// Weights of view, search, add_to_cart, remove_from_cart, checkout_start.
    clicks: [f64; 5],
    /// Weights of like, share, review, comment, follow.
    social: [f64; 5],
    /// Typical unit price (median of a log-normal).
    price: f64,
    /// Typical order total (median of a log-normal).
    order_total: f64,
    /// Mean dwell per click, seconds.
    dwell_s: f64,
    /// Share of purchase events that cancel or refund an order.
    cancel: f64,
    /// Range of star ratings given.
    ratings: (i32, i32),
    /// Indices into CATEGORIES the persona prefers (80 % of its interactions).
    categories: [usize; 2],
}

/// The built-in personas; `segstream generate` and `demo` use them all.
pub fn personas() -> Vec<Persona> {
    vec![
        Persona {
            name: "bargain_hunter",
            sources: [0.85, 0.12, 0.03],
            clicks: [0.45, 0.35, 0.12, 0.03, 0.05],
            social: [0.6, 0.3, 0.1, 0.0, 0.0],
            price: 6.0,
            order_total: 15.0,
            dwell_s: 15.0,
            cancel: 0.05,
            ratings: (3, 4),
            categories: [7, 2],
        },
        Persona {
            name: "big_spender",
            sources: [0.6, 0.35, 0.05],
            clicks: [0.5, 0.05, 0.25, 0.02, 0.18],
            social: [0.5, 0.2, 0.2, 0.1, 0.0],
            price: 200.0,
            order_total: 450.0,
            dwell_s: 40.0,
            cancel: 0.03,
            ratings: (4, 5),
            categories: [0, 1],
        },
        Persona {
            name: "window_shopper",
            sources: [0.97, 0.01, 0.02],
            clicks: [0.86, 0.1, 0.02, 0.01, 0.01],
            social: [0.8, 0.1, 0.0, 0.1, 0.0],
            price: 60.0,
            order_total: 40.0,
            dwell_s: 150.0,
            cancel: 0.05,
            ratings: (3, 4),
            categories: [1, 3],
        },
        Persona {
            name: "social_advocate",
            sources: [0.4, 0.1, 0.5],
            clicks: [0.6, 0.1, 0.2, 0.05, 0.05],
            social: [0.35, 0.25, 0.2, 0.1, 0.1],
            price: 25.0,
            order_total: 50.0,
            dwell_s: 30.0,
            cancel: 0.03,
            ratings: (4, 5),
            categories: [6, 5],
        },
        Persona {
            name: "cart_abandoner",
            sources: [0.93, 0.03, 0.04],
            clicks: [0.3, 0.1, 0.35, 0.1, 0.15],
            social: [0.7, 0.2, 0.1, 0.0, 0.0],
            price: 80.0,
            order_total: 70.0,
            dwell_s: 25.0,
            cancel: 0.1,
            ratings: (2, 4),
            categories: [4, 0],
        },
        Persona {
            name: "unhappy_returner",
            sources: [0.5, 0.3, 0.2],
            clicks: [0.6, 0.1, 0.2, 0.05, 0.05],
            social: [0.0, 0.0, 0.6, 0.4, 0.0],
            price: 40.0,
            order_total: 90.0,
            dwell_s: 20.0,
            cancel: 0.5,
            ratings: (1, 2),
            categories: [1, 2],
        },
    ]
}

/// One generated Kafka record.
#[derive(Clone, Debug)]
pub struct Record {
    pub source: Source,
    /// Message key: the user id.
    pub key: String,
    pub payload: Vec<u8>,
    /// The event, when the record is valid.
    pub event: Option<Event>,
    /// The decoder's error code, when the record is deliberately malformed.
    pub expected_error: Option<&'static str>,
}

/// Seeded generator of persona traffic.
pub struct Generator {
    rng: ChaCha8Rng,
    personas: Vec<Persona>,
    /// Persona index of each user; user `i` is named `user-{i}`.
    user_persona: Vec<usize>,
    malformed_ratio: f64,
    seq: u64,
    /// Events are stamped up to this long before the given time.
    skew_ms: i64,
    sources: Vec<WeightedIndex<f64>>,
    clicks: Vec<WeightedIndex<f64>>,
    social: Vec<WeightedIndex<f64>>,
}

impl Generator {
    /// `users` users spread evenly over the personas in a seeded random order.
    pub fn new(seed: u64, users: usize, malformed_ratio: f64) -> Self {
        let personas = personas();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let user_persona = (0..users.max(1))
            .map(|_| rng.random_range(0..personas.len()))
            .collect();
        let w = |v: &[f64]| WeightedIndex::new(v).expect("persona weights are positive");
        Self {
            sources: personas.iter().map(|p| w(&p.sources)).collect(),
            clicks: personas.iter().map(|p| w(&p.clicks)).collect(),
            social: personas.iter().map(|p| w(&p.social)).collect(),
            personas,
            user_persona,
            rng,
            malformed_ratio: malformed_ratio.clamp(0.0, 1.0),
            seq: 0,
            skew_ms: 2_000,
        }
    }

    pub fn personas(&self) -> &[Persona] {
        &self.personas
    }

    pub(crate) fn user_name(i: usize) -> String {
        format!("user-{i}")
    }

    /// Ground truth: the persona index of a user id this generator made.
    pub fn persona_of(&self, user: &str) -> Option<usize> {
        let i: usize = user.strip_prefix("user-")?.parse().ok()?;
        self.user_persona.get(i).copied()
    }

    fn lognormal(&mut self, median: f64, sigma: f64) -> f64 {
        // Box-Muller from two uniforms; exp(N(ln median, sigma)).
        let u1: f64 = self.rng.random::<f64>().max(1e-12);
        let u2: f64 = self.rng.random();
        let n = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (median.ln() + sigma * n).exp()
    }

    fn category(&mut self, p: usize) -> &'static str {
        if self.rng.random::<f64>() < 0.8 {
            CATEGORIES[self.personas[p].categories[self.rng.random_range(0..2)]]
        } else {
            CATEGORIES[self.rng.random_range(0..CATEGORIES.len())]
        }
    }

    #[cfg(feature = "bench")]
    /// Stamps events up to `skew_ms` before the time given (default 2 s; 0: exactly then).
    pub(crate) fn set_skew(&mut self, skew_ms: i64) {
        self.skew_ms = skew_ms;
    }

    /// The next valid event, stamped a little before `now_ms` (up to 2 s by default, so some
    /// arrive out of order, as they do from real producers).
    pub fn next_event(&mut self, now_ms: i64) -> Event {
        self.seq += 1;
        let u = self.rng.random_range(0..self.user_persona.len());
        let p = self.user_persona[u];
        let user_id = Self::user_name(u);
        let event_id = format!("ev-{}", self.seq);
        let event_time = if self.skew_ms > 0 {
            now_ms - self.rng.random_range(0..self.skew_ms)
        } else {
            now_ms
        };
        let persona = self.personas[p].clone();
        match self.sources[p].sample(&mut self.rng) {
            0 => {
                let kind = [
                    ClickKind::View,
                    ClickKind::Search,
                    ClickKind::AddToCart,
                    ClickKind::RemoveFromCart,
                    ClickKind::CheckoutStart,
                ][self.clicks[p].sample(&mut self.rng)];
                let category = self.category(p).to_owned();
                Event::Click(ClickEvent {
                    event_id,
                    user_id,
                    event_time,
                    session_id: format!("s-{u}-{}", event_time / 1_800_000),
                    kind,
                    product_id: format!("{category}-{}", self.rng.random_range(0..500)),
                    category,
                    price: (self.lognormal(persona.price, 0.4) * 100.0).round() / 100.0,
                    dwell_ms: (self.lognormal(persona.dwell_s, 0.5) * 1000.0) as i64,
                    search_text: (kind == ClickKind::Search).then(|| "gift ideas".to_owned()),
                    embedding: None,
                })
            }
            1 => {
                let cancelled = self.rng.random::<f64>() < persona.cancel;
                let total = (self.lognormal(persona.order_total, 0.35) * 100.0).round() / 100.0;
                let n = self.rng.random_range(1..=3);
                let items = (0..n)
                    .map(|_| {
                        let category = self.category(p).to_owned();
                        LineItem {
                            product_id: format!("{category}-{}", self.rng.random_range(0..500)),
                            category,
                            quantity: 1,
                            unit_price: total / f64::from(n),
                            description: None,
                        }
                    })
                    .collect();
                Event::Purchase(PurchaseEvent {
                    event_id,
                    user_id,
                    event_time,
                    order_id: format!("o-{}", self.seq),
                    status: if cancelled {
                        OrderStatus::Refunded
                    } else {
                        OrderStatus::Placed
                    },
                    items,
                    total,
                    currency: "GBP".into(),
                })
            }
            _ => {
                let action = [
                    SocialAction::Like,
                    SocialAction::Share,
                    SocialAction::Review,
                    SocialAction::Comment,
                    SocialAction::Follow,
                ][self.social[p].sample(&mut self.rng)];
                let rating = (action == SocialAction::Review)
                    .then(|| self.rng.random_range(persona.ratings.0..=persona.ratings.1));
                Event::Social(SocialEvent {
                    event_id,
                    user_id,
                    event_time,
                    action,
                    target_product: None,
                    target_category: Some(self.category(p).to_owned()),
                    rating,
                    text: rating.map(|r| if r >= 4 { "love it" } else { "disappointed" }.into()),
                    embedding: None,
                })
            }
        }
    }

    /// The next record in the topic's wire format; malformed with probability `malformed_ratio`.
    pub fn next_record(&mut self, now_ms: i64, cfg: &DecodeConfig) -> Record {
        let event = self.next_event(now_ms);
        let source = event.source();
        let key = event.user_id().to_owned();
        let format = cfg.formats.get(source);
        let id = cfg.schema_ids.get(source);
        if self.rng.random::<f64>() >= self.malformed_ratio {
            return Record {
                source,
                key,
                payload: encode_event(&event, format, id),
                event: Some(event),
                expected_error: None,
            };
        }
        let (payload, code) = self.malform(event, format, id);
        Record {
            source,
            key,
            payload,
            event: None,
            expected_error: Some(code),
        }
    }

    fn malform(
        &mut self,
        mut event: Event,
        format: WireFormat,
        id: u32,
    ) -> (Vec<u8>, &'static str) {
        let encode = |e: &Event| encode_event(e, format, id);
        match self.rng.random_range(0..6) {
            0 => {
                let mut bytes: Vec<u8> = (0..self.rng.random_range(1..64))
                    .map(|_| self.rng.random())
                    .collect();
                bytes[0] = 0xFF;
                let code = match format {
                    WireFormat::Avro => "bad_magic",
                    WireFormat::Json => "invalid_json",
                };
                (bytes, code)
            }
            1 => {
                let bytes = encode(&event);
                let code = match format {
                    WireFormat::Avro => "invalid_avro",
                    WireFormat::Json => "invalid_json",
                };
                (bytes[..bytes.len() / 2].to_vec(), code)
            }
            2 => {
                match &mut event {
                    Event::Click(e) => e.user_id.clear(),
                    Event::Purchase(e) => e.user_id.clear(),
                    Event::Social(e) => e.user_id.clear(),
                }
                (encode(&event), "empty_user_id")
            }
            3 => {
                let t = event.event_time() + 86_400_000;
                match &mut event {
                    Event::Click(e) => e.event_time = t,
                    Event::Purchase(e) => e.event_time = t,
                    Event::Social(e) => e.event_time = t,
                }
                (encode(&event), "event_time_out_of_range")
            }
            4 if format == WireFormat::Avro => (
                encode_event(&event, format, id.wrapping_add(100)),
                "unknown_schema_id",
            ),
            _ => match &mut event {
                Event::Click(e) => {
                    e.price = -e.price - 1.0;
                    (encode(&event), "negative_value")
                }
                Event::Purchase(e) => {
                    e.status = OrderStatus::Placed;
                    e.items[0].quantity = 0;
                    (encode(&event), "bad_quantity")
                }
                Event::Social(e) => {
                    e.action = SocialAction::Review;
                    e.rating = Some(9);
                    (encode(&event), "bad_rating")
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Decoder;

    #[test]
    fn malformed_records_get_the_expected_codes_and_valid_ones_decode() {
        for format in [WireFormat::Avro, WireFormat::Json] {
            let mut cfg = DecodeConfig::default();
            cfg.formats.clickstream = format;
            cfg.formats.purchases = format;
            cfg.formats.social = format;
            let decoder = Decoder::new(cfg.clone());
            let mut g = Generator::new(9, 50, 0.3);
            let now = 1_700_000_000_000;
            let (mut bad, mut good) = (0, 0);
            for _ in 0..2_000 {
                let r = g.next_record(now, &cfg);
                let got = decoder.decode(r.source, &r.payload, Some(now));
                match (r.expected_error, got) {
                    (None, Ok(e)) => {
                        good += 1;
                        assert_eq!(Some(e), r.event);
                    }
                    (Some(code), Err(e)) => {
                        bad += 1;
                        assert_eq!(code, e.code(), "{format:?}");
                    }
                    (want, got) => panic!("{format:?}: expected {want:?}, got {got:?}"),
                }
            }
            assert!(bad > 450 && good > 1_200, "{bad} {good}");
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let cfg = DecodeConfig::default();
        let mut a = Generator::new(1, 100, 0.1);
        let mut b = Generator::new(1, 100, 0.1);
        for _ in 0..100 {
            assert_eq!(
                a.next_record(0, &cfg).payload,
                b.next_record(0, &cfg).payload
            );
        }
        assert!(a.persona_of("user-5").is_some());
        assert_eq!(a.persona_of("someone"), None);
    }
}
