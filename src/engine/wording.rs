//! Segments in words: each centroid's description (the features it stands out on), the action
//! rules it meets, and the catalogue records that tell subscribers when either changed. Cached
//! per [`Engine::wording_key`], as a mini-batch moves centroids only a little.

use super::Engine;
use crate::catalogue::Current;
use crate::event::CatalogueRecord;
use crate::features::{
    feature_index, feature_name, words_of, Words, CATEGORY_BUCKETS, CATEGORY_START, DIM,
};
use std::sync::Arc;

/// Cached wording of the segments: per segment its description, and the action rules its
/// centroid satisfies (each with the rule's minimum user value and the rendered tag).
#[derive(Default)]
pub(super) struct Wording {
    key: Option<(u64, u64)>,
    labels: Vec<Option<String>>,
    actions: Option<ActionTable>,
}

/// Per segment, the action rules its centroid meets, in priority order.
pub(super) type ActionTable = Arc<[Vec<SegmentAction>]>;
/// An action rule a segment's centroid meets: the rule's minimum user value and its tag.
pub(super) type SegmentAction = (Option<f64>, String);

/// Mini-batches a segment's cached wording may lag its centroid by. A mini-batch step moves a
/// centroid by a fraction 1/n of the way to its batch's mean, so the three features that stand
/// out (the description) and the rules it meets change far more slowly than the model version,
/// which moves every mini-batch: re-wording each segment after every batch was an eighth of the
/// engine's instructions. A fit, a repair or a loaded or adopted model re-words at once.
const WORDING_BATCHES: u64 = 64;
/// How far a segment's affinity to its top category must lead its affinity to its other
/// categories (in the population's standard deviations) for a `{category}` action (cross-sell)
/// to name it: half a standard deviation, the level at which descriptions call a feature out.
/// Below it the segment has no category of its own, and the rule does not apply.
const CROSS_SELL_MIN_Z: f64 = 0.5;

impl Engine {
    /// Decides what the catalogue topic must be told (trainer only: the other instances adopt
    /// its models, and the catalogue with them), as of the centroids now.
    pub(super) fn review_catalogue(&mut self, now_ms: i64) {
        if !self.trainer || !self.global.models.kmeans.is_seeded() {
            return;
        }
        let now: Vec<Current> = (0..self.global.models.kmeans.k())
            .map(|j| Current {
                label: self.describe_now(j),
                action: self
                    .segment_actions(j)
                    .into_iter()
                    .find(|(min, _)| min.is_none())
                    .map(|(_, tag)| tag),
                centroid: self.centroid_z(j),
            })
            .collect();
        let splits = self.global.models.kmeans.take_splits();
        let clock = self.rules.version_clock;
        let decided = self.global.models.catalogue.review(&now, &splits, clock);
        if decided.is_empty() {
            return;
        }
        let (shares, figures) = (self.segment_shares(), self.segment_figures());
        for d in decided {
            let j = d.segment as usize;
            let cur = &now[j];
            self.catalogue_out.push(CatalogueRecord {
                segment_id: d.segment as i32,
                catalogue_version: d.version,
                reason: d.reason,
                split_from: d.split_from.map(|s| s as i32),
                label: cur.label.clone(),
                action: cur.action.clone(),
                share: shares.get(j).copied().unwrap_or(0.0),
                mean_predicted_value: figures[j].mean_predicted_value,
                mean_purchase_probability: figures[j].mean_purchase_probability,
                centroid: (0..DIM)
                    .map(|i| (feature_name(i).to_owned(), cur.centroid[i]))
                    .collect(),
                model_version: self.global.models.kmeans.version() as i64,
                emit_time: now_ms,
            });
        }
    }

    /// Catalogue records decided since the last call, for the catalogue topic.
    pub(crate) fn take_catalogue(&mut self) -> Vec<CatalogueRecord> {
        std::mem::take(&mut self.catalogue_out)
    }

    /// Whether catalogue records wait to be taken (cheap: for the per-event path).
    pub(crate) fn has_catalogue(&self) -> bool {
        !self.catalogue_out.is_empty()
    }

    /// The description subscribers were given for segment `j`: the catalogue's, or (before
    /// the catalogue has one) the current wording.
    pub(super) fn published_label(&self, j: usize) -> String {
        match self.global.models.catalogue.label(j) {
            Some(l) => l.to_owned(),
            None => self.describe(j),
        }
    }

