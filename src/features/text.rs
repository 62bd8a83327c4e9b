//! Text and names: stable FNV-1a hashing (category buckets, tokens), the tokeniser, the
//! sentiment lexicon with negation, and the seeded random projection of embeddings.

use super::layout::{CATEGORY_BUCKETS, EMBED_DIM};

/// FNV-1a (64 bit): a stable hash across builds and platforms, unlike `std`'s hasher.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Stable bucket of a category name (case-insensitive).
pub(crate) fn category_bucket(category: &str) -> usize {
    (fnv1a(category.trim().bytes().map(|b| b.to_ascii_lowercase())) % CATEGORY_BUCKETS as u64)
        as usize
}

pub(super) const POSITIVE: [&str; 24] = [
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
pub(super) const NEGATIVE: [&str; 24] = [
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
pub(super) const NEGATORS: [&str; 5] = ["not", "no", "never", "dont", "isnt"];

/// Calls `f` with each token of `text`: a run of alphanumerics and apostrophes, lowercased,
/// apostrophes removed. An ASCII token of up to 32 bytes (nearly all words) is lowercased on
/// the stack; others go through `str::to_lowercase` (Unicode rules, final sigma included).
/// Allocating two strings per token used to make a review's words most of its event's cost.
pub(crate) fn for_each_token(text: &str, mut f: impl FnMut(&str)) {
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
pub(super) struct Sentiment {
    pub(super) pos: f64,
    pub(super) neg: f64,
    pub(super) flip: bool,
}

impl Sentiment {
    pub(super) fn word(&mut self, t: &str) {
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

    pub(super) fn score(&self) -> Option<f64> {
        let (pos, neg) = (self.pos, self.neg);
        (pos + neg > 0.0).then(|| (pos - neg) / (pos + neg))
    }
}

/// Entry `(row, col)` of the seeded random projection: ±1/√EMBED_DIM (Achlioptas).
pub(super) fn projection(seed: u64, row: usize, col: usize) -> f64 {
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
