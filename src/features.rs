//! Per-user rolling features in event time, and the fixed-length vector the models see.
//!
//! Every aggregate is an exponentially decayed sum `S(T) = Σ w_i · 2^(-(T - t_i) / h)` held at a
//! reference time `T` = the latest event time seen for the user. An event at `t >= T` first
//! decays the state to `t`; an event at `t < T` (out of order) is added already decayed to `T`.
//! Both give the same sums, so arrival order within the allowed lateness does not change the
//! result (up to floating-point rounding). Pure: no clock, no I/O. Names, formulas and units of
//! every component are in ARCHITECTURE.md.

use crate::event::{ClickKind, Event, OrderStatus, SocialAction};
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};
use wide::f64x4;

/// Number of half-lives the behaviour counters are kept at.
pub const HALF_LIVES: usize = 3;
/// Hashed category-affinity buckets.
pub const CATEGORY_BUCKETS: usize = 8;
/// Hashed bag-of-words buckets for review, comment and search text.
pub const TEXT_BUCKETS: usize = 8;
/// Dimension embeddings are projected to.
pub const EMBED_DIM: usize = 4;

/// Version of the vector layout; a saved model with another layout is refused.
pub const LAYOUT_VERSION: u32 = 3;

/// Length of the feature vector.
pub const DIM: usize = 6 * HALF_LIVES + 8 + CATEGORY_BUCKETS + 4 + TEXT_BUCKETS + EMBED_DIM;

/// A feature vector.
pub type Vector = [f64; DIM];

/// Feature groups, each with a configurable weight in the models' distance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Behaviour,
    Purchases,
    Category,
    Social,
    Text,
    Embedding,
}

const BEHAVIOUR: [&str; 6] = [
    "views",
    "searches",
    "cart_adds",
    "checkouts",
    "dwell_minutes",
    "sessions",
];
const SUFFIX: [&str; HALF_LIVES] = ["short", "medium", "long"];

/// Start of each block in the vector.
const B_PURCHASE: usize = 6 * HALF_LIVES;
const B_CATEGORY: usize = B_PURCHASE + 8;
const B_SOCIAL: usize = B_CATEGORY + CATEGORY_BUCKETS;
const B_TEXT: usize = B_SOCIAL + 4;
const B_EMBED: usize = B_TEXT + TEXT_BUCKETS;

/// The components the vector log-scales, `ln(1 + x)` of `x ≥ 0`: the behaviour rates, the
/// purchase block's days, counts and amounts (not its cancelled share), and the social counts.
const LOG_SCALED: [usize; B_PURCHASE + 9] = {
    const PURCHASE: [usize; 7] = [0, 1, 2, 3, 4, 6, 7];
    let mut idx = [0; B_PURCHASE + 9];
    let mut i = 0;
    while i < idx.len() {
        idx[i] = if i < B_PURCHASE {
            i
        } else if i < B_PURCHASE + PURCHASE.len() {
            B_PURCHASE + PURCHASE[i - B_PURCHASE]
        } else {
            B_SOCIAL + i - B_PURCHASE - PURCHASE.len()
        };
        i += 1;
    }
    idx
};

/// Name of component `i` (e.g. `views_per_day_short`, `monetary`, `category_3`).
pub fn feature_name(i: usize) -> &'static str {
    &FEATURE_NAMES[i]
}

/// Index of the feature called `name`.
pub fn feature_index(name: &str) -> Option<usize> {
    FEATURE_NAMES.iter().position(|n| n == name)
}

/// First component of the category-affinity block.
pub const CATEGORY_START: usize = B_CATEGORY;

static FEATURE_NAMES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..DIM).map(build_name).collect());

fn build_name(i: usize) -> String {
    match i {
        i if i < B_PURCHASE => format!("{}_per_day_{}", BEHAVIOUR[i % 6], SUFFIX[i / 6]),
        i if i < B_CATEGORY => [
            "recency_days",
            "frequency",
            "monetary",
            "basket_size",
            "avg_unit_price",
            "cancel_rate",
            "lifetime_orders",
            "tenure_days",
        ][i - B_PURCHASE]
            .to_owned(),
        i if i < B_SOCIAL => format!("category_{}", i - B_CATEGORY),
        i if i < B_TEXT => {
            ["engagements", "reviews", "mean_rating", "sentiment"][i - B_SOCIAL].to_owned()
        }
        i if i < B_EMBED => format!("text_{}", i - B_TEXT),
        i => format!("embedding_{}", i - B_EMBED),
    }
}

/// The group of component `i`.
pub fn group_of(i: usize) -> Group {
    match i {
        i if i < B_PURCHASE => Group::Behaviour,
        i if i < B_CATEGORY => Group::Purchases,
        i if i < B_SOCIAL => Group::Category,
        i if i < B_TEXT => Group::Social,
        i if i < B_EMBED => Group::Text,
        _ => Group::Embedding,
    }
}

/// Days a user who never bought counts as "since last purchase".
const NEVER_PURCHASED_DAYS: f64 = 365.0;
const DAY_MS: f64 = 86_400_000.0;
/// Event ids remembered per user to ignore re-sent events.
pub const DEDUP_WINDOW: usize = 16;

