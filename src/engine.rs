//! The pure core: applies one validated event to the user's state and the models, and says
//! whether the user's segment changed. Used unchanged by the Kafka pipeline, replay and benches.
//!
//! No Kafka, no tokio, no clock: the caller passes the wall-clock time used for `emit_time`.

use crate::config::ModelConfig;
use crate::event::{ChangeReason, Event, OrderStatus, SegmentChange, UserId};
use crate::features::{Decay, UserState, Vector};
use crate::model::{KMeans, Scaler, Sgd};
use crate::store::Store;
use serde::Serialize;

/// The models shared by all users.
pub struct Models {
    scaler: Scaler,
    kmeans: KMeans,
    sgd: Sgd,
    hysteresis: f64,
}

/// What applying one event produced.
#[derive(Debug, Default)]
pub struct Applied {
    /// Set when the user's segment changed (including the first assignment).
    pub change: Option<SegmentChange>,
}

/// Summary of one segment.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SegmentInfo {
    pub id: u32,
    pub label: String,
    pub size: i64,
}

/// One user's final state, as replay and the Kafka path dump it.
#[derive(Clone, Debug, Serialize)]
pub struct UserDump {
    pub user_id: String,
    pub segment: Option<u32>,
    pub predicted_value: f64,
    pub events: u64,
    pub features: serde_json::Map<String, serde_json::Value>,
}

pub struct Engine {
    store: Store,
    decay: Decay,
    models: Models,
    segment_sizes: Vec<i64>,
    applied: u64,
    /// Applied-event count at which the next k-means fit runs.
    next_fit: u64,
    fits_left: u32,
}

/// Fits after the seeding one, at 4×, 16× and 64× `init_events`.
const REFITS: u32 = 3;

impl Engine {
    pub fn new(half_life_ms: f64, m: &ModelConfig) -> Self {
        Self {
            store: Store::default(),
            decay: Decay::from_half_life_ms(half_life_ms),
            models: Models {
                scaler: Scaler::new(m.clip_z),
                kmeans: KMeans::new(m.k, m.seed, m.init_users, m.batch_size),
                sgd: Sgd::new(m.sgd_learning_rate, m.sgd_l2),
                hysteresis: m.hysteresis,
            },
            segment_sizes: vec![0; m.k],
            applied: 0,
            next_fit: m.init_events,
            fits_left: 1 + REFITS,
        }
    }

    /// Applies one validated event. `now_ms` is only written into `emit_time`.
    pub fn apply(&mut self, event: &Event, now_ms: i64) -> Applied {
        self.applied += 1;
        let decay = self.decay;
        let models = &mut self.models;
        let outcome = self.store.update(event.user_id(), |state| {
            if state.events == 0 {
                models.kmeans.offer_user(event.user_id());
            }
            let before = state.vector();
            state.apply(event, decay);
            let after = state.vector();
            models.step(event, state, &before, &after)
        });
        let change = outcome.map(|(prev, new, distance, confidence, version, predicted)| {
            if let Some(p) = prev {
                self.segment_sizes[p as usize] -= 1;
            }
            self.segment_sizes[new as usize] += 1;
            SegmentChange {
                user_id: event.user_id().to_owned(),
                previous_segment: prev.map(|p| p as i32),
                new_segment: new as i32,
                segment_label: self.models.kmeans.label(new as usize),
                distance,
                confidence,
                predicted_value: predicted,
                version,
                reason: if prev.is_some() {
                    ChangeReason::Moved
                } else {
                    ChangeReason::FirstAssignment
                },
                event_time: event.event_time(),
                emit_time: now_ms,
                model_version: self.models.kmeans.version() as i64,
            }
        });
        if self.applied >= self.next_fit && self.fits_left > 0 {
            self.fit();
        }
        Applied { change }
    }

