//! The pure core: applies one validated event to the user's state and the models, and says
//! whether the user's segment changed. Used unchanged by the Kafka pipeline, replay and benches.
//!
//! No Kafka, no tokio, no clock: event time drives features, forgetting, label maturity and
//! sweeps; the caller passes the wall-clock time used only for `emit_time`.

use crate::catalogue::{Catalogue, Current};
use crate::config::{ActionRule, LatePolicy, Settings};
use crate::decode::{Ahead, Decoder, Spare};
use crate::event::{CatalogueRecord, ChangeReason, Event, SegmentChange, Source, UserId};
use crate::features::{
    action_tag_hash, category_bucket, feature_index, feature_name, group_of, FeatureParams, Group,
    LabelWindow, UserState, Vector, CATEGORY_BUCKETS, CATEGORY_START, DIM, LAYOUT_VERSION,
    UNKNOWN_ACTION,
};
use crate::model::{KMeans, Nearest, Scaler, ValueModel};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// What happened to one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Its event id was applied recently for this user; ignored.
    Duplicate,
    /// Older than the user's latest event by more than the allowed lateness.
    Late {
        applied: bool,
    },
}

/// What applying one event produced.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    /// Segment changes: the event's user's (if any) first, then any from a sweep it triggered.
    pub changes: Vec<SegmentChange>,
}

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

/// Counters the metrics mirror.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub applied: u64,
    pub duplicates: u64,
    pub late: u64,
    pub flaps: u64,
    pub sweeps: u64,
    pub labels_matured: u64,
    pub erased: u64,
    #[serde(default)]
    pub evicted: u64,
}

/// The models shared by all users; what `--save-model` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Models {
    pub layout_version: u32,
    pub feature_names: Vec<String>,
    scaler: Scaler,
    kmeans: KMeans,
    /// Expected spend over the horizon (a saved model from before it starts untrained).
    #[serde(default)]
    value: ValueModel,
    /// Per category bucket, the names seen and how often (bounded), to name segments.
    category_names: Vec<HashMap<String, u64, ahash::RandomState>>,
    /// Exponentially weighted mean distance of events' vectors to their nearest centroid.
    #[serde(default)]
    distance_ewma: f64,
    /// What the catalogue topic was last told about each segment.
    #[serde(default)]
    catalogue: Catalogue,
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

struct Rules {
    lateness_ms: i64,
    late_policy: LatePolicy,
    hysteresis: f64,
    min_dwell_events: u32,
    min_dwell_ms: i64,
    flap_window_ms: i64,
    sweep_ms: i64,
    horizon_ms: i64,
    actions: Vec<ActionRule>,
    half_life_days: [f64; 3],
    ttl_ms: i64,
    max_users: usize,
    /// Whether an action change without a move is published (`output.updates`).
    publish_updates: bool,
    /// The version clock: processing time × [`VERSIONS_PER_MS`], set on each call that can
    /// decide ([`Engine::set_version_clock`]); a new version is at least this.
    version_clock: i64,
}

/// The engine's state beyond the users: what a checkpoint writes next to the changelog, so a
/// restart continues the same models, counters and sweep schedule.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GlobalState {
    models: Models,
    counters: Counters,
    watermark_ms: i64,
    next_sweep_ms: i64,
    next_fit: u64,
    fits_left: u32,
}

/// One changelog record: a copy of a user's state (encoded by the checkpoint writer, off the
/// consume loop), or `None` for a user that left.
pub type UserRecord = (UserId, Option<Box<UserState>>);

pub struct Engine {
    store: Arc<Store>,
    params: FeatureParams,
    models: Models,
    rules: Rules,
    segment_sizes: Vec<i64>,
    /// Per segment, the sum of its members' predictions.
    segment_outlook: Vec<Outlook>,
    counters: Counters,
    watermark_ms: i64,
    next_sweep_ms: i64,
    next_fit: u64,
    fits_left: u32,
    /// Users removed (erased, evicted) since the last checkpoint, with their shard.
    removed: Vec<(i32, UserId)>,
    /// Whether this engine trains the models (the default) or only applies them: with several
    /// instances, one trains and the others adopt its published models.
    trainer: bool,
    /// Segment descriptions and action candidates, as of one [`Engine::wording_key`].
    descriptions: std::cell::RefCell<Wording>,
    /// Catalogue records decided and not yet taken for publication.
    catalogue_out: Vec<CatalogueRecord>,
}

/// Cached wording of the segments: per segment its description, and the action rules its
/// centroid satisfies (each with the rule's minimum user value and the rendered tag).
#[derive(Default)]
struct Wording {
    key: Option<(u64, u64)>,
    labels: Vec<Option<String>>,
    actions: Option<ActionTable>,
}

/// Per segment, the action rules its centroid meets, in priority order.
type ActionTable = Arc<[Vec<SegmentAction>]>;

/// A user's predictions (or their sum over a segment's members).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Outlook {
    value: f64,
    purchase_probability: f64,
}

impl Outlook {
    fn of(state: &UserState) -> Self {
        Self {
            value: state.predicted_value,
            purchase_probability: f64::from(state.signals.purchase_probability),
        }
    }
}

impl std::ops::AddAssign for Outlook {
    fn add_assign(&mut self, o: Self) {
        self.value += o.value;
        self.purchase_probability += o.purchase_probability;
    }
}

impl std::ops::SubAssign for Outlook {
    fn sub_assign(&mut self, o: Self) {
        self.value -= o.value;
        self.purchase_probability -= o.purchase_probability;
    }
}

/// An action rule a segment's centroid meets: the rule's minimum user value and its tag.
type SegmentAction = (Option<f64>, String);

/// Mini-batches a segment's cached wording may lag its centroid by. A mini-batch step moves a
/// centroid by a fraction 1/n of the way to its batch's mean, so the three features that stand
/// out (the description) and the rules it meets change far more slowly than the model version,
/// which moves every mini-batch: re-wording each segment after every batch was an eighth of the
/// engine's instructions. A fit, a repair or a loaded or adopted model re-words at once.
const WORDING_BATCHES: u64 = 64;

/// Fits after the seeding one, at 4×, 16× and 64× `init_events`.
const REFITS: u32 = 3;
/// Names remembered per category bucket.
const NAMES_PER_BUCKET: usize = 32;

/// How far a segment's affinity to its top category must lead its affinity to its other
/// categories (in the population's standard deviations) for a `{category}` action (cross-sell)
/// to name it: half a standard deviation, the level at which descriptions call a feature out.
/// Below it the segment has no category of its own, and the rule does not apply.
const CROSS_SELL_MIN_Z: f64 = 0.5;

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// What a sweep did with one user.
enum Visit {
    Expired,
    Decided(Decision, Outlook, i64),
    Kept,
}

/// The first version of a new user's changes: 1000 × the event-time watermark (ms). Versions
/// then count up by one per change, so a user erased or evicted and seen again later gets
/// versions above the ones published before, and subscribers dropping repeats by version keep
/// their changes.
fn version_base(watermark_ms: i64) -> i64 {
    watermark_ms.max(0).saturating_mul(1_000)
}

/// Versions per millisecond of the version clock: a user's version is the larger of its last
/// one plus one and processing time × this, so it grows by one per change and jumps with time.
/// 2^10 keeps versions below 2^53 (exact in JSON readers that parse numbers as doubles) until
/// the year 2248, and above the `1000 × event time` of the versions before the clock.
const VERSIONS_PER_MS: i64 = 1 << 10;

/// How far past `max_users` the map may grow (at most) before the least recently seen are
/// evicted down to `max_users`: 1 %, at least one user.
fn eviction_slack(max_users: usize) -> usize {
    (max_users / 100).max(1)
}

/// One user's decision after an event or a sweep.
struct Decision {
    prev: Option<u32>,
    new: u32,
    nearest: Nearest,
    flap: bool,
    /// Same segment, new action: a record with reason `updated`.
    updated: bool,
    /// The user's action in the new segment (what the record says, and is remembered).
    action: Option<String>,
}

