//! Per-user rolling features in event time, and the fixed-length vector the models see.
//!
//! Every aggregate is an exponentially decayed sum `S(T) = Σ w_i · 2^(-(T - t_i) / half_life)`
//! held at a reference time `T` = the latest event time seen for the user. An event at `t >= T`
//! first decays the state to `t`; an event at `t < T` (out of order) is added already decayed to
//! `T`. Both give the same sums, so the order of arrival does not change the result (up to
//! floating-point rounding). Pure: no clock, no I/O.

use crate::event::{ClickKind, Event, OrderStatus, SocialAction};
use serde::Serialize;

/// Number of hashed category-affinity buckets.
pub const CATEGORY_BUCKETS: usize = 8;

/// Version of the vector layout below; bump it when names, order or formulas change.
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the vector's components, in order. Units and formulas are in ARCHITECTURE.md.
pub const FEATURE_NAMES: [&str; DIM] = [
    "views",
    "searches",
    "cart_adds",
    "checkouts",
    "dwell_minutes",
    "orders",
    "spend",
    "avg_order_value",
    "cancellations",
    "days_since_purchase",
    "social_engagements",
    "reviews",
    "mean_rating",
    "category_0",
    "category_1",
    "category_2",
    "category_3",
    "category_4",
    "category_5",
    "category_6",
    "category_7",
];

/// Length of the feature vector.
pub const DIM: usize = 13 + CATEGORY_BUCKETS;

/// Days a user who never bought counts as "since last purchase".
const NEVER_PURCHASED_DAYS: f64 = 365.0;
const DAY_MS: f64 = 86_400_000.0;

// Indices of the decayed sums.
const VIEWS: usize = 0;
const SEARCHES: usize = 1;
const CART_ADDS: usize = 2;
const CHECKOUTS: usize = 3;
const DWELL_MIN: usize = 4;
const ORDERS: usize = 5;
const SPEND: usize = 6;
const CANCELLATIONS: usize = 7;
const SOCIAL: usize = 8;
const REVIEWS: usize = 9;
const RATING_SUM: usize = 10;
const RATING_COUNT: usize = 11;
const SUMS: usize = 12;

/// A feature vector.
pub type Vector = [f64; DIM];

/// Category-affinity weight of one interaction, by how much intent it shows.
const W_VIEW: f64 = 1.0;
const W_CART: f64 = 2.0;
const W_PURCHASE: f64 = 3.0;
const W_SOCIAL: f64 = 1.0;

/// Decay of the aggregates: `rate_per_ms = ln 2 / half_life`.
#[derive(Clone, Copy, Debug)]
pub struct Decay {
    rate_per_ms: f64,
}

impl Decay {
    pub fn from_half_life_ms(half_life_ms: f64) -> Self {
        Self {
            rate_per_ms: std::f64::consts::LN_2 / half_life_ms,
        }
    }

    /// Factor by which a sum shrinks over `dt_ms >= 0`: `2^(-dt / half_life)`, in (0, 1].
    pub fn factor(&self, dt_ms: i64) -> f64 {
        (-(dt_ms.max(0) as f64) * self.rate_per_ms).exp()
    }
}

/// Everything segstream keeps about one user.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UserState {
    /// Reference time of the decayed sums: the latest event time seen (ms).
    pub anchor_ms: i64,
    sums: [f64; SUMS],
    category: [f64; CATEGORY_BUCKETS],
    /// Latest event time of a placed order (ms).
    pub last_purchase_ms: Option<i64>,
    /// Exact number of events applied to this state.
    pub events: u64,
    /// Current segment, once assigned.
    pub segment: Option<u32>,
    /// Per-user change counter carried in segment changes.
    pub version: i64,
    /// Latest predicted value (currency units).
    pub predicted_value: f64,
}

/// Stable bucket of a category name: FNV-1a (64 bit) of its lowercase bytes, modulo the bucket
/// count. Stable across builds and platforms, unlike `std`'s hasher.
pub fn category_bucket(category: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in category.trim().bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % CATEGORY_BUCKETS as u64) as usize
}

