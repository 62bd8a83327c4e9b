//! The changelog: per-user state checkpoints in a log that is neither compacted nor
//! transactional, and their restoration. Pure: bytes in, state out; the pipeline does the I/O.
//!
//! One changelog partition per input partition (a user's events all arrive on one partition of
//! each input topic, so its state has one home). A checkpoint of a partition is
//!
//! 1. one record per user changed since the previous checkpoint (key = user id, value = the
//!    encoded state, or no value for a user that left: erased or evicted), then
//! 2. a **marker** naming the next input offsets of that partition on each input topic.
//!
//! Every record carries its writer's **epoch**. Restoring a partition reads it from the start and
//! applies a checkpoint's records only when its marker arrives, so a checkpoint cut short by a
//! crash is ignored and the input is re-read from the previous marker's offsets: nothing is lost
//! and nothing counted twice. Growth is bounded by **full** checkpoints (every user of the
//! partition; users not in it are gone) and the topic's retention.
//!
//! Writers are fenced by epoch: a new owner of a partition writes with an epoch above every epoch
//! it restored, and its first checkpoint is a full one. A marker is accepted if it is full and its
//! epoch is at least the current one, or if it continues the current writer's chain (same epoch,
//! next sequence number); so a previous owner that keeps writing after losing the partition (a
//! "zombie") cannot mix its state into the new owner's.

use crate::event::{Source, UserId};
use crate::features::{Signals, UserState, LAYOUT_VERSION, UNKNOWN_ACTION};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Header naming a changelog record's kind: [`KIND_USER`] or [`KIND_MARKER`].
pub const KIND_HEADER: &str = "segstream.kind";
pub const KIND_USER: &str = "user";
pub const KIND_MARKER: &str = "marker";
/// The engine's models and counters, written before each marker (the writer's latest wins).
pub const KIND_GLOBAL: &str = "global";
/// Header carrying the writer's epoch (decimal).
pub const EPOCH_HEADER: &str = "segstream.epoch";
/// Key of marker records.
pub const MARKER_KEY: &[u8] = b"segstream.marker";

/// First byte of an encoded user state; bumped when the encoding changes. Format 1 is the
/// state alone; format 2 appends its [`Signals`] (format 1 restores with none, its published
/// action unknown).
const USER_FORMAT: u8 = 2;
const USER_FORMAT_STATE_ONLY: u8 = 1;

/// The end of one partition's checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// The writer's epoch.
    pub epoch: u64,
    /// Position in the writer's chain: 0 for its first checkpoint, then +1.
    pub seq: u64,
    /// Whether this checkpoint holds every user of the partition.
    pub full: bool,
    /// User records of this checkpoint (written before the marker, same epoch).
    pub records: u64,
    /// Next offset to consume per input topic, by source name.
    pub offsets: BTreeMap<String, i64>,
    /// Feature layout of the states.
    pub layout_version: u32,
    /// Wall-clock time of writing (ms), for the checkpoint-age metric.
    pub written_ms: i64,
}

