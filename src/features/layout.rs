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

/// How a description words a segment whose centroid stands out on a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Words {
    /// Never worded (text buckets, embedding dimensions).
    Not,
    /// One phrase above the population, one below.
    Pick(&'static str, &'static str),
    /// "high" or "low", the half-life in days (0 short, 1 medium, 2 long), then `what`:
    /// "high 7-day views".
    Rate(usize, &'static str),
    /// "strong affinity to" the bucket's most frequent category name, above the population only.
    Category,
}

/// One named component, declared once: its name, whether the vector log-scales it
/// (`ln(1 + x)` of `x ≥ 0`: counts, amounts and durations, not shares or signed values), and
/// how descriptions word it. Its formula is in `vector.rs` and docs/features.md.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    pub log_scaled: bool,
    pub words: Words,
}

/// The components of one group, in order.
#[derive(Clone, Copy, Debug)]
pub enum Block {
    /// Each behaviour (name, what descriptions call it) as a rate per day at each half-life,
    /// half-life first: `{name}_per_day_{short|medium|long}`; log-scaled.
    PerHalfLife(&'static [(&'static str, &'static str)]),
    /// Components with their own names.
    Named(&'static [Feature]),
    /// `{prefix}_{i}` for `i < n`: hashed buckets or projected dimensions; not log-scaled.
    Numbered(&'static str, usize, Words),
}

const fn named(name: &'static str, log_scaled: bool, words: Words) -> Feature {
    Feature {
        name,
        log_scaled,
        words,
    }
}

/// The vector: every component, declared once, in order. Adding a component is a row here
/// and its formula in `UserState::vector` (and a new [`LAYOUT_VERSION`]).
pub const LAYOUT: [(Group, Block); 6] = [
    (
        Group::Behaviour,
        Block::PerHalfLife(&[
            ("views", "views"),
            ("searches", "searches"),
            ("cart_adds", "cart adds"),
            ("checkouts", "checkouts"),
            ("dwell_minutes", "dwell minutes"),
            ("sessions", "sessions"),
        ]),
    ),
    (
        Group::Purchases,
        Block::Named(&[
            named(
                "recency_days",
                true,
                Words::Pick("lapsed buyer", "recent buyer"),
            ),
            named(
                "frequency",
                true,
                Words::Pick("frequent buyer", "rarely buys"),
            ),
            named("monetary", true, Words::Rate(2, "spend")),
            named(
                "basket_size",
                true,
                Words::Pick("large baskets", "small baskets"),
            ),
            named(
                "avg_unit_price",
                true,
                Words::Pick("premium products", "low-price products"),
            ),
            named(
                "cancel_rate",
                false,
                Words::Pick("often cancels or returns", "rarely cancels"),
            ),
            named("lifetime_orders", true, Words::Not),
            named("tenure_days", true, Words::Not),
        ]),
    ),
    (
        Group::Category,
        Block::Numbered("category", CATEGORY_BUCKETS, Words::Category),
    ),
    (
        Group::Social,
        Block::Named(&[
            named(
                "engagements",
                true,
                Words::Pick("socially active", "socially quiet"),
            ),
            named(
                "reviews",
                true,
                Words::Pick("frequent reviewer", "rarely reviews"),
            ),
            named(
                "mean_rating",
                false,
                Words::Pick("positive reviewer", "critical reviewer"),
            ),
            named(
                "sentiment",
                false,
                Words::Pick("positive reviews", "negative reviews"),
            ),
        ]),
    ),
    (
        Group::Text,
        Block::Numbered("text", TEXT_BUCKETS, Words::Not),
    ),
    (
        Group::Embedding,
        Block::Numbered("embedding", EMBED_DIM, Words::Not),
    ),
];

const fn block_len(b: &Block) -> usize {
    match b {
        Block::PerHalfLife(kinds) => kinds.len() * HALF_LIVES,
        Block::Named(features) => features.len(),
        Block::Numbered(_, n, _) => *n,
    }
}

/// Where the block of `group` starts in the vector.
const fn start_of(group: Group) -> usize {
    let mut start = 0;
    let mut b = 0;
    while b < LAYOUT.len() {
        if LAYOUT[b].0 as u8 == group as u8 {
            return start;
        }
        start += block_len(&LAYOUT[b].1);
        b += 1;
    }
    start
}

/// Length of the feature vector: every block of the layout.
pub const DIM: usize = {
    let (mut n, mut b) = (0, 0);
    while b < LAYOUT.len() {
        n += block_len(&LAYOUT[b].1);
        b += 1;
    }
    n
};

/// A feature vector.
pub type Vector = [f64; DIM];

/// Start of each block in the vector.
pub(super) const B_PURCHASE: usize = start_of(Group::Purchases);
pub(super) const B_CATEGORY: usize = start_of(Group::Category);
pub(super) const B_SOCIAL: usize = start_of(Group::Social);
pub(super) const B_TEXT: usize = start_of(Group::Text);
pub(super) const B_EMBED: usize = start_of(Group::Embedding);

/// Whether component `i` is log-scaled, by the layout.
const fn is_log_scaled(i: usize) -> bool {
    let mut start = 0;
    let mut b = 0;
    while b < LAYOUT.len() {
        let len = block_len(&LAYOUT[b].1);
        if i < start + len {
            return match LAYOUT[b].1 {
                Block::PerHalfLife(_) => true,
                Block::Named(features) => features[i - start].log_scaled,
                Block::Numbered(..) => false,
            };
        }
        start += len;
        b += 1;
    }
    false
}

const N_LOG_SCALED: usize = {
    let (mut n, mut i) = (0, 0);
    while i < DIM {
        n += is_log_scaled(i) as usize;
        i += 1;
    }
    n
};

/// The components the vector log-scales, `ln(1 + x)` of `x ≥ 0`, in order.
pub(super) const LOG_SCALED: [usize; N_LOG_SCALED] = {
    let mut idx = [0; N_LOG_SCALED];
    let (mut n, mut i) = (0, 0);
    while i < DIM {
        if is_log_scaled(i) {
            idx[n] = i;
            n += 1;
        }
        i += 1;
    }
    idx
};

/// Half-life suffixes of the per-half-life rates.
const SUFFIX: [&str; HALF_LIVES] = ["short", "medium", "long"];

/// Component `i`'s group, block and position in the block.
fn locate(i: usize) -> (Group, Block, usize) {
    let mut start = 0;
    for (group, block) in LAYOUT {
        let len = block_len(&block);
        if i < start + len {
            return (group, block, i - start);
        }
        start += len;
    }
    panic!("component {i} is outside the layout's {DIM}")
}

/// Name of component `i` (e.g. `views_per_day_short`, `monetary`, `category_3`).
pub(crate) fn feature_name(i: usize) -> &'static str {
    &FEATURE_NAMES[i]
}

/// Index of the feature called `name`.
pub(crate) fn feature_index(name: &str) -> Option<usize> {
    FEATURE_NAMES.iter().position(|n| n == name)
}

/// How descriptions word component `i`.
pub(crate) fn words_of(i: usize) -> Words {
    match locate(i) {
        (_, Block::PerHalfLife(kinds), k) => Words::Rate(k / kinds.len(), kinds[k % kinds.len()].1),
        (_, Block::Named(features), k) => features[k].words,
        (_, Block::Numbered(_, _, words), _) => words,
    }
}

/// First component of the category-affinity block.
pub const CATEGORY_START: usize = B_CATEGORY;

static FEATURE_NAMES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..DIM).map(build_name).collect());

fn build_name(i: usize) -> String {
    match locate(i) {
        (_, Block::PerHalfLife(kinds), k) => {
            format!(
                "{}_per_day_{}",
                kinds[k % kinds.len()].0,
                SUFFIX[k / kinds.len()]
            )
        }
        (_, Block::Named(features), k) => features[k].name.to_owned(),
        (_, Block::Numbered(prefix, ..), k) => format!("{prefix}_{k}"),
    }
}

/// The group of component `i`.
pub(crate) fn group_of(i: usize) -> Group {
    locate(i).0
}
