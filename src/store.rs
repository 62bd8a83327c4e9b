//! The per-user state map. Guards never leave this module: callers pass a closure that runs
//! while the user's entry is locked, and get back what it returns.
//!
//! Each entry also remembers its shard (the input partition its events arrive on, so the
//! changelog partition its checkpoints go to) and whether it changed since the last checkpoint.

use crate::event::UserId;
use crate::features::UserState;
use dashmap::DashMap;
use std::borrow::Borrow;
use std::sync::atomic::{AtomicUsize, Ordering};

impl Borrow<str> for UserId {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

#[derive(Default)]
struct Entry {
    /// Boxed: the map's slots stay small, so growing it moves pointers, not states, and its
    /// spare capacity costs bytes per slot instead of a state's size.
    state: Box<UserState>,
    shard: i32,
    dirty: bool,
}

/// Concurrent map from user to state. Hashing with aHash: several times faster than SipHash on
/// short ids, and still keyed randomly per process, so crafted user ids cannot collide on purpose.
#[derive(Default)]
pub struct Store {
    map: DashMap<UserId, Entry, ahash::RandomState>,
    /// Users in the map, counted as they are added and removed. `DashMap::len` sums its shards
    /// one after another, so while another thread adds a user to one shard and evicts one from
    /// another it can count both (more users than the map ever held); it also locks every
    /// shard, and the engine asks on every new user.
    users: AtomicUsize,
}

impl Store {
    /// Runs `f` on the user's state, creating an empty state for a new user, and marks it
    /// changed. The entry is locked while `f` runs, so `f` must not touch the store.
    pub fn update<R>(&self, user: &str, f: impl FnOnce(&mut UserState) -> R) -> R {
        self.update_entry(user, None, f)
    }

    /// [`Store::update`] for an event that arrived on `shard`: the user's checkpoints go there.
    pub(crate) fn update_in<R>(
        &self,
        user: &str,
        shard: i32,
        f: impl FnOnce(&mut UserState) -> R,
    ) -> R {
        self.update_entry(user, Some(shard), f)
    }

    fn update_entry<R>(
        &self,
        user: &str,
        shard: Option<i32>,
        f: impl FnOnce(&mut UserState) -> R,
    ) -> R {
        let mut entry = match self.map.get_mut(user) {
            Some(entry) => entry,
            None => match self.map.entry(UserId::new(user)) {
                dashmap::Entry::Occupied(e) => e.into_ref(),
                dashmap::Entry::Vacant(e) => {
                    self.users.fetch_add(1, Ordering::Relaxed);
                    e.insert(Entry::default())
                }
            },
        };
        entry.dirty = true;
        if let Some(shard) = shard {
            entry.shard = shard;
        }
        f(&mut entry.state)
    }

    /// Asks the CPU to start loading `user`'s state into cache (no effect on results). The
    /// lookup itself is done now; the state's cache lines then arrive while the caller works on
    /// something else, typically the event before this one.
    pub(crate) fn prefetch(&self, user: &str) {
        if let Some(entry) = self.map.get(user) {
            prefetch_lines(&*entry.state);
        }
    }

    /// A copy of one user's state.
    pub fn get(&self, user: &str) -> Option<UserState> {
        self.map.get(user).map(|e| (*e.state).clone())
    }

    /// Removes a user; returns its shard and the state it had.
    pub fn remove(&self, user: &str) -> Option<(i32, Box<UserState>)> {
        let (_, e) = self.map.remove(user)?;
        self.users.fetch_sub(1, Ordering::Relaxed);
        Some((e.shard, e.state))
    }

    /// Inserts a restored state, not marked changed (it is what the changelog holds).
    pub fn insert(
        &self,
        user: UserId,
        shard: i32,
        state: Box<UserState>,
    ) -> Option<Box<UserState>> {
        let old = self.map.insert(
            user,
            Entry {
                state,
                shard,
                dirty: false,
            },
        );
        if old.is_none() {
            self.users.fetch_add(1, Ordering::Relaxed);
        }
        old.map(|e| e.state)
    }