    /// Seeds or refits k-means on the sampled users' current vectors.
    fn fit(&mut self) {
        let points: Vec<Vector> = self
            .models
            .kmeans
            .sample()
            .iter()
            .filter_map(|u| self.store.get(u))
            .map(|s| self.models.scaler.transform(&s.vector()))
            .collect();
        if points.len() < self.models.kmeans.k() {
            // Too few users yet: try again a little later.
            self.next_fit = self.applied + self.applied.max(1) / 2;
            return;
        }
        self.models.kmeans.fit(&points);
        self.fits_left -= 1;
        self.next_fit = self.applied.saturating_mul(4);
    }

    /// Events applied so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn users(&self) -> usize {
        self.store.len()
    }

    pub fn user(&self, user: &str) -> Option<UserState> {
        self.store.get(user)
    }

    pub fn model_version(&self) -> u64 {
        self.models.kmeans.version()
    }

    pub fn is_seeded(&self) -> bool {
        self.models.kmeans.is_seeded()
    }

    /// Progressive mean absolute error of the value model, in log1p(currency) units.
    pub fn value_mae(&self) -> f64 {
        self.models.sgd.mean_abs_error()
    }

    /// Size and label of every segment, by id.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        (0..self.models.kmeans.k())
            .map(|j| SegmentInfo {
                id: j as u32,
                label: self.models.kmeans.label(j),
                size: self.segment_sizes[j],
            })
            .collect()
    }

    /// Every user's final state with named features, sorted by user id.
    pub fn dump(&self) -> Vec<UserDump> {
        self.store
            .snapshot()
            .into_iter()
            .map(|(id, s): (UserId, UserState)| UserDump {
                user_id: id.as_str().to_owned(),
                segment: s.segment,
                predicted_value: s.predicted_value,
                events: s.events,
                features: s
                    .named()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), serde_json::json!(v)))
                    .collect(),
            })
            .collect()
    }

    /// Standardised vectors of all assigned users with their segment (for quality checks).
    pub fn assigned_vectors(&self) -> Vec<(String, u32, Vector)> {
        self.store
            .snapshot()
            .into_iter()
            .filter_map(|(id, s)| {
                s.segment.map(|seg| {
                    (
                        id.as_str().to_owned(),
                        seg,
                        self.models.scaler.transform(&s.vector()),
                    )
                })
            })
            .collect()
    }
}

/// (previous segment, new segment, distance, confidence, version, predicted value)
type Change = (Option<u32>, u32, f64, f64, i64, f64);

impl Models {
    /// Updates the models with the user's new vector and decides the user's segment.
    fn step(
        &mut self,
        event: &Event,
        state: &mut UserState,
        before: &Vector,
        after: &Vector,
    ) -> Option<Change> {
        // Value model: a placed order is a label for the features the user had just before it.
        if let Event::Purchase(p) = event {
            if p.status == OrderStatus::Placed {
                let x = self.scaler.transform(before);
                self.sgd.train(&x, p.total.ln_1p());
            }
        }
        self.scaler.observe(after);
        let z = self.scaler.transform(after);
        state.predicted_value = self.sgd.predict(&z).clamp(0.0, 30.0).exp_m1();

        let nearest = self.kmeans.nearest(&z)?;
        self.kmeans.learn(nearest.best, &z);
        let best = nearest.best as u32;
        let keep = match state.segment {
            Some(cur) if cur == best => true,
            // Hysteresis: move only when the new centroid is clearly closer.
            Some(cur) => {
                nearest.best_dist
                    >= self.kmeans.distance_to(cur as usize, &z) * (1.0 - self.hysteresis)
            }
            None => false,
        };
        if keep {
            return None;
        }
        let prev = state.segment.replace(best);
        state.version += 1;
        let confidence = if nearest.second_dist.is_finite() && nearest.second_dist > 0.0 {
            (1.0 - nearest.best_dist / nearest.second_dist).clamp(0.0, 1.0)
        } else {
            1.0
        };
        Some((
            prev,
            best,
            nearest.best_dist,
            confidence,
            state.version,
            state.predicted_value,
        ))
    }
}