impl Engine {
    pub fn new(s: &Settings) -> Self {
        let f = &s.features;
        let m = &s.model;
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
            store: Arc::default(),
            params: FeatureParams::new(f.half_lives.map(|d| d.as_millis() as f64), m.seed),
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
            rules: Rules {
                lateness_ms: ms(f.allowed_lateness),
                late_policy: f.late_policy,
                hysteresis: m.hysteresis,
                min_dwell_events: m.min_dwell_events,
                min_dwell_ms: ms(m.min_dwell),
                flap_window_ms: ms(m.flap_window),
                sweep_ms: ms(m.sweep_interval),
                horizon_ms: ms(m.value_horizon),
                actions: m.actions.clone(),
                half_life_days: f.half_lives.map(|d| d.as_secs_f64() / 86_400.0),
                ttl_ms: ms(s.state.ttl),
                max_users: s.state.max_users,
                publish_updates: s.output.updates,
                version_clock: i64::MIN,
            },
            segment_sizes: vec![0; m.k],
            segment_outlook: vec![Outlook::default(); m.k],
            counters: Counters::default(),
            watermark_ms: i64::MIN,
            next_sweep_ms: i64::MIN,
            next_fit: m.init_events,
            fits_left: 1 + REFITS,
            removed: Vec::new(),
            trainer: true,
            descriptions: Default::default(),
            catalogue_out: Vec::new(),
        }
    }

    /// An engine that starts from a saved model (warm start): no re-seeding, the same ids.
    pub fn with_model(s: &Settings, path: &Path) -> Result<Self, ModelError> {
        let models: Models = serde_json::from_slice(&std::fs::read(path)?)?;
        let models = checked(models, s.model.k)?;
        let mut e = Self::new(s);
        if models.kmeans.is_seeded() {
            e.fits_left = 0;
        }
        e.models = models;
        Ok(e)
    }

    /// Writes the models (not the per-user state) as JSON.
    pub fn save_model(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, serde_json::to_vec(&self.models)?)?;
        Ok(())
    }

    /// The models, counters and sweep schedule, encoded for a checkpoint (no user ids).
    pub fn export_global(&self) -> Vec<u8> {
        let g = GlobalState {
            models: self.models.clone(),
            counters: self.counters,
            watermark_ms: self.watermark_ms,
            next_sweep_ms: self.next_sweep_ms,
            next_fit: self.next_fit,
            fits_left: self.fits_left,
        };
        serde_json::to_vec(&g).unwrap_or_default()
    }

    /// Continues from [`Engine::export_global`]'s output (before restoring users).
    pub fn restore_global(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        let g: GlobalState = serde_json::from_slice(bytes)?;
        self.models = checked(g.models, self.models.kmeans.k())?;
        self.descriptions.take();
        self.counters = g.counters;
        self.watermark_ms = g.watermark_ms;
        self.next_sweep_ms = g.next_sweep_ms;
        self.next_fit = g.next_fit;
        self.fits_left = g.fits_left;
        Ok(())
    }

    /// Versions of decisions made at processing time `now_ms` are at least `now_ms × 2^10`.
    /// A restored user's counter does not know the changes published after the last checkpoint
    /// and lost in a crash; the run after it decides later, so its versions order after them
    /// (as long as instances' clocks agree to within a restart, and a user changes fewer than
    /// 2^10 times a millisecond). Before this, versions restarted from the checkpoint's counter
    /// and one version could mean two decisions.
    fn set_version_clock(&mut self, now_ms: i64) {
        self.rules.version_clock = now_ms.max(0).saturating_mul(VERSIONS_PER_MS);
    }

    /// Makes this engine the models' trainer, or a follower that only applies them.
    pub fn set_trainer(&mut self, trainer: bool) {
        self.trainer = trainer;
    }

    pub fn is_trainer(&self) -> bool {
        self.trainer
    }

    /// The models alone, encoded for other instances to adopt.
    pub fn export_models(&self) -> Vec<u8> {
        serde_json::to_vec(&self.models).unwrap_or_default()
    }

    /// Replaces the models with a trainer's (same ids: its centroid rows). Users keep their
    /// segments until their next event or sweep decides again with the adopted model.
    pub fn adopt_models(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        let models: Models = serde_json::from_slice(bytes)?;
        let models = checked(models, self.models.kmeans.k())?;
        if models.kmeans.is_seeded() {
            self.fits_left = 0;
        }
        self.models = models;
        self.descriptions.take();
        Ok(())
    }

    /// The changelog records of a checkpoint, per shard: for the shards in `full`, every user;
    /// for the others, the users changed or removed since the previous checkpoint (removals
    /// first, so a user erased and then seen again ends present). Clears the change marks.
    pub fn checkpoint(&mut self, full: &[i32]) -> HashMap<i32, Vec<UserRecord>> {
        let mut out: HashMap<i32, Vec<UserRecord>> = HashMap::new();
        for (shard, id) in self.removed.drain(..) {
            if !full.contains(&shard) {
                out.entry(shard).or_default().push((id, None));
            }
        }
        self.store.take_changed(|id, shard, state| {
            if !full.contains(&shard) {
                out.entry(shard)
                    .or_default()
                    .push((id.clone(), Some(Box::new(state.clone()))));
            }
        });
        for &shard in full {
            let records = out.entry(shard).or_default();
            self.store.visit_shard(shard, |id, state| {
                records.push((id.clone(), Some(Box::new(state.clone()))));
            });
        }
        out
    }

    /// Installs the users a shard's changelog restored (replacing any held).
    pub fn restore_shard(&mut self, shard: i32, users: Vec<(UserId, Box<UserState>)>) {
        for (id, state) in users {
            self.count_in(&state);
            self.models.kmeans.offer_user(id.as_str());
            if let Some(old) = self.store.insert(id, shard, state) {
                self.count_out(&old);
            }
        }
    }

    /// Lets go of a shard's users (its partition moved to another instance), silently: they
    /// are not evicted, their new owner restores them. Returns how many were released.
    pub fn release_shard(&mut self, shard: i32) -> usize {
        let gone = self.store.remove_shard(shard);
        for state in &gone {
            self.count_out(state);
        }
        self.removed.retain(|(s, _)| *s != shard);
        gone.len()
    }

    fn count_in(&mut self, state: &UserState) {
        if let Some(s) = state.segment {
            self.segment_sizes[s as usize] += 1;
            self.segment_outlook[s as usize] += Outlook::of(state);
        }
    }

    fn count_out(&mut self, state: &UserState) {
        if let Some(s) = state.segment {
            self.segment_sizes[s as usize] -= 1;
            self.segment_outlook[s as usize] -= Outlook::of(state);
        }
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

impl Engine {
    /// Starts loading `user`'s state into cache, changing nothing: call it for the next event
    /// before applying this one, so that the next state's cache misses overlap this event's
    /// work (a state is 13 cache lines, and nearly all of them are read per event).
    pub fn prefetch(&self, user: &str) {
        self.store.prefetch(user);
    }

    /// Decodes the message after the current one into `spare` and prefetches its user's state
    /// (the consume loop's and the benches' look-ahead). Hand the token to
    /// [`ScratchPair::decode`](crate::decode::ScratchPair::decode) with that message.
    pub fn decode_ahead(
        &self,
        spare: Spare<'_>,
        decoder: &Decoder,
        source: Source,
        payload: &[u8],
        now_ms: Option<i64>,
    ) -> Ahead {
        let (ahead, user) = spare.decode(decoder, source, payload, now_ms);
        if let Some(user) = user {
            self.prefetch(user);
        }
        ahead
    }

    /// Applies one validated event. `now_ms` is only written into `emit_time`.
    pub fn apply(&mut self, event: &Event, now_ms: i64) -> Applied {
        self.apply_in(event, now_ms, 0)
    }

    /// [`Engine::apply`] for an event that arrived on `shard` (its input partition): the user's
    /// checkpoints belong to that shard.
    pub fn apply_in(&mut self, event: &Event, now_ms: i64, shard: i32) -> Applied {
        self.set_version_clock(now_ms);
        let t = event.event_time();
        self.watermark_ms = self.watermark_ms.max(t);
        if self.next_sweep_ms == i64::MIN {
            self.next_sweep_ms = t.saturating_add(self.rules.sweep_ms);
        }
        if self.trainer {
            self.remember_category(event);
        }
        let trainer = self.trainer;
        let version_base = version_base(self.watermark_ms);
        let mut new_user = false;
        let actions = self.action_table();
        let (params, rules, models) = (&self.params, &self.rules, &mut self.models);
        let step = self.store.update_in(event.user_id(), shard, |state| {
            if state.events > 0 && state.is_duplicate(event.event_id()) {
                return Err(Outcome::Duplicate);
            }
            let late = state.events > 0 && t < state.anchor_ms.saturating_sub(rules.lateness_ms);
            if late && rules.late_policy == LatePolicy::DeadLetter {
                return Err(Outcome::Late { applied: false });
            }
            if state.events == 0 {
                new_user = true;
                models.kmeans.offer_user(event.user_id());
                state.version = version_base;
            }
            models.mature_label(state, t, rules.horizon_ms, trainer);
            if let Some(w) = state.label.as_mut() {
                // Strictly after the window opened: what the features at its start include is
                // not also a label (that would teach "a purchase now predicts spend").
                if t > w.start_ms {
                    w.spend += UserState::net_spend(event);
                }
            }
            state.apply(event, params);
            state.events_in_segment = state.events_in_segment.saturating_add(1);
            let after = state.vector(params);
            models.open_label(state, t, &after);
            let view = (&after, params, &*actions);
            let (old, decision) = models.update_user(state, view, t, rules, trainer);
            let outcome = if late {
                Outcome::Late { applied: true }
            } else {
                Outcome::Applied
            };
            Ok((outcome, old, Outlook::of(state), decision, state.version))
        });
        let mut changes = Vec::new();
        let outcome = match step {
            Err(o) => {
                match o {
                    Outcome::Duplicate => self.counters.duplicates += 1,
                    _ => self.counters.late += 1,
                }
                o
            }
            Ok((outcome, old, predicted, decision, version)) => {
                self.counters.applied += 1;
                if matches!(outcome, Outcome::Late { .. }) {
                    self.counters.late += 1;
                }
                self.account(old, predicted, decision.as_ref());
                if let Some(d) = decision {
                    changes.push(self.change(event.user_id(), &d, predicted, version, t, now_ms));
                }
                outcome
            }
        };
        if self.trainer && self.counters.applied >= self.next_fit && self.fits_left > 0 {
            self.fit();
            self.review_catalogue(now_ms);
        }
        if self.watermark_ms >= self.next_sweep_ms {
            changes.extend(self.sweep(now_ms));
        }
        // Only a new user can take the map past its bound (and counting the map locks each of
        // its shards: not something to do per event).
        if new_user
            && self.store.len() >= self.rules.max_users + eviction_slack(self.rules.max_users)
        {
            changes.extend(self.evict_least_recent(now_ms));
        }
        Applied { outcome, changes }
    }

    /// Keeps segment sizes and value sums in step with one user's update.
    fn account(&mut self, old: (Option<u32>, Outlook), now: Outlook, d: Option<&Decision>) {
        if account(
            &mut self.segment_sizes,
            &mut self.segment_outlook,
            old,
            now,
            d,
        ) {
            self.counters.flaps += 1;
        }
    }

    fn change(
        &self,
        user: &str,
        d: &Decision,
        now: Outlook,
        version: i64,
        event_time: i64,
        now_ms: i64,
    ) -> SegmentChange {
        let n = d.nearest;
        let confidence = if n.second_dist.is_finite() && n.second_dist > 0.0 {
            (1.0 - n.best_dist / n.second_dist).clamp(0.0, 1.0)
        } else {
            1.0
        };
        SegmentChange {
            user_id: user.to_owned(),
            previous_segment: d.prev.map(|p| p as i32),
            new_segment: d.new as i32,
            segment_label: self.published_label(d.new as usize),
            distance: n.best_dist,
            confidence,
            predicted_value: now.value,
            version,
            reason: if d.updated {
                ChangeReason::Updated
            } else if d.prev.is_some() {
                ChangeReason::Moved
            } else {
                ChangeReason::FirstAssignment
            },
            event_time,
            emit_time: now_ms,
            model_version: self.models.kmeans.version() as i64,
            action: d.action.clone(),
            purchase_probability: Some(now.purchase_probability),
            catalogue_version: self.models.catalogue.version(),
        }
    }

    fn remember_category(&mut self, event: &Event) {
        let mut note = |c: &str| {
            if c.is_empty() {
                return;
            }
            let names = &mut self.models.category_names[category_bucket(c)];
            if let Some(n) = names.get_mut(c) {
                *n += 1;
            } else if names.len() < NAMES_PER_BUCKET {
                names.insert(c.to_owned(), 1);
            }
        };
        match event {
            Event::Click(c) => note(&c.category),
            Event::Purchase(p) => p.items.iter().for_each(|i| note(&i.category)),
            Event::Social(s) => note(s.target_category.as_deref().unwrap_or("")),
        }
    }

    /// Seeds or refits k-means on the sampled users' current vectors.
    fn fit(&mut self) {
        let points: Vec<Vector> = self
            .models
            .kmeans
            .sample()
            .iter()
            .filter_map(|u| self.store.get(u))
            .map(|s| self.models.scaler.transform(&s.vector(&self.params)))
            .collect();
        if points.len() < self.models.kmeans.k() {
            // Too few users yet: try again a little later.
            self.next_fit = self.counters.applied + self.counters.applied.max(1) / 2;
            return;
        }
        self.models.kmeans.fit(&points);
        self.fits_left -= 1;
        self.next_fit = self.counters.applied.saturating_mul(4);
    }

    /// Moves the event-time watermark to `t` (if later) and sweeps there: replay ends with this
    /// so the final state is "as of" a chosen time, idle users decayed to it.
    pub fn advance_to(&mut self, t: i64, now_ms: i64) -> Vec<SegmentChange> {
        self.watermark_ms = self.watermark_ms.max(t);
        self.sweep(now_ms)
    }

    /// Visits every user at the event-time watermark: matures value labels whose horizon passed
    /// (idle users' labels too, so the value model also learns from users who stopped buying),
    /// and re-assigns users to the drifted centroids. Returns the resulting segment changes.
    pub fn sweep(&mut self, now_ms: i64) -> Vec<SegmentChange> {
        self.set_version_clock(now_ms);
        let at = self.watermark_ms;
        self.next_sweep_ms = at.saturating_add(self.rules.sweep_ms);
        self.counters.sweeps += 1;
        let trainer = self.trainer;
        let actions = self.action_table();
        let (params, rules, models) = (&self.params, &self.rules, &mut self.models);
        let (sizes, sums) = (&mut self.segment_sizes, &mut self.segment_outlook);
        let mut decided = Vec::new();
        let mut expired = Vec::new();
        let (mut matured, mut flaps) = (0, 0);
        let idle_before = at.saturating_sub(rules.ttl_ms);
        for user in self.store.sorted_ids() {
            let visit = self.store.update(user.as_str(), |state| {
                if state.anchor_ms < idle_before {
                    return Visit::Expired;
                }
                let x = state.vector_at(at, params);
                if models.mature_label(state, at, rules.horizon_ms, trainer) {
                    matured += 1;
                }
                models.open_label(state, at, &x);
                // Standardisation and centroids learn from the population as of now, too:
                // otherwise z-scores (and so descriptions) compare everyone's present with the
                // moment of their last event, and every segment reads "lapsed"; and centroids
                // would describe only the recently active users' vectors.
                let (old, d) =
                    models.update_user(state, (&x, params, &actions), at, rules, trainer);
                let now = Outlook::of(state);
                if account(sizes, sums, old, now, d.as_ref()) {
                    flaps += 1;
                }
                d.map_or(Visit::Kept, |d| Visit::Decided(d, now, state.version))
            });
            match visit {
                Visit::Expired => expired.push(user),
                Visit::Decided(d, predicted, version) => {
                    decided.push((user, d, predicted, version))
                }
                Visit::Kept => {}
            }
        }
        self.counters.labels_matured += matured;
        self.counters.flaps += flaps;
        let mut changes: Vec<SegmentChange> = decided
            .into_iter()
            .map(|(user, d, predicted, version)| {
                self.change(user.as_str(), &d, predicted, version, at, now_ms)
            })
            .collect();
        for user in expired {
            changes.extend(self.remove_user(user.as_str(), ChangeReason::Evicted, now_ms));
        }
        self.review_catalogue(now_ms);
        changes
    }

    /// Decides what the catalogue topic must be told (trainer only: the other instances adopt
    /// its models, and the catalogue with them), as of the centroids now.
    fn review_catalogue(&mut self, now_ms: i64) {
        if !self.trainer || !self.models.kmeans.is_seeded() {
            return;
        }
        let now: Vec<Current> = (0..self.models.kmeans.k())
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
        let splits = self.models.kmeans.take_splits();
        let clock = self.rules.version_clock;
        let decided = self.models.catalogue.review(&now, &splits, clock);
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
                model_version: self.models.kmeans.version() as i64,
                emit_time: now_ms,
            });
        }
    }

    /// Catalogue records decided since the last call, for the catalogue topic.
    pub fn take_catalogue(&mut self) -> Vec<CatalogueRecord> {
        std::mem::take(&mut self.catalogue_out)
    }

    /// Whether catalogue records wait to be taken (cheap: for the per-event path).
    pub fn has_catalogue(&self) -> bool {
        !self.catalogue_out.is_empty()
    }

    /// The description subscribers were given for segment `j`: the catalogue's, or (before
    /// the catalogue has one) the current wording.
    fn published_label(&self, j: usize) -> String {
        match self.models.catalogue.label(j) {
            Some(l) => l.to_owned(),
            None => self.describe(j),
        }
    }

    /// Segment `j`'s centroid as unweighted z-scores (empty before seeding).
    fn centroid_z(&self, j: usize) -> Vec<f64> {
        self.models.kmeans.centroids().map_or_else(Vec::new, |c| {
            (0..DIM)
                .map(|i| {
                    let w = self.models.scaler.weight(i);
                    if w > 0.0 {
                        c[[j, i]] / w
                    } else {
                        0.0
                    }
                })
                .collect()
        })
    }

    /// Evicts the least recently seen users (by latest event time, then id) down to
    /// `state.max_users`. Runs when the bound is exceeded by a small slack, so its cost (a pass
    /// over all users) is spread over many new users.
    fn evict_least_recent(&mut self, now_ms: i64) -> Vec<SegmentChange> {
        let mut all = self.store.recency();
        let excess = all.len().saturating_sub(self.rules.max_users);
        if excess == 0 {
            return Vec::new();
        }
        all.select_nth_unstable(excess - 1);
        let mut victims: Vec<UserId> = all.drain(..excess).map(|(_, id)| id).collect();
        victims.sort_unstable();
        victims
            .into_iter()
            .filter_map(|u| self.remove_user(u.as_str(), ChangeReason::Evicted, now_ms))
            .collect()
    }

    /// When the cached wording is stale: after a fit or repair (each moves centroids at once),
    /// and every [`WORDING_BATCHES`] mini-batches.
    fn wording_key(&self) -> (u64, u64) {
        let km = &self.models.kmeans;
        (km.reshapes(), km.version() / WORDING_BATCHES)
    }

    /// The wording cache, emptied first if stale. A change is published for about a third of
    /// events, and wording a segment costs microseconds.
    fn wording(&self) -> std::cell::RefMut<'_, Wording> {
        let key = self.wording_key();
        let mut cache = self.descriptions.borrow_mut();
        if cache.key != Some(key) {
            let k = self.models.kmeans.k();
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

    fn describe_now(&self, j: usize) -> String {
        let Some(c) = self.models.kmeans.centroids() else {
            return String::new();
        };
        // Only features standing out by half a standard deviation or more are worded: the
        // others are left out before sorting (this runs for most published changes, as the
        // model version moves every mini-batch).
        let mut feats: Vec<(usize, f64)> = (0..DIM)
            .filter(|&i| self.models.scaler.weight(i) > 0.0)
            .map(|i| (i, c[[j, i]] / self.models.scaler.weight(i)))
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
            if let Some(p) = self.phrase(i, name, z) {
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

    fn phrase(&self, i: usize, name: &str, z: f64) -> Option<String> {
        let high = z > 0.0;
        let pick = |h: &str, l: &str| Some(if high { h } else { l }.to_owned());
        if let Some((kind, suffix)) = name.split_once("_per_day_") {
            let h = ["short", "medium", "long"]
                .iter()
                .position(|s| *s == suffix)?;
            let days = self.rules.half_life_days[h];
            let what = kind.replace('_', " ");
            return Some(format!(
                "{} {days:.0}-day {what}",
                if high { "high" } else { "low" }
            ));
        }
        match name {
            "recency_days" => pick("lapsed buyer", "recent buyer"),
            "frequency" => pick("frequent buyer", "rarely buys"),
            "monetary" => Some(format!(
                "{} {:.0}-day spend",
                if high { "high" } else { "low" },
                self.rules.half_life_days[2]
            )),
            "basket_size" => pick("large baskets", "small baskets"),
            "avg_unit_price" => pick("premium products", "low-price products"),
            "cancel_rate" => pick("often cancels or returns", "rarely cancels"),
            "engagements" => pick("socially active", "socially quiet"),
            "reviews" => pick("frequent reviewer", "rarely reviews"),
            "mean_rating" => pick("positive reviewer", "critical reviewer"),
            "sentiment" => pick("positive reviews", "negative reviews"),
            n if n.starts_with("category_") && high => {
                let b = i - CATEGORY_START;
                Some(format!("strong affinity to {}", self.category_name(b)))
            }
            _ => None,
        }
    }

    /// The most frequent category name seen in bucket `b`.
    fn category_name(&self, b: usize) -> String {
        self.models.category_names[b]
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
    fn top_category(&self, j: usize) -> Option<String> {
        let c = self.models.kmeans.centroids()?;
        let known: Vec<(usize, f64)> = (0..CATEGORY_BUCKETS)
            .filter(|&b| !self.models.category_names[b].is_empty())
            .filter_map(|b| {
                let w = self.models.scaler.weight(CATEGORY_START + b);
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
        self.models.category_names[best]
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(n, _)| n.clone())
    }

    /// The action of segment `j` regardless of users' values: its first rule without a minimum.
    fn action(&self, j: usize) -> Option<String> {
        self.action_table()
            .get(j)?
            .iter()
            .find(|(min, _)| min.is_none())
            .map(|(_, tag)| tag.clone())
    }

    /// Every segment's action rules, as of the cached wording.
    fn action_table(&self) -> ActionTable {
        let mut cache = self.wording();
        cache
            .actions
            .get_or_insert_with(|| {
                (0..self.models.kmeans.k())
                    .map(|j| self.segment_actions(j))
                    .collect()
            })
            .clone()
    }

    /// The action rules whose centroid conditions segment `j` meets, in order, with their
    /// minimum user value and rendered tag.
    fn segment_actions(&self, j: usize) -> Vec<SegmentAction> {
        let Some(c) = self.models.kmeans.centroids() else {
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
                let w = self.models.scaler.weight(i);
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

    /// Erases a user (right to be forgotten): their state leaves memory and the model's sample,
    /// and a change with reason `erased` is returned for publication (its `new_segment` is the
    /// last segment held, or -1 if none was). `None` for an unknown user. Later events of the
    /// user start from nothing.
    pub fn erase(&mut self, user: &str, now_ms: i64) -> Option<SegmentChange> {
        let change = self.remove_user(user, ChangeReason::Erased, now_ms)?;
        self.counters.erased += 1;
        Some(change)
    }

    /// Removes a user (erased or evicted): out of memory and the model's sample, a removal for
    /// the next checkpoint, and the change to publish. `None` for an unknown user.
    fn remove_user(
        &mut self,
        user: &str,
        reason: ChangeReason,
        now_ms: i64,
    ) -> Option<SegmentChange> {
        self.set_version_clock(now_ms);
        let (shard, state) = self.store.remove(user)?;
        self.models.kmeans.forget_user(user);
        self.count_out(&state);
        self.removed.push((shard, UserId::new(user)));
        if reason == ChangeReason::Evicted {
            self.counters.evicted += 1;
        }
        Some(SegmentChange {
            user_id: user.to_owned(),
            previous_segment: state.segment.map(|s| s as i32),
            new_segment: state.segment.map_or(-1, |s| s as i32),
            segment_label: state
                .segment
                .map_or_else(String::new, |s| self.published_label(s as usize)),
            distance: 0.0,
            confidence: 0.0,
            predicted_value: 0.0,
            version: (state.version + 1).max(self.rules.version_clock),
            reason,
            event_time: self.watermark_ms.max(state.anchor_ms),
            emit_time: now_ms,
            model_version: self.models.kmeans.version() as i64,
            action: None,
            purchase_probability: Some(0.0),
            catalogue_version: self.models.catalogue.version(),
        })
    }

    /// A shared handle on the per-user map, for concurrent readers (the HTTP API).
    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Events applied so far.
    pub fn applied(&self) -> u64 {
        self.counters.applied
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

    /// Each segment's share of the points k-means absorbed (decayed by forgetting), by id: the
    /// segment sizes a model alone knows, without users.
    pub fn segment_shares(&self) -> Vec<f64> {
        let counts = self.models.kmeans.counts();
        let total: f64 = counts.iter().sum();
        counts
            .iter()
            .map(|c| if total > 0.0 { c / total } else { 0.0 })
            .collect()
    }

    pub fn kmeans_repairs(&self) -> u64 {
        self.models.kmeans.repairs()
    }

    /// Progressive (mean absolute, root mean squared) error of the predicted value, in
    /// currency, and the number of labels it learned from.
    pub fn value_errors(&self) -> (f64, f64, u64) {
        let v = &self.models.value;
        let (mae, rmse) = v.errors();
        (mae, rmse, v.labels())
    }

    /// Progressive calibration of the predicted value (Σ predicted ÷ Σ actual over matured
    /// labels) and log loss of the purchase propensity.
    pub fn value_calibration(&self) -> (f64, f64) {
        let v = &self.models.value;
        (v.calibration(), v.log_loss())
    }

    /// Progressive AUC of the propensity and Pearson, Gini and deciles of the value model.
    pub fn value_validation(&self) -> crate::validation::Report {
        self.models.value.validation()
    }

    /// Where predicted values come from now: `cold_start` (each user's own recent spend rate
    /// over the horizon), `blended` (moving to the model as it learns) or `model`.
    pub fn value_source(&self) -> &'static str {
        match self.models.value.maturity() {
            w if w <= 0.0 => "cold_start",
            w if w < 1.0 => "blended",
            _ => "model",
        }
    }

    /// Mean distance of recent events' vectors to their nearest centroid (exponentially
    /// weighted over about a thousand events), in model space: the k-means quality signal.
    pub fn mean_distance(&self) -> f64 {
        self.models.distance_ewma
    }

    /// Each segment's size and its members' mean predictions (cheap: kept up to date per event).
    pub fn segment_figures(&self) -> Vec<SegmentFigures> {
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
        let Some(c) = self.models.kmeans.centroids() else {
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
                let x = s.vector_at(self.watermark_ms, &self.params);
                let z = self.models.scaler.transform(&x);
                UserDump {
                    user_id: id.as_str().to_owned(),
                    segment: s.segment,
                    predicted_value: s.predicted_value,
                    purchase_probability: self.models.value.purchase_probability(&z),
                    events: s.events,
                    features: s
                        .named_at(self.watermark_ms, &self.params)
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
                    .models
                    .scaler
                    .transform(&s.vector_at(self.watermark_ms, &self.params));
                s.segment.map(|seg| (id.as_str().to_owned(), seg, z))
            })
            .collect()
    }

    pub fn feature_params(&self) -> &FeatureParams {
        &self.params
    }
}

/// Segment sizes and value sums after one user's update; returns whether the move was a flap.
fn account(
    sizes: &mut [i64],
    sums: &mut [Outlook],
    (old_seg, old): (Option<u32>, Outlook),
    now: Outlook,
    d: Option<&Decision>,
) -> bool {
    match (old_seg, d) {
        (Some(s), None) => {
            sums[s as usize] += now;
            sums[s as usize] -= old;
        }
        (_, Some(d)) => {
            if let Some(p) = d.prev {
                sizes[p as usize] -= 1;
                sums[p as usize] -= old;
            }
            sizes[d.new as usize] += 1;
            sums[d.new as usize] += now;
            return d.flap;
        }
        (None, None) => {}
    }
    false
}

/// Minimum dwell: enough of the user's events, or enough event time, since the user's last
/// record (entering the segment, or an `updated` record in it).
fn dwelt(state: &UserState, t: i64, rules: &Rules) -> bool {
    state.events_in_segment >= rules.min_dwell_events
        || t.saturating_sub(state.segment_since_ms) >= rules.min_dwell_ms
}

/// The action of a user in segment `j`: the first of its rules (`actions[j]`, in priority
/// order) whose minimum value the user's predicted value reaches, with hysteresis: the action
/// last published still applies while the value stays within `hysteresis` (a fraction) below
/// its rule's minimum, so a value hovering at a tier's edge does not chatter.
fn user_action<'a>(
    actions: &'a [Vec<SegmentAction>],
    j: u32,
    state: &UserState,
    hysteresis: f64,
) -> Option<&'a str> {
    let (value, published) = (state.predicted_value, state.signals.published_action);
    actions
        .get(j as usize)?
        .iter()
        .find(|(min, tag)| {
            min.is_none_or(|m| {
                value >= m
                    || (value >= m - hysteresis * m.abs()
                        && action_tag_hash(Some(tag)) == published)
            })
        })
        .map(|(_, tag)| tag.as_str())
}

impl Models {
    /// Expected net spend over the horizon, in currency.
    fn predict(&self, z: &Vector) -> f64 {
        self.value.predict(z)
    }

    /// Delayed labels: when a user's window has reached the horizon at `t`, the net spend seen
    /// in it is the label for the features at its start. Returns whether a label matured.
    /// Only a trainer learns from it; other instances drop it (they adopt the trainer's model).
    fn mature_label(&mut self, state: &mut UserState, t: i64, horizon: i64, train: bool) -> bool {
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
    fn open_label(&self, state: &mut UserState, t: i64, x: &Vector) {
        if state.label.is_none() {
            state.label = Some(LabelWindow::open(t, x));
        }
    }

    /// One user's vector `x` at `t` through the models: standardised (the scaler learns from it
    /// if `learn`), a new predicted value (blended with the user's cold-start estimate while
    /// the value model is young), and the segment decision (k-means learns from it if `learn`).
    /// Returns the (segment, predicted value) before, and the decision if it changed.
    fn update_user(
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

    /// A record for a user whose action changed without a move (reason `updated`): when the
    /// action the user's segment and value give differs from the one last published, after the
    /// minimum dwell since the user's last record (so at most one per dwell).
    fn retag(
        &self,
        state: &mut UserState,
        z: &Vector,
        t: i64,
        rules: &Rules,
        actions: &[Vec<SegmentAction>],
    ) -> Option<Decision> {
        let cur = state.segment?;
        let tag = user_action(actions, cur, state, rules.hysteresis);
        let hash = action_tag_hash(tag);
        if state.signals.published_action == UNKNOWN_ACTION {
            // A state restored from before actions were remembered adopts its action silently.
            state.signals.published_action = hash;
            return None;
        }
        if hash == state.signals.published_action || !dwelt(state, t, rules) {
            return None;
        }
        let nearest = self.kmeans.nearest(z)?;
        let best_dist = self.kmeans.distance_to(cur as usize, z);
        let second_dist = if nearest.best == cur as usize {
            nearest.second_dist
        } else {
            nearest.best_dist
        };
        state.signals.published_action = hash;
        state.segment_since_ms = t;
        state.events_in_segment = 0;
        state.version = (state.version + 1).max(rules.version_clock);
        Some(Decision {
            prev: Some(cur),
            new: cur,
            nearest: Nearest {
                best: cur as usize,
                best_dist,
                second_dist,
            },
            flap: false,
            updated: true,
            action: tag.map(Into::into),
        })
    }

    /// Learns from `z` (on events) and decides the user's segment, with hysteresis, minimum
    /// dwell and flap detection. Returns the decision when the segment changes.
    fn decide(
        &mut self,
        state: &mut UserState,
        z: &Vector,
        t: i64,
        rules: &Rules,
        learn: bool,
    ) -> Option<Decision> {
        let nearest = self.kmeans.nearest(z)?;
        if learn {
            self.kmeans.learn(nearest.best, z, t);
            // About the last thousand events.
            self.distance_ewma += (nearest.best_dist - self.distance_ewma) * 1e-3;
        }
        let best = nearest.best as u32;
        let prev = state.segment;
        if let Some(cur) = prev {
            if cur == best
                || !dwelt(state, t, rules)
                || nearest.best_dist
                    >= self.kmeans.distance_to(cur as usize, z) * (1.0 - rules.hysteresis)
            {
                return None;
            }
        }
        let flap = matches!(state.left_segment, Some((s, left)) if s == best && t.saturating_sub(left) <= rules.flap_window_ms);
        if let Some(cur) = prev {
            state.left_segment = Some((cur, t));
        }
        state.segment = Some(best);
        state.segment_since_ms = t;
        state.events_in_segment = 0;
        state.version = (state.version + 1).max(rules.version_clock);
        Some(Decision {
            prev,
            new: best,
            nearest,
            flap,
            updated: false,
            action: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::event::{ClickEvent, ClickKind};
    use crate::generate::Generator;

    const T0: i64 = 1_700_000_000_000;

    #[test]
    fn a_model_alone_knows_each_segments_share_of_the_population() {
        let mut e = Engine::new(&RawConfig::default().validate().unwrap());
        assert!(e.segment_shares().iter().all(|s| *s == 0.0));
        let mut g = Generator::new(5, 500, 0.0);
        for i in 0..8_000 {
            let t = T0 + i * 100;
            e.apply(&g.next_event(t), t);
        }
        let shares = e.segment_shares();
        assert_eq!(shares.len(), 6);
        assert!(
            (shares.iter().sum::<f64>() - 1.0).abs() < 1e-9,
            "{shares:?}"
        );
        assert!(
            shares.iter().all(|s| *s > 0.02),
            "every persona has weight: {shares:?}"
        );
    }

    #[test]
    fn before_any_label_matures_value_and_propensity_are_the_users_own_rates_and_say_so() {
        let mut e = Engine::new(&RawConfig::default().validate().unwrap());
        let order = Event::Purchase(crate::event::PurchaseEvent {
            event_id: "o1".into(),
            user_id: "buyer".into(),
            event_time: T0,
            order_id: "o1".into(),
            status: crate::event::OrderStatus::Placed,
            items: vec![crate::event::LineItem {
                product_id: "p".into(),
                category: "home".into(),
                quantity: 1,
                unit_price: 80.0,
                description: None,
            }],
            total: 80.0,
            currency: "GBP".into(),
        });
        e.apply(&order, T0);
        e.apply(&click("c1", "browser", T0), T0);
        assert_eq!(e.value_source(), "cold_start");
        let value = e.user("buyer").unwrap().predicted_value;
        // ln 2 · 30 days / the 30-day long half-life of the order.
        assert!((50.0..=60.0).contains(&value), "{value}");
        assert_eq!(e.user("browser").unwrap().predicted_value, 0.0);
        // Propensity from the same rate: ln 2 expected orders in 30 days, 1 − e^(−ln 2) = ½.
        let p = e.user("buyer").unwrap().signals.purchase_probability;
        assert!((0.49..=0.51).contains(&p), "{p}");
        let browser = e.user("browser").unwrap().signals.purchase_probability;
        assert_eq!(browser, 0.0);
    }

    fn order(id: &str, user: &str, t: i64, total: f64, status: crate::event::OrderStatus) -> Event {
        Event::Purchase(crate::event::PurchaseEvent {
            event_id: id.into(),
            user_id: user.into(),
            event_time: t,
            order_id: "o".into(),
            status,
            items: vec![crate::event::LineItem {
                product_id: "p".into(),
                category: "home".into(),
                quantity: 1,
                unit_price: total,
                description: None,
            }],
            total,
            currency: "GBP".into(),
        })
    }

    #[test]
    fn a_value_tier_is_entered_at_its_minimum_and_left_below_it_by_the_hysteresis() {
        let rules: Vec<SegmentAction> = vec![(Some(100.0), "vip".into()), (None, "nurture".into())];
        let table = [rules];
        let mut s = UserState::default();
        let at = |s: &UserState| user_action(&table, 0, s, 0.1);
        s.predicted_value = 99.0;
        assert_eq!(at(&s), Some("nurture"));
        s.predicted_value = 100.0;
        assert_eq!(at(&s), Some("vip"));
        s.signals.published_action = action_tag_hash(Some("vip"));
        s.predicted_value = 91.0;
        assert_eq!(at(&s), Some("vip"), "kept within 10 % below the minimum");
        s.predicted_value = 89.0;
        assert_eq!(at(&s), Some("nurture"));
        assert_eq!(user_action(&table, 5, &s, 0.1), None, "no such segment");
    }

    /// A new user of a trained engine (cold-start values: the user's own spend rate) orders,
    /// browses, is refunded, browses; with one action rule, `vip` from a value of 10. Returns
    /// the engine and the user's records.
    fn vip_for_a_while(updates: bool) -> (Engine, Vec<SegmentChange>) {
        use crate::event::OrderStatus::{Placed, Refunded};
        let mut raw = RawConfig::default();
        let rule = |tag: &str, min| crate::config::ActionRule {
            tag: tag.into(),
            feature: None,
            min_z: None,
            max_z: None,
            min_user_value: min,
        };
        raw.model.actions = vec![rule("vip", Some(10.0))];
        // Moves need the user 10× nearer another segment: this user stays where they are.
        raw.model.hysteresis = 0.9;
        raw.model.min_dwell_events = 3;
        raw.model.min_dwell = std::time::Duration::from_secs(30 * 86_400);
        raw.output.updates = updates;
        let (mut e, _) = trained(raw, 20_000);
        assert_eq!(
            e.value_source(),
            "cold_start",
            "values are the user's own spend rate"
        );
        let mut t = T0 + 20_000 * 1_000;
        let mut records = Vec::new();
        let mut send = |e: &mut Engine, event: &dyn Fn(i64) -> Event| {
            t += 1_000;
            let applied = e.apply(&event(t), t);
            records.extend(
                applied
                    .changes
                    .into_iter()
                    .filter(|c| c.user_id == "newbie"),
            );
        };
        send(&mut e, &|t| click("n1", "newbie", t));
        send(&mut e, &|t| order("n2", "newbie", t, 100.0, Placed));
        for i in 0..10 {
            send(&mut e, &|t| click(&format!("n3-{i}"), "newbie", t));
        }
        send(&mut e, &|t| order("n4", "newbie", t, 100.0, Refunded));
        for i in 0..10 {
            send(&mut e, &|t| click(&format!("n5-{i}"), "newbie", t));
        }
        (e, records)
    }

    #[test]
    fn an_action_change_without_a_move_publishes_one_updated_record_per_dwell() {
        let (e, records) = vip_for_a_while(true);
        let reasons: Vec<_> = records
            .iter()
            .map(|c| (c.reason, c.action.as_deref()))
            .collect();
        assert_eq!(
            reasons,
            [
                (ChangeReason::FirstAssignment, None),
                (ChangeReason::Updated, Some("vip")),
                (ChangeReason::Updated, None),
            ],
            "{records:#?}"
        );
        let (first, vip, lapsed) = (&records[0], &records[1], &records[2]);
        assert_eq!(vip.previous_segment, Some(first.new_segment));
        assert_eq!(vip.new_segment, first.new_segment);
        assert!(first.version < vip.version && vip.version < lapsed.version);
        // Published at the third event after the first record (the dwell), not at the order.
        assert_eq!(vip.event_time - first.event_time, 3_000);
        assert!(vip.predicted_value >= 10.0 && lapsed.predicted_value < 9.0);
        assert_eq!(
            e.user("newbie").unwrap().segment,
            Some(first.new_segment as u32)
        );
    }

    #[test]
    fn with_updates_off_only_moves_are_published() {
        let (_, records) = vip_for_a_while(false);
        let reasons: Vec<_> = records.iter().map(|c| c.reason).collect();
        assert_eq!(reasons, [ChangeReason::FirstAssignment]);
    }

    fn click(id: &str, user: &str, t: i64) -> Event {
        Event::Click(ClickEvent {
            event_id: id.into(),
            user_id: user.into(),
            event_time: t,
            session_id: "s".into(),
            kind: ClickKind::View,
            product_id: "p".into(),
            category: "home".into(),
            price: 1.0,
            dwell_ms: 1000,
            search_text: None,
            embedding: None,
        })
    }

    /// Persona traffic through an engine: (engine, generator).
    fn trained(raw: RawConfig, events: usize) -> (Engine, Generator) {
        let mut e = Engine::new(&raw.validate().unwrap());
        let mut g = Generator::new(3, 600, 0.0);
        let mut t = T0;
        for _ in 0..events {
            t += 1_000;
            e.apply(&g.next_event(t), t);
        }
        (e, g)
    }

    /// The consume loop's order (decode the next message, prefetch its user, then apply the
    /// current one) gives the same outcomes, changes, states and models as one message at a
    /// time: prefetching only warms caches (it creates no user, even for one not seen yet).
    #[test]
    fn prefetching_the_next_user_changes_nothing() {
        let settings = RawConfig::default().validate().unwrap();
        let d = crate::decode::Decoder::new(settings.decode.clone());
        let mut g = Generator::new(8, 300, 0.05);
        let records: Vec<_> = (0..6_000)
            .map(|i| g.next_record(T0 + i * 1_000, &settings.decode))
            .collect();
        let now = T0 + 10_000_000;
        let (mut plain, mut ahead_engine) = (Engine::new(&settings), Engine::new(&settings));
        let mut pair = crate::decode::ScratchPair::default();
        let mut ahead = None;
        let mut prefetched_new = 0;
        for (i, r) in records.iter().enumerate() {
            let expected = d
                .decode(r.source, &r.payload, Some(now))
                .map(|e| plain.apply(&e, now));
            let got = match pair.decode(&d, r.source, &r.payload, Some(now), ahead.take()) {
                Ok((event, spare)) => {
                    if let Some(n) = records.get(i + 1) {
                        let (token, user) = spare.decode(&d, n.source, &n.payload, Some(now));
                        if let Some(user) = user {
                            let known = ahead_engine.user(user).is_some();
                            ahead_engine.prefetch(user);
                            assert_eq!(ahead_engine.user(user).is_some(), known);
                            prefetched_new += usize::from(!known);
                        }
                        ahead = Some(token);
                    }
                    Ok(ahead_engine.apply(event, now))
                }
                Err(e) => Err(e),
            };
            match (expected, got) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.outcome, b.outcome, "record {i}");
                    assert_eq!(a.changes, b.changes, "record {i}");
                }
                (a, b) => assert_eq!(a.err(), b.err(), "record {i}"),
            }
        }
        assert!(prefetched_new > 100, "{prefetched_new}");
        assert_eq!(plain.store.snapshot(), ahead_engine.store.snapshot());
        // As JSON values: the category names are maps in per-process hash order.
        let models = |e: &Engine| -> serde_json::Value {
            serde_json::from_slice(&e.export_models()).unwrap()
        };
        assert!(models(&plain) == models(&ahead_engine), "the models differ");
    }

    #[test]
    fn duplicates_are_ignored_and_late_events_follow_the_policy() {
        let mut raw = RawConfig::default();
        raw.features.late_policy = LatePolicy::DeadLetter;
        let mut e = Engine::new(&raw.validate().unwrap());
        assert_eq!(e.apply(&click("a", "u", T0), 0).outcome, Outcome::Applied);
        assert_eq!(e.apply(&click("a", "u", T0), 0).outcome, Outcome::Duplicate);
        let later = T0 + 3 * 3_600_000;
        assert_eq!(
            e.apply(&click("b", "u", later), 0).outcome,
            Outcome::Applied
        );
        // 3 h older than the user's latest event, the allowed lateness is 1 h.
        assert_eq!(
            e.apply(&click("c", "u", T0), 0).outcome,
            Outcome::Late { applied: false }
        );
        assert_eq!(e.user("u").unwrap().events, 2);
        let c = e.counters();
        assert_eq!((c.applied, c.duplicates, c.late), (2, 1, 1));

        let mut e = Engine::new(&RawConfig::default().validate().unwrap());
        e.apply(&click("b", "u", later), 0);
        assert_eq!(
            e.apply(&click("c", "u", T0), 0).outcome,
            Outcome::Late { applied: true }
        );
        assert_eq!(e.user("u").unwrap().events, 2);
    }

    #[test]
    fn value_model_ranks_big_spenders_first() {
        let mut raw = RawConfig::default();
        raw.model.value_horizon = std::time::Duration::from_secs(3_600);
        raw.model.sweep_interval = std::time::Duration::from_secs(600);
        let (e, g) = trained(raw, 60_000);
        let (_, _, labels) = e.value_errors();
        assert!(labels > 1_000, "labels matured: {labels}");
        let mut by_persona: HashMap<usize, (f64, f64)> = HashMap::new();
        for u in e.dump() {
            let p = g.persona_of(&u.user_id).unwrap();
            let entry = by_persona.entry(p).or_default();
            entry.0 += u.predicted_value;
            entry.1 += 1.0;
        }
        let mean = |p: usize| by_persona[&p].0 / by_persona[&p].1;
        let big = (0..g.personas().len())
            .find(|&p| g.personas()[p].name == "big_spender")
            .unwrap();
        for p in 0..g.personas().len() {
            if p != big {
                assert!(
                    mean(big) > 2.0 * mean(p),
                    "big spenders {:.1} vs {} {:.1}",
                    mean(big),
                    g.personas()[p].name,
                    mean(p)
                );
            }
        }
    }

    #[test]
    fn segments_are_described_and_tagged() {
        let mut raw = RawConfig::default();
        raw.model.value_horizon = std::time::Duration::from_secs(3_600);
        let (e, _) = trained(raw, 40_000);
        let segments = e.segments();
        assert!(segments.iter().all(|s| !s.label.is_empty() && s.size > 0));
        let spenders = segments
            .iter()
            .max_by(|a, b| a.mean_predicted_value.total_cmp(&b.mean_predicted_value))
            .unwrap();
        assert!(
            spenders.label.contains("spend") || spenders.label.contains("frequent buyer"),
            "{spenders:?}"
        );
        // The default rules tag frequent buyers with a cross-sell of their top category.
        assert!(
            segments.iter().any(|s| s
                .action
                .as_deref()
                .is_some_and(|a| a.starts_with("cross_sell:"))),
            "{segments:?}"
        );
    }

    #[test]
    fn a_cross_sell_needs_a_category_the_segments_members_stand_out_on() {
        // The same personas, but every click and line item in one category: no segment has a
        // category of its own, so no cross-sell can name one (it used to name a hash bucket).
        let mut e = Engine::new(&RawConfig::default().validate().unwrap());
        let mut g = Generator::new(3, 600, 0.0);
        let mut t = T0;
        for _ in 0..40_000 {
            t += 1_000;
            let mut ev = g.next_event(t);
            match &mut ev {
                Event::Click(c) => c.category = "everything".into(),
                Event::Purchase(p) => p
                    .items
                    .iter_mut()
                    .for_each(|i| i.category = "everything".into()),
                Event::Social(s) => {
                    if s.target_category.is_some() {
                        s.target_category = Some("everything".into());
                    }
                }
            }
            e.apply(&ev, t);
        }
        let segments = e.segments();
        assert!(
            segments.iter().all(|s| !s
                .action
                .as_deref()
                .is_some_and(|a| a.starts_with("cross_sell:"))),
            "{segments:?}"
        );
        // With the personas' own categories a cross-sell names a category with real affinity.
        let (e, _) = trained(RawConfig::default(), 40_000);
        for s in e.segments() {
            if let Some(cat) = s
                .action
                .as_deref()
                .and_then(|a| a.strip_prefix("cross_sell:"))
            {
                assert!(!cat.starts_with("category group"), "{s:?}");
                assert_eq!(e.top_category(s.id as usize).as_deref(), Some(cat));
            }
        }
    }

    #[test]
    fn the_catalogue_creates_every_segment_and_changes_carry_its_wording_and_version() {
        use crate::catalogue::CatalogueReason;
        let mut e = Engine::new(&RawConfig::default().validate().unwrap());
        let mut g = Generator::new(3, 600, 0.0);
        let (mut t, mut changes, mut catalogue) = (T0, Vec::new(), Vec::new());
        for _ in 0..40_000 {
            t += 1_000;
            changes.extend(e.apply(&g.next_event(t), t).changes);
            catalogue.extend(e.take_catalogue());
        }
        let created: Vec<i32> = catalogue
            .iter()
            .filter(|r| r.reason == CatalogueReason::Created)
            .map(|r| r.segment_id)
            .collect();
        assert_eq!(created, (0..6).collect::<Vec<_>>(), "{catalogue:#?}");
        assert!(catalogue
            .windows(2)
            .all(|w| w[0].catalogue_version < w[1].catalogue_version));
        assert!(catalogue.iter().all(|r| r.centroid.len() == DIM));
        // Every change names the wording its catalogue version gave its segment.
        for c in changes.iter().filter(|c| c.reason != ChangeReason::Erased) {
            let wording = catalogue
                .iter()
                .filter(|r| {
                    r.segment_id == c.new_segment && r.catalogue_version <= c.catalogue_version
                })
                .max_by_key(|r| r.catalogue_version)
                .unwrap_or_else(|| panic!("no catalogue record before {c:?}"));
            assert_eq!(wording.label, c.segment_label, "{c:?}");
        }
        let last = catalogue.last().unwrap().catalogue_version;
        assert!(changes
            .iter()
            .all(|c| (1..=last).contains(&c.catalogue_version)));
    }

    #[test]
    fn saved_models_keep_their_ids_and_other_layouts_are_refused() {
        let (e, g) = trained(RawConfig::default(), 20_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.json");
        e.save_model(&path).unwrap();
        let settings = RawConfig::default().validate().unwrap();
        let loaded = Engine::with_model(&settings, &path).unwrap();
        assert_eq!(loaded.model_version(), e.model_version());
        for (_, _, z) in e.assigned_vectors().iter().take(200) {
            assert_eq!(
                loaded.models.kmeans.nearest(z).map(|n| n.best),
                e.models.kmeans.nearest(z).map(|n| n.best)
            );
        }
        // As of the saved model (the cached wording may lag it by a few mini-batches).
        for j in 0..e.models.kmeans.k() {
            assert_eq!(loaded.describe(j), e.describe_now(j));
        }
        let _ = g;

        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        json["layout_version"] = serde_json::json!(LAYOUT_VERSION + 1);
        std::fs::write(&path, json.to_string()).unwrap();
        assert!(matches!(
            Engine::with_model(&settings, &path),
            Err(ModelError::Layout { .. })
        ));
        let mut raw = RawConfig::default();
        raw.model.k = 8;
        json["layout_version"] = serde_json::json!(LAYOUT_VERSION);
        std::fs::write(&path, json.to_string()).unwrap();
        assert!(matches!(
            Engine::with_model(&raw.validate().unwrap(), &path),
            Err(ModelError::K { got: 6, want: 8 })
        ));
    }

    /// Applies a checkpoint's records the way the changelog restorer does.
    fn replay_records(
        into: &mut HashMap<String, UserState>,
        records: &HashMap<i32, Vec<UserRecord>>,
    ) {
        for recs in records.values() {
            for (id, v) in recs {
                match v {
                    Some(s) => {
                        let bytes = crate::changelog::encode_user(s);
                        into.insert(
                            id.as_str().to_owned(),
                            *crate::changelog::decode_user(&bytes).unwrap(),
                        );
                    }
                    None => {
                        into.remove(id.as_str());
                    }
                }
            }
        }
    }

    #[test]
    fn checkpoints_carry_changes_and_removals_and_restore_the_same_state() {
        let s = RawConfig::default().validate().unwrap();
        let mut e = Engine::new(&s);
        let mut g = Generator::new(5, 300, 0.0);
        let mut t = T0;
        let mut log = HashMap::new();
        for round in 0..4 {
            for _ in 0..3_000 {
                t += 1_000;
                let ev = g.next_event(t);
                let shard = (ev.user_id().len() % 3) as i32;
                e.apply_in(&ev, t, shard);
            }
            if round == 2 {
                let some = e.store.sorted_ids()[0].clone();
                assert!(e.erase(some.as_str(), t).is_some());
            }
            let full: &[i32] = if round == 0 { &[0, 1, 2] } else { &[] };
            let records = e.checkpoint(full);
            replay_records(&mut log, &records);
        }
        assert_eq!(log.len(), e.users());
        for (id, state) in e.store.snapshot() {
            assert_eq!(log.get(id.as_str()), Some(&state));
        }
        // Nothing changed: the next delta is empty; one event: one record.
        assert!(e.checkpoint(&[]).values().all(Vec::is_empty));
        let one = e.store.sorted_ids()[1].clone();
        e.apply_in(&click("one-more", one.as_str(), t), t, 7);
        let delta = e.checkpoint(&[]);
        assert_eq!(delta.len(), 1);
        assert_eq!(delta[&7].len(), 1);
        assert_eq!(delta[&7][0].0, one);
        replay_records(&mut log, &delta);

        // A second engine restored from the log and the global state agrees, segment sizes too.
        let mut r = Engine::new(&s);
        r.restore_global(&e.export_global()).unwrap();
        for shard in 0..3 {
            let users = e
                .store
                .snapshot()
                .into_iter()
                .filter(|(id, _)| (id.as_str().len() % 3) as i32 == shard)
                .map(|(id, s)| (id, Box::new(s)))
                .collect();
            r.restore_shard(shard, users);
        }
        let sizes = |e: &Engine| {
            e.segment_figures()
                .iter()
                .map(|f| f.size)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(&r), sizes(&e));
        assert_eq!(r.model_version(), e.model_version());
        assert_eq!(r.applied(), e.applied());
        let released = r.release_shard(1);
        assert!(released > 0);
        assert_eq!(r.users(), e.users() - released);
        let sized: i64 = r.segment_figures().iter().map(|f| f.size).sum();
        assert_eq!(sized as usize, r.users());
    }

    #[test]
    fn max_users_evicts_the_least_recently_seen_and_says_so() {
        let mut raw = RawConfig::default();
        raw.state.max_users = 100;
        let mut e = Engine::new(&raw.validate().unwrap());
        let mut evicted = Vec::new();
        for i in 0..1_000 {
            let t = T0 + i * 1_000;
            let a = e.apply(&click(&format!("e{i}"), &format!("u{i:04}"), t), t);
            evicted.extend(
                a.changes
                    .into_iter()
                    .filter(|c| c.reason == ChangeReason::Evicted),
            );
            assert!(e.users() <= 101, "max_users plus the 1 % slack");
        }
        assert_eq!(evicted.len(), 1_000 - e.users());
        assert_eq!(e.counters().evicted, evicted.len() as u64);
        // The oldest went first; the newest are kept.
        assert_eq!(evicted[0].user_id, "u0000");
        assert!(e.user("u0999").is_some());
        let removed: usize = e
            .checkpoint(&[])
            .values()
            .flatten()
            .filter(|r| r.1.is_none())
            .count();
        assert_eq!(removed, evicted.len());
    }

    #[test]
    fn idle_users_are_evicted_after_the_ttl() {
        let mut raw = RawConfig::default();
        raw.state.ttl = std::time::Duration::from_secs(86_400);
        let mut e = Engine::new(&raw.validate().unwrap());
        e.apply(&click("a", "idle", T0), T0);
        let mut t = T0;
        let mut evicted = Vec::new();
        for i in 0..100 {
            t += 1_800_000; // half an hour
            let a = e.apply(&click(&format!("b{i}"), "busy", t), t);
            evicted.extend(
                a.changes
                    .into_iter()
                    .filter(|c| c.reason == ChangeReason::Evicted),
            );
        }
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].user_id, "idle");
        assert!(e.user("idle").is_none() && e.user("busy").is_some());
    }

    #[test]
    fn a_user_seen_again_after_erasure_gets_higher_versions() {
        let mut raw = RawConfig::default();
        raw.model.init_users = 10;
        raw.model.init_events = 100;
        let mut e = Engine::new(&raw.validate().unwrap());
        let mut t = T0;
        let mut last = 0;
        for i in 0..500 {
            t += 60_000;
            for c in e
                .apply(&click(&format!("a{i}"), &format!("u{}", i % 50), t), t)
                .changes
            {
                if c.user_id == "u7" {
                    assert!(c.version > last);
                    last = c.version;
                }
            }
        }
        assert!(last > 0, "u7 was assigned");
        let erased = e.erase("u7", t).unwrap();
        assert!(erased.version > last);
        t += 60_000;
        e.apply(&click("again", "u7", t), t);
        assert!(e.user("u7").unwrap().version > erased.version);
    }
}