    /// Users in the map: exact whenever no other thread is adding or removing one.
    pub fn len(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies of all states, sorted by user id.
    pub fn snapshot(&self) -> Vec<(UserId, UserState)> {
        let mut all: Vec<_> = self
            .map
            .iter()
            .map(|e| (e.key().clone(), (*e.value().state).clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Every user id, sorted: the order a sweep visits users in, so that results do not depend
    /// on the hash map's (per-process random) iteration order.
    pub(crate) fn sorted_ids(&self) -> Vec<UserId> {
        let mut ids: Vec<UserId> = self.map.iter().map(|e| e.key().clone()).collect();
        ids.sort_unstable();
        ids
    }

    /// Visits every user changed since the last call (with its shard) and clears the marks.
    pub(crate) fn take_changed(&self, mut f: impl FnMut(&UserId, i32, &UserState)) {
        for mut e in self.map.iter_mut() {
            if e.dirty {
                e.dirty = false;
                let (id, entry) = e.pair();
                f(id, entry.shard, &entry.state);
            }
        }
    }

    /// Visits every user of `shard`.
    pub(crate) fn visit_shard(&self, shard: i32, mut f: impl FnMut(&UserId, &UserState)) {
        for e in self.map.iter() {
            if e.shard == shard {
                f(e.key(), &e.state);
            }
        }
    }

    /// Removes every user of `shard`; returns their states, in the boxes the map held them in
    /// (a state is 13 cache lines: moving the boxes copies none).
    #[allow(clippy::vec_box)]
    pub(crate) fn remove_shard(&self, shard: i32) -> Vec<Box<UserState>> {
        let mut out = Vec::new();
        self.map.retain(|_, e| {
            if e.shard == shard {
                out.push(std::mem::take(&mut e.state));
                false
            } else {
                true
            }
        });
        self.users.fetch_sub(out.len(), Ordering::Relaxed);
        out
    }

    /// (latest event time, user) of every user, for evicting the least recently seen.
    pub fn recency(&self) -> Vec<(i64, UserId)> {
        self.map
            .iter()
            .map(|e| (e.state.anchor_ms, e.key().clone()))
            .collect()
    }
}

/// Hints every cache line of `value` for reading (x86-64; elsewhere nothing).
///
/// The crate's one `unsafe` block: `_mm_prefetch` is an `unsafe fn` only because it takes a
/// raw pointer, but a prefetch dereferences nothing and never faults (the pointers here are
/// inside `value` anyway), so it cannot affect memory safety. std's safe `prefetch_read` is
/// still unstable.
#[allow(unsafe_code)]
fn prefetch_lines<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = (value as *const T).cast::<i8>();
        let size = std::mem::size_of::<T>();
        // Every 64 bytes, and the last byte: `value` need not start on a line.
        for offset in (0..size).step_by(64).chain(size.checked_sub(1)) {
            // SAFETY: a prefetch is a hint; it reads nothing the program sees.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(events: u64) -> Box<UserState> {
        let mut state = Box::<UserState>::default();
        state.events = events;
        state
    }

    #[test]
    fn the_count_follows_every_way_in_and_out() {
        let store = Store::default();
        let check = |store: &Store| assert_eq!(store.len(), store.map.len());
        store.update_in("a", 0, |s| s.events += 1);
        store.update_in("a", 0, |s| s.events += 1);
        store.update("b", |_| ());
        check(&store);
        assert!(store.insert(UserId::new("c"), 1, boxed(3)).is_none());
        assert!(store.insert(UserId::new("c"), 1, boxed(4)).is_some());
        assert!(store.insert(UserId::new("d"), 1, boxed(5)).is_none());
        check(&store);
        assert_eq!(store.len(), 4);
        assert!(store.remove("b").is_some());
        assert!(store.remove("b").is_none());
        check(&store);
        assert_eq!(store.remove_shard(1).len(), 2);
        check(&store);
        assert_eq!(store.len(), 1);
        assert!(store.remove("a").is_some());
        assert!(store.is_empty());
    }

    /// What a bounded store looks like from another thread (the metrics, the API): while
    /// one thread adds a user and then evicts one, no reader sees more than the bound plus
    /// the one just added.
    #[test]
    fn a_reader_never_sees_more_users_than_were_held() {
        let store = Store::default();
        let bound = 60;
        let done = std::sync::atomic::AtomicBool::new(false);
        let peak = std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut peak = 0;
                while !done.load(Ordering::Relaxed) {
                    peak = peak.max(store.len());
                }
                peak
            });
            for i in 0..200_000 {
                store.update(&format!("u{i}"), |_| ());
                if store.len() > bound {
                    store.remove(&format!("u{}", i - bound));
                }
            }
            done.store(true, Ordering::Relaxed);
            reader.join().expect("reader")
        });
        assert!(peak <= bound + 1, "a reader saw {peak} users");
        assert_eq!(store.len(), bound);
        assert_eq!(store.map.len(), bound);
    }
}