impl UserState {
    /// Folds one validated event into the state.
    pub fn apply(&mut self, event: &Event, decay: Decay) {
        let t = event.event_time();
        // Weight of this event at the reference time (1 when it is the newest).
        let w = if self.events == 0 || t >= self.anchor_ms {
            if self.events > 0 {
                let f = decay.factor(t - self.anchor_ms);
                self.sums.iter_mut().for_each(|s| *s *= f);
                self.category.iter_mut().for_each(|s| *s *= f);
            }
            self.anchor_ms = t;
            1.0
        } else {
            decay.factor(self.anchor_ms - t)
        };
        self.events += 1;
        match event {
            Event::Click(c) => {
                let (idx, cat_w) = match c.kind {
                    ClickKind::View => (Some(VIEWS), W_VIEW),
                    ClickKind::Search => (Some(SEARCHES), 0.0),
                    ClickKind::AddToCart => (Some(CART_ADDS), W_CART),
                    ClickKind::RemoveFromCart => (None, 0.0),
                    ClickKind::CheckoutStart => (Some(CHECKOUTS), W_CART),
                };
                if let Some(i) = idx {
                    self.sums[i] += w;
                }
                self.sums[DWELL_MIN] += w * c.dwell_ms as f64 / 60_000.0;
                if cat_w > 0.0 && !c.category.is_empty() {
                    self.category[category_bucket(&c.category)] += w * cat_w;
                }
            }
            Event::Purchase(p) => match p.status {
                OrderStatus::Placed => {
                    self.sums[ORDERS] += w;
                    self.sums[SPEND] += w * p.total;
                    self.last_purchase_ms = Some(self.last_purchase_ms.map_or(t, |l| l.max(t)));
                    for item in &p.items {
                        self.category[category_bucket(&item.category)] += w * W_PURCHASE;
                    }
                }
                OrderStatus::Cancelled | OrderStatus::Refunded => {
                    // Reverses the money; the order still happened, so ORDERS is kept.
                    self.sums[CANCELLATIONS] += w;
                    self.sums[SPEND] -= w * p.total;
                }
            },
            Event::Social(s) => {
                match s.action {
                    SocialAction::Review => self.sums[REVIEWS] += w,
                    _ => self.sums[SOCIAL] += w,
                }
                if let Some(r) = s.rating {
                    self.sums[RATING_SUM] += w * f64::from(r);
                    self.sums[RATING_COUNT] += w;
                }
                if let Some(c) = s.target_category.as_deref().filter(|c| !c.is_empty()) {
                    self.category[category_bucket(c)] += w * W_SOCIAL;
                }
            }
        }
    }

    /// The feature vector as of the user's latest event. Always finite.
    pub fn vector(&self) -> Vector {
        let s = &self.sums;
        let ln = |x: f64| x.max(0.0).ln_1p();
        let mut v = [0.0; DIM];
        v[0] = ln(s[VIEWS]);
        v[1] = ln(s[SEARCHES]);
        v[2] = ln(s[CART_ADDS]);
        v[3] = ln(s[CHECKOUTS]);
        v[4] = ln(s[DWELL_MIN]);
        v[5] = ln(s[ORDERS]);
        v[6] = ln(s[SPEND]);
        v[7] = if s[ORDERS] > 1e-9 {
            ln(s[SPEND] / s[ORDERS])
        } else {
            0.0
        };
        v[8] = ln(s[CANCELLATIONS]);
        v[9] = ln(self.last_purchase_ms.map_or(NEVER_PURCHASED_DAYS, |p| {
            ((self.anchor_ms - p) as f64 / DAY_MS).min(NEVER_PURCHASED_DAYS)
        }));
        v[10] = ln(s[SOCIAL]);
        v[11] = ln(s[REVIEWS]);
        // Centred on the neutral 3 stars, so "no ratings" and "average ratings" coincide.
        v[12] = if s[RATING_COUNT] > 1e-9 {
            s[RATING_SUM] / s[RATING_COUNT] - 3.0
        } else {
            0.0
        };
        let total: f64 = self.category.iter().sum();
        if total > 1e-9 {
            for (i, c) in self.category.iter().enumerate() {
                v[13 + i] = c / total;
            }
        }
        // Inputs are validated finite, but sums of huge amounts can still overflow.
        v.iter_mut().for_each(|x| {
            if !x.is_finite() {
                *x = 0.0
            }
        });
        v
    }

    /// Named feature values, for dumps and the API.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        FEATURE_NAMES.iter().copied().zip(self.vector()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ClickEvent, LineItem, PurchaseEvent, SocialEvent};
    use approx::assert_relative_eq;
    use proptest::prelude::*;

    const H: f64 = 7.0 * DAY_MS;

    fn view(t: i64, cat: &str) -> Event {
        Event::Click(ClickEvent {
            event_id: format!("v{t}"),
            user_id: "u".into(),
            event_time: t,
            session_id: "s".into(),
            kind: ClickKind::View,
            product_id: "p".into(),
            category: cat.into(),
            price: 1.0,
            dwell_ms: 60_000,
            search_text: None,
            embedding: None,
        })
    }

