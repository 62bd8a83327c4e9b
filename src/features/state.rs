//! A user's state: event-time decayed aggregates, dedup ring, segment membership, the value
//! label window; how one event updates them.

use super::layout::*;
use super::params::{FeatureParams, DAY_MS};
use super::text::*;
use crate::event::{
    ClickEvent, ClickKind, Event, OrderStatus, PurchaseEvent, SocialAction, SocialEvent,
};
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

/// Days a user who never bought counts as "since last purchase".
pub(super) const NEVER_PURCHASED_DAYS: f64 = 365.0;
/// Event ids remembered per user to ignore re-sent events.
pub const DEDUP_WINDOW: usize = 16;
// Decayed sums at the medium and long half-lives (indices into `UserState::sums`).
pub(super) const ORDERS: usize = 0;
pub(super) const SPEND: usize = 1;
pub(super) const CANCELLED: usize = 2;
pub(super) const ITEMS: usize = 3;
pub(super) const PRICE_QTY: usize = 4;
pub(super) const ENGAGE: usize = 5;
pub(super) const REVIEWS: usize = 6;
pub(super) const RATING_SUM: usize = 7;
pub(super) const RATING_W: usize = 8;
pub(super) const SENT_SUM: usize = 9;
pub(super) const SENT_W: usize = 10;
pub(super) const EMBED_W: usize = 11;
pub(super) const SUMS: usize = 12;

/// Everything segstream keeps about one user.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Reference time of the decayed sums: the latest event time seen (ms).
    pub anchor_ms: i64,
    /// Behaviour counters per half-life: views, searches, cart adds, checkouts, dwell, sessions.
    pub(super) behaviour: [[f64; 6]; HALF_LIVES],
    pub(super) sums: [f64; SUMS],
    pub(super) category: [f64; CATEGORY_BUCKETS],
    pub(super) text: [f64; TEXT_BUCKETS],
    pub(super) embed: [f64; EMBED_DIM],
    /// Latest event time of a placed order (ms).
    pub last_purchase_ms: Option<i64>,
    /// Earliest event time seen (ms).
    pub first_event_ms: i64,
    /// Placed orders ever (not decayed).
    pub lifetime_orders: u64,
    /// The latest sessions (hash of the id, earliest event time seen), to count each session
    /// once, at the weight of its earliest event whatever the arrival order.
    pub(super) recent_sessions: [(u64, i64); 4],
    /// Hashes of the latest event ids (ring), to ignore re-sent events.
    pub(super) recent_ids: [u64; DEDUP_WINDOW],
    pub(super) recent_next: u8,
    /// Exact number of events applied to this state.
    pub events: u64,
    /// Current segment, once assigned.
    pub segment: Option<u32>,
    /// Event time the user entered the current segment, and events since.
    pub segment_since_ms: i64,
    pub events_in_segment: u32,
    /// The segment before the current one and when the user left it (for flapping).
    pub left_segment: Option<(u32, i64)>,
    /// Per-user change counter carried in segment changes.
    pub version: i64,
    /// Latest predicted value (currency units over the value horizon).
    pub predicted_value: f64,
    /// Open value-model window: the features at its start and the net spend since.
    /// Inline, not boxed: nearly every user has a window open (a new one opens at the first
    /// event after one matures), so a box would cost a pointer, an allocation header and one
    /// more cache miss per event. The changelog encoding is the same either way.
    pub label: Option<LabelWindow>,
    /// Propensity and the action last published: not part of the state's serde form, the
    /// changelog writes them after it (format 2), so states written before them restore.
    #[serde(skip)]
    pub signals: Signals,
}

/// What a user's records say beyond the segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Latest P(a purchase within the value horizon).
    pub purchase_probability: f32,
    /// [`action_tag_hash`] of the action of the user's latest published record (0: none).
    pub published_action: u32,
}

/// A stable 32-bit name of an action tag: 0 for no action; never [`UNKNOWN_ACTION`].
pub(crate) fn action_tag_hash(tag: Option<&str>) -> u32 {
    tag.map_or(0, |t| {
        (fnv1a(t.bytes()) as u32).clamp(1, UNKNOWN_ACTION - 1)
    })
}

/// `Signals::published_action` of a state restored from before it was kept: not known.
pub const UNKNOWN_ACTION: u32 = u32::MAX;

