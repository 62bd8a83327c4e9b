//! The pure core: applies one validated event to the user's state and the models, and says
//! whether the user's segment changed. Used unchanged by the Kafka pipeline, replay and benches.
//!
//! No Kafka, no tokio, no clock: event time drives features, forgetting, label maturity and
//! sweeps; the caller passes the wall-clock time used only for `emit_time`.
//!
//! Rooms: this file applies events, sweeps, evicts and erases; `assignment` decides a user's
//! segment and action (hysteresis, dwell, flaps); `models` holds the shared models with their
//! save, load, adopt and checkpoint forms; `wording` turns centroids into descriptions, actions
//! and catalogue records; `report` is what the engine tells readers (figures, segments, dumps).

mod assignment;
mod models;
mod report;
#[cfg(test)]
mod tests;
mod wording;

use models::GlobalState;
pub use models::{ModelError, Models};
pub use report::{SegmentFigures, SegmentInfo, UserDump};

use crate::config::{ActionRule, CoreSettings, LatePolicy};
use crate::decode::{Ahead, Decoder, Spare};
use crate::event::{CatalogueRecord, ChangeReason, Event, SegmentChange, Source, UserId};
use crate::features::{category_bucket, FeatureParams, UserState, Vector};
use crate::store::Store;
use assignment::Decision;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use wording::{SegmentAction, Wording};

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
/// One changelog record: a copy of a user's state (encoded by the checkpoint writer, off the
/// consume loop), or `None` for a user that left.
pub type UserRecord = (UserId, Option<Box<UserState>>);

pub struct Engine {
    store: Arc<Store>,
    params: FeatureParams,
    /// The models, counters and schedule: what a checkpoint writes beside the users.
    global: GlobalState,
    rules: Rules,
    segment_sizes: Vec<i64>,
    /// Per segment, the sum of its members' predictions.
    segment_outlook: Vec<Outlook>,
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
/// Fits after the seeding one, at 4×, 16× and 64× `init_events`.
const REFITS: u32 = 3;
/// Names remembered per category bucket.
const NAMES_PER_BUCKET: usize = 32;
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

impl Engine {
    /// An untrained engine; takes `&Settings` or just its [`CoreSettings`].
    pub fn new<'a>(s: impl Into<CoreSettings<'a>>) -> Self {
        let s = s.into();
        let (f, m) = (s.features, s.model);
        Self {
            store: Arc::default(),
            params: FeatureParams::new(f.half_lives.map(|d| d.as_millis() as f64), m.seed),
            global: GlobalState::new(s),
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
            removed: Vec::new(),
            trainer: true,
            descriptions: Default::default(),
            catalogue_out: Vec::new(),
        }
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
            self.global.models.kmeans.offer_user(id.as_str());
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
        self.global.watermark_ms = self.global.watermark_ms.max(t);
        if self.global.next_sweep_ms == i64::MIN {
            self.global.next_sweep_ms = t.saturating_add(self.rules.sweep_ms);
        }
        if self.trainer {
            self.remember_category(event);
        }
        let trainer = self.trainer;
        let version_base = version_base(self.global.watermark_ms);
        let mut new_user = false;
        let actions = self.action_table();
        let (params, rules, models) = (&self.params, &self.rules, &mut self.global.models);
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
                    Outcome::Duplicate => self.global.counters.duplicates += 1,
                    _ => self.global.counters.late += 1,
                }
                o
            }
            Ok((outcome, old, predicted, decision, version)) => {
                self.global.counters.applied += 1;
                if matches!(outcome, Outcome::Late { .. }) {
                    self.global.counters.late += 1;
                }
                self.account(old, predicted, decision.as_ref());
                if let Some(d) = decision {
                    changes.push(self.change(event.user_id(), &d, predicted, version, t, now_ms));
                }
                outcome
            }
        };
        if self.trainer
            && self.global.counters.applied >= self.global.next_fit
            && self.global.fits_left > 0
        {
            self.fit();
            self.review_catalogue(now_ms);
        }
        if self.global.watermark_ms >= self.global.next_sweep_ms {
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
            self.global.counters.flaps += 1;
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
            model_version: self.global.models.kmeans.version() as i64,
            action: d.action.clone(),
            purchase_probability: Some(now.purchase_probability),
            catalogue_version: self.global.models.catalogue.version(),
        }
    }

    fn remember_category(&mut self, event: &Event) {
        let mut note = |c: &str| {
            if c.is_empty() {
                return;
            }
            let names = &mut self.global.models.category_names[category_bucket(c)];
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
            .global
            .models
            .kmeans
            .sample()
            .iter()
            .filter_map(|u| self.store.get(u))
            .map(|s| self.global.models.scaler.transform(&s.vector(&self.params)))
            .collect();
        if points.len() < self.global.models.kmeans.k() {
            // Too few users yet: try again a little later.
            self.global.next_fit =
                self.global.counters.applied + self.global.counters.applied.max(1) / 2;
            return;
        }
        self.global.models.kmeans.fit(&points);
        self.global.fits_left -= 1;
        self.global.next_fit = self.global.counters.applied.saturating_mul(4);
    }

    /// Moves the event-time watermark to `t` (if later) and sweeps there: replay ends with this
    /// so the final state is "as of" a chosen time, idle users decayed to it.
    pub fn advance_to(&mut self, t: i64, now_ms: i64) -> Vec<SegmentChange> {
        self.global.watermark_ms = self.global.watermark_ms.max(t);
        self.sweep(now_ms)
    }

    /// Visits every user at the event-time watermark: matures value labels whose horizon passed
    /// (idle users' labels too, so the value model also learns from users who stopped buying),
    /// and re-assigns users to the drifted centroids. Returns the resulting segment changes.
    pub fn sweep(&mut self, now_ms: i64) -> Vec<SegmentChange> {
        self.set_version_clock(now_ms);
        let at = self.global.watermark_ms;
        self.global.next_sweep_ms = at.saturating_add(self.rules.sweep_ms);
        self.global.counters.sweeps += 1;
        let trainer = self.trainer;
        let actions = self.action_table();
        let (params, rules, models) = (&self.params, &self.rules, &mut self.global.models);
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
        self.global.counters.labels_matured += matured;
        self.global.counters.flaps += flaps;
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

    /// Erases a user (right to be forgotten): their state leaves memory and the model's sample,
    /// and a change with reason `erased` is returned for publication (its `new_segment` is the
    /// last segment held, or -1 if none was). `None` for an unknown user. Later events of the
    /// user start from nothing.
    pub fn erase(&mut self, user: &str, now_ms: i64) -> Option<SegmentChange> {
        let change = self.remove_user(user, ChangeReason::Erased, now_ms)?;
        self.global.counters.erased += 1;
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
        self.global.models.kmeans.forget_user(user);
        self.count_out(&state);
        self.removed.push((shard, UserId::new(user)));
        if reason == ChangeReason::Evicted {
            self.global.counters.evicted += 1;
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
            event_time: self.global.watermark_ms.max(state.anchor_ms),
            emit_time: now_ms,
            model_version: self.global.models.kmeans.version() as i64,
            action: None,
            purchase_probability: Some(0.0),
            catalogue_version: self.global.models.catalogue.version(),
        })
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