impl Marker {
    pub fn offset(&self, source: Source) -> Option<i64> {
        self.offsets.get(source.as_str()).copied()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("user record is not a segstream state (format byte {0})")]
    Format(u8),
    #[error("user record does not decode: {0}")]
    Decode(#[from] postcard::Error),
    #[error("marker does not decode: {0}")]
    Marker(#[from] serde_json::Error),
    #[error("checkpoint has feature layout {got} but this build uses {want}; restore is impossible, start from an empty changelog")]
    Layout { got: u32, want: u32 },
}

impl ChangelogError {
    pub fn code(&self) -> &'static str {
        match self {
            ChangelogError::Format(_) | ChangelogError::Decode(_) => "bad_user_record",
            ChangelogError::Marker(_) => "bad_marker",
            ChangelogError::Layout { .. } => "layout",
        }
    }
}

pub(crate) fn encode_user(state: &UserState) -> Vec<u8> {
    let mut out = vec![USER_FORMAT];
    // Serialising plain data into a Vec cannot fail.
    out.extend(postcard::to_stdvec(state).unwrap_or_default());
    out.extend(postcard::to_stdvec(&state.signals).unwrap_or_default());
    out
}

pub(crate) fn decode_user(bytes: &[u8]) -> Result<Box<UserState>, ChangelogError> {
    match bytes.split_first() {
        Some((&USER_FORMAT, rest)) => {
            let (mut state, rest): (UserState, _) = postcard::take_from_bytes(rest)?;
            state.signals = postcard::from_bytes::<Signals>(rest)?;
            Ok(Box::new(state))
        }
        Some((&USER_FORMAT_STATE_ONLY, rest)) => {
            let mut state: UserState = postcard::from_bytes(rest)?;
            state.signals.published_action = UNKNOWN_ACTION;
            Ok(Box::new(state))
        }
        Some((b, _)) => Err(ChangelogError::Format(*b)),
        None => Err(ChangelogError::Format(0)),
    }
}

pub(crate) fn encode_marker(m: &Marker) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

pub(crate) fn decode_marker(bytes: &[u8]) -> Result<Marker, ChangelogError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// What restoring one partition produced.
#[derive(Debug, Default)]
pub struct Restored {
    pub users: Vec<(UserId, Box<UserState>)>,
    /// The accepted marker the state is as of; `None` if the partition has no checkpoint.
    pub marker: Option<Marker>,
    /// The highest epoch any writer used: the next owner writes with one more.
    pub max_epoch: u64,
    pub stats: RestoreStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub records: u64,
    pub markers: u64,
    /// Markers of a fenced-off writer or of an incomplete checkpoint.
    pub rejected_markers: u64,
    /// User records never confirmed by a marker (a checkpoint cut short, or a fenced writer's).
    pub discarded_records: u64,
}

/// A user record as read, decoded (a decoding error counts only if its checkpoint is accepted):
/// the user and its state (`None`: a removal).
type PendingRecord = (UserId, Option<Result<Box<UserState>, ChangelogError>>);

/// Reads one changelog partition in log order; see the module documentation for the rules.
#[derive(Default)]
pub struct Restorer {
    users: HashMap<UserId, Box<UserState>, ahash::RandomState>,
    current: Option<Marker>,
    max_epoch: u64,
    /// Records since each epoch's last marker. Decoded as they arrive (the bytes are not kept:
    /// at a million users that copy and its page faults were most of a restore's time).
    pending: HashMap<u64, Vec<PendingRecord>>,
    stats: RestoreStats,
}

impl Restorer {
    /// A user record: `value` is `None` for a tombstone.
    pub fn user(&mut self, epoch: u64, key: &[u8], value: Option<&[u8]>) {
        self.stats.records += 1;
        let id = UserId::new(&String::from_utf8_lossy(key));
        self.pending
            .entry(epoch)
            .or_default()
            .push((id, value.map(decode_user)));
    }

    /// A marker; returns whether it was accepted (its checkpoint is now the state).
    pub fn marker(&mut self, value: &[u8]) -> Result<bool, ChangelogError> {
        let m = decode_marker(value)?;
        self.stats.markers += 1;
        self.max_epoch = self.max_epoch.max(m.epoch);
        let pending = self.pending.remove(&m.epoch).unwrap_or_default();
        let accept = pending.len() as u64 == m.records
            && match &self.current {
                None => m.full || m.seq == 0,
                Some(c) if m.full => m.epoch >= c.epoch,
                Some(c) => m.epoch == c.epoch && m.seq == c.seq + 1,
            };
        if !accept {
            self.stats.rejected_markers += 1;
            self.stats.discarded_records += pending.len() as u64;
            return Ok(false);
        }
        if m.layout_version != LAYOUT_VERSION {
            return Err(ChangelogError::Layout {
                got: m.layout_version,
                want: LAYOUT_VERSION,
            });
        }
        if m.full {
            self.users.clear();
            self.users.reserve(pending.len());
        }
        for (id, value) in pending {
            match value {
                Some(state) => {
                    self.users.insert(id, state?);
                }
                None => {
                    self.users.remove(&id);
                }
            }
        }
        self.current = Some(m);
        Ok(true)
    }

