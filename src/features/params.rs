//! What the features are computed with: one decay per half-life, and the signs of the
//! embedding projection tabulated for the first columns.

use super::layout::{EMBED_DIM, HALF_LIVES};
use super::text::projection;

/// Milliseconds in a day: rates are per day, recency and tenure in days.
pub(super) const DAY_MS: f64 = 86_400_000.0;

/// Decay of one half-life: `factor(dt) = 2^(-dt / half_life)`.
#[derive(Clone, Copy, Debug)]
pub struct Decay {
    pub(super) rate_per_ms: f64,
    pub(super) half_life_days: f64,
}

impl Decay {
    pub(crate) fn from_half_life_ms(half_life_ms: f64) -> Self {
        Self {
            rate_per_ms: std::f64::consts::LN_2 / half_life_ms,
            half_life_days: half_life_ms / DAY_MS,
        }
    }

    /// Factor by which a sum shrinks over `dt_ms >= 0`, in (0, 1].
    pub(crate) fn factor(&self, dt_ms: i64) -> f64 {
        (-(dt_ms.max(0) as f64) * self.rate_per_ms).exp()
    }

    /// A decayed count of events arriving at a steady `r` per day tends to `r · h / ln 2`;
    /// this converts it back to a rate per day.
    pub(super) fn per_day(&self, decayed_count: f64) -> f64 {
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
    pub(super) signs: Box<[u8]>,
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
    pub(super) fn signs(&self, col: usize) -> u8 {
        match self.signs.get(col) {
            Some(&bits) => bits,
            None => column_signs(self.seed, col),
        }
    }
}

pub(super) fn column_signs(seed: u64, col: usize) -> u8 {
    (0..EMBED_DIM).fold(0, |bits, row| {
        bits | (u8::from(projection(seed, row, col) > 0.0) << row)
    })
}
