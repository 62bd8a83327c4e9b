//! The per-user state map. Guards never leave this module: callers pass a closure that runs
//! while the user's entry is locked, and get back what it returns.

use crate::event::UserId;
use crate::features::UserState;
use dashmap::DashMap;
use std::borrow::Borrow;

impl Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Concurrent map from user to state. Hashing with aHash: several times faster than SipHash on
/// short ids, and still keyed randomly per process, so crafted user ids cannot collide on purpose.
#[derive(Default)]
pub struct Store {
    map: DashMap<UserId, UserState, ahash::RandomState>,
}

impl Store {
    /// Runs `f` on the user's state, creating an empty state for a new user. The entry is locked
    /// while `f` runs, so `f` must not touch the store.
    pub fn update<R>(&self, user: &str, f: impl FnOnce(&mut UserState) -> R) -> R {
        if let Some(mut entry) = self.map.get_mut(user) {
            return f(&mut entry);
        }
        let mut entry = self.map.entry(UserId::new(user)).or_default();
        f(&mut entry)
    }

    /// A copy of one user's state.
    pub fn get(&self, user: &str) -> Option<UserState> {
        self.map.get(user).map(|e| e.clone())
    }

    /// Removes a user; returns the state it had.
    pub fn remove(&self, user: &str) -> Option<UserState> {
        self.map.remove(user).map(|(_, s)| s)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Copies of all states, sorted by user id.
    pub fn snapshot(&self) -> Vec<(UserId, UserState)> {
        let mut all: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

impl Store {
    /// Every user id, sorted: the order a sweep visits users in, so that results do not depend
    /// on the hash map's (per-process random) iteration order.
    pub fn sorted_ids(&self) -> Vec<UserId> {
        let mut ids: Vec<UserId> = self.map.iter().map(|e| e.key().clone()).collect();
        ids.sort_unstable();
        ids
    }
}
