//! The models shared by all users (scaler, k-means, value model, category names, catalogue)
//! and their forms: a saved model file, the models another instance adopts, and the global
//! state a checkpoint writes beside the users. The per-user steps through the models (labels,
//! predictions) are here; the segment decision is `assignment.rs`.

use super::assignment::{user_action, Decision};
use super::{Counters, Engine, Outlook, Rules, SegmentAction, REFITS};
use crate::catalogue::Catalogue;
use crate::config::CoreSettings;
use crate::features::{
    action_tag_hash, feature_name, group_of, FeatureParams, Group, LabelWindow, UserState, Vector,
    CATEGORY_BUCKETS, DIM, LAYOUT_VERSION,
};
use crate::model::{KMeans, Scaler, ValueModel};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The models shared by all users; what `--save-model` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Models {
    pub layout_version: u32,
    pub feature_names: Vec<String>,
    pub(super) scaler: Scaler,
    pub(super) kmeans: KMeans,
    /// Expected spend over the horizon (a saved model from before it starts untrained).
    #[serde(default)]
    pub(super) value: ValueModel,
    /// Per category bucket, the names seen and how often (bounded), to name segments.
    pub(super) category_names: Vec<HashMap<String, u64, ahash::RandomState>>,
    /// Exponentially weighted mean distance of events' vectors to their nearest centroid.
    #[serde(default)]
    pub(super) distance_ewma: f64,
    /// What the catalogue topic was last told about each segment.
    #[serde(default)]
    pub(super) catalogue: Catalogue,
}

/// Why a saved model was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file: {0}")]
    Io(#[from] std::io::Error),
    #[error("model file is not a segstream model: {0}")]
    Format(#[from] serde_json::Error),
    #[error("model feature layout is version {got} ({dim} features) but this build uses version {want} ({want_dim} features); retrain it with `segstream replay --save-model`")]
    Layout {
        got: u32,
        dim: usize,
        want: u32,
        want_dim: usize,
    },
    #[error("model has {got} segments but model.k is {want}")]
    K { got: usize, want: usize },
}
/// The engine's state beyond the users: what a checkpoint writes next to the changelog, so a
/// restart continues the same models, counters and sweep schedule.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct GlobalState {
    pub(super) models: Models,
    pub(super) counters: Counters,
    /// The latest event time applied.
    pub(super) watermark_ms: i64,
    pub(super) next_sweep_ms: i64,
    /// The applied-events count at which k-means is next fitted, and how many fits are left.
    pub(super) next_fit: u64,
    pub(super) fits_left: u32,
}

impl GlobalState {
    /// Untrained models, nothing counted, no sweep or fit yet.
    pub(super) fn new(s: CoreSettings) -> Self {
        let (f, m) = (s.features, s.model);
        let mut weights = [0.0; DIM];
        for (i, w) in weights.iter_mut().enumerate() {
            *w = match group_of(i) {
                Group::Behaviour => f.weights.behaviour,
                Group::Purchases => f.weights.purchases,
                Group::Category => f.weights.category,
                Group::Social => f.weights.social,
                Group::Text => f.weights.text,
                Group::Embedding => f.weights.embedding,
            };
        }
        Self {
            models: Models {
                layout_version: LAYOUT_VERSION,
                feature_names: (0..DIM).map(|i| feature_name(i).to_owned()).collect(),
                // The standardisation forgets at the centroids' rate: centroids live in z-space,
                // so a scale that forgot more slowly would leave them at stale coordinates.
                scaler: Scaler::weighted(m.clip_z, weights)
                    .with_half_life(m.forgetting_half_life.as_millis() as f64),
                kmeans: KMeans::with_forgetting(
                    m.k,
                    m.seed,
                    m.init_users,
                    m.batch_size,
                    m.forgetting_half_life.as_millis() as f64,
                ),
                value: ValueModel::new(m.sgd_learning_rate, m.sgd_l2),
                category_names: vec![HashMap::default(); CATEGORY_BUCKETS],
                distance_ewma: 0.0,
                catalogue: Catalogue::default(),
            },
            counters: Counters::default(),
            watermark_ms: i64::MIN,
            next_sweep_ms: i64::MIN,
            next_fit: m.init_events,
            fits_left: 1 + REFITS,
        }
    }
}