/// Decay of one half-life: `factor(dt) = 2^(-dt / half_life)`.
#[derive(Clone, Copy, Debug)]
pub struct Decay {
    rate_per_ms: f64,
    half_life_days: f64,
}

impl Decay {
    pub fn from_half_life_ms(half_life_ms: f64) -> Self {
        Self {
            rate_per_ms: std::f64::consts::LN_2 / half_life_ms,
            half_life_days: half_life_ms / DAY_MS,
        }
    }

    /// Factor by which a sum shrinks over `dt_ms >= 0`, in (0, 1].
    pub fn factor(&self, dt_ms: i64) -> f64 {
        (-(dt_ms.max(0) as f64) * self.rate_per_ms).exp()
    }

    /// A decayed count of events arriving at a steady `r` per day tends to `r · h / ln 2`;
    /// this converts it back to a rate per day.
    fn per_day(&self, decayed_count: f64) -> f64 {
        decayed_count * std::f64::consts::LN_2 / self.half_life_days
    }
}

/// How events are folded into states; built once from the configuration.
#[derive(Clone, Debug)]
pub struct FeatureParams {
    /// Short, medium and long half-lives; purchases use the long one, social and text the medium.
    pub decays: [Decay; HALF_LIVES],
    /// Seed of the embedding projection.
    pub seed: u64,
    /// The projection's signs for the first [`TABULATED_COLUMNS`] columns: bit `r` of entry `c`
    /// is set when entry `(r, c)` is positive.
    signs: Box<[u8]>,
}

/// Embedding columns whose projection signs are computed once, not per value: each entry costs
/// a 24-byte FNV-1a hash, four per embedding value, which made an event with a 32-float
/// embedding cost more than the rest of its features. Longer embeddings are projected too, the
/// columns beyond this hashed as before.
pub const TABULATED_COLUMNS: usize = 1024;

impl FeatureParams {
    pub fn new(half_lives_ms: [f64; HALF_LIVES], seed: u64) -> Self {
        Self {
            decays: half_lives_ms.map(Decay::from_half_life_ms),
            seed,
            signs: (0..TABULATED_COLUMNS)
                .map(|c| column_signs(seed, c))
                .collect(),
        }
    }

    /// Bit `r` set when the projection's entry `(r, col)` is positive.
    fn signs(&self, col: usize) -> u8 {
        match self.signs.get(col) {
            Some(&bits) => bits,
            None => column_signs(self.seed, col),
        }
    }
}

fn column_signs(seed: u64, col: usize) -> u8 {
    (0..EMBED_DIM).fold(0, |bits, row| {
        bits | (u8::from(projection(seed, row, col) > 0.0) << row)
    })
}

// Decayed sums at the medium and long half-lives (indices into `UserState::sums`).
const ORDERS: usize = 0;
const SPEND: usize = 1;
const CANCELLED: usize = 2;
const ITEMS: usize = 3;
const PRICE_QTY: usize = 4;
const ENGAGE: usize = 5;
const REVIEWS: usize = 6;
const RATING_SUM: usize = 7;
const RATING_W: usize = 8;
const SENT_SUM: usize = 9;
const SENT_W: usize = 10;
const EMBED_W: usize = 11;
const SUMS: usize = 12;

