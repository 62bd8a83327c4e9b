//! What the engine tells its readers: counters, model figures, the segments with their
//! wording, user dumps and model-space vectors. Nothing here changes state.

use super::{Counters, Engine};
use crate::event::UserId;
use crate::features::{feature_name, FeatureParams, UserState, Vector};
use crate::store::Store;
use serde::Serialize;
use std::sync::Arc;

/// Summary of one segment, for the catalogue.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SegmentInfo {
    pub id: u32,
    pub label: String,
    pub size: i64,
    pub mean_predicted_value: f64,
    pub mean_purchase_probability: f64,
    pub action: Option<String>,
    /// Centroid in named features, as unweighted z-scores.
    pub centroid: Vec<(String, f64)>,
}

/// A segment's size and its members' mean predictions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SegmentFigures {
    pub id: u32,
    pub size: i64,
    pub mean_predicted_value: f64,
    pub mean_purchase_probability: f64,
}

/// One user's final state, as replay and the Kafka path dump it.
#[derive(Clone, Debug, Serialize)]
pub struct UserDump {
    pub user_id: String,
    pub segment: Option<u32>,
    pub predicted_value: f64,
    /// P(a purchase within the value horizon), as of the dump.
    pub purchase_probability: f64,
    pub events: u64,
    pub features: serde_json::Map<String, serde_json::Value>,
    /// The vector the models see (standardised, clipped, weighted).
    pub model_vector: Vec<f64>,
}

impl Engine {
    /// A shared handle on the per-user map, for concurrent readers (the HTTP API).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub fn counters(&self) -> Counters {
        self.global.counters
    }

    /// Events applied so far.
    pub fn applied(&self) -> u64 {
        self.global.counters.applied
    }

    pub fn users(&self) -> usize {
        self.store.len()
    }

    pub fn user(&self, user: &str) -> Option<UserState> {
        self.store.get(user)
    }

    pub fn model_version(&self) -> u64 {
        self.global.models.kmeans.version()
    }

    pub fn is_seeded(&self) -> bool {
        self.global.models.kmeans.is_seeded()
    }

    /// Each segment's share of the points k-means absorbed (decayed by forgetting), by id: the
    /// segment sizes a model alone knows, without users.
    pub(crate) fn segment_shares(&self) -> Vec<f64> {
        let counts = self.global.models.kmeans.counts();
        let total: f64 = counts.iter().sum();
        counts
            .iter()
            .map(|c| if total > 0.0 { c / total } else { 0.0 })
            .collect()
    }

    pub(crate) fn kmeans_repairs(&self) -> u64 {
        self.global.models.kmeans.repairs()
    }

    /// Progressive (mean absolute, root mean squared) error of the predicted value, in
    /// currency, and the number of labels it learned from.
    pub(crate) fn value_errors(&self) -> (f64, f64, u64) {
        let v = &self.global.models.value;
        let (mae, rmse) = v.errors();
        (mae, rmse, v.labels())
    }

    /// Progressive calibration of the predicted value (Σ predicted ÷ Σ actual over matured
    /// labels) and log loss of the purchase propensity.
    pub(crate) fn value_calibration(&self) -> (f64, f64) {
        let v = &self.global.models.value;
        (v.calibration(), v.log_loss())
    }

    /// Progressive AUC of the propensity and Pearson, Gini and deciles of the value model.
    pub(crate) fn value_validation(&self) -> crate::validation::Report {
        self.global.models.value.validation()
    }

    /// Where predicted values come from now: `cold_start` (each user's own recent spend rate
    /// over the horizon), `blended` (moving to the model as it learns) or `model`.
    pub fn value_source(&self) -> &'static str {
        match self.global.models.value.maturity() {
            w if w <= 0.0 => "cold_start",
            w if w < 1.0 => "blended",
            _ => "model",
        }
    }

    /// Mean distance of recent events' vectors to their nearest centroid (exponentially
    /// weighted over about a thousand events), in model space: the k-means quality signal.
    pub(crate) fn mean_distance(&self) -> f64 {
        self.global.models.distance_ewma
    }

    /// Each segment's size and its members' mean predictions (cheap: kept up to date per event).
    pub(crate) fn segment_figures(&self) -> Vec<SegmentFigures> {
        self.segment_sizes
            .iter()
            .zip(&self.segment_outlook)
            .enumerate()
            .map(|(j, (&size, sum))| {
                let mean = |x: f64| if size > 0 { x / size as f64 } else { 0.0 };
                SegmentFigures {
                    id: j as u32,
                    size,
                    mean_predicted_value: mean(sum.value),
                    mean_purchase_probability: mean(sum.purchase_probability),
                }
            })
            .collect()
    }

    /// The k-means inertia of the assigned users (sum of squared distances to the centroid of
    /// their segment), and their count. Visits every user: for reports, not the hot path.
    pub fn inertia(&self) -> (f64, usize) {
        let v = self.assigned_vectors();
        let Some(c) = self.global.models.kmeans.centroids() else {
            return (0.0, 0);
        };
        let total = v
            .iter()
            .map(|(_, s, z)| {
                c.row(*s as usize)
                    .iter()
                    .zip(z)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
            })
            .sum();
        (total, v.len())
    }

    /// The catalogue: every segment with its description, size, value and action.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segment_figures()
            .into_iter()
            .map(|f| {
                let j = f.id as usize;
                SegmentInfo {
                    id: f.id,
                    label: self.published_label(j),
                    size: f.size,
                    mean_predicted_value: f.mean_predicted_value,
                    mean_purchase_probability: f.mean_purchase_probability,
                    action: self.action(j),
                    centroid: self
                        .centroid_z(j)
                        .into_iter()
                        .enumerate()
                        .map(|(i, z)| (feature_name(i).to_owned(), z))
                        .collect(),
                }
            })
            .collect()
    }

    /// Every user's state as of the event-time watermark, with named features, sorted by id.
    pub fn dump(&self) -> Vec<UserDump> {
        self.store
            .snapshot()
            .into_iter()
            .map(|(id, s): (UserId, UserState)| {
                let x = s.vector_at(self.global.watermark_ms, &self.params);
                let z = self.global.models.scaler.transform(&x);
                UserDump {
                    user_id: id.as_str().to_owned(),
                    segment: s.segment,
                    predicted_value: s.predicted_value,
                    purchase_probability: self.global.models.value.purchase_probability(&z),
                    events: s.events,
                    features: s
                        .named_at(self.global.watermark_ms, &self.params)
                        .into_iter()
                        .map(|(k, v)| (k, serde_json::json!(v)))
                        .collect(),
                    model_vector: z.to_vec(),
                }
            })
            .collect()
    }

    /// Model-space vectors of all assigned users with their segment (for quality checks).
    pub fn assigned_vectors(&self) -> Vec<(String, u32, Vector)> {
        self.store
            .snapshot()
            .into_iter()
            .filter_map(|(id, s)| {
                let z = self
                    .global
                    .models
                    .scaler
                    .transform(&s.vector_at(self.global.watermark_ms, &self.params));
                s.segment.map(|seg| (id.as_str().to_owned(), seg, z))
            })
            .collect()
    }

    pub fn feature_params(&self) -> &FeatureParams {
        &self.params
    }
}