/// A delayed label in the making: features at `start_ms`, spend accumulated until the horizon.
///
/// The features are kept as `f16` (a quarter of the memory of `f64`: an open window is a sixth
/// of a user's state even so). They are a training input of the value model only, never part of
/// the features a segment or a prediction is computed from, and three significant digits are
/// far below the noise of a spend label; the value model's quality is unchanged
/// (docs/performance.md). The changelog writes them as `f64`, as before, so its format is
/// unchanged and windows written by earlier versions restore (rounded to `f16`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelWindow {
    pub start_ms: i64,
    #[serde(with = "features_as_f64")]
    pub x: [half::f16; DIM],
    pub spend: f64,
}

impl LabelWindow {
    /// A window opened at `start_ms` with the features `x`.
    pub fn open(start_ms: i64, x: &Vector) -> Self {
        Self {
            start_ms,
            x: to_f16(x),
            spend: 0.0,
        }
    }

    /// The features at the window's start, as the models take them.
    pub fn features(&self) -> Vector {
        let mut v = [0.0; DIM];
        self.x.convert_to_f64_slice(&mut v);
        v
    }
}

impl UserState {
    /// True if an event with this id was applied recently (it is then not applied again).
    pub(crate) fn is_duplicate(&self, event_id: &str) -> bool {
        let h = fnv1a(event_id.bytes()) | 1; // never 0, the empty slot
        self.recent_ids.contains(&h)
    }

    pub(super) fn remember(&mut self, event_id: &str) {
        let h = fnv1a(event_id.bytes()) | 1;
        self.recent_ids[self.recent_next as usize % DEDUP_WINDOW] = h;
        self.recent_next = ((self.recent_next as usize + 1) % DEDUP_WINDOW) as u8;
    }

    /// Folds one validated event into the state.
    pub fn apply(&mut self, event: &Event, p: &FeatureParams) {
        let t = event.event_time();
        let w = self.advance_to(t, p);
        self.first_event_ms = if self.events == 0 {
            t
        } else {
            self.first_event_ms.min(t)
        };
        self.events += 1;
        self.remember(event.event_id());
        match event {
            Event::Click(c) => self.add_click(c, t, w, p),
            Event::Purchase(o) => self.add_purchase(o, t, w),
            Event::Social(s) => self.add_social(s, w, p),
        }
    }

    /// Moves the reference time to `t` if it is later (decaying every sum to it); the weight of
    /// an event at `t` at the reference time, per half-life (1 when it is the newest).
    fn advance_to(&mut self, t: i64, p: &FeatureParams) -> [f64; HALF_LIVES] {
        let mut w = [1.0; HALF_LIVES];
        if self.events == 0 || t >= self.anchor_ms {
            if self.events > 0 {
                self.decay_by(t - self.anchor_ms, p);
            }
            self.anchor_ms = t;
        } else {
            for (h, d) in p.decays.iter().enumerate() {
                w[h] = d.factor(self.anchor_ms - t);
            }
        }
        w
    }

    /// Behaviour counters, the session count, category affinity, search text and embedding.
    fn add_click(&mut self, c: &ClickEvent, t: i64, w: [f64; HALF_LIVES], p: &FeatureParams) {
        let (wm, wl) = (w[1], w[2]);
        let (idx, cat_w) = match c.kind {
            ClickKind::View => (Some(0), 1.0),
            ClickKind::Search => (Some(1), 0.0),
            ClickKind::AddToCart => (Some(2), 2.0),
            ClickKind::RemoveFromCart => (None, 0.0),
            ClickKind::CheckoutStart => (Some(3), 2.0),
        };
        let session = fnv1a(c.session_id.bytes()) | 1;
        // Weight to add to the session count per half-life: the session's first event
        // counts it; an earlier event of a known session moves the count to its time.
        let mut session_w = [0.0; HALF_LIVES];
        match self.recent_sessions.iter_mut().find(|(h, _)| *h == session) {
            None => {
                self.recent_sessions.rotate_right(1);
                self.recent_sessions[0] = (session, t);
                session_w = w;
            }
            Some((_, first)) if t < *first => {
                for (h, d) in p.decays.iter().enumerate() {
                    let at_first = d.factor(self.anchor_ms - *first);
                    session_w[h] = w[h] - at_first;
                }
                *first = t;
            }
            Some(_) => {}
        }
        for h in 0..HALF_LIVES {
            if let Some(i) = idx {
                self.behaviour[h][i] += w[h];
            }
            self.behaviour[h][4] += w[h] * c.dwell_ms as f64 / 60_000.0;
            self.behaviour[h][5] += session_w[h];
        }
        if cat_w > 0.0 && !c.category.is_empty() {
            self.category[category_bucket(&c.category)] += wl * cat_w;
        }
        if let Some(text) = &c.search_text {
            self.add_text(text, wm);
        }
        if let Some(e) = &c.embedding {
            self.add_embedding(e, wm, p);
        }
    }