/// Everything segstream keeps about one user.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserState {
    /// Reference time of the decayed sums: the latest event time seen (ms).
    pub anchor_ms: i64,
    /// Behaviour counters per half-life: views, searches, cart adds, checkouts, dwell, sessions.
    behaviour: [[f64; 6]; HALF_LIVES],
    sums: [f64; SUMS],
    category: [f64; CATEGORY_BUCKETS],
    text: [f64; TEXT_BUCKETS],
    embed: [f64; EMBED_DIM],
    /// Latest event time of a placed order (ms).
    pub last_purchase_ms: Option<i64>,
    /// Earliest event time seen (ms).
    pub first_event_ms: i64,
    /// Placed orders ever (not decayed).
    pub lifetime_orders: u64,
    /// The latest sessions (hash of the id, earliest event time seen), to count each session
    /// once, at the weight of its earliest event whatever the arrival order.
    recent_sessions: [(u64, i64); 4],
    /// Hashes of the latest event ids (ring), to ignore re-sent events.
    recent_ids: [u64; DEDUP_WINDOW],
    recent_next: u8,
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
pub fn action_tag_hash(tag: Option<&str>) -> u32 {
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

/// Replaces each [`LOG_SCALED`] component `x` of `v` by `ln(1 + max(x, 0))`, four at a time.
fn log_scale(v: &mut Vector) {
    let mut x = [0.0; LOG_SCALED.len().next_multiple_of(4)];
    for (x, &i) in x.iter_mut().zip(&LOG_SCALED) {
        *x = v[i].max(0.0);
    }
    for lanes in x.chunks_exact_mut(4) {
        let four: [f64; 4] = (&*lanes).try_into().expect("chunks of four");
        lanes.copy_from_slice(&ln_1p4(f64x4::from(four)).to_array());
    }
    for (x, &i) in x.iter().zip(&LOG_SCALED) {
        v[i] = *x;
    }
}

/// `ln(1 + x)` for `x ≥ 0` in four lanes: within 2 ulp of `f64::ln_1p` over the whole range
/// (tested), and about 2.5 times faster than calling it per value, which was a sixth of the
/// engine's time per event. `wide`'s vectorised `ln` of `u = 1 + x`, times `x / (u - 1)` to
/// undo the rounding of `1 + x` (Goldberg, "What every computer scientist should know about
/// floating-point arithmetic", 1991, theorem 4); where `u` rounds to 1, `ln(1 + x) = x` to
/// within an ulp.
fn ln_1p4(x: f64x4) -> f64x4 {
    let u = x + f64x4::ONE;
    let d = u - f64x4::ONE;
    let y = u.ln() * (x / d);
    let y = d.simd_eq(f64x4::ZERO).select(x, y);
    u.is_finite().select(y, u)
}

/// `x` rounded to `f16`. As a slice: `half` then checks for the CPU's conversion instructions
/// once, not once per value (that check was most of the cost of converting value by value).
fn to_f16(x: &[f64]) -> [half::f16; DIM] {
    let mut out = [half::f16::ZERO; DIM];
    out.convert_from_f64_slice(x);
    out
}

mod features_as_f64 {
    use super::DIM;
    use half::f16;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[f16; DIM], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| x.to_f64()))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[f16; DIM], D::Error> {
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

/// FNV-1a (64 bit): a stable hash across builds and platforms, unlike `std`'s hasher.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Stable bucket of a category name (case-insensitive).
pub fn category_bucket(category: &str) -> usize {
    (fnv1a(category.trim().bytes().map(|b| b.to_ascii_lowercase())) % CATEGORY_BUCKETS as u64)
        as usize
}

const POSITIVE: [&str; 24] = [
    "love",
    "loved",
    "great",
    "excellent",
    "good",
    "perfect",
    "amazing",
    "happy",
    "recommend",
    "nice",
    "beautiful",
    "fast",
    "quality",
    "best",
    "lovely",
    "awesome",
    "fantastic",
    "pleased",
    "gorgeous",
    "superb",
    "wonderful",
    "brilliant",
    "works",
    "comfortable",
];
const NEGATIVE: [&str; 24] = [
    "bad",
    "poor",
    "terrible",
    "awful",
    "broken",
    "damaged",
    "disappointed",
    "disappointing",
    "hate",
    "slow",
    "worst",
    "refund",
    "return",
    "returned",
    "faulty",
    "missing",
    "late",
    "wrong",
    "cheap",
    "useless",
    "defective",
    "horrible",
    "waste",
    "flimsy",
];
const NEGATORS: [&str; 5] = ["not", "no", "never", "dont", "isnt"];

/// Calls `f` with each token of `text`: a run of alphanumerics and apostrophes, lowercased,
/// apostrophes removed. An ASCII token of up to 32 bytes (nearly all words) is lowercased on
/// the stack; others go through `str::to_lowercase` (Unicode rules, final sigma included).
/// Allocating two strings per token used to make a review's words most of its event's cost.
pub fn for_each_token(text: &str, mut f: impl FnMut(&str)) {
    let mut buf = [0u8; 32];
    for t in text.split(|c: char| !c.is_alphanumeric() && c != '\'') {
        if t.is_empty() {
            continue;
        }
        if t.is_ascii() && t.len() <= buf.len() {
            let mut n = 0;
            for b in t.bytes().filter(|&b| b != b'\'') {
                buf[n] = b.to_ascii_lowercase();
                n += 1;
            }
            // ASCII bytes are always UTF-8.
            f(std::str::from_utf8(&buf[..n]).unwrap_or_default());
        } else {
            f(&t.replace('\'', "").to_lowercase());
        }
    }
}

/// Lexicon sentiment of a text in [-1, 1], or `None` if it has no opinion words. A negator
/// ("not", "never", ...) flips the next opinion word.
pub fn sentiment(text: &str) -> Option<f64> {
    let mut s = Sentiment::default();
    for_each_token(text, |t| s.word(t));
    s.score()
}

/// [`sentiment`] fed one token at a time, so that a text's buckets and its sentiment take
/// one pass over its tokens.
#[derive(Default)]
struct Sentiment {
    pos: f64,
    neg: f64,
    flip: bool,
}

impl Sentiment {
    fn word(&mut self, t: &str) {
        let s = if POSITIVE.contains(&t) {
            1.0
        } else if NEGATIVE.contains(&t) {
            -1.0
        } else {
            self.flip = NEGATORS.contains(&t);
            return;
        };
        let positive = (s > 0.0) != self.flip;
        self.flip = false;
        if positive {
            self.pos += 1.0
        } else {
            self.neg += 1.0
        }
    }

    fn score(&self) -> Option<f64> {
        let (pos, neg) = (self.pos, self.neg);
        (pos + neg > 0.0).then(|| (pos - neg) / (pos + neg))
    }
}

/// Entry `(row, col)` of the seeded random projection: ±1/√EMBED_DIM (Achlioptas).
fn projection(seed: u64, row: usize, col: usize) -> f64 {
    let h = fnv1a(
        seed.to_le_bytes()
            .into_iter()
            .chain((row as u64).to_le_bytes())
            .chain((col as u64).to_le_bytes()),
    );
    let s = 1.0 / (EMBED_DIM as f64).sqrt();
    if h >> 63 == 1 {
        s
    } else {
        -s
    }
}

impl UserState {
    /// True if an event with this id was applied recently (it is then not applied again).
    pub fn is_duplicate(&self, event_id: &str) -> bool {
        let h = fnv1a(event_id.bytes()) | 1; // never 0, the empty slot
        self.recent_ids.contains(&h)
    }

    fn remember(&mut self, event_id: &str) {
        let h = fnv1a(event_id.bytes()) | 1;
        self.recent_ids[self.recent_next as usize % DEDUP_WINDOW] = h;
        self.recent_next = ((self.recent_next as usize + 1) % DEDUP_WINDOW) as u8;
    }

    /// Folds one validated event into the state.
    pub fn apply(&mut self, event: &Event, p: &FeatureParams) {
        let t = event.event_time();
        // Weight of this event at the reference time per half-life (1 when it is the newest).
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
        let (wm, wl) = (w[1], w[2]);
        self.first_event_ms = if self.events == 0 {
            t
        } else {
            self.first_event_ms.min(t)
        };
        self.events += 1;
        self.remember(event.event_id());
        match event {
            Event::Click(c) => {
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
            Event::Purchase(o) => {
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
            Event::Social(s) => {
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
        }
    }

    fn add_text(&mut self, text: &str, w: f64) {
        self.add_text_and(text, w, |_| {});
    }

    /// Adds `text`'s tokens to the text buckets at weight `w`, and hands each to `also` (a
    /// review's sentiment: one pass over its tokens, not two).
    fn add_text_and(&mut self, text: &str, w: f64, mut also: impl FnMut(&str)) {
        for_each_token(text, |t| {
            self.text[(fnv1a(t.bytes()) % TEXT_BUCKETS as u64) as usize] += w;
            also(t);
        });
    }

    fn add_embedding(&mut self, e: &[f32], w: f64, p: &FeatureParams) {
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

    /// The feature vector as of the user's latest event. Always finite.
    pub fn vector(&self, p: &FeatureParams) -> Vector {
        let ratio = |a: f64, b: f64| if b > 1e-9 { a / b } else { 0.0 };
        let mut v = [0.0; DIM];
        // The [`LOG_SCALED`] components get their inputs first, and are scaled together below.
        for (h, d) in p.decays.iter().enumerate() {
            for i in 0..6 {
                v[h * 6 + i] = d.per_day(self.behaviour[h][i]);
            }
        }
        let s = &self.sums;
        v[B_PURCHASE] = self.last_purchase_ms.map_or(NEVER_PURCHASED_DAYS, |p| {
            ((self.anchor_ms - p) as f64 / DAY_MS).min(NEVER_PURCHASED_DAYS)
        });
        v[B_PURCHASE + 1] = s[ORDERS];
        v[B_PURCHASE + 2] = s[SPEND];
        v[B_PURCHASE + 3] = ratio(s[ITEMS], s[ORDERS]);
        v[B_PURCHASE + 4] = ratio(s[PRICE_QTY], s[ITEMS]);
        v[B_PURCHASE + 6] = self.lifetime_orders as f64;
        v[B_PURCHASE + 7] = (self.anchor_ms - self.first_event_ms) as f64 / DAY_MS;
        v[B_SOCIAL] = s[ENGAGE];
        v[B_SOCIAL + 1] = s[REVIEWS];
        log_scale(&mut v);
        v[B_PURCHASE + 5] = ratio(s[CANCELLED], s[ORDERS]).clamp(0.0, 1.0);
        let total: f64 = self.category.iter().sum();
        for (i, c) in self.category.iter().enumerate() {
            v[B_CATEGORY + i] = ratio(*c, total);
        }
        // Centred on the neutral 3 stars, so "no ratings" and "average ratings" coincide.
        v[B_SOCIAL + 2] = if s[RATING_W] > 1e-9 {
            s[RATING_SUM] / s[RATING_W] - 3.0
        } else {
            0.0
        };
        v[B_SOCIAL + 3] = ratio(s[SENT_SUM], s[SENT_W]);
        let words: f64 = self.text.iter().sum();
        for (i, c) in self.text.iter().enumerate() {
            v[B_TEXT + i] = ratio(*c, words);
        }
        for (i, e) in self.embed.iter().enumerate() {
            v[B_EMBED + i] = ratio(*e, s[EMBED_W]);
        }
        // Inputs are validated finite, but sums of huge amounts can still overflow.
        v.iter_mut().for_each(|x| {
            if !x.is_finite() {
                *x = 0.0
            }
        });
        v
    }

    /// The feature vector as of time `t` (not earlier than the latest event): every sum decayed
    /// to `t`, so an idle user's rates fall as time passes.
    pub fn vector_at(&self, t: i64, p: &FeatureParams) -> Vector {
        if self.events == 0 || t <= self.anchor_ms {
            return self.vector(p);
        }
        let dt = t - self.anchor_ms;
        let mut s = UserState {
            anchor_ms: t,
            behaviour: self.behaviour,
            sums: self.sums,
            category: self.category,
            text: self.text,
            embed: self.embed,
            last_purchase_ms: self.last_purchase_ms,
            first_event_ms: self.first_event_ms,
            lifetime_orders: self.lifetime_orders,
            events: self.events,
            ..UserState::default()
        };
        s.decay_by(dt, p);
        s.vector(p)
    }

    /// Decays every sum by `dt_ms` of event time, each at its group's half-life (behaviour at
    /// all three, purchases and categories at the long one, social, text and embeddings at the
    /// medium one).
    fn decay_by(&mut self, dt_ms: i64, p: &FeatureParams) {
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
    pub fn recent_spend_over(&self, t: i64, horizon_ms: i64, p: &FeatureParams) -> f64 {
        self.long_rate_over(SPEND, t, horizon_ms, p)
    }

    /// `sums[i]` (a long-decayed sum) decayed to `t` (not earlier than the latest event), read
    /// as a rate per day, times `horizon_ms`; 0 if that is not finite.
    fn long_rate_over(&self, i: usize, t: i64, horizon_ms: i64, p: &FeatureParams) -> f64 {
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
    pub fn recent_purchase_probability(&self, t: i64, horizon_ms: i64, p: &FeatureParams) -> f64 {
        1.0 - (-self.long_rate_over(ORDERS, t, horizon_ms, p)).exp()
    }

    /// Net spend of a purchase event (negative for cancellations and refunds).
    pub fn net_spend(event: &Event) -> f64 {
        match event {
            Event::Purchase(o) if o.status == OrderStatus::Placed => o.total,
            Event::Purchase(o) => -o.total,
            _ => 0.0,
        }
    }

    /// Named feature values, for dumps and the API.
    pub fn named(&self, p: &FeatureParams) -> Vec<(String, f64)> {
        self.named_at(self.anchor_ms, p)
    }

    /// Named feature values as of `t` (see [`UserState::vector_at`]).
    pub fn named_at(&self, t: i64, p: &FeatureParams) -> Vec<(String, f64)> {
        self.vector_at(t, p)
            .into_iter()
            .enumerate()
            .map(|(i, x)| (feature_name(i).to_owned(), x))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ClickEvent, LineItem, PurchaseEvent, SocialEvent};
    use approx::assert_relative_eq;
    use proptest::prelude::*;

    const DAY: i64 = 86_400_000;

    /// `ln_1p4(x)` against `f64::ln_1p`, lane by lane: within 2 ulp, and infinite for an
    /// infinite input (the vector then zeroes it, as it did before).
    fn assert_ln_1p4_is_ln_1p(lanes: [f64; 4]) {
        for (x, y) in lanes.iter().zip(ln_1p4(f64x4::from(lanes)).to_array()) {
            let want = x.ln_1p();
            if want.is_finite() {
                let tolerance = 2.0 * f64::EPSILON * want.abs();
                assert!(
                    (y - want).abs() <= tolerance,
                    "ln(1 + {x:e}) = {y:e}, not {want:e}"
                );
            } else {
                assert_eq!(y, want, "ln(1 + {x:e})");
            }
        }
    }

    /// Over the whole range the vector feeds it: zero, subnormals, values that vanish next
    /// to 1, fractions, counts, money, the largest finite value, infinity.
    #[test]
    fn log_scaling_four_at_a_time_is_ln_1p() {
        let mut xs = vec![
            0.0,
            5e-324,
            f64::MIN_POSITIVE,
            1e-17,
            f64::EPSILON,
            f64::MAX,
        ];
        xs.push(f64::INFINITY);
        for e in -320..=308 {
            for m in [1.0, 1.234_567, 3.9, 7.77] {
                xs.push(m * 10f64.powi(e));
            }
        }
        for chunk in xs.chunks(4) {
            let mut lanes = [0.0; 4];
            lanes[..chunk.len()].copy_from_slice(chunk);
            assert_ln_1p4_is_ln_1p(lanes);
        }
    }

    /// The log-scaled components are the rates, counts, amounts and durations; the shares,
    /// the rating and the sentiment are not (they are bounded or signed).
    #[test]
    fn log_scaled_components_are_the_counts_and_amounts() {
        let names: Vec<_> = LOG_SCALED.iter().map(|&i| feature_name(i)).collect();
        let mut want: Vec<_> = (0..B_PURCHASE).map(feature_name).collect();
        want.extend([
            "recency_days",
            "frequency",
            "monetary",
            "basket_size",
            "avg_unit_price",
            "lifetime_orders",
            "tenure_days",
            "engagements",
            "reviews",
        ]);
        assert_eq!(names, want);
        assert!(names[..B_PURCHASE].iter().all(|n| n.contains("_per_day_")));
    }

    /// An open label window keeps its features as `f16` in memory but in the changelog's
    /// format of before (`f64`): records written by earlier versions restore, and new ones
    /// read the same.
    #[test]
    fn label_windows_keep_the_changelog_format() {
        #[derive(Serialize, Deserialize)]
        struct Before {
            start_ms: i64,
            x: Vec<f64>,
            spend: f64,
        }
        let x: Vec<f64> = (0..DIM).map(|i| i as f64 * 0.25 - 3.5).collect();
        let before = postcard::to_stdvec(&Before {
            start_ms: 17,
            x: x.clone(),
            spend: 9.5,
        })
        .unwrap();
        let w: LabelWindow = postcard::from_bytes(&before).unwrap();
        assert_eq!(w.start_ms, 17);
        assert_eq!(w.spend, 9.5);
        assert_eq!(w.features().to_vec(), x);
        assert_eq!(postcard::to_stdvec(&w).unwrap(), before);
        // Values f16 cannot hold exactly come back within its precision (2^-11 relative), and
        // a restored window writes what it holds, so restoring it again changes nothing.
        let odd: Vec<f64> = (0..DIM).map(|i| (i as f64 + 1.0) / 3.0 * 7.1).collect();
        let w: LabelWindow = postcard::from_bytes(
            &postcard::to_stdvec(&Before {
                start_ms: 1,
                x: odd.clone(),
                spend: 0.0,
            })
            .unwrap(),
        )
        .unwrap();
        for (got, want) in w.features().iter().zip(&odd) {
            assert!(
                (got - want).abs() <= want.abs() * 2f64.powi(-11),
                "{got} vs {want}"
            );
        }
        let again: LabelWindow = postcard::from_bytes(&postcard::to_stdvec(&w).unwrap()).unwrap();
        assert_eq!(again, w);
        let short = Before {
            start_ms: 1,
            x: vec![0.0; DIM - 1],
            spend: 0.0,
        };
        assert!(
            postcard::from_bytes::<LabelWindow>(&postcard::to_stdvec(&short).unwrap()).is_err()
        );
    }

    fn params() -> FeatureParams {
        FeatureParams::new([DAY as f64, 7.0 * DAY as f64, 30.0 * DAY as f64], 1)
    }

    fn token_list(text: &str) -> Vec<String> {
        let mut got = Vec::new();
        for_each_token(text, |t| got.push(t.to_owned()));
        got
    }

    fn reference_tokens(text: &str) -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|t| !t.is_empty())
            .map(|t| t.replace('\'', "").to_lowercase())
            .collect()
    }

    /// Tokens are what lowercasing each word with `str::to_lowercase` gives (the way they
    /// were made before they were lowercased on the stack): ASCII, Unicode, apostrophes, words
    /// longer than the stack buffer, Greek final sigma.
    #[test]
    fn tokens_are_the_lowercased_words() {
        let texts = [
            "Don't BUY it -- it's NOT good, 10/10 wouldn't",
            "' '' x'y 'quoted' Ünïcödé straße ΟΔΟΣ ΣΟΦΟΣ İstanbul",
            "a-very-long-hyphenated-but-split Pneumonoultramicroscopicsilicovolcanoconiosis x",
            "exactly32charactersintothisword1 exactly33charactersintothisword12",
            "",
        ];
        for text in texts {
            assert_eq!(token_list(text), reference_tokens(text), "{text:?}");
        }
    }

    /// Projecting with the precomputed signs gives the same bits as hashing every entry, for
    /// embeddings shorter and longer than the table, with zeros of both signs among the values.
    #[test]
    fn tabulated_projection_equals_hashing_each_entry() {
        let p = params();
        let reference = |e: &[f32], w: f64| -> [f64; EMBED_DIM] {
            std::array::from_fn(|r| {
                let dot: f64 = e
                    .iter()
                    .enumerate()
                    .map(|(c, x)| projection(p.seed, r, c) * f64::from(*x))
                    .sum();
                w * dot
            })
        };
        let mut x = 7u64;
        for len in [0, 1, 3, 32, 257, TABULATED_COLUMNS, TABULATED_COLUMNS + 300] {
            let e: Vec<f32> = (0..len)
                .map(|i| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    match i % 7 {
                        0 => 0.0,
                        1 => -0.0,
                        _ => (x >> 40) as f32 / 1e5 - 80.0,
                    }
                })
                .collect();
            let mut state = UserState::default();
            state.add_embedding(&e, 0.75, &p);
            let got = state.embed.map(f64::to_bits);
            let want = reference(&e, 0.75).map(|v| (0.0 + v).to_bits());
            assert_eq!(got, want, "length {len}");
        }
        // All-zero values whose terms are all -0.0 keep the sums' sign as before too.
        let mut state = UserState::default();
        state.add_embedding(&[-0.0; 8], 1.0, &p);
        assert_eq!(
            state.embed.map(f64::to_bits),
            reference(&[-0.0; 8], 1.0).map(|v| (0.0 + v).to_bits())
        );
    }

    fn view(t: i64, cat: &str) -> Event {
        Event::Click(ClickEvent {
            event_id: format!("v{t}"),
            user_id: "u".into(),
            event_time: t,
            // At most four sessions in the 60 days the property tests span: within the ring.
            session_id: format!("s{}", t / (15 * DAY)),
            kind: ClickKind::View,
            product_id: "p".into(),
            category: cat.into(),
            price: 1.0,
            dwell_ms: 60_000,
            search_text: None,
            embedding: Some(vec![1.0, -0.5, 0.25]),
        })
    }

    fn order(t: i64, total: f64, status: OrderStatus) -> Event {
        Event::Purchase(PurchaseEvent {
            event_id: format!("o{t}{status:?}"),
            user_id: "u".into(),
            event_time: t,
            order_id: "o".into(),
            status,
            items: vec![LineItem {
                product_id: "p".into(),
                category: "home".into(),
                quantity: 2,
                unit_price: total / 2.0,
                description: Some("RED MUG".into()),
            }],
            total,
            currency: "GBP".into(),
        })
    }

    fn review(t: i64, rating: i32, text: &str) -> Event {
        Event::Social(SocialEvent {
            event_id: format!("r{t}{text}"),
            user_id: "u".into(),
            event_time: t,
            action: SocialAction::Review,
            target_product: None,
            target_category: Some("books".into()),
            rating: Some(rating),
            text: Some(text.into()),
            embedding: None,
        })
    }

    fn idx(name: &str) -> usize {
        feature_index(name).unwrap()
    }

    #[test]
    fn names_are_unique_and_cover_the_layout() {
        let mut names: Vec<&str> = (0..DIM).map(feature_name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DIM);
        assert_eq!(DIM, 50);
    }

    #[test]
    fn rates_per_day_at_each_half_life() {
        let p = params();
        let mut s = UserState::default();
        // One view a day for 120 days: each half-life's rate tends to 1 per day.
        for d in 0..120 {
            s.apply(&view(d * DAY, "a"), &p);
        }
        let v = s.vector(&p);
        for suffix in ["short", "medium", "long"] {
            let rate = v[idx(&format!("views_per_day_{suffix}"))].exp_m1();
            assert!((0.8..1.6).contains(&rate), "{suffix}: {rate}");
        }
        assert_relative_eq!(v[idx("category_0") + category_bucket("a")], 1.0);
        assert_eq!(s.events, 120);
    }

    /// The cold-start value: a steady buyer's own rate times the horizon; a single purchase,
    /// ln 2 · horizon / half-life of itself; a user who never bought, nothing; an idle one, less.
    #[test]
    fn the_cold_start_value_is_the_users_own_spend_rate_over_the_horizon() {
        let p = params();
        let horizon = 30 * DAY;
        // 10 a week for a year: about 43 over 30 days.
        let mut steady = UserState::default();
        for w in 0..52 {
            steady.apply(&order(w * 7 * DAY, 10.0, OrderStatus::Placed), &p);
        }
        let v = steady.recent_spend_over(51 * 7 * DAY, horizon, &p);
        assert!((35.0..=55.0).contains(&v), "{v}");
        let mut once = UserState::default();
        once.apply(&order(0, 100.0, OrderStatus::Placed), &p);
        let first = once.recent_spend_over(0, horizon, &p);
        assert_relative_eq!(first, 100.0 * std::f64::consts::LN_2, epsilon = 1e-6);
        assert!(once.recent_spend_over(90 * DAY, horizon, &p) < first / 2.0);
        let mut browser = UserState::default();
        browser.apply(&view(0, "a"), &p);
        assert_eq!(browser.recent_spend_over(0, horizon, &p), 0.0);
    }

    /// A user sending 100 events a second (a bot, or an id many people share) decays its sums
    /// by less than a millionth per event. The sums are `f64` so that such steps are not
    /// rounded away: in `f32` (tried, docs/performance.md) this stream's counts come out
    /// 0.7 to 2.9 in 10,000 off, and one event a second for two months 0.4 to 2.8 % off.
    /// Here every rate matches the closed form to 1e-9.
    #[test]
    fn rates_of_a_sustained_fast_stream_are_exact() {
        let p = params();
        let mut s = UserState::default();
        let (n, gap) = (50_000, 10);
        for i in 0..n {
            s.apply(&view(i * gap, "a"), &p);
        }
        let v = s.vector(&p);
        for (h, suffix) in ["short", "medium", "long"].into_iter().enumerate() {
            let d = p.decays[h];
            // Σ_{k<n} f^k with f = e^(-gap·rate) = (1 - f^n) / (1 - f), without cancellation.
            let per_gap = -(gap as f64) * d.rate_per_ms;
            let sum = (n as f64 * per_gap).exp_m1() / per_gap.exp_m1();
            let want = d.per_day(sum).ln_1p();
            let got = v[idx(&format!("views_per_day_{suffix}"))];
            assert_relative_eq!(got, want, max_relative = 1e-9);
            let dwell = v[idx(&format!("dwell_minutes_per_day_{suffix}"))];
            assert_relative_eq!(dwell, want, max_relative = 1e-9);
        }
    }

    #[test]
    fn cancellation_reverses_spend_and_sets_the_rate() {
        let p = params();
        let mut s = UserState::default();
        s.apply(&order(0, 100.0, OrderStatus::Placed), &p);
        s.apply(&order(0, 100.0, OrderStatus::Cancelled), &p);
        let v = s.vector(&p);
        assert_relative_eq!(v[idx("monetary")], 0.0, epsilon = 1e-12);
        assert_relative_eq!(v[idx("cancel_rate")], 1.0, epsilon = 1e-12);
        assert_relative_eq!(v[idx("recency_days")], 0.0, epsilon = 1e-12);
    }

    #[test]
    fn ratings_sentiment_and_text() {
        let p = params();
        let mut s = UserState::default();
        s.apply(&review(0, 5, "Love it, great quality"), &p);
        s.apply(&review(0, 2, "not good, arrived damaged"), &p);
        let v = s.vector(&p);
        assert_relative_eq!(v[idx("mean_rating")], 0.5, epsilon = 1e-12);
        // (+1) and (-1 -1): mean of +1 and -1.
        assert_relative_eq!(v[idx("sentiment")], 0.0, epsilon = 1e-12);
        let words: f64 = (0..TEXT_BUCKETS)
            .map(|i| v[idx(&format!("text_{i}"))])
            .sum();
        assert_relative_eq!(words, 1.0, epsilon = 1e-12);
        assert_eq!(sentiment("never late, superb"), Some(1.0));
        assert_eq!(sentiment("a mug"), None);
    }

    #[test]
    fn duplicates_are_recognised_within_the_window() {
        let p = params();
        let mut s = UserState::default();
        let e = view(5, "a");
        assert!(!s.is_duplicate(e.event_id()));
        s.apply(&e, &p);
        assert!(s.is_duplicate(e.event_id()));
        for t in 100..100 + DEDUP_WINDOW as i64 {
            s.apply(&view(t, "a"), &p);
        }
        assert!(!s.is_duplicate(e.event_id()), "the window is bounded");
    }

    #[test]
    fn embeddings_are_projected_and_averaged() {
        let p = params();
        let with = |e: Vec<f32>| {
            let mut s = UserState::default();
            let mut ev = view(0, "a");
            if let Event::Click(c) = &mut ev {
                c.embedding = Some(e);
            }
            s.apply(&ev, &p);
            (0..EMBED_DIM)
                .map(|i| s.vector(&p)[idx(&format!("embedding_{i}"))])
                .collect::<Vec<f64>>()
        };
        let a = with(vec![1.0, 2.0, -1.0, 0.5]);
        let b = with(vec![-1.0, -2.0, 1.0, -0.5]);
        assert!(a.iter().any(|x| x.abs() > 0.1), "{a:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_relative_eq!(*x, -*y, epsilon = 1e-12);
        }
        // Seeded: the same input projects the same way every time.
        assert_eq!(a, with(vec![1.0, 2.0, -1.0, 0.5]));
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        (0i64..60 * DAY, 0u8..3, 0.0f64..1e6, 1i32..=5).prop_map(|(t, k, amount, r)| match k {
            0 => view(t, "cat"),
            1 => order(t, amount, OrderStatus::Placed),
            _ => review(t, r, "great but slow"),
        })
    }

    proptest! {
        #[test]
        fn tokens_match_lowercasing_each_word(text in "(\\PC|[ 'A-Za-z]){0,80}") {
            prop_assert_eq!(token_list(&text), reference_tokens(&text));
        }

        #[test]
        fn log_scaling_is_ln_1p(lanes in proptest::array::uniform4(prop_oneof![0.0f64..10.0, 0.0f64..f64::MAX])) {
            assert_ln_1p4_is_ln_1p(lanes);
        }

        #[test]
        fn vectors_are_finite(events in proptest::collection::vec(arb_event(), 1..40)) {
            let p = params();
            let mut s = UserState::default();
            for e in &events {
                s.apply(e, &p);
                prop_assert!(s.vector(&p).iter().all(|x| x.is_finite()));
            }
        }

        #[test]
        fn order_of_arrival_does_not_matter(events in proptest::collection::vec(arb_event(), 1..40), seed in any::<u64>()) {
            use rand::seq::SliceRandom;
            use rand::SeedableRng;
            let p = params();
            let mut sorted = events.clone();
            sorted.sort_by_key(|e| e.event_time());
            let mut shuffled = events;
            shuffled.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
            let (mut a, mut b) = (UserState::default(), UserState::default());
            sorted.iter().for_each(|e| a.apply(e, &p));
            shuffled.iter().for_each(|e| b.apply(e, &p));
            for (i, (x, y)) in a.vector(&p).iter().zip(b.vector(&p)).enumerate() {
                prop_assert!((x - y).abs() <= 1e-9 * (1.0 + x.abs()), "{}: {x} vs {y}", feature_name(i));
            }
        }

        #[test]
        fn decay_is_monotone(dt1 in 0i64..1_000_000_000_000, dt2 in 0i64..1_000_000_000_000) {
            let d = Decay::from_half_life_ms(7.0 * DAY as f64);
            let (lo, hi) = (dt1.min(dt2), dt1.max(dt2));
            prop_assert!(d.factor(hi) <= d.factor(lo));
            prop_assert!(d.factor(lo) <= 1.0 && d.factor(hi) >= 0.0);
        }
    }
}