    fn order(t: i64, total: f64, status: OrderStatus) -> Event {
        Event::Purchase(PurchaseEvent {
            event_id: format!("o{t}"),
            user_id: "u".into(),
            event_time: t,
            order_id: "o".into(),
            status,
            items: vec![LineItem {
                product_id: "p".into(),
                category: "home".into(),
                quantity: 1,
                unit_price: total,
                description: None,
            }],
            total,
            currency: "GBP".into(),
        })
    }

    fn review(t: i64, rating: i32) -> Event {
        Event::Social(SocialEvent {
            event_id: format!("r{t}"),
            user_id: "u".into(),
            event_time: t,
            action: SocialAction::Review,
            target_product: None,
            target_category: Some("books".into()),
            rating: Some(rating),
            text: Some("great".into()),
            embedding: None,
        })
    }

    #[test]
    fn a_half_life_halves_the_counts() {
        let d = Decay::from_half_life_ms(H);
        let mut s = UserState::default();
        s.apply(&view(0, "a"), d);
        s.apply(&view(0, "a"), d);
        s.apply(&view(H as i64, "a"), d);
        // 2 views decayed by one half-life, plus 1 fresh view.
        assert_relative_eq!(s.vector()[0], 2.0f64.ln_1p(), epsilon = 1e-12);
        assert_eq!(s.events, 3);
    }

    #[test]
    fn cancellation_reverses_spend_and_counts() {
        let d = Decay::from_half_life_ms(H);
        let mut s = UserState::default();
        s.apply(&order(0, 100.0, OrderStatus::Placed), d);
        s.apply(&order(0, 100.0, OrderStatus::Cancelled), d);
        let v = s.vector();
        assert_relative_eq!(v[6], 0.0, epsilon = 1e-12);
        assert_relative_eq!(v[8], 1.0f64.ln_1p(), epsilon = 1e-12);
        assert_relative_eq!(v[9], 0.0, epsilon = 1e-12);
    }

    #[test]
    fn ratings_average_and_categories_share() {
        let d = Decay::from_half_life_ms(H);
        let mut s = UserState::default();
        s.apply(&review(0, 5), d);
        s.apply(&review(0, 4), d);
        let v = s.vector();
        assert_relative_eq!(v[12], 1.5, epsilon = 1e-12);
        let shares: f64 = v[13..].iter().sum();
        assert_relative_eq!(shares, 1.0, epsilon = 1e-12);
        assert_relative_eq!(v[13 + category_bucket("Books")], 1.0, epsilon = 1e-12);
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        (0i64..60 * DAY_MS as i64, 0u8..3, 0.0f64..1e6, 1i32..=5).prop_map(|(t, k, amount, r)| {
            match k {
                0 => view(t, "cat"),
                1 => order(t, amount, OrderStatus::Placed),
                _ => review(t, r),
            }
        })
    }

    proptest! {
        #[test]
        fn vectors_are_finite(events in proptest::collection::vec(arb_event(), 1..40)) {
            let d = Decay::from_half_life_ms(H);
            let mut s = UserState::default();
            for e in &events {
                s.apply(e, d);
                prop_assert!(s.vector().iter().all(|x| x.is_finite()));
            }
        }

        #[test]
        fn order_of_arrival_does_not_matter(events in proptest::collection::vec(arb_event(), 1..40), seed in any::<u64>()) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let d = Decay::from_half_life_ms(H);
            let mut sorted = events.clone();
            sorted.sort_by_key(|e| e.event_time());
            let mut shuffled = events;
            shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            let (mut a, mut b) = (UserState::default(), UserState::default());
            sorted.iter().for_each(|e| a.apply(e, d));
            shuffled.iter().for_each(|e| b.apply(e, d));
            for (x, y) in a.vector().iter().zip(b.vector()) {
                prop_assert!((x - y).abs() <= 1e-9 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }

        #[test]
        fn decay_is_monotone(dt1 in 0i64..1_000_000_000_000, dt2 in 0i64..1_000_000_000_000) {
            let d = Decay::from_half_life_ms(H);
            let (lo, hi) = (dt1.min(dt2), dt1.max(dt2));
            prop_assert!(d.factor(hi) <= d.factor(lo));
            prop_assert!(d.factor(lo) <= 1.0 && d.factor(hi) >= 0.0);
        }
    }
}