    /// Orders, spend, items and prices (a cancellation or refund reverses them), category
    /// affinity, and the items' descriptions as text.
    fn add_purchase(&mut self, o: &PurchaseEvent, t: i64, w: [f64; HALF_LIVES]) {
        let (wm, wl) = (w[1], w[2]);
        let qty: f64 = o.items.iter().map(|i| f64::from(i.quantity)).sum();
        let price_qty: f64 = o
            .items
            .iter()
            .map(|i| f64::from(i.quantity) * i.unit_price)
            .sum();
        match o.status {
            OrderStatus::Placed => {
                self.lifetime_orders += 1;
                self.sums[ORDERS] += wl;
                self.sums[SPEND] += wl * o.total;
                self.sums[ITEMS] += wl * qty;
                self.sums[PRICE_QTY] += wl * price_qty;
                self.last_purchase_ms = Some(self.last_purchase_ms.map_or(t, |l| l.max(t)));
                for item in &o.items {
                    self.category[category_bucket(&item.category)] += wl * 3.0;
                }
            }
            OrderStatus::Cancelled | OrderStatus::Refunded => {
                // Reverses the money and the goods; the order itself still happened.
                self.sums[CANCELLED] += wl;
                self.sums[SPEND] -= wl * o.total;
                self.sums[ITEMS] -= wl * qty;
                self.sums[PRICE_QTY] -= wl * price_qty;
            }
        }
        for item in &o.items {
            if let Some(d) = &item.description {
                self.add_text(d, wm * 0.25);
            }
        }
    }

    /// Engagements and reviews, ratings, category affinity, text with its sentiment, embedding.
    fn add_social(&mut self, s: &SocialEvent, w: [f64; HALF_LIVES], p: &FeatureParams) {
        let (wm, wl) = (w[1], w[2]);
        match s.action {
            SocialAction::Review => self.sums[REVIEWS] += wm,
            _ => self.sums[ENGAGE] += wm,
        }
        if let Some(r) = s.rating {
            self.sums[RATING_SUM] += wm * f64::from(r);
            self.sums[RATING_W] += wm;
        }
        if let Some(c) = s.target_category.as_deref().filter(|c| !c.is_empty()) {
            self.category[category_bucket(c)] += wl;
        }
        if let Some(text) = &s.text {
            let mut sentiment = Sentiment::default();
            self.add_text_and(text, wm, |t| sentiment.word(t));
            if let Some(v) = sentiment.score() {
                self.sums[SENT_SUM] += wm * v;
                self.sums[SENT_W] += wm;
            }
        }
        if let Some(e) = &s.embedding {
            self.add_embedding(e, wm, p);
        }
    }

    pub(super) fn add_text(&mut self, text: &str, w: f64) {
        self.add_text_and(text, w, |_| {});
    }

    /// Adds `text`'s tokens to the text buckets at weight `w`, and hands each to `also` (a
    /// review's sentiment: one pass over its tokens, not two).
    pub(super) fn add_text_and(&mut self, text: &str, w: f64, mut also: impl FnMut(&str)) {
        for_each_token(text, |t| {
            self.text[(fnv1a(t.bytes()) % TEXT_BUCKETS as u64) as usize] += w;
            also(t);
        });
    }

    pub(super) fn add_embedding(&mut self, e: &[f32], w: f64, p: &FeatureParams) {
        let s = 1.0 / (EMBED_DIM as f64).sqrt();
        // One pass over the values for all rows; each row's terms are added in column order,
        // from -0.0 as `Iterator::sum` does, so the sums are those of the row-by-row products.
        let mut dots = [-0.0; EMBED_DIM];
        for (c, x) in e.iter().enumerate() {
            let (x, bits) = (f64::from(*x), p.signs(c));
            for (r, dot) in dots.iter_mut().enumerate() {
                *dot += if bits >> r & 1 == 1 { s } else { -s } * x;
            }
        }
        for (out, dot) in self.embed.iter_mut().zip(dots) {
            *out += w * dot;
        }
        self.sums[EMBED_W] += w;
    }

