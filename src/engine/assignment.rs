//! A user's segment and action: the nearest centroid, taken only past the hysteresis and the
//! minimum dwell, flaps detected; the action within the segment by the user's value, with its
//! own hysteresis; and `updated` records when the action changes without a move.

use super::{Models, Rules, SegmentAction};
use crate::features::{action_tag_hash, UserState, Vector, UNKNOWN_ACTION};
use crate::model::Nearest;

/// One user's decision after an event or a sweep.
pub(super) struct Decision {
    pub(super) prev: Option<u32>,
    pub(super) new: u32,
    pub(super) nearest: Nearest,
    pub(super) flap: bool,
    /// Same segment, new action: a record with reason `updated`.
    pub(super) updated: bool,
    /// The user's action in the new segment (what the record says, and is remembered).
    pub(super) action: Option<String>,
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
pub(super) fn user_action<'a>(
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
    /// A record for a user whose action changed without a move (reason `updated`): when the
    /// action the user's segment and value give differs from the one last published, after the
    /// minimum dwell since the user's last record (so at most one per dwell).
    pub(super) fn retag(
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
    pub(super) fn decide(
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
