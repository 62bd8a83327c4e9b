//! The published segment catalogue: what subscribers were last told about each segment, and
//! the rules for telling them again. Pure: the engine passes each segment as it is now, and
//! gets back the records to publish on the catalogue topic (key: segment id).
//!
//! A segment's record goes out when it is first seen (`created`), when a repair moved its id
//! next to the largest segment (`split`, for both ids), when its description or action changed
//! (`reworded`: only once a new wording — other phrases, not the same ones reordered — has held
//! at two reviews in a row, so a wording at the edge of a threshold does not flap), or when its centroid moved beyond
//! [`MOVE_THRESHOLD`] from the one last published (`moved`). Each record carries a catalogue
//! version that orders every record ever published (as user versions do: the larger of the
//! previous + 1 and the version clock), and change records carry the version they were decided
//! with, so a subscriber can join a user's record to its segment's wording.

use serde::{Deserialize, Serialize};

/// Distance (in the population's standard deviations, over all features) a centroid must move
/// from its published position before a `moved` record: half a standard deviation, the level
/// at which descriptions call a feature out.
pub const MOVE_THRESHOLD: f64 = 0.5;

/// Why a catalogue record was published.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatalogueReason {
    Created,
    Split,
    Reworded,
    Moved,
}

impl CatalogueReason {
    pub const ALL: [Self; 4] = [Self::Created, Self::Split, Self::Reworded, Self::Moved];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Split => "split",
            Self::Reworded => "reworded",
            Self::Moved => "moved",
        }
    }
}

/// One segment as it is now.
#[derive(Clone, Debug, PartialEq)]
pub struct Current {
    pub label: String,
    pub action: Option<String>,
    /// Centroid as unweighted z-scores, in feature order.
    pub centroid: Vec<f64>,
}

/// What was last published about a segment, and a wording waiting for its second review.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Published {
    label: String,
    action: Option<String>,
    centroid: Vec<f64>,
    pending: Option<(String, Option<String>)>,
}

/// A catalogue record, before the engine adds the segment's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct Decided {
    pub segment: u32,
    pub reason: CatalogueReason,
    pub version: i64,
    /// For `split`: the segment the split came from (for the donor, itself).
    pub split_from: Option<u32>,
}

/// The published catalogue's memory (saved with the models).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Catalogue {
    segments: Vec<Option<Published>>,
    version: i64,
}