    /// Decays every sum by `dt_ms` of event time, each at its group's half-life (behaviour at
    /// all three, purchases and categories at the long one, social, text and embeddings at the
    /// medium one).
    pub(super) fn decay_by(&mut self, dt_ms: i64, p: &FeatureParams) {
        let f = p.decays.map(|d| d.factor(dt_ms));
        for (h, f) in f.iter().enumerate() {
            self.behaviour[h].iter_mut().for_each(|x| *x *= f);
        }
        let (fm, fl) = (f[1], f[2]);
        for (i, x) in self.sums.iter_mut().enumerate() {
            *x *= if i <= PRICE_QTY { fl } else { fm };
        }
        self.category.iter_mut().for_each(|x| *x *= fl);
        self.text.iter_mut().for_each(|x| *x *= fm);
        self.embed.iter_mut().for_each(|x| *x *= fm);
    }

    /// The user's own recent net spend rate at `t` (not earlier than the latest event) times
    /// `horizon_ms`: the cold-start value, before the value model has learnt. The rate is the
    /// long-decayed net spend read as a rate per day, as the behaviour rates are: a steady
    /// buyer's true rate, and for a newcomer a rate as if they had been watched for the whole
    /// decay window, which shrinks one first purchase (to ln 2 · horizon / half-life of it)
    /// instead of extrapolating a few days of tenure.
    pub(crate) fn recent_spend_over(&self, t: i64, horizon_ms: i64, p: &FeatureParams) -> f64 {
        self.long_rate_over(SPEND, t, horizon_ms, p)
    }

    /// `sums[i]` (a long-decayed sum) decayed to `t` (not earlier than the latest event), read
    /// as a rate per day, times `horizon_ms`; 0 if that is not finite.
    pub(super) fn long_rate_over(
        &self,
        i: usize,
        t: i64,
        horizon_ms: i64,
        p: &FeatureParams,
    ) -> f64 {
        let d = &p.decays[HALF_LIVES - 1];
        let t = t.max(self.anchor_ms);
        let sum = self.sums[i].max(0.0) * d.factor(t - self.anchor_ms);
        let over = d.per_day(sum) * horizon_ms as f64 / DAY_MS;
        if over.is_finite() {
            over
        } else {
            0.0
        }
    }

    /// The cold-start propensity: P(at least one order within `horizon_ms` of `t`) if the
    /// user keeps ordering at their long-decayed order rate (read as [`Self::recent_spend_over`]
    /// reads spend), orders arriving as a Poisson process: `1 − exp(−rate · horizon)`.
    pub(crate) fn recent_purchase_probability(
        &self,
        t: i64,
        horizon_ms: i64,
        p: &FeatureParams,
    ) -> f64 {
        1.0 - (-self.long_rate_over(ORDERS, t, horizon_ms, p)).exp()
    }

    /// Net spend of a purchase event (negative for cancellations and refunds).
    pub(crate) fn net_spend(event: &Event) -> f64 {
        match event {
            Event::Purchase(o) if o.status == OrderStatus::Placed => o.total,
            Event::Purchase(o) => -o.total,
            _ => 0.0,
        }
    }
}

/// `x` rounded to `f16`. As a slice: `half` then checks for the CPU's conversion instructions
/// once, not once per value (that check was most of the cost of converting value by value).
pub(super) fn to_f16(x: &[f64]) -> [half::f16; DIM] {
    let mut out = [half::f16::ZERO; DIM];
    out.convert_from_f64_slice(x);
    out
}

pub(super) mod features_as_f64 {
    use super::DIM;
    use half::f16;
    use serde::{Deserialize, Deserializer, Serializer};
    pub(crate) fn serialize<S: Serializer>(v: &[f16; DIM], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.to_f64()))
    }
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[f16; DIM], D::Error> {
        let v = Vec::<f64>::deserialize(d)?;
        if v.len() != DIM {
            return Err(serde::de::Error::invalid_length(
                v.len(),
                &"the layout's dimension",
            ));
        }
        Ok(super::to_f16(&v))
    }
}