    /// Segment `j`'s centroid as unweighted z-scores (empty before seeding).
    pub(super) fn centroid_z(&self, j: usize) -> Vec<f64> {
        self.global
            .models
            .kmeans
            .centroids()
            .map_or_else(Vec::new, |c| {
                (0..DIM)
                    .map(|i| {
                        let w = self.global.models.scaler.weight(i);
                        if w > 0.0 {
                            c[[j, i]] / w
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
    }

    /// When the cached wording is stale: after a fit or repair (each moves centroids at once),
    /// and every [`WORDING_BATCHES`] mini-batches.
    fn wording_key(&self) -> (u64, u64) {
        let km = &self.global.models.kmeans;
        (km.reshapes(), km.version() / WORDING_BATCHES)
    }

    /// The wording cache, emptied first if stale. A change is published for about a third of
    /// events, and wording a segment costs microseconds.
    fn wording(&self) -> std::cell::RefMut<'_, Wording> {
        let key = self.wording_key();
        let mut cache = self.descriptions.borrow_mut();
        if cache.key != Some(key) {
            let k = self.global.models.kmeans.k();
            *cache = Wording {
                key: Some(key),
                labels: vec![None; k],
                actions: None,
            };
        }
        cache
    }

    /// A description of segment `j` in words, from the features its centroid stands out on.
    pub fn describe(&self, j: usize) -> String {
        self.wording().labels[j]
            .get_or_insert_with(|| self.describe_now(j))
            .clone()
    }

    pub(super) fn describe_now(&self, j: usize) -> String {
        let Some(c) = self.global.models.kmeans.centroids() else {
            return String::new();
        };
        // Only features standing out by half a standard deviation or more are worded: the
        // others are left out before sorting (this runs for most published changes, as the
        // model version moves every mini-batch).
        let mut feats: Vec<(usize, f64)> = (0..DIM)
            .filter(|&i| self.global.models.scaler.weight(i) > 0.0)
            .map(|i| (i, c[[j, i]] / self.global.models.scaler.weight(i)))
            .filter(|(_, z)| z.abs() >= 0.5 || z.is_nan())
            .collect();
        feats.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then(a.0.cmp(&b.0)));
        let mut words: Vec<String> = Vec::new();
        let mut kinds: Vec<&str> = Vec::new();
        for (i, z) in feats {
            if words.len() == 3 {
                break;
            }
            let name = feature_name(i);
            // One phrase per behaviour kind, whatever its half-life.
            let kind = name.split_once("_per_day_").map_or(name, |(k, _)| k);
            if kinds.contains(&kind) {
                continue;
            }
            if let Some(p) = self.phrase(i, z) {
                kinds.push(kind);
                words.push(p);
            }
        }
        if words.is_empty() {
            "typical shopper".into()
        } else {
            words.join(", ")
        }
    }

    /// How a description words segment centroids standing out on component `i` by `z`
    /// (the layout's [`Words`]).
    fn phrase(&self, i: usize, z: f64) -> Option<String> {
        let high = z > 0.0;
        let level = if high { "high" } else { "low" };
        match words_of(i) {
            Words::Not => None,
            Words::Pick(above, below) => Some(if high { above } else { below }.to_owned()),
            Words::Rate(h, what) => {
                let days = self.rules.half_life_days[h];
                Some(format!("{level} {days:.0}-day {what}"))
            }
            Words::Category if high => {
                let b = i - CATEGORY_START;
                Some(format!("strong affinity to {}", self.category_name(b)))
            }
            Words::Category => None,
        }
    }

    /// The most frequent category name seen in bucket `b`.
    fn category_name(&self, b: usize) -> String {
        self.global.models.category_names[b]
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map_or_else(|| format!("category group {b}"), |(n, _)| n.clone())
    }

    /// The category segment `j`'s members engage with more than with their other categories,
    /// compared with the population: among the buckets that vary across users and have a name
    /// seen in events, the top one's affinity z-score must exceed the mean of the others by
    /// [`CROSS_SELL_MIN_Z`]. Affinities are activity levels, so a segment that is simply more
    /// active is high on every category; only a lead over its own other categories says what to
    /// offer. With fewer than two such categories (one category in the data, or none) there is
    /// nothing to cross-sell.
    pub(super) fn top_category(&self, j: usize) -> Option<String> {
        let c = self.global.models.kmeans.centroids()?;
        let known: Vec<(usize, f64)> = (0..CATEGORY_BUCKETS)
            .filter(|&b| !self.global.models.category_names[b].is_empty())
            .filter_map(|b| {
                let w = self.global.models.scaler.weight(CATEGORY_START + b);
                (w > 0.0).then(|| (b, c[[j, CATEGORY_START + b]] / w))
            })
            .collect();
        if known.len() < 2 {
            return None;
        }
        let (best, z) = known
            .iter()
            .copied()
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))?;
        let others = (known.iter().map(|(_, z)| z).sum::<f64>() - z) / (known.len() - 1) as f64;
        if z - others < CROSS_SELL_MIN_Z {
            return None;
        }
        self.global.models.category_names[best]
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(n, _)| n.clone())
    }

    /// The action of segment `j` regardless of users' values: its first rule without a minimum.
    pub(super) fn action(&self, j: usize) -> Option<String> {
        self.action_table()
            .get(j)?
            .iter()
            .find(|(min, _)| min.is_none())
            .map(|(_, tag)| tag.clone())
    }

    /// Every segment's action rules, as of the cached wording.
    pub(super) fn action_table(&self) -> ActionTable {
        let mut cache = self.wording();
        cache
            .actions
            .get_or_insert_with(|| {
                (0..self.global.models.kmeans.k())
                    .map(|j| self.segment_actions(j))
                    .collect()
            })
            .clone()
    }

    /// The action rules whose centroid conditions segment `j` meets, in order, with their
    /// minimum user value and rendered tag.
    fn segment_actions(&self, j: usize) -> Vec<SegmentAction> {
        let Some(c) = self.global.models.kmeans.centroids() else {
            return Vec::new();
        };
        self.rules
            .actions
            .iter()
            .filter(|r| {
                let Some(f) = &r.feature else {
                    return true;
                };
                let Some(i) = feature_index(f) else {
                    return false;
                };
                let w = self.global.models.scaler.weight(i);
                let z = if w > 0.0 { c[[j, i]] / w } else { 0.0 };
                !(r.min_z.is_some_and(|m| z < m) || r.max_z.is_some_and(|m| z > m))
            })
            .filter_map(|r| {
                // A rule naming `{category}` applies only where a category stands out.
                let tag = if r.tag.contains("{category}") {
                    r.tag.replace("{category}", &self.top_category(j)?)
                } else {
                    r.tag.clone()
                };
                Some((r.min_user_value, tag))
            })
            .collect()
    }
}