/// Whether two descriptions say the same: the same phrases, in any order (descriptions order
/// their phrases by how far the centroid stands out, which swaps without changing the meaning).
fn same_words(a: &str, b: &str) -> bool {
    let phrases = |s: &str| {
        let mut v: Vec<String> = s.split(',').map(|p| p.trim().to_owned()).collect();
        v.sort();
        v
    };
    phrases(a) == phrases(b)
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

impl Catalogue {
    /// The latest catalogue version (0 before any record).
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The published description of segment `j`, if it was published.
    pub fn label(&self, j: usize) -> Option<&str> {
        self.segments.get(j)?.as_ref().map(|p| p.label.as_str())
    }

    fn next_version(&mut self, clock: i64) -> i64 {
        self.version = (self.version + 1).max(clock);
        self.version
    }

    /// Compares `now` (every segment, by id) with what was published; `splits` are the repairs
    /// since the last review (retired id, donor id). Returns the records to publish, and
    /// remembers them as published.
    pub(crate) fn review(
        &mut self,
        now: &[Current],
        splits: &[(u32, u32)],
        clock: i64,
    ) -> Vec<Decided> {
        if self.segments.len() < now.len() {
            self.segments.resize(now.len(), None);
        }
        let mut out = Vec::new();
        for (j, cur) in now.iter().enumerate() {
            let split = splits
                .iter()
                .find(|(dead, donor)| *dead as usize == j || *donor as usize == j);
            let reason = match (&mut self.segments[j], split) {
                (None, _) => Some(CatalogueReason::Created),
                (Some(_), Some(_)) => Some(CatalogueReason::Split),
                (Some(p), None) => {
                    let wording = (cur.label.clone(), cur.action.clone());
                    if same_words(&p.label, &cur.label) && p.action == cur.action {
                        p.pending = None;
                        (distance(&p.centroid, &cur.centroid) >= MOVE_THRESHOLD)
                            .then_some(CatalogueReason::Moved)
                    } else if p.pending.as_ref() == Some(&wording) {
                        Some(CatalogueReason::Reworded)
                    } else {
                        p.pending = Some(wording);
                        None
                    }
                }
            };
            let Some(reason) = reason else {
                continue;
            };
            let version = self.next_version(clock);
            self.segments[j] = Some(Published {
                label: cur.label.clone(),
                action: cur.action.clone(),
                centroid: cur.centroid.clone(),
                pending: None,
            });
            out.push(Decided {
                segment: j as u32,
                reason,
                version,
                split_from: split.map(|(_, donor)| *donor),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(label: &str, x: f64) -> Current {
        Current {
            label: label.into(),
            action: None,
            centroid: vec![x, 0.0],
        }
    }

    fn reasons(d: &[Decided]) -> Vec<(u32, CatalogueReason)> {
        d.iter().map(|d| (d.segment, d.reason)).collect()
    }

    #[test]
    fn every_segment_is_created_once_then_only_what_changed_is_published() {
        let mut c = Catalogue::default();
        let now = [seg("a", 0.0), seg("b", 1.0)];
        let first = c.review(&now, &[], 0);
        use CatalogueReason::*;
        assert_eq!(reasons(&first), [(0, Created), (1, Created)]);
        assert_eq!((first[0].version, first[1].version, c.version()), (1, 2, 2));
        assert!(c.review(&now, &[], 0).is_empty(), "nothing changed");
        // A centroid drifting below the threshold says nothing; beyond it, `moved`.
        assert!(c.review(&[seg("a", 0.4), seg("b", 1.0)], &[], 0).is_empty());
        let moved = c.review(&[seg("a", 0.6), seg("b", 1.0)], &[], 0);
        assert_eq!(reasons(&moved), [(0, Moved)]);
        assert_eq!(c.label(0), Some("a"));
    }

    #[test]
    fn a_new_wording_is_published_once_it_held_at_two_reviews() {
        use CatalogueReason::*;
        let mut c = Catalogue::default();
        c.review(&[seg("lapsed", 0.0)], &[], 0);
        // A wording seen once and gone again is never published.
        assert!(c.review(&[seg("recent", 0.0)], &[], 0).is_empty());
        assert!(c.review(&[seg("lapsed", 0.0)], &[], 0).is_empty());
        assert!(c.review(&[seg("recent", 0.0)], &[], 0).is_empty());
        let r = c.review(&[seg("recent", 0.0)], &[], 0);
        assert_eq!(reasons(&r), [(0, Reworded)]);
        assert_eq!(c.label(0), Some("recent"));
        let mut tagged = seg("recent", 0.0);
        tagged.action = Some("vip".into());
        assert!(c.review(std::slice::from_ref(&tagged), &[], 0).is_empty());
        assert_eq!(reasons(&c.review(&[tagged], &[], 0)), [(0, Reworded)]);
        let published = c.segments[0].as_ref().unwrap();
        assert_eq!(published.action.as_deref(), Some("vip"));
    }

    #[test]
    fn the_same_phrases_in_another_order_are_the_same_wording() {
        let mut c = Catalogue::default();
        c.review(&[seg("lapsed, rarely buys", 0.0)], &[], 0);
        for _ in 0..3 {
            assert!(c
                .review(&[seg("rarely buys, lapsed", 0.0)], &[], 0)
                .is_empty());
        }
        assert_eq!(c.label(0), Some("lapsed, rarely buys"));
    }

    #[test]
    fn a_split_publishes_both_ids_and_versions_follow_the_clock() {
        use CatalogueReason::*;
        let mut c = Catalogue::default();
        let now = [seg("a", 0.0), seg("b", 3.0), seg("c", 6.0)];
        c.review(&now, &[], 0);
        let split = c.review(&now, &[(2, 0)], 1_000);
        assert_eq!(reasons(&split), [(0, Split), (2, Split)]);
        assert_eq!(split[1].split_from, Some(0));
        assert_eq!((split[0].version, split[1].version), (1_000, 1_001));
    }
}