impl Engine {
    /// An engine that starts from a saved model (warm start): no re-seeding, the same ids.
    pub(crate) fn with_model<'a>(
        s: impl Into<CoreSettings<'a>>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        let s = s.into();
        let models: Models = serde_json::from_slice(&std::fs::read(path)?)?;
        let models = checked(models, s.model.k)?;
        let mut e = Self::new(s);
        if models.kmeans.is_seeded() {
            e.global.fits_left = 0;
        }
        e.global.models = models;
        Ok(e)
    }

    /// Writes the models (not the per-user state) as JSON.
    pub(crate) fn save_model(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, serde_json::to_vec(&self.global.models)?)?;
        Ok(())
    }

    /// The models, counters and sweep schedule, encoded for a checkpoint (no user ids).
    pub(crate) fn export_global(&self) -> Vec<u8> {
        serde_json::to_vec(&self.global).unwrap_or_default()
    }

    /// Continues from [`Engine::export_global`]'s output (before restoring users).
    pub(crate) fn restore_global(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        let g: GlobalState = serde_json::from_slice(bytes)?;
        let models = checked(g.models, self.global.models.kmeans.k())?;
        self.global = GlobalState { models, ..g };
        self.descriptions.take();
        Ok(())
    }

    /// The models alone, encoded for other instances to adopt.
    pub(crate) fn export_models(&self) -> Vec<u8> {
        serde_json::to_vec(&self.global.models).unwrap_or_default()
    }

    /// Replaces the models with a trainer's (same ids: its centroid rows). Users keep their
    /// segments until their next event or sweep decides again with the adopted model.
    pub(crate) fn adopt_models(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        let models: Models = serde_json::from_slice(bytes)?;
        let models = checked(models, self.global.models.kmeans.k())?;
        if models.kmeans.is_seeded() {
            self.global.fits_left = 0;
        }
        self.global.models = models;
        self.descriptions.take();
        Ok(())
    }
}

/// Checks a loaded model against this build's layout and the configured k.
fn checked(mut models: Models, k: usize) -> Result<Models, ModelError> {
    if models.layout_version != LAYOUT_VERSION || models.feature_names.len() != DIM {
        return Err(ModelError::Layout {
            got: models.layout_version,
            dim: models.feature_names.len(),
            want: LAYOUT_VERSION,
            want_dim: DIM,
        });
    }
    if models.kmeans.k() != k {
        return Err(ModelError::K {
            got: models.kmeans.k(),
            want: k,
        });
    }
    models.kmeans.after_load();
    models.scaler.refresh();
    Ok(models)
}

impl Models {
    /// Expected net spend over the horizon, in currency.
    fn predict(&self, z: &Vector) -> f64 {
        self.value.predict(z)
    }

    /// Delayed labels: when a user's window has reached the horizon at `t`, the net spend seen
    /// in it is the label for the features at its start. Returns whether a label matured.
    /// Only a trainer learns from it; other instances drop it (they adopt the trainer's model).
    pub(super) fn mature_label(
        &mut self,
        state: &mut UserState,
        t: i64,
        horizon: i64,
        train: bool,
    ) -> bool {
        match state.label.as_ref() {
            Some(w) if t >= w.start_ms.saturating_add(horizon) => {
                if train {
                    let xz = self.scaler.transform(&w.features());
                    self.value.train(&xz, w.spend);
                }
                state.label = None;
                true
            }
            _ => false,
        }
    }

    /// Opens a label window at `t` with the features `x` the user has then, if none is open.
    pub(super) fn open_label(&self, state: &mut UserState, t: i64, x: &Vector) {
        if state.label.is_none() {
            state.label = Some(LabelWindow::open(t, x));
        }
    }

    /// One user's vector `x` at `t` through the models: standardised (the scaler learns from it
    /// if `learn`), a new predicted value (blended with the user's cold-start estimate while
    /// the value model is young), and the segment decision (k-means learns from it if `learn`).
    /// Returns the (segment, predicted value) before, and the decision if it changed.
    pub(super) fn update_user(
        &mut self,
        state: &mut UserState,
        (x, params, actions): (&Vector, &FeatureParams, &[Vec<SegmentAction>]),
        t: i64,
        rules: &Rules,
        learn: bool,
    ) -> ((Option<u32>, Outlook), Option<Decision>) {
        if learn {
            self.scaler.observe(x, t);
        }
        let z = self.scaler.transform(x);
        let old = (state.segment, Outlook::of(state));
        let w = self.value.maturity();
        let p = self.value.purchase_probability(&z);
        (state.predicted_value, state.signals.purchase_probability) = if w < 1.0 {
            let cold = state.recent_spend_over(t, rules.horizon_ms, params);
            let cold_p = state.recent_purchase_probability(t, rules.horizon_ms, params);
            (
                w * self.predict(&z) + (1.0 - w) * cold,
                (w * p + (1.0 - w) * cold_p) as f32,
            )
        } else {
            (self.predict(&z), p as f32)
        };
        let decision = match self.decide(state, &z, t, rules, learn) {
            Some(mut d) => {
                d.action = user_action(actions, d.new, state, rules.hysteresis).map(Into::into);
                state.signals.published_action = action_tag_hash(d.action.as_deref());
                Some(d)
            }
            None if rules.publish_updates => self.retag(state, &z, t, rules, actions),
            None => None,
        };
        (old, decision)
    }
}
