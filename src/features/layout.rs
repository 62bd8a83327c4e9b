//! The vector's layout: its components in order, their names and groups, and which are
//! log-scaled. A saved model or checkpoint records `LAYOUT_VERSION` and refuses another.

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

pub(super) const BEHAVIOUR: [&str; 6] = [
    "views",
    "searches",
    "cart_adds",
    "checkouts",
    "dwell_minutes",
    "sessions",
];
pub(super) const SUFFIX: [&str; HALF_LIVES] = ["short", "medium", "long"];

/// Start of each block in the vector.
pub(super) const B_PURCHASE: usize = 6 * HALF_LIVES;
pub(super) const B_CATEGORY: usize = B_PURCHASE + 8;
pub(super) const B_SOCIAL: usize = B_CATEGORY + CATEGORY_BUCKETS;
pub(super) const B_TEXT: usize = B_SOCIAL + 4;
pub(super) const B_EMBED: usize = B_TEXT + TEXT_BUCKETS;

/// The components the vector log-scales, `ln(1 + x)` of `x ≥ 0`: the behaviour rates, the
/// purchase block's days, counts and amounts (not its cancelled share), and the social counts.
pub(super) const LOG_SCALED: [usize; B_PURCHASE + 9] = {
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

pub(super) static FEATURE_NAMES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..DIM).map(build_name).collect());

pub(super) fn build_name(i: usize) -> String {
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