    pub fn finish(mut self) -> Restored {
        self.stats.discarded_records += self.pending.values().map(|p| p.len() as u64).sum::<u64>();
        let mut users: Vec<_> = self.users.into_iter().collect();
        users.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Restored {
            users,
            marker: self.current,
            max_epoch: self.max_epoch,
            stats: self.stats,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(events: u64) -> UserState {
        let mut s = UserState::default();
        s.events = events;
        s
    }

    fn marker(epoch: u64, seq: u64, full: bool, records: u64, offset: i64) -> Vec<u8> {
        encode_marker(&Marker {
            epoch,
            seq,
            full,
            records,
            offsets: [("clickstream".to_owned(), offset)].into_iter().collect(),
            layout_version: LAYOUT_VERSION,
            written_ms: 0,
        })
    }

    fn put(r: &mut Restorer, epoch: u64, user: &str, events: u64) {
        r.user(epoch, user.as_bytes(), Some(&encode_user(&state(events))));
    }

    fn events(restored: &Restored) -> Vec<(String, u64)> {
        restored
            .users
            .iter()
            .map(|(id, s)| (id.as_str().to_owned(), s.events))
            .collect()
    }

    #[test]
    fn a_state_round_trips_exactly() {
        let mut s = state(7);
        s.anchor_ms = 1_700_000_000_123;
        s.predicted_value = 0.1 + 0.2;
        s.segment = Some(3);
        s.signals = Signals {
            purchase_probability: 0.25,
            published_action: 7,
        };
        assert_eq!(*decode_user(&encode_user(&s)).unwrap(), s);
        assert!(decode_user(&[9, 1, 2]).is_err());
        assert!(decode_user(&[]).is_err());
    }

    #[test]
    fn a_state_written_before_signals_restores_without_them() {
        let mut s = state(7);
        s.segment = Some(3);
        let mut v1 = vec![USER_FORMAT_STATE_ONLY];
        v1.extend(postcard::to_stdvec(&s).unwrap());
        let restored = decode_user(&v1).unwrap();
        assert_eq!(restored.segment, Some(3));
        assert_eq!(restored.signals.purchase_probability, 0.0);
        assert_eq!(restored.signals.published_action, UNKNOWN_ACTION);
    }

    #[test]
    fn deltas_apply_on_top_of_a_full_checkpoint_and_tombstones_remove() {
        let mut r = Restorer::default();
        put(&mut r, 1, "a", 1);
        put(&mut r, 1, "b", 1);
        r.marker(&marker(1, 0, true, 2, 10)).unwrap();
        put(&mut r, 1, "a", 2);
        r.user(1, b"b", None);
        put(&mut r, 1, "c", 1);
        r.marker(&marker(1, 1, false, 3, 20)).unwrap();
        let out = r.finish();
        assert_eq!(events(&out), vec![("a".into(), 2), ("c".into(), 1)]);
        assert_eq!(out.marker.unwrap().offset(Source::Clickstream), Some(20));
        assert_eq!(out.max_epoch, 1);
    }

    #[test]
    fn a_checkpoint_cut_short_is_ignored() {
        let mut r = Restorer::default();
        put(&mut r, 1, "a", 1);
        r.marker(&marker(1, 0, true, 1, 10)).unwrap();
        put(&mut r, 1, "a", 5); // crash before the marker
        let out = r.finish();
        assert_eq!(events(&out), vec![("a".into(), 1)]);
        assert_eq!(out.marker.unwrap().offset(Source::Clickstream), Some(10));
        assert_eq!(out.stats.discarded_records, 1);
    }

    #[test]
    fn a_marker_whose_records_are_missing_is_rejected() {
        let mut r = Restorer::default();
        put(&mut r, 1, "a", 1);
        r.marker(&marker(1, 0, true, 1, 10)).unwrap();
        r.marker(&marker(1, 1, false, 2, 20)).unwrap();
        let out = r.finish();
        assert_eq!(out.marker.unwrap().offset(Source::Clickstream), Some(10));
        assert_eq!(out.stats.rejected_markers, 1);
    }

    #[test]
    fn a_fenced_writer_cannot_mix_into_the_new_owners_state() {
        let mut r = Restorer::default();
        put(&mut r, 1, "a", 1);
        r.marker(&marker(1, 0, true, 1, 10)).unwrap();
        // The new owner (epoch 2) restored up to here and writes its full checkpoint, while the
        // old owner (epoch 1) keeps writing deltas, interleaved.
        put(&mut r, 2, "a", 3);
        put(&mut r, 1, "a", 99);
        put(&mut r, 2, "b", 1);
        r.marker(&marker(2, 0, true, 2, 30)).unwrap();
        r.marker(&marker(1, 1, false, 1, 40)).unwrap();
        put(&mut r, 1, "z", 1);
        r.marker(&marker(1, 2, true, 1, 50)).unwrap();
        put(&mut r, 2, "b", 2);
        r.marker(&marker(2, 1, false, 1, 35)).unwrap();
        let out = r.finish();
        assert_eq!(events(&out), vec![("a".into(), 3), ("b".into(), 2)]);
        assert_eq!(out.marker.unwrap().offset(Source::Clickstream), Some(35));
        assert_eq!(out.max_epoch, 2);
    }

    #[test]
    fn the_old_owners_last_checkpoint_before_the_new_owners_full_one_is_superseded() {
        let mut r = Restorer::default();
        put(&mut r, 1, "a", 1);
        r.marker(&marker(1, 0, true, 1, 10)).unwrap();
        put(&mut r, 1, "x", 1);
        r.marker(&marker(1, 1, false, 1, 20)).unwrap();
        put(&mut r, 2, "a", 2);
        r.marker(&marker(2, 0, true, 1, 15)).unwrap();
        let out = r.finish();
        // The full checkpoint replaces everything: "x" came from the superseded chain.
        assert_eq!(events(&out), vec![("a".into(), 2)]);
    }

    #[test]
    fn another_layout_is_refused_with_a_clear_error() {
        let mut r = Restorer::default();
        let m = Marker {
            epoch: 1,
            seq: 0,
            full: true,
            records: 0,
            offsets: BTreeMap::new(),
            layout_version: LAYOUT_VERSION + 1,
            written_ms: 0,
        };
        let e = r.marker(&encode_marker(&m)).unwrap_err();
        assert_eq!(e.code(), "layout");
    }
}
